"""Voice activity: where in a PCM16 16 kHz stream someone is speaking.

Three layers, each usable alone:

- ``SileroVAD``: the Silero v6 ONNX model that faster-whisper ships, loaded once per process and
  shared by every stream (it is stateless; the recurrent state lives in the caller).
- ``StreamingVAD``: one per audio stream. Takes int16 chunks of any length, carries the model's
  64-sample context and LSTM state across calls, and returns one speech probability per
  512-sample (32 ms) window. A chunk's leftover samples wait for the next call, so the
  probabilities do not depend on how the stream was chunked.
- ``Endpointer``: turns a stream into utterances (pre-roll, end after a silence, cut of long
  monologues at the quietest recent window) for engines that decode whole utterances.

``speech_spans`` runs the model over one clip and returns its speech spans, for trimming
silence off enrolment clips and similar offline work.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from .onnx import SharedModel, single_thread_session

SAMPLE_RATE = 16000
WINDOW_SAMPLES = 512                 # the only window size Silero v6 accepts at 16 kHz
CONTEXT_SAMPLES = 64                 # tail of the previous window the model sees in front of each
WINDOW_SECONDS = WINDOW_SAMPLES / SAMPLE_RATE
_STATE_SHAPE = (1, 1, 128)
# Windows per model call: big enough to amortise the call overhead, small enough that a long
# clip does not allocate its whole activations at once.
_MAX_BATCH = 256
# Silero's own hysteresis: once speech has started, a window must fall this far below the
# threshold to count as silence, so a slightly weaker syllable does not start the endpoint timer.
_HYSTERESIS = 0.15


def _bundled_model_path() -> str:
    # faster-whisper ships the Silero v6 ONNX file: no second copy, no download. Locate it without
    # importing faster-whisper, whose import pulls in huggingface_hub, av and ctranslate2.
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Silero VAD model ships with faster-whisper: pip install faster-whisper")
    return os.path.join(next(iter(spec.submodule_search_locations)), "assets", "silero_vad_v6.onnx")


class SileroVAD(SharedModel):
    """The Silero v6 ONNX model in one onnxruntime session.

    Use ``SileroVAD.shared()`` to get the process-wide instance: the model is loaded on first use
    behind a lock. ``InferenceSession.run`` is thread-safe in onnxruntime, and the model carries
    no state between calls (``StreamingVAD`` passes it in and out), so concurrent streams, on the
    event loop or in worker threads, share one session without a lock around ``run``; a lock there
    would make the event loop wait for a long offline clip another thread is scanning.
    """

    def __init__(self, model_path: str | None = None):
        self._session = single_thread_session(model_path or _bundled_model_path())

    def run(self, windows: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Probabilities for ``windows`` (float32 [n, 64 + 512], consecutive), and the new state.

        The model runs its LSTM across the n rows in order, so one call with n windows equals n
        calls with one window each (and is about 1.5× cheaper per window).
        """
        probs, h, c = self._session.run(None, {"input": windows, "h": h, "c": c})
        return probs.reshape(-1), h, c

    def stream(self) -> "StreamingVAD":
        return StreamingVAD(self)


class StreamingVAD:
    """Speech probability per 32 ms window of one audio stream. Not thread-safe (one per stream)."""

    def __init__(self, model: SileroVAD | None = None):
        self._model = model or SileroVAD.shared()
        self._h = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        self._leftover = np.zeros(0, dtype=np.int16)
        self.windows_processed = 0

    def process(self, pcm: np.ndarray) -> np.ndarray:
        """Feed int16 samples; return the probabilities (float32) of the windows they completed.

        Window ``k`` of the stream covers samples ``[k * 512, (k + 1) * 512)``; the first value
        returned belongs to window ``windows_processed`` as it was before the call.
        """
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        samples = np.concatenate((self._leftover, pcm)) if self._leftover.size else pcm
        count = samples.size // WINDOW_SAMPLES
        used = count * WINDOW_SAMPLES
        self._leftover = samples[used:].copy()
        if count == 0:
            return np.zeros(0, dtype=np.float32)
        frames = samples[:used].astype(np.float32).reshape(count, WINDOW_SAMPLES) / 32768.0
        probs = [self._run(frames[i : i + _MAX_BATCH]) for i in range(0, count, _MAX_BATCH)]
        self.windows_processed += count
        return probs[0] if len(probs) == 1 else np.concatenate(probs)

    def _run(self, frames: np.ndarray) -> np.ndarray:
        batch = np.empty((len(frames), CONTEXT_SAMPLES + WINDOW_SAMPLES), dtype=np.float32)
        batch[:, CONTEXT_SAMPLES:] = frames
        batch[0, :CONTEXT_SAMPLES] = self._context
        batch[1:, :CONTEXT_SAMPLES] = frames[:-1, -CONTEXT_SAMPLES:]
        probs, self._h, self._c = self._model.run(batch, self._h, self._c)
        self._context = frames[-1, -CONTEXT_SAMPLES:].copy()
        return probs


