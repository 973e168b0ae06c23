"""The socket-to-session binary sink (harken/gateway/ws_protocol.py), through a real uvicorn
server on loopback and the websockets client: order, fragments, control frames, pausing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import socket
import time
from urllib.parse import urlsplit

import numpy as np
import pytest
import uvicorn
import websockets
import websockets.server
from websockets.frames import apply_mask

from harken.client import device_messages
from harken.codecs import DecodeError
from harken.codecs.opus import OpusDecoder
from harken.gateway.ws_protocol import SinkingWebSocketProtocol, binary_sink
from harken.native import opus_reader

from .conftest import load_audio

pytestmark = pytest.mark.timeout(60)

PAUSE_SECONDS = 0.4


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


async def sink_app(scope, receive, send):
    """Binary messages go to ``received`` (through the sink once "attach" came, through
    ``receive()`` before); text commands: attach, pause (resumes after PAUSE_SECONDS), report."""
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    received: list[tuple[str, str, float]] = []          # (path taken, digest, arrival time)
    sink = binary_sink(scope)
    paused_between: list[float] = []

    def take(data: bytes) -> None:
        received.append(("sink", digest(data), time.monotonic()))

    loop = asyncio.get_running_loop()

    def resume() -> None:
        paused_between.append(time.monotonic())
        sink.resume_reading()

    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("bytes") is not None:
            received.append(("queue", digest(message["bytes"]), time.monotonic()))
        elif message["text"] == "attach":
            sink.attach(take)
        elif message["text"] == "attach and ack":
            sink.attach(take)
            await send({"type": "websocket.send", "text": "attached"})
        elif message["text"] == "attach opus":
            opus = OpusStreamRecorder()
            sink.attach(opus.on_message, opus.reader)
            await send({"type": "websocket.send", "text": "attached"})
        elif message["text"] == "report opus":
            await send({"type": "websocket.send", "text": json.dumps(opus.report())})
        elif message["text"] == "pause":
            sink.pause_reading()
            paused_between.append(time.monotonic())
            loop.call_later(PAUSE_SECONDS, resume)
        elif message["text"] == "report":
            await send({"type": "websocket.send", "text": json.dumps(
                {"received": received, "paused": paused_between, "offered": sink is not None})})


class OpusStreamRecorder:
    """A sink with the native Opus reader, as a session attaches it: the reader's pieces and the
    messages it leaves (decoded by the Python path) are recorded in arrival order."""

    def __init__(self):
        self.decoder = OpusDecoder(16000, 1)
        self.reader = self.decoder.native_reader(640, 65536, self.take_native)
        self.parts: list[np.ndarray] = []
        self.by_path = {"native": 0, "python": 0, "error": 0, "keepalive": 0}

    def take_native(self) -> None:
        pcm, messages, _, _ = self.reader.take()
        if messages:
            self.by_path["native"] += messages
            self.parts.append(np.frombuffer(pcm, np.int16))

    def on_message(self, data: bytes) -> None:
        self.take_native()                      # what the reader decoded came first
        if len(data) <= 2:
            self.by_path["keepalive"] += 1
            return
        try:
            self.parts.append(self.decoder.decode(data))
            self.by_path["python"] += 1
        except DecodeError:
            self.by_path["error"] += 1

    def report(self) -> dict:
        self.take_native()
        pcm = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int16)
        return {"by_path": self.by_path, "samples": len(pcm), "digest": digest(pcm.tobytes())}


@pytest.fixture
async def sink_server():
    config = uvicorn.Config(sink_app, host="127.0.0.1", port=0, ws=SinkingWebSocketProtocol, lifespan="off",
                            log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"ws://127.0.0.1:{port}/"
    server.should_exit = True
    await asyncio.wait_for(task, 10)


async def report(ws) -> dict:
    await ws.send("report")
    return json.loads(await ws.recv())


async def test_binary_messages_reach_the_sink_in_order_with_fragments_and_control_frames(sink_server):
    payloads = [bytes([i % 256]) * (3 + i * 7 % 200) for i in range(120)]
    async with websockets.connect(sink_server, max_size=None) as ws:
        for data in payloads[:10]:
            await ws.send(data)                       # queued for receive(): no sink yet
        await ws.send("attach")
        for i, data in enumerate(payloads[10:], start=10):
            if i % 17 == 0:
                await ws.ping()                       # control frames between data frames
            if i % 23 == 0:
                await ws.send([data[:2], data[2:]])   # a fragmented message: two frames, one message
            else:
                await ws.send(data)
        result = await report(ws)
    assert result["offered"]
    assert [d for _, d, _ in result["received"]] == [digest(p) for p in payloads]
    paths = [path for path, _, _ in result["received"]]
    # Messages that were queued before the sink came go through it, first, when it attaches.
    assert paths[10:] == ["sink"] * 110
    assert set(paths[:10]) <= {"queue", "sink"}


async def test_a_paused_sink_receives_nothing_until_resumed(sink_server):
    async with websockets.connect(sink_server, max_size=None) as ws:
        await ws.send("attach")
        await ws.send("pause")
        await asyncio.sleep(0.05)
        for i in range(30):
            await ws.send(bytes([i]) * 80)
        result = await report(ws)
    paused_at, resumed_at = result["paused"]
    arrivals = [at for _, _, at in result["received"]]
    assert [d for _, d, _ in result["received"]] == [digest(bytes([i]) * 80) for i in range(30)]
    assert resumed_at - paused_at >= PAUSE_SECONDS - 0.05
    assert all(at >= resumed_at for at in arrivals), "a frame arrived while reading was paused"


async def test_without_the_sink_protocol_the_app_receives_through_the_queue():
    scope = {"type": "websocket", "extensions": {"websocket.http.response": {}}}
    assert binary_sink(scope) is None


# --- this protocol's own framing, byte by byte -------------------------------------------------

def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked client frame (RFC 6455 §5.2), with the shortest length encoding."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        head = bytes([first, 0x80 | size])
    elif size < 65536:
        head = bytes([first, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


class RawClient:
    """A WebSocket client that writes bytes exactly as the test cuts them (TCP_NODELAY)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str) -> "RawClient":
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET / HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        response = await reader.readuntil(b"\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 101"), response
        return cls(reader, writer)

    async def write(self, data: bytes, pause: float = 0.0) -> None:
        self.writer.write(data)
        await self.writer.drain()
        if pause:
            await asyncio.sleep(pause)        # so the server reads this piece on its own

    async def read_frame(self) -> tuple[int, bytes]:
        first, second = await self.reader.readexactly(2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await self.reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await self.reader.readexactly(8), "big")
        return first & 0x0F, await self.reader.readexactly(size)

    async def read_text(self) -> str:
        while True:
            opcode, payload = await self.read_frame()
            if opcode == 0x1:
                return payload.decode()
            assert opcode in (0x9, 0xA), opcode         # pings and pongs may come between


