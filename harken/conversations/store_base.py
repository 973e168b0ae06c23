"""The store's connections: engines for SQLite and PostgreSQL, write and read transactions,
advisory locks, and helpers every part of the store shares (``StoreBase``).

Every method of the store is one transaction and takes the time (``now``) from its caller, so the
policy (what "timed out" means, how long a claim lasts) lives in ``lifecycle.py``/``outbox.py`` and
tests can drive time. The few places where the engines differ are marked ``# dialect``: upsert
syntax, row locking (``FOR UPDATE SKIP LOCKED`` and advisory locks on PostgreSQL; SQLite instead
serialises writers with ``BEGIN IMMEDIATE``) and connection set-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Self

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..config import Settings
from . import migrations
from .sqlite_loop import LoopWriter, take_over_sqlite_transactions

log = logging.getLogger(__name__)


# Namespaces of PostgreSQL advisory locks (the first key of pg_advisory_xact_lock(int, int)).
_USER_LOCKS, _KEY_LOCKS = 0x6875, 0x6B79


# The subquery's sort fixes the order in which the aggregate takes the locks (by lock key, so
# two names with one hash are one lock, taken once).
_ORDERED_ADVISORY_LOCKS = sa.text(
    "SELECT count(pg_advisory_xact_lock(:namespace, h)) FROM "
    "(SELECT DISTINCT hashtext(name) AS h FROM unnest(CAST(:names AS text[])) AS name ORDER BY h) AS ordered")


# SQLite waits this long for another writer (another worker process) before "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Connections of the threaded SQLite engine (reads, checkpoints, writes that meet another process's
# lock), each with a driver thread of its own, all kept open. SQLAlchemy's default for aiosqlite
# (5, and up to 10 more) closed the extra ones as soon as they were returned: a burst of reads
# paid a new thread, a file open and three PRAGMAs for each one past five. As many at most.
SQLITE_READERS = 15


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



class StoreBase:
    """Engines and transactions; ``Store`` adds the records on top."""

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
    def from_settings(cls, settings: Settings) -> Self:
        return cls(database_url(settings))

    async def open(self, *, schema_version: int = migrations.SCHEMA_VERSION) -> Self:
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

    def _create_engine(self) -> AsyncEngine:
        if self.dialect == "sqlite":
            database = self.url.database
            pooling: dict[str, Any] = {}
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                pooling = {"pool_size": SQLITE_READERS, "max_overflow": 0}
            engine = create_async_engine(self.url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **pooling)
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
            if self._loop_writer is not None:
                await self._loop_writer.catch_up()
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


def _dialect_insert(dialect: str, table: sa.Table):
    """An INSERT with the dialect's ``on_conflict_do_update`` (dialect: upsert syntax)."""
    return (pg_dialect.insert if dialect == "postgresql" else sqlite_dialect.insert)(table)


def _json(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
