"""An ear for a fake provider that is sent pieces of a *known recording* (real speech), in order
but with parts left out, as a VAD gate sends it.

Timecode audio (``script.timecode``) says where it is, but no VAD would take it for speech. Real
speech says nothing about where it is, so this listener is given the recording and finds each
received stretch in it by content: the recording is dithered (``dithered``), which makes every 64
samples unique. It keeps the stretches (where in its own received audio each begins, and where
in the recording), and reports a scripted word (times on the recording's time line) once it has
heard the word's end plus ``delay``, timed on *its own* time line (seconds of audio received), as
a real engine times words on the audio it was sent. A word whose audio it heard less than half
of is not reported: a gate that cuts speech loses words here as it would with a real engine.

It offers what ``FakeDeepgram.session`` uses of ``script.Listener``: ``hear``, ``due``,
``settled``, ``now``, ``offset``, ``position``, ``origin``, ``received``, ``frames``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .script import BYTES_PER_SECOND, SAMPLE_RATE, ScriptWord

MATCH_SAMPLES = 64           # samples that must match to place a stretch in the recording


def dithered(pcm: np.ndarray, seed: int = 0, amplitude: int = 3) -> np.ndarray:
    """``pcm`` plus uniform noise of ±``amplitude`` LSB (about -80 dBFS: no VAD hears it)."""
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, pcm.size)
    return np.clip(pcm.astype(np.int32) + noise, -32768, 32767).astype(np.int16)


class RecordingListener:
    def __init__(self, recording: np.ndarray, script: list[ScriptWord], delay: float):
        self.recording, self.script, self.delay = recording, script, delay
        self.origin = 0                 # connection time is reported from the first sample received
        self.received = 0               # bytes
        self.frames = 0
        self.discontinuities = 0        # jumps within the recording (cuts of a gate)
        self.unmatched = 0              # samples not found in the recording
        # (received sample index, recording index, length) of each contiguous stretch heard
        self.stretches: list[list[int]] = []
        self._unplaced = np.zeros(0, dtype=np.int16)    # received, too short yet to place
        self._next = 0                  # first script word not reported yet

    # --- hearing --------------------------------------------------------------------------
    def hear(self, data: bytes) -> None:
        samples = np.frombuffer(data[: len(data) // 2 * 2], dtype=np.int16)
        self.received += samples.size * 2
        self.frames += 1
        self._place(samples)

    def _place(self, samples: np.ndarray, final: bool = False) -> None:
        pending = np.concatenate((self._unplaced, samples))
        at = self.received // 2 - pending.size          # received index of pending[0]
        while pending.size:
            if self.stretches:
                _, rec_start, length = self.stretches[-1]
                cursor = rec_start + length
                same = self.recording[cursor: cursor + pending.size]
                run = int(np.argmin(np.append(same == pending[: same.size], False)))
                if run:
                    self.stretches[-1][2] += run
                    pending, at = pending[run:], at + run
                    continue
            if pending.size < MATCH_SAMPLES and not final:
                break                                     # wait for enough samples to place them
            found = self._find(pending[:MATCH_SAMPLES])
            if found is None:
                self.unmatched += pending.size
                pending = pending[:0]
                break
            if self.stretches:
                self.discontinuities += 1
            self.stretches.append([at, found, 0])
        self._unplaced = pending

    def _find(self, probe: np.ndarray) -> int | None:
        rec = self.recording
        candidates = np.flatnonzero(rec[: rec.size - probe.size + 1] == probe[0])
        for j in range(1, probe.size):
            candidates = candidates[rec[candidates + j] == probe[j]]
            if candidates.size <= 1:
                break
        if candidates.size == 1 and np.array_equal(rec[candidates[0]: candidates[0] + probe.size], probe):
            return int(candidates[0])
        return None

    # --- time lines -------------------------------------------------------------------------
    def heard(self, start: int, end: int) -> int:
        """Samples of the recording's ``[start, end)`` that were received."""
        return sum(max(0, min(end, r + n) - max(start, r)) for _, r, n in self.stretches)

    def to_received(self, index: int) -> int:
        """Received index of recording ``index`` (in a cut: where the audio after the cut begins)."""
        for at, r, n in self.stretches:
            if index < r:
                return at
            if index < r + n:
                return at + index - r
        return self.received // 2

    @property
    def heard_until(self) -> int:
        """Recording index just after the last sample placed."""
        return self.stretches[-1][1] + self.stretches[-1][2] if self.stretches else 0

    @property
    def offset(self) -> float:
        return 0.0

    @property
    def now(self) -> float:
        return self.received / BYTES_PER_SECOND

    @property
    def position(self) -> float:
        return self.now

    # --- reporting ----------------------------------------------------------------------------
    def due(self, flush: bool = False) -> list[ScriptWord]:
        if flush and self._unplaced.size:
            self._place(np.zeros(0, dtype=np.int16), final=True)
        limit = self.received // 2 - (0 if flush else int(self.delay * SAMPLE_RATE))
        out = []
        while self._next < len(self.script):
            word = self.script[self._next]
            start, end = int(round(word.start * SAMPLE_RATE)), int(round(word.end * SAMPLE_RATE))
            if self.heard_until < end or self.to_received(end) > limit:
                break
            self._next += 1
            if self.heard(start, end) * 2 < end - start:
                continue                                  # mostly cut away: not heard
            begin = self.to_received(start)
            out.append(replace(word, start=round(begin / SAMPLE_RATE, 6),
                               end=round((begin + end - start) / SAMPLE_RATE, 6)))
        return out

    def settled(self, flush: bool = False) -> float:
        limit = self.now - (0.0 if flush else self.delay)
        if self._next < len(self.script):
            start = int(round(self.script[self._next].start * SAMPLE_RATE))
            if self.heard_until > start:
                limit = min(limit, self.to_received(start) / SAMPLE_RATE)
        return max(0.0, round(limit, 6))


