"""The embedded speech engine: faster-whisper decoding VAD-endpointed utterances, fully offline.

Whisper is not a streaming model: every call decodes a (padded) window, costing about 0.3 s of
one core for tiny.en whatever the clip length with the full 30 s window (``reference/local-stt-engines.md``
§3); a stream's decodes give the encoder a 10 s window instead (``decoding.py``: a third of the
CPU, same WER on the dev clips), so a decode of an utterance costs ~0.1 s. A
stream cuts its audio into utterances with the Silero VAD (``harken.audio.Endpointer``, driven by
``cutting.UtteranceCutter``, which the diarization bench's replica drives too) and decodes each
utterance in a thread pool shared by all streams. ``send`` only runs the VAD (about
60 µs per 32 ms window) and starts decodes, so it never waits for the engine.

How an utterance becomes words (one stream):

- **Pause decode.** After ``endpoint_pause_ms`` of silence the open utterance is decoded at
  once. If its text ends a sentence, the utterance ends there: its words go out without waiting
  for the rest of the silence. If not, the stream waits for ``endpoint_silence_ms`` (a speaker
  pausing mid-sentence is not cut) and, when no speech came, uses that same decode as the final.
  If speech resumes, the decode served as a provisional one.
- **Provisional text** (``partial_interval``). While someone speaks, the open utterance is
  re-decoded about once per interval of speech; the words on which two consecutive decodes agree
  (LocalAgreement) are yielded as a ``Partial``, which only grows until the final words replace it.
- **Load.** Finals never wait for provisional work: provisional decodes run only when the pool
  has an idle worker and the engine's recent busy share is low, and their interval stretches
  with that share; pause decodes stop at a higher share (the final then waits for the silence).
- **No prompt from the previous text.** Giving the previous final text (200 characters) as the
  prompt measured worse: decoding the 16 dev recordings of ``tests/data/audio`` in order, WER
  9.4 % → 15.1 % and decode CPU ×2.2 (consecutive recordings there are unrelated sentences). Each
  utterance is decoded on its own; the longer hard-end silence and the sentence-end rule keep
  sentences whole instead.

One ``WhisperModel`` serves every stream; ``whisper_workers`` decodes run at once (the pool's
size and CTranslate2's ``num_workers``), and one stream's finals come out in stream-time order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

import numpy as np

from ..audio import WINDOW_SECONDS, Endpointer, SileroVAD, StreamingVAD, Utterance
from .base import EMBEDDED_PROVIDER, SAMPLE_RATE, Partial, Provider, StreamConfig, STTError, STTStream, Word
from .cutting import MIN_SPEECH_SECONDS, Ended, UtteranceCutter
from .decoding import Decoding, RawWord, decode, is_multilingual, utterance_lead
from .models import EMBEDDED_BASE, ModelError, load_whisper_model, resolve_model, resolve_multilingual, whisper_languages
from .priority import LiveFirstGate

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from ..config import Settings

log = logging.getLogger(__name__)

# Utterances waiting for a decode, per stream. Past this the server is far behind real time;
# the oldest are dropped (and counted) rather than letting memory grow without bound.
MAX_PENDING_UTTERANCES = 32
CLOSE_TIMEOUT_S = 30.0
# Audio kept before the VAD's first speech window. After earlier speech the VAD can fire 0.3 s into
# a soft first word ("Please…"): a 300 ms pre-roll then cut inside it and Whisper heard "Season
# to…" (3 of 16 streams of real prompts through the gateway). The stream's own cuts of real
# English prompts read one after another (4 s pauses), WER on 89 prompts / 96 held-out short ones:
# 300 ms 5.65 / 4.92 %, 375 ms 4.39 / 3.48 %, 450 ms 3.88 / 3.28 %, 600 ms 4.05 / 4.51 % (all with
# decoding.UTTERANCE_LEAD_S 0.3 s); 450 ms without that silence 3.29 / 2.87 % (whole files: 3.8 / 2.87 %).
PREROLL_MS = 450
# The multilingual model keeps the 300 ms it was measured with: with 450 ms, Swedish went from 7
# to 10 errors of 32 words through the gateway (bench_languages, fr 20 → 21, it 12 → 10 of ~168;
# too few words to say more than that it did not gain as English did).
MULTILINGUAL_PREROLL_MS = 300


def preroll_ms(model: "WhisperModel | None") -> int:
    """The audio an utterance of ``model`` keeps before the VAD's first speech window."""
    return MULTILINGUAL_PREROLL_MS if model is not None and is_multilingual(model) else PREROLL_MS


