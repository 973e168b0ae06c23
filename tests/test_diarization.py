"""Diarization: the utterance-level baseline, the conversation diarizer (also on real recordings), the DER scorer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from harken.audio.der import diarization_error, read_rttm
from harken.audio.diarization import (
    ConversationDiarizer,
    OnlineDiarizer,
    labelling_accuracy,
)
from harken.audio.embedding import EMBEDDING_DIM
from harken.audio.speaker_models import model_named
from harken.audio.vad import speech_spans
from harken.client import read_wav_16k

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


# --- conversation diarization on real recordings ---------------------------------------------

CONVERSATIONS = Path(__file__).parent / "data" / "conversations"


def utterances_of(pcm: np.ndarray) -> list[tuple[int, int]]:
    """VAD utterances ended by 0.5 s of silence, as the embedded engine ends them."""
    return [(a, b) for a, b in speech_spans(pcm, min_silence_ms=500, pad_ms=100) if b - a >= 0.5 * 16000]


def diarize_recording(name: str, model: str = "resemblyzer", known=None, until: float | None = None,
                      **options) -> tuple[list, ConversationDiarizer]:
    """The local diarization path on a real recording (up to ``until`` seconds): each utterance
    embedded once as the model's windows, labelled in order, the last re-clustering at the end."""
    pcm = read_wav_16k(CONVERSATIONS / f"{name}.wav")
    if until is not None:
        pcm = pcm[: int(until * 16000)]
    speaker_model = model_named(model)
    embedder = speaker_model.load()
    diarizer = ConversationDiarizer.for_model(speaker_model, known=known, **options)
    for a, b in utterances_of(pcm):
        diarizer.add_utterance(a / 16000, b / 16000, embedder.embed_windows(pcm[a:b]))
    diarizer.finish()                    # as the session does when it closes
    return read_rttm(CONVERSATIONS / f"{name}.rttm"), diarizer


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, name, max_der", [
    # Held-out recordings (the thresholds were tuned on other calls and meetings). Measured
    # (bench_diarization.py --offline): see the README's speaker table; floors leave a margin.
    ("dvector", "call_chromecast", 0.10),
    ("dvector", "meeting_katie_steve", 0.15),
    ("resemblyzer", "call_chromecast", 0.05),          # measured 0.0 %
    ("resemblyzer", "meeting_katie_steve", 0.10),      # measured 1.6 %
])
def test_real_conversations_are_diarized_with_the_right_number_of_speakers(model, name, max_der):
    reference, diarizer = diarize_recording(name, model)
    score = diarization_error(reference, diarizer.turns())
    assert score.hypothesis_speakers == score.reference_speakers, score
    assert score.der <= max_der, score


@pytest.mark.timeout(300)
def test_a_two_party_call_with_similar_voices_is_not_one_speaker():
    # The old utterance-level clustering heard this call's agent and caller as one voice (DER
    # 45.9 %, 1 speaker of 2); re-clustering the d-vector's 1.6 s stretches finds two (44.4 %),
    # Resemblyzer's partials separate them far better (20.8 %, though the caller's laughs and
    # backchannels made two small extra speakers; since utterances under 1.2 s no longer found
    # speakers, 17.3 % with 2 of 2). Not held out for that rule: this call is the one it was
    # made for (MIN_CLUSTER_UTTERANCE_SECONDS; the other recordings did not change).
    reference, diarizer = diarize_recording("call_autorepair_b", "dvector")
    score = diarization_error(reference, diarizer.turns())
    assert score.hypothesis_speakers == 2, score
    # Since each chunk goes to its nearest centroid after the clustering, 15.2 % (17.3 % before:
    # the agent's opening and the caller's first words were swapped).
    reference, diarizer = diarize_recording("call_autorepair_b", "resemblyzer")
    score = diarization_error(reference, diarizer.turns())
    assert score.hypothesis_speakers == 2 and score.der <= 0.165, score


