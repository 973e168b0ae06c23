"""``ClipSpeakerLinker``: each clip's speaker numbers (a provider's, afresh per request) become the
recording's, by voice. Pure logic on made-up voice vectors; tests/test_sync_cloud.py runs it on
a real call through the server."""

from __future__ import annotations

import numpy as np

from harken.audio.clip_speakers import ClipSpeakerLinker

RNG = np.random.default_rng(7)
A, B, C = (RNG.normal(size=64) for _ in range(3))       # three voices, nearly orthogonal


def heard(voice: np.ndarray, noise: float = 0.3) -> np.ndarray:
    """The voice as one clip gives it (a little off)."""
    return voice + noise * np.linalg.norm(voice) / 8 * RNG.normal(size=voice.size)


def linker() -> ClipSpeakerLinker:
    return ClipSpeakerLinker(similarity=0.7, min_seconds=4.0)


def test_a_clip_whose_provider_numbered_the_speakers_the_other_way_round_gets_the_recordings_numbers():
    link = linker()
    assert link.link({0: (heard(A), 30.0), 1: (heard(B), 20.0)}) == {0: 0, 1: 1}
    assert link.link({0: (heard(B), 25.0), 1: (heard(A), 10.0)}) == {0: 1, 1: 0}
    assert link.link({0: (heard(A), 40.0)}) == {0: 0}
    assert link.speakers == 2


def test_a_new_voice_is_a_new_speaker_and_two_speakers_of_one_clip_never_merge():
    link = linker()
    link.link({0: (heard(A), 30.0), 1: (heard(B), 20.0)})
    assert link.link({0: (heard(C), 30.0), 1: (heard(A), 30.0)}) == {0: 2, 1: 0}
    # The provider told two voices apart that sound alike: they stay apart (one is new).
    numbers = link.link({0: (heard(A), 30.0), 1: (heard(A), 30.0)})
    assert sorted(numbers.values())[0] == 0 and numbers[0] != numbers[1]


def test_a_voice_heard_briefly_joins_the_closest_speaker_left_and_a_speaker_without_audio_is_its_own():
    link = linker()
    link.link({0: (heard(A), 30.0), 1: (heard(B), 20.0)})
    # "Yes." (1 s) from B while A talks: B's number, though 1 s of voice is not enough to be sure.
    assert link.link({0: (heard(A), 30.0), 1: (heard(B, noise=2.0), 1.0)}) == {0: 0, 1: 1}
    # ... and it did not found a speaker or move B's voice.
    assert link.speakers == 2
    assert link.link({0: (None, 0.0), 1: (heard(B), 9.0)}) == {0: 2, 1: 1}