def endpointer_for(settings: "Settings", vad: StreamingVAD, model: "WhisperModel | None") -> Endpointer:
    """The endpointer of a stream decoded by ``model``, with the server's settings (live streams,
    uploads and the benches cut alike)."""
    return Endpointer(vad, threshold=settings.vad_threshold, silence_ms=settings.endpoint_silence_ms,
                      max_utterance_s=settings.max_utterance_s, preroll_ms=preroll_ms(model),
                      onset_threshold=settings.vad_onset_threshold or None,
                      onset_windows=round(settings.vad_onset_ms / 1000 / WINDOW_SECONDS))


def utterance_cutter(settings: "Settings", vad: StreamingVAD, model: "WhisperModel | None") -> UtteranceCutter:
    """A live stream's cuts (``cutting.py``): its endpointer and the sentence-end pause."""
    return UtteranceCutter(endpointer_for(settings, vad, model), pause_ms=settings.endpoint_pause_ms)


# Provisional work gives way to finals: the engine's busy share (decode seconds over worker
# seconds, last LOAD_WINDOW_S) above which provisional decodes stop, and pause decodes stop.
LOAD_WINDOW_S = 5.0
PARTIAL_MAX_LOAD = 0.5
PAUSE_DECODE_MAX_LOAD = 0.85
# Audio sent faster than real time (a file, a client catching up) by more than this many seconds
# gets no provisional decodes: its finals come sooner than any provisional text could.
AHEAD_OF_REAL_TIME_S = 1.0
# No provisional decodes while one decode takes longer than this many partial_intervals (wall
# time, a moving average): the text would come long after the speech had moved on, and on a
# starved CPU they slow the finals. (Unloaded, tiny.en takes ~0.35 s.)
PARTIAL_MAX_DECODE_INTERVALS = 2.0


class EngineLoad:
    """How busy the decode pool is: decodes in flight and the recent busy share (event-loop side)."""

    def __init__(self, workers: int, window: float = LOAD_WINDOW_S):
        self.workers = workers
        self.window = window
        self.in_flight = 0
        self._done: collections.deque[tuple[float, float]] = collections.deque()   # (finished at, seconds)
        self.typical_decode = 0.0        # moving average of one decode's wall seconds

    def started(self) -> None:
        self.in_flight += 1

    def finished(self, seconds: float, now: float | None = None) -> None:
        self.in_flight -= 1
        self._done.append((time.monotonic() if now is None else now, seconds))
        self.typical_decode += (seconds - self.typical_decode) * (0.3 if self.typical_decode else 1.0)

    def busy_share(self, now: float | None = None) -> float:
        """Decode seconds finished in the last ``window`` over the workers' seconds, plus the
        workers busy right now (so a burst counts before its decodes end), capped at 1."""
        now = time.monotonic() if now is None else now
        while self._done and self._done[0][0] < now - self.window:
            self._done.popleft()
        finished = sum(seconds for _, seconds in self._done) / (self.window * self.workers)
        return min(1.0, finished + self.in_flight / self.workers * 0.5)

    @property
    def idle_worker(self) -> bool:
        return self.in_flight < self.workers


PAUSE_DECODE, PROVISIONAL_DECODE = "pause", "provisional"