def test_a_chunk_that_average_linkage_left_with_the_wrong_voice_goes_to_the_nearest_centroid():
    # Average linkage decides a chunk when its group merges: here the ambiguous chunk (0.77 from
    # a) is closest of all to another odd chunk (0.82), pairs with it first, and the pair goes
    # with b; the finished clusters' centroids put it with a.
    from harken.audio.diarization import _average_linkage, _nearest_centroid

    a, b = unit(1, 0, 0), unit(0, 1, 0)
    ambiguous, odd = unit(0.77, 0.44, 0.09, 0.46), unit(0.32, 0.81, 0.25, 0.43)
    vectors = np.stack([a, a, a, ambiguous, odd, b, b])
    clusters = _average_linkage(vectors, threshold=0.55)
    assert clusters[3] == clusters[4] != clusters[0], clusters          # linkage put it with b
    moved = _nearest_centroid(clusters, vectors)
    assert moved[3] == moved[0] and moved[4] == moved[5] != moved[0], moved
    assert _nearest_centroid([0, 0, 0], vectors[:3]) == [0, 0, 0]


def test_a_cluster_that_mixes_two_voices_is_dissolved_and_a_voice_of_its_own_is_kept():
    # Three clusters: two voices, and a third holding some chunks of each (what average linkage
    # left of two voices on one telephone line). Its chunks are closer to the voices they came
    # from than to each other, so it is dissolved and each chunk goes home; a third voice whose
    # chunks are close to each other stays a speaker, and two clusters are never made one.
    from harken.audio.diarization import _dissolve_indistinct, _margins

    rng = np.random.default_rng(7)
    a, b, c = unit(1, 0, 0), unit(0, 1, 0), unit(0, 0, 1)

    def voice(v, n):
        return [v + 0.03 * rng.standard_normal(EMBEDDING_DIM) for _ in range(n)]      # noise of norm ~0.5

    vectors = np.asarray([x / np.linalg.norm(x) for x in
                          voice(a, 6) + voice(b, 6) + voice(a, 2) + voice(b, 2) + voice(c, 4)])
    mixed = [0] * 6 + [1] * 6 + [2] * 4 + [3] * 4
    margins = _margins(vectors, np.asarray(mixed), [0, 1, 2, 3])
    assert margins[2] < 0.07 < min(margins[0], margins[1], margins[3]), margins
    out = _dissolve_indistinct(mixed, vectors, 0.07)
    assert out[12:14] == [0, 0] and out[14:16] == [1, 1], out       # each chunk to its own voice
    assert out[:12] == mixed[:12] and out[16:] == [3] * 4, out       # the others untouched
    assert _dissolve_indistinct(mixed, vectors, 0.07, keep={2}) == mixed      # the newest voice waits
    halves = [0, 0, 0, 1, 1, 1] * 2               # each of two clusters half a, half b: margins ~0
    assert max(_margins(vectors[:12], np.asarray(halves), [0, 1]).values()) < 0.07
    assert _dissolve_indistinct(halves, vectors[:12], 0.07) == halves


def test_a_speaker_change_inside_one_utterance_splits_it():
    # One "utterance" of 12 windows: the first 6 one voice, the last 6 another.
    a, b = unit(1, 0, 0), unit(0, 1, 0)
    windows = np.stack([a] * 6 + [b] * 6)
    diarizer = ConversationDiarizer(threshold=0.8, min_speaker_seconds=0.0)
    diarizer.add_utterance(10.0, 10.0 + 11 * 0.4 + 0.8, windows)
    assert diarizer.label_at(10.5) != diarizer.label_at(14.8)
    assert diarizer.speakers == 2


def test_short_sounds_do_not_found_a_speaker_of_their_own():
    # Two voices in long utterances, and between them four short sounds (a laugh, "mm-hmm": one
    # window each) that embed like neither voice. They join the closest voice rather than make
    # a third speaker (on the call with many backchannels they made two extra speakers).
    a, b, odd = unit(1, 0, 0), unit(0, 1, 0), unit(0.6, 0.5, 0.6)
    diarizer = ConversationDiarizer(threshold=0.8, min_speaker_seconds=1.0, window_seconds=1.6, hop_seconds=0.8,
                                    chunk_windows=1, chunk_stride=1)
    diarizer.add_utterance(0.0, 4.0, np.stack([a] * 4))
    diarizer.add_utterance(5.0, 9.0, np.stack([b] * 4))
    for start in (10.0, 11.0, 12.0, 13.0):
        diarizer.add_utterance(start, start + 0.6, odd[None, :])
    diarizer.add_utterance(14.0, 18.0, np.stack([a] * 4))
    diarizer.add_utterance(19.0, 23.0, np.stack([b] * 4))
    diarizer.finish()
    assert diarizer.speakers == 2
    assert diarizer.label_at(10.3) == diarizer.label_at(2.0)          # odd is closer to a than to b
    assert diarizer.label_at(2.0) != diarizer.label_at(7.0)


