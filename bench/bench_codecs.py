"""Decode cost of every codec, against copying raw pcm16 measured in the same run.

    .venv/bin/python bench/bench_codecs.py [--seconds 10] [--repeats 5]

For each codec (as a device sends it, see harken/codecs/encode.py): CPU time to decode one
second of audio into 16 kHz mono int16 (decoding + mixing + resampling), the ratio to the
baseline (``np.frombuffer`` of the same audio as 10 ms pcm16 messages), per-message p50/p99
(what one message costs the event loop), decoder construction time and per-connection memory.
Goal: every codec under 2 ms of CPU per second of audio.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
import tracemalloc
import wave
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.codecs import HeldBack, decoder_for  # noqa: E402
from harken.codecs.encode import encode_for_device, message_duration  # noqa: E402

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "codec-vectors" / "speech16k.wav"

CASES = [  # (codec, sample rate, channels)
    ("pcm16", 16000, 1),
    ("pcm8", 8000, 1),
    ("pcm16", 44100, 1),
    ("opus", 16000, 1),
    ("opus_fs320", 16000, 1),
    ("opus", 48000, 1),
    ("opus", 8000, 1),
    ("opus", 16000, 2),
    ("aac", 16000, 1),
    ("aac", 48000, 2),
    ("lc3", 16000, 1),
    ("lc3_fs1030", 16000, 1),
    ("lc3", 48000, 1),
]


def speech(seconds: float) -> np.ndarray:
    with wave.open(str(REFERENCE), "rb") as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return np.resize(pcm, int(seconds * 16000)).astype(np.int16)


def cpu_per_audio_second(open_stream, messages, audio_seconds: float, repeats: int) -> float:
    """Median over ``repeats`` of the CPU time to decode ``messages``, in µs per audio second.

    ``open_stream()`` returns (decode one message, flush): called outside the clock, because
    construction is measured on its own.
    """
    times = []
    for _ in range(repeats):
        decode, flush = open_stream()
        gc.collect()
        start = time.process_time()
        for message in messages:
            decode(message)
        flush()
        times.append(time.process_time() - start)
    return statistics.median(times) / audio_seconds * 1e6


def raw_copy():
    """The baseline: what pcm16 costs at the very least, viewing each message as samples."""
    return (lambda message: np.frombuffer(message, dtype="<i2")), (lambda: None)


def _decode(decoder, message: bytes) -> None:
    try:
        decoder.decode(message)
    except HeldBack:
        pass           # an Opus TOC change, an LC3 onset: decoded with the next message


def harken_decoder(codec: str, rate: int, channels: int):
    def open_stream():
        decoder = decoder_for(codec, rate, channels)

        return (lambda message: _decode(decoder, message)), decoder.flush

    return open_stream


def library_wrappers(audio: np.ndarray, seconds: float, repeats: int) -> None:
    """The wrappers harken's decoders bypass, measured the same way (why they are bypassed)."""
    import lc3
    import opuslib

    opus_packets = encode_for_device(audio, "opus", 16000)

    def opuslib_stream():
        decoder = opuslib.Decoder(16000, 1)
        return (lambda packet: np.frombuffer(decoder.decode(packet, 1920), dtype="<i2")), (lambda: None)

    lc3_frames = encode_for_device(audio, "lc3", 16000)

    def lc3py_stream():
        decoder = lc3.Decoder(10000, 16000)
        return (lambda frame: np.frombuffer(decoder.decode(frame, bit_depth=16), dtype="<i2")), (lambda: None)

    start = time.perf_counter()
    for _ in range(20):
        lc3.Decoder(10000, 16000)
    lc3py_new = (time.perf_counter() - start) / 20 * 1e6
    print("\nliblc3 itself (lc3_decode through ctypes, no checks, no resampling) against harken's lc3 decoder,"
          " same audio, same measure:")
    for rate in (16000, 48000):
        frames = encode_for_device(audio, "lc3", rate)
        plain = cpu_per_audio_second(plain_liblc3(rate), frames, seconds, repeats)
        checked = cpu_per_audio_second(harken_decoder("lc3", rate, 1), frames, seconds, repeats)
        print(f"  lc3 {rate // 1000} kHz {len(frames[0])} B: liblc3 {plain:.0f} µs/audio s, harken {checked:.0f} "
              f"({checked / plain:.1f}×, {(checked - plain) / 1000:.2f} ms more per audio s)")
    print("\nlibrary wrappers bypassed by harken (same audio, same measure):")
    print(f"  opuslib Decoder.decode, opus 16 kHz 10 ms: "
          f"{cpu_per_audio_second(opuslib_stream, opus_packets, seconds, repeats):.0f} µs/audio s")
    print(f"  lc3py Decoder.decode, lc3 16 kHz 40 B:    "
          f"{cpu_per_audio_second(lc3py_stream, lc3_frames, seconds, repeats):.0f} µs/audio s;"
          f" lc3.Decoder() {lc3py_new:.0f} µs (forks ldconfig), never freed")


