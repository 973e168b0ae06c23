"""The embedded stream's cuts (``UtteranceCutter``) without sockets or models: real recordings
through the real VAD, pause decodes answered with words the test writes."""

from __future__ import annotations

import numpy as np
import pytest

from harken.audio import SAMPLE_RATE, WINDOW_SECONDS, Endpointer, StreamingVAD, speech_spans
from harken.stt.cutting import PARTIAL_MIN_SECONDS, Ended, UtteranceCutter

from .conftest import load_audio

pytestmark = pytest.mark.timeout(30)

PIECE = SAMPLE_RATE * 40 // 1000          # what a session feeds the engine at a time
SILENCE_MS, PAUSE_MS = 700, 300           # the server's defaults
SENTENCE = [(" Go", 0.1, 0.3, 0.9), (" forward.", 0.3, 0.8, 0.9)]
UNFINISHED = [(" Go", 0.1, 0.3, 0.9), (" forward", 0.3, 0.8, 0.9), (" and", 0.8, 0.9, 0.6)]


def make_cutter() -> UtteranceCutter[str]:
    endpointer = Endpointer(StreamingVAD(), threshold=0.5, silence_ms=SILENCE_MS, max_utterance_s=15, preroll_ms=450)
    return UtteranceCutter(endpointer, pause_ms=PAUSE_MS)


def speech_of(name: str) -> np.ndarray:
    """A recording's speech, without its leading and trailing silence."""
    pcm = load_audio(name)
    spans = speech_spans(pcm, pad_ms=0)
    return pcm[spans[0][0]:spans[-1][1]]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.int16)


class Feeder:
    """Feeds a recording to a cutter in 40 ms pieces, as a session feeds the stream."""

    def __init__(self, cutter: UtteranceCutter, pcm: np.ndarray):
        self.cutter, self.pcm, self.position = cutter, pcm, 0
        self.ended: list[Ended] = []

    def until(self, done, limit_s: float = 30.0) -> bool:
        """Feed until ``done()`` (checked after each piece, as the stream checks after each send)."""
        stop = min(self.pcm.size, self.position + int(limit_s * SAMPLE_RATE))
        while self.position < stop:
            self.ended += self.cutter.feed(self.pcm[self.position:self.position + PIECE])
            self.position += PIECE
            if done():
                return True
        return False

    def rest(self) -> None:
        self.until(lambda: False)


def pause_decode(feeder: Feeder, handle: str):
    """Feed until the cutter asks for a pause decode; start it as ``handle``."""
    offered = []
    assert feeder.until(lambda: offered.append(feeder.cutter.pause_to_decode()) or offered[-1] is not None)
    utterance = offered[-1]
    feeder.cutter.pause_decode_started(utterance, handle)
    return utterance


def two_sentences_and_a_pause_decode():
    """Two sentences 0.5 s apart (long enough a pause for a pause decode, too short to end the
    utterance), fed until the first pause's decode started."""
    cutter = make_cutter()
    pcm = np.concatenate([silence(0.5), speech_of("ss_0930.wav"), silence(0.5), speech_of("goforward.wav"),
                          silence(2.0)])
    feeder = Feeder(cutter, pcm)
    return cutter, feeder, pause_decode(feeder, "pause-1")


def test_a_pause_decode_that_ends_a_sentence_ends_the_utterance_in_its_pause():
    cutter = make_cutter()
    feeder = Feeder(cutter, np.concatenate([silence(0.5), speech_of("goforward.wav"), silence(2.0)]))
    heard = pause_decode(feeder, "pause-1")
    # Asked once the utterance paused endpoint_pause_ms, well before the silence would end it.
    assert feeder.ended == [] and heard.number == 1 and cutter.in_pause_of(heard)
    assert PAUSE_MS / 1000 <= cutter.endpointer.pause_seconds < SILENCE_MS / 1000
    assert heard.speech_seconds > 0.5 and heard.end == feeder.position
    assert cutter.pause_to_decode() is None                   # this pause has its decode
    feeder.until(lambda: feeder.position >= heard.end + 3 * PIECE)   # the decode takes 120 ms
    assert feeder.ended == [] and cutter.in_pause_of(heard)

    ended = cutter.pause_decode_back(heard, SENTENCE)
    # The utterance ends where the decoded audio ended, and that decode is its final.
    assert ended == Ended(heard, "pause-1")
    assert not cutter.in_utterance and cutter.pause is None
    feeder.rest()
    assert feeder.ended == []                                  # the rest of the silence ends nothing


