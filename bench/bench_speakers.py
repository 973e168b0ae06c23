"""Who is speaking: owner-detection accuracy, diarization accuracy, embedding and enrolment cost.

    .venv/bin/python bench/bench_speakers.py            # whatever cores we may use
    .venv/bin/python bench/bench_speakers.py --pin 0    # pinned to core 0
    .venv/bin/python bench/bench_speakers.py --only cost enrol   # some sections only

Prints:
- owner detection on tests/data/speakers (8 speakers × 6 utterances): every speaker enrolled
  with each choice of 3 whole utterances, scored on every non-overlapping 2 s piece (and on the
  centred ≤ 10 s clip) of its other 3 utterances and of all other speakers' utterances: equal
  error rate, miss / false-accept rates around the threshold, the threshold this data suggests
  (the lowest with ≤ 0.5 % false accepts on both clip lengths), and the same at −20 dB;
- online diarization: share of correctly labelled utterances over 200 random 3-speaker
  conversations, for several new-speaker thresholds;
- embedding cost per segment (2 s and 10 s) in ms and as a share of the clip's duration,
  against the numpy log-mel front end alone measured in the same run;
- enrolment cost of a 30 s speech-profile upload (``PUT /v1/users/speech-profile``): WAV decode
  (16 kHz mono and 48 kHz stereo), Silero VAD trim and embedding, per stage and in all;

VAD cost and the VAD gate's savings are measured by ``bench_vad.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
import wave
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.audio import SAMPLE_RATE  # noqa: E402
from harken.audio.diarization import NEW_SPEAKER_SIMILARITY, OnlineDiarizer, labelling_accuracy  # noqa: E402
from harken.audio.embedding import (  # noqa: E402
    OWNER_SIMILARITY_THRESHOLD,
    SpeakerEmbedder,
    equal_error_rate,
    log_mel,
    mean_embedding,
)

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
FALSE_ACCEPT_BUDGET = 0.005


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)


def centred(pcm: np.ndarray, seconds: float) -> np.ndarray:
    n = int(seconds * SAMPLE_RATE)
    start = max(0, (pcm.size - n) // 2)
    return pcm[start : start + n]


def pieces(pcm: np.ndarray, seconds: float) -> list[np.ndarray]:
    n = int(seconds * SAMPLE_RATE)
    return [pcm[i : i + n] for i in range(0, pcm.size - n + 1, n)]


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    return f"median {statistics.median(ordered):7.2f}  p90 {p90:7.2f}"


# --- owner detection ----------------------------------------------------------------------
def owner_scores(enrolled_whole: dict, test_clips: dict) -> tuple[np.ndarray, np.ndarray]:
    genuine, impostor = [], []
    for speaker, whole in enrolled_whole.items():
        for chosen in itertools.combinations(range(len(whole)), 3):
            enrolled = mean_embedding([whole[k] for k in chosen])
            for k, clips in enumerate(test_clips[speaker]):
                if k not in chosen:
                    genuine += [float(enrolled @ c) for c in clips]
            impostor += [float(enrolled @ c) for other, utts in test_clips.items() if other != speaker
                         for clips in utts for c in clips]
    return np.asarray(genuine), np.asarray(impostor)


def owner_detection(embedder: SpeakerEmbedder, voices: dict[str, list[np.ndarray]]) -> None:
    section("owner detection (enrol: mean of 3 whole utterances, all 20 choices per speaker)")

    def embed_all(transform) -> tuple[dict, dict, dict]:
        whole = {s: [embedder.embed(transform(u)) for u in utts] for s, utts in voices.items()}
        two = {s: [[embedder.embed(transform(p)) for p in pieces(u, 2.0)] for u in utts] for s, utts in voices.items()}
        ten = {s: [[embedder.embed(transform(centred(u, 10.0)))] for u in utts] for s, utts in voices.items()}
        return whole, two, ten

    whole, two, ten = embed_all(lambda x: x)
    results = {}
    for name, clips in (("2 s pieces", two), ("≤10 s centred", ten)):
        genuine, impostor = owner_scores(whole, clips)
        results[name] = (genuine, impostor)
        eer, at = equal_error_rate(genuine, impostor)
        print(f"{name:14s}: {len(genuine)} genuine / {len(impostor)} impostor trials; EER {eer:6.2%} at "
              f"{at:.3f}; mean cosine same {genuine.mean():.3f} other {impostor.mean():.3f}")
    print("threshold  " + "  ".join(f"{n}: miss / false accept" for n in results))
    for threshold in np.arange(0.50, 0.705, 0.02):
        row = "  ".join(f"{(g < threshold).mean():8.2%} / {(i >= threshold).mean():6.2%}   "
                        for g, i in results.values())
        marker = "  <- OWNER_SIMILARITY_THRESHOLD" if abs(threshold - OWNER_SIMILARITY_THRESHOLD) < 0.01 else ""
        print(f"  {threshold:.2f}     {row}{marker}")
    grid = np.arange(0.40, 0.80, 0.005)
    ok = [t for t in grid if all((i >= t).mean() <= FALSE_ACCEPT_BUDGET for _, i in results.values())]
    print(f"lowest threshold with ≤ {FALSE_ACCEPT_BUDGET:.1%} false accepts on both: {ok[0]:.3f}"
          f" (configured {OWNER_SIMILARITY_THRESHOLD})")

    quiet = lambda x: (x.astype(np.float32) * 0.1).astype(np.int16)  # noqa: E731
    genuine, impostor = owner_scores(whole, {s: [[embedder.embed(quiet(p)) for p in pieces(u, 2.0)]
                                                 for u in utts] for s, utts in voices.items()})
    eer, at = equal_error_rate(genuine, impostor)
    print(f"2 s pieces at −20 dB, enrolled at full level: EER {eer:6.2%} at {at:.3f}; "
          f"false accepts at threshold {(impostor >= OWNER_SIMILARITY_THRESHOLD).mean():.2%}")


# --- diarization --------------------------------------------------------------------------
def diarization(embedder: SpeakerEmbedder, voices: dict[str, list[np.ndarray]]) -> None:
    section("online diarization (200 shuffled conversations of 3 speakers × 6 utterances)")
    names = list(voices)
    for clip in (10.0, 3.0):
        embedded = {s: [(embedder.embed(centred(u, clip)), min(u.size / SAMPLE_RATE, clip)) for u in utts]
                    for s, utts in voices.items()}
        for threshold in (0.55, 0.60, 0.65, 0.70):
            rng = np.random.default_rng(1)
            accuracies, labels_used = [], []
            for _ in range(200):
                group = [names[i] for i in rng.choice(len(names), 3, replace=False)]
                order = [(s, k) for s in group for k in range(6)]
                order = [order[i] for i in rng.permutation(len(order))]
                diarizer = OnlineDiarizer(threshold)
                labels = [diarizer.assign(*embedded[s][k]) for s, k in order]
                accuracies.append(labelling_accuracy(labels, [s for s, _ in order]))
                labels_used.append(diarizer.speakers)
            marker = "  <- NEW_SPEAKER_SIMILARITY" if threshold == NEW_SPEAKER_SIMILARITY else ""
            print(f"  clip ≤{clip:4.1f} s  threshold {threshold:.2f}: correct {np.mean(accuracies):6.1%} mean, "
                  f"{np.percentile(accuracies, 5):6.1%} p5, {min(accuracies):6.1%} worst; "
                  f"{np.mean(labels_used):.2f} labels for 3 voices{marker}")




# --- cost ---------------------------------------------------------------------------------
def embedding_cost(embedder: SpeakerEmbedder, voices: dict[str, list[np.ndarray]], repeats: int) -> None:
    section("embedding cost per segment (1 thread)")
    long_utts = [u for utts in voices.values() for u in utts if u.size >= 10 * SAMPLE_RATE]
    for seconds in (2.0, 10.0):
        clips = [centred(u, seconds) for u in long_utts]
        front, full = [], []
        for _ in range(repeats):
            for clip in clips:
                t0 = time.perf_counter()
                log_mel(clip)
                t1 = time.perf_counter()
                embedder.embed(clip)
                t2 = time.perf_counter()
                front.append((t1 - t0) * 1000)
                full.append((t2 - t1) * 1000)
        ratio = statistics.median(full) / statistics.median(front)
        print(f"  {seconds:4.1f} s: embed {percentiles(full)} ms; numpy log-mel alone {percentiles(front)} ms; "
              f"embed / front end = {ratio:.1f}×; {statistics.median(full) / seconds:.2f} ms per audio second "
              f"(RTF {statistics.median(full) / 1000 / seconds:.4f})")


def enrolment_cost(embedder: SpeakerEmbedder, voices: dict[str, list[np.ndarray]], repeats: int) -> None:
    """What one ``PUT /v1/users/speech-profile`` of 30 s costs, stage by stage (the same calls
    the route makes, minus HTTP and storage)."""
    import io

    import soxr

    from harken.gateway.profiles import decode_upload, speech_only

    def wav_bytes(pcm: np.ndarray, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
        pcm = soxr.resample(pcm, SAMPLE_RATE, rate).astype(np.int16) if rate != SAMPLE_RATE else pcm
        out = io.BytesIO()
        with wave.open(out, "wb") as wav:
            wav.setnchannels(channels)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            wav.writeframes(np.repeat(pcm, channels).astype("<i2").tobytes())
        return out.getvalue()

    section("enrolment cost: 30 s upload → decode → VAD trim → embed (1 thread)")
    speech = np.concatenate([np.concatenate((u, np.zeros(SAMPLE_RATE // 2, np.int16)))
                             for u in next(iter(voices.values()))])[: 30 * SAMPLE_RATE]
    seconds = speech.size / SAMPLE_RATE
    for label, body in (("16 kHz mono WAV", wav_bytes(speech)), ("48 kHz stereo WAV", wav_bytes(speech, 48000, 2))):
        stages: dict[str, list[float]] = {"decode": [], "VAD trim": [], "embed": []}
        kept = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            pcm = decode_upload(body, "audio/wav")
            t1 = time.perf_counter()
            trimmed = speech_only(pcm)
            t2 = time.perf_counter()
            embedder.embed(trimmed)
            t3 = time.perf_counter()
            for name, ms in zip(stages, ((t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000)):
                stages[name].append(ms)
            kept = trimmed.size / SAMPLE_RATE
        total = sum(statistics.median(v) for v in stages.values())
        parts = ", ".join(f"{name} {statistics.median(v):6.1f} ms" for name, v in stages.items())
        print(f"  {label:18s} ({len(body) / 1e6:4.1f} MB, {seconds:.0f} s audio, {kept:.1f} s speech kept): {parts}; "
              f"total {total:6.1f} ms = RTF {total / 1000 / seconds:.4f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pin", type=int, help="pin the process to this core first")
    parser.add_argument("--repeats", type=int, default=3, help="timing passes over the clips")
    sections = ["owner", "diarization", "cost", "enrol"]
    parser.add_argument("--only", nargs="+", choices=sections, default=sections, help="sections to run")
    args = parser.parse_args()
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    print(f"cpus {sorted(os.sched_getaffinity(0))}  load {os.getloadavg()[0]:.2f}")

    t0 = time.perf_counter()
    embedder = SpeakerEmbedder()
    print(f"embedder load {time.perf_counter() - t0:.2f} s")
    voices = {d.name: [read_wav(f) for f in sorted(d.glob("*.wav"))]
              for d in sorted((DATA / "speakers").iterdir()) if d.is_dir()}
    if "owner" in args.only:
        owner_detection(embedder, voices)
    if "diarization" in args.only:
        diarization(embedder, voices)
    if "cost" in args.only:
        embedding_cost(embedder, voices, args.repeats)
    if "enrol" in args.only:
        enrolment_cost(embedder, voices, args.repeats)


if __name__ == "__main__":
    asyncio.run(main())
