"""Where the embedded engine's utterances end, and which open audio to decode before they do.

``UtteranceCutter`` is the embedded stream's cutting logic without I/O: no event loop, no
threads, no model. Whoever drives it (``WhisperStream`` on the event loop, the diarization
bench's offline replica on a simulated clock) feeds it audio, starts the decodes it asks for
however it likes, and reports back when a pause decode came back; the cutter says where
utterances end. So a change to the cutting reaches the gateway and the replica alike.

The rules (``whisper.py``'s module doc says why):

- The ``Endpointer`` ends an utterance after ``silence_ms`` of silence, or cuts a monologue
  at ``max_utterance_s`` (``feed``; ``flush`` ends the open one now).
- Once the open utterance has paused ``pause_ms``, its audio so far is due for a *pause
  decode* (``pause_to_decode``), once per pause. When that decode comes back while the
  utterance is still in the same pause (no speech since) and its text ends a sentence, the
  utterance ends there (``pause_decode_back``).
- An utterance that ends with exactly the speech a pause decode covered (only silence came
  after) reuses that decode as its final: the ``Ended`` event carries it.
- While someone speaks, the open audio is due for a *provisional decode* after each
  ``interval`` of new speech (``provisional_to_decode``); the driver decides the interval (it
  stretches with load) and whether to ask at all.

The decodes themselves are the driver's: the cutter keeps the handle it was given for the
pause decode (an ``asyncio.Future``, a cached result, ...) and hands it back in ``Ended``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Sequence, TypeVar

from ..audio import WINDOW_SECONDS, Endpointer, Utterance
from .base import SENTENCE_ENDERS
from .decoding import RawWord

# Whisper readily "transcribes" breaths, clicks and near-silence into stock phrases ("Thank you.",
# "you"); an utterance with less VAD-judged speech than this is not decoded at all.
MIN_SPEECH_SECONDS = 0.2
# A provisional decode needs this much open speech (shorter ones are mostly wrong).
PARTIAL_MIN_SECONDS = 0.8

Decode = TypeVar("Decode")


@dataclass(frozen=True)
class Ended(Generic[Decode]):
    """An utterance ended. ``decode`` is the pause decode that covered all of its speech (only
    silence came after): its result is the final's, and ``utterance`` is then the audio that
    decode was given (the words are placed on it), else the utterance the endpointer emitted."""

    utterance: Utterance
    decode: Decode | None = None


@dataclass(frozen=True)
class PauseDecode(Generic[Decode]):
    """The pause decode of the open utterance: its audio up to the pause, and the driver's handle."""

    utterance: Utterance
    decode: Decode


class UtteranceCutter(Generic[Decode]):
    """One stream's cuts (see the module doc). Not thread-safe: drive it from one thread."""

    def __init__(self, endpointer: Endpointer, *, pause_ms: int):
        self.endpointer = endpointer
        self._pause_s = pause_ms / 1000
        self.pause: PauseDecode[Decode] | None = None     # of the open utterance (or the one just ended)
        # (utterance number, its speech windows) at the open audio's last decode, pause or provisional.
        self._decoded: tuple[int, int] = (0, 0)

    # --- audio --------------------------------------------------------------------------
    def feed(self, pcm) -> list[Ended[Decode]]:
        """Take int16 samples; the utterances they ended (usually none)."""
        utterances = self.endpointer.feed(pcm)
        return [self._ended(u) for u in utterances] if utterances else []

    def flush(self) -> Ended[Decode] | None:
        """End the open utterance at the last sample received (None if none is open)."""
        utterance = self.endpointer.flush()
        return self._ended(utterance) if utterance is not None else None

    @property
    def in_utterance(self) -> bool:
        return self.endpointer.in_utterance

    @property
    def utterance_number(self) -> int:
        """The open (or last) utterance's number; a cut's rest is a new one."""
        return self.endpointer.utterance_number

    @property
    def paused(self) -> bool:
        """The open utterance has been silent for ``pause_ms`` (its pause decode is due or done)."""
        endpointer = self.endpointer
        return endpointer.in_utterance and endpointer.pause_seconds >= self._pause_s

    def is_open(self, utterance: Utterance) -> bool:
        """``utterance`` (audio of the open utterance) has not ended yet."""
        endpointer = self.endpointer
        return endpointer.in_utterance and endpointer.utterance_number == utterance.number

    def in_pause_of(self, utterance: Utterance) -> bool:
        """``utterance`` is still open and no speech came after its audio: a decode of it covers
        all the speech there is."""
        return self.is_open(utterance) and self.endpointer.open_speech_windows == utterance.speech_windows

    # --- pause decodes ------------------------------------------------------------------
    def pause_to_decode(self) -> Utterance | None:
        """The open utterance's audio if it has paused ``pause_ms``, this pause has no decode yet
        and it holds enough speech to decode; else None. Start its decode and report it with
        ``pause_decode_started`` (or do neither: it is offered again while the pause lasts)."""
        if not self.paused:
            return None
        pause = self.pause
        if pause is not None and self.in_pause_of(pause.utterance):
            return None                     # this pause is being (or was) decoded
        utterance = self.endpointer.open_audio()
        if utterance is None or utterance.speech_seconds < MIN_SPEECH_SECONDS:
            return None
        return utterance

    def pause_decode_started(self, utterance: Utterance, decode: Decode) -> None:
        """The driver started ``decode`` of ``utterance`` (from ``pause_to_decode``)."""
        self.pause = PauseDecode(utterance, decode)
        self._decoded = (utterance.number, utterance.speech_windows)

    def pause_decode_back(self, utterance: Utterance, raw_words: Sequence[RawWord]) -> Ended[Decode] | None:
        """A pause decode of ``utterance`` came back with ``raw_words``. If the utterance is still
        in that pause and the text ends a sentence, it ends there (returned; the decode is its
        final). Else None: the utterance goes on (the decode is a provisional one if speech came
        back, and still the final if only silence follows)."""
        if not self.in_pause_of(utterance):
            return None
        last = next((w[0].strip() for w in reversed(raw_words) if w[0].strip()), "")
        if last[-1:] not in SENTENCE_ENDERS:
            return None
        ended = self.endpointer.end_at(utterance.end)
        return self._ended(ended) if ended is not None else None

    # --- provisional decodes ------------------------------------------------------------
    def provisional_to_decode(self, interval: float) -> Utterance | None:
        """The open utterance's audio if at least ``interval`` seconds of speech came since its
        last decode (pause or provisional) and it holds ``PARTIAL_MIN_SECONDS`` of speech; else
        None. Returning it counts as starting its decode."""
        endpointer = self.endpointer
        if not endpointer.in_utterance:
            return None
        number, open_speech = endpointer.utterance_number, endpointer.open_speech_windows
        decoded_number, decoded = self._decoded
        since = open_speech - (decoded if decoded_number == number else 0)
        if since * WINDOW_SECONDS < interval or open_speech * WINDOW_SECONDS < PARTIAL_MIN_SECONDS:
            return None
        utterance = endpointer.open_audio()
        if utterance is not None:
            self._decoded = (number, open_speech)
        return utterance

    # --- internals ----------------------------------------------------------------------
    def _ended(self, utterance: Utterance) -> Ended[Decode]:
        """The endpointer closed ``utterance``: reuse a pause decode that covered all of its speech."""
        pause = self.pause
        if pause is not None and pause.utterance.number == utterance.number:
            self.pause = None
            if pause.utterance.speech_windows == utterance.speech_windows:
                return Ended(pause.utterance, pause.decode)
        return Ended(utterance)
