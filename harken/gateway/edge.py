"""The connection edge: what a socket may cost before the app ever sees a request.

uvicorn's httptools protocol reads a request line and headers of any size, for as long as the
client likes: httptools grows the URL and each header by concatenation (a 150 MiB URL held the
event loop for seconds, quadratically), and a connection that never finishes its headers is kept
forever. ``BoundedHttpToolsProtocol`` adds, per connection:

- a byte budget for the request head (line plus headers, ``max_request_head_bytes``): a head
  that outgrows it gets ``431`` and the connection is closed before the parser sees more;
- a deadline for the head (``request_head_timeout``), from the connection's start and again
  after each response: slowloris and idle sockets are closed;
- admission: a process holds at most ``max_connections`` connections and one client address at
  most ``max_connections_per_client``; a connection past either is closed at once
  (``AdmissionGate``), before uvicorn builds anything for it or reads a byte, so one client's
  idle sockets cannot use up the file descriptors that everyone else needs.

An address whose head was refused (431, or 408 for a head begun and not finished) is refused outright for a while: 0.5 s, doubling
with each refusal in a row up to 60 s. A client that keeps reconnecting to send oversized or
unfinished heads then costs an accept and a close, not a read and an answer each time. Like the
per-client cap, this is off when ``max_connections_per_client`` is 0 (behind a proxy every
client has the proxy's address).

WebSocket connections stay counted after the upgrade (``ConnectionLedger.join`` in
``ws_protocol.py``), so a client holding many streams counts them too.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("harken.edge")

# File descriptors kept free of client connections: the store, engine files, webhook sockets.
FD_RESERVE = 256
MIN_CONNECTIONS = 64
FIRST_PENALTY, MAX_PENALTY = 0.5, 60.0     # seconds an address is refused after a refused head
MAX_PENALISED = 10_000                      # addresses remembered at most (then forgotten at once)


def connection_limit(configured: int) -> int:
    """``max_connections``, or (0) the process's open-file limit less ``FD_RESERVE``."""
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(MIN_CONNECTIONS, soft - FD_RESERVE)


def client_key(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, (tuple, list)) and peer:
        return str(peer[0])
    return "unix"


class ConnectionLedger:
    """Open connections of one server, in total and per client address."""

    def __init__(self, limit: int, per_client: int) -> None:
        self.limit = limit
        self.per_client = per_client
        self.total = 0
        self.by_client: Counter[str] = Counter()
        self.refused = 0
        self._penalties: dict[str, tuple[float, float]] = {}   # address → (refused until, last penalty)

    @classmethod
    def of(cls, config, server_state) -> "ConnectionLedger":
        """The ledger of this server (one per uvicorn ``ServerState``)."""
        ledger = getattr(server_state, "harken_ledger", None)
        if ledger is None:
            settings = getattr(config, "harken_settings", None)
            ledger = cls(connection_limit(getattr(settings, "max_connections", 0)),
                         getattr(settings, "max_connections_per_client", 0))
            server_state.harken_ledger = ledger
        return ledger

    def admit(self, key: str) -> bool:
        if self.total >= self.limit or (self.per_client and (
                self.by_client[key] >= self.per_client or self._penalised(key))):
            self.refused += 1
            return False
        self.join(key)
        return True

    def _penalised(self, key: str) -> bool:
        penalty = self._penalties.get(key)
        return penalty is not None and time.monotonic() < penalty[0]

    def strike(self, key: str) -> None:
        """``key`` sent a head that was refused: refuse its connections for a while."""
        if not self.per_client:
            return
        now = time.monotonic()
        until, last = self._penalties.get(key, (0.0, 0.0))
        # In a row: struck again within a minute of the last penalty's end.
        penalty = min(MAX_PENALTY, last * 2) if last and now - until < MAX_PENALTY else FIRST_PENALTY
        if len(self._penalties) >= MAX_PENALISED:
            self._penalties.clear()
        self._penalties[key] = (now + penalty, penalty)

    def join(self, key: str) -> None:
        self.total += 1
        self.by_client[key] += 1

    def leave(self, key: str) -> None:
        self.total -= 1
        left = self.by_client[key] - 1
        if left > 0:
            self.by_client[key] = left
        else:
            del self.by_client[key]


