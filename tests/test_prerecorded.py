"""Splicing a recording's speech into one clip for a cloud provider, and back (pure logic)."""

from __future__ import annotations

import io
import wave

import numpy as np

from harken.audio import Utterance
from harken.stt.base import Word
from harken.stt.prerecorded import GAP_SECONDS, SplicedClip

RATE = 16000


def utterance(start_s: float, seconds: float, value: int) -> Utterance:
    return Utterance(start=int(start_s * RATE), pcm=np.full(int(seconds * RATE), value, np.int16),
                     speech_windows=int(seconds * RATE) // 512)


def test_the_clip_holds_only_the_utterances_with_a_short_gap_between_them():
    clip = SplicedClip([utterance(10.0, 2.0, 100), utterance(60.0, 1.0, 200)])
    assert clip.seconds == 2.0 + GAP_SECONDS + 1.0
    with wave.open(io.BytesIO(clip.wav())) as reader:
        assert (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) == (RATE, 1, 2)
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16)
    assert (pcm[:2 * RATE] == 100).all() and (pcm[-RATE:] == 200).all()
    assert (pcm[2 * RATE:-RATE] == 0).all()


def test_words_go_back_to_where_their_utterance_was_recorded():
    clip = SplicedClip([utterance(10.0, 2.0, 100), utterance(60.0, 1.0, 200)])
    second = 2.0 + GAP_SECONDS                      # where the second utterance begins in the clip
    words = [Word("hello", 0.5, 0.9, 1), Word("there", 1.2, 1.8, 1),
             Word("late", 1.9, 2.2, 1),               # runs into the gap: clamped to its utterance
             Word("again", second + 0.1, second + 0.6, 0)]
    placed = SplicedClip.to_recording(clip, words)
    assert [(w.text, w.start, w.end, w.speaker) for w in placed] == [
        ("hello", 10.5, 10.9, 1), ("there", 11.2, 11.8, 1), ("late", 11.9, 12.0, 1), ("again", 60.1, 60.6, 0)]


def test_placed_words_never_go_back_in_time():
    clip = SplicedClip([utterance(5.0, 1.0, 1)])
    placed = clip.to_recording([Word("b", 0.4, 0.6), Word("a", 0.3, 0.5)])
    assert [w.text for w in placed] == ["a", "b"]
    assert all(later.start >= earlier.end for earlier, later in zip(placed, placed[1:]))
