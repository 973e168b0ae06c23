"""Who spoke when in one conversation, from speaker embeddings.

``ConversationDiarizer`` is what the gateway uses for the embedded engine (cloud engines diarize
by themselves): each utterance's model windows are grouped into 1.6 s stretches, so a speaker
change inside an utterance is found; the conversation's stretches are re-clustered as it grows
(average linkage, the number of speakers found by a similarity threshold), the new clusters are
mapped onto the labels already handed out, and an earlier stretch changes label only when two
re-clusterings in a row agree, so labels do not flicker. Enrolled voices (the owner, known
people) anchor the clustering per stretch.

``OnlineDiarizer`` is the previous, utterance-level method (one embedding per utterance, each
placed once and never revisited). The gateway no longer uses it; ``bench/bench_diarization.py``
runs it beside the new one as the baseline of every measurement.
"""

from __future__ import annotations

import collections
from typing import Hashable, Sequence

import numpy as np

from .embedding import EMBEDDING_DIM, WINDOW_HOP_SECONDS, WINDOW_SECONDS

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


# --- conversation-level diarization: speaker turns inside utterances, re-clustering ----------

# A stretch of speech is placed by the mean of CHUNK_WINDOWS of the model's 0.8 s windows (1.6 s
# of audio), one every CHUNK_STRIDE windows (0.8 s): short enough to find a turn change inside a
# VAD utterance, long enough to carry a voice (a lone 0.8 s window is too noisy to cluster).
CHUNK_WINDOWS = 3
CHUNK_STRIDE = 2
# Average-linkage clustering stops merging when the clusters' mean cosine similarity falls
# below this. Tuned with bench/bench_speakers.py --only conversations on the development calls
# (see its docstring for which recordings; the tests use others).
CLUSTER_SIMILARITY = 0.55
# Clusters with less speech than this are folded into the nearest larger one: a cough, a laugh
# or a short noisy stretch should not become a speaker of its own.
MIN_SPEAKER_SECONDS = 1.5
# A stretch (consecutive chunks of one utterance with one label) is a known voice (the owner,
# an enrolled person) when its own mean embedding is at least this similar to the enrolment.
KNOWN_VOICE_SIMILARITY = 0.60
# The stretches taken for an enrolled voice must score at least this against the enrolment on
# average (the same speaker's mean is 0.73-0.85 on the development calls, another voice on the
# same telephone line 0.75 at most): else the voice is taken to be absent.
KNOWN_VOICE_MEAN_SIMILARITY = 0.65
# An enrolled voice's stretches are decided again against the conversation's own voices (see
# ``ConversationDiarizer._adapted``) this many times, once each side has this many stretches.
ADAPT_ROUNDS = 2
ADAPT_MIN_CHUNKS = 3
# An utterance shorter than this (a laugh, a breath, "mm-hmm": one partial shorter than a model
# window) carries too little of a voice to found a speaker: its chunks do not take part in the
# clustering and go to the cluster whose centroid they are closest to. On the two-party call
# with many backchannels (call_autorepair_b) such sounds made two extra speakers (4 of 2, DER
# 20.8 %); without them 2 of 2, 17.3 %, and no other development recording changed (Resemblyzer;
# the d-vector 14.0 -> 13.9 % mean). 1.0 s left one extra speaker there; 2.0 s cost the
# interview and the phone-in 4 points each (their short turns are real speakers).
MIN_CLUSTER_UTTERANCE_SECONDS = 1.2
# A cluster at least a third of whose speech comes from utterances shorter than this (at most one
# full 1.6 s window of Resemblyzer, often only a shorter one) is a voice heard much in short
# replies ("Sure.", "Okay.", "That's fine."). Such replies embed apart from the same person's
# longer speech: on the development call call_autorepair_a the caller's replies made a third
# cluster (48-81 % of its speech from utterances under 2 s, depending on where the engine cut)
# whose centroid scores 0.85-0.89 against the caller's own cluster, where the two voices score
# 0.74 against each other. So such a cluster joins its most similar cluster of longer speech when
# its centroid scores at least the model's ``short_cluster_similarity`` against it: a real speaker
# whose turns are all short keeps a voice of their own unless it is that close
# (meeting_katie_steve: Steve, every turn under 1.4 s, scores 0.73 against Katie). Clusters of
# mostly longer speech are never folded this way: two voices on one telephone line score up to
# 0.89 (call_autorepair_b, whose clusters have 6-19 % of their speech in short utterances), so
# closeness alone is no sign of one voice.
SHORT_UTTERANCE_SECONDS = 2.0
SHORT_CLUSTER_SHARE = 1 / 3
# Re-cluster with every utterance while the conversation has at most this many chunks (4 min of
# speech; clustering 300 chunks takes a few ms); past it, after every RECLUSTER_SECONDS of new
# speech, and in between new chunks go to the nearest speaker.
RECLUSTER_ALWAYS_CHUNKS = 300
RECLUSTER_SECONDS = 4.0
# Only the newest chunks are re-clustered (average linkage is quadratic in them); older ones keep
# their labels. 600 chunks are 8 minutes of speech.
MAX_RECLUSTER_CHUNKS = 600