def test_one_voices_replies_split_in_two_clusters_join_that_voice_together():
    # The caller's short replies (1.5 s utterances) came out as two clusters, each 0.78 from the
    # caller's longer speech (under the 0.80 bar at which replies join a voice) but 0.84 from
    # each other; together they score 0.81 against the caller. On call_autorepair_b this left a
    # third speaker on a call of two. Replies that sound like each other join first, then the
    # voice they sound like together; a voice far from them all (b) takes none of them.
    a, b = unit(1, 0, 0, 0, 0), unit(0, 0, 0, 0, 1)
    alpha, gamma = 0.78, np.sqrt(0.08)
    beta = np.sqrt(1 - alpha ** 2 - gamma ** 2)
    first, second = unit(alpha, beta, gamma, 0, 0), unit(alpha, beta, -gamma, 0, 0)
    assert float(first @ a) < 0.80 <= float(first @ second)
    diarizer = ConversationDiarizer(threshold=0.9, min_speaker_seconds=1.0, window_seconds=1.6, hop_seconds=0.8,
                                    chunk_windows=1, chunk_stride=1, short_cluster_similarity=0.80)
    t = 0.0
    for voice, count in ((a, 4), (b, 4), (first, 1), (a, 4), (second, 1), (b, 4), (first, 1), (second, 1)):
        diarizer.add_utterance(t, t + (1.5 if count == 1 else 4.0), np.stack([voice] * count))
        t += 5.0
    diarizer.finish()
    assert diarizer.speakers == 2, diarizer.labels
    assert {diarizer.label_at(s + 0.5) for s in (10.0, 20.0, 30.0, 35.0)} == {diarizer.label_at(2.0)}
    assert diarizer.label_at(2.0) != diarizer.label_at(7.0)


def test_a_label_given_and_dropped_is_not_given_again_and_next_label_names_the_next_voice():
    # A voice heard briefly keeps a label of its own while it is the newest, then folds into the
    # nearest speaker. Its label is not given again: a new voice gets ``next_label``, which is
    # what the session shows a cloud engine's new speaker under before the voice decides (one
    # past the labels in use named the dropped label, and the words moved by id when it decided).
    a, brief, c = unit(1, 0, 0), unit(0.3, 1, 0), unit(0, 0, 1)
    diarizer = ConversationDiarizer(threshold=0.8, min_speaker_seconds=2.0, window_seconds=1.6, hop_seconds=0.8,
                                    chunk_windows=1, chunk_stride=1)
    diarizer.add_utterance(0.0, 4.0, np.stack([a] * 4))
    diarizer.add_utterance(5.0, 6.4, brief[None, :])
    assert diarizer.label_at(5.7) == 1 and diarizer.next_label == 2        # the newest voice: its own
    for start in (6.0, 11.0):
        diarizer.add_utterance(start, start + 4.0, np.stack([a] * 4))
    assert diarizer.label_at(5.7) == diarizer.label_at(2.0) == 0          # folded (two runs agreed)
    assert set(diarizer.labels) == {0} and diarizer.next_label == 2
    diarizer.add_utterance(16.0, 20.0, np.stack([c] * 4))
    assert diarizer.label_at(18.0) == 2


