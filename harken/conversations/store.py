"""Persistence: one SQLAlchemy async Core code path for SQLite (default) and PostgreSQL.

``Store`` is the one object the rest of Harken holds; its methods come by concern from:
``store_base`` (engines, transactions, locks), ``store_conversations`` (conversations, segments,
leases, processing claims), ``store_users`` (webhook settings, speech profile, people, usage) and
``store_outbox`` (webhook deliveries). The rows and requests it takes are in ``store_rows``.
"""

from __future__ import annotations

from .store_base import StoreBase, async_driver_url, database_url
from .store_conversations import ConversationRecords, _conversation
from .store_outbox import OutboxRecords
from .store_rows import (
    DEAD,
    PENDING,
    BatchRequest,
    LeaseLost,
    OpenRequest,
    OpenResult,
    OutboxMessage,
    OutboxRow,
    PersonRow,
    ProcessingClaim,
    ProcessingDone,
    SessionEnd,
    Settlement,
    SpeechProfileRow,
    Voices,
)
from .store_users import UserRecords


class Store(ConversationRecords, UserRecords, OutboxRecords, StoreBase):
    """The conversation store. ``await open()`` before use (it migrates); ``await close()`` after."""


__all__ = [
    "Store", "database_url", "async_driver_url", "LeaseLost", "Voices", "OpenResult", "SpeechProfileRow",
    "PersonRow", "OutboxRow", "OutboxMessage", "OpenRequest", "BatchRequest", "SessionEnd", "ProcessingClaim",
    "ProcessingDone", "Settlement", "PENDING", "DEAD", "_conversation",
]
