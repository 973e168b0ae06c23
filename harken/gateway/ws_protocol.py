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
when its consumer falls behind or the client is ahead of real time (``pacing.py``). A pause takes
effect at the next frame: frames already read wait in this protocol until the resume.

Framing. Parsing a frame through websockets' generator-based parser and its events costs ~2.8 µs,
a tenth of the gateway's CPU at a few hundred streams. So once the handshake is done and
websockets' parser waits at a frame boundary, this protocol cuts the byte stream into frames
itself: a complete, final, masked binary frame without extension bits, while a sink is attached
and no fragmented message is open, is unmasked here and goes straight to the sink; every other
frame (text, control, fragments, compressed, oversized) is handed to websockets whole, so its
parser always starts at a frame boundary and keeps enforcing the protocol for them. After a close
frame everything goes to websockets, as before.

Native reader. A sink may come with a reader (``native/opus_reader.c``, for Opus streams) that
frames, unmasks and decodes the common frames itself: at each frame boundary ``reader.scan``
takes every frame it can and returns the offset of the first it leaves, which this protocol then
handles as above (to the sink, or to websockets). The reader's audio reaches its owner through
the reader's own callback, in pieces, without a Python call per packet.

Keepalive. uvicorn closes a connection 1011 when a ping's pong has not come back within
``ws_ping_timeout``. But the server stops reading a socket of its own accord: a client past its
burst is paced to real time, a text message waits until the session takes it, a backlog waits
for the pump. A pong the client sent in time then sits behind data the server has not read, and
an honest device reconnecting with a backlog was closed 1011 (a paced suggestion flood after
~40 s). Here the deadline counts only the time the server was reading the socket: a dead peer
is still found one timeout of reading after a ping, and a client held back by the server is not
mistaken for one. What bounds such a client is the pacing and TCP's flow control (the server
holds at most one socket read of it unprocessed), as for any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask
from websockets.protocol import State
from websockets.streams import StreamReader

from .edge import ConnectionLedger, client_key

SCOPE_EXTENSION = "harken.binary_sink"

_FIN_BINARY = 0x82              # first header byte: FIN, no RSV bits, opcode 2
_DATA_OPCODES = (0x0, 0x1, 0x2)  # continuation, text, binary
_OPCODE_CLOSE = 0x8

log = logging.getLogger("harken.ws")


class BinarySink:
    """What the scope extension holds: attach a callback, and pause or resume reading."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: "SinkingWebSocketProtocol") -> None:
        self._protocol = protocol

    def attach(self, callback: Callable[[bytes], None], reader=None) -> None:
        """Deliver every later binary message to ``callback``. Binary messages already queued
        for ``receive()`` are handed over first, so the audio stays in order. With a native
        ``reader``, the frames it takes never reach ``callback`` (see the module docstring)."""
        self._protocol.attach_sink(callback, reader)

    def pause_reading(self) -> None:
        self._protocol.pause_sink_reading()

    def resume_reading(self) -> None:
        self._protocol.resume_sink_reading()


def binary_sink(scope: dict) -> BinarySink | None:
    """The connection's sink, when the server offers one."""
    return scope.get("extensions", {}).get(SCOPE_EXTENSION)