def bytes_parsed_by_websockets(monkeypatch) -> list[int]:
    """The sizes of the pieces of data handed to websockets' own parser, from now on."""
    fed: list[int] = []
    original = websockets.server.ServerProtocol.receive_data
    monkeypatch.setattr(websockets.server.ServerProtocol, "receive_data",
                        lambda self, data: (fed.append(len(data)), original(self, data))[1])
    return fed


def binary_stream(messages: list[bytes], ping_at: tuple[int, int], text_at: tuple[int, int]) -> bytes:
    """``messages`` as binary frames, with a ping after message i when i % m == r for
    ``ping_at`` = (m, r), and a text message likewise for ``text_at``."""
    stream = b""
    for index, message in enumerate(messages):
        stream += client_frame(0x2, message)
        if index % ping_at[0] == ping_at[1]:
            stream += client_frame(0x9, b"ping")         # a control frame between data frames
        if index % text_at[0] == text_at[1]:
            stream += client_frame(0x1, b"noop")         # a text message between binary ones
    return stream


async def write_cut(client: RawClient, stream: bytes, rng: random.Random, bytewise: int, largest: int) -> None:
    """The first ``bytewise`` bytes one byte per read (every cut inside a header, a mask, a
    payload), the rest in pieces of 1 to ``largest`` bytes."""
    position = 0
    while position < len(stream):
        step = 1 if position < bytewise else rng.randrange(1, largest)
        await client.write(stream[position:position + step], pause=0.001 if step == 1 else 0.0)
        position += step


async def stream_cut(sink_server, fed: list[int], attach: bytes, report_command: bytes, stream: bytes,
                     rng: random.Random, bytewise: int, largest: int) -> tuple["RawClient", dict]:
    """Connect, attach the sink with ``attach``, write ``stream`` cut anywhere (``write_cut``),
    and return the open client and the server's answer to ``report_command``. ``fed`` (from
    ``bytes_parsed_by_websockets``) counts only what follows the attach."""
    client = await RawClient.connect(sink_server)
    await client.write(client_frame(0x1, attach))
    assert await client.read_text() == "attached"
    fed.clear()
    await write_cut(client, stream, rng, bytewise=bytewise, largest=largest)
    await client.write(client_frame(0x1, report_command))
    return client, json.loads(await client.read_text())