def speech_spans(
    pcm: np.ndarray,
    threshold: float = 0.5,
    *,
    min_silence_ms: int = 300,
    pad_ms: int = 100,
    model: SileroVAD | None = None,
) -> list[tuple[int, int]]:
    """Speech in one clip, as ``(start_sample, end_sample)`` spans in order.

    Pauses shorter than ``min_silence_ms`` are bridged (they belong to the speech around them),
    and every span is widened by ``pad_ms`` on both sides so word edges the 32 ms windows miss are
    kept. An empty list means no speech. Trim a clip with
    ``np.concatenate([pcm[a:b] for a, b in speech_spans(pcm)])``.
    """
    pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
    vad = StreamingVAD(model)
    tail = (-pcm.size) % WINDOW_SAMPLES          # pad the last partial window so it is judged too
    probs = vad.process(np.concatenate((pcm, np.zeros(tail, dtype=np.int16))))
    return spans_from_probabilities(
        probs, threshold, total_samples=pcm.size, min_silence_ms=min_silence_ms, pad_ms=pad_ms
    )


def spans_from_probabilities(
    probs: np.ndarray,
    threshold: float,
    *,
    total_samples: int,
    min_silence_ms: int = 300,
    pad_ms: int = 100,
) -> list[tuple[int, int]]:
    """The pure half of ``speech_spans``: window probabilities → merged, padded sample spans."""
    speech = np.asarray(probs) >= threshold
    if not speech.any():
        return []
    # Edges of runs of speech windows, as window indices [start, end).
    padded = np.concatenate(([False], speech, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    runs = edges.reshape(-1, 2)
    merged: list[list[int]] = []
    for start, end in runs.tolist():
        if merged and (start - merged[-1][1]) * WINDOW_SECONDS * 1000 < min_silence_ms:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    pad = int(pad_ms * SAMPLE_RATE / 1000)
    spans: list[tuple[int, int]] = []
    for start, end in merged:
        a = max(0, start * WINDOW_SAMPLES - pad)
        b = min(total_samples, end * WINDOW_SAMPLES + pad)
        if spans and a <= spans[-1][1]:          # padding made two spans touch
            spans[-1] = (spans[-1][0], b)
        elif b > a:
            spans.append((a, b))
    return spans


# --- endpointing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    """A stretch of one stream to decode as a whole."""

    start: int               # first sample, counted from the stream's first sample
    pcm: np.ndarray          # int16
    speech_windows: int      # 32 ms windows the VAD judged speech
    number: int = 0          # the stream's utterances count from 1 (Endpointer.utterance_number)

    @property
    def end(self) -> int:
        return self.start + self.pcm.size

    @property
    def start_seconds(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def duration(self) -> float:
        return self.pcm.size / SAMPLE_RATE

    @property
    def speech_seconds(self) -> float:
        return self.speech_windows * WINDOW_SECONDS


class _SampleBuffer:
    """The recent samples of a stream, addressed by absolute sample index."""

    def __init__(self) -> None:
        self._data = np.zeros(SAMPLE_RATE, dtype=np.int16)
        self._len = 0
        self.start = 0              # absolute index of _data[0]

    @property
    def end(self) -> int:
        return self.start + self._len

    def append(self, pcm: np.ndarray) -> None:
        need = self._len + pcm.size
        if need > self._data.size:
            grown = np.zeros(max(need, 2 * self._data.size), dtype=np.int16)
            grown[: self._len] = self._data[: self._len]
            self._data = grown
        self._data[self._len : need] = pcm
        self._len = need

    def slice(self, start: int, end: int) -> np.ndarray:
        return self._data[start - self.start : end - self.start].copy()

    def drop_before(self, index: int) -> None:
        cut = min(max(index - self.start, 0), self._len)
        if cut:
            remaining = self._len - cut
            self._data[:remaining] = self._data[cut : self._len]
            self._len = remaining
            self.start += cut


class Endpointer:
    """Cuts one stream into utterances with a ``StreamingVAD``.

    - An utterance starts at the first window whose probability reaches ``threshold``, with
      ``preroll_ms`` of audio in front (the VAD fires a little after a soft onset), but never
      reaching back into the previous utterance.
    - It also starts after ``onset_windows`` windows in a row at ``onset_threshold`` or more, from
      the first of them. Silero scores band-limited telephone speech low: a caller on a phone line
      scores 0.25–0.47 through whole words, so with ``threshold`` alone no utterance starts and
      their words are never decoded. A run of such windows is rare in silence and noise (one
      window of a noise burst or a breath is not a run), and once started the utterance ends as
      any other (``silence_ms`` below the hysteresis).
    - It ends once ``silence_ms`` of non-speech followed it (the silence is kept: Whisper needs
      no trimming and the word times stay exact).
    - It is cut after ``max_utterance_s`` so a monologue without pauses is still decoded while it
      lasts. The cut goes through the middle of the quietest window of the last ``cut_search_s``
      (usually a pause between words), and the rest stays open as the next utterance.

    ``feed`` returns the utterances a chunk completed; ``flush`` ends the open one now.
    """

    def __init__(
        self,
        vad: StreamingVAD,
        *,
        threshold: float = 0.5,
        silence_ms: int = 500,
        max_utterance_s: float = 15.0,
        preroll_ms: int = 300,
        cut_search_s: float = 3.0,
        onset_threshold: float | None = None,
        onset_windows: int = 6,
    ):
        self._vad = vad
        self._threshold = threshold
        # None (or not below ``threshold``): only ``threshold`` starts an utterance.
        self._onset_threshold = onset_threshold if onset_threshold is not None and onset_threshold < threshold else None
        self._onset_windows = max(1, onset_windows)
        self._weak_run: list[float] = []     # between utterances: the latest windows at onset_threshold or more
        # What counts as speech inside an utterance (``Utterance.speech_windows``: an utterance with
        # too little is not decoded): with a weak onset, its windows too, or an utterance it
        # started would hold almost none. The silence that ends an utterance is unchanged.
        self._speech_floor = self._onset_threshold if self._onset_threshold is not None else threshold
        self._silence_threshold = max(threshold - _HYSTERESIS, 0.01)
        self._silence_windows = max(1, int(np.ceil(silence_ms / 1000 / WINDOW_SECONDS)))
        self._max_samples = max(int(max_utterance_s * SAMPLE_RATE), 2 * WINDOW_SAMPLES)
        self._preroll = int(preroll_ms * SAMPLE_RATE / 1000)
        self._cut_search = max(1, int(cut_search_s / WINDOW_SECONDS))
        self._buffer = _SampleBuffer()
        self._floor = 0                  # audio before this sample was already emitted
        self._active = False
        self._start = 0                  # open utterance's first sample
        self._probs: list[float] = []    # its windows' probabilities, from window _first_window
        self._first_window = 0
        self._silence_run = 0
        self.speech_windows = 0          # over the whole stream
        self.utterance_number = 0        # of the open (or last) utterance; a cut's rest is a new one
        self._open_speech = 0            # speech windows in _probs

    @property
    def samples_received(self) -> int:
        return self._buffer.end

    @property
    def in_utterance(self) -> bool:
        return self._active

    @property
    def pause_seconds(self) -> float:
        """How long the open utterance has been silent (0 while speech goes on or between utterances)."""
        return self._silence_run * WINDOW_SECONDS if self._active else 0.0

    @property
    def open_speech_windows(self) -> int:
        """Speech windows of the open utterance so far: unchanged through a pause, so a decode made
        in the pause still covers all of its speech if this has not moved when it ends."""
        return self._open_speech if self._active else 0

    def open_audio(self) -> Utterance | None:
        """The open utterance as heard so far (a copy), for a provisional decode; None between utterances."""
        if not self._active:
            return None
        return Utterance(self._start, self._buffer.slice(self._start, self._buffer.end), self.open_speech_windows,
                         self.utterance_number)

    def end_at(self, sample: int) -> Utterance | None:
        """End the open utterance at ``sample`` (a point of its current pause, e.g. where a decode
        found a finished sentence), without waiting for the rest of the silence. None if no
        utterance is open or ``sample`` is not inside the trailing pause."""
        if not self._active:
            return None
        pause_start = (self._first_window + len(self._probs) - self._silence_run) * WINDOW_SAMPLES
        if not pause_start <= sample <= self._buffer.end:
            return None
        windows = max(1, -(-(sample - self._first_window * WINDOW_SAMPLES) // WINDOW_SAMPLES))
        utterance = self._emit(sample, self._probs[:windows])
        self._active = False
        return utterance

    def feed(self, pcm: np.ndarray) -> list[Utterance]:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        first = self._vad.windows_processed
        self._buffer.append(pcm)
        probs = self._vad.process(pcm)
        done: list[Utterance] = []
        for offset, prob in enumerate(probs.tolist()):
            utterance = self._on_window(first + offset, prob)
            if utterance is not None:
                done.append(utterance)
        if not self._active:
            # Keep only what a future utterance's pre-roll may need (from the first window of a weak run).
            first_kept = (self._vad.windows_processed - len(self._weak_run)) * WINDOW_SAMPLES - self._preroll
            self._buffer.drop_before(max(self._floor, first_kept))
        return done

    def flush(self) -> Utterance | None:
        """End the open utterance at the last sample received (None if none is open)."""
        if not self._active:
            return None
        end = self._buffer.end
        utterance = self._emit(end, self._probs)
        self._active = False
        return utterance

    def _on_window(self, index: int, prob: float) -> Utterance | None:
        is_speech = prob >= self._threshold
        if is_speech:
            self.speech_windows += 1
        if not self._active:
            if self._onset_threshold is not None and prob >= self._onset_threshold:
                self._weak_run.append(prob)
            elif self._weak_run:
                self._weak_run.clear()
            if is_speech or len(self._weak_run) >= self._onset_windows:
                # A weak onset starts at the run's first window: its pre-roll reaches back from there.
                probs = self._weak_run if self._weak_run and not is_speech else [prob]
                first = index - len(probs) + 1
                self._active = True
                self.utterance_number += 1
                self._start = max(self._floor, first * WINDOW_SAMPLES - self._preroll, self._buffer.start)
                self._first_window = first
                self._probs = list(probs)
                self._open_speech = self._count_speech(probs)
                self._silence_run = 0
                self._weak_run.clear()
            return None
        self._probs.append(prob)
        if prob >= self._speech_floor:
            self._open_speech += 1
        if is_speech:
            self._silence_run = 0
        elif prob < self._silence_threshold or self._silence_run:
            self._silence_run += 1
        window_end = (index + 1) * WINDOW_SAMPLES
        if self._silence_run >= self._silence_windows:
            self._active = False
            return self._emit(window_end, self._probs)
        if window_end - self._start >= self._max_samples:
            return self._cut()
        return None

    def _cut(self) -> Utterance:
        """Split the open utterance at its quietest recent window; the rest stays open."""
        search_from = max(1, len(self._probs) - self._cut_search)     # never an empty first part
        recent = np.asarray(self._probs[search_from:])
        # Quietest window; among equals the latest, so the first part is as long as possible.
        quietest = search_from + len(recent) - 1 - int(np.argmin(recent[::-1]))
        cut = (self._first_window + quietest) * WINDOW_SAMPLES + WINDOW_SAMPLES // 2
        cut = max(cut, self._start + WINDOW_SAMPLES)
        utterance = self._emit(cut, self._probs[: quietest + 1])
        # The windows after the cut start the next utterance (still inside speech).
        self._start = cut
        self._probs = self._probs[quietest + 1 :]
        self._open_speech = self._count_speech(self._probs)
        self._first_window += quietest + 1
        self.utterance_number += 1
        return utterance

    def _count_speech(self, probs: list[float]) -> int:
        return sum(1 for p in probs if p >= self._speech_floor)

    def _emit(self, end: int, probs: list[float]) -> Utterance:
        utterance = Utterance(self._start, self._buffer.slice(self._start, end), self._count_speech(probs),
                              self.utterance_number)
        self._floor = end
        self._buffer.drop_before(end)
        return utterance
