"""Retry, failover and recovery over a chain of providers, losing and doubling no words.

``FallbackStream`` is the one ``STTStream`` the session talks to. Behind it:

- **Connect** each link in chain order: up to ``retry_attempts`` tries with exponential backoff
  and jitter (``retry_base`` doubling, at most ``retry_cap``); an error retrying cannot fix
  (400/401/402/403: bad request, key or billing) skips to the next link at once and that link is
  not tried again in this stream.
- **Detect** a lost provider mid-stream: its socket closes or errors, it sends an in-band error or
  a malformed message, or it *stalls*: reports no progress for ``result_timeout`` while at least
  half that much audio was sent to it (an idle client is not a stall).
- **Fail over** to the next link at once (the failed one is retried last) and **replay** the
  buffered audio from the replay point: the later of the last word's end and the point up to
  which the failed provider had reported everything final, minus ``replay_preroll`` so the new
  provider hears whole words. At the seam, words the new provider reports that end before the
  last emitted word's end plus ``seam_tolerance``, or repeat an emitted word that they overlap or
  start less than ``replay_preroll`` after (engines time a re-heard word differently), are
  dropped. Word times are mapped onto this stream's own time (seconds since the first sample
  given to it), whichever provider spoke and however often it was replayed.
- **Recover**: a link that failed retryably and ranks above the active one is probed in the
  background (a bare connect every ``probe_interval``, at most ``probe_attempts`` times). Once a
  probe succeeds, the link takes over at the next silence, opened before the active one is let go
  (make before break). Silence is read from the active provider when it reports its progress
  (``settled_until``): it has declared final at least ``silence_gap`` seconds past the last word,
  so no word can straddle the cut. An engine that reports no progress (the embedded one) is cut
  where the last ``silence_gap`` seconds of audio are quieter than ``silence_rms``, after it has
  been drained of the words that start before the cut. The cut is fixed before the link
  connects: while it does, the audio from the cut stays buffered and the outgoing provider's
  words from the cut on are held back (given to it after all if the connect fails).
- **Give up** when every link failed: ``on_status`` gets ``stt_failed`` and iteration raises
  ``STTError``.

``send`` never waits for a provider: audio goes into a ``ReplayBuffer`` (``replay_seconds``,
default 120 s) and a feeder task forwards it, so audio that arrives while (re)connecting is sent
once connected. Audio older than the replay point is released as words become final. If a
failover needs audio that was already evicted (no provider reported progress for longer than the
buffer, or reconnecting took longer), replay starts at the oldest sample held: the words in the
gap are lost, and ``lost_seconds`` says how much audio that was.

Provider streams may expose ``settled_until`` (float, their stream time up to which every word
has been *yielded through iteration*, so it never runs ahead of the words read); the three cloud
providers here do, through ``WordQueue.settle``. It sharpens the replay point and enables stall
and silence detection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import random
import time
import unicodedata
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Sequence

import numpy as np

from .base import SAMPLE_RATE, Link, Partial, STTError, STTStream, StreamConfig, Word
from ..audio.replay import PCM16, ReplayBuffer
from .word_queue import StreamFailure, WordQueue

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

StatusCallback = Callable[[dict], Any]

RELEASE_SAMPLES = SAMPLE_RATE // 2     # audio sent between two releases of the replay buffer


@dataclass(frozen=True)
class FallbackPolicy:
    connect_timeout: float = 10.0
    retry_base: float = 1.0
    retry_cap: float = 32.0
    retry_attempts: int = 3
    result_timeout: float = 10.0
    replay_seconds: float = 120.0
    replay_preroll: float = 0.3
    seam_tolerance: float = 0.05
    probe_interval: float = 30.0
    probe_attempts: int = 20
    silence_gap: float = 1.0
    silence_rms: float = 150.0          # int16 RMS (about -47 dBFS) below which audio counts as silence
    close_timeout: float = 20.0
    max_frame_seconds: float = 0.1      # largest chunk sent to a provider at once (replays are chunked)

    @classmethod
    def from_settings(cls, settings: "Settings", **changes: Any) -> "FallbackPolicy":
        return cls(
            connect_timeout=settings.stt_connect_timeout, retry_base=settings.stt_retry_base,
            retry_cap=settings.stt_retry_cap, retry_attempts=max(1, settings.stt_retry_attempts),
            result_timeout=settings.stt_result_timeout, replay_seconds=settings.stt_replay_seconds,
            probe_interval=settings.stt_probe_interval, probe_attempts=settings.stt_probe_attempts,
        ).replace(**changes)

    def replace(self, **changes: Any) -> "FallbackPolicy":
        return dataclasses.replace(self, **changes)

    def backoff(self, attempt: int) -> float:
        """Delay before retry number ``attempt + 1``: base·2^attempt plus up to one base of jitter
        (Omi's formula), capped."""
        return min(self.retry_cap, self.retry_base * 2 ** attempt + random.random() * self.retry_base)


def as_failure(exc: BaseException, default_reason: str) -> StreamFailure:
    if isinstance(exc, StreamFailure):
        return exc
    if isinstance(exc, STTError):
        return StreamFailure(str(exc), reason=default_reason, retryable=exc.retryable, code=exc.code)
    if isinstance(exc, TimeoutError):
        return StreamFailure("timed out", reason=default_reason)
    return StreamFailure(f"{type(exc).__name__}: {exc}", reason=default_reason)


def _vad_speech(stream: STTStream) -> float | None:
    """The speech seconds an engine's own VAD counted, or None if it has none."""
    value = getattr(getattr(stream, "stats", None), "speech_seconds", None)
    return float(value) if isinstance(value, (int, float)) else None


def _normalized(text: str) -> str:
    return "".join(c for c in text.casefold() if not unicodedata.category(c).startswith("P"))


@dataclass
class _Active:
    index: int
    link: Link
    stream: STTStream
    origin: int            # our sample index that is the provider stream's time 0
    sent: int              # our sample index up to which audio was handed to the provider
    seam: bool             # still checking words for duplicates of what was already emitted
    unmatched: list[Word] = field(default_factory=list)   # emitted words it has not re-reported
    close_requested: bool = False
    last_sent_at: float = 0.0      # time.monotonic() of the last send
    resumed_at: float = 0.0        # when audio started flowing again after a pause
    feeder_waiting: bool = False   # the feeder has sent everything and waits for audio
    released_at: int = 0           # ``sent`` when audio was last released (_mark_sent)
    # A switch-back chosen to happen at ``cut`` while the next link connects: words from the cut
    # on wait in ``after_cut`` (the next provider will hear them; kept if it fails to connect).
    cut: float | None = None
    after_cut: list[Word] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.link.name

    def settled(self) -> float | None:
        """Our stream time up to which the provider has yielded every word, if it says."""
        value = getattr(self.stream, "settled_until", None)
        return None if value is None else self.origin / SAMPLE_RATE + value


@dataclass
class _Outcome:
    kind: str                                   # "closed" | "failed" | "switch"
    failure: StreamFailure | None = None
    next_active: tuple[int, STTStream, float] | None = None     # switch: index, opened stream, cut time


class _AllDown(Exception):
    def __init__(self, failure: StreamFailure, provider: str):
        super().__init__(str(failure))
        self.failure, self.provider = failure, provider


class FallbackStream(STTStream):
    """An ``STTStream`` over an ordered chain of ``Link``s (or ``(provider, overrides)`` tuples)."""

    immediate_send = True        # send only buffers; the feeder (or send_nowait) passes it on

    def __init__(self, links: Sequence[Link | tuple], config: StreamConfig,
                 on_status: StatusCallback | None = None, *, policy: FallbackPolicy | None = None,
                 on_failure: Callable[[str, str], None] | None = None):
        if not links:
            raise ValueError("a FallbackStream needs at least one link")
        self._links = [link if isinstance(link, Link) else Link(*link) for link in links]
        self._config = config
        self._on_status = on_status
        self._on_failure = on_failure or (lambda provider, reason: None)   # (provider, reason), for metrics
        self.policy = policy or FallbackPolicy()
        self._buffer = ReplayBuffer(max(1, int(self.policy.replay_seconds * SAMPLE_RATE)))
        self._max_frame = max(1, int(self.policy.max_frame_seconds * SAMPLE_RATE))   # samples per send
        self._audio = asyncio.Event()
        self._finalize_marks: deque[int] = deque()   # buffer positions at which finalize() was asked
        self._out = WordQueue()                  # (word, provider name) pairs
        self._closing = False
        self._task: asyncio.Task | None = None
        self._started: asyncio.Future | None = None
        self._active: _Active | None = None
        self._last_word_end = 0.0
        self._recent: deque[Word] = deque(maxlen=8)
        self._dead: set[int] = set()            # failed with a non-retryable error: never again
        self._recovered: set[int] = set()       # probed OK, waiting for a silence to take over
        self._probes: dict[int, asyncio.Task] = {}
        self._background: set[asyncio.Task] = set()
        self._last_failure: tuple[StreamFailure, str] | None = None
        self.provider_name = self._links[0].name   # provider of the word most recently yielded
        self.switches = 0
        self.lost_seconds = 0.0
        # Speech seconds for usage: an engine that runs its own VAD (the embedded one) counts
        # them in ``stats.speech_seconds``; for the others the spans of their words are summed.
        self._speech_of_retired = 0.0
        self._retired: set[int] = set()
        self._word_speech = 0.0
        self._word_speech_until = 0.0

    # --- STTStream ------------------------------------------------------------------------
    async def send(self, pcm: np.ndarray) -> None:
        """Buffer samples (copied, unless the array is read-only) for the active provider; returns at once."""
        self.send_nowait(pcm)

    def send_nowait(self, pcm: np.ndarray) -> None:
        """``send`` without the coroutine: the session calls it straight from the socket's read
        callback, sparing a task wake-up per piece of audio."""
        if self._closing:
            return           # a session tearing down may still hand over its last frame
        if self._task is None:
            self._ensure_running()
        if pcm.dtype is PCM16 and pcm.ndim == 1 and not pcm.flags.writeable:
            samples = pcm      # a decoder's output over immutable bytes: no one can change it under us
        else:
            samples = np.array(pcm, dtype=np.int16, copy=True).reshape(-1)
        starts_at = self._buffer.end
        evicted = self._buffer.append(samples)
        if evicted and self._active is None:
            log.debug("replay buffer full while connecting: oldest %d samples evicted", evicted)
        active = self._active
        if (active is not None and active.feeder_waiting and active.sent == starts_at
                and active.stream.immediate_send and not self._finalize_marks
                and samples.size <= self._max_frame):
            # The feeder would only wake to pass exactly this on: do it here, sparing the wake-up.
            now = self._stall_clock(active)
            try:
                active.stream.send_nowait(samples)
            except Exception:
                self._audio.set()       # the feeder sends it again and turns the error into a failover
                return
            self._mark_sent(active, samples.size, now)
            return
        self._audio.set()

    async def finalize(self) -> None:
        """Finalize the active provider once the feeder has sent it every sample given so far:
        sent at once, a Finalize could overtake the audio it is meant to settle."""
        if self._closing:
            return
        self._ensure_running()
        self._finalize_marks.append(self._buffer.end)
        self._audio.set()

    async def close(self) -> None:
        """Send what is buffered, let the providers' last words out, then stop (bounded)."""
        if self._closing and self._task is None:
            return
        self._closing = True
        self._audio.set()
        if self._task is None:
            self._finish(None)
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.policy.close_timeout)
        except TimeoutError:
            log.warning("stt stream did not close within %.0fs; abandoning provider %s",
                        self.policy.close_timeout, self._active.name if self._active else "-")
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        except Exception:
            pass     # the error reaches the consumer through iteration

    async def __aiter__(self) -> AsyncIterator[Word]:
        self._ensure_running()
        async for word, self.provider_name in self._out:
            yield word

    # --- extra public surface -------------------------------------------------------------
    async def start(self) -> str:
        """Connect the first working link; returns its provider name or raises ``STTError``
        (after ``stt_failed``) when none works. Optional: ``send`` and iteration start it too."""
        self._ensure_running()
        assert self._started is not None
        return await asyncio.shield(self._started)

    @property
    def speech_seconds(self) -> float:
        """Seconds of speech heard so far, over every provider this stream used."""
        active = self._active
        live = _vad_speech(active.stream) if active is not None and id(active.stream) not in self._retired else None
        return self._speech_of_retired + (live or 0.0) + self._word_speech

    def _retire(self, stream: STTStream) -> None:
        if id(stream) not in self._retired:
            self._retired.add(id(stream))
            self._speech_of_retired += _vad_speech(stream) or 0.0

    @property
    def active_provider(self) -> str | None:
        return self._active.name if self._active else None

    # --- the supervisor -------------------------------------------------------------------
    def _ensure_running(self) -> None:
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._started = loop.create_future()
            self._started.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            self._task = loop.create_task(self._run(), name=f"stt-fallback-{self._config.session_id}")

    def _finish(self, error: STTError | None) -> None:
        """End iteration: cleanly, or by raising ``error``."""
        if self._started is not None and not self._started.done():
            self._started.set_exception(error or STTError("closed before any provider connected", retryable=False))
        if error is None:
            self._out.end()
        else:
            self._out.fail(error)

    async def _run(self) -> None:
        order = list(range(len(self._links)))
        previous: str | None = None
        reason = "initialization_failed"
        replay_from = 0.0
        terminal: STTError | None = None
        try:
            pending: tuple[int, STTStream] | None = None
            while True:
                if pending is None:
                    index, stream = await self._connect(order)
                else:
                    index, stream = pending
                active = self._activate(index, stream, replay_from)
                if previous is None and index != 0:
                    previous = self._links[0].name
                if previous is not None and previous != active.name:
                    self.switches += 1
                    await self._status({
                        "type": "service_status", "status": "stt_switched", "provider": active.name,
                        "previous_provider": previous, "reason": reason,
                        "status_text": f"Transcription moved from {previous} to {active.name}",
                    })
                if not self._started.done():
                    self._started.set_result(active.name)
                self._start_probes(active.index)

                outcome = await self._serve(active)
                previous = active.name
                pending = None
                if outcome.kind == "closed":
                    return
                if outcome.kind == "switch":
                    assert outcome.next_active is not None
                    next_index, next_stream, cut = outcome.next_active
                    pending = (next_index, next_stream)
                    replay_from = max(0.0, cut - self.policy.replay_preroll)
                    reason = "recovered"
                    continue
                failure = outcome.failure
                assert failure is not None
                reason = failure.reason
                log.warning("stt provider %s failed (%s): %s", active.name, reason, failure)
                self._on_failure(active.name, reason)
                self._last_failure = (failure, active.name)
                if not failure.retryable:
                    self._dead.add(active.index)
                replay_from = max(0.0, max(self._last_word_end, active.settled() or 0.0) - self.policy.replay_preroll)
                n = len(self._links)
                order = [(active.index + k) % n for k in range(1, n + 1)]   # next links first, itself last
        except _AllDown as down:
            f = down.failure
            retryable = f.retryable or any(i not in self._dead for i in range(len(self._links)))
            await self._status({
                "type": "service_status", "status": "stt_failed", "provider": down.provider,
                "reason": f.reason, "retryable": retryable,
                "retry_after": int(round(self.policy.probe_interval)) if retryable else 3600,
                "status_text": "Transcription temporarily unavailable",
            })
            terminal = STTError(f"all speech-to-text providers failed; last: {down.provider}: {f}",
                                retryable=retryable, code="all_failed")
        except asyncio.CancelledError:
            terminal = STTError("stt stream abandoned while closing", retryable=True, code="close_timeout")
            raise
        finally:
            active, self._active = self._active, None
            for task in self._probes.values():
                task.cancel()
            self._finish(terminal)
            if active is not None:
                self._retire(active.stream)
                self._discard_later(active.stream)
            # Replaced streams close in the background, each bounded by _discard's timeout: a
            # stalled provider must not hold up the session's close.

    def _activate(self, index: int, stream: STTStream, replay_from: float) -> _Active:
        """Make ``stream`` current, fed from the replay point (or the oldest sample still held)."""
        origin = int(round(replay_from * SAMPLE_RATE))
        if origin < self._buffer.start:
            lost = (self._buffer.start - origin) / SAMPLE_RATE
            self.lost_seconds += lost
            log.warning("replay buffer no longer holds %.1fs of audio before the failover point; "
                        "words in it are lost", lost)
            origin = self._buffer.start
        # words already emitted that the new provider may hear again (within the pre-roll of the
        # replay point, as another engine times them): check its first ones
        seam = bool(self._recent) and (self._last_word_end > origin / SAMPLE_RATE - self.policy.replay_preroll
                                       - self.policy.seam_tolerance)
        self._active = _Active(index, self._links[index], stream, origin, origin, seam,
                               unmatched=list(self._recent) if seam else [])
        self._recovered.discard(index)
        return self._active

    async def _connect(self, order: Iterable[int]) -> tuple[int, STTStream]:
        for index in order:
            if index in self._dead:
                continue
            link = self._links[index]
            for attempt in range(self.policy.retry_attempts):
                try:
                    return index, await self._open(index)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failure = as_failure(exc, "initialization_failed")
                    failure.reason = "initialization_failed"
                    self._last_failure = (failure, link.name)
                    self._on_failure(link.name, failure.reason)
                    log.warning("cannot connect to %s (attempt %d/%d): %s", link.name, attempt + 1,
                                self.policy.retry_attempts, failure)
                    if not failure.retryable:
                        self._dead.add(index)
                        break
                    if attempt + 1 < self.policy.retry_attempts:
                        await asyncio.sleep(self.policy.backoff(attempt))
        raise _AllDown(*(self._last_failure or (
            StreamFailure("no usable provider left", reason="initialization_failed", retryable=False),
            self._links[0].name)))

    async def _open(self, index: int) -> STTStream:
        link = self._links[index]
        return await asyncio.wait_for(link.provider.open(link.stream_config(self._config)),
                                      self.policy.connect_timeout)

    async def _serve(self, active: _Active) -> _Outcome:
        feeder = asyncio.create_task(self._feed(active), name="stt-feed")
        reader = asyncio.create_task(self._read(active), name="stt-read")
        watcher = asyncio.create_task(self._watch(active), name="stt-watch")
        try:
            done, _ = await asyncio.wait({feeder, reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                if watcher.exception() is not None:
                    return _Outcome("failed", as_failure(watcher.exception(), "stalled"))
                outcome: _Outcome = watcher.result()
                feeder.cancel()
                reader.cancel()            # words from the cut on are the next provider's
                with contextlib.suppress(BaseException):
                    await reader
                await self._drain_before_cut(active, outcome.next_active[2])
                active.after_cut.clear()   # the next provider hears these words again
                return outcome
            for task, reason in ((reader, "connection_lost"), (feeder, "send_failed")):
                if task in done and task.exception() is not None:
                    return _Outcome("failed", as_failure(task.exception(), reason))
            if not active.close_requested:
                return _Outcome("failed", StreamFailure(f"{active.name} ended the stream unasked",
                                                        reason="connection_lost"))
            # close() was asked for: the provider's last words arrive while both tasks finish
            watcher.cancel()
            try:
                await asyncio.wait_for(asyncio.gather(feeder, reader), self.policy.result_timeout)
            except TimeoutError:
                return _Outcome("failed", StreamFailure(f"{active.name} did not finish after close",
                                                        reason="stalled"))
            except Exception as exc:
                return _Outcome("failed", as_failure(exc, "connection_lost"))
            return _Outcome("closed")
        finally:
            for task in (feeder, reader, watcher):
                task.cancel()
            await asyncio.gather(feeder, reader, watcher, return_exceptions=True)
            if active.cut is not None:       # failed or closed while the next link connected
                self._cancel_cut(active)
            self._retire(active.stream)
            if self._active is active:
                self._active = None
            self._discard_later(active.stream)

    async def _feed(self, active: _Active) -> None:
        """Forward buffered audio to the provider as it arrives; on close, finish with close()."""
        frame = self._max_frame
        buffer = self._buffer
        while True:
            while self._finalize_marks and active.sent >= self._finalize_marks[0]:
                self._finalize_marks.popleft()
                with contextlib.suppress(Exception):     # a dead provider is the reader's business
                    await active.stream.finalize()
            if active.sent < buffer.end:
                if active.sent < buffer.start:
                    raise StreamFailure(f"{active.name} fell {self.policy.replay_seconds:.0f}s behind",
                                        reason="stalled")
                chunk = buffer.read(active.sent, frame)
                now = self._stall_clock(active)
                try:
                    await active.stream.send(chunk)
                except Exception as exc:
                    raise as_failure(exc, "send_failed") from exc
                self._mark_sent(active, chunk.size, now)
                continue
            if self._closing:
                active.close_requested = True
                await active.stream.close()
                return
            self._audio.clear()
            active.feeder_waiting = True     # from now on send_nowait may feed the provider itself
            try:
                await self._audio.wait()
            finally:
                active.feeder_waiting = False

    def _stall_clock(self, active: _Active) -> float:
        """Before a send: a new stretch of audio after a pause restarts the stall clock."""
        now = time.monotonic()
        if now - active.last_sent_at >= self.policy.result_timeout:
            active.resumed_at = now
        return now

    def _mark_sent(self, active: _Active, samples: int, sent_at: float) -> None:
        active.last_sent_at = sent_at
        active.sent += samples
        # Released every RELEASE_SAMPLES sent, not per 40 ms piece: it reads the provider's settled
        # point and walks the buffer, and at a few hundred streams that per piece was ~2 % of the core.
        # The buffer holds at most that much longer.
        if active.sent - active.released_at >= RELEASE_SAMPLES:
            active.released_at = active.sent
            self._release(active)

    def _release(self, active: _Active) -> None:
        """Forget audio no failover could need: before the replay point and already sent."""
        point = max(self._last_word_end, active.settled() or 0.0)
        if active.cut is not None:
            point = min(point, active.cut)
        point -= self.policy.replay_preroll
        self._buffer.discard_before(min(active.sent, int(point * SAMPLE_RATE)))

    async def _read(self, active: _Active) -> None:
        offset = active.origin / SAMPLE_RATE
        async for word in active.stream:
            if isinstance(word, Partial):          # provisional: no seam or cut bookkeeping
                self._out.put((word.shifted(offset), active.name))
                continue
            self._accept(active, word.shifted(offset))

    def _accept(self, active: _Active, word: Word) -> bool:
        if active.cut is not None and word.start >= active.cut:
            active.after_cut.append(word)
            return False
        if active.seam:
            if self._duplicate(active, word):
                log.debug("dropped %r at the seam after failover to %s", word.text, active.name)
                return False
            active.seam = False
        self._last_word_end = max(self._last_word_end, word.end)
        if _vad_speech(active.stream) is None:
            self._word_speech += max(0.0, word.end - max(word.start, self._word_speech_until))
            self._word_speech_until = max(self._word_speech_until, word.end)
        self._recent.append(word)
        self._out.put((word, active.name))
        return True

    def _duplicate(self, active: _Active, word: Word) -> bool:
        """A word the new provider reports at the seam that was emitted already: it ends before
        the last emitted word does, or it has the text of a recent emitted word and starts before
        that word's end plus the replay's pre-roll. Engines time words differently, and one that
        re-hears a short word in the replay may place it just past the end the other gave it
        (Soniox after Deepgram: "next." twice, the second starting 0.07 s after the first's end).
        Each emitted word is re-heard once: a word it matched is not matched again, so that
        someone saying the same word twice ("no, no") keeps both."""
        text = _normalized(word.text)
        reach = self.policy.replay_preroll + self.policy.seam_tolerance
        same = [old for old in active.unmatched
                if _normalized(old.text) == text and old.start < word.end and word.start < old.end + reach]
        if same:
            active.unmatched.remove(min(same, key=lambda old: abs(old.start - word.start)))
        return bool(same) or word.end <= self._last_word_end + self.policy.seam_tolerance

    async def _watch(self, active: _Active) -> _Outcome:
        """Stall detection and switch-back; returns an outcome or raises a stall."""
        policy = self.policy
        tick = max(0.01, min(0.5, policy.result_timeout / 4))
        progress, progress_at = active.settled(), time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            settled = active.settled()
            if settled is not None:
                if settled != progress:
                    progress, progress_at = settled, now
                quiet = now - max(progress_at, active.resumed_at)
                pending = active.sent / SAMPLE_RATE - settled      # audio it has not accounted for
                # While audio flows, half a timeout of it unanswered is a stall; an idle client is
                # not (many engines settle only when more audio comes); at close, any is.
                if active.close_requested:
                    stalled = pending >= policy.seam_tolerance
                else:
                    stalled = now - active.last_sent_at < policy.result_timeout and pending >= policy.result_timeout / 2
                if quiet >= policy.result_timeout and stalled:
                    raise StreamFailure(f"{active.name} reported nothing for {quiet:.1f}s with "
                                        f"{pending:.1f}s of audio unanswered", reason="stalled")
            better = [i for i in self._recovered if i < active.index and i not in self._dead]
            if not better:
                continue
            cut = self._silence_cut(active)
            if cut is None:
                continue
            index = min(better)
            self._recovered.discard(index)
            # Connecting takes a while; meanwhile the audio from the replay point stays buffered
            # and the outgoing provider's words from the cut on are held back, so neither moves.
            active.cut = cut
            try:
                stream = await self._open(index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("%s is still failing (%s); staying on %s", self._links[index].name, exc, active.name)
                self._start_probe(index, as_failure(exc, "initialization_failed"))
                self._cancel_cut(active)
                continue
            return _Outcome("switch", next_active=(index, stream, cut))

    def _cancel_cut(self, active: _Active) -> None:
        """The switch did not happen: the words held back after the cut are the active one's."""
        held, active.after_cut, active.cut = active.after_cut, [], None
        for word in held:
            self._accept(active, word)

    def _silence_cut(self, active: _Active) -> float | None:
        """A point of our stream time inside silence, with every word before it yielded, or None."""
        gap = self.policy.silence_gap
        settled = active.settled()
        if settled is not None:
            return settled if settled - self._last_word_end >= gap else None
        end = self._buffer.end
        n = int(gap * SAMPLE_RATE)
        if end - n < max(self._buffer.start, active.origin):
            return None
        tail = self._buffer.read(end - n, n).astype(np.float32)
        if float(np.sqrt(np.mean(tail * tail))) >= self.policy.silence_rms:
            return None
        cut = (end - n // 2) / SAMPLE_RATE
        return cut if cut - self._last_word_end >= gap / 2 else None

    async def _drain_before_cut(self, active: _Active, cut: float) -> None:
        """Let the outgoing provider yield its words that start before ``cut`` (switch-back);
        ``_accept`` holds back the rest (``active.cut`` is set), for the caller to drop."""
        settled = active.settled()
        if settled is not None and settled >= cut:
            return                       # every word before the cut has been read already
        try:
            await asyncio.wait_for(asyncio.gather(active.stream.close(), self._read(active)),
                                   self.policy.close_timeout)
        except Exception as exc:
            log.info("draining %s before switching back ended early: %s", active.name, exc)

    # --- probes -----------------------------------------------------------------------------
    def _start_probes(self, active_index: int) -> None:
        for index in range(active_index):
            if index not in self._dead and index not in self._recovered and index not in self._probes:
                self._start_probe(index)

    def _start_probe(self, index: int, failure: StreamFailure | None = None) -> None:
        if failure is not None and not failure.retryable:
            self._dead.add(index)
            return
        if index in self._probes and not self._probes[index].done():
            return
        task = asyncio.create_task(self._probe(index), name=f"stt-probe-{self._links[index].name}")
        self._probes[index] = task
        task.add_done_callback(lambda t, i=index: self._probes.pop(i, None) if self._probes.get(i) is t else None)

    async def _probe(self, index: int) -> None:
        link = self._links[index]
        for attempt in range(self.policy.probe_attempts):
            await asyncio.sleep(self.policy.probe_interval * (0.75 + random.random() / 2))
            try:
                stream = await self._open(index)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = as_failure(exc, "initialization_failed")
                log.debug("probe %d of %s failed: %s", attempt + 1, link.name, failure)
                if not failure.retryable:
                    self._dead.add(index)
                    return
                continue
            await self._discard(stream)
            log.info("%s answers again; it takes over at the next silence", link.name)
            self._recovered.add(index)
            return
        log.info("%s did not come back after %d probes; not probed again in this stream",
                 link.name, self.policy.probe_attempts)

    # --- helpers ----------------------------------------------------------------------------
    async def _status(self, message: dict) -> None:
        if self._on_status is None:
            return
        try:
            result = self._on_status(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("on_status callback failed")

    async def _discard(self, stream: STTStream) -> None:
        """Close a stream nobody reads any more, briefly: it failed, was replaced, or was a probe."""
        try:
            await asyncio.wait_for(stream.close(), 2.0)
        except BaseException as exc:  # noqa: BLE001 - a dying stream may raise anything
            if isinstance(exc, asyncio.CancelledError) and asyncio.current_task().cancelling():
                raise
            log.debug("closing a discarded stream: %r", exc)

    def _discard_later(self, stream: STTStream) -> None:
        task = asyncio.create_task(self._discard(stream), name="stt-discard")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
