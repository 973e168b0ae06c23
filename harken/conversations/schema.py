"""The store's tables as the code queries them (the shape after the newest migration).

``migrations.py`` builds these tables step by step with frozen definitions of its own, so a
change here needs a new migration step there; ``tests/test_store.py`` checks that a database
migrated from scratch matches these definitions column for column.

Portable choices, so one code path serves SQLite and PostgreSQL:
- every time is a float of Unix seconds (``Double``): no time-zone or driver date handling,
  and "claimed_until < now" is plain arithmetic on both;
- JSON is kept as text (orjson-encoded): both engines store it, and nothing queries inside it;
- no foreign keys: SQLite enforces them only per connection pragma, and the store deletes a
  conversation's segments in the same transaction as the conversation anyway.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# SQLite assigns autoincrement ids only to an ``INTEGER PRIMARY KEY``; PostgreSQL wants 64 bits.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

conversations = sa.Table(
    "conversations", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("uid", sa.String(128), nullable=False),
    # in_progress → processing → completed; a conversation with no words is deleted instead.
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("language", sa.String(16), nullable=False),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),     # wall time of conversation time 0
    sa.Column("finished_at", sa.Double, nullable=False),    # wall time of the last segment batch
    sa.Column("timeout_s", sa.Double, nullable=False),      # silence after which it is processed
    sa.Column("structured", sa.Text),                       # JSON, set by processing
    sa.Column("discarded", sa.Boolean, nullable=False),
    # A node holding a live session renews live_until; the sweep leaves such conversations alone.
    sa.Column("live_until", sa.Double),
    # The holder of that lease: the newest connection of the user; an older writer is fenced.
    sa.Column("live_by", sa.String(64)),
    # Processing claim: whoever set claimed_by may finish it until claim_expires.
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("claim_expires", sa.Double),
    # Starred by the user in the app (PATCH /v1/conversations/{id}/starred); default false.
    sa.Column("starred", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_conversations_uid_status", "uid", "status"),
    sa.Index("ix_conversations_uid_created", "uid", "created_at"),
    sa.Index("ix_conversations_status_finished", "status", "finished_at"),
)

# One row per segment, upserted by (conversation_id, segment_id) every batch: a batch writes
# only what changed, and a crash loses at most the batch being written.
segments = sa.Table(
    "segments", metadata,
    sa.Column("conversation_id", sa.String(64), primary_key=True),
    sa.Column("segment_id", sa.String(64), primary_key=True),
    sa.Column("start", sa.Double, nullable=False),
    sa.Column("end", sa.Double, nullable=False),
    sa.Column("words", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),             # the stored segment dict, JSON
)

def _webhook_settings(name: str) -> sa.Table:
    return sa.Table(
        name, metadata,
        sa.Column("uid", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("interval_seconds", sa.Integer),              # audio_bytes only
        sa.Column("updated_at", sa.Double, nullable=False),
    )


webhooks = _webhook_settings("webhooks")

usage = sa.Table(
    "usage", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
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

# Transactional outbox: rows are written in the same transaction as the change that causes
# them and deleted once delivered; status is "pending" or "dead". ``is_head`` marks the oldest
# pending row of each ordering key, the only one that may be sent (a dead row is never a head);
# claims read the partial index of heads, so their cost does not grow with a backlog behind a
# dead receiver. The condition is the bare flag so that SQLite, which has no statistics unless
# ANALYZE ran, cannot prefer the (status, key) index.
DUE_HEADS = "is_head"

outbox = sa.Table(
    "outbox", metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("uid", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("ordering_key", sa.String(160), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("params", sa.Text, nullable=False),           # JSON query parameters
    sa.Column("headers", sa.Text, nullable=False),          # JSON extra headers
    sa.Column("content_type", sa.String(64), nullable=False),
    sa.Column("body", sa.LargeBinary, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("claimed_until", sa.Double, nullable=False),
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("last_error", sa.Text),
    sa.Column("is_head", sa.Boolean, nullable=False),
    sa.Index("ix_outbox_status_key_id", "status", "ordering_key", "id"),
    sa.Index("ix_outbox_due_heads", "next_attempt_at", "id",
             postgresql_where=sa.text(DUE_HEADS), sqlite_where=sa.text(DUE_HEADS)),
)

# Voices, as speaker embeddings (float32 little-endian bytes, harken.audio.embedding); the
# uploaded audio is never kept. One owner profile per user; people are named by the user and
# matched only once they have a voice (``embedding`` is NULL until their first sample).
speech_profiles = sa.Table(
    "speech_profiles", metadata,
    sa.Column("uid", sa.String(128), primary_key=True),
    sa.Column("embedding", sa.LargeBinary, nullable=False),
    sa.Column("speech_seconds", sa.Double, nullable=False),     # speech (after VAD) it was made from
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

people = sa.Table(
    "people", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("uid", sa.String(128), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("embedding", sa.LargeBinary),                      # mean of the samples' embeddings
    sa.Column("samples", sa.Integer, nullable=False),
    sa.Column("speech_seconds", sa.Double, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_people_uid_created", "uid", "created_at"),
)

# The user's last location as the app reports it (PATCH /v1/users/geolocation): kept, not yet
# attached to conversations. ``data`` is the JSON body as validated.
geolocations = sa.Table(
    "geolocations", metadata,
    sa.Column("uid", sa.String(128), primary_key=True),
    sa.Column("latitude", sa.Double, nullable=False),
    sa.Column("longitude", sa.Double, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

# A developer webhook switched off with /v1/users/developer/webhook/{type}/disable: moved out of
# ``webhooks`` (so delivery never sees it) and back on /enable.
disabled_webhooks = _webhook_settings("disabled_webhooks")

# OpenGlass photos of a conversation (the JPEG itself, as upstream keeps its base64), with the
# description a vision model gave (empty without one). Queries in ``photos.py``.
photos = sa.Table(
    "photos", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("conversation_id", sa.String(64), nullable=False),
    sa.Column("uid", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("discarded", sa.Boolean, nullable=False),
    sa.Column("jpeg", sa.LargeBinary, nullable=False),
    sa.Index("ix_photos_conversation_created", "conversation_id", "created_at"),
)

# Offline recordings uploaded to /v1/sync-local-files (conversations/sync_jobs.py): one job per
# upload, one row per file. A job is claimed like an outbox row (FOR UPDATE SKIP LOCKED on
# PostgreSQL, a lease that a dead node's restart waits out); a file's segments and its "done" are
# written in one transaction, so a file is transcribed into conversations exactly once.
sync_jobs = sa.Table(
    "sync_jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("uid", sa.String(128), nullable=False),
    # The data folder holding the job's files (its id, in DATA_DIR/sync/.origin): only nodes that
    # share that folder may take the job.
    sa.Column("origin", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),            # queued → processing → done | failed
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("claim_expires", sa.Double),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("result", sa.Text),                                   # JSON: memories made and updated
    sa.Column("error", sa.Text),
    sa.Index("ix_sync_jobs_origin_status_created", "origin", "status", "created_at"),
    sa.Index("ix_sync_jobs_uid_created", "uid", "created_at"),
)

sync_files = sa.Table(
    "sync_files", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("uid", sa.String(128), nullable=False),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("path", sa.Text, nullable=False),                     # in the data folder until done
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", sa.Double, nullable=False),            # the name's timestamp
    sa.Column("estimated_seconds", sa.Double, nullable=False),      # from the frame count, before decoding
    sa.Column("status", sa.String(16), nullable=False),             # queued → done | duplicate | failed
    sa.Column("stats", sa.Text),                                    # JSON: frames, bad frames, seconds, segments
    sa.Index("ix_sync_files_uid_sha256", "uid", "sha256"),
)

# The user's custom vocabulary (terms the speech engines should favour), a JSON list of strings.
user_vocabulary = sa.Table(
    "user_vocabulary", metadata,
    sa.Column("uid", sa.String(128), primary_key=True),
    sa.Column("terms", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

schema_version = sa.Table(
    "schema_version", metadata,
    sa.Column("version", sa.Integer, nullable=False),
)
