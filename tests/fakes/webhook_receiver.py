"""A webhook receiver for tests: a real HTTP/1.1 server on 127.0.0.1 that records requests.

It can be taken down (the port refuses connections) and brought back on the same port, made to
answer with an error status, or made to hang before answering, so delivery can be tested
against the failures real receivers have. ``LoopbackHTTPServer`` is the small HTTP engine it
shares with the fake language-model server.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

MAX_HEAD = 64 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]          # lower-case names
    body: bytes
    received_at: float
    raw_query: str = ""              # as sent: a parameter may repeat (Deepgram's keyterm)


class LoopbackHTTPServer:
    """Minimal keep-alive HTTP/1.1 server (Content-Length bodies only, as httpx sends)."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task] = set()

    async def start(self) -> "LoopbackHTTPServer":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close the port and drop every open connection (the receiver is "down")."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                parts = urlsplit(target)
                request = Request(method, parts.path, dict(parse_qsl(parts.query)), headers, body, time.monotonic(),
                                  parts.query)
                status, out_headers, out_body = await self.handle(request)
                head_lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(out_body)}"]
                head_lines += [f"{k}: {v}" for k, v in out_headers.items()]
                writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode() + out_body)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass            # stop(): end quietly (asyncio logs a server callback that was cancelled)
        finally:
            self._connections.discard(writer)
            self._handlers.discard(task)
            writer.close()


class WebhookReceiver(LoopbackHTTPServer):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []      # accepted (2xx) requests, in arrival order
        self.attempts = 0                      # every request, accepted or not
        self.status = 200
        self.hang_seconds = 0.0
        self._arrived = asyncio.Condition()

    def url(self, path: str = "/hook") -> str:
        return self.base_url + path

    async def handle(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        self.attempts += 1
        if self.hang_seconds:
            await asyncio.sleep(self.hang_seconds)
        status = self.status
        if 200 <= status < 300:
            self.requests.append(request)
            async with self._arrived:
                self._arrived.notify_all()
        return status, {"Content-Type": "application/json"}, b"{}"

    async def wait_for(self, count: int, timeout: float) -> list[Request]:
        """Wait until ``count`` requests were accepted (or fail after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.requests) >= count)
        return self.requests


class ServedApp:
    """A real ASGI app (Starlette) served by uvicorn on 127.0.0.1 in this event loop."""

    def __init__(self, app) -> None:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                     lifespan="off"))
        self._task: asyncio.Task | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> "ServedApp":
        self._task = asyncio.create_task(self._server.serve())
        async with asyncio.timeout(10):
            while not self._server.started:
                await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.should_exit = True
        await asyncio.wait_for(self._task, 10)
