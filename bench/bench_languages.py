"""Every language through the gateway against the offline engine, per language, on real speech.

    .venv/bin/python bench/bench_languages.py [--audio DIR] [--languages es,fr] [--gap 2.0] [--english-only]

``DIR`` holds ``transcripts.tsv`` (file, language, reference) and the clips it names (any format
ffmpeg reads; ``.g722`` is raw G.722); by default ``tests/data/multilingual/real``: recordings of
people in en, es, fr, it, ru, sv and ja (see its SOURCES.md). ``tests/data/multilingual`` holds
synthetic TTS clips. Per language:

- **offline**: the engine's model for the language (Whisper base for all but English, tiny.en for
  English) decodes each clip whole, language given; **offline multi**: the multilingual model
  decodes each clip whole with the language identified on the whole clip;
- **gateway** ``language=xx``: the language's clips streamed in one session to a real server on
  loopback, one after another with ``--gap`` seconds of silence between them, as fast as the
  server takes them; the session's transcript is scored against the clips' references joined in
  order;
- **gateway** ``multi``: the same session with ``language=multi``: the language identified per
  utterance; each segment's ``language`` is compared with the clips' (segments and their words);
- ``--english-only``: the same ``language=xx`` session on a server without the multilingual model
  (what the engine did before it had one: tiny.en for every language), as the baseline.

Prints errors/units per language (words, or characters for ja/zh: ``harken.wer.multilingual_errors``),
the gateway's excess over offline in points, language identification, the totals over the
languages other than English (words and characters apart), and the offline decode seconds per
audio second, with the machine's load average (it is shared: figures of one run compare with each
other only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.client import listen_url, stream_messages  # noqa: E402
from harken.config import Settings  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402
from harken.stt.decoding import Decoding  # noqa: E402
from harken.wer import CHARACTER_LANGUAGES, multilingual_errors  # noqa: E402
from tests.gateway_server import GatewayServer  # noqa: E402
from tests.speech_clips import REAL_SPEECH, Clip, clips  # noqa: E402

PATHS = ("offline", "offline multi", "gateway", "gateway multi", "english-only")


@dataclass
class LanguageResult:
    audio_seconds: float = 0.0
    errors: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    offline_identified: list[int] = field(default_factory=lambda: [0, 0])     # clips right, clips
    segments_identified: list[int] = field(default_factory=lambda: [0, 0])    # segments right, segments
    words_identified: list[int] = field(default_factory=lambda: [0, 0])       # words right, words
    confused: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def score(self, path: str, reference: str, text: str, language: str) -> None:
        errors, units = multilingual_errors(reference, text, language)
        self.errors[path][0] += errors
        self.errors[path][1] += units

    def rate(self, path: str) -> float | None:
        errors, units = self.errors.get(path, (0, 0))
        return 100 * errors / units if units else None


def session_messages(pcms: list[np.ndarray], gap: float) -> list[bytes]:
    """The clips one after another, ``gap`` s of silence after each, as 100 ms PCM16 messages."""
    silence = np.zeros(int(gap * 16000), dtype=np.int16)
    audio = np.concatenate([part for pcm in pcms for part in (pcm, silence)])
    return [audio[i:i + 1600].tobytes() for i in range(0, len(audio), 1600)]


async def through_gateway(server: GatewayServer, messages: list[bytes], language: str) -> list[dict]:
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, language=language)
    load = server.gateway.providers["local"].load_state
    # A user of its own per session: the same user's next session would continue this conversation
    # (the app's behaviour), and its segments would be read as the next session's words.
    uid = f"bench-{language}-{uuid.uuid4().hex[:8]}"
    result = await stream_messages(url, messages, 0.1, token=mint_local_token(server.settings, uid, 3600),
                                   realtime=False, settle_seconds=3.0, max_wait=1800,
                                   busy=lambda: load.in_flight > 0)
    if result.close_code not in (None, 1000):
        raise RuntimeError(f"{language}: the session closed {result.close_code} {result.close_reason}")
    return result.ordered()


async def bench_language(server: GatewayServer, english_only: GatewayServer | None, language: str,
                         rows: list[Clip], folder: Path, gap: float, timing: list[float]) -> LanguageResult:
    provider = server.gateway.providers["local"]
    model = await provider.model_for(language)
    multi_model = await provider.model_for("multi")
    result = LanguageResult()
    pcms = [row.pcm(folder) for row in rows]
    for row, pcm in zip(rows, pcms):
        started = time.perf_counter()
        words, _, _ = await asyncio.to_thread(provider.decode_clip, pcm, Decoding(language), model)
        timing[0] += time.perf_counter() - started
        timing[1] += pcm.size / 16000
        result.audio_seconds += pcm.size / 16000
        multi_words, _, identified = await asyncio.to_thread(provider.decode_clip, pcm, Decoding(None), multi_model)
        result.score("offline", row.reference, "".join(w[0] for w in words), language)
        result.score("offline multi", row.reference, "".join(w[0] for w in multi_words), language)
        result.offline_identified[0] += identified == language
        result.offline_identified[1] += 1
        if identified != language:
            print(f"  offline identified {row.file} as {identified}", flush=True)
    reference = " ".join(row.reference for row in rows)
    messages = session_messages(pcms, gap)
    texts = {}
    for path, target, asked in (("gateway", server, language), ("gateway multi", server, "multi"),
                                ("english-only", english_only, language)):
        if target is None:
            continue
        segments = await through_gateway(target, messages, asked)
        texts[path] = " ".join(segment["text"] for segment in segments)
        result.score(path, reference, texts[path], language)
        if path == "gateway multi":
            for segment in segments:
                found, words = segment.get("language"), len(segment["text"].split())
                result.segments_identified[0] += found == language
                result.segments_identified[1] += 1
                result.words_identified[0] += words if found == language else 0
                result.words_identified[1] += words
                if found != language:
                    result.confused[str(found)] += 1
    for path, text in texts.items():
        print(f"  {path:13} {text[:300]!r}", flush=True)
    return result


def fraction(pair: list[int]) -> str:
    return f"{pair[0]}/{pair[1]}"


def print_table(results: dict[str, LanguageResult], english_only: bool) -> None:
    paths = [p for p in PATHS if english_only or p != "english-only"]
    print(f"\n{'lang':5} {'unit':5} {'audio s':>7} " + " ".join(f"{p:>17}" for p in paths)
          + f" {'gw-off pt':>9} {'multi-off pt':>12} {'ID offline':>10} {'ID segments':>11} {'ID words':>9}")

    def cell(result: LanguageResult, path: str) -> str:
        errors, units = result.errors.get(path, (0, 0))
        return f"{errors}/{units} {100 * errors / max(units, 1):5.1f}%"

    totals = {"word": LanguageResult(), "char": LanguageResult()}
    for language, result in results.items():
        unit = "char" if language in CHARACTER_LANGUAGES else "word"
        gap = result.rate("gateway") - result.rate("offline")
        multi_gap = result.rate("gateway multi") - result.rate("offline multi")
        confused = ", ".join(f"{k}×{v}" for k, v in result.confused.items())
        print(f"{language:5} {unit:5} {result.audio_seconds:7.1f} " + " ".join(f"{cell(result, p):>17}" for p in paths)
              + f" {gap:+9.1f} {multi_gap:+12.1f} {fraction(result.offline_identified):>10} "
              f"{fraction(result.segments_identified):>11} {fraction(result.words_identified):>9}"
              + (f"  (segments taken for {confused})" if confused else ""))
        if language == "en":
            continue
        total = totals[unit]
        total.audio_seconds += result.audio_seconds
        for path in paths:
            for i in (0, 1):
                total.errors[path][i] += result.errors[path][i]
        for name in ("offline_identified", "segments_identified", "words_identified"):
            for i in (0, 1):
                getattr(total, name)[i] += getattr(result, name)[i]
    for unit, total in totals.items():
        if not total.errors:
            continue
        gap = total.rate("gateway") - total.rate("offline")
        multi_gap = total.rate("gateway multi") - total.rate("offline multi")
        print(f"{'¬en':5} {unit:5} {total.audio_seconds:7.1f} " + " ".join(f"{cell(total, p):>17}" for p in paths)
              + f" {gap:+9.1f} {multi_gap:+12.1f} {fraction(total.offline_identified):>10} "
              f"{fraction(total.segments_identified):>11} {fraction(total.words_identified):>9}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, default=REAL_SPEECH)
    parser.add_argument("--languages", default="",
                        help="comma-separated codes, run in that order (default: every language listed)")
    parser.add_argument("--gap", type=float, default=2.0, help="seconds of silence after each clip")
    parser.add_argument("--english-only", action="store_true",
                        help="also stream language=xx to a server without the multilingual model (the old engine)")
    args = parser.parse_args()
    wanted = [code for code in args.languages.split(",") if code]
    by_language: dict[str, list[Clip]] = {code: [] for code in wanted}
    for row in clips(args.audio):
        if not wanted or row.language in wanted:
            by_language.setdefault(row.language, []).append(row)
    print(f"cpus {sorted(os.sched_getaffinity(0))}, load average {os.getloadavg()} (shared machine)")
    timing = [0.0, 0.0]          # offline decode seconds, audio seconds
    results: dict[str, LanguageResult] = {}
    with tempfile.TemporaryDirectory() as data:
        base = Settings(data_dir=Path(data), port=0, log_level="warning", audio_realtime_factor=0,
                        idle_timeout=3600)     # the clips arrive faster than they are decoded
        server = GatewayServer(base).start()
        old = GatewayServer(base.replace(data_dir=Path(data) / "old", whisper_multilingual_model="")).start() \
            if args.english_only else None
        try:
            for language, rows in by_language.items():
                print(f"{language}: {len(rows)} clips", flush=True)
                results[language] = await bench_language(server, old, language, rows, args.audio, args.gap, timing)
                print_table({language: results[language]}, args.english_only)     # in case the run is cut short
                print(f"load average {os.getloadavg()}\n", flush=True)
        finally:
            server.stop()
            if old is not None:
                old.stop()
    print(f"\nload average after {os.getloadavg()}")
    print(f"offline decode (language given): {timing[0]:.1f} s for {timing[1]:.1f} s of audio "
          f"(RTF {timing[0] / max(timing[1], 1e-9):.2f}, on the shared machine)")
    print_table(results, args.english_only)


if __name__ == "__main__":
    asyncio.run(main())
