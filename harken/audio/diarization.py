"""Who spoke each utterance of one conversation: online clustering of speaker embeddings.

Cloud engines diarize by themselves; the embedded engine does not, so its utterances are labelled
here. Each utterance's embedding goes to the closest speaker's running centroid if it is similar
enough, otherwise it starts a new speaker. Labels are handed out in order of first appearance
and never renumbered, so ``SPEAKER_01`` keeps meaning the same voice for the whole conversation
(a client may already have shown or assigned it).
"""

from __future__ import annotations

import collections
from typing import Hashable, Sequence

import numpy as np

from .embedding import EMBEDDING_DIM

# An utterance joins a known speaker if its cosine similarity to that speaker's centroid is at
# least this. Calibrated with bench/bench_speakers.py on tests/data/speakers: 200 shuffled
# conversations of 3 speakers × 6 utterances. Too low merges two voices under one label (0.55:
# worst conversation 67 % correct), which puts one person's words under another's name; too high
# splits a voice into extra labels (0.70 on 3 s clips: 4.0 labels for 3 voices), which costs
# only a second mapping of the same person. 0.65 labelled 99.7 % of utterances correctly on
# average (worst conversation 94 %) with ≤ 10 s clips and 98.8 % (p5 94 %) with 3 s clips.
NEW_SPEAKER_SIMILARITY = 0.65
# A conversation rarely has more voices than this; past it, utterances go to the nearest speaker
# instead of starting new labels without end (noise, music, a television).
MAX_SPEAKERS = 16
# Short clips embed noisily (2 s clips of one voice score 0.79 on average, of two voices 0.25):
# a clip this short, or a speaker heard for less than this in total, is compared with the lower
# similarity below, so that one noisy clip neither founds a spurious speaker nor leaves a
# provisional centroid that the same voice's next utterance fails to reach.
PROVISIONAL_SECONDS = 3.0
PROVISIONAL_SIMILARITY = 0.45
# A clip long enough to trust, compared with a speaker heard for less than PROVISIONAL_SECONDS:
# between the two thresholds. At 0.45 a 4 s clip of a second voice joined a speaker known from
# one 2.7 s clip (similarity 0.45), and the blended centroid then drew in both voices for the
# rest of the conversation (67 % correct); 0.60 keeps the worst of the 200 bench conversations
# at 94 % (≤ 10 s clips: 99.7 % mean) and still lets the same voice's next utterance join.
PROVISIONAL_SPEAKER_SIMILARITY = 0.60


class OnlineDiarizer:
    """Stable speaker labels for one conversation's utterance embeddings. Not thread-safe."""

    def __init__(self, threshold: float = NEW_SPEAKER_SIMILARITY, max_speakers: int = MAX_SPEAKERS,
                 provisional_threshold: float = PROVISIONAL_SIMILARITY,
                 provisional_seconds: float = PROVISIONAL_SECONDS,
                 provisional_speaker_threshold: float = PROVISIONAL_SPEAKER_SIMILARITY):
        self.threshold = threshold
        self.max_speakers = max_speakers
        self.provisional_threshold = min(provisional_threshold, threshold)
        self.provisional_speaker_threshold = min(max(provisional_speaker_threshold, self.provisional_threshold),
                                                 threshold)
        self.provisional_seconds = provisional_seconds
        self._heard = np.zeros(0, dtype=np.float64)          # seconds of speech per speaker
        # Duration-weighted sums of unit embeddings: a 10 s utterance says more about a voice
        # than a 1 s one, and a sum is updated in O(dim) without keeping the history.
        self._sums = np.zeros((0, EMBEDDING_DIM), dtype=np.float64)
        self._centroids = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)   # normalised sums

    @property
    def speakers(self) -> int:
        """How many speakers have been seen (labels are ``0 … speakers - 1``)."""
        return len(self._sums)

    @property
    def centroids(self) -> np.ndarray:
        """(speakers, 256) unit vectors, row ``k`` the voice of speaker ``k`` so far (a copy)."""
        return self._centroids.copy()

    def similarities(self, embedding: np.ndarray) -> np.ndarray:
        """Cosine similarity of ``embedding`` to each known speaker's centroid."""
        vector = _unit(embedding)
        return self._centroids @ vector if self.speakers else np.zeros(0, dtype=np.float32)

    def assign(self, embedding: np.ndarray, weight: float = 1.0) -> int:
        """The speaker label of an utterance with this embedding; updates that speaker's centroid.

        ``weight`` is how much the utterance counts: its duration in seconds. A clip shorter than
        ``provisional_seconds`` is judged with the lowest (provisional) similarity; a longer clip
        against a speaker heard for less than that, with the one between.
        """
        vector = _unit(embedding)
        similarities = self.similarities(vector)
        if similarities.size:
            if weight < self.provisional_seconds:
                needed = np.full(similarities.shape, self.provisional_threshold)
            else:
                needed = np.where(self._heard < self.provisional_seconds,
                                  self.provisional_speaker_threshold, self.threshold)
            eligible = np.where(similarities >= needed, similarities, -np.inf)
            best = int(np.argmax(eligible))
            if np.isfinite(eligible[best]) or self.speakers >= self.max_speakers:
                best = best if np.isfinite(eligible[best]) else int(np.argmax(similarities))
                self._add(best, vector, weight)
                return best
        self._sums = np.vstack((self._sums, np.zeros((1, EMBEDDING_DIM))))
        self._heard = np.append(self._heard, 0.0)
        self._centroids = np.vstack((self._centroids, np.zeros((1, EMBEDDING_DIM), dtype=np.float32)))
        self._add(self.speakers - 1, vector, weight)
        return self.speakers - 1

    def _add(self, speaker: int, vector: np.ndarray, weight: float) -> None:
        self._sums[speaker] += max(weight, 1e-3) * vector
        self._heard[speaker] += weight
        self._centroids[speaker] = _unit(self._sums[speaker])


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    return vector / (np.linalg.norm(vector) + 1e-12)


def labelling_accuracy(labels: Sequence[int], truth: Sequence[Hashable]) -> float:
    """Share of utterances whose label is their speaker's, under the best one-to-one mapping of
    labels to speakers (greedy on co-occurrence counts: exact for tables this small)."""
    counts = collections.Counter(zip(labels, truth))
    used_labels, used_speakers, correct = set(), set(), 0
    for (label, speaker), n in counts.most_common():
        if label not in used_labels and speaker not in used_speakers:
            used_labels.add(label)
            used_speakers.add(speaker)
            correct += n
    return correct / len(labels)
