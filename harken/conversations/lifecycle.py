"""Conversation lifecycle: resume on reconnect, roll over after silence, process exactly once.

``ConversationService`` is one per process. Each WebSocket session gets a ``LiveConversation``
from ``connect()`` and writes through it; the service's background tasks do everything that must
not hold up transcription: silence checks, the sweep of conversations nobody is connected to,
processing, writing audio chunks to the outbox, and webhook delivery.

State lives in the store, so any node can pick up where another stopped:
- a live session renews a lease on its conversation (``live_until``); the sweep processes only
  conversations that are silent past their timeout *and* not live anywhere, including those left
  in progress by a crash or restart;
- a user has one in-progress conversation per ``source`` (a pendant and the phone at once never
  take each other's over; upstream shares one, but one writer per conversation keeps the fencing
  below);
- the lease names its holder (``live_by``, one id per connection) and the newest connection of a
  user and source takes it over at once, so a client that reconnects after its node died continues the same
  conversation without waiting for the dead node's lease; the older writer, wherever it runs, is
  fenced: its next save raises ``LeaseLost`` and writes nothing there. It is not closed: it goes
  on in a new conversation of its own with what it had not stored (``continue_alone``), since the
  older connection may be live too and its client would reconnect after a close and take the
  conversation back, a loop;
- processing starts with an atomic claim (``in_progress → processing``, or a claim that expired),
  so two nodes never process one conversation, and a node that dies mid-way is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any, AsyncContextManager, Awaitable, Callable, Mapping, Protocol, Sequence

from ..config import Settings
from .audio_chunks import AudioChunker
from .group_commit import GroupCommitter
from .model import (COMPLETED, IN_PROGRESS, Conversation, StoredSegments, Usage, WebhookSetting,
                    conversation_object, iso)
from .outbox import OutboxDeliverer
from .photos import delete_photos_of, photos_of
from .processing import ConversationProcessor
from .queries import AppQueries
from .vision import PhotoDescriber
from .store import (BatchRequest, LeaseLost, OpenRequest, OutboxMessage, ProcessingClaim, ProcessingDone, SessionEnd,
                    Store, Voices)
from .webhooks import (AUDIO_BYTES, audio_message, check_url, memory_message, parse_setting, realtime_message,
                       require_kind)

log = logging.getLogger(__name__)

EventSink = Callable[[dict], Awaitable[Any]]


class SessionHooks(Protocol):
    """What a live session lets REST calls do to it (``connect(hooks=…)``)."""

    def settled(self, timeout: float) -> AsyncContextManager[None]:
        """Entered before ``take_unsaved``: the session's words still waiting for a step of its
        own (their voice label) are made ready for it, and it stores nothing itself until the
        context ends; waits at most ``timeout`` seconds, then goes on without them."""

    def take_unsaved(self) -> tuple[list[dict], list[str]]:
        """Flush the session's segments now, synchronously: ``(changed stored dicts, deleted
        ids)`` to store in the conversation that is about to end (the session sends them)."""

    def unsaved_refused(self) -> None:
        """The store refused what ``take_unsaved`` gave (a newer connection took the conversation
        over): the session must store those words elsewhere (its own new conversation)."""

    async def assign(self, segment_ids: Sequence[str], *, is_user: bool, person_id: str | None) -> list[dict]:
        """Label the given segments as the owner's or a person's: stored (with the realtime
        webhook) and sent, as a ``speaker_assigned`` message would. ``UnknownSegments`` if an id
        is not one of the live conversation's."""

PROCESSING_LEASE = 600.0             # seconds a processing claim lasts (covers slow model answers)
MIN_LIVE_LEASE = 30.0
# Conversations processed at once: few when each waits on a language model (a self-hosted one
# queues the rest and they time out), more with the offline summariser, whose work is short, so
# that a sweep's claims and completions share transactions (group commit) in bigger groups.
MAX_PARALLEL_PROCESSING = 4
MAX_PARALLEL_OFFLINE_PROCESSING = 16
AUDIO_QUEUE_LIMIT = 64 * 1024 * 1024  # bytes of audio chunks waiting for the store, all sessions
AUDIO_BATCH = 32                     # chunks written per transaction
CLOSE_FLUSH_TIMEOUT = 10.0
# Seconds a request to process the conversation now waits for the session's words that are
# still being voice-labelled (SessionHooks.settled): normally well under one.
SETTLE_TIMEOUT = 5.0
# Conversation opens that may start a transaction each, back to back, after a quiet spell
# (GroupCommitter burst): a ramp of 20 connects 20 ms apart never waits for the gather pause.
OPEN_BURST = 16


