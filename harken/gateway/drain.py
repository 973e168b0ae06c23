"""Graceful drain: what a node does between SIGTERM (or Ctrl-C) and exit, within ``drain_timeout``.

1. Stop accepting: ``gateway.draining`` makes ``/readyz`` answer 503 and new WebSockets close
   1012, and the server closes its listening sockets, so a load balancer's next attempt fails
   over at once instead of landing here.
2. Every session is told ``service_status: draining`` and ended with 1012. Its teardown still
   collects the engine's last words, stores and sends them, then releases its conversation,
   which stays in progress: the client's reconnect, to any node, resumes it (PROTOCOL §5, 1012
   "nothing is lost").
3. The server's normal shutdown follows. The conversation service then waits for processing
   and for webhook deliveries already under way, within what is left of the drain time
   (``shutdown_graces``), and hands back whatever is cut short (claims, outbox rows).

``server.py`` starts this from its signal handler; a second signal stops at once, and a
watchdog ends the process if the whole sequence overruns the bound by ``HARD_STOP_MARGIN``.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import events
from .context import Gateway, LiveSession
from .session import EndSession

log = logging.getLogger("harken.drain")

DRAIN_CLOSE_CODE = 1012
DRAIN_REASON = "server draining: reconnect"
HARD_STOP_MARGIN = 5.0          # seconds past drain_timeout before the process is ended outright
SHUTDOWN_SHARE = 0.3            # part of drain_timeout kept for the shutdown after the sessions end
MAX_PROCESSING_GRACE = 10.0     # what ConversationService.stop waits for processing at most
POLL = 0.05


def drain_deadline(gateway: Gateway, started: float | None = None) -> float:
    """Monotonic time by which the whole drain must be done; recorded on the gateway."""
    if gateway.drain_deadline is None:
        begun = time.monotonic() if started is None else started
        gateway.drain_deadline = begun + gateway.settings.drain_timeout
    return gateway.drain_deadline


async def end_sessions(gateway: Gateway) -> int:
    """Steps 1–2 (the caller closes the listening sockets). Returns how many sessions were
    still open when the sessions' share of the drain time ran out."""
    gateway.draining = True
    deadline = drain_deadline(gateway)
    sessions_deadline = deadline - SHUTDOWN_SHARE * gateway.settings.drain_timeout
    asked: set[LiveSession] = set()
    pending: set[asyncio.Task] = set()
    log.info("draining: ending %d session(s) with %d", len(gateway.sessions), DRAIN_CLOSE_CODE)
    while gateway.sessions and time.monotonic() < sessions_deadline:
        for session in list(gateway.sessions - asked):      # including any that were opening
            asked.add(session)
            task = asyncio.create_task(_notify_and_end(session), name=f"drain-{session.id}")
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.sleep(POLL)
    left = len(gateway.sessions)
    if left:
        log.warning("draining: %d session(s) still closing after %.1fs; the server shutdown ends them",
                    left, gateway.settings.drain_timeout * (1 - SHUTDOWN_SHARE))
    return left


def shutdown_graces(gateway: Gateway) -> dict[str, float]:
    """Keyword arguments for ``ConversationService.stop``: after a drain, waits that fit in what
    is left of it; without one (an error, a test server) nothing, so the defaults apply."""
    if gateway.drain_deadline is None:
        return {}
    left = max(0.0, gateway.drain_deadline - time.monotonic())
    processing = min(MAX_PROCESSING_GRACE, left / 2)
    return {"processing_grace": processing, "delivery_grace": max(0.0, left - processing - 1.0)}


async def _notify_and_end(session: LiveSession) -> None:
    try:
        await session.send_json(events.service_status("draining"))
    except EndSession:
        pass                    # the client is gone; the session notices by itself
    session.request_end(DRAIN_CLOSE_CODE, DRAIN_REASON)
