"""Persistence: one SQLAlchemy async Core code path for SQLite (default) and PostgreSQL.

Every method is one transaction and takes the time (``now``) from its caller, so the policy
(what "timed out" means, how long a claim lasts) lives in ``lifecycle.py``/``outbox.py`` and
tests can drive time. The few places where the engines differ are marked ``# dialect``:
upsert syntax, row locking (``FOR UPDATE SKIP LOCKED`` and advisory locks on PostgreSQL;
SQLite instead serialises writers with ``BEGIN IMMEDIATE``) and connection set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Sequence

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..config import Settings
from . import migrations
from .model import COMPLETED, IN_PROGRESS, PROCESSING, Conversation, Usage, WebhookSetting, word_count
from .schema import DUE_HEADS, conversations, outbox, people, segments, speech_profiles, usage, webhooks
from .sqlite_loop import LoopWriter, take_over_sqlite_transactions

log = logging.getLogger(__name__)

PENDING = "pending"
DEAD = "dead"

# Namespaces of PostgreSQL advisory locks (the first key of pg_advisory_xact_lock(int, int)).
_USER_LOCKS, _KEY_LOCKS = 0x6875, 0x6B79

# The subquery's sort fixes the order in which the aggregate takes the locks (by lock key, so
# two names with one hash are one lock, taken once).
_ORDERED_ADVISORY_LOCKS = sa.text(
    "SELECT count(pg_advisory_xact_lock(:namespace, h)) FROM "
    "(SELECT DISTINCT hashtext(name) AS h FROM unnest(CAST(:names AS text[])) AS name ORDER BY h) AS ordered")

# SQLite waits this long for another writer (another worker process) before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000


def database_url(settings: Settings) -> str:
    """The SQLAlchemy URL of ``settings`` (default: ``<data_dir>/harken.db``)."""
    return settings.database_url or f"sqlite:///{Path(settings.data_dir) / 'harken.db'}"


def async_driver_url(url: str) -> sa.URL:
    """``sqlite:///x`` → aiosqlite, ``postgresql://`` or ``postgres://`` → asyncpg."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite")
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg")
    raise ValueError(f"unsupported database {backend!r}: use sqlite:///FILE or postgresql://…")


class LeaseLost(Exception):
    """A newer connection of the user took the conversation over (on this node or another):
    the older writer must stop writing it."""


# (owner embedding or None, [(person_id, name, embedding)]): ``Store.load_voices``.
Voices = tuple[bytes | None, list[tuple[str, str, bytes]]]


@dataclass
class OpenResult:
    """What ``open_conversation`` found: the conversation to write to and what to process, and
    what else a connecting session needs of the user's rows (read in the same transaction)."""

    conversation: Conversation
    resumed: bool
    segments: list[dict]
    stale_ids: list[str]
    webhooks: dict[str, WebhookSetting] = field(default_factory=dict)   # the user's settings by kind
    last_memory_id: str | None = None             # as ``last_completed_id``
    voices: Voices | None = None                  # as ``load_voices``, if the request asked


@dataclass
class SpeechProfileRow:
    """The owner's stored voice: a speaker embedding (float32 bytes), never the audio."""

    uid: str
    embedding: bytes
    speech_seconds: float
    created_at: float
    updated_at: float


@dataclass
class PersonRow:
    """Someone the user named; ``embedding`` is None until a voice sample was added."""

    id: str
    uid: str
    name: str
    embedding: bytes | None
    samples: int
    speech_seconds: float
    created_at: float


@dataclass
class OutboxRow:
    id: int
    uid: str
    kind: str
    ordering_key: str
    url: str
    params: dict
    headers: dict
    content_type: str
    body: bytes
    created_at: float
    attempts: int


@dataclass
class OutboxMessage:
    """A webhook request to enqueue; sent only if the user has a ``kind`` webhook set."""

    uid: str
    kind: str
    ordering_key: str
    body: bytes
    content_type: str = "application/json"
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)


@dataclass
class OpenRequest:
    """One connecting session for ``Store.open_conversations`` (the arguments of ``open_conversation``)."""

    new: Conversation
    now: float
    live_until: float
    holder: str | None = None
    voices: bool = False        # also read the user's voices (a session identifying speakers)


@dataclass
class BatchRequest:
    """One session's segment batch for ``Store.save_batches`` (the arguments of ``save_batch``)."""

    conversation: Conversation
    changed: Sequence[dict]
    deleted_ids: Sequence[str]
    now: float
    live_until: float
    realtime: OutboxMessage | None = None
    holder: str | None = None
    enqueued: bool = False      # set by save_batches: its realtime row may have been written


@dataclass
class SessionEnd:
    """What a closing session writes (``Store.end_sessions``): its live lease given back (unless
    ``release`` is off: it was fenced off, the lease is another connection's) and its usage."""

    conversation_id: str | None
    uid: str
    now: float
    release: bool = True
    holder: str | None = None       # release only if this connection still holds the lease
    usage: Usage | None = None
    session_id: str | None = None


@dataclass
class ProcessingClaim:
    """A node asking to process a conversation (``Store.claim_for_processing_many``)."""

    conversation_id: str
    node: str
    now: float
    lease: float       # seconds the claim lasts


@dataclass
class ProcessingDone:
    """A processed conversation to mark completed (``Store.finish_processing_many``): its
    summary, and the memory webhook enqueued in the same transaction."""

    conversation: Conversation
    node: str
    memory_webhook: OutboxMessage | None
    now: float


@dataclass
class Settlement:
    """Outcomes of a round of deliveries, written back in one transaction."""

    delivered: list[OutboxRow] = field(default_factory=list)
    retry: list[tuple[OutboxRow, float, str]] = field(default_factory=list)   # row, next attempt, error
    dead: list[tuple[OutboxRow, str]] = field(default_factory=list)           # row, error

    def __bool__(self) -> bool:
        return bool(self.delivered or self.retry or self.dead)


