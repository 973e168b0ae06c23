"""Runs the ASGI app on uvicorn with the websockets-sansio protocol and uvloop.

The first SIGTERM or SIGINT drains the node gracefully (``gateway/drain.py``) before uvicorn's
own shutdown; a second one stops at once. ``--workers N`` runs N such servers as processes that
share the port through SO_REUSEPORT (``workers.py`` supervises them).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import sys
import threading
import time
from types import FrameType

import uvicorn

from .config import Settings, is_loopback
from .data_dir import make_private
from .gateway.drain import HARD_STOP_MARGIN, drain_deadline, end_sessions
from .gateway.edge import AdmissionGate
from .gateway.worker_metrics import WorkerSlot
from .gateway.ws_protocol import SinkingWebSocketProtocol
from .logs import install_redaction

log = logging.getLogger("harken.server")

# uvicorn refuses frames larger than this at the protocol level; the session itself enforces
# the smaller ``max_message_bytes`` so that it can send an `error` event before closing 1009.
PROTOCOL_MAX_SIZE_FACTOR = 16
# The cyclic garbage collector's young generation is scanned every 700 allocations by default;
# with hundreds of sessions alive (thousands of coroutine frames, buffers, SQL objects) those
# passes took ~6 % of the server's CPU. Fewer young passes; start-up objects frozen (below).
GC_THRESHOLDS = (5_000, 10, 10)


def uvicorn_config(settings: Settings, app=None) -> uvicorn.Config:
    from .gateway.app import create_app

    install_redaction()          # uvicorn's own handlers write records the root's filter never sees
    config = uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        ws=SinkingWebSocketProtocol,     # websockets-sansio, binary messages straight to the session
        # No permessage-deflate: a few MiB of compressed zeros inflate to hours of audio, and
        # Opus does not compress anyway.
        ws_per_message_deflate=False,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http=AdmissionGate,     # admission, then httptools with a bounded, timed request head (edge.py)
        lifespan="on",
        ws_max_size=max(settings.max_message_bytes * PROTOCOL_MAX_SIZE_FACTOR, 1 << 20),
        ws_ping_interval=settings.keepalive_interval,
        ws_ping_timeout=settings.keepalive_timeout,
        log_level=settings.log_level,
        # json: uvicorn's own records go through our root handler too, instead of its text one
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        access_log=False,       # query strings could carry uids; tokens never do
        timeout_graceful_shutdown=20,
    )
    config.harken_settings = settings     # read by the edge protocols (limits, deadlines)
    return config


def run_server(settings: Settings) -> int:
    """Serve until stopped; returns the exit status."""
    make_private(settings.data_dir)
    print(banner(settings), file=sys.stderr, flush=True)
    if settings.workers > 1:
        from .workers import run_workers

        return run_workers(settings, serve)
    serve(settings)
    return 0


def serve(settings: Settings, *, worker: WorkerSlot | None = None) -> None:
    """One server process, in the foreground. As a ``worker`` it joins the port's SO_REUSEPORT
    group, and only once its start-up (store, engine) is done: uvicorn listens after the lifespan."""
    from .gateway.app import create_app

    app = create_app(settings, worker)
    sockets = [reuse_port_socket(settings.host, settings.port)] if worker is not None else None
    DrainingServer(uvicorn_config(settings, app), app).run(sockets=sockets)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A bound, not yet listening TCP socket with SO_REUSEPORT: every process of the group binds
    its own, and the kernel spreads new connections over those that listen."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose first stop signal drains the node (drain.py) before shutting down."""

    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        gc.set_threshold(*GC_THRESHOLDS)
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)          # the lifespan (store, models) has run
        gc.freeze()                             # what start-up loaded is never scanned again

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        gateway = getattr(self.app.state, "gateway", None)
        if self._draining:
            log.warning("second stop signal: stopping now, without waiting for sessions")
            self.force_exit = True
        if self._draining or gateway is None or not self.started or self._loop is None:
            super().handle_exit(sig, frame)          # still starting, or asked twice: uvicorn's way
            return
        # A signal handler runs between two bytecodes of the loop's thread: only schedule here.
        self._draining = True
        self._captured_signals.append(sig)
        _start_watchdog(gateway.settings.drain_timeout + HARD_STOP_MARGIN)
        self._loop.call_soon_threadsafe(self._begin_drain, gateway, time.monotonic())

    def _begin_drain(self, gateway, signalled_at: float) -> None:
        self._drain_task = asyncio.ensure_future(self._drain(gateway, signalled_at))

    async def _drain(self, gateway, signalled_at: float) -> None:
        try:
            deadline = drain_deadline(gateway, signalled_at)
            gateway.draining = True
            for server in getattr(self, "servers", []):
                server.close()                   # new connections fail over to other nodes at once
            await end_sessions(gateway)
            # uvicorn then closes what is left (WebSockets with 1012) and runs the app's shutdown
            # (drain.shutdown_graces): a third of the time left for the former, the rest for it.
            self.config.timeout_graceful_shutdown = max(1, int((deadline - time.monotonic()) / 3))
        except Exception:
            log.exception("draining failed; shutting down")
        finally:
            self.should_exit = True


def _start_watchdog(seconds: float) -> None:
    """The bound on the whole stop: if the drain and shutdown have not ended the process after
    ``seconds``, end it. Nothing a client was sent is lost: segments are stored before they are
    sent, and webhook rows and processing claims in the store are picked up by other nodes."""

    def expire() -> None:
        log.error("stop took longer than %.0fs: exiting without finishing the shutdown", seconds)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def banner(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"ws://{host}:{settings.port}"
    how = {
        "local": f"  token:   harken token --uid alice --data-dir {settings.data_dir}\n"
                 f"  try it:  harken stream recording.wav --url {base}/v4/listen"
                 + (f"\n  page:    {_page(settings, host)}   (the #pair secret lets the page get tokens: "
                    f"keep it to yourself)" if is_loopback(settings.host) else ""),
        "firebase": f"  auth:    Firebase ID tokens of project {settings.firebase_project_id}",
        "none": f"  auth:    none (uid parameter trusted; loopback only)\n"
                f"  try it:  harken stream recording.wav --url {base}/v4/listen",
    }[settings.auth]
    return (
        f"Harken gateway\n"
        f"  listen:  {base}/v4/listen   (browsers: {base}/v4/web/listen)\n"
        f"  health:  http://{host}:{settings.port}/healthz, /readyz\n"
        f"  auth:    {settings.auth}\n"
        f"  engines: {', '.join(_engines(settings))}\n"
        f"  store:   {_store(settings)}\n"
        f"  data:    {settings.data_dir.resolve()}\n"
        f"{how}"
    )


def _page(settings: Settings, host: str) -> str:
    from .gateway.web import page_address

    return page_address(settings, f"http://{host}:{settings.port}")


def _engines(settings: Settings) -> list[str]:
    """The speech engines this configuration can use (cloud ones only with a key)."""
    model = "tiny.en, embedded" if settings.whisper_model == "embedded" else settings.whisper_model
    engines = [f"local faster-whisper ({model}, {settings.whisper_compute_type})"]
    for name in ("deepgram", "soniox", "speechmatics"):
        if getattr(settings, f"{name}_api_key"):
            engines.append(name)
    if getattr(settings, "null_provider", False):
        engines.append("null (load tests)")
    return engines


def _store(settings: Settings) -> str:
    """Where conversations are kept, with any password masked."""
    from sqlalchemy.engine import make_url

    from .conversations.store import database_url

    return make_url(database_url(settings)).render_as_string(hide_password=True)