def decode_due(cutter: UtteranceCutter, load: EngineLoad, *, now: float, finals_outstanding: int,
               partial_running: bool, pause_running: bool, partial_interval: float,
               audio_ahead_s: float) -> tuple[str, Utterance] | None:
    """Which decode of a stream's open utterance to start after new audio, given the engine's
    load: ``(PAUSE_DECODE, audio)`` when a pause began, else maybe ``(PROVISIONAL_DECODE,
    audio)``; None. ``now`` is ``load``'s clock; ``audio_ahead_s`` how far the audio received is
    ahead of the time since the stream opened. ``WhisperStream`` asks after every piece of audio;
    the diarization bench's replica asks the same on its simulated clock."""
    if finals_outstanding or not load.idle_worker:
        return None                        # finals first; nothing provisional queues behind them
    busy = load.busy_share(now)
    if cutter.paused:
        if busy <= PAUSE_DECODE_MAX_LOAD and not partial_running:
            utterance = cutter.pause_to_decode()      # None once this pause has its decode
            if utterance is not None:
                return PAUSE_DECODE, utterance
        return None
    if not partial_interval or partial_running or busy > PARTIAL_MAX_LOAD:
        return None
    if audio_ahead_s > AHEAD_OF_REAL_TIME_S:
        return None
    if load.typical_decode > PARTIAL_MAX_DECODE_INTERVALS * partial_interval:
        return None
    if pause_running:
        return None
    # Fewer provisional decodes as the engine gets busier.
    utterance = cutter.provisional_to_decode(partial_interval * (1 + 4 * busy))
    return (PROVISIONAL_DECODE, utterance) if utterance is not None else None


