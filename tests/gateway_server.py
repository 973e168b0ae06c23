"""A real Harken server on a loopback port, run in a background thread with its own event loop.

The tests talk to it over real sockets with real WebSocket clients, and can still look at its
``Gateway`` object (live sessions, providers) to check that nothing leaks.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from harken.config import Settings
from harken.server import uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayServer:
    def __init__(self, settings: Settings):
        self.settings = settings.replace(port=settings.port or free_port())
        self.server: uvicorn.Server | None = None
        self._app = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"ws://127.0.0.1:{self.settings.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def gateway(self):
        return self._app.state.gateway

    def start(self, timeout: float = 60.0) -> "GatewayServer":
        config = uvicorn_config(self.settings)
        config.log_level = "warning"
        self._app = config.app
        self.server = uvicorn.Server(config)
        # uvicorn installs signal handlers only in the main thread; this runs in another one.
        self._thread = threading.Thread(target=self._run, name="gateway-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("gateway server failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("gateway server did not start")
            time.sleep(0.05)
        return self

    def _run(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def call(self, fn, timeout: float = 10.0):
        """Run ``fn()`` on the server's loop and return its result (for inspecting state safely)."""
        done = threading.Event()
        box = {}

        def run():
            try:
                box["value"] = fn()
            except Exception as exc:  # pragma: no cover - surfaced below
                box["error"] = exc
            done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise TimeoutError("server loop did not answer")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)

    def __enter__(self) -> "GatewayServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