def _node_id() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ConversationService:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        processor: ConversationProcessor | None = None,
        deliverer: OutboxDeliverer | None = None,
        clock: Callable[[], float] = time.time,
        check_interval: float | None = None,
        node_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.node_id = node_id or _node_id()
        self.check_interval = check_interval if check_interval is not None else settings.conversation_check_interval
        self.live_lease = max(MIN_LIVE_LEASE, 3 * self.check_interval)
        self.processor = processor or ConversationProcessor.from_settings(settings)
        self.describer = PhotoDescriber.from_settings(settings)    # None: photos stay undescribed
        self.deliverer = deliverer or OutboxDeliverer(
            store, node_id=self.node_id, secret=settings.webhook_secret, timeout=settings.webhook_timeout,
            workers=settings.webhook_workers, retry_horizon=settings.webhook_retry_horizon,
            max_backoff=settings.webhook_max_backoff, allow_private=settings.webhook_allow_private, clock=clock)
        self._live: set[LiveConversation] = set()
        # The sessions' openings, batches and ends (lease release, usage), many per transaction.
        # Opens may start OPEN_BURST transactions back to back: a connect on a quiet node (or in a
        # small ramp) does not wait out the gather pause, which was most of its connect → ready;
        # a ramp of hundreds still shares transactions once that credit is spent.
        self._opens = GroupCommitter(store.open_conversations, key=lambda r: r.new.uid, name="conversation opens",
                                     burst=OPEN_BURST)
        self._batches = GroupCommitter(store.save_batches, key=lambda r: r.conversation.id, name="batches")
        self._ends = GroupCommitter(store.end_sessions, key=lambda e: e.conversation_id, name="session ends")
        # Processing's claims and completions, many per transaction: a sweep that finds many
        # conversations at once (say, a crowd of sessions that ended together) would otherwise
        # pay two transactions each while live sessions share the same core.
        self._claims = GroupCommitter(store.claim_for_processing_many, key=lambda k: k.conversation_id,
                                      name="processing claims")
        self._completions = GroupCommitter(store.finish_processing_many, key=lambda d: d.conversation.id,
                                           name="processing completions")
        # Their photos, read for many conversations at once too, so that a sweep's processings stay
        # in step and their completions share transactions.
        self._photo_reads = GroupCommitter(self._read_photos, key=lambda cid: cid, name="photo reads")
        self._processing: dict[str, asyncio.Task] = {}
        self._processing_slots = asyncio.Semaphore(
            MAX_PARALLEL_PROCESSING if self.processor.llm is not None else MAX_PARALLEL_OFFLINE_PROCESSING)
        self._audio_queue: collections.deque[tuple[OutboxMessage, asyncio.Future]] = collections.deque()
        self._audio_queued_bytes = 0
        self._audio_wake = asyncio.Event()
        self.audio_bytes_dropped = 0
        self._tasks: list[asyncio.Task] = []

    # --- start and stop ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start background work, beginning with a sweep for conversations a previous run left."""
        await self.deliverer.start()
        self._tasks = [asyncio.create_task(self._audio_writer(), name="harken-audio-outbox"),
                       asyncio.create_task(self._check_loop(), name="harken-conversation-checks")]
        await self.sweep()

    async def stop(self, *, processing_grace: float = 10.0, delivery_grace: float = 0.0) -> None:
        """Stop background work. Live handles should be closed first (sessions do that); any that
        are not give up their lease so another node can take their conversations. Processing
        gets ``processing_grace`` seconds to finish, webhook requests already sent
        ``delivery_grace`` (a graceful drain); what is cut short is handed back for later."""
        await asyncio.gather(*(live.close() for live in list(self._live)))    # their ends in one transaction
        if self._processing:
            await asyncio.wait(list(self._processing.values()), timeout=processing_grace)
        interrupted = list(self._processing.values())
        for task in interrupted + self._tasks:
            task.cancel()
        await asyncio.gather(*interrupted, *self._tasks, return_exceptions=True)
        self._tasks = []
        if interrupted:
            try:
                await self.store.release_claims(self.node_id)
            except Exception:
                log.warning("could not release processing claims; they expire in %.0fs", PROCESSING_LEASE)
        await self._flush_audio_queue()
        await self.deliverer.stop(grace=delivery_grace)
        await self.processor.aclose()
        if self.describer is not None:
            await self.describer.aclose()

    # --- sessions ----------------------------------------------------------------------------------
    async def connect(
        self,
        uid: str,
        *,
        language: str = "en",
        source: str = "omi",
        conversation_timeout: float = 120,
        session_id: str | None = None,
        events: EventSink | None = None,
        on_new_conversation: Callable[["LiveConversation"], None] | None = None,
        with_voices: bool = False,
        hooks: SessionHooks | None = None,
    ) -> "LiveConversation":
        """Find or resume the user's in-progress conversation, or start one (PROTOCOL §7).

        A conversation silent for less than ``conversation_timeout`` is resumed; older ones are
        processed in the background, their ``memory_processing_started``/``memory_created``
        events going to ``events``. ``with_voices``: the handle's ``voices`` are the user's
        (``Store.load_voices``), read in the same transaction.
        """
        if conversation_timeout <= 0:
            raise ValueError("conversation_timeout must be positive")
        now = self.clock()
        fresh = Conversation(id=str(uuid.uuid4()), uid=uid, status=IN_PROGRESS, language=language, source=source,
                             created_at=now, started_at=now, finished_at=now, timeout_s=float(conversation_timeout))
        holder = uuid.uuid4().hex          # per connection, even if a caller reuses a session id
        # The shared transaction also reads the webhook settings, the last memory and the voices
        # (a ramp of connections would otherwise add up to three read transactions each).
        opened = await self._opens.save(OpenRequest(fresh, now, now + self.live_lease, holder, voices=with_voices))
        live = LiveConversation(self, opened.conversation, opened.segments, session_id=session_id or str(uuid.uuid4()),
                                events=events, on_new_conversation=on_new_conversation,
                                last_memory_id=opened.last_memory_id, audio=opened.webhooks.get(AUDIO_BYTES),
                                holder=holder, voices=opened.voices, vocabulary=opened.vocabulary)
        live.hooks = hooks
        self._live.add(live)
        for stale in opened.stale_ids:
            self._spawn_processing(stale, live.emit)
        log.info("conversation %s %s for uid=%s sid=%s", opened.conversation.id,
                 "resumed" if opened.resumed else "started", uid, live.session_id)
        return live

    async def last_memory_id(self, uid: str) -> str | None:
        """The newest completed, not discarded conversation of the user (the ``last_memory`` event)."""
        return await self.store.last_completed_id(uid)

    # --- REST-facing -------------------------------------------------------------------------------
    async def get_conversation(self, uid: str, conversation_id: str) -> dict | None:
        """The conversation object if it exists and belongs to ``uid``; None otherwise."""
        found = await self.store.get_with_segments(conversation_id)
        if found is None or found[0].uid != uid:
            return None
        return conversation_object(*found, photos=(await photos_of(self.store, [conversation_id]))[conversation_id])

    async def list_conversations(self, uid: str, *, limit: int = 25, offset: int = 0,
                                 include_discarded: bool = True) -> list[dict]:
        rows = await self.store.list_conversations(uid, limit=limit, offset=offset,
                                                   include_discarded=include_discarded)
        return [conversation_object(c, s) for c, s in rows]

    async def process_now(self, uid: str) -> dict | None:
        """``POST /v1/conversations``: process the user's in-progress conversation now.

        A session of the user connected here stores what it has transcribed, gets
        ``memory_processing_started``/``memory_created`` and carries on in a new conversation
        (as after a timeout). Otherwise the newest in-progress conversation in the store is
        processed (a session on another node learns at its next save and continues in a new
        one). Returns the completed conversation object; None if there is none with words.
        """
        live = self._newest_live(uid)
        if live is not None:
            conversation_id, events = await self._finish_live(live)
        else:
            ids = await AppQueries(self.store).in_progress_ids(uid)
            conversation_id, events = (ids[0] if ids else None), None
        if conversation_id is None:
            return None
        return await self._spawn_processing(conversation_id, events)

    async def _finish_live(self, live: "LiveConversation") -> tuple[str | None, EventSink | None]:
        """``finish_now`` on ``live``; if a newer connection took its conversation over meanwhile
        (a same-source takeover racing the request), the conversation is finished by whoever
        holds it: the newer connection's handle if it is here, else it is processed from the
        store (the holder, on another node, learns at its next save and goes on in a new one)."""
        for _ in range(4):                  # each takeover hands the conversation to a newer handle
            try:
                return await live.finish_now(), live.emit
            except LeaseLost as lost:
                conversation_id = lost.args[0] if lost.args else live.conversation_id
            holder = next((h for h in self._live if h.conversation_id == conversation_id and h is not live
                           and not h.fenced and not h._closed), None)
            if holder is None:
                return conversation_id, None
            live = holder
        return None, None

    async def assign_segments(self, uid: str, conversation_id: str, segment_ids: Sequence[str], *,
                              is_user: bool, person_id: str | None) -> bool:
        """Label segments as the owner's or a person's. A conversation live in a session here
        is changed through the session (its client and the realtime webhook see the change,
        and its next flush cannot undo it); any other straight in the store. False if the
        conversation is not the user's; ``UnknownSegments`` if an id is not one of its."""
        live = next((h for h in self._live if h.uid == uid and h.conversation_id == conversation_id
                     and not h.fenced and h.hooks is not None), None)
        if live is not None:
            try:
                await live.hooks.assign(segment_ids, is_user=is_user, person_id=person_id)
                return True
            except LeaseLost:
                pass                     # a newer connection took it over: write the store directly
        return await AppQueries(self.store).assign_segments(
            uid, conversation_id, segment_ids, is_user=is_user, person_id=person_id) is not None

    def _newest_live(self, uid: str) -> "LiveConversation | None":
        handles = [h for h in self._live if h.uid == uid and not h.fenced and not h._closed]
        return max(handles, key=lambda h: h._last_activity, default=None)

    async def get_webhook(self, uid: str, kind: str) -> WebhookSetting | None:
        return await self.store.get_webhook(uid, kind)

    async def set_webhook(self, uid: str, kind: str, payload: Any) -> WebhookSetting:
        """Validate and save a webhook setting; raises ``WebhookSettingError`` with a reason."""
        setting = parse_setting(kind, payload)
        await check_url(setting.url, allow_private=self.settings.webhook_allow_private)
        await self.store.set_webhook(uid, setting, now=self.clock())
        return setting

    async def delete_webhook(self, uid: str, kind: str) -> bool:
        require_kind(kind)
        return await self.store.delete_webhook(uid, kind)

    # --- processing --------------------------------------------------------------------------------
    async def process(self, conversation_id: str, *, events: EventSink | None = None) -> dict | None:
        """Process one conversation, at most once across all nodes.

        Returns the completed conversation object; None if it had no words (it is deleted) or if
        another worker holds or has finished it. Safe to call any number of times.
        """
        async with self._processing_slots:
            now = self.clock()
            claimed = await self._claims.save(ProcessingClaim(conversation_id, self.node_id, now, PROCESSING_LEASE))
            if claimed is None:
                return None
            conversation, segments = claimed
            photos = await self._photo_reads.save(conversation_id)
            if StoredSegments(segments).words == 0 and not photos:
                await self.store.delete_conversation(conversation_id, node=self.node_id)
                await delete_photos_of(self.store, conversation_id)
                log.info("conversation %s had no words: deleted", conversation_id)
                return None
            await _emit(events, {"type": "memory_processing_started",
                                 "memory": conversation_object(conversation, segments, photos=photos)})
            structured, discarded = await self.processor.structure(
                segments, language=conversation.language, started_at_iso=iso(conversation.started_at),
                photo_descriptions=[p["description"] for p in photos if p["description"] and not p["discarded"]])
            conversation.structured, conversation.discarded, conversation.status = structured, discarded, COMPLETED
            memory = conversation_object(conversation, segments, photos=photos)
            finished = await self._completions.save(ProcessingDone(
                conversation, self.node_id, memory_message(conversation.uid, memory), self.clock()))
            if not finished:
                log.warning("conversation %s: processing claim lost, another node finished it", conversation_id)
                return None
            self.deliverer.notify()
            log.info("conversation %s processed by %s (discarded=%s)", conversation_id,
                     structured.get("processor"), discarded)
            await _emit(events, {"type": "memory_created", "memory": memory, "messages": []})
            return memory

    async def _read_photos(self, conversation_ids: Sequence[str]) -> list[list[dict]]:
        found = await photos_of(self.store, conversation_ids)
        return [found[cid] for cid in conversation_ids]

    def _spawn_processing(self, conversation_id: str, events: EventSink | None) -> asyncio.Task:
        """Process in the background (once per conversation here); the task's result is
        ``process``'s, None if it failed."""
        if conversation_id in self._processing:
            return self._processing[conversation_id]

        async def run() -> dict | None:
            try:
                return await self.process(conversation_id, events=events)
            except Exception:
                # The claim expires and a later sweep (here or on another node) tries again.
                log.exception("processing conversation %s failed", conversation_id)
                return None
            finally:
                self._processing.pop(conversation_id, None)

        task = asyncio.create_task(run(), name=f"harken-process-{conversation_id}")
        self._processing[conversation_id] = task
        return task

    async def wait_for_processing(self) -> None:
        """Wait until the processing started so far has finished (tests, graceful shutdown)."""
        while self._processing:
            await asyncio.gather(*list(self._processing.values()), return_exceptions=True)

    # --- background checks -------------------------------------------------------------------------
    async def sweep(self) -> list[str]:
        """Start processing every conversation that is silent past its timeout and live nowhere,
        or whose processing claim expired. Returns their ids."""
        live_ids = {live.conversation_id for live in self._live}
        ids = await self.store.sweep_candidates(now=self.clock(), exclude=live_ids)
        for conversation_id in ids:
            self._spawn_processing(conversation_id, None)
        return ids

    async def check_once(self) -> None:
        """One round: renew leases (learning which were taken over), roll over silent live
        conversations, sweep."""
        lives = [live for live in self._live if not live.fenced]
        leases = {live: live.conversation_id for live in lives}
        taken = set(await self.store.renew_live([(cid, live.holder) for live, cid in leases.items()],
                                                self.clock() + self.live_lease))
        for live, cid in leases.items():
            # By holder: two handles here may name one conversation, and only the older lost it.
            if (cid, live.holder) in taken and live.conversation_id == cid:
                live.fenced = True           # its session learns at its next save
        for live in list(self._live):
            await live._roll_over_if_silent()
        await self.sweep()

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self.check_once()
            except Exception:
                log.exception("conversation check failed; retrying in %.0fs", self.check_interval)

    # --- audio chunks ------------------------------------------------------------------------------
    def _queue_audio(self, message: OutboxMessage) -> asyncio.Future | None:
        """Queue a chunk for the outbox without waiting; drop it (counted, logged) if the store
        has fallen so far behind that the queue is full."""
        size = len(message.body)
        if self._audio_queued_bytes + size > AUDIO_QUEUE_LIMIT:
            self.audio_bytes_dropped += size
            log.warning("audio-bytes webhook: store too slow, dropped %d bytes for uid=%s (total dropped %d)",
                        size, message.uid, self.audio_bytes_dropped)
            return None
        done = asyncio.get_running_loop().create_future()
        self._audio_queue.append((message, done))
        self._audio_queued_bytes += size
        self._audio_wake.set()
        return done

    async def _audio_writer(self) -> None:
        failures = 0
        while True:
            await self._audio_wake.wait()
            self._audio_wake.clear()
            while self._audio_queue:
                try:
                    await self._write_audio_batch()
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    failures += 1
                    delay = min(10.0, 0.2 * 2 ** min(failures, 6))
                    log.warning("audio chunks not written yet (%s); retrying in %.1fs", type(exc).__name__, delay)
                    await asyncio.sleep(delay)

    async def _write_audio_batch(self) -> None:
        batch = [self._audio_queue[i] for i in range(min(AUDIO_BATCH, len(self._audio_queue)))]
        await self.store.enqueue([message for message, _ in batch], now=self.clock())
        for _ in batch:
            message, done = self._audio_queue.popleft()
            self._audio_queued_bytes -= len(message.body)
            if not done.done():
                done.set_result(None)
        self.deliverer.notify()

    async def _flush_audio_queue(self) -> None:
        try:
            async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                while self._audio_queue:
                    await self._write_audio_batch()
        except Exception as exc:
            log.warning("%d audio chunks not written at shutdown: %s", len(self._audio_queue), exc)