class WhisperProvider(Provider):
    """The local engine. ``await load()`` once at start-up (it is also done by the first ``open``)."""

    name = EMBEDDED_PROVIDER

    def __init__(self, settings: "Settings", *, executor: Executor | None = None):
        """``executor`` runs the loading and the decodes instead of a pool of ``whisper_workers``
        threads of the provider's own (the batch engine passes its low-priority pool); the
        provider then leaves shutting it down to its owner."""
        self.settings = settings
        self._model: "WhisperModel | None" = None
        self._vad: SileroVAD | None = None
        workers = max(1, settings.whisper_workers)
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(max_workers=workers, thread_name_prefix="whisper")
        self.load_state = EngineLoad(workers)
        # Held for every decode queued here: batch transcription waits while any is (priority.py).
        self.live_gate = LiveFirstGate()
        self._load_lock = asyncio.Lock()
        try:
            self._english_only_guess = resolve_model(settings.whisper_model).english_only
        except ModelError:
            self._english_only_guess = True      # load() will report the problem
        # The multilingual model (other languages and multi), when the main one is English-only:
        # located (joined, verified) at load(), loaded at the first session that needs it.
        self._multi_model: "WhisperModel | None" = None
        self._multi_location: str | None = None
        self.multilingual_problem: str | None = None     # why there is none (start-up log, /readyz)
        self.allowed_languages = tuple(
            code for code in (c.strip().lower() for c in settings.whisper_languages.split(",")) if code)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    async def load(self) -> None:
        """Load the model and the VAD in a worker thread, and warm the model up. Idempotent.

        Raises ``ModelError`` (not retryable) if the configured model cannot be loaded offline.
        """
        async with self._load_lock:
            if self._model is not None:
                return
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            model, vad = await loop.run_in_executor(
                self._executor, lambda: (load_whisper_model(self.settings), SileroVAD.shared()))
            self._model, self._vad = model, vad
            if not model.model.is_multilingual:
                await loop.run_in_executor(self._executor, self._locate_multilingual)
            # CTranslate2 allocates its buffers on the first decode: pay that now, not on a user's
            # utterance, on every worker (each has its own replica of the model: decodes at once).
            silence = np.zeros(SAMPLE_RATE, dtype=np.int16)
            await asyncio.gather(*(loop.run_in_executor(self._executor, self.transcribe_clip, silence)
                                   for _ in range(self.load_state.workers)))
            log.info("local STT: whisper_model=%s (%s, %d thread(s) per decode, %d decode(s) at once) "
                     "ready in %.1f s",
                     self.settings.whisper_model, self.settings.whisper_compute_type, self.settings.whisper_threads,
                     self.settings.whisper_workers, time.perf_counter() - started)

    def _locate_multilingual(self) -> None:
        """Find (join and verify) the multilingual model; its absence turns the feature off, once."""
        try:
            self._multi_location = resolve_multilingual(self.settings)
            if self._multi_location is not None and self.settings.whisper_multilingual_model.strip() != EMBEDDED_BASE:
                # A model the operator named: load it now, so a wrong name is reported at start-up.
                self._multi_model = load_whisper_model(self.settings, self._multi_location)
        except ModelError as exc:
            self._multi_location = None
            self.multilingual_problem = str(exc)
        else:
            if self._multi_location is None:
                self.multilingual_problem = "whisper_multilingual_model is empty"
        if self.multilingual_problem:
            log.warning("local STT: no multilingual model (%s): only English is transcribed locally; "
                        "other languages and multi are served as English", self.multilingual_problem)

    @property
    def _main_multilingual(self) -> bool:
        return self._model.model.is_multilingual if self._model is not None else not self._english_only_guess

    @property
    def _has_multilingual(self) -> bool:
        if self._main_multilingual:
            return True
        if self._model is None:         # before load(): guessed from the settings
            return bool(self.settings.whisper_multilingual_model.strip())
        return self._multi_location is not None

    def supports(self, language: str) -> bool:
        """English (``en``, ``en-*``) always; every Whisper language (any region) and ``multi``
        (language identified per utterance) when a multilingual model is there: the main one, or
        ``whisper_multilingual_model`` beside an English-only main model.

        Before ``load`` the kind of model is guessed from its name; after, the model is asked.
        """
        if _base_language(language) == "en":
            return True
        if not self._has_multilingual:
            return False
        return language == "multi" or _base_language(language) in whisper_languages()

    def describe(self, language: str) -> str:
        if self._uses_main_model(language):
            model = self.settings.whisper_model
        else:
            model = self.settings.whisper_multilingual_model
        if language == "multi":
            among = f" among {', '.join(self.allowed_languages)}" if self.allowed_languages else ""
            return f"{self.name} (whisper {model}, language identified per utterance{among})"
        return f"{self.name} (whisper {model})"

    def _uses_main_model(self, language: str) -> bool:
        # English keeps the main model (tiny.en by default: faster); the rest need a multilingual one.
        return self._main_multilingual or (language != "multi" and _base_language(language) == "en")

    async def model_for(self, language: str) -> "WhisperModel":
        """The model that serves ``language`` (a code or ``multi``), loaded on first use."""
        await self.load()
        if self._uses_main_model(language):
            assert self._model is not None
            return self._model
        async with self._load_lock:
            if self._multi_model is None:
                if self._multi_location is None:
                    raise STTError(f"no multilingual model: {self.multilingual_problem}", retryable=False,
                                   code="language")
                started = time.perf_counter()
                loop = asyncio.get_running_loop()
                self._multi_model = await loop.run_in_executor(
                    self._executor, load_whisper_model, self.settings, self._multi_location)
                log.info("local STT: multilingual model %s loaded in %.1f s",
                         self.settings.whisper_multilingual_model, time.perf_counter() - started)
            return self._multi_model

    async def open(self, config: StreamConfig) -> "WhisperStream":
        if config.sample_rate != SAMPLE_RATE:
            raise STTError(f"the local engine takes {SAMPLE_RATE} Hz audio, not {config.sample_rate}",
                           retryable=False)
        if not self.supports(config.language):
            raise STTError(f"whisper_model={self.settings.whisper_model} does not support language "
                           f"{config.language!r}", retryable=False, code="language")
        model = await self.model_for(config.language)
        assert self._vad is not None
        language = None if config.language == "multi" else _base_language(config.language)
        decoding = Decoding(language, self.allowed_languages if language is None else (), tuple(config.vocabulary),
                            window_s=self.settings.whisper_window_s, lead_s=utterance_lead(model))
        return WhisperStream(self, config, decoding, StreamingVAD(self._vad), model)

    async def aclose(self) -> None:
        self.live_gate.close()
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- used by WhisperStream ----------------------------------------------------------
    def submit(self, pcm: np.ndarray, decoding: Decoding, model: "WhisperModel | None" = None) -> asyncio.Future:
        """Queue one decode in the pool; the future gives ``decode_clip``'s result."""
        loop = asyncio.get_running_loop()
        self.live_gate.hold()
        try:
            future = loop.run_in_executor(self._executor, self.decode_clip, pcm, decoding, model)
        except BaseException:
            self.live_gate.release()
            raise
        self.load_state.started()

        def done(f: asyncio.Future) -> None:
            self.live_gate.release()
            seconds = f.result()[1] if not f.cancelled() and f.exception() is None else 0.0
            self.load_state.finished(seconds)

        future.add_done_callback(done)
        return future

    def decode_clip(self, pcm: np.ndarray, decoding: Decoding,
                    model: "WhisperModel | None" = None) -> tuple[list[RawWord], float, str | None]:
        """Decode one int16 clip in the calling thread (blocking; streams run it in the pool).

        Returns Whisper's words as (text, start, end, probability), times in seconds of the clip,
        the seconds the decode took, and the language when it was identified (``multi``).
        ``model`` defaults to the main model; needs ``load()`` first.
        """
        model = model or self._model
        if model is None:
            raise STTError("WhisperProvider.load() has not been awaited", retryable=False)
        started = time.perf_counter()
        words, identified = decode(model, pcm.astype(np.float32) / 32768.0, decoding,
                                   beam_size=self.settings.whisper_beam_size)
        return words, time.perf_counter() - started, identified

    def transcribe_clip(self, pcm: np.ndarray, language: str | None = "en") -> tuple[list[RawWord], float]:
        """``decode_clip`` with the main model and just a language: (words, decode seconds)."""
        words, seconds, _ = self.decode_clip(pcm, Decoding(language))
        return words, seconds