def test_reclustering_relabels_earlier_speech_only_when_two_runs_agree():
    a, b = unit(1, 0, 0), unit(0.6, 0.8, 0)        # similarity 0.6
    diarizer = ConversationDiarizer(threshold=0.5, min_speaker_seconds=0.0, recluster_seconds=0.0)
    diarizer.add_utterance(0.0, 2.0, np.stack([a] * 4))
    diarizer.add_utterance(3.0, 5.0, np.stack([b] * 4))
    assert diarizer.speakers == 1                    # 0.6 ≥ 0.5: one voice so far
    first = diarizer.label_at(1.0)
    diarizer.threshold = 0.7                         # the picture changes: a and b are two voices
    assert diarizer.add_utterance(6.0, 8.0, np.stack([b] * 4))
    # One re-clustering saw two voices: the earlier stretches keep their label for now.
    assert diarizer.label_at(1.0) == diarizer.label_at(4.0) == first
    assert diarizer.add_utterance(9.0, 11.0, np.stack([b] * 4))
    # The second agreed: the earlier speech is relabelled, and "b" is one voice throughout.
    assert diarizer.label_at(1.0) != diarizer.label_at(4.0)
    assert diarizer.label_at(4.0) == diarizer.label_at(7.0) == diarizer.label_at(10.0)
    assert diarizer.speakers == 2


def test_an_enrolled_voice_takes_only_the_stretches_that_match_it():
    owner, other = unit(1, 0, 0), unit(0.55, 0.835, 0)   # similarity 0.55 to the owner
    diarizer = ConversationDiarizer(known=owner[None, :], threshold=0.5, known_threshold=0.6,
                                    min_speaker_seconds=0.0)
    diarizer.add_utterance(0.0, 2.0, np.stack([owner] * 4))
    diarizer.add_utterance(3.0, 5.0, np.stack([other] * 4))
    # One cluster by voice (0.55 ≥ 0.5), but only the owner's own stretch is the owner's.
    assert diarizer.known_label(diarizer.label_at(1.0)) == 0
    assert diarizer.known_label(diarizer.label_at(4.0)) is None
    assert diarizer.label_at(1.0) != diarizer.label_at(4.0)


def test_der_scorer_agrees_with_pyannote_metrics():
    # Values from pyannote.metrics 4.2.0 DiarizationErrorRate(collar, skip_overlap=False) on the
    # same turns (the module was cross-checked on 200 random cases, difference < 1e-13).
    reference = [(0, 5, "A"), (5, 10, "B")]
    assert diarization_error(reference, [(0, 6, 0), (6, 10, 1)], collar=0).der == pytest.approx(0.1)
    assert diarization_error(reference, [(0, 6, 0), (6, 10, 1)], collar=0.5).der == pytest.approx(0.75 / 9)
    overlapping = [(0, 5, "A"), (4, 10, "B")]
    score = diarization_error(overlapping, [(0, 6, 0), (6, 10, 1)], collar=0)
    assert (score.missed, score.confusion, score.reference) == pytest.approx((1.0, 1.0, 11.0))
    # Overlap left out (pyannote's skip_overlap=True): 4-5 s is not scored, 5-6 s is confused.
    score = diarization_error(overlapping, [(0, 6, 0), (6, 10, 1)], collar=0, skip_overlap=True)
    assert (score.missed, score.confusion, score.reference) == pytest.approx((0.0, 1.0, 9.0))
    # Labels are mapped one-to-one: a hypothesis with one label for two voices is half wrong.
    assert diarization_error(reference, [(0, 10, 7)], collar=0).der == pytest.approx(0.5)