# --- test recordings ------------------------------------------------------------------------------
@dataclass
class Joined:
    recording: np.ndarray                  # dithered int16, 16 kHz
    script: list[ScriptWord]               # the words, spread over each utterance's speech
    speech: list[tuple[float, float]]      # each utterance's speech (by energy), seconds of the recording

    @property
    def seconds(self) -> float:
        return self.recording.size / SAMPLE_RATE


def speech_span(pcm: np.ndarray, frame: int = 160, floor: float = 0.1) -> tuple[int, int]:
    """First and last sample of the 10 ms frames louder than ``floor`` × the clip's loud frames
    (its 95th percentile): where the talking is, measured without a VAD model."""
    count = pcm.size // frame
    rms = np.sqrt(np.mean(pcm[: count * frame].astype(np.float64).reshape(count, frame) ** 2, axis=1))
    loud = np.flatnonzero(rms > floor * np.percentile(rms, 95))
    return int(loud[0]) * frame, int(loud[-1] + 1) * frame


def speech_with_pauses(utterances: list[tuple[np.ndarray, str]], pause: float, *, lead: float = 1.0,
                       noise_rms: float = 20.0, seed: int = 0, speakers: int = 2) -> Joined:
    """``lead`` seconds of quiet noise, then each utterance followed by ``pause`` seconds of it
    (``noise_rms`` int16 RMS, about -64 dBFS: room hum, not speech). Each utterance's words are
    spread evenly over its speech span, in proportion to their length, as one sentence; utterances alternate
    between ``speakers`` speakers (so each becomes a segment of its own)."""
    rng = np.random.default_rng(seed)

    def quiet(seconds: float) -> np.ndarray:
        return np.clip(rng.normal(0.0, noise_rms, int(seconds * SAMPLE_RATE)), -32768, 32767).astype(np.int16)

    parts, script, speech = [quiet(lead)], [], []
    position = parts[0].size
    for n, (pcm, text) in enumerate(utterances):
        start, end = speech_span(pcm)
        words = text.split()
        words[0], words[-1] = words[0].capitalize(), words[-1] + "."      # a sentence each
        letters = np.cumsum([0] + [len(w) + 1 for w in words])
        span = (end - start) / SAMPLE_RATE
        base = (position + start) / SAMPLE_RATE
        for word, a, b in zip(words, letters[:-1], letters[1:]):
            script.append(ScriptWord(word, round(float(base + span * a / letters[-1]), 3),
                                     round(float(base + span * (b - 1) / letters[-1]), 3), n % speakers))
        speech.append((float(base), float(base + span)))
        parts += [pcm, quiet(pause)]
        position += pcm.size + parts[-1].size
    return Joined(dithered(np.concatenate(parts), seed), script, speech)
