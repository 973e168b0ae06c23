"""Diarization error rate (DER), scored as pyannote.metrics' ``DiarizationErrorRate`` does.

DER = (missed speech + false alarm + speaker confusion) / reference speech, with

- a collar: ``collar`` seconds in all (half before, half after) around every reference turn's
  start and end are not scored (pyannote's ``collar=0.5`` is the "±0.25 s" of NIST's md-eval);
- overlap scored (``skip_overlap=False``, the default): a frame where two people speak counts
  twice in the reference and needs two hypothesis speakers to be right;
- hypothesis labels mapped one-to-one onto reference speakers to maximise the time they share
  (the Hungarian algorithm on the co-occurrence matrix), as pyannote does.

Times are scored on a 10 ms grid (pyannote works on exact segment boundaries; on the RTTM here
the two agree to within a frame per boundary). Pure logic: no audio, no I/O beyond ``read_rttm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Hashable, Iterable, Sequence

import numpy as np

STEP = 0.01
Turn = tuple[float, float, Hashable]          # (start, end, speaker)


@dataclass(frozen=True)
class DiarizationScore:
    reference: float          # seconds of reference speech (overlap counted per speaker)
    missed: float
    false_alarm: float
    confusion: float
    reference_speakers: int
    hypothesis_speakers: int

    @property
    def der(self) -> float:
        errors = self.missed + self.false_alarm + self.confusion
        if not self.reference:
            return 1.0 if errors else 0.0       # pyannote's convention with no reference speech
        return errors / self.reference


def read_rttm(path: str | Path) -> list[Turn]:
    """``(start, end, speaker)`` of every SPEAKER line of an RTTM file."""
    turns = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 8 and fields[0] == "SPEAKER":
            start, duration = float(fields[3]), float(fields[4])
            turns.append((start, start + duration, fields[7]))
    return turns


def read_uem(path: str | Path) -> list[tuple[float, float]]:
    """The scored regions of a UEM file (``<file> <channel> <start> <end>`` lines)."""
    regions = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4:
            regions.append((float(fields[2]), float(fields[3])))
    return regions


def _activity(turns: Sequence[Turn], frames: int) -> tuple[np.ndarray, list[Hashable]]:
    """(speakers, frames) boolean activity on the grid, and the speaker names in row order."""
    names = sorted({t[2] for t in turns}, key=str)
    rows = {name: i for i, name in enumerate(names)}
    active = np.zeros((len(names), frames), dtype=bool)
    for start, end, name in turns:
        a, b = round(start / STEP), round(end / STEP)
        active[rows[name], max(a, 0) : max(min(b, frames), 0)] = True
    return active, names


def _scored_frames(reference: Sequence[Turn], frames: int, collar: float,
                   uem: Iterable[tuple[float, float]] | None) -> np.ndarray:
    scored = np.zeros(frames, dtype=bool)
    if uem is None:
        scored[:] = True
    else:
        for start, end in uem:
            scored[round(start / STEP) : round(end / STEP)] = True
    half = collar / 2
    if half > 0:
        for start, end, _ in reference:
            for boundary in (start, end):
                a, b = round((boundary - half) / STEP), round((boundary + half) / STEP)
                scored[max(a, 0) : max(b, 0)] = False
    return scored


def best_mapping(cooccurrence: np.ndarray) -> list[tuple[int, int]]:
    """Row-column pairs maximising the summed ``cooccurrence`` (each row and column used at most
    once): the Hungarian algorithm on the negated matrix, padded square."""
    rows, cols = cooccurrence.shape
    n = max(rows, cols)
    if n == 0:
        return []
    cost = np.zeros((n, n))
    cost[:rows, :cols] = -cooccurrence
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=int)          # match[column] = row (1-based; 0 = free)
    for row in range(1, n + 1):
        match[0] = row
        column = 0
        slack = np.full(n + 1, np.inf)
        way = np.zeros(n + 1, dtype=int)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[column] = True
            r = match[column]
            delta, next_column = np.inf, 0
            for c in range(1, n + 1):
                if not used[c]:
                    current = cost[r - 1, c - 1] - u[r] - v[c]
                    if current < slack[c]:
                        slack[c], way[c] = current, column
                    if slack[c] < delta:
                        delta, next_column = slack[c], c
            for c in range(n + 1):
                if used[c]:
                    u[match[c]] += delta
                    v[c] -= delta
                else:
                    slack[c] -= delta
            column = next_column
            if match[column] == 0:
                break
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    return [(match[c] - 1, c - 1) for c in range(1, n + 1)
            if match[c] and match[c] - 1 < rows and c - 1 < cols]


def diarization_error(reference: Sequence[Turn], hypothesis: Sequence[Turn], *, collar: float = 0.5,
                      uem: Iterable[tuple[float, float]] | None = None,
                      skip_overlap: bool = False) -> DiarizationScore:
    """Score ``hypothesis`` turns against ``reference`` turns (see the module docstring).
    ``skip_overlap``: frames where the reference has two or more speakers are not scored
    (pyannote's ``skip_overlap=True``), which is what a hypothesis of one speaker at a time, as
    Omi's sequential segments are, can be judged on."""
    end = max([t[1] for t in reference] + [t[1] for t in hypothesis] + [0.0])
    frames = int(np.ceil(end / STEP)) + 1
    scored = _scored_frames(reference, frames, collar, uem)
    ref, ref_names = _activity(reference, frames)
    if skip_overlap:
        scored &= ref.sum(axis=0) < 2
    hyp, hyp_names = _activity(hypothesis, frames)
    ref, hyp = ref[:, scored], hyp[:, scored]
    n_ref, n_hyp = ref.sum(axis=0), hyp.sum(axis=0)
    cooccurrence = ref.astype(np.float64) @ hyp.T.astype(np.float64)
    correct = np.zeros(ref.shape[1])
    for r, h in best_mapping(cooccurrence):
        correct += ref[r] & hyp[h]
    return DiarizationScore(
        reference=float(n_ref.sum() * STEP),
        missed=float(np.maximum(n_ref - n_hyp, 0).sum() * STEP),
        false_alarm=float(np.maximum(n_hyp - n_ref, 0).sum() * STEP),
        confusion=float((np.minimum(n_ref, n_hyp) - correct).sum() * STEP),
        reference_speakers=len(ref_names),
        hypothesis_speakers=len(hyp_names),
    )