def enrolment_from_last_quarter(name: str, speaker: str) -> tuple[np.ndarray, float]:
    """``speaker``'s solo speech in the last quarter of a recording (at most 30 s, VAD-trimmed as
    the speech-profile route trims it), and where that quarter starts."""
    pcm = read_wav_16k(CONVERSATIONS / f"{name}.wav")
    reference = read_rttm(CONVERSATIONS / f"{name}.rttm")
    split = 0.75 * pcm.size / 16000
    frames = np.arange(int(split * 100), pcm.size // 160)          # 10 ms frames after the split
    speaking = {who: np.zeros(frames.size, bool) for *_, who in reference}
    for a, b, who in reference:
        speaking[who] |= (frames >= a * 100) & (frames < b * 100)
    solo = speaking[speaker] & ~np.any([v for who, v in speaking.items() if who != speaker], axis=0)
    enrol = np.concatenate([pcm[f * 160:(f + 1) * 160] for f in frames[solo]])[: 30 * 16000]
    enrol = np.concatenate([enrol[a:b] for a, b in speech_spans(enrol)])
    assert enrol.size >= 10 * 16000
    return enrol, split


def owner_time(diarizer: ConversationDiarizer, reference, owner: str | None) -> tuple[int, int]:
    """10 ms steps of single-speaker speech inside labelled stretches where "is the owner" is
    right, and all such steps (``owner`` None: the owner never speaks)."""
    right = total = 0
    for a, b, label in diarizer.turns():
        for t in np.arange(a, b, 0.01) + 0.005:
            who = {w for x, y, w in reference if x <= t < y}
            if len(who) == 1:
                total += 1
                right += (diarizer.known_label(label) == 0) == (owner in who)
    return right, total


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model, floor", [("dvector", 0.90), ("resemblyzer", 0.95)])
def test_the_owner_is_found_per_stretch_on_a_real_call(model, floor):
    # The agent of a held-out call is the owner, enrolled (as the speech-profile route does: VAD
    # trimmed, one embedding) from their solo turns in the call's last quarter; the first three
    # quarters are diarized with that voice known. Every 10 ms of single-speaker speech inside a
    # labelled stretch is right if "is the owner" says whether the agent speaks there. Both
    # voices come through one telephone line: against the enrolment the d-vector scores the
    # agent's stretches 0.83 and the caller's 0.75 on average, Resemblyzer 0.83 and 0.71.
    enrol, split = enrolment_from_last_quarter("call_autorepair_b", "agent")
    embedder = model_named(model).load()
    reference, diarizer = diarize_recording("call_autorepair_b", model, known=embedder.embed(enrol)[None, :],
                                            until=split)
    right, total = owner_time(diarizer, reference, "agent")
    assert total > 60 * 100
    # Measured (bench_diarization.py --offline): the d-vector 94.4 %, Resemblyzer 98.0 %. Before
    # the enrolled voice's stretches were decided again against the conversation's own voices
    # (a fixed bar raised between the clusters' mean scores) 73.1 %; the utterance-level path
    # 57.3 %. Not held out: this call is the one the relative bar was first developed on.
    assert right / total >= floor, right / total


@pytest.mark.timeout(300)
def test_nobody_is_taken_for_an_owner_who_does_not_speak():
    # The owner is the agent of one call (a man on a telephone line); another call, where he does
    # not speak, has a man on a telephone line too. None of its speech may be marked his.
    # Resemblyzer scores that other man 0.67 on average against the enrolment, under the 0.75 a
    # voice's stretches need together (its speakers score 0.79-0.84 against their own). The
    # d-vector scores him 0.71, inside its own speakers' range (0.73-0.85), and marks 35 % of
    # the call the owner's: one reason it is no longer the default model.
    enrol, _ = enrolment_from_last_quarter("call_autorepair_b", "agent")
    embedder = model_named("resemblyzer").load()
    reference, diarizer = diarize_recording("call_chromecast", "resemblyzer", known=embedder.embed(enrol)[None, :])
    right, total = owner_time(diarizer, reference, None)
    assert total > 20 * 100
    assert right / total >= 0.95, right / total



# --- through the gateway ---------------------------------------------------------------------

@pytest.mark.timeout(300)
async def test_a_reply_inside_one_engine_utterance_gets_its_own_speaker_through_the_gateway(gateway):
    # Two voices each speak alone first; then the woman's next turn and the man's reply follow
    # each other with 0.15 s between their speech: under the engine's 0.3 s pause and 0.7 s
    # end of utterance, so one utterance is decoded and embedded with both voices in it. Its
    # words must be split between the two speakers the conversation already knows (the old
    # utterance-level path gave the whole utterance one label).
    from harken.client import listen_url, stream_messages

    from .fakes.recording import speech_span
    from .test_gateway import pcm_messages, token_for

    def speech(speaker: str, index: int) -> np.ndarray:
        pcm = read_wav_16k(sorted((Path(__file__).parent / "data" / "speakers" / speaker).glob("*.wav"))[index])
        a, b = speech_span(pcm)
        return pcm[a:b][: 6 * 16000]

    def quiet(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * 16000), np.int16)

    woman, man = "1998", "2033"
    pieces = [quiet(1.0), speech(woman, 0), quiet(1.5), speech(man, 0), quiet(1.5)]
    reply_at = sum(p.size for p in pieces) / 16000
    first = speech(woman, 1)
    pieces += [first, quiet(0.0)]
    second_at = reply_at + first.size / 16000
    second = speech(man, 2)
    pieces += [second, quiet(2.0)]
    second_end = second_at + second.size / 16000
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000)
    result = await stream_messages(url, pcm_messages(np.concatenate(pieces)), 0.1, token=token_for(gateway),
                                   realtime=False, settle_seconds=8.0, max_wait=180)
    segments = result.ordered()
    # Conversation time counts from the first word: the woman's first speech, at 1.0 s.
    offset = 1.0 - segments[0]["start"]
    seen = [(round(s["start"] + offset, 2), round(s["end"] + offset, 2), s["speaker_id"], s["text"][:40])
            for s in segments]
    print("\n" + "\n".join(map(str, seen)), f"\nthe reply: {reply_at:.2f} (woman) {second_at:.2f}-{second_end:.2f} (man)")
    woman_label = segments[0]["speaker_id"]
    man_label = next(s["speaker_id"] for s in segments if 4.0 <= s["start"] + offset < reply_at - 1.0)
    assert woman_label != man_label, seen

    def label_at(t: float) -> int:
        return next(s["speaker_id"] for s in segments if s["start"] + offset - 0.3 <= t <= s["end"] + offset + 0.3)

    assert label_at(reply_at + 1.0) == woman_label, seen
    # The man's first words too, not only his reply's end (the old path labelled the utterance
    # by its majority: his first 1.7 s went to her).
    assert label_at(second_at + 0.8) == man_label, seen
    assert label_at(second_end - 1.0) == man_label, seen