@dataclass
class StreamStats:
    """Usage of one stream, for usage logs and metrics."""

    audio_seconds: float = 0.0       # received
    speech_seconds: float = 0.0      # judged speech by the VAD
    utterances: int = 0              # endpointed
    skipped_utterances: int = 0      # too little speech to be worth a decode
    dropped_utterances: int = 0      # discarded because decoding fell too far behind
    decodes: int = 0                 # final decodes (a reused pause decode counts once)
    decode_seconds: float = 0.0      # time spent inside Whisper, every kind of decode
    words: int = 0
    pause_decodes: int = 0           # decodes started at a pause
    pause_finals: int = 0            # of which became the final (sentence end or silence)
    partial_decodes: int = 0         # provisional decodes while speech went on
    partials: int = 0                # Partial updates yielded


class LocalAgreement:
    """The provisional words of one utterance: the longest prefix two consecutive decodes agree
    on (compared without case and punctuation); of the first decode, all but its last
    ``FIRST_HOLD_BACK`` words (the end of a clip cut mid-word is what changes; on a loaded machine
    a second decode may come too late to show anything while the words are spoken).

    Words two decodes agreed on are *confirmed* and never taken back: a later decode that
    disagrees with them adds nothing until the final replaces them. The first decode's words are
    a guess: when two later decodes agree on something else, that replaces them. (Keeping the
    guess blocked the rest of the utterance: on a 5.5 s sentence a first decode of 1.6 s of audio
    showed "How do you marry the" for "Had he married", and nothing more came until the final.)"""

    FIRST_HOLD_BACK = 2

    def __init__(self) -> None:
        self._previous: list[Word] | None = None
        self.shown: list[Word] = []
        self.confirmed = 0               # leading shown words two decodes agreed on

    def update(self, words: list[Word]) -> bool:
        """Take a new decode; True if the shown words changed."""
        previous, self._previous = self._previous, words
        if previous is None:
            candidate, confirms = words[:max(0, len(words) - self.FIRST_HOLD_BACK)], False
        else:
            agreed = 0
            for a, b in zip(previous, words):
                if _comparable(a.text) != _comparable(b.text):
                    break
                agreed += 1
            candidate, confirms = words[:agreed], True
        if not _same(candidate[:self.confirmed], self.shown[:self.confirmed]) or len(candidate) < self.confirmed:
            return False                 # it contradicts (or does not reach) confirmed words
        consistent = _same(candidate[:len(self.shown)], self.shown[:len(candidate)])
        if consistent and len(candidate) <= len(self.shown):
            if confirms:
                self.confirmed = len(candidate)
            return False                 # nothing new
        if not consistent and not confirms:
            return False                 # one decode does not overrule what is shown
        self.shown = list(candidate) if not consistent else self.shown + list(candidate[len(self.shown):])
        if confirms:
            self.confirmed = len(candidate)
        return True


