"""Send a speech engine only the audio with speech in it, without moving any word in time.

Cloud engines bill (and decode) every second they are sent, and most of a wearable's day is
silence: Omi measured about 79 % of its billed audio as silence before gating it
(reference/omi-listen-behaviour.md §10). ``VadGatedStream`` wraps any ``STTStream`` and follows
Omi's ``VADStreamingGate`` state machine, judged per 32 ms Silero window:

- SILENCE: nothing is sent; the last ``preroll_ms`` are kept.
- A window with speech probability above ``threshold`` → SPEECH: the pre-roll and the window go
  out, and a checkpoint records where this stretch starts in both time lines.
- A window without speech → HANGOVER: audio keeps going out (pauses inside a sentence are not
  cut); after ``finalize_ms`` of silence the engine is asked to ``finalize`` (so the last words
  come out now rather than when the next speech pushes them), and after ``silence_to_idle_ms``
  the gate closes (SILENCE again).
- While closed, if nothing has gone out for ``keepalive_s``, ``inner.keep_alive()`` is called
  (when the inner stream has one) so the provider does not hang up on an idle socket.

The inner engine's word times count only the audio it was sent. The gate maps them back onto
its own input's time line with the checkpoints (at most ``max_checkpoints``, oldest dropped), so
for the caller a gated stream reports the same times as an ungated one. If the VAD raises, the
gate fails open: it logs once and passes everything through from then on.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np

from ..audio.vad import WINDOW_SAMPLES, StreamingVAD
from .base import SAMPLE_RATE, Partial, STTStream, Word

log = logging.getLogger(__name__)

# A word reported this little before a checkpoint's stream position belongs after it: the
# engine placed its onset early, before the pre-roll (which after a long silence is partly
# used up by the VAD's own lag: ~0.2 s was measured on the development files). Without this the
# word would be mapped into the hang-over silence before the cut, seconds too early. Capped at
# half the hang-over, which is all silence, so a real word at its end is never moved.
_SNAP_SECONDS = 0.5


@dataclass
class GateStats:
    received_seconds: float = 0.0    # audio given to the gate
    forwarded_seconds: float = 0.0   # audio the inner stream was sent
    speech_seconds: float = 0.0      # windows the VAD judged speech
    finalizes: int = 0               # finalize() calls made on a pause
    keepalives: int = 0              # keep_alive() calls made while closed
    failed_open: bool = False        # the VAD raised; everything is passed through since

    @property
    def removed_share(self) -> float:
        """Share of the received audio that was not sent to the engine."""
        if not self.received_seconds:
            return 0.0
        return 1.0 - self.forwarded_seconds / self.received_seconds


_SILENCE, _SPEECH, _HANGOVER = "silence", "speech", "hangover"


class VadGatedStream(STTStream):
    """An ``STTStream`` that forwards only speech (plus pre-roll and hang-over) to ``inner``."""

    def __init__(
        self,
        inner: STTStream,
        vad: StreamingVAD | None = None,
        *,
        threshold: float = 0.65,
        preroll_ms: int = 300,
        finalize_ms: int = 300,
        silence_to_idle_ms: int = 4000,
        keepalive_s: float = 5.0,
        max_checkpoints: int = 500,
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
    ):
        self.inner = inner
        self.label = label                 # names the stream in the closing log line (a session id)
        self.stats = GateStats()
        self._vad = vad if vad is not None else StreamingVAD()
        self._threshold = threshold
        self._preroll = int(preroll_ms * SAMPLE_RATE / 1000)
        self._finalize_windows = _windows(finalize_ms)
        self._idle_windows = max(_windows(silence_to_idle_ms), self._finalize_windows)
        self._snap = min(_SNAP_SECONDS, silence_to_idle_ms / 2000) * SAMPLE_RATE
        self._keepalive_s = keepalive_s
        self._max_checkpoints = max_checkpoints
        self._clock = clock
        self._state = _SILENCE
        self._silent_windows = 0           # consecutive non-speech windows in HANGOVER
        self._finalized = False            # finalize() already sent for this pause
        # Input samples not yet forwarded or dropped, starting at input position _pending_start.
        self._pending = np.zeros(0, dtype=np.int16)
        self._pending_start = 0
        self._received = 0                 # input samples so far
        self._forwarded = 0                # samples sent to inner so far (its time line)
        self._judged = 0                   # input samples covered by judged windows
        # (inner position, input position) at each start of a forwarded stretch.
        self._stream_marks: list[int] = []
        self._input_marks: list[int] = []
        self._last_send = clock()

    @property
    def provider_name(self) -> str:          # a fallback chain's inner stream can switch provider
        return self.inner.provider_name

    def __getattr__(self, name: str):
        # Whatever else the inner stream offers (a FallbackStream's active_provider, switches,
        # lost_seconds) reads through the gate, so wrapping it changes nothing for the caller.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # -- STTStream -----------------------------------------------------------------------
    async def send(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if pcm.size == 0:
            return
        self._pending = np.concatenate((self._pending, pcm)) if self._pending.size else pcm
        self._received += pcm.size
        self.stats.received_seconds = self._received / SAMPLE_RATE
        if not self.stats.failed_open:
            try:
                probs = self._vad.process(pcm)
            except Exception:
                log.exception("VAD failed: the gate passes all audio through from now on")
                self.stats.failed_open = True
        if self.stats.failed_open:
            self._open_at(self._pending_start)
            await self._forward_until(self._received)
            return
        for prob in probs.tolist():
            window_start = self._judged
            self._judged += WINDOW_SAMPLES
            speech = prob > self._threshold
            if speech:
                self.stats.speech_seconds += WINDOW_SAMPLES / SAMPLE_RATE
            if self._state == _SILENCE:
                if speech:
                    self._open_at(max(self._pending_start, window_start - self._preroll))
                    self._state = _SPEECH
                continue
            if speech:
                self._state = _SPEECH
                continue
            if self._state == _SPEECH:
                self._state, self._silent_windows, self._finalized = _HANGOVER, 0, False
            self._silent_windows += 1
            if self._silent_windows >= self._finalize_windows and not self._finalized:
                # Exactly here, not at the end of the chunk: speech resuming later in the same
                # chunk must not be cut by this finalize.
                self._finalized = True
                await self._forward_until(self._judged)
                self.stats.finalizes += 1
                await self.inner.finalize()
            if self._silent_windows >= self._idle_windows:
                await self._forward_until(self._judged)      # the hang-over's last window
                self._state = _SILENCE
        if self._state != _SILENCE:
            await self._forward_until(self._judged)
        else:
            # Keep only the pre-roll of what was judged, and the part of a window not judged yet.
            self._drop_before(max(self._judged - self._preroll, self._pending_start))
            await self._maybe_keep_alive()

    async def finalize(self) -> None:
        # The caller wants every word so far: send what is held of an open stretch first.
        if self._state != _SILENCE or self.stats.failed_open:
            await self._forward_until(self._received)
        await self.inner.finalize()

    async def close(self) -> None:
        if self._state != _SILENCE or self.stats.failed_open:
            await self._forward_until(self._received)
        s = self.stats
        log.info("vad gate %s: received_s=%.2f forwarded_s=%.2f removed=%.1f%% speech_s=%.2f finalizes=%d "
                 "keepalives=%d failed_open=%s", self.label or "-", s.received_seconds, s.forwarded_seconds,
                 100 * s.removed_share, s.speech_seconds, s.finalizes, s.keepalives, s.failed_open)
        await self.inner.close()

    async def __aiter__(self) -> AsyncIterator[Word]:
        async for word in self.inner:
            if isinstance(word, Partial):
                yield Partial(tuple(self.remap(w) for w in word.words))
            else:
                yield self.remap(word)

    # -- time mapping --------------------------------------------------------------------
    def to_input_seconds(self, stream_seconds: float) -> float:
        """Where a point of the inner stream's time line lies on the gate's input time line."""
        if not self._stream_marks:
            return stream_seconds
        position = stream_seconds * SAMPLE_RATE
        index = bisect.bisect_right(self._stream_marks, position + self._snap) - 1
        if index < 0:
            index = 0
        stream_mark, input_mark = self._stream_marks[index], self._input_marks[index]
        return (input_mark + max(position - stream_mark, 0.0)) / SAMPLE_RATE

    def remap(self, word: Word) -> Word:
        """``word`` with its times moved from the inner stream's time line to the input's."""
        start = self.to_input_seconds(word.start)
        # The end moves with the start (a word never spans a cut: cuts are in long silences).
        return Word(word.text, round(start, 3), round(start + max(word.end - word.start, 0.0), 3),
                    word.speaker, word.confidence, word.language)

    # -- internals -----------------------------------------------------------------------
    def _open_at(self, input_position: int) -> None:
        """Start a forwarded stretch at ``input_position`` (a silence→speech edge)."""
        if self._stream_marks and self._input_marks[-1] - self._stream_marks[-1] == input_position - self._forwarded:
            return                         # contiguous with the last stretch: no new checkpoint
        self._stream_marks.append(self._forwarded)
        self._input_marks.append(input_position)
        if len(self._stream_marks) > self._max_checkpoints:
            del self._stream_marks[0], self._input_marks[0]
        self._drop_before(input_position)

    async def _forward_until(self, input_position: int) -> None:
        count = input_position - self._pending_start
        if count <= 0:
            return
        chunk = self._pending[:count]
        self._pending = self._pending[count:]
        self._pending_start = input_position
        self._forwarded += chunk.size
        self.stats.forwarded_seconds = self._forwarded / SAMPLE_RATE
        self._last_send = self._clock()
        await self.inner.send(chunk)

    def _drop_before(self, input_position: int) -> None:
        cut = input_position - self._pending_start
        if cut > 0:
            self._pending = self._pending[cut:]
            self._pending_start = input_position

    async def _maybe_keep_alive(self) -> None:
        keep_alive = getattr(self.inner, "keep_alive", None)
        if keep_alive is None:
            return
        now = self._clock()
        if now - self._last_send >= self._keepalive_s:
            self._last_send = now
            self.stats.keepalives += 1
            await keep_alive()


def _windows(ms: float) -> int:
    return max(1, int(np.ceil(ms / 1000 * SAMPLE_RATE / WINDOW_SAMPLES)))
