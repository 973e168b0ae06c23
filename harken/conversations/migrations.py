"""Schema migrations: ordered steps, applied in place, recorded in ``schema_version``.

Why not Alembic: the schema is six small tables, the steps must run inside the server's own
async engine at startup on both SQLite and PostgreSQL, and Alembic would add a dependency, an
``env.py`` and a script folder to package for what is a list of functions here. The rules that
make this safe are few and enforced below:

- A step is frozen once released: it builds its tables from definitions of its own (never from
  ``schema.py``, which describes only the newest shape), so replaying history always yields
  the same database. A schema change is a new step appended to ``STEPS``.
- Each step runs in one transaction together with the version bump (both engines have
  transactional DDL), so a crash mid-step leaves the previous version intact.
- Several processes may start at once (``--workers N``, several nodes): on PostgreSQL a
  transaction-level advisory lock serialises them; on SQLite every write transaction is
  ``BEGIN IMMEDIATE`` (see ``store.py``), which does the same. Each re-reads the version
  after taking the lock, so a step never runs twice.
- A database newer than the code is refused, not guessed at.
"""

from __future__ import annotations

import logging
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

# Any constant: the key of the PostgreSQL advisory lock held while migrating.
_MIGRATION_LOCK_KEY = 0x6861726B656E  # "harken"

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class SchemaTooNew(RuntimeError):
    pass


