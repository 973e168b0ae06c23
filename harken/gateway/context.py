"""What every connection shares: settings, the authenticator, speech providers, live sessions.

One ``Gateway`` per server process, built in the app's lifespan and handed to each session, so
nothing lives in module globals and tests can run several gateways in one process.

Imports flow one way: ``session.py`` and ``metrics.py`` know nothing of each other, and this
module knows neither's insides: a live session is seen through ``LiveSession`` (what the
holders of ``Gateway.sessions`` use of one), and the metrics get what they read as
``MetricsSources``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..audio.speaker_models import SpeakerModel, model_named
from ..config import Settings
from ..stt.base import Provider
from .metrics import GatewayMetrics, MetricsSources

if TYPE_CHECKING:
    from ..conversations import ConversationService, Store
    from .auth import Authenticator


FLUSH_SLOTS = 6          # phases of the 600 ms flush: one group commit per 100 ms


class LiveSession(Protocol):
    """A session as the gateway's other parts see it (``session.Session`` is one): the drain
    tells each that the node drains and asks it to end; metrics and health only count them."""

    id: str

    async def send_json(self, payload: dict) -> None: ...

    def request_end(self, code: int, reason: str) -> None: ...


@dataclass
class Gateway:
    settings: Settings
    authenticator: "Authenticator"
    providers: dict[str, Provider]          # name → provider, e.g. {"local": WhisperProvider}
    conversations: "ConversationService | None" = None
    store: "Store | None" = None
    sessions: set[LiveSession] = field(default_factory=set)
    connections_held: int = 0               # accepted /v4/listen connections, sessions or still being set up
    draining: bool = False
    drain_deadline: float | None = None     # monotonic; set when a graceful drain starts (drain.py)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: GatewayMetrics = field(init=False)     # its own registry: one per gateway, served at /metrics
    _flush_slots_given: int = 0

    def __post_init__(self) -> None:
        self.metrics = GatewayMetrics(MetricsSources(
            session_limit=self.settings.max_sessions,
            open_sessions=lambda: len(self.sessions),
            store=lambda: self.store,
            deliverer=lambda: getattr(self.conversations, "deliverer", None)))

    @property
    def speaker_model(self) -> "SpeakerModel":
        """The speaker-embedding model of ``settings.speaker_model`` (loaded on first use)."""
        return model_named(self.settings.speaker_model)

    def flush_phase(self) -> float:
        """Where in the flush interval a new session flushes (seconds past a multiple of it).

        Sessions flush in ``FLUSH_SLOTS`` phases, handed out in turn, rather than each at the
        moment it connected: the batches of one phase are stored in one group-commit transaction
        (a transaction's fixed cost is many times a batch's own), while the sessions' flush work
        stays spread over the interval."""
        slot = self._flush_slots_given % FLUSH_SLOTS
        self._flush_slots_given += 1
        return slot * self.settings.flush_interval / FLUSH_SLOTS

    @property
    def at_capacity(self) -> bool:
        limit = self.settings.max_sessions
        return bool(limit) and self.connections_held >= limit

    def try_hold_connection(self) -> bool:
        """Take one of ``max_sessions`` places for a new connection, if one is free.

        A place is taken at accept, before authentication, not when the session starts: the
        awaits in between (token check, conversation lookup) would otherwise let a burst of
        connections all see the same free place."""
        if self.at_capacity:
            return False
        self.connections_held += 1
        return True

    def release_connection(self) -> None:
        self.connections_held -= 1

    def usable_providers(self) -> list[str]:
        return list(self.providers)