class LiveConversation:
    """One session's handle on its conversation. Made by ``ConversationService.connect``."""

    def __init__(self, service: ConversationService, conversation: Conversation, segments: list[dict], *,
                 session_id: str, events: EventSink | None,
                 on_new_conversation: Callable[["LiveConversation"], None] | None,
                 last_memory_id: str | None, audio: WebhookSetting | None, holder: str | None = None,
                 voices: Voices | None = None, vocabulary: tuple[str, ...] = ()) -> None:
        self._service = service
        self.holder = holder               # our id on the conversation's live lease
        self.fenced = False                # a newer connection of the user took the conversation
        self._conversation = conversation
        self.uid = conversation.uid
        self.session_id = session_id
        self.last_memory_id = last_memory_id
        self.voices = voices               # the user's voices, if ``connect`` was asked for them
        self.vocabulary = vocabulary       # the user's terms as the session opened
        self.hooks: SessionHooks | None = None     # the session's, for REST calls that reach it
        self.existing_segments: list[dict] = segments
        self.generation = 0
        self._events = events
        self._on_new_conversation = on_new_conversation
        self._has_words = StoredSegments(segments).words > 0
        self._anchored = bool(segments)
        self._last_activity = conversation.finished_at
        self._lock = asyncio.Lock()
        self._closed = False
        self._chunker = AudioChunker(audio.interval_seconds or 5) if audio else None
        self._last_audio: asyncio.Future | None = None

    @property
    def conversation_id(self) -> str:
        return self._conversation.id

    @property
    def started_at(self) -> float:
        """Wall time (Unix seconds) of the conversation's time 0."""
        return self._conversation.started_at

    def time_offset(self, clock_origin: float, session_time: float = 0.0) -> float:
        """Seconds to add to a session-clock time to get conversation time.

        ``clock_origin`` is the wall time (Unix seconds) at which the session's audio clock read
        0; ``session_time`` is the session-clock time of the first word about to be added. A
        conversation with no segments yet is anchored there, so its first word starts at 0.0
        (as Omi does); a resumed one keeps its start, so times continue across reconnects.
        Call again after ``generation`` changes (a new conversation began).
        """
        if not self._anchored:
            self._conversation.started_at = clock_origin + session_time
            self._anchored = True
        offset = clock_origin - self._conversation.started_at
        # A connection that sent faster than real time (a file at full speed) left segment times
        # past the wall clock: the new words go after them, not back inside them.
        ends = [float(s.get("end") or 0.0) for s in self.existing_segments]
        if ends:
            offset = max(offset, max(ends) - session_time)
        return offset

    async def save_batch(self, changed: Sequence[dict], deleted_ids: Sequence[str] = ()) -> None:
        """Persist one 600 ms batch (stored segment dicts) and its realtime webhook row, in one
        transaction (shared with other sessions' batches: group commit). Returns once it is
        stored; waits only for the store, never for a webhook receiver.

        Raises ``LeaseLost`` if a newer connection of the user and source took the conversation
        over: the batch is not written; the session goes on with ``continue_alone``."""
        if self._closed:
            raise RuntimeError("save_batch after close: save the final batch first, then close")
        if self.fenced:
            raise LeaseLost(self._conversation.id)
        changed, deleted_ids = list(changed), list(deleted_ids)
        if not changed and not deleted_ids:
            return
        if changed:
            # Before any await: a silence check that runs meanwhile must see this activity.
            self._last_activity = self._service.clock()
        async with self._lock:
            enqueued = await self._save_locked(changed, deleted_ids)
        if enqueued:
            self._service.deliverer.notify()

    async def _save_locked(self, changed: list[dict], deleted_ids: list[str]) -> bool:
        """``save_batch``'s store step, under ``_lock``; True if a webhook row was enqueued."""
        batches, clock = self._service._batches, self._service.clock
        for _ in range(3):
            conversation = self._conversation
            now = clock()
            realtime = (realtime_message(self.uid, self.session_id, conversation.id, changed)
                        if changed else None)
            request = BatchRequest(conversation, changed, deleted_ids, now=now,
                                   live_until=now + self._service.live_lease, realtime=realtime,
                                   holder=self.holder)
            try:
                saved = await batches.save(request)
            except LeaseLost:
                self.fenced = True      # the session goes on elsewhere (continue_alone) and logs it
                raise
            if saved:
                break
            # Another node processed it (our lease had lapsed): carry on in a new conversation.
            log.warning("conversation %s was taken for processing; continuing in a new one", conversation.id)
            self._begin_new_conversation(now)
        else:
            raise RuntimeError("could not save the segment batch: the conversation kept being taken")
        if changed:
            conversation.finished_at = now
            self._has_words = self._has_words or StoredSegments(changed).words > 0
        return bool(request.enqueued)

    def continue_alone(self, started_at: float | None = None) -> None:
        """After ``LeaseLost``: a newer connection of the user and source writes the conversation
        now. Rather than ending, this handle goes on in a new conversation of its own (same
        source, its own lease; the row is created by its next save), announced through
        ``on_new_conversation``. Both connections may be live (Android's background streamer
        beside the foreground app), and a close would not end either: the app and the streamer
        reconnect after any close, and the reconnect would take the conversation back, a loop.

        ``started_at``: the new conversation's time 0 (wall time), when the session moves words
        over with their times; None anchors it at its next words."""
        lost = self._conversation.id
        self._begin_new_conversation(self._service.clock())
        self.fenced = False
        if started_at is not None:
            self._conversation.started_at = started_at
            self._anchored = True
        log.warning("conversation %s was taken over by a newer connection of uid=%s source=%s; sid=%s goes on in %s",
                    lost, self.uid, self._conversation.source, self.session_id, self._conversation.id)

    def words_shown(self) -> None:
        """The client is being shown words that are not stored yet (a cloud engine's words wait
        for their voice, up to ~1.6 s): the conversation is not silent. Without this the silence
        check could end it under those words, and they were withdrawn from it and shown again
        in the next conversation, where they do not belong."""
        if not self._closed:
            self._last_activity = self._service.clock()

    def anchor_at(self, started_at: float) -> None:
        """Fix the conversation's time 0 (wall time) now, for words a session moves into it with
        their times (a rollover carrying words that came after the last flush)."""
        self._conversation.started_at = started_at
        self._anchored = True

    def add_audio(self, pcm: Any) -> None:
        """Feed decoded PCM16 16 kHz audio for the audio-bytes webhook. Never blocks: complete
        chunks are queued for the outbox and written by a background task."""
        if self._chunker is None or self._closed:
            return
        for offset, chunk in self._chunker.add(pcm):
            self._queue_chunk(offset, chunk)

    async def close(self, usage: Usage | Mapping[str, Any] | None = None) -> None:
        """End of the session: the audio remainder goes out, usage is recorded, and the lease is
        released. The conversation stays in progress: a reconnect within the timeout resumes it,
        otherwise the sweep processes it."""
        if self._closed:
            return
        self._closed = True
        self._service._live.discard(self)
        if self._chunker is not None:
            remainder = self._chunker.flush()
            if remainder is not None:
                self._queue_chunk(*remainder)
            if self._last_audio is not None:
                try:
                    async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                        await asyncio.shield(self._last_audio)
                except TimeoutError:
                    log.warning("audio chunks of sid=%s still queued at close", self.session_id)
        async with self._lock:           # let an in-flight save_batch finish first
            conversation = self._conversation
        try:
            await self._service._ends.save(SessionEnd(
                conversation.id, self.uid, self._service.clock(), release=not self.fenced, holder=self.holder,
                usage=Usage.coerce(usage), session_id=self.session_id))
        except Exception:
            log.exception("closing conversation handle of sid=%s: store update failed", self.session_id)

    async def emit(self, event: dict) -> None:
        """Send an event to this session's client, if it is still connected."""
        if not self._closed:
            await _emit(self._events, event)

    # --- internals ----------------------------------------------------------------------------
    def _queue_chunk(self, offset: int, chunk: bytes) -> None:
        done = self._service._queue_audio(audio_message(self.uid, self.session_id, offset, chunk))
        if done is not None:
            self._last_audio = done

    def _begin_new_conversation(self, now: float) -> Conversation:
        """Switch to a fresh conversation, synchronously (no await), and tell the session."""
        old = self._conversation
        self._conversation = Conversation(
            id=str(uuid.uuid4()), uid=self.uid, status=IN_PROGRESS, language=old.language, source=old.source,
            created_at=now, started_at=now, finished_at=now, timeout_s=old.timeout_s)
        self.generation += 1
        self.existing_segments = []
        self._has_words = False
        self._anchored = False
        self._last_activity = now
        if self._on_new_conversation is not None:
            try:
                self._on_new_conversation(self)
            except Exception:
                log.exception("on_new_conversation callback failed")
        return old

    async def _roll_over_if_silent(self) -> None:
        """After ``conversation_timeout`` without segments, process the conversation and continue
        in a new one while the client stays connected. A conversation without words is kept."""
        if self._closed or self.fenced or not self._has_words:
            return    # a conversation taken over is the newer connection's to roll over
        service = self._service
        async with self._lock:
            now = service.clock()
            if self._closed or now - self._last_activity < self._conversation.timeout_s:
                return
            old = await self._roll_over_locked(now)
        log.info("conversation %s silent for %.0fs: processing; continuing in %s", old.id, old.timeout_s,
                 self._conversation.id)
        service._spawn_processing(old.id, self.emit)

    async def finish_now(self) -> str | None:
        """End the conversation now (the user asked to process it) and continue in a new one.

        Under the lock that orders this handle's saves, the session's unsaved segments are
        stored in the ending conversation first, so nothing transcribed before the call lands
        in the next one or nowhere. Returns the ended conversation's id (for the caller to
        process); None if it has no words (it is kept) or the handle no longer writes.

        Raises ``LeaseLost`` if a newer connection of the user and source took the conversation
        over before this handle learnt of it (its save is refused): the newer connection holds
        the conversation now, so the caller finishes it there (``ConversationService.process_now``).
        The session is told (``unsaved_refused``) and goes on alone with the words it gave."""
        if self._closed or self.fenced:
            return None
        service = self._service
        settled = self.hooks.settled(SETTLE_TIMEOUT) if self.hooks is not None else contextlib.nullcontext()
        async with settled, self._lock:
            if self._closed:
                return None
            if self.hooks is not None:
                changed, deleted_ids = self.hooks.take_unsaved()
                if changed or deleted_ids:
                    if changed:
                        self._last_activity = service.clock()
                    try:
                        if await self._save_locked(changed, deleted_ids):
                            service.deliverer.notify()
                    except LeaseLost:
                        self.hooks.unsaved_refused()
                        raise
            if not self._has_words:
                return None
            old = await self._roll_over_locked(service.clock())
        log.info("conversation %s: processing on request; continuing in %s", old.id, self._conversation.id)
        return old.id

    async def _roll_over_locked(self, now: float) -> Conversation:
        """Switch to a new conversation and create it (the next batch would otherwise); returns
        the one that ended. Under ``_lock``."""
        service = self._service
        old = self._begin_new_conversation(now)
        try:
            await service.store.create_conversation(self._conversation, live_until=now + service.live_lease,
                                                    holder=self.holder)
        except Exception:
            log.exception("creating the next conversation failed; the next batch will create it")
        return old


async def _emit(events: EventSink | None, event: dict) -> None:
    if events is None:
        return
    try:
        await events(event)
    except Exception as exc:            # the client went away: events are best effort
        log.debug("event %s not delivered: %s", event.get("type"), exc)
