"""Every language through the gateway against the offline engine, per language.

    .venv/bin/python bench/bench_languages.py [--audio DIR] [--match pangrama]

``DIR`` holds ``transcripts.tsv`` (file, language, reference) and the 16 kHz mono PCM16 WAVs it
names; by default ``tests/data/multilingual`` (synthetic Kokoro TTS clips: see its SOURCES.md,
they are not real speech). For each clip:

- offline: the engine's model for that language (Whisper base for all but English, tiny.en for
  English) decodes the whole clip once, language given;
- gateway ``language=xx``: the clip streamed to a real server on loopback (as fast as it takes
  it), the transcript of its segments;
- gateway ``language=multi``: the same with the language identified per utterance; the segment's
  ``language`` is compared with the clip's.

Prints errors/units per language (words, or characters for ja/zh: ``harken.wer.multilingual_errors``)
for the three paths, identification accuracy, and the decode seconds per audio second offline,
with the machine's load average (it is shared: figures of one run compare with each other only).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.client import listen_url, read_wav_16k, stream_messages  # noqa: E402
from harken.config import Settings  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402
from harken.stt.decoding import Decoding  # noqa: E402
from harken.wer import multilingual_errors  # noqa: E402
from tests.gateway_server import GatewayServer  # noqa: E402

DEFAULT_AUDIO = Path(__file__).resolve().parent.parent / "tests" / "data" / "multilingual"


async def through_gateway(server: GatewayServer, pcm: np.ndarray, language: str) -> tuple[str, list]:
    pcm = np.concatenate([pcm, np.zeros(16000, dtype=np.int16)])
    messages = [pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)]
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, language=language)
    result = await stream_messages(url, messages, 0.1, token=mint_local_token(server.settings, "bench", 600),
                                   realtime=False, settle_seconds=45.0, max_wait=300)
    return result.transcript(), [s.get("language") for s in result.ordered()]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    parser.add_argument("--match", default="", help="only the files whose name contains this")
    args = parser.parse_args()
    with open(args.audio / "transcripts.tsv", newline="") as f:
        rows = [row for row in csv.DictReader(f, delimiter="\t") if args.match in row["file"]]
    print(f"cpus {sorted(os.sched_getaffinity(0))}, load average {os.getloadavg()} (shared machine)")
    with tempfile.TemporaryDirectory() as data:
        server = GatewayServer(Settings(data_dir=Path(data), port=0, log_level="warning")).start()
        try:
            provider = server.gateway.providers["local"]
            totals: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
            identified: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            decode_seconds = audio_seconds = 0.0
            for row in rows:
                language, pcm = row["language"], read_wav_16k(args.audio / row["file"])
                model = None if language == "en" else await provider.model_for(language)
                started = time.perf_counter()
                words, _, _ = await asyncio.to_thread(provider.decode_clip, pcm, Decoding(language), model)
                decode_seconds += time.perf_counter() - started
                audio_seconds += pcm.size / 16000
                texts = {"offline": "".join(w[0] for w in words)}
                texts["gateway"], _ = await through_gateway(server, pcm, language)
                texts["multi"], languages = await through_gateway(server, pcm, "multi")
                identified[language][0] += sum(1 for found in languages if found == language)
                identified[language][1] += len(languages)
                for path, text in texts.items():
                    errors, units = multilingual_errors(row["reference"], text, language)
                    totals[language][path][0] += errors
                    totals[language][path][1] += units
                print(f"{row['file']:28} offline {texts['offline'].strip()!r} | gateway {texts['gateway']!r} | "
                      f"multi {texts['multi']!r} {languages}", flush=True)
        finally:
            server.stop()
    print(f"\nload average after {os.getloadavg()}")
    print(f"offline decode: {decode_seconds:.1f} s for {audio_seconds:.1f} s of audio "
          f"(RTF {decode_seconds / audio_seconds:.2f}, on the shared machine)")
    print(f"{'language':8} {'unit':5} {'offline':>14} {'language=xx':>14} {'multi':>14} {'identified':>11}")
    for language, paths in totals.items():
        unit = "char" if multilingual_errors("ab", "ab", language)[1] == 2 else "word"

        def rate(path: str) -> str:
            errors, units = paths[path]
            return f"{errors}/{units} {100 * errors / max(units, 1):5.1f}%"

        found, segments = identified[language]
        print(f"{language:8} {unit:5} {rate('offline'):>14} {rate('gateway'):>14} {rate('multi'):>14} "
              f"{found:>4}/{segments:<4}")


if __name__ == "__main__":
    asyncio.run(main())