@pytest.mark.timeout(300)
async def test_the_client_sees_the_last_reclustering_as_relabels_by_id_before_it_hangs_up(gateway):
    # Two people talk at length, then a third voice says a few words (1.5 s) and the
    # conversation pauses. While it is the newest voice it keeps a label of its own; the
    # re-clustering the close runs folds a voice heard this briefly into the nearest speaker
    # (MIN_SPEAKER_SECONDS). The old session ran that re-clustering only when the connection
    # closed, so only the store got it: the app kept showing a speaker the saved conversation
    # does not have. Now the pause runs it, the segment is re-sent under its id with its new
    # label, and what the client sees last is what the store keeps.
    from harken.client import listen_url, stream_messages

    from .fakes.recording import speech_span
    from .test_gateway import pcm_messages, token_for

    def speech(speaker: str, index: int, seconds: float) -> np.ndarray:
        pcm = read_wav_16k(sorted((Path(__file__).parent / "data" / "speakers" / speaker).glob("*.wav"))[index])
        a, b = speech_span(pcm)
        return pcm[a:b][: int(seconds * 16000)]

    def quiet(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * 16000), np.int16)

    # Pauses of 3.5 s: the segment builder joins one speaker's words across pauses under 3 s.
    pieces = [quiet(1.0), speech("2033", 0, 6.0), quiet(3.5), speech("1998", 0, 6.0), quiet(3.5),
              speech("2033", 1, 6.0), quiet(3.5)]
    brief_at = sum(p.size for p in pieces) / 16000
    pieces += [speech("3331", 0, 1.5), quiet(3.0)]
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000)
    token = token_for(gateway)
    result = await stream_messages(url, pcm_messages(np.concatenate(pieces)), 0.1, token=token,
                                   realtime=False, settle_seconds=8.0, max_wait=180)
    segments = result.ordered()
    offset = 1.0 - segments[0]["start"]          # conversation time counts from the first word
    seen = [(round(s["start"] + offset, 2), round(s["end"] + offset, 2), s["speaker_id"], s["text"][:40])
            for s in segments]
    print("\n" + "\n".join(map(str, seen)))
    brief = segments[-1]
    assert brief["start"] + offset >= brief_at - 0.5, seen
    versions = [u.segment["speaker_id"] for u in result.updates if u.segment["id"] == brief["id"]]
    print("the brief voice's segment as sent:", versions)
    # It was shown under a label of its own, and re-sent under the same id with a speaker's.
    assert versions[0] not in {s["speaker_id"] for s in segments[:-1]}, (versions, seen)
    assert brief["speaker_id"] in {s["speaker_id"] for s in segments[:-1]}, (versions, seen)
    # The client's last view is the stored conversation's.
    stored = {s["id"]: s["speaker_id"] for s in (await stored_conversation(gateway, token, result))["transcript_segments"]}
    assert stored == {s["id"]: s["speaker_id"] for s in segments}, (stored, seen)