class SinkingWebSocketProtocol(WebSocketsSansIOProtocol):
    """``uvicorn.Config(ws=SinkingWebSocketProtocol)``."""

    def __init__(self, config, server_state, *args, **kwargs) -> None:
        super().__init__(config, server_state, *args, **kwargs)
        self._ledger = ConnectionLedger.of(config, server_state)
        self._ledger_key: str | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._reader = None             # the sink's native reader, if it brought one
        self._sink_paused = False
        # Bytes of an incomplete frame, once this protocol does the framing (None before).
        self._partial: bytearray | None = None
        self._framing_done = False      # never (again) frame here: websockets parses the rest
        self._fragmented = False        # websockets holds an unfinished fragmented message

    # -- keepalive: the pong deadline counts only time the server was reading --------------
    # ``read_paused`` (uvicorn's: a message waits for the app) and ``_sink_paused`` (pacing, a
    # backlog) are the two reasons the transport is paused; each change of either is noted.
    _uv_read_paused = False
    _sink_paused = False                # (uvicorn's __init__ sets read_paused before ours runs)
    _unread_since: float | None = None  # loop time the server stopped reading (None: it reads)
    _unread_total = 0.0                 # seconds it did not read, over the connection
    _unread_at_ping = 0.0               # _unread_total when the pending ping was sent

    @property
    def read_paused(self) -> bool:
        return self._uv_read_paused

    @read_paused.setter
    def read_paused(self, value: bool) -> None:
        self._uv_read_paused = value
        self._note_reading()

    def _note_reading(self) -> None:
        paused = self._uv_read_paused or self._sink_paused
        if paused == (self._unread_since is not None):
            return
        now = self.loop.time()
        if paused:
            self._unread_since = now
        else:
            self._unread_total += now - self._unread_since
            self._unread_since = None

    def _unread_seconds(self, now: float) -> float:
        return self._unread_total + (now - self._unread_since if self._unread_since is not None else 0.0)

    def send_keepalive_ping(self) -> None:
        self._unread_at_ping = self._unread_seconds(self.loop.time())
        super().send_keepalive_ping()

    def keepalive_timeout(self) -> None:
        if self.pending_ping_payload is not None and not self.close_sent:
            now = self.loop.time()
            reading = now - self.ping_sent_at - (self._unread_seconds(now) - self._unread_at_ping)
            if reading < self.ping_timeout:
                # Not yet a timeout's worth of reading: look again when there could be one
                # (a timer rather than a hook on resume keeps uvicorn's pong handling as it is).
                self.pong_timer = self.loop.call_later(self.ping_timeout - reading, self.keepalive_timeout)
                return
        super().keepalive_timeout()

    # -- the connection ledger (edge.py): an upgraded connection still counts --------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._ledger_key = client_key(transport)
        self._ledger.join(self._ledger_key)

    def connection_lost(self, exc) -> None:
        key, self._ledger_key = self._ledger_key, None
        if key is not None:
            self._ledger.leave(key)
        super().connection_lost(exc)

    # -- framing --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._partial is None:
            if self._framing_done or not self._can_take_framing():
                super().data_received(data)
                return
            self._partial = bytearray()
        if self._partial:
            self._partial += data
            data = bytes(self._partial)
            self._partial.clear()
        self._split_frames(data)

    def _can_take_framing(self) -> bool:
        """True when the handshake is done and websockets' parser waits between two frames."""
        conn = self.conn
        if not self.handshake_complete or self.close_sent or conn.state is not State.OPEN:
            return False
        if conn.reader.buffer or conn.parser_exc is not None:
            return False
        inner = conn.parser
        while getattr(inner, "gi_yieldfrom", None) is not None:
            inner = inner.gi_yieldfrom
        return getattr(inner, "gi_code", None) is StreamReader.at_eof.__code__

    def _split_frames(self, data: bytes) -> None:
        size, pos = len(data), 0
        limit = self.conn.max_message_size
        reader = self._reader
        while size - pos >= 2:
            if self._sink_paused:
                break           # the rest waits in _partial until resume_sink_reading
            if reader is not None and not self._fragmented and not self.close_sent:
                pos = reader.scan(data, pos, -1 if limit is None else limit)
                if size - pos < 2:
                    break
            first, second = data[pos], data[pos + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(data[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(data[pos + 2:pos + 10], "big"), 10
            if limit is not None and length > limit:
                self._give_up_framing(data[pos:])     # websockets closes with 1009
                return
            masked = second & 0x80
            if masked:
                head += 4
            end = pos + head + length
            if end > size:
                break
            if first == _FIN_BINARY and masked and self._sink is not None and not self._fragmented \
                    and not self.close_sent:
                _deliver(self._sink, apply_mask(data[pos + head:end], data[pos + head - 4:pos + head]))
            else:
                opcode = first & 0x0F
                if opcode == _OPCODE_CLOSE:
                    self._give_up_framing(data[pos:])
                    return
                if opcode in _DATA_OPCODES:
                    self._fragmented = not first & 0x80
                super().data_received(data[pos:end])
                if self.conn.parser_exc is not None or self.transport.is_closing():
                    self._framing_done, self._partial = True, None
                    return
            pos = end
        if pos < size:
            self._partial += data[pos:]

    def _give_up_framing(self, rest: bytes) -> None:
        self._framing_done, self._partial = True, None
        super().data_received(rest)

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
    def attach_sink(self, callback: Callable[[bytes], None], reader=None) -> None:
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
        self._reader = reader
        if self.read_paused and self.queue.empty() and not self._sink_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_sink_reading(self) -> None:
        if not self._sink_paused:
            self._sink_paused = True
            self._note_reading()
            if not self.read_paused:
                self.transport.pause_reading()

    def resume_sink_reading(self) -> None:
        if self._sink_paused:
            self._sink_paused = False
            self._note_reading()
            if not self.read_paused:
                self.transport.resume_reading()
            if self._partial:
                # Frames read before the pause and not yet handed over: soon, not from inside
                # whatever called this (it may be the sink itself).
                self.loop.call_soon(self._resume_partial)

    def _resume_partial(self) -> None:
        if self._partial and not self._sink_paused and not self._framing_done:
            data = bytes(self._partial)
            self._partial.clear()
            self._split_frames(data)

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