class Store:
    """The conversation store. ``await open()`` before use (it migrates); ``await close()`` after."""

    def __init__(self, url: str, *, pg_schema: str | None = None, pool_size: int = 10) -> None:
        self.url = async_driver_url(url)
        self.dialect = self.url.get_backend_name()
        self._pg_schema = pg_schema
        self._pool_size = pool_size
        self._local_writer = asyncio.Lock() if self.dialect == "sqlite" else None
        self.engine: AsyncEngine | None = None
        self._loop_writer: LoopWriter | None = None      # SQLite file: writes on the loop's thread
        self.batch_transactions = 0        # save_batches transactions so far (group commit's effect)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Store":
        return cls(database_url(settings))

    async def open(self, *, schema_version: int = migrations.SCHEMA_VERSION) -> "Store":
        self.engine = self._create_engine()
        try:
            await migrations.migrate(self.engine, schema_version)
        except BaseException:
            await self.engine.dispose()
            self.engine = None
            raise
        return self

    async def close(self) -> None:
        if self._loop_writer is not None:
            await self._loop_writer.close()
            self._loop_writer = None
        if self.engine is not None:
            await self.engine.dispose()
            self.engine = None

    async def ping(self) -> bool:
        """True if the database answers (readiness)."""
        try:
            async with self._read() as conn:
                await conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    # --- connections (dialect) ---------------------------------------------------------------
    def _create_engine(self) -> AsyncEngine:
        if self.dialect == "sqlite":
            database = self.url.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
            take_over_sqlite_transactions(engine.sync_engine, busy_timeout_ms=SQLITE_BUSY_TIMEOUT_MS)
            if database and database != ":memory:":      # (each :memory: connection is its own database)
                self._loop_writer = LoopWriter(self.url, self._checkpoint)
            return engine
        connect_args: dict[str, Any] = {}
        if self._pg_schema:
            connect_args["server_settings"] = {"search_path": self._pg_schema}
        return create_async_engine(self.url, pool_size=self._pool_size, max_overflow=self._pool_size,
                                   pool_pre_ping=True, connect_args=connect_args)

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        assert self.engine is not None, "Store.open() was not awaited"
        if self._local_writer is None:
            async with self.engine.begin() as conn:
                yield conn
            return
        # SQLite allows one writer; two connections of this process racing for the file lock
        # would meet SQLite's busy handler, which sleeps in steps of up to 100 ms. Queue them
        # here instead (FIFO, no sleeping); other processes still meet the busy handler. Then
        # the transaction runs on the loop's thread (sqlite_loop.py) unless another process
        # holds the file's write lock.
        async with self._local_writer:
            conn = self._loop_writer.try_begin() if self._loop_writer is not None else None
            if conn is not None:
                with self._loop_writer.transaction(conn) as on_the_loop:
                    yield on_the_loop
                return
            async with self.engine.begin() as conn:      # another process is writing: wait off the loop
                yield conn

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        assert self.engine is not None, "Store.open() was not awaited"
        async with self.engine.connect() as conn:
            if self.dialect == "sqlite":     # a reader must not queue behind writers
                await conn.execution_options(sqlite_begin="DEFERRED")
            async with conn.begin():
                yield conn

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database file (SQLite), in the threaded engine's thread: its
        fsyncs must not stall the loop. PASSIVE: it never waits for readers or writers."""
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            await (await raw.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)")).close()

    @property
    def lock_waits(self) -> int:
        """SQLite write transactions so far that found another process holding the file's write
        lock and so waited for it in a thread (``harken serve --workers N`` on one SQLite file)."""
        return self._loop_writer.lock_waits if self._loop_writer is not None else 0

    @property
    def sync_engines(self) -> list[sa.Engine]:
        """The engines transactions begin on (the threaded one, and the loop's on a SQLite file)."""
        engines = [self.engine.sync_engine] if self.engine is not None else []
        return engines + ([self._loop_writer.engine] if self._loop_writer is not None else [])

    async def _lock(self, conn: AsyncConnection, namespace: int, names: Iterable[str]) -> None:
        """Transaction-scoped advisory locks on PostgreSQL, all in one statement, taken in the
        order of their lock keys so that two transactions never wait on each other in a cycle.
        SQLite needs none: its writers are already serial (``BEGIN IMMEDIATE``)."""
        names = sorted(set(names))
        if self.dialect != "postgresql" or not names:
            return
        await conn.execute(_ORDERED_ADVISORY_LOCKS, {"namespace": namespace, "names": names})

    async def _lock_keys(self, conn: AsyncConnection, keys: Iterable[str]) -> None:
        """Serialise outbox head changes per ordering key: an insert deciding "am I the head?"
        and a settlement promoting the next head must not interleave, or a row is orphaned."""
        await self._lock(conn, _KEY_LOCKS, keys)

    def _insert(self, table: sa.Table):
        return _dialect_insert(self.dialect, table)

    # --- conversations -----------------------------------------------------------------------
    async def open_conversation(self, new: Conversation, *, now: float, live_until: float,
                                holder: str | None = None) -> OpenResult:
        """Resume the user's in-progress conversation of ``new.source`` if its silence is under ``new.timeout_s``,
        else insert ``new``. In-progress ones that timed out (and are not live elsewhere) are
        returned as ``stale_ids`` for processing.

        ``holder`` takes the live lease even if another connection still holds it: the newest
        connection wins (the older one may be on a node that died, or about to notice its client
        left), and the older one's writes are refused from now on (``LeaseLost``)."""
        return (await self.open_conversations([OpenRequest(new, now, live_until, holder)]))[0]

    async def open_conversations(self, requests: Sequence[OpenRequest]) -> list[OpenResult]:
        """``open_conversation`` for many connecting sessions in ONE transaction with a fixed number
        of statements (group commit). A connection ramp (a node's clients coming back after a
        restart or a failover) opened one write transaction per session, and they queued for the
        writer lock ahead of the running sessions' batches: at 300 streams connecting over 6 s,
        an open waited up to 3.5 s and so did every batch behind it. At most one request per user
        (``ValueError`` otherwise): a user's decisions are serial."""
        by_uid = {request.new.uid: request for request in requests}
        if len(by_uid) != len(requests):
            raise ValueError("open_conversations: at most one request per user")
        if not requests:
            return []
        async with self._write() as conn:
            await self._lock(conn, _USER_LOCKS, by_uid)
            rows = (await conn.execute(_IN_PROGRESS_OF_USERS, {"uids": list(by_uid)})).mappings().all()
            resume: dict[str, Any] = {}
            stale: dict[str, list[str]] = {uid: [] for uid in by_uid}
            for row in rows:        # per user, newest first
                request = by_uid[row["uid"]]
                # One live conversation per source (a pendant and the phone at once never take
                # each other's over): another source's conversation is stale only once silent.
                same_source = row["source"] == request.new.source
                silence = request.now - row["finished_at"]
                if same_source and row["uid"] not in resume and silence < request.new.timeout_s:
                    resume[row["uid"]] = row
                elif ((row["live_until"] is None or row["live_until"] < request.now)
                      and (same_source or silence >= row["timeout_s"])):
                    stale[row["uid"]].append(row["id"])
            if resume:
                await conn.execute(
                    _RESUME,
                    [{"o_id": row["id"], "o_timeout": by_uid[uid].new.timeout_s, "o_until": by_uid[uid].live_until,
                      "o_holder": by_uid[uid].holder} for uid, row in resume.items()])
            fresh = [request for request in requests if request.new.uid not in resume]
            if fresh:
                await conn.execute(_INSERT_CONVERSATION, [{**_conversation_row(r.new), "live_until": r.live_until,
                                                   "live_by": r.holder} for r in fresh])
            segments_of = await self._segments_of(conn, [row["id"] for row in resume.values()])
            settings: dict[str, dict[str, WebhookSetting]] = {uid: {} for uid in by_uid}
            for row in (await conn.execute(_WEBHOOKS_OF_USERS, {"uids": list(by_uid)})).mappings():
                settings[row["uid"]][row["kind"]] = _webhook_setting(row)
            last_memories = dict((await conn.execute(_LAST_COMPLETED, {"uids": list(by_uid)})).all())
            with_voices = [uid for uid, request in by_uid.items() if request.voices]
            voices = await self._voices_of(conn, with_voices) if with_voices else {}
        results = []
        for request in requests:
            uid = request.new.uid
            row = resume.get(uid)
            conversation, found = request.new, []
            if row is not None:
                conversation = _conversation(row)
                conversation.timeout_s = request.new.timeout_s
                found = segments_of[conversation.id]
            results.append(OpenResult(conversation, row is not None, found, stale[uid], settings[uid],
                                      last_memories.get(uid), voices.get(uid)))
        return results

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(conversations).where(conversations.c.id == conversation_id))
                   ).mappings().first()
        return _conversation(row) if row else None

    async def get_with_segments(self, conversation_id: str) -> tuple[Conversation, list[dict]] | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(conversations).where(conversations.c.id == conversation_id))
                   ).mappings().first()
            if row is None:
                return None
            return _conversation(row), await self._segments(conn, conversation_id)

    async def load_segments(self, conversation_id: str) -> list[dict]:
        async with self._read() as conn:
            return await self._segments(conn, conversation_id)

    async def _segments(self, conn: AsyncConnection, conversation_id: str) -> list[dict]:
        return (await self._segments_of(conn, [conversation_id]))[conversation_id]

    async def _segments_of(self, conn: AsyncConnection, conversation_ids: Sequence[str]) -> dict[str, list[dict]]:
        """Each conversation's segments in time order, with one query."""
        by_id: dict[str, list[dict]] = {cid: [] for cid in conversation_ids}
        if by_id:
            rows = await conn.execute(_SEGMENTS_OF, {"ids": list(by_id)})
            for conversation_id, data in rows:
                by_id[conversation_id].append(orjson.loads(data))
        return by_id

    async def list_conversations(self, uid: str, *, limit: int, offset: int = 0,
                                 include_discarded: bool = True) -> list[tuple[Conversation, list[dict]]]:
        """The user's conversations, newest first, with their segments."""
        c = conversations
        query = sa.select(c).where(c.c.uid == uid)
        if not include_discarded:
            query = query.where(c.c.discarded == sa.false())
        query = query.order_by(c.c.created_at.desc(), c.c.id.desc()).limit(limit).offset(offset)
        async with self._read() as conn:
            rows = [_conversation(r) for r in (await conn.execute(query)).mappings()]
            by_id = await self._segments_of(conn, [r.id for r in rows])
        return [(r, by_id[r.id]) for r in rows]

    async def last_completed_id(self, uid: str) -> str | None:
        async with self._read() as conn:
            return dict((await conn.execute(_LAST_COMPLETED, {"uids": [uid]})).all()).get(uid)

    async def save_batch(
        self,
        conversation: Conversation,
        changed: Sequence[dict],
        deleted_ids: Sequence[str],
        *,
        now: float,
        live_until: float,
        realtime: OutboxMessage | None,
        holder: str | None = None,
    ) -> bool:
        """Write one segment batch, and its realtime webhook row, in one transaction: the
        one-request case of ``save_batches`` (see there). Returns False if the conversation is no
        longer in progress; raises ``LeaseLost`` if another connection holds its lease."""
        request = BatchRequest(conversation, changed, deleted_ids, now=now, live_until=live_until,
                               realtime=realtime, holder=holder)
        (outcome,) = await self.save_batches([request])
        if isinstance(outcome, LeaseLost):
            raise outcome
        return outcome

    async def save_batches(self, requests: Sequence["BatchRequest"]) -> list["bool | LeaseLost"]:
        """Write many conversations' segment batches, and their realtime webhook rows, in ONE
        transaction with a fixed number of statements however many there are (group commit:
        a node's sessions share one commit per round instead of queueing for the writer lock one
        after another). At most one request per conversation (``ValueError`` otherwise).

        Each request's outcome, in order, is what ``save_batch`` would have given it alone:
        - True: written. ``conversation`` is the live handle's view: its ``started_at`` is
          written (the start is anchored at the first word), and the row is created if missing
          (its creation failed earlier);
        - False, nothing of it written: the conversation is no longer in progress (another node
          processed it); the caller starts a new one and saves again;
        - a ``LeaseLost``, nothing of it written: the request names a ``holder`` and another
          connection holds the lease.
        An unexpected error rolls back the whole group."""
        by_id = {request.conversation.id: request for request in requests}
        if len(by_id) != len(requests):
            raise ValueError("save_batches: at most one request per conversation")
        if not requests:
            return []
        segment_rows = {cid: [_segment_row(cid, seg) for seg in request.changed] for cid, request in by_id.items()}
        statements = _BATCH_STATEMENTS[self.dialect]
        async with self._write() as conn:
            self.batch_transactions += 1
            found = {row.id: row for row in await conn.execute(statements.found, {"ids": list(by_id)})}
            outcomes: list[bool | LeaseLost] = []
            updates: list[dict] = []
            inserts: list[dict] = []
            for request in requests:
                cid, row = request.conversation.id, found.get(request.conversation.id)
                finished_at = request.now if request.changed else None
                if row is None:
                    new = _conversation_row(request.conversation)
                    new.update(live_until=request.live_until, live_by=request.holder)
                    if finished_at is not None:
                        new["finished_at"] = finished_at
                    inserts.append(new)
                elif row.status != IN_PROGRESS:
                    outcomes.append(False)
                    continue
                elif request.holder is not None and row.live_by != request.holder:
                    outcomes.append(LeaseLost(cid))
                    continue
                else:
                    updates.append({"row_id": cid, "new_live_until": request.live_until,
                                    "new_started_at": request.conversation.started_at,
                                    "new_finished_at": finished_at})
                outcomes.append(True)
            written = [request for request, outcome in zip(requests, outcomes) if outcome is True]
            if updates:
                await conn.execute(statements.update, updates)
            if inserts:
                await conn.execute(_INSERT_CONVERSATION, inserts)
            upserts = [seg for request in written for seg in _unique_by_id(segment_rows[request.conversation.id])]
            if upserts:
                await conn.execute(statements.upsert, upserts)
            deletes = [{"cid": request.conversation.id, "sid": str(sid)}
                       for request in written for sid in request.deleted_ids]
            if deletes:
                await conn.execute(statements.delete, deletes)
            with_rows = [request for request in written if request.realtime is not None]
            if with_rows:
                await self._lock_keys(conn, [request.realtime.ordering_key for request in with_rows])
                rows = await self._enqueue(conn, [(request.realtime, request.now) for request in with_rows])
                # Only users with a realtime webhook get a row; the deliverer is woken for those.
                for request in with_rows:
                    request.enqueued = rows != 0
        return outcomes

    async def renew_live(self, leases: Iterable[tuple[str, str | None]], live_until: float) -> list[str]:
        """Extend the leases given as (conversation id, holder). Returns the ids whose lease a
        newer connection took (left alone); a holder of None renews unconditionally."""
        c, holders = conversations, dict(leases)
        if not holders:
            return []
        query = sa.select(c.c.id, c.c.live_by, c.c.status).where(c.c.id.in_(list(holders))).order_by(c.c.id)
        if self.dialect == "postgresql":      # dialect: rows locked in id order, as save_batches does
            query = query.with_for_update()
        async with self._write() as conn:
            rows = (await conn.execute(query)).all()
            renewed = [cid for cid, live_by, _ in rows if holders[cid] is None or live_by == holders[cid]]
            if renewed:
                await conn.execute(sa.update(c).where(c.c.id.in_(renewed)).values(live_until=live_until))
        return [cid for cid, live_by, status in rows
                if holders[cid] is not None and status == IN_PROGRESS and live_by != holders[cid]]

    async def release_live(self, conversation_id: str, *, holder: str | None = None) -> None:
        """End a live lease (the session closed); a lease another connection took is kept."""
        await self.end_sessions([SessionEnd(conversation_id, uid="", now=0.0, holder=holder)])

    async def end_sessions(self, ends: Sequence[SessionEnd]) -> list[None]:
        """Closing sessions, in one transaction: live leases released (a lease another connection
        took is kept), usage rows recorded."""
        releases = sorted((e for e in ends if e.release), key=lambda e: e.conversation_id)  # rows locked in id order
        used = [e for e in ends if e.usage is not None]
        async with self._write() as conn:
            for holder_checked, release in ((True, _RELEASE_HELD), (False, _RELEASE)):
                params = [{"e_id": e.conversation_id, "e_holder": e.holder}
                          for e in releases if (e.holder is not None) == holder_checked]
                if params:
                    await conn.execute(release, params)
            if used:
                await conn.execute(_INSERT_USAGE, [
                    {"uid": e.uid, "session_id": e.session_id, "conversation_id": e.conversation_id,
                     "recorded_at": e.now, "audio_seconds": e.usage.audio_seconds,
                     "speech_seconds": e.usage.speech_seconds, "words": e.usage.words, "provider": e.usage.provider}
                    for e in used])
        return [None] * len(ends)

    async def create_conversation(self, conversation: Conversation, *, live_until: float | None = None,
                                  holder: str | None = None) -> None:
        async with self._write() as conn:
            await conn.execute(sa.insert(conversations).values(**_conversation_row(conversation),
                                                               live_until=live_until, live_by=holder))

    async def sweep_candidates(self, *, now: float, exclude: Iterable[str] = (), limit: int = 100) -> list[str]:
        """In-progress conversations silent past their timeout and live nowhere, and processing
        ones whose claim expired (their node died mid-way)."""
        c = conversations
        timed_out = sa.and_(c.c.status == IN_PROGRESS, c.c.finished_at + c.c.timeout_s <= now,
                            sa.or_(c.c.live_until.is_(None), c.c.live_until < now))
        abandoned = sa.and_(c.c.status == PROCESSING, c.c.claim_expires < now)
        query = sa.select(c.c.id).where(sa.or_(timed_out, abandoned)).order_by(c.c.finished_at).limit(limit)
        excluded = set(exclude)
        async with self._read() as conn:
            return [cid for (cid,) in await conn.execute(query) if cid not in excluded]

    async def claim_for_processing(self, conversation_id: str, *, node: str, now: float,
                                   lease: float) -> tuple[Conversation, list[dict]] | None:
        """Atomically take a conversation for processing; None if someone else has it or it is done."""
        return (await self.claim_for_processing_many([ProcessingClaim(conversation_id, node, now, lease)]))[0]

    async def claim_for_processing_many(
            self, claims: Sequence[ProcessingClaim]) -> list[tuple[Conversation, list[dict]] | None]:
        """Take many conversations for processing in ONE transaction with a fixed number of
        statements (group commit: a sweep's conversations are claimed together, not one
        transaction each). Each outcome, in order, is what ``claim_for_processing`` gives: the
        conversation and its segments, or None when it is done or another claim is still valid.
        At most one claim per conversation (``ValueError`` otherwise)."""
        c = conversations
        by_id = {claim.conversation_id: claim for claim in claims}
        if len(by_id) != len(claims):
            raise ValueError("claim_for_processing_many: at most one claim per conversation")
        if not claims:
            return []
        query = sa.select(c).where(c.c.id.in_(list(by_id))).order_by(c.c.id)
        if self.dialect == "postgresql":      # lock the rows, in id order (no deadlock cycles)
            query = query.with_for_update()
        async with self._write() as conn:
            found = {row["id"]: row for row in (await conn.execute(query)).mappings()}
            taken = [claim for claim in claims
                     if (row := found.get(claim.conversation_id)) is not None and (
                         row["status"] == IN_PROGRESS
                         or (row["status"] == PROCESSING and row["claim_expires"] is not None
                             and row["claim_expires"] < claim.now))]
            if not taken:
                return [None] * len(claims)
            await conn.execute(
                sa.update(c).where(c.c.id == sa.bindparam("k_id")).values(
                    status=PROCESSING, claimed_by=sa.bindparam("k_node"), claim_expires=sa.bindparam("k_expires")),
                [{"k_id": k.conversation_id, "k_node": k.node, "k_expires": k.now + k.lease} for k in taken])
            segments_of = await self._segments_of(conn, [k.conversation_id for k in taken])
        claimed = {}
        for k in taken:
            conversation = _conversation(found[k.conversation_id])
            conversation.status = PROCESSING
            claimed[k.conversation_id] = (conversation, segments_of[k.conversation_id])
        return [claimed.get(claim.conversation_id) for claim in claims]

    async def finish_processing(self, conversation: Conversation, *, node: str,
                                memory_webhook: OutboxMessage | None, now: float) -> bool:
        """Mark a claimed conversation completed with its summary and enqueue the memory webhook,
        together. False if the claim was lost (another node finished it)."""
        return (await self.finish_processing_many([ProcessingDone(conversation, node, memory_webhook, now)]))[0]

    async def finish_processing_many(self, done: Sequence[ProcessingDone]) -> list[bool]:
        """``finish_processing`` for many conversations in ONE transaction: each outcome, in
        order, is False when that claim was lost, and then nothing of it is written."""
        c = conversations
        by_id = {d.conversation.id: d for d in done}
        if len(by_id) != len(done):
            raise ValueError("finish_processing_many: at most one per conversation")
        if not done:
            return []
        query = sa.select(c.c.id, c.c.status, c.c.claimed_by).where(c.c.id.in_(list(by_id))).order_by(c.c.id)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        async with self._write() as conn:
            found = {row.id: row for row in await conn.execute(query)}
            held = [d for d in done if (row := found.get(d.conversation.id)) is not None
                    and row.status == PROCESSING and row.claimed_by == d.node]
            if held:
                await conn.execute(
                    sa.update(c).where(c.c.id == sa.bindparam("d_id")).values(
                        status=COMPLETED, structured=sa.bindparam("d_structured"),
                        discarded=sa.bindparam("d_discarded"), claimed_by=None, claim_expires=None, live_until=None),
                    [{"d_id": d.conversation.id, "d_structured": _json(d.conversation.structured),
                      "d_discarded": d.conversation.discarded} for d in held])
                webhooks = [(d.memory_webhook, d.now) for d in held if d.memory_webhook is not None]
                if webhooks:
                    await self._lock_keys(conn, [message.ordering_key for message, _ in webhooks])
                    await self._enqueue(conn, webhooks)
        finished = {d.conversation.id for d in held}
        return [d.conversation.id in finished for d in done]

    async def release_claims(self, node: str) -> int:
        """Give back the processing claims ``node`` holds (a graceful stop), so that the next
        sweep anywhere processes those conversations instead of waiting for the claims to expire."""
        c = conversations
        held = sa.and_(c.c.claimed_by == node, c.c.status == PROCESSING)
        async with self._write() as conn:
            if self.dialect == "postgresql":
                # Lock them in id order first, as batch saves do: an UPDATE alone locks rows in
                # scan order and could deadlock with a group commit holding some of them.
                await conn.execute(sa.select(c.c.id).where(held).order_by(c.c.id).with_for_update())
            result = await conn.execute(
                sa.update(c).where(held).values(status=IN_PROGRESS, claimed_by=None, claim_expires=None))
        return result.rowcount

    async def delete_conversation(self, conversation_id: str, *, node: str | None = None) -> bool:
        """Delete a conversation and its segments (only if ``node`` holds its claim, when given)."""
        c, s = conversations, segments
        condition = c.c.id == conversation_id
        if node is not None:
            condition = sa.and_(condition, c.c.claimed_by == node)
        async with self._write() as conn:
            result = await conn.execute(sa.delete(c).where(condition))
            if result.rowcount:
                await conn.execute(sa.delete(s).where(s.c.conversation_id == conversation_id))
            return bool(result.rowcount)

    # --- webhook settings --------------------------------------------------------------------
    async def get_webhook(self, uid: str, kind: str) -> WebhookSetting | None:
        w = webhooks
        async with self._read() as conn:
            row = (await conn.execute(sa.select(w).where(w.c.uid == uid, w.c.kind == kind))).mappings().first()
        return _webhook_setting(row) if row else None

    async def set_webhook(self, uid: str, setting: WebhookSetting, *, now: float) -> None:
        w = webhooks
        stmt = self._insert(w).values(uid=uid, kind=setting.kind, url=setting.url,
                                      interval_seconds=setting.interval_seconds, updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[w.c.uid, w.c.kind], set_={
            "url": stmt.excluded.url, "interval_seconds": stmt.excluded.interval_seconds,
            "updated_at": stmt.excluded.updated_at})
        async with self._write() as conn:
            await conn.execute(stmt)

    async def delete_webhook(self, uid: str, kind: str) -> bool:
        w = webhooks
        async with self._write() as conn:
            result = await conn.execute(sa.delete(w).where(w.c.uid == uid, w.c.kind == kind))
        return bool(result.rowcount)

    # --- voices: the owner's speech profile and named people ---------------------------------
    async def get_speech_profile(self, uid: str) -> SpeechProfileRow | None:
        p = speech_profiles
        async with self._read() as conn:
            row = (await conn.execute(sa.select(p).where(p.c.uid == uid))).mappings().first()
        return SpeechProfileRow(**row) if row else None

    async def set_speech_profile(self, uid: str, embedding: bytes, *, speech_seconds: float, now: float) -> None:
        """Create or replace the user's profile (``created_at`` is kept on a replace)."""
        p = speech_profiles
        stmt = self._insert(p).values(uid=uid, embedding=embedding, speech_seconds=speech_seconds,
                                      created_at=now, updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[p.c.uid], set_={
            "embedding": stmt.excluded.embedding, "speech_seconds": stmt.excluded.speech_seconds,
            "updated_at": stmt.excluded.updated_at})
        async with self._write() as conn:
            await conn.execute(stmt)

    async def delete_speech_profile(self, uid: str) -> bool:
        async with self._write() as conn:
            result = await conn.execute(sa.delete(speech_profiles).where(speech_profiles.c.uid == uid))
        return bool(result.rowcount)

    async def add_person(self, person: PersonRow) -> None:
        async with self._write() as conn:
            await conn.execute(sa.insert(people).values(**vars(person)))

    async def get_person(self, uid: str, person_id: str) -> PersonRow | None:
        """The person, if it is ``uid``'s (another user's person is reported as missing)."""
        p = people
        async with self._read() as conn:
            row = (await conn.execute(sa.select(p).where(p.c.id == person_id, p.c.uid == uid))).mappings().first()
        return PersonRow(**row) if row else None

    async def list_people(self, uid: str) -> list[PersonRow]:
        p = people
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(p).where(p.c.uid == uid).order_by(p.c.created_at, p.c.id))).mappings()
            return [PersonRow(**row) for row in rows]

    async def delete_person(self, uid: str, person_id: str) -> bool:
        p = people
        async with self._write() as conn:
            result = await conn.execute(sa.delete(p).where(p.c.id == person_id, p.c.uid == uid))
        return bool(result.rowcount)

    async def set_person_voice(self, uid: str, person_id: str, embedding: bytes, *, samples: int,
                               speech_seconds: float, expected_samples: int) -> bool:
        """Store a person's new voice if it still has ``expected_samples`` samples (the count the
        new embedding was averaged from); False if the person is gone or changed meanwhile, so the
        caller can re-read and average again instead of losing a concurrent sample."""
        p = people
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(p).where(p.c.id == person_id, p.c.uid == uid, p.c.samples == expected_samples)
                .values(embedding=embedding, samples=samples, speech_seconds=speech_seconds))
        return bool(result.rowcount)

    async def load_voices(self, uid: str) -> Voices:
        """``(owner embedding or None, [(person_id, name, embedding)])`` of the people with a
        voice, in one query (a session loads them before its audio flows; one that connects
        through ``open_conversations`` gets them from there)."""
        async with self._read() as conn:
            return (await self._voices_of(conn, [uid])).get(uid, (None, []))

    async def _voices_of(self, conn: AsyncConnection, uids: Sequence[str]) -> dict[str, Voices]:
        """``load_voices`` of several users in one query (every user in ``uids`` gets an entry)."""
        rows = (await conn.execute(_VOICES, {"uids": list(uids)})).all()
        found: dict[str, Voices] = {uid: (None, []) for uid in uids}
        for uid, is_owner, person_id, name, embedding, _ in rows:    # each user's in the people's order
            owner, named = found[uid]
            if is_owner:
                found[uid] = (bytes(embedding), named)
            else:
                named.append((person_id, name, bytes(embedding)))
        return found

    # --- usage -------------------------------------------------------------------------------
    async def record_usage(self, uid: str, used: Usage, *, session_id: str | None,
                           conversation_id: str | None, now: float) -> None:
        await self.end_sessions([SessionEnd(conversation_id, uid, now, release=False, usage=used,
                                            session_id=session_id)])

    async def usage_totals(self, uid: str, *, since: float = 0.0) -> Usage:
        u = usage
        async with self._read() as conn:
            row = (await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(u.c.audio_seconds), 0.0),
                          sa.func.coalesce(sa.func.sum(u.c.speech_seconds), 0.0),
                          sa.func.coalesce(sa.func.sum(u.c.words), 0))
                .where(u.c.uid == uid, u.c.recorded_at >= since))).one()
        return Usage(audio_seconds=float(row[0]), speech_seconds=float(row[1]), words=int(row[2]))

    # --- outbox ------------------------------------------------------------------------------
    async def _enqueue(self, conn: AsyncConnection, messages: Sequence[tuple[OutboxMessage, float]]) -> int | None:
        """Insert ``(message, now)`` rows, in order, with one INSERT … SELECT from the user's
        webhook setting run for each (one executemany): no setting, no row; the URL is the one
        set when the change happened. A row is its key's head if no row of the key is pending
        (earlier rows of the same call count). The caller holds the keys' locks. Returns the
        rows written, or None when the driver does not say (asyncpg's executemany)."""
        result = await conn.execute(
            _ENQUEUE,
            [{"m_uid": m.uid, "m_kind": m.kind, "m_key": m.ordering_key, "m_params": _json(m.params),
              "m_headers": _json(m.headers), "m_content_type": m.content_type, "m_body": m.body, "m_now": at}
             for m, at in messages])
        return result.rowcount if result.rowcount >= 0 else None

    async def enqueue(self, messages: Sequence[OutboxMessage], *, now: float) -> None:
        """Enqueue several messages in one transaction, in order."""
        if messages:
            async with self._write() as conn:
                await self._lock_keys(conn, [m.ordering_key for m in messages])
                await self._enqueue(conn, [(message, now) for message in messages])

    async def exchange_outbox(self, settlement: Settlement, *, node: str, now: float, lease: float,
                              limit: int) -> list[OutboxRow]:
        """Record delivery outcomes, then claim up to ``limit`` due heads, in one transaction.

        Only a key's head is ever claimed, so each key's rows go out one at a time, in order; a
        delivered or dead head hands the role to the key's next pending row. On PostgreSQL this
        bookkeeping commits without waiting for the WAL flush: losing it in a database crash
        only means a row is sent again (same delivery id) or claimed again, which at-least-once
        delivery allows.
        """
        o = outbox
        async with self._write() as conn:
            if self.dialect == "postgresql":
                await conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
            if settlement:
                await self._settle(conn, settlement)
            if limit <= 0:
                return []
            due = (sa.select(o.c.id)
                   .where(sa.text(DUE_HEADS), o.c.next_attempt_at <= now, o.c.claimed_until < now)
                   .order_by(o.c.next_attempt_at, o.c.id).limit(limit))
            if self.dialect == "postgresql":
                due = due.with_for_update(skip_locked=True)
            rows = (await conn.execute(
                sa.update(o).where(o.c.id.in_(due.scalar_subquery()))
                .values(claimed_until=now + lease, claimed_by=node, attempts=o.c.attempts + 1)
                .returning(o.c.id, o.c.uid, o.c.kind, o.c.ordering_key, o.c.url, o.c.params, o.c.headers,
                           o.c.content_type, o.c.body, o.c.created_at, o.c.attempts))).all()
        claimed = [OutboxRow(id=r[0], uid=r[1], kind=r[2], ordering_key=r[3], url=r[4],
                             params=orjson.loads(r[5]), headers=orjson.loads(r[6]), content_type=r[7],
                             body=bytes(r[8]), created_at=r[9], attempts=r[10]) for r in rows]
        claimed.sort(key=lambda row: row.id)
        return claimed

    async def _settle(self, conn: AsyncConnection, settlement: Settlement) -> None:
        o = outbox
        finished = [row for row in settlement.delivered] + [row for row, _ in settlement.dead]
        await self._lock_keys(conn, [row.ordering_key for row in finished])
        if settlement.delivered:
            await conn.execute(sa.delete(o).where(o.c.id.in_([row.id for row in settlement.delivered])))
        if settlement.dead:
            await conn.execute(
                sa.update(o).where(o.c.id == sa.bindparam("row_id")).values(
                    status=DEAD, is_head=False, claimed_until=0.0, claimed_by=None, last_error=sa.bindparam("error")),
                [{"row_id": row.id, "error": error} for row, error in settlement.dead])
        if settlement.retry:
            await conn.execute(
                sa.update(o).where(o.c.id == sa.bindparam("row_id")).values(
                    next_attempt_at=sa.bindparam("next_at"), claimed_until=0.0, claimed_by=None,
                    last_error=sa.bindparam("error")),
                [{"row_id": row.id, "next_at": t, "error": e} for row, t, e in settlement.retry])
        if finished:
            keys = sorted({row.ordering_key for row in finished})
            next_heads = (sa.select(sa.func.min(o.c.id)).where(o.c.status == PENDING, o.c.ordering_key.in_(keys))
                          .group_by(o.c.ordering_key))
            await conn.execute(sa.update(o).where(o.c.id.in_(next_heads.scalar_subquery())).values(is_head=True))

    async def claim_outbox(self, *, node: str, now: float, lease: float, limit: int) -> list[OutboxRow]:
        return await self.exchange_outbox(Settlement(), node=node, now=now, lease=lease, limit=limit)

    async def settle_outbox(self, settlement: Settlement) -> None:
        await self.exchange_outbox(settlement, node="", now=0.0, lease=0.0, limit=0)

    async def outbox_counts(self) -> dict[str, int]:
        o = outbox
        async with self._read() as conn:
            rows = await conn.execute(sa.select(o.c.status, sa.func.count()).group_by(o.c.status))
            return {status: int(n) for status, n in rows}


