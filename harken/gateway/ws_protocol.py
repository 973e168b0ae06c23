"""uvicorn's websockets-sansio protocol with a synchronous sink for binary messages.

A device sends 100 Opus packets a second. Through plain ASGI every packet costs a queue put, a
``transport.pause_reading()``/``resume_reading()`` pair (two epoll changes) and a task wake-up to
hand ~80 bytes to the session; at a few hundred streams per core that bookkeeping, not the audio,
fills the core. With this protocol a session may register a sink (``BinarySink.attach``): from
then on binary messages are handed to it straight from ``data_received``, in order, and only text
messages and the disconnect still travel through the ASGI queue.

The sink is offered as the ASGI scope extension ``harken.binary_sink``; an app on another server
simply does not find it and keeps receiving everything through ``receive()``. The sink must not
raise and must be quick (decode and append): it runs inside the event loop's read callback.
Back-pressure is the sink owner's business: ``pause_reading``/``resume_reading`` are offered for
when its consumer falls behind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

SCOPE_EXTENSION = "harken.binary_sink"

log = logging.getLogger("harken.ws")


class BinarySink:
    """What the scope extension holds: attach a callback, and pause or resume reading."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: "SinkingWebSocketProtocol") -> None:
        self._protocol = protocol

    def attach(self, callback: Callable[[bytes], None]) -> None:
        """Deliver every later binary message to ``callback``. Binary messages already queued
        for ``receive()`` are handed over first, so the audio stays in order."""
        self._protocol.attach_sink(callback)

    def pause_reading(self) -> None:
        self._protocol.pause_sink_reading()

    def resume_reading(self) -> None:
        self._protocol.resume_sink_reading()


def binary_sink(scope: dict) -> BinarySink | None:
    """The connection's sink, when the server offers one."""
    return scope.get("extensions", {}).get(SCOPE_EXTENSION)


class SinkingWebSocketProtocol(WebSocketsSansIOProtocol):
    """``uvicorn.Config(ws=SinkingWebSocketProtocol)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._sink: Callable[[bytes], None] | None = None
        self._sink_paused = False

    def handle_connect(self, event) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)    # absent when the handshake was refused
        if scope is not None:
            scope["extensions"][SCOPE_EXTENSION] = BinarySink(self)

    def send_receive_event_to_app(self) -> None:
        sink = self._sink
        if sink is None or self.curr_msg_data_type != "bytes" or self.close_sent:
            super().send_receive_event_to_app()
            return
        frames = self.frames
        self.frames = []
        _deliver(sink, frames[0] if len(frames) == 1 else b"".join(frames))

    # -- BinarySink -----------------------------------------------------------------------
    def attach_sink(self, callback: Callable[[bytes], None]) -> None:
        kept = []
        while not self.queue.empty():
            message = self.queue.get_nowait()
            if message["type"] == "websocket.receive" and message.get("bytes") is not None:
                _deliver(callback, message["bytes"])
            else:
                kept.append(message)
        for message in kept:
            self.queue.put_nowait(message)
        self._sink = callback
        if self.read_paused and self.queue.empty() and not self._sink_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_sink_reading(self) -> None:
        if not self._sink_paused:
            self._sink_paused = True
            if not self.read_paused:
                self.transport.pause_reading()

    def resume_sink_reading(self) -> None:
        if self._sink_paused:
            self._sink_paused = False
            if not self.read_paused:
                self.transport.resume_reading()

    async def receive(self):
        message = await self.queue.get()
        # uvicorn resumes reading when its queue empties; a paused sink keeps it paused.
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if not self._sink_paused:
                self.transport.resume_reading()
        return message


def _deliver(sink: Callable[[bytes], None], data: bytes) -> None:
    """One message to the sink, live or queued before it attached: a sink bug must not kill the
    connection's read path (or the session opening that attaches it)."""
    try:
        sink(data)
    except Exception:
        log.exception("binary sink failed")