async def stored_conversation(gateway, token: str, result) -> dict:
    """The conversation ``result``'s session stored, as the app reads it once the session ended."""
    import httpx

    conversation = next(e["conversation_id"] for e in result.events if e.get("type") == "conversation_session")
    async with httpx.AsyncClient(base_url=gateway.http) as http:
        for _ in range(50):
            response = await http.get(f"/v1/conversations/{conversation}", headers={"Authorization": f"Bearer {token}"})
            if response.status_code == 200:
                return response.json()
            await asyncio.sleep(0.1)
    raise AssertionError(f"conversation {conversation} was not stored: {response.status_code}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name, max_der", [
    # Held out (nothing was tuned on it). Through the gateway as this test streams it, before
    # segments were split by their words' voices: 9.8 % (a segment that held both speakers'
    # words was relabelled whole); since, 3.5 %. bench_diarization.py --replica gives 9.7-13.4 %
    # before and 3.4-7.1 % since, with and without the engine's cuts at sentence ends. Streamed
    # at real-time pace and placed by the server's clock (since session 19): 6.8 %, 2 speakers,
    # alone and after the rest of this file.
    ("call_chromecast", 0.085),
])
async def test_segments_of_a_real_conversation_follow_the_voices_through_the_gateway(gateway, name, max_der):
    # A held-out recording streamed through the gateway with the embedded engine at real-time
    # pace, as a device streams, then a pause: the segments the client sees last are scored as a
    # diarization (the bench's rules: ±0.25 s collar, placed on the recording by the server's
    # clock). Streamed as fast as it goes, where the engine cuts depended on how fast this CPU
    # decodes: 3.5 % on one machine, 8.1 % alone and 11.8 % after the rest of this file (3
    # speakers) on another (AMD EPYC); at real-time pace 7.4 % aligned at the first reference
    # turn, 2 speakers, on the second. The session relabels earlier
    # segments by id as the conversation's voices become clear; a segment the voice now hears
    # as two speakers is split, its parts re-sent under new ids.
    from harken.client import listen_url, stream_messages

    from .test_gateway import pcm_messages, token_for

    pcm = read_wav_16k(CONVERSATIONS / f"{name}.wav")
    reference = read_rttm(CONVERSATIONS / f"{name}.rttm")
    pcm = np.concatenate((pcm, np.zeros(int(1.5 * 16000), np.int16)))
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000)
    token = token_for(gateway)
    result = await stream_messages(url, pcm_messages(pcm), 0.1, token=token, realtime=True,
                                   settle_seconds=8.0, max_wait=180)
    # Conversation time 0 on the recording, by the server's clock: the stored conversation's
    # start is the session's audio clock at its first word (the bench's server_offset).
    offset = result.audio_time_at((await stored_conversation(gateway, token, result))["started_at"])
    turns = [(s["start"] + offset, s["end"] + offset, s["speaker_id"]) for s in result.ordered() if s["end"] > s["start"]]
    score = diarization_error(reference, turns)
    print(f"\n{name}: DER {score.der:.1%} (missed {score.missed:.1f} s, false alarm {score.false_alarm:.1f} s, "
          f"confusion {score.confusion:.1f} s of {score.reference:.1f} s), speakers {score.hypothesis_speakers}")
    assert abs(score.hypothesis_speakers - score.reference_speakers) <= 1, score
    assert score.der <= max_der, score