# --- helpers ----------------------------------------------------------------------------------

def _last_completed_statement():
    """(uid, id) of the newest completed, not discarded conversation of each user in ``:uids``:
    the ``last_memory`` event. One row per user however many memories they have (a window, not
    all their rows)."""
    c = conversations
    newest = sa.func.row_number().over(partition_by=c.c.uid, order_by=(c.c.finished_at.desc(), c.c.id.desc()))
    ranked = (sa.select(c.c.uid, c.c.id, newest.label("rank"))
              .where(c.c.uid.in_(sa.bindparam("uids", expanding=True)), c.c.status == COMPLETED,
                     c.c.discarded == sa.false()).subquery())
    return sa.select(ranked.c.uid, ranked.c.id).where(ranked.c.rank == 1)


# What a connecting session reads and writes (``Store.open_conversations``), built once: a ramp
# of connections built them for every group, which cost more than running them.
_LAST_COMPLETED = _last_completed_statement()
_IN_PROGRESS_OF_USERS = (
    sa.select(conversations)
    .where(conversations.c.uid.in_(sa.bindparam("uids", expanding=True)), conversations.c.status == IN_PROGRESS)
    .order_by(conversations.c.uid, conversations.c.finished_at.desc()))
_RESUME = sa.update(conversations).where(conversations.c.id == sa.bindparam("o_id")).values(
    timeout_s=sa.bindparam("o_timeout"), live_until=sa.bindparam("o_until"), live_by=sa.bindparam("o_holder"))
