"""The embedded speech engine: faster-whisper decoding VAD-endpointed utterances, fully offline.

Whisper is not a streaming model: every call decodes a (padded) 30 s window, costing about 0.33 s
of one core for tiny.en whatever the clip length (``reference/local-stt-engines.md`` §3). So a
stream cuts its audio into utterances with the Silero VAD (``harken.audio.Endpointer``) and
decodes each utterance once, when it ends, in a thread pool shared by all streams. ``send`` only
runs the VAD (about 60 µs per 32 ms window), so it never waits for the engine.

One ``WhisperModel`` serves every stream; ``whisper_workers`` decodes run at once (the pool's
size and CTranslate2's ``num_workers``), and one stream's utterances decode in order, one at a
time, so its words come out in stream-time order.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

import numpy as np

from ..audio import WINDOW_SECONDS, Endpointer, SileroVAD, StreamingVAD, Utterance
from .base import EMBEDDED_PROVIDER, SAMPLE_RATE, Provider, StreamConfig, STTError, STTStream, Word
from .decoding import Decoding, RawWord, decode
from .models import EMBEDDED_BASE, ModelError, load_whisper_model, resolve_model, resolve_multilingual, whisper_languages

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from ..config import Settings

log = logging.getLogger(__name__)

# Whisper readily "transcribes" breaths, clicks and near-silence into stock phrases ("Thank you.",
# "you"); an utterance with less VAD-judged speech than this is not decoded at all.
MIN_SPEECH_SECONDS = 0.2
# Utterances waiting for a decode, per stream. Past this the server is far behind real time;
# the oldest are dropped (and counted) rather than letting memory grow without bound.
MAX_PENDING_UTTERANCES = 32
CLOSE_TIMEOUT_S = 30.0
PREROLL_MS = 300


class WhisperProvider(Provider):
    """The local engine. ``await load()`` once at start-up (it is also done by the first ``open``)."""

    name = EMBEDDED_PROVIDER

    def __init__(self, settings: "Settings"):
        self.settings = settings
        self._model: "WhisperModel | None" = None
        self._vad: SileroVAD | None = None
        self._executor = ThreadPoolExecutor(max_workers=max(1, settings.whisper_workers),
                                            thread_name_prefix="whisper")
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
            # CTranslate2 allocates its buffers on the first decode: pay that now, not on a user's utterance.
            await loop.run_in_executor(self._executor, self.transcribe_clip, np.zeros(SAMPLE_RATE, dtype=np.int16))
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

    async def _model_for(self, language: str) -> "WhisperModel":
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
        model = await self._model_for(config.language)
        assert self._vad is not None
        language = None if config.language == "multi" else _base_language(config.language)
        decoding = Decoding(language, self.allowed_languages if language is None else (), tuple(config.vocabulary))
        return WhisperStream(self, config, decoding, StreamingVAD(self._vad), model)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- used by WhisperStream ----------------------------------------------------------
    async def _decode(self, pcm: np.ndarray, decoding: Decoding,
                      model: "WhisperModel | None" = None) -> tuple[list[RawWord], float, str | None]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.decode_clip, pcm, decoding, model)

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
    decodes: int = 0
    decode_seconds: float = 0.0      # time spent inside Whisper
    words: int = 0


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
        self._endpointer = Endpointer(
            vad,
            threshold=settings.vad_threshold,
            silence_ms=settings.endpoint_silence_ms,
            max_utterance_s=settings.max_utterance_s,
            preroll_ms=PREROLL_MS,
        )
        self.stats = StreamStats()
        self._pending: collections.deque[Utterance] = collections.deque()
        self._wakeup = asyncio.Event()
        self._out: asyncio.Queue = asyncio.Queue()
        self._closing = False
        self._error: STTError | None = None
        self._last_end = 0.0
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
        for utterance in self._endpointer.feed(pcm):
            self._queue(utterance)
        self.stats.speech_seconds = self._endpointer.speech_windows * WINDOW_SECONDS

    async def finalize(self) -> None:
        """End the open utterance now and queue its decode; its words follow through iteration."""
        if self._error is not None:
            raise self._error
        utterance = self._endpointer.flush()
        if utterance is not None:
            self._queue(utterance)

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Finalize, wait (at most ``timeout`` s) for the queued decodes, then end the iteration."""
        if not self._closing:
            utterance = self._endpointer.flush()
            if utterance is not None:
                self._queue(utterance)
            self._closing = True
            self._wakeup.set()
        try:
            done, _ = await asyncio.wait({self._worker}, timeout=timeout)
        except asyncio.CancelledError:
            self._worker.cancel()
            raise
        if not done:
            self._worker.cancel()
            self._finish(STTError(f"local decoding did not finish within {timeout:g} s of close "
                                  f"({len(self._pending)} utterances still queued)"))

    async def __aiter__(self) -> AsyncIterator[Word]:
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

    # --- internals ----------------------------------------------------------------------
    def _queue(self, utterance: Utterance) -> None:
        self.stats.utterances += 1
        if utterance.speech_seconds < MIN_SPEECH_SECONDS:
            self.stats.skipped_utterances += 1
            return
        if len(self._pending) >= MAX_PENDING_UTTERANCES:
            dropped = self._pending.popleft()
            self.stats.dropped_utterances += 1
            log.warning("local STT %s: decoding is %d utterances behind; dropped %.1f s of audio at %.1f s",
                        self._config.session_id, MAX_PENDING_UTTERANCES, dropped.duration, dropped.start_seconds)
        self._pending.append(utterance)
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
            utterance = self._pending.popleft()
            try:
                raw_words, seconds, language = await self._provider._decode(utterance.pcm, self._decoding, self._model)
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
            self.stats.decodes += 1
            self.stats.decode_seconds += seconds
            for word in place_words(raw_words, utterance, self._last_end, language):
                self._last_end = word.end
                self.stats.words += 1
                self._out.put_nowait(word)

    def _finish(self, item: object) -> None:
        if isinstance(item, STTError):
            self._error = item
        self._out.put_nowait(item)


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