class AdmissionGate(asyncio.Protocol):
    """``uvicorn.Config(http=AdmissionGate)``: the protocol uvicorn makes for each accepted socket.

    It admits the connection against the ledger and only then builds the HTTP protocol
    (``BoundedHttpToolsProtocol``) and hands the transport over. A refused connection (a client
    past its cap or penalised, or the process at its cap) thus costs an accept and an abort, not
    uvicorn's per-connection setup (its parser, two loggers, the local and remote address
    lookups, the connection set): that setup was two thirds of a refusal's CPU (72 of 107 µs under
    cProfile), and the abusers that meet refusals make hundreds a second (``bench_fairness.py``:
    1,000 idle sockets from one address, or a huge-header client reconnecting through its penalty).
    """

    __slots__ = ("_config", "_server_state", "_app_state", "_loop")

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        self._config, self._server_state, self._app_state, self._loop = config, server_state, app_state, _loop

    def connection_made(self, transport) -> None:
        key = client_key(transport)
        if not ConnectionLedger.of(self._config, self._server_state).admit(key):
            # No answer: writing one would cost what the limit exists to save.
            transport.abort()
            return
        protocol = BoundedHttpToolsProtocol(self._config, self._server_state, self._app_state, self._loop)
        transport.set_protocol(protocol)
        protocol.admitted(transport, key)

    def connection_lost(self, exc) -> None:
        pass        # refused: nothing was counted or built


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head; reads
    ``config.harken_settings``. Made by ``AdmissionGate`` for a connection it admitted."""

    def __init__(self, config, server_state, app_state, _loop=None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        settings = getattr(config, "harken_settings", None)
        self._head_limit = getattr(settings, "max_request_head_bytes", 32768)
        self._head_timeout = getattr(settings, "request_head_timeout", 10.0)
        self._ledger = ConnectionLedger.of(config, server_state)
        self._client_key: str | None = None     # set while this protocol counts in the ledger
        self._head_bytes = 0
        self._in_head = True                    # between requests or inside a request head
        self._head_timer: asyncio.TimerHandle | None = None

    # -- admission (by the gate) and the head deadline ------------------------------------
    def admitted(self, transport, key: str) -> None:
        """``transport`` is this protocol's now; ``key`` counts in the ledger until it ends."""
        self.connection_made(transport)
        self._client_key = key
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._client_key is not None:
            self._ledger.leave(self._client_key)
            self._client_key = None

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes == 0:
            # Nothing sent: a browser's preconnect or an idle keep-alive socket, not an attack
            # to remember (the per-client cap bounds how many one address holds).
            self.transport.close()
            return
        self._refuse(408, "Request Timeout")

    # -- the head's byte budget -----------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self._in_head:
            super().data_received(data)
            return
        room = self._head_limit - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            super().data_received(data)
            return
        # Feed what the budget allows; if the head completes inside it, the rest is body.
        self._head_bytes = self._head_limit
        super().data_received(data[:room])
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        if self._in_head:
            self._refuse(431, "Request Header Fields Too Large")
            return
        super().data_received(data[room:])

    # A new head begins once the previous request's body is read (a response may come earlier,
    # e.g. a 413 before the body); its deadline runs once that request is also answered.
    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._in_head and not self.transport.is_closing():
            self._arm_head_timer()

    def handle_websocket_upgrade(self) -> None:
        # The WebSocket protocol takes this connection over and counts it itself.
        self._disarm_head_timer()
        self._release()
        super().handle_websocket_upgrade()

    def _refuse(self, status: int, phrase: str) -> None:
        if self._client_key is not None:
            self._ledger.strike(self._client_key)
        body = phrase.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, phrase.encode(), len(body), body))
        self.transport.close()
