"""The rows and requests the store takes and returns (plain dataclasses, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .model import Conversation, Usage, WebhookSetting

# The states of an outbox row.
PENDING = "pending"
DEAD = "dead"


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
    vocabulary: tuple[str, ...] = ()              # the user's terms (``get_vocabulary``)


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
