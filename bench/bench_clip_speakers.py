"""How well ``ClipSpeakerLinker`` gives the clips of an upload one speaker numbering, by bar.

    .venv/bin/python bench/bench_clip_speakers.py                         # both models, default bars
    .venv/bin/python bench/bench_clip_speakers.py --model resemblyzer --bars 0.7,0.75,0.8

An upload sent to a cloud provider goes as one request per ``sync_cloud_clip_seconds`` of
recording, and the provider numbers each request's speakers afresh. Two measurements per bar
(``SpeakerModel.clip_link_similarity``):

1. **Conversations** (tests/data/conversations, their RTTM references): each recording cut into
   clips of 10-240 s; a clip speaker's voice is the mean of the model's windows over its turns in
   the clip, numbered in the order they speak (as a provider does). Printed: the speakers found
   (2 is right) and the share of speech under the right number (best one-to-one mapping).
2. **New voices** (tests/data/speakers, read speech of 8 people): 200 random recordings of 4
   people, 6 clips of 2 of them each (two utterances per person per clip). Printed: how often a
   clip speaker was joined to a number that is someone else's (``mislinked``), and how often
   someone with a number already got a new one (``split``).

On one telephone line two people's mean voices score up to 0.9 with each other, so a bar cannot
tell them apart there; the one-to-one pairing of a clip's speakers does, and the bar decides
only whether a voice is new. The bars in ``speaker_models`` come from this script.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.audio.clip_speakers import ClipSpeakerLinker  # noqa: E402
from harken.audio.diarization import labelling_accuracy  # noqa: E402
from harken.audio.speaker_models import MODELS, model_named  # noqa: E402
from harken.client import read_wav_16k  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
RATE = 16000


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / (np.linalg.norm(vector) + 1e-12)


def voice(embedder, pieces: list[np.ndarray]) -> np.ndarray | None:
    """As ``SpeakerIdentifier.clip_voices``: windows over each stretch, short ones joined."""
    short = [p for p in pieces if p.size < RATE // 2]
    pieces = [p for p in pieces if p.size >= RATE // 2] + ([np.concatenate(short)] if short else [])
    windows = [embedder.embed_windows(p) for p in pieces if p.size >= RATE // 4]
    return unit(np.concatenate(windows).mean(axis=0)) if windows else None


def conversation_clips(embedder, name: str, clip_seconds: float) -> list[tuple[dict, dict]]:
    """Per clip: ``{number: (voice, seconds)}`` and ``{number: reference speaker}``."""
    pcm = read_wav_16k(DATA / "conversations" / f"{name}.wav")
    turns = sorted((float(f[3]), float(f[3]) + float(f[4]), f[7])
                   for f in (line.split() for line in (DATA / "conversations" / f"{name}.rttm").open()))
    clips = []
    for k in range(int(np.ceil(pcm.size / RATE / clip_seconds))):
        lo, hi = k * clip_seconds, (k + 1) * clip_seconds
        pieces: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        seconds: collections.Counter = collections.Counter()
        order: list[str] = []
        for start, end, who in turns:
            start, end = max(start, lo), min(end, hi)
            if end - start <= 0.05:
                continue
            if who not in order:
                order.append(who)
            pieces[who].append(pcm[int(max(start - 0.1, 0) * RATE): int((end + 0.1) * RATE)])
            seconds[who] += end - start
        clips.append(({order.index(w): (voice(embedder, pieces[w]), seconds[w]) for w in order},
                      {order.index(w): w for w in order}))
    return clips


def conversations(model, embedder, bars: list[float]) -> None:
    for name in ("call_autorepair_b", "call_chromecast", "meeting_katie_steve"):
        for clip_seconds in (10, 20, 30, 60, 240):
            clips = conversation_clips(embedder, name, clip_seconds)
            row = []
            for bar in bars:
                linker = ClipSpeakerLinker(bar, model.min_speaker_seconds)
                labels, truth, weights = [], [], []
                for voices, who in clips:
                    for number, label in linker.link(voices).items():
                        labels.append(label)
                        truth.append(who[number])
                        weights.append(voices[number][1])
                # Speech-weighted accuracy: each clip speaker counted by its seconds (in 10 ms steps).
                steps = [max(1, int(w * 100)) for w in weights]
                accuracy = labelling_accuracy([l for l, n in zip(labels, steps) for _ in range(n)],
                                              [t for t, n in zip(truth, steps) for _ in range(n)])
                row.append(f"{bar:.2f}: {linker.speakers} speakers {accuracy:6.1%}")
            print(f"  {name:20s} clips of {clip_seconds:3d} s | " + " | ".join(row))


def new_voices(model, embedder, bars: list[float], trials: int = 200) -> None:
    windows = {person.name: [(embedder.embed_windows(pcm := read_wav_16k(f)), pcm.size / RATE)
                             for f in sorted(person.glob("*.wav"))]
               for person in sorted((DATA / "speakers").iterdir()) if person.is_dir()}
    for bar in bars:
        rng = random.Random(1)
        mislinked = split = total = 0
        for _ in range(trials):
            linker = ClipSpeakerLinker(bar, model.min_speaker_seconds)
            people = rng.sample(sorted(windows), 4)
            number_of: dict[str, int] = {}
            for _clip in range(6):
                present = rng.sample(people, 2)
                voices = {}
                for n, person in enumerate(present):
                    chosen = rng.sample(windows[person], 2)
                    voices[n] = (unit(np.concatenate([w for w, _ in chosen]).mean(axis=0)), sum(s for _, s in chosen))
                for n, number in linker.link(voices).items():
                    total += 1
                    person = present[n]
                    holders = [p for p, k in number_of.items() if k == number]
                    if holders and holders[0] != person:
                        mislinked += 1
                    elif not holders and person in number_of:
                        split += 1
                    number_of.setdefault(person, number)
        print(f"  bar {bar:.2f}: mislinked {mislinked / total:5.1%}, split {split / total:5.1%} of {total} clip speakers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), action="append")
    parser.add_argument("--bars", help="comma-separated bars (default: around the model's own)")
    args = parser.parse_args()
    for name in args.model or sorted(MODELS):
        model = model_named(name)
        if model.problem():
            print(f"{name}: not installed ({model.problem()})")
            continue
        embedder = model.load()
        own = model.clip_link_similarity
        bars = [float(b) for b in args.bars.split(",")] if args.bars else [own - 0.1, own - 0.05, own, own + 0.05]
        print(f"{name} (its bar: {own:.2f})\n conversations (two speakers each):")
        conversations(model, embedder, bars)
        print(" new voices (4 people, 6 clips of 2):")
        new_voices(model, embedder, bars)


if __name__ == "__main__":
    main()