def plain_liblc3(rate: int):
    """liblc3's decode alone, into one reused buffer: the floor under harken's LC3 decoder, whose
    checks (codecs/lc3.py: the probe and the last-pair decode, the gain and LTPF rules) and
    resampling come on top."""
    import ctypes

    from harken.codecs.lc3 import FRAME_US, _liblc3

    lib = _liblc3()

    def open_stream():
        memory = ctypes.create_string_buffer(lib.lc3_decoder_size(FRAME_US, rate))
        handle = lib.lc3_setup_decoder(FRAME_US, rate, rate, memory)
        pcm = np.empty(rate // 100, dtype=np.int16)
        address = pcm.ctypes.data
        return (lambda frame: (memory, lib.lc3_decode(handle, frame, len(frame), 0, address, 1))), (lambda: None)

    return open_stream


def per_message_percentiles(codec: str, rate: int, channels: int, messages) -> tuple[float, float]:
    decoder = decoder_for(codec, rate, channels)
    costs = []
    for message in messages:
        start = time.perf_counter()
        _decode(decoder, message)
        costs.append(time.perf_counter() - start)
    costs.sort()
    return costs[len(costs) // 2] * 1e6, costs[int(len(costs) * 0.99)] * 1e6


def construction(codec: str, rate: int, channels: int, count: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(count):
        decoder_for(codec, rate, channels).close()
    return (time.perf_counter() - start) / count * 1e6


def connection_memory(codec: str, rate: int, channels: int, seconds: float = 1.0, count: int = 200):
    """(RSS KiB, Python-heap KiB) per live decoder that has decoded ``seconds`` of audio.

    Measured in a fresh interpreter: in this one, memory freed by earlier cases would be reused
    and hide the decoders' footprint.
    """
    probe = subprocess.run(
        [sys.executable, __file__, "--memory-probe", codec, str(rate), str(channels), str(seconds), str(count)],
        capture_output=True, text=True, check=True,
    )
    rss, heap = map(float, probe.stdout.split())
    return rss, heap


def memory_probe(codec: str, rate: int, channels: int, seconds: float, count: int) -> None:
    messages = encode_for_device(speech(seconds), codec, rate, channels)
    warm = decoder_for(codec, rate, channels)  # libraries loaded, caches and pools warmed
    for message in messages:
        _decode(warm, message)
    gc.collect()
    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    decoders = []
    for _ in range(count):
        decoder = decoder_for(codec, rate, channels)
        for message in messages:
            _decode(decoder, message)
        decoders.append(decoder)
    heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    rss = psutil.Process().memory_info().rss - rss_before
    print(rss / count / 1024, heap / count / 1024)


def main() -> None:
    if sys.argv[1:2] == ["--memory-probe"]:
        codec, rate, channels, seconds, count = sys.argv[2:]
        memory_probe(codec, int(rate), int(channels), float(seconds), int(count))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    audio = speech(args.seconds)
    raw = audio.tobytes()
    raw_messages = [raw[i:i + 320] for i in range(0, len(raw), 320)]
    base = cpu_per_audio_second(raw_copy, raw_messages, args.seconds, args.repeats)
    print(f"{args.seconds:g} s of speech, median of {args.repeats} runs, CPU time (process_time)")
    print(f"baseline: np.frombuffer of 10 ms pcm16 messages = {base:.1f} µs per audio second\n")
    header = (f"{'codec':<11}{'rate':>6}{'ch':>3}{'msg ms':>8}{'µs/audio s':>12}{'× base':>8}"
              f"{'msg p50 µs':>12}{'msg p99 µs':>12}{'new µs':>9}{'RSS KiB':>9}{'heap KiB':>10}")
    print(header)
    print("-" * len(header))
    worst = 0.0
    for codec, rate, channels in CASES:
        messages = encode_for_device(audio, codec, rate, channels)
        per_message = message_duration(codec, rate)

        cost = cpu_per_audio_second(harken_decoder(codec, rate, channels), messages, args.seconds, args.repeats)
        worst = max(worst, cost)
        p50, p99 = per_message_percentiles(codec, rate, channels, messages)
        rss, heap = connection_memory(codec, rate, channels)
        print(f"{codec:<11}{rate:>6}{channels:>3}{per_message * 1000:>8.1f}{cost:>12.0f}{cost / base:>8.1f}"
              f"{p50:>12.1f}{p99:>12.1f}{construction(codec, rate, channels):>9.0f}{rss:>9.0f}{heap:>10.1f}")
    print(f"\nworst codec: {worst / 1000:.2f} ms CPU per audio second (goal < 2 ms)")
    library_wrappers(audio, args.seconds, args.repeats)


if __name__ == "__main__":
    main()
