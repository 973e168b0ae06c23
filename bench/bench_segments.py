"""What a session's 600 ms segment step costs as its conversation grows.

A device can keep one conversation going for hours, so ``SegmentBuilder.flush`` must cost the
same at its 3,000th segment as at its 10th. For each length, a conversation of that many stored
segments (two speakers taking turns, so they do not merge) then takes ``--flushes`` batches of one
new word each; printed: µs per flush, and the ratio to the shortest conversation measured in the
same run (the baseline). Before the builder searched batches from the newest end, the 3,000-segment
case cost 171 µs per flush, 2.6x the 10-segment one; now ~40 µs at every length.

Run: .venv/bin/python bench/bench_segments.py [--lengths 10,300,3000] [--flushes 2000]. Prints figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.gateway.segments import SegmentBuilder  # noqa: E402
from harken.stt.base import Word  # noqa: E402


def conversation(segments: int) -> tuple[SegmentBuilder, float]:
    builder, at = SegmentBuilder(), 0.0
    for i in range(segments):
        builder.add_words([Word(f"turn{i}.", at, at + 0.3, speaker=i % 2)], provider="null")
        builder.flush()
        at += 0.4
    return builder, at


def flush_cost(segments: int, flushes: int) -> float:
    """Seconds per flush of one new word onto a conversation of ``segments`` stored segments."""
    builder, at = conversation(segments)
    speaker = segments % 2          # the next turn's speaker: each flush is a new segment
    started = time.perf_counter()
    for _ in range(flushes):
        builder.add_words([Word("more.", at, at + 0.3, speaker=speaker)], provider="null")
        builder.flush()
        at += 0.4
        speaker = 1 - speaker
    return (time.perf_counter() - started) / flushes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="10,300,3000", help="stored segments before measuring")
    parser.add_argument("--flushes", type=int, default=2000, help="flushes measured per length")
    args = parser.parse_args()
    lengths = sorted(int(n) for n in args.lengths.split(","))
    baseline = None
    for length in lengths:
        cost = flush_cost(length, args.flushes)
        baseline = baseline or cost
        print(f"  {length:6d} stored segments: {cost * 1e6:7.1f} us per flush  ({cost / baseline:4.2f}x the "
              f"{lengths[0]}-segment conversation)")


if __name__ == "__main__":
    main()