def _same(a: list[Word], b: list[Word]) -> bool:
    return [_comparable(w.text) for w in a] == [_comparable(w.text) for w in b]


def _comparable(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


@dataclass
class _Job:
    """One final decode, in the stream's order; ``decode`` is a pause decode of the same speech."""

    utterance: Utterance
    decode: asyncio.Future | None = None


_END = object()


class WhisperStream(STTStream):
    """One stream on the local engine (use from one event loop)."""

    provider_name = EMBEDDED_PROVIDER
    immediate_send = True            # send only runs the VAD; decodes happen in the pool

    def __init__(self, provider: WhisperProvider, config: StreamConfig, decoding: Decoding, vad: StreamingVAD,
                 model: "WhisperModel | None" = None):
        settings = provider.settings
        self._provider = provider
        self._config = config
        self._decoding = decoding
        self._model = model
        # Where utterances end, and which open audio to decode when; its pause decodes are futures.
        self._cutter: UtteranceCutter[asyncio.Future] = utterance_cutter(settings, vad, model)
        self._partial_interval = settings.partial_interval
        self.stats = StreamStats()
        self._pending: collections.deque[_Job] = collections.deque()
        self._finals_outstanding = 0      # queued or decoding
        self._wakeup = asyncio.Event()
        self._out: asyncio.Queue = asyncio.Queue()
        self._closing = False
        self._error: STTError | None = None
        self._last_end = 0.0
        # The open utterance's provisional work (its pause decode is the cutter's).
        self._partial: asyncio.Future | None = None
        self._partial_number = 0          # utterance the agreement belongs to
        self._agreement = LocalAgreement()
        self._shown_number = 0            # utterance whose Partial the consumer holds (0 = none)
        self._opened_at = time.monotonic()
        self._worker = asyncio.get_running_loop().create_task(self._decode_in_order())

    # --- STTStream ----------------------------------------------------------------------
    async def send(self, pcm: np.ndarray) -> None:
        self.send_nowait(pcm)

    def send_nowait(self, pcm: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise STTError("send() on a closed local stream", retryable=False)
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        self.stats.audio_seconds += pcm.size / SAMPLE_RATE
        for ended in self._cutter.feed(pcm):
            self._ended(ended)
        self.stats.speech_seconds = self._cutter.endpointer.speech_windows * WINDOW_SECONDS
        try:
            self._provisional_work()
        except RuntimeError:               # the pool is shut down: the final decode will report it
            log.debug("local STT %s: no provisional decode, the pool is closed", self._config.session_id)

    async def finalize(self) -> None:
        """End the open utterance now and queue its decode; its words follow through iteration."""
        if self._error is not None:
            raise self._error
        ended = self._cutter.flush()
        if ended is not None:
            self._ended(ended)

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finalize, wait for the queued decodes, then end the iteration.

        The wait ends early only when no decode finished for ``timeout`` s (the engine is stuck):
        a server far behind real time still owes a client that hung up every queued utterance,
        and the queue is bounded (``MAX_PENDING_UTTERANCES``), so the wait is too."""
        if not self._closing:
            ended = self._cutter.flush()
            if ended is not None:
                self._ended(ended)
            self._closing = True
            self._wakeup.set()
        progress = self.stats.decodes, len(self._pending)
        try:
            while True:
                done, _ = await asyncio.wait({self._worker}, timeout=timeout)
                if done:
                    return
                if (self.stats.decodes, len(self._pending)) == progress:
                    break
                progress = self.stats.decodes, len(self._pending)
        except asyncio.CancelledError:
            self._worker.cancel()
            raise
        self._worker.cancel()
        self._finish(STTError(f"local decoding made no progress for {timeout:g} s after close "
                              f"({len(self._pending)} utterances still queued)"))

    async def __aiter__(self) -> AsyncIterator[Word | Partial]:
        while True:
            item = await self._out.get()
            if item is _END or isinstance(item, STTError):
                self._out.put_nowait(item)        # every later iteration ends the same way
                if item is _END:
                    return
                raise item
            yield item

    @property
    def pending_decodes(self) -> int:
        return len(self._pending)

    # --- internals: finals --------------------------------------------------------------
    def _ended(self, ended: Ended[asyncio.Future]) -> None:
        """The cutter closed an utterance: its final decode, or the pause decode that covered all
        of its speech (only silence came after it)."""
        if ended.decode is not None:
            self.stats.pause_finals += 1
        self._queue(_Job(ended.utterance, ended.decode))

    def _queue(self, job: _Job) -> None:
        self.stats.utterances += 1
        utterance = job.utterance
        if utterance.speech_seconds < MIN_SPEECH_SECONDS:
            self.stats.skipped_utterances += 1
            self._withdraw_partial(utterance.number)
            return
        if len(self._pending) >= MAX_PENDING_UTTERANCES:
            dropped = self._pending.popleft()
            self._finals_outstanding -= 1
            self.stats.dropped_utterances += 1
            log.warning("local STT %s: decoding is %d utterances behind; dropped %.1f s of audio at %.1f s",
                        self._config.session_id, MAX_PENDING_UTTERANCES, dropped.utterance.duration,
                        dropped.utterance.start_seconds)
        self._pending.append(job)
        self._finals_outstanding += 1
        self._wakeup.set()

    async def _decode_in_order(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    self._finish(_END)
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            job = self._pending.popleft()
            utterance = job.utterance
            reused = job.decode is not None          # a pause decode serves as the final
            try:
                if job.decode is None:
                    job.decode = self._submit(utterance)
                raw_words, _seconds, language = await job.decode
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():       # close() gave up on us: just stop
                    raise
                # The pool dropped our queued decode (provider shut down): end the stream visibly.
                self._finish(STTError("local decode cancelled: the engine was shut down"))
                return
            except Exception as exc:
                log.warning("local STT %s: decode failed: %r", self._config.session_id, exc)
                self._finish(STTError(f"local Whisper decode failed: {type(exc).__name__}: {exc}"))
                return
            finally:
                self._finals_outstanding -= 1
            self.stats.decodes += 1
            words = place_words(raw_words, utterance, self._last_end, language)
            if log.isEnabledFor(logging.DEBUG):
                # Where the stream cut (a late cut drops a first word); the words stay out of logs.
                log.debug("local STT %s: utterance %d %.3f-%.3f s, %d speech windows%s: %d words",
                          self._config.session_id, utterance.number, utterance.start_seconds,
                          utterance.start_seconds + utterance.duration, utterance.speech_windows,
                          ", pause decode" if reused else "", len(words))
            for word in words:
                self._last_end = word.end
                self.stats.words += 1
                self._out.put_nowait(word)
            self._withdraw_partial(utterance.number)

    def _submit(self, utterance: Utterance) -> asyncio.Future:
        future = self._provider.submit(utterance.pcm, self._decoding, self._model)

        def count(f: asyncio.Future) -> None:
            if not f.cancelled() and f.exception() is None:
                self.stats.decode_seconds += f.result()[1]

        future.add_done_callback(count)
        return future

    def _withdraw_partial(self, number: int) -> None:
        """The utterance ``number`` is final (or dropped): its provisional words are no longer shown."""
        if self._shown_number and self._shown_number <= number:
            self._shown_number = 0
            self._out.put_nowait(Partial())

    def _finish(self, item: object) -> None:
        if isinstance(item, STTError):
            self._error = item
        self._out.put_nowait(item)

    # --- internals: provisional decodes -------------------------------------------------
    def _provisional_work(self) -> None:
        """After new audio: a pause decode when a pause began, else maybe a provisional decode."""
        cutter = self._cutter
        if not cutter.in_utterance or self._closing:
            return
        number = cutter.utterance_number
        if number != self._partial_number:
            self._partial_number = number
            self._agreement = LocalAgreement()
        now = time.monotonic()
        pause = cutter.pause
        due = decode_due(cutter, self._provider.load_state, now=now, finals_outstanding=self._finals_outstanding,
                         partial_running=self._partial is not None,
                         pause_running=pause is not None and not pause.decode.done(),
                         partial_interval=self._partial_interval,
                         audio_ahead_s=self.stats.audio_seconds - (now - self._opened_at))
        if due is None:
            return
        kind, utterance = due
        if kind is PAUSE_DECODE:
            self._start_pause_decode(utterance)
            return
        self.stats.partial_decodes += 1
        self._partial = self._submit(utterance)
        self._partial.add_done_callback(lambda f: self._on_partial_decode(utterance, f))

    def _start_pause_decode(self, utterance: Utterance) -> None:
        future = self._submit(utterance)
        self._cutter.pause_decode_started(utterance, future)
        self.stats.pause_decodes += 1
        future.add_done_callback(lambda f: self._on_pause_decode(utterance, f))

    def _on_partial_decode(self, utterance: Utterance, future: asyncio.Future) -> None:
        self._partial = None
        self._take_provisional(utterance, future)

    def _on_pause_decode(self, utterance: Utterance, future: asyncio.Future) -> None:
        """A pause decode is back. If the utterance is still open in the same pause and the text
        ends a sentence, the cutter ends the utterance there: this decode is its final."""
        same_pause = self._cutter.in_pause_of(utterance)
        if same_pause and not future.cancelled() and future.exception() is None and not self._closing:
            ended = self._cutter.pause_decode_back(utterance, future.result()[0])
            if ended is not None:
                self._ended(ended)
                return
        if not same_pause:
            self._take_provisional(utterance, future)

    def _take_provisional(self, utterance: Utterance, future: asyncio.Future) -> None:
        """A provisional decode of the open utterance: its agreed words become the shown Partial."""
        if future.cancelled() or future.exception() is not None or self._closing:
            return
        raw_words, _seconds, language = future.result()
        if not self._cutter.is_open(utterance):
            return                          # the utterance ended meanwhile: its final takes over
        if utterance.number != self._partial_number:
            return
        words = place_words(raw_words, utterance, self._last_end, language)
        if self._agreement.update(words):
            self._shown_number = utterance.number
            self.stats.partials += 1
            self._out.put_nowait(Partial(tuple(self._agreement.shown)))


def place_words(raw_words: list[RawWord], utterance: Utterance, not_before: float,
                language: str | None = None) -> list[Word]:
    """Whisper's clip-relative words → ``Word``s in stream time.

    Times are clamped to the utterance (Whisper sometimes stretches a word into the padding) and
    made monotonic from ``not_before`` on, so segment builders never see a word start before the
    previous one ended.

    Whisper starts a word with a space; a piece without one continues the previous word (the
    "-disposed" of "ill-disposed", and the characters of Chinese or Japanese, written without
    spaces), so it is glued to it rather than becoming a word that segments would space apart.
    """
    offset, duration = utterance.start_seconds, utterance.duration
    placed: list[Word] = []
    for raw_text, start, end, probability in raw_words:
        text = raw_text.strip()
        if not text:
            continue
        start = max(offset + min(max(start, 0.0), duration), not_before)
        end = max(offset + min(max(end, 0.0), duration), start)
        if placed and not raw_text[:1].isspace():
            previous = placed[-1]
            placed[-1] = Word(previous.text + text, previous.start, round(end, 3), 0,
                              min(previous.confidence, probability), language)
        else:
            placed.append(Word(text, round(start, 3), round(end, 3), 0, probability, language))
        not_before = end
    return placed


def transcribe_offline(provider: WhisperProvider, pcm: np.ndarray, language: str | None = "en") -> str:
    """The text of one whole int16 clip, decoded in the calling thread (blocking; needs ``load()``).

    No VAD, no endpointing: the baseline that streamed output is compared against.
    """
    raw_words, _ = provider.transcribe_clip(pcm, language)
    return " ".join(text.strip() for text, *_ in raw_words if text.strip())


def _base_language(language: str) -> str:
    return language.replace("_", "-").split("-", 1)[0].lower()