_INSERT_CONVERSATION = sa.insert(conversations)
# What a closing session writes (``Store.end_sessions``): its lease released (if it still holds
# it, when it names itself), its usage row.
_RELEASE = sa.update(conversations).where(conversations.c.id == sa.bindparam("e_id")).values(live_until=None)
_RELEASE_HELD = _RELEASE.where(conversations.c.live_by == sa.bindparam("e_holder"))
_INSERT_USAGE = sa.insert(usage)
_WEBHOOKS_OF_USERS = sa.select(webhooks).where(webhooks.c.uid.in_(sa.bindparam("uids", expanding=True)))
_SEGMENTS_OF = (
    sa.select(segments.c.conversation_id, segments.c.data)
    .where(segments.c.conversation_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(segments.c.conversation_id, segments.c.start, segments.c.end, segments.c.segment_id))


def _dialect_insert(dialect: str, table: sa.Table):
    """An INSERT with the dialect's ``on_conflict_do_update`` (dialect: upsert syntax)."""
    return (pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert)(table)


def _webhook_setting(row: Any) -> WebhookSetting:
    return WebhookSetting(row["kind"], row["url"], row["interval_seconds"])


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _conversation(row: Any) -> Conversation:
    return Conversation(
        id=row["id"], uid=row["uid"], status=row["status"], language=row["language"], source=row["source"],
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        timeout_s=row["timeout_s"], structured=orjson.loads(row["structured"]) if row["structured"] else None,
        discarded=bool(row["discarded"]))


def _conversation_row(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id, "uid": conversation.uid, "status": conversation.status,
        "language": conversation.language, "source": conversation.source,
        "created_at": conversation.created_at, "started_at": conversation.started_at,
        "finished_at": conversation.finished_at, "timeout_s": conversation.timeout_s,
        "structured": _json(conversation.structured), "discarded": conversation.discarded,
    }


def _unique_by_id(rows: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """The last row of each segment id: one upsert statement may not touch a row twice."""
    return {row["segment_id"]: row for row in rows}.values() if len(rows) > 1 else rows


def _segment_row(conversation_id: str, segment: dict) -> dict[str, Any]:
    start = float(segment.get("start", 0.0))
    return {"conversation_id": conversation_id, "segment_id": str(segment["id"]), "start": start,
            "end": float(segment.get("end", start)), "words": word_count(segment.get("text")),
            "data": orjson.dumps(segment).decode()}


def _enqueue_statement():
    """``Store._enqueue``'s INSERT … SELECT, built once: building it (an alias, a subquery)
    cost more than running it."""
    w, o, pending = webhooks, outbox, outbox.alias("pending")
    key, now = sa.bindparam("m_key", type_=sa.String), sa.bindparam("m_now", type_=sa.Double)
    uid, kind = sa.bindparam("m_uid", type_=sa.String), sa.bindparam("m_kind", type_=sa.String)
    no_pending = ~sa.exists().where(pending.c.ordering_key == key, pending.c.status == PENDING)
    source = sa.select(
        uid, kind, key, w.c.url, sa.bindparam("m_params", type_=sa.Text), sa.bindparam("m_headers", type_=sa.Text),
        sa.bindparam("m_content_type", type_=sa.String), sa.bindparam("m_body", type_=sa.LargeBinary),
        sa.literal(PENDING, sa.String), now, now, sa.literal(0.0, sa.Double), sa.literal(0, sa.Integer),
        no_pending,
    ).where(w.c.uid == uid, w.c.kind == kind)
    return sa.insert(o).from_select(
        ["uid", "kind", "ordering_key", "url", "params", "headers", "content_type", "body", "status",
         "created_at", "next_attempt_at", "claimed_until", "attempts", "is_head"], source)


_ENQUEUE = _enqueue_statement()


def _voices_statement():
    """``Store._voices_of``'s query, built once: the owners' embeddings and the named people with a
    voice of the users in ``:uids``, each user's people in the order they were added."""
    sp, p, uids = speech_profiles, people, sa.bindparam("uids", expanding=True)
    owner = sa.select(sp.c.uid, sa.literal(True).label("is_owner"), sp.c.uid.label("id"), sp.c.uid.label("name"),
                      sp.c.embedding, sa.literal(0.0).label("created_at")).where(sp.c.uid.in_(uids))
    named = sa.select(p.c.uid, sa.literal(False), p.c.id, p.c.name, p.c.embedding, p.c.created_at).where(
        p.c.uid.in_(uids), p.c.embedding.is_not(None))
    return sa.union_all(owner, named).order_by(sa.column("uid"), sa.column("created_at"), sa.column("id"))


_VOICES = _voices_statement()


@dataclass(frozen=True)
class _BatchStatements:
    """``Store.save_batches``' statements, built once per dialect: every 600 ms round rebuilt
    them (the upsert's ``excluded`` alias alone sets up a column collection) and generated
    their cache keys again, which a built statement keeps."""

    found: Any
    update: Any
    upsert: Any
    delete: Any


def _batch_statements(dialect: str) -> _BatchStatements:
    c, s = conversations, segments
    found = (sa.select(c.c.id, c.c.status, c.c.live_by)
             .where(c.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(c.c.id))
    if dialect == "postgresql":      # dialect: lock the rows, in id order (no deadlock cycles)
        found = found.with_for_update()
    update = sa.update(c).where(c.c.id == sa.bindparam("row_id")).values(
        live_until=sa.bindparam("new_live_until"), started_at=sa.bindparam("new_started_at"),
        finished_at=sa.func.coalesce(sa.bindparam("new_finished_at", type_=sa.Double), c.c.finished_at))
    upsert = _dialect_insert(dialect, s)
    upsert = upsert.on_conflict_do_update(
        index_elements=[s.c.conversation_id, s.c.segment_id],
        set_={"start": upsert.excluded.start, "end": upsert.excluded.end,
              "words": upsert.excluded.words, "data": upsert.excluded.data})
    delete = sa.delete(s).where(s.c.conversation_id == sa.bindparam("cid"), s.c.segment_id == sa.bindparam("sid"))
    return _BatchStatements(found, update, upsert, delete)


_BATCH_STATEMENTS = {dialect: _batch_statements(dialect) for dialect in ("sqlite", "postgresql")}
