"""SQLite writes on the event loop's own thread, and the SQLite connection set-up both engines share.

aiosqlite runs every driver call in a thread of its own: a group transaction of six statements
made ~20 trips there (cursor, execute, fetch, close; BEGIN; COMMIT), and each waited for the busy
loop to take its result. At 250 streams one batch transaction took 58–61 ms of wall time, all of
it in every segment's latency (a batch is stored before it is sent), and the hops cost CPU on
both threads. In WAL mode with ``synchronous=NORMAL`` a commit is page-cache work, no fsync, so a
group of 25 batches costs ~2 ms on the loop instead of ~4 ms of CPU and a ~60 ms wait. Writes
therefore run here, synchronously, except where they could block:

- another process holds the write lock (``harken serve --workers N`` on one file): BEGIN IMMEDIATE
  fails at once (busy timeout 0) and the store uses its threaded engine, which waits in SQLite's
  busy handler instead of the loop;
- checkpoints (copying the WAL into the database file, with fsyncs): automatic checkpoints are off
  on this connection, and one runs in the threaded engine every ``CHECKPOINT_EVERY`` commits;
  when commits keep overlapping the checkpoints, the next write waits for one (``catch_up``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from typing import Any, Awaitable, Callable, Iterator

import sqlalchemy as sa
from sqlalchemy import event

log = logging.getLogger(__name__)

# Commits between checkpoints. A group transaction writes some tens of pages, so this keeps the
# WAL near SQLite's own default threshold (1000 pages) without counting pages.
CHECKPOINT_EVERY = 32
# A checkpoint that a commit overlapped is run again at once, at most this many times in a row.
CHECKPOINT_TRIES = 8
# Commits since the WAL was last copied whole, past which the next write waits (off the loop) for a
# checkpoint with no commit beside it. Under a steady stream of writes on a busy machine every
# checkpoint can be overlapped (a commit lands while its thread waits for a core), and the WAL file
# then grows for as long as the writes go on (5.6 MB after 300 commits in a loaded CI run).
COMMITS_BEFORE_WAITING = 2 * CHECKPOINT_EVERY


def take_over_sqlite_transactions(engine: sa.Engine, *, busy_timeout_ms: int, autocheckpoint: bool = True) -> None:
    """SQLAlchemy's documented recipe: the driver stops issuing its own BEGIN, and we emit
    ``BEGIN IMMEDIATE`` for writes, so two writers never deadlock upgrading read locks (they
    queue on the busy timeout instead), and ``DEFERRED`` for reads."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, connection_record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the writer; synchronous=NORMAL keeps every commit across
        # a process crash (a power cut may lose the last commits), at a fraction of FULL's cost.
        pragmas = ["journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={busy_timeout_ms}"]
        if not autocheckpoint:
            pragmas.append("wal_autocheckpoint=0")
        for pragma in pragmas:
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'IMMEDIATE')}")


class LoopConnection:
    """The ``await conn.execute(...)`` face of a sync connection, so the store's methods run
    unchanged on either engine. Nothing here suspends: a transaction on the loop is atomic to
    the other tasks."""

    def __init__(self, conn: sa.Connection) -> None:
        self._conn = conn

    async def execute(self, statement: Any, parameters: Any = None) -> sa.CursorResult:
        return self._conn.execute(statement, parameters)


class LoopWriter:
    """Write transactions on the loop's thread (see the module docstring). ``checkpoint`` is an
    async callable that checkpoints the WAL off the loop (the store's threaded engine)."""

    def __init__(self, url: sa.URL, checkpoint: Callable[[], Awaitable[None]]) -> None:
        self.engine = sa.create_engine(url.set(drivername="sqlite"), connect_args={"timeout": 0})
        take_over_sqlite_transactions(self.engine, busy_timeout_ms=0, autocheckpoint=False)
        self._checkpoint = checkpoint
        self.commits = 0
        self.lock_waits = 0       # transactions that met another process's lock (went to the thread)
        self._commits_at_checkpoint = 0
        self._commits_at_whole_checkpoint = 0     # the last checkpoint that no commit overlapped
        self._checkpointing: asyncio.Task | None = None

    async def catch_up(self) -> None:
        """Before a write (the caller holds the process's write queue, so no commit can land
        meanwhile): if checkpoints have fallen ``COMMITS_BEFORE_WAITING`` commits behind, wait
        for one that copies the whole WAL, so the next commit starts the file over. The wait is
        in the threaded engine; the loop runs on."""
        if self.commits - self._commits_at_whole_checkpoint < COMMITS_BEFORE_WAITING:
            return
        if not self.checkpointing:
            self._start_checkpoints()
        # shielded: a cancelled write must not cancel the checkpoint (close() awaits it)
        await asyncio.shield(self._checkpointing)

    def try_begin(self) -> sa.Connection | None:
        """A connection in a write transaction, or None if another process holds the write lock."""
        conn = self.engine.connect()
        try:
            conn.begin()
        except sa.exc.OperationalError as error:
            conn.close()
            code = getattr(error.orig, "sqlite_errorcode", 0)      # extended: SQLITE_BUSY_* too
            if code & 0xFF == sqlite3.SQLITE_BUSY:
                self.lock_waits += 1
                return None
            raise
        return conn

    @contextlib.contextmanager
    def transaction(self, conn: sa.Connection) -> Iterator[LoopConnection]:
        """Commit ``conn``'s transaction if the block succeeds, roll it back if not."""
        with conn:
            try:
                yield LoopConnection(conn)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        self.commits += 1
        if self.commits - self._commits_at_checkpoint >= CHECKPOINT_EVERY and not self.checkpointing:
            self._start_checkpoints()

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing is not None and not self._checkpointing.done()

    def _start_checkpoints(self) -> None:
        self._checkpointing = asyncio.get_running_loop().create_task(
            self._checkpoints(), name="harken-sqlite-checkpoint")

    async def _checkpoints(self) -> None:
        """Checkpoint until one ran with no commit beside it. SQLite starts the WAL file over
        (instead of growing it) only at a write that finds every frame copied, and a checkpoint
        copies the frames that were there when it began: one that a commit overlapped leaves
        that commit's frames, and the WAL would grow for as long as that kept happening."""
        for _ in range(CHECKPOINT_TRIES):
            self._commits_at_checkpoint = self.commits
            try:
                await self._checkpoint()
            except Exception as exc:      # the next round catches up; the WAL only grows meanwhile
                log.warning("SQLite checkpoint failed (%s: %s)", type(exc).__name__, exc)
                return
            if self.commits == self._commits_at_checkpoint:
                self._commits_at_whole_checkpoint = self.commits
                return

    async def close(self) -> None:
        if self._checkpointing is not None:
            await self._checkpointing
        self.engine.dispose()
