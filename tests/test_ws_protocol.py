"""The socket-to-session binary sink (harken/gateway/ws_protocol.py), through a real uvicorn
server on loopback and the websockets client: order, fragments, control frames, pausing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import pytest
import uvicorn
import websockets

from harken.gateway.ws_protocol import SinkingWebSocketProtocol, binary_sink

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
        elif message["text"] == "pause":
            sink.pause_reading()
            paused_between.append(time.monotonic())
            loop.call_later(PAUSE_SECONDS, resume)
        elif message["text"] == "report":
            await send({"type": "websocket.send", "text": json.dumps(
                {"received": received, "paused": paused_between, "offered": sink is not None})})


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