async def test_frames_cut_anywhere_reach_the_sink_whole_in_order_without_the_websockets_parser(
        sink_server, monkeypatch):
    fed = bytes_parsed_by_websockets(monkeypatch)
    rng = random.Random(7)
    # Every length encoding: 7-bit (0 and 125 at its edges), 16-bit (126, 65535), 64-bit.
    sizes = [0, 1, 80, 125, 126, 127, 300, 65535, 65536, 70000] + [rng.randrange(1, 400) for _ in range(40)]
    payloads = [rng.randbytes(size) for size in sizes]
    client, result = await stream_cut(sink_server, fed, b"attach and ack", b"report",
                                      binary_stream(payloads, ping_at=(9, 4), text_at=(13, 6)), rng,
                                      bytewise=1024, largest=5000)
    assert [d for _, d, _ in result["received"]] == [digest(p) for p in payloads]
    assert {path for path, _, _ in result["received"]} == {"sink"}
    binary_bytes = sum(len(p) for p in payloads)
    # websockets parsed only the pings, the text frames and "report": a few hundred bytes.
    assert sum(fed) < 1000 < binary_bytes, (sum(fed), binary_bytes)

    await client.write(client_frame(0x8, (1000).to_bytes(2, "big")))
    opcode, payload = await client.read_frame()
    while opcode != 0x8:
        opcode, payload = await client.read_frame()
    assert int.from_bytes(payload[:2], "big") == 1000      # the close handshake still works
    client.writer.close()


async def test_a_frame_over_the_size_limit_is_refused_with_1009_before_its_payload_arrives(sink_server):
    client = await RawClient.connect(sink_server)
    await client.write(client_frame(0x1, b"attach and ack"))
    assert await client.read_text() == "attached"
    await client.write(client_frame(0x2, b"fine"))
    # Only the header of a 1 GiB frame: the server must not wait for (or buffer) the payload.
    await client.write(bytes([0x82, 0x80 | 127]) + (1 << 30).to_bytes(8, "big") + os.urandom(4))
    opcode, payload = await asyncio.wait_for(client.read_frame(), 5)
    while opcode != 0x8:
        opcode, payload = await asyncio.wait_for(client.read_frame(), 5)
    assert int.from_bytes(payload[:2], "big") == 1009
    client.writer.close()


@pytest.mark.skipif(opus_reader is None, reason="the native reader is not built (python -m harken.native.build)")
async def test_with_the_native_reader_cut_frames_mixed_with_garbage_decode_exactly_as_the_python_path(
        sink_server, monkeypatch):
    """Opus packets of real speech, with keepalives, garbage, text and pings between them, cut
    anywhere: the reader decodes the packets, leaves the rest to the sink, and the audio is
    bit-identical to decoding every message in order with the Python decoder."""
    fed = bytes_parsed_by_websockets(monkeypatch)
    rng = random.Random(11)
    packets, _ = device_messages(load_audio("goforward.wav"), "opus", 16000)
    messages = []
    for packet in packets:
        messages.append(packet)
        roll = rng.random()
        if roll < 0.05:
            messages.append(b"\x8a\x00")                                 # the app's keepalive
        elif roll < 0.10:
            messages.append(b"\xff" * rng.randint(3, 40))                 # not an Opus packet
        elif roll < 0.12:
            messages.append(rng.randbytes(rng.randint(3, 200)))           # noise; may parse as Opus
    reference = OpusDecoder(16000, 1)
    expected, expected_errors = [], 0
    for message in messages:
        if len(message) > 2:
            try:
                expected.append(reference.decode(message))
            except DecodeError:
                expected_errors += 1
    expected_pcm = np.concatenate(expected)

    client, result = await stream_cut(sink_server, fed, b"attach opus", b"report opus",
                                      binary_stream(messages, ping_at=(37, 5), text_at=(53, 7)), rng,
                                      bytewise=600, largest=3000)
    client.writer.close()

    assert result["samples"] == len(expected_pcm)
    assert result["digest"] == digest(expected_pcm.tobytes())
    by_path = result["by_path"]
    assert by_path["error"] == expected_errors > 0
    assert by_path["keepalive"] == sum(len(m) <= 2 for m in messages) > 0
    assert by_path["native"] + by_path["python"] == len(expected)
    assert by_path["native"] >= len(packets) * 0.95        # the reader, not Python, took the packets
    assert sum(fed) < 2000                                  # websockets saw only pings and text