def test_a_pause_decode_without_a_sentence_end_waits_for_the_silence_and_is_the_final():
    cutter = make_cutter()
    feeder = Feeder(cutter, np.concatenate([silence(0.5), speech_of("goforward.wav"), silence(2.0)]))
    heard = pause_decode(feeder, "pause-1")
    assert cutter.pause_decode_back(heard, UNFINISHED) is None     # mid-sentence: not cut
    assert cutter.pause_decode_back(heard, []) is None             # nothing heard: not cut either
    assert cutter.in_pause_of(heard)
    feeder.rest()
    # Only silence followed: the endpointer ended it after endpoint_silence_ms, and the pause
    # decode, which covered all of its speech, is the final (no second decode of the same words).
    [ended] = feeder.ended
    assert ended.decode == "pause-1" and ended.utterance is heard
    assert not cutter.in_utterance and cutter.pause is None


def test_speech_that_comes_back_during_the_pause_decode_keeps_the_utterance_open():
    cutter, feeder, first = two_sentences_and_a_pause_decode()
    assert feeder.until(lambda: not cutter.in_pause_of(first))    # the second sentence starts
    assert cutter.is_open(first) and cutter.utterance_number == first.number

    # The decode comes back ending a sentence, but speech came after its audio: no cut there.
    assert cutter.pause_decode_back(first, SENTENCE) is None
    assert cutter.is_open(first) and feeder.ended == []

    # The next pause of the same utterance is a new one: its decode is asked for again.
    second = pause_decode(feeder, "pause-2")
    assert second.number == first.number and second.speech_windows > first.speech_windows
    assert second.start == first.start and second.end > first.end + SAMPLE_RATE
    assert cutter.pause_decode_back(second, UNFINISHED) is None
    feeder.rest()
    [ended] = feeder.ended
    assert ended == Ended(second, "pause-2")           # both sentences, decoded once at the last pause


def test_an_utterance_with_speech_after_its_pause_decode_is_decoded_afresh():
    cutter, feeder, first = two_sentences_and_a_pause_decode()
    # The driver starts no decode at the second pause (say the engine is busy).
    feeder.rest()
    [ended] = feeder.ended
    assert ended.decode is None and ended.utterance.number == first.number
    assert ended.utterance.start == first.start and ended.utterance.speech_windows > first.speech_windows


def test_provisional_decodes_come_once_per_interval_of_new_speech():
    cutter = make_cutter()
    feeder = Feeder(cutter, np.concatenate([silence(0.5), speech_of("ss_0870.wav"), silence(2.0)]))
    offered = []

    def ask() -> bool:
        utterance = cutter.provisional_to_decode(1.0)
        if utterance is not None:
            offered.append(utterance)
        return cutter.paused

    assert feeder.until(ask)
    speech = [u.speech_windows * WINDOW_SECONDS for u in offered]
    assert len(offered) >= 4 and speech[0] >= PARTIAL_MIN_SECONDS
    assert all(b - a >= 1.0 for a, b in zip(speech, speech[1:]))
    assert all(u.number == 1 and u.start == offered[0].start for u in offered)
    # A pause decode counts as a decode of the open audio: no provisional one right after it.
    heard = cutter.pause_to_decode()
    cutter.pause_decode_started(heard, "pause-1")
    assert cutter.provisional_to_decode(0.1) is None


def test_the_stream_starts_a_pause_decode_only_when_no_final_or_provisional_decode_is_in_the_way():
    """``decode_due``, what WhisperStream (and the bench's replica) asks after each piece."""
    from harken.stt.whisper import PAUSE_DECODE, PROVISIONAL_DECODE, EngineLoad, decode_due

    cutter = make_cutter()
    feeder = Feeder(cutter, np.concatenate([silence(0.5), speech_of("ss_0870.wav"), silence(2.0)]))
    load = EngineLoad(workers=2)

    def due(**engine):
        facts = dict(finals_outstanding=0, partial_running=False, pause_running=False, partial_interval=1.0,
                     audio_ahead_s=0.0)
        return decode_due(cutter, load, now=0.0, **{**facts, **engine})

    # While someone speaks: a provisional decode, unless the engine is busy or the audio is ahead.
    assert feeder.until(lambda: cutter.endpointer.open_speech_windows * WINDOW_SECONDS >= 1.5)
    assert due(partial_running=True) is None and due(finals_outstanding=1) is None
    assert due(audio_ahead_s=2.0) is None and due(pause_running=True) is None
    kind, heard = due()
    assert kind == PROVISIONAL_DECODE and heard.end == feeder.position
    assert due() is None                         # the next one waits for another interval of speech

    assert feeder.until(lambda: cutter.paused)
    # The pause decode waits for the provisional decode in flight and for outstanding finals...
    assert due(partial_running=True) is None and due(finals_outstanding=1) is None
    load.started(), load.started()               # ...and for a free worker
    assert due() is None
    load.finished(0.3, now=0.0), load.finished(0.3, now=0.0)
    kind, heard = due()
    assert kind == PAUSE_DECODE and cutter.in_pause_of(heard)
