"""Batch transcription of recorded audio (offline uploads) with the embedded engine, after live
decodes and at a CPU priority below live sessions'.

Live decodes must go first. Queueing batch decodes behind live ones in the live engine's pool
would not do it: a batch decode already running holds a decoder for ~0.3 s or more while a
live utterance waits. Instead the batch path has its own engine instance (a second
``WhisperProvider``: one more copy of the model, ~75 MB for tiny.en) run by a pool of its own,
and two things keep it out of the live engine's way:

- **It waits for live decodes** (``priority.LiveFirstGate``): every job of the pool, and every
  utterance it decodes, starts only when the live engine has no decode queued or running.
- **It runs at a high ``nice`` value**, for the decode that is already running when a live one
  arrives: the pool's one worker thread lowers its own priority first, and the threads
  CTranslate2 and ONNX Runtime start from it inherit that priority (Linux keeps ``nice`` per
  thread and copies it to new threads). The kernel's scheduler then gives the live decode the
  core (at nice 19 against 0 the batch gets about 1.5 % of a contended core). With autogroup
  scheduling (the Linux default) the nice value only ranks threads of this process against each
  other, not against other programs.

The pool has one worker: one batch decode at a time, however many uploads wait.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TypeVar

from ..audio import Endpointer, SileroVAD, StreamingVAD, Utterance
from .base import EMBEDDED_PROVIDER, Word
from .decoding import Decoding, utterance_lead
from .priority import LiveFirstExecutor, LiveFirstGate
from .whisper import MIN_SPEECH_SECONDS, WhisperProvider, endpointer_for, place_words

if TYPE_CHECKING:
    from ..config import Settings
    from faster_whisper import WhisperModel

log = logging.getLogger(__name__)

T = TypeVar("T")


class LowPriorityPool:
    """One worker thread at ``nice`` (threads it starts inherit the priority) whose every job
    waits while the live engine holds ``live_gate``."""

    def __init__(self, nice: int, name: str = "harken-batch", live_gate: LiveFirstGate | None = None):
        self.nice = nice
        self.live_gate = live_gate
        self.lowered: bool | None = None        # set by the worker thread once it started
        self.executor = LiveFirstExecutor(live_gate, max_workers=1, thread_name_prefix=name, initializer=self._lower)

    def _lower(self) -> None:
        try:
            # PRIO_PROCESS with a thread id sets that one thread's nice value (Linux).
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            self.lowered = True
        except (OSError, AttributeError) as exc:
            self.lowered = False
            log.warning("batch transcription: could not lower its CPU priority (%s); live sessions may slow "
                        "down while uploads are transcribed", exc)

    def wait_for_live(self) -> None:
        """In the pool's thread, between pieces of one job: let queued live decodes go first."""
        if self.live_gate is not None:
            self.live_gate.wait_for_live()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class BatchTranscriber:
    """The embedded engine for recorded audio: VAD speech regions, each decoded once, in the pool."""

    provider_name = EMBEDDED_PROVIDER

    def __init__(self, settings: "Settings", *, nice: int, threads: int, live_gate: LiveFirstGate | None = None):
        """``live_gate``: the live engine's (``WhisperProvider.live_gate``); None waits for nothing."""
        self.settings = settings
        self.pool = LowPriorityPool(nice, live_gate=live_gate)
        # A provider of its own (one decode at a time, ``threads`` per decode), loaded from the
        # low-priority thread so that CTranslate2's threads inherit its priority.
        self.engine = WhisperProvider(settings.replace(whisper_workers=1, whisper_threads=max(1, threads)),
                                      executor=self.pool.executor)
        self._vad: SileroVAD | None = None

    async def load(self) -> None:
        """The VAD (every upload needs it). The engine's model loads with ``decoding_for``: a
        node whose uploads go to a cloud provider never holds the second copy."""
        if self._vad is None:
            self._vad = await self.pool.run(SileroVAD.shared)

    def supports(self, language: str) -> bool:
        return self.engine.supports(language)

    def endpointer(self, model: "WhisperModel | None" = None) -> Endpointer:
        """Speech regions of one recording, cut as live audio for ``model`` is (same VAD, same
        settings)."""
        assert self._vad is not None, "BatchTranscriber.load() was not awaited"
        return endpointer_for(self.settings, StreamingVAD(self._vad), model)

    async def decoding_for(self, language: str, vocabulary: Sequence[str] = ()) -> tuple[Decoding, "WhisperModel"]:
        """How to decode recordings in ``language`` (a code or ``multi``) with the user's
        ``vocabulary`` (hotwords, as a live stream's), and the model that serves it (the
        multilingual one is loaded on first use)."""
        model = await self.engine.model_for(language)
        code = None if language == "multi" else language.split("-")[0].lower()   # pt-BR → pt, as live
        # The same encoder window as a live stream's utterances (a third of the CPU of Whisper's 30 s).
        return Decoding(code, self.engine.allowed_languages if code is None else (), tuple(vocabulary),
                        window_s=self.settings.whisper_window_s, lead_s=utterance_lead(model)), model

    def decode(self, utterances: Iterable[Utterance], decoding: Decoding, model: "WhisperModel",
               not_before: float = 0.0) -> tuple[list[Word], float, float]:
        """Blocking (run it in ``pool``): the words of the utterances in recording time, the time
        of the last word's end, and the seconds spent decoding."""
        words: list[Word] = []
        spent = 0.0
        for utterance in utterances:
            if utterance.speech_seconds < MIN_SPEECH_SECONDS:
                continue
            self.pool.wait_for_live()
            raw, seconds, _ = self.engine.decode_clip(utterance.pcm, decoding, model)
            spent += seconds
            placed = place_words(raw, utterance, not_before)
            if placed:
                not_before = placed[-1].end
            words.extend(placed)
        return words, not_before, spent

    async def aclose(self) -> None:
        await self.engine.aclose()
        self.pool.shutdown()
