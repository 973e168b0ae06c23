"""What every connection shares: settings, the authenticator, speech providers, live sessions.

One ``Gateway`` per server process, built in the app's lifespan and handed to each session, so
nothing lives in module globals and tests can run several gateways in one process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import Settings
from ..stt.base import Provider
from .metrics import GatewayMetrics

if TYPE_CHECKING:
    from ..conversations import ConversationService, Store
    from .auth import Authenticator
    from .session import Session


@dataclass
class Gateway:
    settings: Settings
    authenticator: "Authenticator"
    providers: dict[str, Provider]          # name → provider, e.g. {"local": WhisperProvider}
    conversations: "ConversationService | None" = None
    store: "Store | None" = None
    sessions: set["Session"] = field(default_factory=set)
    draining: bool = False
    drain_deadline: float | None = None     # monotonic; set when a graceful drain starts (drain.py)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: GatewayMetrics = field(init=False)     # its own registry: one per gateway, served at /metrics

    def __post_init__(self) -> None:
        self.metrics = GatewayMetrics(self)

    def usable_providers(self) -> list[str]:
        return list(self.providers)
