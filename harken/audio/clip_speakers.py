"""One speaker numbering for a recording transcribed in clips.

A cloud provider's pre-recorded API numbers the speakers of each request afresh, from 0 in the
order they first speak. An upload sent as several clips (``gateway.sync_worker``: one per few
minutes of recording) would then have speaker 0 of its second clip be whoever spoke first there,
not the first clip's speaker 0. ``ClipSpeakerLinker`` gives each clip's speakers the recording's
numbers by voice:

- each clip speaker's voice is the mean of the speaker model's window embeddings over its words'
  audio (``SpeakerIdentifier.clip_voices``), and each speaker of the recording keeps the mean of
  the voices it was given so far (weighted by seconds of speech);
- a clip's speakers are paired one-to-one with the recording's speakers (the provider told them
  apart, so two of one clip never become one), the pairing that maximises the summed similarity
  (the Hungarian algorithm), and a pair holds only at ``similarity`` or above: a clip speaker
  left without a pair is a new speaker of the recording;
- a voice heard for less than ``min_seconds`` is too noisy to found a speaker: it joins the most
  similar speaker of the recording that no other speaker of its clip took (a new one if none is
  left), and does not move that speaker's voice.

Sans-I/O: vectors in, numbers out. Within a clip the provider's diarization is kept as it is;
only its numbers change.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .der import best_mapping


class ClipSpeakerLinker:
    """The recording's speaker number of each clip speaker, clip after clip. Not thread-safe."""

    def __init__(self, similarity: float, min_seconds: float):
        self.similarity = similarity
        self.min_seconds = min_seconds
        # Per recording speaker: the seconds-weighted sum of its unit voices (None: never heard).
        self._sums: list[np.ndarray | None] = []

    @property
    def speakers(self) -> int:
        """How many speakers the recording has so far (numbers ``0 … speakers - 1``)."""
        return len(self._sums)

    def link(self, voices: Mapping[int, tuple[np.ndarray | None, float]]) -> dict[int, int]:
        """``{clip speaker: recording speaker}`` for one clip, from ``{clip speaker: (voice or
        None, seconds of speech)}``; a speaker with no voice (no audio to embed) becomes a new
        speaker of the recording."""
        numbers: dict[int, int] = {}
        heard = [k for k, total in enumerate(self._sums) if total is not None]
        clear = [s for s, (v, seconds) in voices.items() if v is not None and seconds >= self.min_seconds]
        faint = [s for s, (v, seconds) in voices.items() if v is not None and seconds < self.min_seconds]
        centroids = np.asarray([_unit(self._sums[k]) for k in heard]) if heard else np.zeros((0, 0))
        if clear and heard:
            similarities = np.asarray([centroids @ _unit(voices[s][0]) for s in clear])   # (clear, heard)
            for row, column in best_mapping(similarities):
                if row < len(clear) and column < len(heard) and similarities[row, column] >= self.similarity:
                    numbers[clear[row]] = heard[column]
        taken = set(numbers.values())
        for s in clear:                           # in clip order: a voice nobody has is a new speaker
            if s not in numbers:
                numbers[s] = self._new()
            taken.add(numbers[s])
        for s in faint:
            free = [n for n, k in enumerate(heard) if k not in taken]
            if free:
                similarities = centroids[free] @ _unit(voices[s][0])
                numbers[s] = heard[free[int(np.argmax(similarities))]]
            else:
                numbers[s] = self._new()
            taken.add(numbers[s])
        for s in voices:
            if s not in numbers:                  # nothing to compare it with
                numbers[s] = self._new()
        # The voices move only after the whole clip was placed, and a faint one only a speaker it founded.
        for s, (vector, seconds) in voices.items():
            if vector is not None and (s in clear or self._sums[numbers[s]] is None):
                weighted = max(seconds, 1e-3) * _unit(vector)
                total = self._sums[numbers[s]]
                self._sums[numbers[s]] = weighted if total is None else total + weighted
        return numbers

    def _new(self) -> int:
        self._sums.append(None)
        return len(self._sums) - 1


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float64).reshape(-1)
    return vector / (np.linalg.norm(vector) + 1e-12)