class ConversationDiarizer:
    """Speaker labels for the speech of one conversation, refined as the conversation grows.

    Sans-I/O: ``add_utterance(start, window_embeddings)`` takes the model's window embeddings of
    one utterance (``SpeakerEmbedder.embed_windows``) and labels it; ``label_at``/``label_between``
    answer which label holds at a time or over a span. Every ``RECLUSTER_SECONDS`` of new speech
    the recent chunks are clustered again from scratch (average linkage, the number of speakers
    found by ``CLUSTER_SIMILARITY``), and the new clusters are mapped onto the old labels by the
    speech they share, so a label keeps meaning the same voice. An earlier chunk's label changes
    only when two re-clusterings in a row agree on it, so labels do not flicker.

    ``known`` is a (k, 256) matrix of enrolled voices (row 0 the owner, if any): a stretch whose
    own audio matches one of them gets that voice's label, whatever its cluster (the owner anchors
    clustering); ``known_label(label)`` says which row a label stands for.
    """

    def __init__(self, *, known: np.ndarray | None = None, threshold: float = CLUSTER_SIMILARITY,
                 known_threshold: float = KNOWN_VOICE_SIMILARITY, min_speaker_seconds: float = MIN_SPEAKER_SECONDS,
                 recluster_seconds: float = RECLUSTER_SECONDS, max_chunks: int = MAX_RECLUSTER_CHUNKS,
                 window_seconds: float = WINDOW_SECONDS, hop_seconds: float = WINDOW_HOP_SECONDS,
                 chunk_windows: int = CHUNK_WINDOWS, chunk_stride: int = CHUNK_STRIDE, adapt_known: bool = True,
                 known_mean_threshold: float = KNOWN_VOICE_MEAN_SIMILARITY,
                 min_cluster_utterance_seconds: float = MIN_CLUSTER_UTTERANCE_SECONDS,
                 short_cluster_similarity: float | None = None, min_cluster_margin: float | None = None):
        self.threshold = threshold
        # None: clusters are not dissolved for being indistinct (see ``_dissolve_indistinct``).
        self.min_cluster_margin = min_cluster_margin
        # None: clusters of short replies are not folded (see SHORT_UTTERANCE_SECONDS).
        self.short_cluster_similarity = short_cluster_similarity
        self.min_cluster_utterance_seconds = min_cluster_utterance_seconds
        self.adapt_known = adapt_known
        self.known_mean_threshold = known_mean_threshold
        self.known_threshold = known_threshold
        self.min_speaker_seconds = min_speaker_seconds
        self.recluster_seconds = recluster_seconds
        self.max_chunks = max_chunks
        # The embedding model's window grid, and how many windows make one chunk (another
        # model's windows may be long enough on their own).
        self.window_seconds, self.hop_seconds = window_seconds, hop_seconds
        self.chunk_windows, self.chunk_stride = chunk_windows, chunk_stride
        self.known = None if known is None or len(known) == 0 else _unit_matrix(known)
        self._vectors: np.ndarray | None = None          # (chunks, dim) once the first arrives
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._utterance: list[int] = []
        self._utterance_seconds: list[float] = []       # per utterance, by its index
        self._labels: list[int] = []
        self._pending: dict[int, int] = {}        # chunk → label a re-clustering proposed once
        self._known_of_label: dict[int, int] = {}  # label → row of ``known``
        self._next_label = 0
        self._utterances = 0
        self._new_speech = 0.0
        self._cached_times: tuple[np.ndarray, np.ndarray] | None = None
        self.reclusters = 0

    @classmethod
    def for_model(cls, model, *, known: np.ndarray | None = None, **overrides) -> "ConversationDiarizer":
        """A diarizer with the window grid and similarity bars of ``model``
        (``speaker_models.SpeakerModel``)."""
        settings = dict(threshold=model.cluster_similarity, known_threshold=model.known_similarity,
                        known_mean_threshold=model.known_mean_similarity,
                        min_speaker_seconds=model.min_speaker_seconds,
                        short_cluster_similarity=model.short_cluster_similarity,
                        min_cluster_margin=model.min_cluster_margin,
                        window_seconds=model.window_seconds, hop_seconds=model.hop_seconds,
                        chunk_windows=model.chunk_windows, chunk_stride=model.chunk_stride)
        settings.update(overrides)
        return cls(known=known, **settings)

    # -- what is known -------------------------------------------------------------------
    @property
    def labels(self) -> list[int]:
        return list(self._labels)

    @property
    def speakers(self) -> int:
        """How many labels are in use now."""
        return len(set(self._labels))

    @property
    def next_label(self) -> int:
        """The label a voice heard for the first time gets next (labels are never reused)."""
        return self._next_label

    def known_label(self, label: int) -> int | None:
        """The row of ``known`` that ``label`` stands for, if any."""
        return self._known_of_label.get(label)

    def voice(self, label: int) -> tuple[np.ndarray, float] | None:
        """``(unit mean embedding, seconds of speech)`` of ``label``'s stretches, or None if it
        has none: that speaker's voice as this conversation heard it."""
        rows = [i for i, l in enumerate(self._labels) if l == label]
        if not rows:
            return None
        seconds = sum(b - a for a, b, l in self.turns() if l == label)
        return _unit_matrix(self._vectors[rows].mean(axis=0, keepdims=True))[0], seconds

    def label_at(self, t: float) -> int | None:
        """The label of the chunk whose centre is nearest ``t`` (None before any speech)."""
        if not self._starts:
            return None
        starts, ends = self._times()
        centres = (starts + ends) / 2
        i = int(np.searchsorted(centres, t))
        nearest = [k for k in (i - 1, i) if 0 <= k < len(centres)]
        return self._labels[min(nearest, key=lambda k: abs(centres[k] - t))]

    def label_between(self, start: float, end: float) -> int | None:
        """The label with the most chunk time inside ``[start, end]`` (else ``label_at`` the middle)."""
        starts, ends = self._times()
        # Chunks are at most CHUNK_WINDOWS windows long: look back that far from ``start``.
        lo = int(np.searchsorted(starts, start - self.chunk_windows * self.window_seconds))
        hi = int(np.searchsorted(starts, end))
        votes: dict[int, float] = {}
        for i in range(lo, hi):
            overlap = min(ends[i], end) - max(starts[i], start)
            if overlap > 0:
                votes[self._labels[i]] = votes.get(self._labels[i], 0.0) + overlap
        return max(votes, key=votes.get) if votes else self.label_at((start + end) / 2)

    @property
    def recluster_start(self) -> float:
        """Audio-clock time from which the last re-clustering could change labels."""
        lo = max(0, len(self._starts) - self.max_chunks)
        return self._starts[lo] if self._starts else 0.0

    def _times(self) -> tuple[np.ndarray, np.ndarray]:
        if self._cached_times is None or len(self._cached_times[0]) != len(self._starts):
            self._cached_times = (np.asarray(self._starts), np.asarray(self._ends))
        return self._cached_times

    def turns(self) -> list[tuple[float, float, int]]:
        """``(start, end, label)`` for every chunk's own share of time (its centre ± half the
        distance to its neighbours in the same utterance): a diarization hypothesis."""
        out = []
        for i, (a, b, label) in enumerate(zip(self._starts, self._ends, self._labels)):
            lo, hi = a, b
            if i > 0 and self._utterance[i - 1] == self._utterance[i]:
                lo = max(a, (self._starts[i - 1] + self._ends[i - 1] + a + b) / 4)
            if i + 1 < len(self._starts) and self._utterance[i + 1] == self._utterance[i]:
                hi = min(b, (self._starts[i + 1] + self._ends[i + 1] + a + b) / 4)
            out.append((lo, hi, label))
        return out

    # -- input ---------------------------------------------------------------------------
    def add_utterance(self, start: float, end: float, windows: np.ndarray) -> bool:
        """Label an utterance spanning ``[start, end]`` s from its model windows (n, 256).

        Returns True if earlier chunks' labels may have changed (a re-clustering ran)."""
        windows = _unit_matrix(windows)
        n = len(windows)
        if n == 0:
            return False
        first_new = len(self._starts)
        size = self.chunk_windows
        firsts = list(range(0, max(n - size, 0) + 1, self.chunk_stride))
        if firsts[-1] + size < n:
            firsts.append(n - size)
        for k in firsts:
            group = windows[k : k + size]
            a = start + k * self.hop_seconds
            b = min(end, a + (len(group) - 1) * self.hop_seconds + self.window_seconds)
            self._starts.append(a)
            self._ends.append(max(b, a + 0.01))
            self._utterance.append(self._utterances)
            vector = _unit_matrix(group.mean(axis=0, keepdims=True))
            self._vectors = vector if self._vectors is None else np.vstack((self._vectors, vector))
            self._labels.append(-1)
        self._utterances += 1
        self._utterance_seconds.append(end - start)
        self._new_speech += end - start
        if (self._new_speech >= self.recluster_seconds or len(self._starts) <= RECLUSTER_ALWAYS_CHUNKS
                or first_new == 0):
            self._recluster(first_new)
            self._new_speech = 0.0
            return True
        self._assign_online(first_new)
        return False

    def finish(self) -> bool:
        """The conversation ended: re-cluster once more and apply every change it proposes
        (no second run will come to confirm them). Returns True if it ran."""
        if not self._starts:
            return False
        self._recluster(len(self._starts), confirm=False)
        return True

    # -- labelling -----------------------------------------------------------------------
    def _assign_online(self, first_new: int) -> None:
        """New chunks to the nearest label's centroid, or a new label if none is close enough."""
        labels = sorted(set(self._labels[:first_new]) - {-1})
        centroids = np.asarray([self._centroid(label) for label in labels]) if labels else None
        for i in range(first_new, len(self._labels)):
            known = self._known_match(self._vectors[i : i + 1])
            if known is not None and known in self._known_of_label.values():
                self._labels[i] = next(l for l, k in self._known_of_label.items() if k == known)
                continue
            if centroids is not None:
                similarities = centroids @ self._vectors[i]
                best = int(np.argmax(similarities))
                if similarities[best] >= self.threshold:
                    self._labels[i] = labels[best]
                    continue
            self._labels[i] = self._new_label()
        self._smooth(range(first_new, len(self._labels)))

    def _centroid(self, label: int) -> np.ndarray:
        rows = [i for i, l in enumerate(self._labels) if l == label]
        return _unit_matrix(self._vectors[rows].mean(axis=0, keepdims=True))[0]

    def _known_match(self, vectors: np.ndarray) -> int | None:
        if self.known is None:
            return None
        similarities = self.known @ _unit_matrix(vectors.mean(axis=0, keepdims=True))[0]
        best = int(np.argmax(similarities))
        return best if similarities[best] >= self.known_threshold else None

    def _new_label(self) -> int:
        self._next_label += 1
        return self._next_label - 1

    def _recluster(self, first_new: int, confirm: bool = True) -> None:
        self.reclusters += 1
        lo = max(0, len(self._labels) - self.max_chunks)
        vectors = self._vectors[lo:]
        weights = np.asarray(self._ends[lo:]) - np.asarray(self._starts[lo:])
        clusters = self._clusters(vectors, lo)
        # A voice that has only just started (its cluster holds the newest utterance) is not
        # folded away: its words are labelled now, and once merged into another speaker's
        # segment they cannot be split out again. The last re-clustering (``finish``) folds it.
        newest = {c for c, u in zip(clusters, self._utterance[lo:]) if u == self._utterances - 1} if confirm else set()
        clusters = _fold_small(clusters, vectors, weights, self.min_speaker_seconds, keep=newest)
        if self.short_cluster_similarity is not None:
            seconds = np.asarray(self._utterance_seconds)[self._utterance[lo:]]
            clusters = _fold_short_replies(clusters, vectors, weights, seconds < SHORT_UTTERANCE_SECONDS,
                                           self.short_cluster_similarity, keep=newest)
        if self.min_cluster_margin is not None:
            clusters = _dissolve_indistinct(clusters, vectors, self.min_cluster_margin, keep=newest)
        clusters = _nearest_centroid(clusters, vectors)
        clusters = self._smoothed(clusters, lo)
        clusters, known_of_cluster = self._anchor_known(clusters, lo)
        label_of = self._stable_labels(clusters, known_of_cluster, lo, weights)
        for offset, cluster in enumerate(clusters):
            i = lo + offset
            proposed = label_of[cluster]
            if self._labels[i] == -1 or i >= first_new or self._labels[i] == proposed or not confirm:
                self._labels[i] = proposed
                self._pending.pop(i, None)
            elif self._pending.get(i) == proposed:       # the second re-clustering in a row
                self._labels[i] = proposed
                del self._pending[i]
            else:
                self._pending[i] = proposed
        for cluster, known in known_of_cluster.items():
            for label in [l for l, k in self._known_of_label.items() if k == known]:
                del self._known_of_label[label]
            self._known_of_label[label_of[cluster]] = known

    def _clusters(self, vectors: np.ndarray, lo: int) -> list[int]:
        """Average linkage over the chunks (from ``lo``) of utterances at least
        ``min_cluster_utterance_seconds`` long; each chunk of a shorter utterance joins the cluster
        whose centroid is closest to it. All chunks take part while fewer than two are long."""
        seconds = np.asarray(self._utterance_seconds)[self._utterance[lo : lo + len(vectors)]]
        long_enough = seconds >= self.min_cluster_utterance_seconds
        if long_enough.all() or long_enough.sum() < 2:
            return _average_linkage(vectors, self.threshold)
        found = np.asarray(_average_linkage(vectors[long_enough], self.threshold))
        out = np.empty(len(vectors), dtype=int)
        out[long_enough] = found
        out[~long_enough] = _nearest(vectors[~long_enough], vectors[long_enough], found, np.unique(found))
        order: dict[int, int] = {}
        return [order.setdefault(int(c), len(order)) for c in out]

    def _stable_labels(self, clusters: list[int], known_of_cluster: dict[int, int], lo: int,
                       weights: np.ndarray) -> dict[int, int]:
        """Cluster → label: a known voice's cluster keeps that voice's label; the others are
        mapped one-to-one onto the labels their chunks carry now, by the speech they share (the
        Hungarian algorithm); a cluster left over gets a new label."""
        from .der import best_mapping

        label_of: dict[int, int] = {}
        for cluster, known in known_of_cluster.items():
            have = [label for label, k in self._known_of_label.items() if k == known]
            if have:
                label_of[cluster] = have[0]
        taken = set(label_of.values())
        old = self._labels[lo:]
        old_labels = sorted(set(old) - {-1} - taken)
        ids = sorted(set(clusters) - set(label_of))
        shared = np.zeros((len(old_labels), len(ids)))
        for label, cluster, w in zip(old, clusters, weights):
            if label in old_labels and cluster in ids:
                shared[old_labels.index(label), ids.index(cluster)] += w
        for r, c in best_mapping(shared):
            if shared[r, c] > 0:
                label_of[ids[c]] = old_labels[r]
        for cluster in ids:
            if cluster not in label_of:
                # A cluster split off earlier speech: the label the last re-clustering proposed
                # for most of its chunks, so that the next one can confirm it.
                proposed = [self._pending[lo + k] for k, c in enumerate(clusters) if c == cluster
                            and lo + k in self._pending]
                reuse = max(set(proposed), key=proposed.count) if proposed else None
                if reuse is not None and reuse not in label_of.values():
                    label_of[cluster] = reuse
                else:
                    label_of[cluster] = self._new_label()
        return label_of

    def _smoothed(self, clusters: list[int], lo: int) -> list[int]:
        """A speaker change inside an utterance needs two chunks (1.6 s) of evidence: a run of
        one chunk inside a longer utterance joins the neighbouring run it resembles most."""
        out = list(clusters)
        utterance = self._utterance[lo : lo + len(out)]
        k = 0
        while k < len(out):
            j = k
            while j + 1 < len(out) and utterance[j + 1] == utterance[k]:
                j += 1
            self._smooth_utterance(out, k, j, lo)
            k = j + 1
        return out

    def _smooth_utterance(self, out: list[int], first: int, last: int, lo: int) -> None:
        if last == first:
            return
        runs: list[list[int]] = []                      # [start, end] of equal labels
        for k in range(first, last + 1):
            if runs and out[runs[-1][1]] == out[k]:
                runs[-1][1] = k
            else:
                runs.append([k, k])
        for r, (a, b) in enumerate(runs):
            if b > a or len(runs) == 1:
                continue
            neighbours = [out[runs[n][0]] for n in (r - 1, r + 1) if 0 <= n < len(runs)]
            vector = self._vectors[lo + a]
            out[a] = max(neighbours, key=lambda label: float(
                vector @ self._vectors[[lo + k for k in range(first, last + 1) if out[k] == label]].mean(axis=0)))

    def _smooth(self, indices) -> None:
        indices = list(indices)
        if len(indices) < 3:
            return
        lo = indices[0]
        self._labels[lo : indices[-1] + 1] = self._smoothed(self._labels[lo : indices[-1] + 1], lo)

    def _anchor_known(self, clusters: list[int], lo: int) -> tuple[list[int], dict[int, int]]:
        """Stretches whose own audio matches an enrolled voice form that voice's cluster.

        "Matches" is relative to the conversation as well as absolute: on one telephone line two
        voices can both score above ``known_threshold`` against an enrolment (0.84 and 0.74 on
        average in a held-out call), so the bar is raised to halfway between the mean score of
        the cluster most like the enrolled voice and that of the next cluster."""
        if self.known is None:
            return clusters, {}
        out = list(clusters)
        vectors = self._vectors[lo : lo + len(out)]
        scores = vectors @ self.known.T                                  # (chunks, known)
        bars = self._known_bars(scores, np.asarray(out))
        base = max(out) + 1
        best = np.argmax(scores, axis=1)
        matched = scores[np.arange(len(out)), best] >= bars[best]
        known_of_cluster: dict[int, int] = {}
        taken = np.zeros(len(out), dtype=bool)          # the owner (row 0) first, then people
        for row in range(scores.shape[1]):
            mine = matched & (best == row)
            if self.adapt_known:
                mine = self._adapted(vectors, scores[:, row], mine, np.asarray(clusters))
            if mine.any() and scores[mine, row].mean() < self.known_mean_threshold:
                # Stretches that pass one by one but together do not sound like the enrolment:
                # the voice is not here (the wearer silent) and the closest other voice came
                # through. Nobody is taken for it.
                mine[:] = False
            mine &= ~taken
            taken |= mine
            for m in np.flatnonzero(mine):
                out[m] = base + row
            if mine.any():
                known_of_cluster[base + row] = row
        # Decided per 1.6 s stretch; a lone stretch inside an utterance follows its neighbours
        # (which may leave a voice with no stretch at all).
        out = self._smoothed(out, lo)
        present = set(out)
        return out, {c: row for c, row in known_of_cluster.items() if c in present}

    def _adapted(self, vectors: np.ndarray, scores: np.ndarray, mine: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """The stretches of one enrolled voice, decided again against this conversation's own
        voices: the enrolment was recorded elsewhere (another microphone, another day), while the
        stretches found to match it carry this conversation's channel. So each stretch is the
        voice's when it is closer to those stretches' mean than to every other voice heard here
        (each cluster less the voice's stretches), and still clears ``known_threshold`` against
        the enrolment itself: its own audio decides, the conversation only sharpens the bar.
        Two rounds (the second from the first's answer)."""
        for _ in range(ADAPT_ROUNDS):
            if mine.sum() < ADAPT_MIN_CHUNKS or (~mine).sum() < ADAPT_MIN_CHUNKS:
                return mine
            voice = _unit_matrix(vectors[mine].mean(axis=0, keepdims=True))[0]
            others = [vectors[(clusters == c) & ~mine] for c in np.unique(clusters[~mine])]
            others = _unit_matrix(np.asarray([v.mean(axis=0) for v in others if len(v) >= ADAPT_MIN_CHUNKS]
                                             or [vectors[~mine].mean(axis=0)]))
            closest_other = (vectors @ others.T).max(axis=1)
            mine = (vectors @ voice > closest_other) & (scores >= self.known_threshold)
        return mine

    def _known_bars(self, scores: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """Per enrolled voice: the similarity a stretch needs (see ``_anchor_known``)."""
        bars = np.full(scores.shape[1], self.known_threshold)
        ids = np.unique(clusters)
        means = np.asarray([scores[clusters == c].mean(axis=0) for c in ids])   # (clusters, known)
        for row in range(scores.shape[1]):
            top = np.sort(means[:, row])[::-1]
            if len(top) >= 2:
                bars[row] = max(bars[row], (top[0] + top[1]) / 2)
            # Voices the clustering could not tell apart: split the scores themselves where
            # they fall into two groups (Otsu's threshold), if both groups are substantial. Not
            # when the stretches are decided again against the conversation's voices
            # (``_adapted``), which tells such voices apart better; and the split cut a
            # conversation of the owner alone in two, half of it "someone else".
            split = None if self.adapt_known else _two_groups(scores[:, row])
            if split is not None:
                bars[row] = max(bars[row], split)
        return bars


def _two_groups(values: np.ndarray, min_share: float = 0.2, min_gap: float = 0.05) -> float | None:
    """Otsu's threshold of ``values`` (the cut maximising the between-group variance), if each
    side holds at least ``min_share`` of them and their means are ``min_gap`` apart; else None."""
    ordered = np.sort(values)
    n = len(ordered)
    if n < 10:
        return None
    cumulative = np.cumsum(ordered)
    k = np.arange(1, n)
    low_mean = cumulative[:-1] / k
    high_mean = (cumulative[-1] - cumulative[:-1]) / (n - k)
    between = k * (n - k) * (high_mean - low_mean) ** 2
    allowed = (k >= min_share * n) & (n - k >= min_share * n) & (high_mean - low_mean >= min_gap)
    if not allowed.any():
        return None
    best = int(np.argmax(np.where(allowed, between, -1.0)))
    return float((ordered[best] + ordered[best + 1]) / 2)


def _unit_matrix(vectors: np.ndarray) -> np.ndarray:
    matrix = np.asarray(vectors, dtype=np.float32)
    matrix = matrix.reshape(-1, matrix.shape[-1] if matrix.ndim else EMBEDDING_DIM)
    return matrix / (np.linalg.norm(matrix, axis=1, keepdims=True) + 1e-12)


def _centroids(vectors: np.ndarray, labels: np.ndarray, ids) -> np.ndarray:
    """The unit mean of the rows of ``vectors`` labelled each of ``ids``, one row per id."""
    return _unit_matrix(np.asarray([vectors[labels == c].mean(axis=0) for c in ids]))


def _nearest(rows: np.ndarray, vectors: np.ndarray, labels: np.ndarray, ids) -> np.ndarray:
    """For each of ``rows``, the one of ``ids`` whose cluster's centroid (over ``vectors`` by
    ``labels``) it is most similar to."""
    return np.asarray(ids)[np.argmax(rows @ _centroids(vectors, labels, ids).T, axis=1)]


def _average_linkage(vectors: np.ndarray, threshold: float) -> list[int]:
    """Cluster ids (0 … k-1, in order of first appearance) from agglomerative clustering with
    average linkage on cosine similarity, merging while the best pair is ≥ ``threshold``."""
    n = len(vectors)
    if n <= 1:
        return [0] * n
    similarity = (vectors @ vectors.T).astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    sizes = np.ones(n)
    parent = np.arange(n)
    while True:
        flat = int(np.argmax(similarity))
        i, j = divmod(flat, n)
        if similarity[i, j] < threshold:
            break
        merged = (sizes[i] * similarity[i] + sizes[j] * similarity[j]) / (sizes[i] + sizes[j])
        similarity[i], similarity[:, i] = merged, merged
        similarity[i, i] = -np.inf
        similarity[j, :], similarity[:, j] = -np.inf, -np.inf
        sizes[i] += sizes[j]
        parent[parent == j] = i
    order: dict[int, int] = {}
    return [order.setdefault(int(p), len(order)) for p in parent]


def _nearest_centroid(clusters: list[int], vectors: np.ndarray) -> list[int]:
    """Each chunk to the cluster whose centroid it is most similar to (one pass).

    Average linkage decides a chunk once, when its group merges, by the mean similarity to the
    group at that point; early in a call, where the two voices on one line are close, a chunk
    lands with the wrong voice and stays there (call_autorepair_b: the agent's opening and the
    caller's first words swapped). Against the finished clusters' centroids most such chunks
    go home: the replica of the gateway's path at 0.2-1.0 s decodes, that call 13.5-20.4 ->
    12.1-15.6 % DER, call_autorepair_a 8.4-10.0 -> 8.0-8.7 %, the other recordings unchanged
    (more passes: no better)."""
    labels = np.asarray(clusters)
    ids = np.unique(labels)
    if len(ids) < 2:
        return list(clusters)
    return [int(x) for x in _nearest(vectors, vectors, labels, ids)]


def _margins(vectors: np.ndarray, labels: np.ndarray, ids: list[int]) -> dict[int, float]:
    """Per cluster, how much closer its chunks are to their own voice than to the nearest other:
    the mean over its chunks of (similarity to the cluster's centroid without that chunk) minus
    (the highest similarity to another cluster's centroid). A silhouette on cosine similarity."""
    centroids = _centroids(vectors, labels, ids)
    out = {}
    for k, c in enumerate(ids):
        rows = vectors[labels == c]
        others = np.delete(centroids, k, axis=0)
        if len(rows) < 2 or not len(others):
            # One chunk has no centroid without itself: as indistinct as can be, unless it is alone.
            out[c] = -1.0 if len(others) else 1.0
            continue
        rest = _unit_matrix(rows.sum(axis=0, keepdims=True) - rows)     # the centroid without each chunk
        own = np.einsum("ij,ij->i", rest, rows)
        out[c] = float(np.mean(own - (rows @ others.T).max(axis=1)))
    return out


def _dissolve_indistinct(clusters: list[int], vectors: np.ndarray, min_margin: float,
                         keep: set[int] = frozenset()) -> list[int]:
    """While there are more than two clusters, the one (not in ``keep``) whose chunks are least
    closer to it than to another voice (``_margins``) is dissolved if that margin is under
    ``min_margin``: each of its chunks goes to the nearest remaining centroid.

    A cluster that is a voice of its own has chunks clearly closer to it than to anyone else; a
    piece of one voice's speech, or a mix of two voices' chunks, does not. The third cluster that
    call_autorepair_b got through the gateway's path (the caller's "Oh," and "Okay." and a few of
    the agent's words, mostly longer speech, so no reply rule folds it) scores 0.039-0.056, where
    every real speaker of the development recordings scores 0.082 or more (see the model's
    ``min_cluster_margin``). Two clusters are never dissolved into one: two similar voices on
    one line still score low, and one label for both is the worst answer.
    """
    labels = np.asarray(clusters).copy()
    while True:
        ids = sorted(set(labels.tolist()))
        if len(ids) <= 2:
            break
        margins = _margins(vectors, labels, ids)
        candidates = [c for c in ids if c not in keep]
        worst = min(candidates, key=margins.get, default=None)
        if worst is None or margins[worst] >= min_margin:
            break
        rows = labels == worst
        labels[rows] = _nearest(vectors[rows], vectors, labels, [c for c in ids if c != worst])
    return [int(x) for x in labels]


def _fold_small(clusters: list[int], vectors: np.ndarray, weights: np.ndarray, min_seconds: float,
                keep: set[int] = frozenset()) -> list[int]:
    """Clusters with less than ``min_seconds`` of speech (and not in ``keep``) join the most
    similar larger cluster."""
    labels = np.asarray(clusters)
    ids = sorted(set(clusters))
    big = [c for c in ids if float(weights[labels == c].sum()) >= min_seconds or c in keep]
    return _fold_into(labels, vectors, [c for c in ids if c not in big], big)


def _fold_short_replies(clusters: list[int], vectors: np.ndarray, weights: np.ndarray, short: np.ndarray,
                        similarity: float, keep: set[int] = frozenset()) -> list[int]:
    """Clusters (not in ``keep``) with at least ``SHORT_CLUSTER_SHARE`` of their speech in ``short``
    chunks (of utterances under ``SHORT_UTTERANCE_SECONDS``) join the most similar cluster if their
    centroids score at least ``similarity`` (see SHORT_UTTERANCE_SECONDS), the closest pair first.

    A cluster of replies may join another cluster of replies: one voice's replies can make two
    such clusters, each a little further than ``similarity`` from that voice's longer speech but
    close to each other (call_autorepair_b: 0.82 apart, 0.79 and 0.87 from the caller), and
    together they sound like the caller. Centroids are taken again after every join."""
    labels = np.asarray(clusters).copy()
    ids = sorted(set(clusters))
    share = {c: float(weights[(labels == c) & short].sum() / max(weights[labels == c].sum(), 1e-9)) for c in ids}
    replies = {c for c in ids if share[c] >= SHORT_CLUSTER_SHARE and c not in keep}
    members = [c for c in ids if c in replies or share[c] < SHORT_CLUSTER_SHARE]
    while replies and len(members) > 1:
        centroids = _centroids(vectors, labels, members)
        scores = centroids @ centroids.T
        np.fill_diagonal(scores, -np.inf)
        is_reply = np.asarray([c in replies for c in members])
        scores[~is_reply[:, None] & ~is_reply[None, :]] = -np.inf     # two clusters of longer speech
        i, j = divmod(int(np.argmax(scores)), len(members))
        if scores[i, j] < similarity:
            break
        # The reply cluster joins the other; of two reply clusters, the one with less speech.
        source, target = members[i], members[j]
        if source not in replies or (target in replies and weights[labels == target].sum()
                                     < weights[labels == source].sum()):
            source, target = target, source
        labels[labels == source] = target
        replies.discard(source)
        members.remove(source)
    return [int(x) for x in labels]


def _fold_into(labels: np.ndarray, vectors: np.ndarray, sources: list[int], targets: list[int],
               min_similarity: float = -np.inf) -> list[int]:
    """Each cluster of ``sources`` joins the cluster of ``targets`` whose centroid its centroid
    is most similar to, if that similarity is at least ``min_similarity``."""
    if not sources or not targets:
        return [int(x) for x in labels]
    centroids = _centroids(vectors, labels, targets)
    out = labels.copy()
    for c in sources:
        rows = labels == c
        scores = centroids @ _unit_matrix(vectors[rows].mean(axis=0, keepdims=True))[0]
        best = int(np.argmax(scores))
        if scores[best] >= min_similarity:
            out[rows] = targets[best]
    return [int(x) for x in out]