def _v1_conversations_segments_webhooks(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "schema_version", md,
        sa.Column("version", sa.Integer, nullable=False),
    )
    sa.Table(
        "conversations", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double, nullable=False),
        sa.Column("timeout_s", sa.Double, nullable=False),
        sa.Column("structured", sa.Text),
        sa.Column("discarded", sa.Boolean, nullable=False),
        sa.Index("ix_conversations_uid_status", "uid", "status"),
        sa.Index("ix_conversations_uid_created", "uid", "created_at"),
    )
    sa.Table(
        "segments", md,
        sa.Column("conversation_id", sa.String(64), primary_key=True),
        sa.Column("segment_id", sa.String(64), primary_key=True),
        sa.Column("start", sa.Double, nullable=False),
        sa.Column("end", sa.Double, nullable=False),
        sa.Column("words", sa.Integer, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
    )
    sa.Table(
        "webhooks", md,
        sa.Column("uid", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("interval_seconds", sa.Integer),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    md.create_all(conn)


def _v2_usage_and_outbox(conn: Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "usage", md,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(64)),
        sa.Column("conversation_id", sa.String(64)),
        sa.Column("recorded_at", sa.Double, nullable=False),
        sa.Column("audio_seconds", sa.Double, nullable=False),
        sa.Column("speech_seconds", sa.Double, nullable=False),
        sa.Column("words", sa.Integer, nullable=False),
        sa.Column("provider", sa.String(32)),
        sa.Index("ix_usage_uid_recorded", "uid", "recorded_at"),
    )
    sa.Table(
        "outbox", md,
        sa.Column("id", _BigId, primary_key=True, autoincrement=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("ordering_key", sa.String(160), nullable=False),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("content_type", sa.String(64), nullable=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("claimed_until", sa.Double, nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Index("ix_outbox_status_key_id", "status", "ordering_key", "id"),
        sa.Index("ix_outbox_status_next", "status", "next_attempt_at"),
    )
    md.create_all(conn)


def _v3_conversation_leases(conn: Connection) -> None:
    """Live-session leases and processing claims, so several nodes share conversations."""
    _add_column(conn, "conversations", sa.Column("live_until", sa.Double))
    _add_column(conn, "conversations", sa.Column("claimed_by", sa.String(64)))
    _add_column(conn, "conversations", sa.Column("claim_expires", sa.Double))
    md = sa.MetaData()
    table = sa.Table("conversations", md, sa.Column("status"), sa.Column("finished_at"))
    sa.Index("ix_conversations_status_finished", table.c.status, table.c.finished_at).create(conn)


def _v4_outbox_heads(conn: Connection) -> None:
    """Mark the oldest pending row of each ordering key as its head, and claim from a partial
    index of due heads. Claims used to check every pending row against its predecessors, which
    grew with the backlog (8 ms at 2,000 rows)."""
    _add_column(conn, "outbox", sa.Column("is_head", sa.Boolean), not_null_default=sa.false())
    md = sa.MetaData()
    table = sa.Table("outbox", md, sa.Column("id", sa.BigInteger), sa.Column("ordering_key", sa.String),
                     sa.Column("status", sa.String), sa.Column("is_head", sa.Boolean),
                     sa.Column("next_attempt_at", sa.Double))
    heads = sa.select(sa.func.min(table.c.id)).where(table.c.status == "pending").group_by(table.c.ordering_key)
    conn.execute(sa.update(table).where(table.c.id.in_(heads.scalar_subquery())).values(is_head=True))
    due = sa.text("is_head")
    sa.Index("ix_outbox_due_heads", table.c.next_attempt_at, table.c.id,
             postgresql_where=due, sqlite_where=due).create(conn)
    # The old claim's index: SQLite's planner would still prefer it and walk the whole backlog.
    sa.Index("ix_outbox_status_next", table.c.status, table.c.next_attempt_at).drop(conn)


def _v5_speech_profiles_and_people(conn: Connection) -> None:
    """The owner's voice (speech profile) and the people a user has named, as speaker
    embeddings (float32 bytes); the uploaded audio itself is never kept."""
    md = sa.MetaData()
    sa.Table(
        "speech_profiles", md,
        sa.Column("uid", sa.String(128), primary_key=True),
        sa.Column("embedding", sa.LargeBinary, nullable=False),
        sa.Column("speech_seconds", sa.Double, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    sa.Table(
        "people", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("embedding", sa.LargeBinary),
        sa.Column("samples", sa.Integer, nullable=False),
        sa.Column("speech_seconds", sa.Double, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Index("ix_people_uid_created", "uid", "created_at"),
    )
    md.create_all(conn)


def _v6_live_holder(conn: Connection) -> None:
    """Who holds a conversation's live lease (one id per connection), so that only the newest
    connection of a user writes it and an older one, on any node, is fenced off."""
    _add_column(conn, "conversations", sa.Column("live_by", sa.String(64)))


def _v7_app_state(conn: Connection) -> None:
    """What the Omi app's REST calls keep besides conversations: a conversation's star, the
    user's last reported location, and developer webhooks switched off (kept to switch on again)."""
    _add_column(conn, "conversations", sa.Column("starred", sa.Boolean), not_null_default=sa.false())
    md = sa.MetaData()
    sa.Table(
        "geolocations", md,
        sa.Column("uid", sa.String(128), primary_key=True),
        sa.Column("latitude", sa.Double, nullable=False),
        sa.Column("longitude", sa.Double, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    sa.Table(
        "disabled_webhooks", md,
        sa.Column("uid", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("interval_seconds", sa.Integer),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    md.create_all(conn)


def _v8_photos(conn: Connection) -> None:
    """OpenGlass photos stored with their conversation (``photos.py``)."""
    md = sa.MetaData()
    sa.Table(
        "photos", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("conversation_id", sa.String(64), nullable=False),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("discarded", sa.Boolean, nullable=False),
        sa.Column("jpeg", sa.LargeBinary, nullable=False),
        sa.Index("ix_photos_conversation_created", "conversation_id", "created_at"),
    )
    md.create_all(conn)


def _v9_sync_jobs(conn: Connection) -> None:
    """Uploads of offline recordings (/v1/sync-local-files): a job per upload, a row per file."""
    md = sa.MetaData()
    sa.Table(
        "sync_jobs", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("origin", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("claimed_by", sa.String(64)),
        sa.Column("claim_expires", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Index("ix_sync_jobs_origin_status_created", "origin", "status", "created_at"),
        sa.Index("ix_sync_jobs_uid_created", "uid", "created_at"),
    )
    sa.Table(
        "sync_files", md,
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("uid", sa.String(128), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", sa.Double, nullable=False),
        sa.Column("estimated_seconds", sa.Double, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stats", sa.Text),
        sa.Index("ix_sync_files_uid_sha256", "uid", "sha256"),
    )
    md.create_all(conn)


def _v10_user_vocabulary(conn: Connection) -> None:
    """Each user's custom vocabulary (names, jargon) for the speech engines, as a JSON list."""
    md = sa.MetaData()
    sa.Table(
        "user_vocabulary", md,
        sa.Column("uid", sa.String(128), primary_key=True),
        sa.Column("terms", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    md.create_all(conn)


STEPS: list[Callable[[Connection], None]] = [
    _v1_conversations_segments_webhooks,
    _v2_usage_and_outbox,
    _v3_conversation_leases,
    _v4_outbox_heads,
    _v5_speech_profiles_and_people,
    _v6_live_holder,
    _v7_app_state,
    _v8_photos,
    _v9_sync_jobs,
    _v10_user_vocabulary,
]
SCHEMA_VERSION = len(STEPS)


def _add_column(conn: Connection, table: str, column: sa.Column, *,
                not_null_default: sa.ColumnElement | None = None) -> None:
    """ALTER TABLE … ADD COLUMN, nullable, or NOT NULL with a default that fills existing rows."""
    preparer = conn.dialect.identifier_preparer
    ddl = (f"ALTER TABLE {preparer.quote(table)} ADD COLUMN {preparer.quote(column.name)} "
           f"{column.type.compile(dialect=conn.dialect)}")
    if not_null_default is not None:
        ddl += f" NOT NULL DEFAULT {not_null_default.compile(dialect=conn.dialect)}"
    conn.exec_driver_sql(ddl)


def _current_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    version = conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar()
    return int(version or 0)


def _upgrade_one(conn: Connection, target: int) -> int | None:
    """Apply the step after the current version if it is not past ``target``; None when done."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    current = _current_version(conn)
    if current > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the database schema is version {current}, newer than this harken understands "
            f"({SCHEMA_VERSION}): upgrade harken, or point it at another database"
        )
    if current >= target:
        return None
    STEPS[current](conn)
    conn.execute(sa.text("DELETE FROM schema_version"))
    conn.execute(sa.text("INSERT INTO schema_version (version) VALUES (:v)"), {"v": current + 1})
    return current + 1


async def migrate(engine: AsyncEngine, target: int = SCHEMA_VERSION) -> int:
    """Upgrade the database in place to ``target`` (default: newest); returns the version."""
    if not 0 <= target <= SCHEMA_VERSION:
        raise ValueError(f"no schema version {target}")
    while True:
        async with engine.begin() as conn:
            applied = await conn.run_sync(_upgrade_one, target)
        if applied is None:
            break
        log.info("database schema upgraded to version %d", applied)
    async with engine.connect() as conn:
        return await conn.run_sync(_current_version)
