"""Speaker embeddings on real voices: same speaker scores high, other speakers low, owner EER.

The data are 8 LibriSpeech speakers × 6 utterances (tests/data/speakers). The helpers at the top
are shared with test_diarization and test_speakers, and cache embeddings for the whole run.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from harken.audio.embedding import (
    EMBEDDING_DIM,
    OWNER_SIMILARITY_THRESHOLD,
    SAMPLE_RATE,
    SpeakerEmbedder,
    cosine_similarity,
    equal_error_rate,
    log_mel,
    mean_embedding,
)

SPEAKERS_DIR = Path(__file__).parent / "data" / "speakers"
ENROLMENT_UTTERANCES = (0, 1, 2)


# --- helpers shared with test_diarization and test_speakers -------------------------------
def read_pcm(path: Path) -> np.ndarray:
    with wave.open(str(path)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16)


@functools.cache
def speakers() -> dict[str, tuple[np.ndarray, ...]]:
    """Speaker id → that speaker's 6 utterances (int16), in file-name order."""
    return {
        d.name: tuple(read_pcm(f) for f in sorted(d.glob("*.wav")))
        for d in sorted(SPEAKERS_DIR.iterdir())
        if d.is_dir()
    }


def centred(pcm: np.ndarray, seconds: float) -> np.ndarray:
    """At most ``seconds`` from the middle of ``pcm``."""
    n = int(seconds * SAMPLE_RATE)
    start = max(0, (pcm.size - n) // 2)
    return pcm[start : start + n]


@functools.cache
def utterance_embeddings(clip_seconds: float) -> dict[str, tuple[np.ndarray, ...]]:
    """Embedding of the centred ``clip_seconds`` of every utterance (cached for the run)."""
    embedder = SpeakerEmbedder.shared()
    return {s: tuple(embedder.embed(centred(u, clip_seconds)) for u in utts) for s, utts in speakers().items()}


def enrolment(speaker: str, utterances=ENROLMENT_UTTERANCES) -> np.ndarray:
    """A speaker's enrolled voice: the mean embedding of (the centred ≤ 10 s of) utterances."""
    clips = utterance_embeddings(10.0)[speaker]
    return mean_embedding([clips[k] for k in utterances])


def owner_trials(clip_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """Owner-detection scores: each speaker enrolled with every choice of 3 utterances, scored
    against the ``clip_seconds`` middle of its other 3 (genuine) and of all 42 other speakers'
    utterances (impostor)."""
    clips = utterance_embeddings(clip_seconds)
    genuine, impostor = [], []
    for speaker in clips:
        for chosen in itertools.combinations(range(6), 3):
            enrolled = enrolment(speaker, chosen)
            genuine += [float(enrolled @ clips[speaker][k]) for k in range(6) if k not in chosen]
            impostor += [float(enrolled @ e) for other, es in clips.items() if other != speaker for e in es]
    return np.asarray(genuine), np.asarray(impostor)


# --- the model ----------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_embeddings_are_unit_vectors_and_deterministic():
    embedder = SpeakerEmbedder.shared()
    pcm = speakers()["1688"][0]
    first, second = embedder.embed(pcm), embedder.embed(pcm.copy())
    assert first.shape == (EMBEDDING_DIM,) and first.dtype == np.float32
    assert np.linalg.norm(first) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(first, second)


@pytest.mark.timeout(60)
def test_same_speaker_scores_clearly_above_other_speakers():
    clips = utterance_embeddings(2.0)
    for speaker, own in clips.items():
        same = [float(a @ b) for a, b in itertools.combinations(own, 2)]
        others = [float(a @ b) for other, es in clips.items() if other != speaker for a in own for b in es]
        # The reference measured mean cosine 0.86 same / 0.31 other on full utterances; on 2 s
        # clips every speaker should still be separated by a wide margin on average.
        assert np.mean(same) - np.mean(others) > 0.3, speaker


@pytest.mark.timeout(60)
def test_owner_equal_error_rate_on_two_second_clips():
    genuine, impostor = owner_trials(2.0)
    eer, threshold = equal_error_rate(genuine, impostor)
    # The reference measured 1.4 % on 10 speakers × 10 utterances and this data gives about
    # 0.4 %; with only 48 genuine 2 s clips one more confused clip moves the EER by ~2 points, so
    # 5 % is the floor that is robust to that and still fails for a broken front end (natural
    # log instead of log10 gives 6.7 %; an un-normalised clip 20 dB quieter gave 5.2 %).
    assert eer <= 0.05, (eer, threshold)
    # At the calibrated threshold, false owner matches are rare and most owner clips pass.
    assert (impostor >= OWNER_SIMILARITY_THRESHOLD).mean() <= 0.01
    assert (genuine < OWNER_SIMILARITY_THRESHOLD).mean() <= 0.10


@pytest.mark.timeout(60)
def test_level_does_not_change_who_is_speaking():
    # A wearable hears its owner loud and others quiet (or the other way round): a 20 dB level
    # change must not move a clip's embedding towards anyone else.
    embedder = SpeakerEmbedder.shared()
    pcm = centred(speakers()["2033"][1], 3.0)
    quiet = (pcm.astype(np.float32) * 0.1).astype(np.int16)
    assert cosine_similarity(embedder.embed(pcm), embedder.embed(quiet)) > 0.95


@pytest.mark.timeout(60)
def test_features_put_a_tone_in_its_mel_band():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    low = (8000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    high = (8000 * np.sin(2 * np.pi * 3000 * t)).astype(np.int16)
    low_band = int(np.argmax(log_mel(low).mean(axis=0)))
    high_band = int(np.argmax(log_mel(high).mean(axis=0)))
    # Slaney mel: 40 bands over 0–8 kHz, linear up to 1 kHz (~15 bands), so 300 Hz falls in a
    # low band and 3 kHz about two thirds of the way up.
    assert 2 <= low_band <= 7
    assert 20 <= high_band <= 30
    assert log_mel(low).shape == (1 + (SAMPLE_RATE - 512) // 160, 40)


@pytest.mark.timeout(30)
def test_too_short_a_clip_is_refused():
    with pytest.raises(ValueError):
        SpeakerEmbedder.shared().embed(np.zeros(SAMPLE_RATE // 4, dtype=np.int16))


@pytest.mark.timeout(30)
async def test_embed_async_runs_off_the_event_loop():
    embedder = SpeakerEmbedder.shared()
    pcm = centred(speakers()["3080"][2], 2.0)
    loop_thread = threading.get_ident()
    seen: list[int] = []
    original = embedder.embed

    def recording_embed(clip):
        seen.append(threading.get_ident())
        return original(clip)

    embedder.embed = recording_embed          # instance attribute: shadows the method for this test
    try:
        result, _ = await asyncio.gather(embedder.embed_async(pcm), asyncio.sleep(0))
    finally:
        del embedder.embed
    assert seen and seen[0] != loop_thread
    np.testing.assert_array_equal(result, original(pcm))


def test_equal_error_rate_of_known_scores():
    # Separable scores: no error at the threshold between them.
    assert equal_error_rate([0.9, 0.8], [0.1, 0.2]) == (0.0, 0.8)
    # One impostor above one genuine: at 0.75 one of 3 genuine is missed and one of 3 impostors
    # passes.
    eer, threshold = equal_error_rate([0.9, 0.8, 0.7], [0.1, 0.2, 0.75])
    assert threshold == 0.75 and eer == pytest.approx(1 / 3)
