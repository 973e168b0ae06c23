"""Embedded speech engine figures: Whisper speed and accuracy, VAD cost, load time and memory.

    .venv/bin/python bench/bench_engine.py            # 1 decode thread, whatever cores we may use
    .venv/bin/python bench/bench_engine.py --pin 0    # pinned to core 0, as the reference measured

Prints:
- the CPU set (os.sched_getaffinity) and load average, since the machine is shared;
- model load time (hash check and CTranslate2 load) and RSS;
- per file: audio seconds, decode seconds, WER; per set and overall: real-time factor (decode
  seconds ÷ audio seconds) and WER (errors summed over files), decoding each whole file once;
- the same files through ``WhisperStream`` (VAD endpointing, 100 ms chunks, 1 s gaps);
- Silero VAD µs per 32 ms window (in 100 ms chunks, and in one call) against a numpy RMS energy
  computation over the same windows, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import resource
import statistics
import sys
import time
import wave
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.audio import SAMPLE_RATE, WINDOW_SAMPLES, StreamingVAD  # noqa: E402
from harken.config import Settings  # noqa: E402
from harken.stt.base import StreamConfig  # noqa: E402
from harken.stt.models import EMBEDDED, embedded_model_sha256, resolve_model, verify_sha256  # noqa: E402
from harken.stt.whisper import WhisperProvider  # noqa: E402
from harken.wer import wer, word_errors  # noqa: E402

AUDIO = Path(__file__).resolve().parent.parent / "tests" / "data" / "audio"
CHUNK = SAMPLE_RATE // 10


def read_wav(name: str) -> np.ndarray:
    with wave.open(str(AUDIO / name)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def section(title: str) -> None:
    print(f"\n== {title}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pin", type=int, help="pin the process to this core first")
    parser.add_argument("--model", default=EMBEDDED, help="whisper_model setting (default: embedded)")
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--vad-repeats", type=int, default=5)
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})

    section("machine")
    print(f"sched_getaffinity: {sorted(os.sched_getaffinity(0))} of os.cpu_count()={os.cpu_count()}")
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    settings = Settings(whisper_model=args.model, whisper_threads=1, whisper_workers=1, whisper_beam_size=args.beam)
    print(f"whisper_model={settings.whisper_model} compute_type={settings.whisper_compute_type} "
          f"threads=1 beam={settings.whisper_beam_size}")

    with open(AUDIO / "transcripts.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clips = {row["file"]: read_wav(row["file"]) for row in rows}

    section("load")
    rss_before = rss_mb()
    if args.model == EMBEDDED:
        started = time.perf_counter()
        verify_sha256(Path(resolve_model(EMBEDDED).location) / "model.bin", embedded_model_sha256())
        print(f"model.bin sha256 check: {time.perf_counter() - started:.2f} s (once per process)")
    engine = WhisperProvider(settings)
    started = time.perf_counter()
    await engine.load()
    print(f"load + warm-up decode: {time.perf_counter() - started:.2f} s")
    print(f"RSS: {rss_before:.0f} MB before, {rss_mb():.0f} MB after load")

    section("decode each file once (whole file, word timestamps)")
    print(f"{'file':<16} {'set':<7} {'audio s':>8} {'decode s':>9} {'RTF':>6} {'errors':>7} {'WER':>6}  hypothesis")
    totals: dict[str, dict[str, float]] = {}
    pairs: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        pcm = clips[row["file"]]
        words, seconds = engine.transcribe_clip(pcm, "en")
        hypothesis = " ".join(w[0].strip() for w in words)
        errors, n = word_errors(row["reference"], hypothesis)
        audio_s = pcm.size / SAMPLE_RATE
        t = totals.setdefault(row["set"], {"audio": 0.0, "decode": 0.0})
        t["audio"] += audio_s
        t["decode"] += seconds
        pairs.setdefault(row["set"], []).append((row["reference"], hypothesis))
        print(f"{row['file']:<16} {row['set']:<7} {audio_s:8.2f} {seconds:9.3f} {seconds / audio_s:6.3f} "
              f"{errors:>3}/{n:<3} {errors / n:6.1%}  {hypothesis}")
    print()
    for set_name, t in totals.items():
        errors = sum(word_errors(r, h)[0] for r, h in pairs[set_name])
        words = sum(word_errors(r, h)[1] for r, h in pairs[set_name])
        print(f"set {set_name:<7} audio {t['audio']:6.1f} s  decode {t['decode']:6.2f} s  "
              f"RTF {t['decode'] / t['audio']:.3f}  "
              f"WER {wer(pairs[set_name]):.1%} ({errors}/{words})")
    audio_all = sum(t["audio"] for t in totals.values())
    decode_all = sum(t["decode"] for t in totals.values())
    all_pairs = [p for ps in pairs.values() for p in ps]
    print(f"all         audio {audio_all:6.1f} s  decode {decode_all:6.2f} s  RTF {decode_all / audio_all:.3f}  "
          f"WER {wer(all_pairs):.1%}")
    print(f"RSS after decodes: {rss_mb():.0f} MB")

    section("streamed: real + espeak files joined with 1 s silence, 100 ms chunks, VAD endpointing")
    gap = np.zeros(SAMPLE_RATE, dtype=np.int16)
    joined = np.concatenate([part for row in rows for part in (clips[row["file"]], gap)])
    stream = await engine.open(StreamConfig())
    collected = []

    async def collect():
        async for word in stream:
            collected.append(word)

    collector = asyncio.create_task(collect())
    started = time.perf_counter()
    for position in range(0, joined.size, CHUNK):
        await stream.send(joined[position : position + CHUNK])
    send_s = time.perf_counter() - started
    await stream.close()
    await collector
    wall = time.perf_counter() - started
    s = stream.stats
    hypothesis = " ".join(w.text for w in collected)
    reference = " ".join(row["reference"] for row in rows)
    print(f"audio {s.audio_seconds:.1f} s, speech {s.speech_seconds:.1f} s, {s.utterances} utterances "
          f"({s.skipped_utterances} skipped), {s.decodes} decodes, {s.words} words")
    print(f"decode {s.decode_seconds:.2f} s = {s.decode_seconds / s.audio_seconds:.3f} s per audio s "
          f"({s.decode_seconds / max(s.decodes, 1):.2f} s per utterance); wall {wall:.2f} s; "
          f"send() total {send_s * 1000:.0f} ms for {joined.size // CHUNK} chunks")
    print(f"WER of the stream: {wer([(reference, hypothesis)]):.1%}")

    section("VAD cost per 32 ms window vs numpy RMS energy over the same windows")
    windows = joined.size // WINDOW_SAMPLES
    chunks = [joined[p : p + CHUNK] for p in range(0, joined.size, CHUNK)]

    def silero_chunked() -> None:
        vad = StreamingVAD()
        for chunk in chunks:
            vad.process(chunk)

    def silero_one_call() -> None:
        StreamingVAD().process(joined)

    def rms_chunked() -> None:
        leftover = np.zeros(0, dtype=np.int16)
        for chunk in chunks:
            samples = np.concatenate((leftover, chunk))
            n = samples.size // WINDOW_SAMPLES
            frames = samples[: n * WINDOW_SAMPLES].astype(np.float32).reshape(n, WINDOW_SAMPLES) / 32768.0
            np.sqrt(np.mean(frames * frames, axis=1))
            leftover = samples[n * WINDOW_SAMPLES :]

    def best_us_per_window(fn) -> tuple[float, float]:
        times = []
        for _ in range(args.vad_repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times) / windows * 1e6, statistics.median(times) / windows * 1e6

    rss_vad = rss_mb()
    results = {name: best_us_per_window(fn) for name, fn in
               (("silero, 100 ms chunks", silero_chunked), ("silero, one call", silero_one_call),
                ("numpy RMS, 100 ms chunks", rms_chunked))}
    baseline = results["numpy RMS, 100 ms chunks"][0]
    print(f"{windows} windows ({windows * WINDOW_SAMPLES / SAMPLE_RATE:.1f} s of audio), "
          f"best / median of {args.vad_repeats} runs")
    for name, (best, median) in results.items():
        print(f"{name:<26} {best:7.1f} µs best  {median:7.1f} µs median  {best / baseline:6.1f}× RMS  "
              f"RTF {best / 32000:.4f}")

    section("memory")
    print(f"RSS now: {rss_mb():.0f} MB (VAD section started at {rss_vad:.0f} MB); "
          f"peak (ru_maxrss): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    await engine.aclose()


if __name__ == "__main__":
    asyncio.run(main())
