"""Online diarization: stable speaker labels for the utterances of a conversation."""

from __future__ import annotations


import numpy as np
import pytest

from harken.audio.diarization import OnlineDiarizer, labelling_accuracy
from harken.audio.embedding import EMBEDDING_DIM

from .test_embedding import speakers, utterance_embeddings




def unit(*values: float) -> np.ndarray:
    vector = np.zeros(EMBEDDING_DIM, dtype=np.float32)
    vector[: len(values)] = values
    return vector / np.linalg.norm(vector)


@pytest.mark.timeout(60)
def test_interleaved_conversations_get_consistent_labels():
    # Every 3-speaker group of consecutive speakers (8 conversations, 144 utterances), each
    # conversation's 18 utterances in a fixed shuffled order, each utterance embedded from its
    # centred ≤ 10 s (as SpeakerIdentifier.diarize_span does).
    clips = utterance_embeddings(10.0)
    names = sorted(speakers())
    durations = {s: [min(u.size / 16000, 10.0) for u in utts] for s, utts in speakers().items()}
    rng = np.random.default_rng(7)
    accuracies = []
    for first in range(len(names)):
        group = [names[(first + k) % len(names)] for k in range(3)]
        order = [(s, k) for s in group for k in range(6)]
        order = [order[i] for i in rng.permutation(len(order))]
        diarizer = OnlineDiarizer()
        labels = [diarizer.assign(clips[s][k], weight=durations[s][k]) for s, k in order]
        # Labels are handed out in order of first appearance: 0 first, never a gap.
        first_seen = list(dict.fromkeys(labels))
        assert first_seen == list(range(len(first_seen)))
        accuracies.append(labelling_accuracy(labels, [s for s, _ in order]))
    # The bench measured 99.4 % mean and 94 % worst over 200 such conversations (one mislabelled
    # utterance of 18 is 94.4 %). Floors: 95 % on average, and no conversation below 83 % (3
    # mislabelled utterances), which a merge of two voices (≤ 67 %) always breaks.
    assert np.mean(accuracies) >= 0.95, accuracies
    assert min(accuracies) >= 0.83, accuracies


def test_labels_are_never_renumbered():
    diarizer = OnlineDiarizer(threshold=0.8)
    a, b, c = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)
    assert [diarizer.assign(v, weight=5.0) for v in (b, a, b, c, a, c)] == [0, 1, 0, 2, 1, 2]
    assert diarizer.speakers == 3
    # A voice between two known ones, closer to neither than the threshold: a new label, and
    # the earlier labels keep their meaning.
    assert diarizer.assign(unit(1, 1, 0), weight=5.0) == 3
    assert diarizer.assign(a, weight=5.0) == 1


def test_short_clips_and_new_speakers_are_judged_provisionally():
    """A short (noisy) clip joins a known voice above the lower similarity rather than founding a
    new speaker; a speaker heard only briefly is joined at the lower similarity too."""
    diarizer = OnlineDiarizer(threshold=0.8, provisional_threshold=0.5, provisional_seconds=3.0)
    a = unit(1, 0)
    assert diarizer.assign(a, weight=1.0) == 0                  # founded by a 1 s clip: provisional
    assert diarizer.assign(unit(1, 0.9), weight=5.0) == 0       # similarity 0.74: joins the provisional voice
    assert diarizer.assign(unit(1, 1.2), weight=1.0) == 0       # 0.64 ≥ 0.5, short clip: joins
    assert diarizer.assign(unit(0, 1), weight=5.0) == 1         # far from everything: a new voice
    cx, cy = diarizer.centroids[0][:2]
    turn = np.radians(-50)                                      # cos 50° ≈ 0.64 from speaker 0's centroid
    between = unit(cx * np.cos(turn) - cy * np.sin(turn), cx * np.sin(turn) + cy * np.cos(turn))
    assert 0.5 < diarizer.similarities(between)[0] < 0.8        # provisional would join, strict must not
    assert diarizer.assign(between, weight=5.0) == 2            # long clip, established voice: strict 0.8


def test_centroids_follow_the_weighted_mean():
    diarizer = OnlineDiarizer(threshold=0.5)
    diarizer.assign(unit(1, 0), weight=3.0)
    diarizer.assign(unit(1, 0.5), weight=1.0)       # similarity 0.89: the same speaker
    expected = 3 * unit(1, 0) + unit(1, 0.5)
    np.testing.assert_allclose(diarizer.centroids[0], expected / np.linalg.norm(expected), atol=1e-6)
    # A long utterance pulls the centroid more than a short one.
    assert diarizer.similarities(unit(1, 0))[0] > diarizer.similarities(unit(1, 0.5))[0]


def test_past_the_speaker_limit_utterances_join_the_nearest():
    diarizer = OnlineDiarizer(threshold=0.99, max_speakers=2)
    assert diarizer.assign(unit(1, 0, 0)) == 0
    assert diarizer.assign(unit(0, 1, 0)) == 1
    assert diarizer.assign(unit(0.2, 1, 0.1)) == 1
    assert diarizer.assign(unit(0, 0, 1)) in (0, 1)
    assert diarizer.speakers == 2
