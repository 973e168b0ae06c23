"""Issue #26: each attack of the hardening probe, through a real socket on loopback.

Every test here reproduces one finding against a running server and fails on the code before
the fix (checked: see the report of the change). Settings that did not exist before are passed
through ``start``, which leaves out fields this Settings does not know, so the same test file
can be run against the old code.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import select
import socket
import stat
import time
import uuid

import httpx
import numpy as np
import pytest
import websockets

from harken.config import Settings
from harken.gateway.auth import mint_local_token

pytestmark = pytest.mark.timeout(120)

PCM_QUERY = "codec=pcm16&sample_rate=16000"


def start(make_gateway, **changes):
    known = {f.name for f in dataclasses.fields(Settings)}
    return make_gateway(**{k: v for k, v in changes.items() if k in known})


def token_for(server, uid: str | None = None) -> str:
    return mint_local_token(server.settings, uid or f"user-{uuid.uuid4().hex[:8]}", 600)


def bearer(server, uid: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(server, uid)}"}


async def until_ready(ws, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.recv()
            if isinstance(message, str) and message.startswith("{") and json.loads(message).get("status") == "ready":
                return


async def connect_to_ready(server, query: str = PCM_QUERY) -> float:
    """Seconds from connecting to the `ready` status of a fresh user's session."""
    started = time.perf_counter()
    async with websockets.connect(f"{server.base}/v4/listen?{query}", additional_headers=bearer(server),
                                  open_timeout=10) as ws:
        await until_ready(ws)
        return time.perf_counter() - started


def raw_exchange(port: int, pieces, *, source: str = "127.0.0.1", timeout: float = 15.0) -> tuple[bytes, int]:
    """Send ``pieces`` on a fresh socket, stopping once the server answers or closes; returns
    (what the server sent, bytes sent)."""
    sent = 0
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as sock:
        for piece in pieces:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(piece)
                sent += len(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return received, sent


def seconds_until_closed(sock: socket.socket, limit: float, trickle: bytes | None = None) -> float:
    """How long the server keeps ``sock`` open (sending ``trickle`` every 0.25 s), up to ``limit``."""
    started = time.monotonic()
    sock.setblocking(False)
    while time.monotonic() - started < limit:
        readable, _, _ = select.select([sock], [], [], 0.25)
        if readable:
            try:
                if sock.recv(65536) == b"":
                    return time.monotonic() - started
            except (ConnectionResetError, BlockingIOError):
                return time.monotonic() - started
        if trickle:
            try:
                sock.send(trickle)
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
    return float("inf")


# --- 1, 6: request heads, slowloris, idle sockets, connection caps --------------------------------

@pytest.mark.parametrize("where", ["header", "request-line"])
def test_an_oversized_request_head_is_refused_431_before_it_is_read(make_gateway, where):
    server = start(make_gateway)
    pad = b"a" * (64 * 1024)
    if where == "header":
        pieces = [b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ", *[pad] * 64, b"\r\n\r\n"]
    else:
        pieces = [b"GET /healthz?", *[pad] * 64, b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]
    answer, _ = raw_exchange(server.settings.port, pieces)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


def test_a_slowloris_head_and_an_idle_socket_are_closed_at_the_head_timeout(make_gateway):
    server = start(make_gateway, request_head_timeout=1.0)
    address = ("127.0.0.1", server.settings.port)
    with socket.create_connection(address, source_address=("127.0.0.2", 0)) as slow, \
            socket.create_connection(address, source_address=("127.0.0.3", 0)) as idle:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert seconds_until_closed(slow, 6.0, trickle=b"X-A: b\r\n") < 3.0
        assert seconds_until_closed(idle, 6.0) < 3.0
    # The address that began a head and did not finish it is refused for a while (it would
    # only reconnect to do it again); a socket that sent nothing is no such offence...
    with socket.create_connection(address, source_address=("127.0.0.2", 0)) as again:
        assert seconds_until_closed(again, 3.0) < 0.5
    # ...others are not: a prompt request on a kept-alive connection is answered.
    with httpx.Client(base_url=server.http, transport=httpx.HTTPTransport(local_address="127.0.0.3")) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz").status_code == 200


def test_one_client_address_cannot_hold_every_connection(make_gateway):
    server = start(make_gateway, max_connections_per_client=4, request_head_timeout=60.0)
    port = server.settings.port
    held = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) for _ in range(4)]
    try:
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as extra:
            assert seconds_until_closed(extra, 3.0) < 1.0          # the fifth is closed at once
        assert seconds_until_closed(held[0], 0.5) == float("inf")  # the four it holds are not
        # Another client is served meanwhile, WebSocket and HTTP alike.
        assert asyncio.run(connect_to_ready(server)) < 5.0
        assert httpx.get(f"{server.http}/healthz").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_a_process_holds_at_most_max_connections(make_gateway):
    server = start(make_gateway, max_connections=6, max_connections_per_client=0, request_head_timeout=60.0)
    port = server.settings.port
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    try:
        with socket.create_connection(("127.0.0.1", port)) as extra:
            assert seconds_until_closed(extra, 3.0) < 1.0
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(f"{server.http}/healthz").status_code == 200     # places come back


# --- 5: compression and real-time pacing ----------------------------------------------------------

async def test_permessage_deflate_is_not_negotiated_on_listen(make_gateway):
    server = start(make_gateway)
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}", additional_headers=bearer(server),
                                  compression="deflate") as ws:
        await until_ready(ws)
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None


def session_audio_seconds(server) -> float:
    return server.call(lambda: max((s.clock.seconds + s._pending_samples / 16000
                                    for s in server.gateway.sessions), default=0.0))


async def test_audio_faster_than_real_time_is_slowed_after_its_burst_and_nothing_is_lost(make_gateway):
    server = start(make_gateway, audio_realtime_factor=10.0, audio_burst_seconds=2.0)
    message = np.zeros(1600, dtype=np.int16).tobytes()            # 100 ms
    total = 200                                                    # 20 s of audio
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}&custom_stt=enabled",
                                  additional_headers=bearer(server)) as ws:
        await until_ready(ws)
        started = time.monotonic()
        sending = asyncio.create_task(_send_all(ws, [message] * total))
        await asyncio.sleep(1.0)
        at_one_second = session_audio_seconds(server)
        elapsed = time.monotonic() - started
        # burst + rate x elapsed, plus one socket read of slack
        assert at_one_second <= 2.0 + 10.0 * elapsed + 2.0, (at_one_second, elapsed)
        async with asyncio.timeout(15):
            await sending
            while session_audio_seconds(server) < total * 0.1 - 0.05:
                await asyncio.sleep(0.1)
        assert time.monotonic() - started >= (20.0 - 2.0) / 10.0 * 0.8     # slowed, not cut off
        assert ws.state is websockets.protocol.State.OPEN


async def _send_all(ws, messages) -> None:
    for message in messages:
        await ws.send(message)


# --- the keepalive under the server's own back-pressure -------------------------------------------

KEEPALIVE = {"keepalive_interval": 1.0, "keepalive_timeout": 1.0}


async def _drain(ws) -> None:
    """Read everything the server sends, so the client library keeps answering its pings."""
    with contextlib.suppress(websockets.exceptions.ConnectionClosed):
        async for _ in ws:
            pass


async def test_a_client_whose_backlog_the_server_works_through_slowly_is_not_dropped_by_the_keepalive(make_gateway):
    """A device that reconnects with a backlog: everything it sends is in the socket at once, and
    past its burst the server reads it at real time. Its pong to a server ping waits in the socket
    behind seconds of audio the server has not read yet: that is the server's doing, not a dead
    peer, so the keepalive must not close it (it did, 1011, one timeout after the first ping)."""
    server = start(make_gateway, audio_realtime_factor=1.0, audio_burst_seconds=1.0, **KEEPALIVE)
    message = np.zeros(1600, dtype=np.int16).tobytes()            # 100 ms
    total = 50                                                     # 5 s: 4 s past the burst
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}&custom_stt=enabled",
                                  additional_headers=bearer(server), ping_interval=None) as ws:
        await until_ready(ws)
        reading = asyncio.create_task(_drain(ws))
        await _send_all(ws, [message] * total)
        async with asyncio.timeout(20):
            while session_audio_seconds(server) < total * 0.1 - 0.05:
                assert ws.state is websockets.protocol.State.OPEN, (ws.close_code, ws.close_reason)
                await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)              # idle and answering: kept through a few more pings
        assert ws.state is websockets.protocol.State.OPEN, (ws.close_code, ws.close_reason)
        await ws.close()
        reading.cancel()
    assert ws.close_code == 1000


def _raw_websocket(server, path: str) -> socket.socket:
    """A WebSocket opened by hand: it sends what the test writes and answers nothing (no pongs)."""
    sock = socket.create_connection(("127.0.0.1", server.settings.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.settings.port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token_for(server)}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:80]
    return sock


def _text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    length = len(payload)
    head = bytes([0x81]) + (bytes([0x80 | length]) if length < 126 else
                            bytes([0x80 | 126]) + length.to_bytes(2, "big") if length < 65536 else
                            bytes([0x80 | 127]) + length.to_bytes(8, "big"))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_peer_that_stops_answering_pings_while_the_server_reads_it_is_still_closed(make_gateway):
    """The keepalive still finds a dead peer: a socket the server is free to read, with no pong."""
    server = start(make_gateway, **KEEPALIVE)
    with _raw_websocket(server, f"/v4/listen?{PCM_QUERY}") as sock:
        started = time.monotonic()
        assert seconds_until_closed(sock, 10.0) < KEEPALIVE["keepalive_interval"] + KEEPALIVE["keepalive_timeout"] + 2.0
    assert time.monotonic() - started >= KEEPALIVE["keepalive_interval"]


def test_a_suggestion_flood_that_never_answers_pings_is_held_by_tcp_not_read_into_memory(make_gateway):
    """The other side of not counting the server's own pauses: a flooding client that answers no
    ping is not closed while the server paces it, so what bounds it must be the pacing. Whatever
    it sends, the server holds at most one socket read of it unprocessed, and others are served."""
    from harken.gateway.ws_protocol import SinkingWebSocketProtocol

    server = start(make_gateway, **KEEPALIVE)
    words = ("lorem ipsum dolor sit amet " * 30).strip()
    frame = _text_frame(json.dumps({"type": "suggested_transcript", "segments": [
        {"text": words, "start": i * 0.01, "end": i * 0.01 + 0.01} for i in range(60)]}))

    def held_unread() -> int:
        held = 0
        for protocol in list(server.server.server_state.connections):
            if isinstance(protocol, SinkingWebSocketProtocol):
                held += sum(len(m.get("text") or m.get("bytes") or b"") for m in list(protocol.queue._queue))
                held += len(protocol._partial or b"")
        return held

    with _raw_websocket(server, f"/v4/listen?{PCM_QUERY}&custom_stt=enabled") as sock:
        sock.setblocking(False)
        sent, most, deadline = 0, 0, time.monotonic() + 4.0
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(frame)
            most = max(most, server.call(held_unread))
            time.sleep(0.01)
        assert asyncio.run(connect_to_ready(server)) < 2.0
    assert sent > 4 * 512 * 1024                 # it sent far more than the server holds
    assert most <= 512 * 1024, (most, sent)


# --- 3, 11: suggested transcripts and client numbers ----------------------------------------------

async def test_a_suggestion_flood_is_capped_merged_in_bounded_segments_and_others_are_served(make_gateway):
    server = start(make_gateway)
    words = ("lorem ipsum dolor sit amet " * 30).strip()           # no sentence end, lowercase
    message = json.dumps({"type": "suggested_transcript", "segments": [
        {"text": words, "start": i * 0.01, "end": i * 0.01 + 0.01} for i in range(60)]})
    assert len(message) < 65536
    longest = 0
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}&custom_stt=enabled",
                                  additional_headers=bearer(server), max_size=None) as ws:
        await until_ready(ws)
        flood = asyncio.create_task(_send_all(ws, [message] * 60))  # ~3.7 MB of text
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(3.0):
                await asyncio.shield(flood)
        others = await connect_to_ready(server)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while True:
                    reply = await ws.recv()
                    if reply.startswith("["):
                        longest = max([longest, *(len(s["text"]) for s in json.loads(reply))])
        flood.cancel()
    assert 0 < longest <= 4000, longest
    assert others < 2.0, others


async def test_absurd_times_and_malformed_speaker_ids_neither_poison_the_account_nor_end_the_session(make_gateway):
    server = start(make_gateway)
    uid = f"user-{uuid.uuid4().hex[:8]}"
    headers = bearer(server, uid)
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}&custom_stt=enabled",
                                  additional_headers=headers) as ws:
        await until_ready(ws)
        await ws.send(json.dumps({"type": "suggested_transcript", "segments": [
            {"text": "fine words.", "start": 0.5, "end": 1.0},
            {"text": "absurd.", "start": 1e300, "end": 1e300},
            {"text": "huge.", "start": 10 ** 18, "end": 10 ** 18}]}))
        await ws.send(json.dumps({"type": "speaker_assigned", "speaker_id": 0, "person_id": "p1",
                                  "segment_ids": [[1]]}))
        await ws.send(json.dumps({"type": "speaker_assigned", "speaker_id": 10 ** 15, "person_id": "p1"}))
        texts = []
        async with asyncio.timeout(5):
            while not texts:
                reply = await ws.recv()
                if reply.startswith("["):
                    texts = [s["text"] for s in json.loads(reply)]
        assert texts == ["fine words."]
        await ws.close()
        assert ws.close_code == 1000
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as client:
        listed = await client.get("/v1/conversations")
    assert listed.status_code == 200
    assert [s["text"] for s in listed.json()[0]["transcript_segments"]] == ["fine words."]


async def test_an_account_poisoned_before_times_were_bounded_is_read_resumed_and_processed(make_gateway):
    """Rows as the code before the fix stored them (reproduced against it): a first suggestion at
    ``start: 1e300`` anchored the conversation's start there (every ``GET /v1/conversations``
    then answered 500: the start has no date, and processing failed each lease), and later ones
    stored segments at 1e18 and 1e300 s. They are written here through the store, as that code
    wrote them; the account must list, resume and process, with every word kept."""
    from harken.conversations.model import Conversation

    server = start(make_gateway)
    uid = f"user-{uuid.uuid4().hex[:8]}"
    created = time.time() - 60
    poisoned = Conversation(id=uuid.uuid4().hex, uid=uid, status="in_progress", language="en", source="omi",
                            created_at=created, started_at=created + 1e300, finished_at=created + 1, timeout_s=120)
    stored = [{"id": sid, "text": text, "speaker": "SPEAKER_00", "speakerId": 0, "speaker_id": 0, "is_user": False,
               "person_id": None, "start": start, "end": end, "stt_provider": "custom",
               "speech_profile_processed": True, "translations": []}
              for sid, text, start, end in (("s1", "fine words here.", 0.5, 1.0), ("s2", "huge.", 1e18, 1e18),
                                            ("s3", "absurd.", 1e300, 1e300))]

    async def write_as_the_old_code_did() -> None:
        store = server.gateway.store
        await store.create_conversation(poisoned)
        assert await store.save_batch(poisoned, stored, [], now=created + 1, live_until=created + 1, realtime=None)

    await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(write_as_the_old_code_did(), server.loop))
    headers = bearer(server, uid)
    async with httpx.AsyncClient(base_url=server.http, headers=headers) as client:
        listed = await client.get("/v1/conversations")
        one = await client.get(f"/v1/conversations/{poisoned.id}")
    assert listed.status_code == 200 and one.status_code == 200, listed.text
    shown = one.json()
    assert shown["started_at"] == listed.json()[0]["started_at"]
    assert shown["started_at"].startswith(time.strftime("%Y-", time.gmtime(created)))
    segments = shown["transcript_segments"]
    assert [s["text"] for s in segments] == ["fine words here.", "huge.", "absurd."]
    assert [(s["start"], s["end"]) for s in segments] == [(0.5, 1.0), (1.0, 1.0), (1.0, 1.0)]

    # A session of the user resumes the conversation and adds to it at sane times.
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}&custom_stt=enabled",
                                  additional_headers=headers) as ws:
        await until_ready(ws)
        await ws.send(json.dumps({"type": "suggested_transcript",
                                  "segments": [{"text": "and more words now.", "start": 0.2, "end": 0.9}]}))
        sent: list[dict] = []
        async with asyncio.timeout(5):
            while not any(s["text"].endswith("and more words now.") for s in sent):
                reply = await ws.recv()
                if reply.startswith("["):
                    sent = json.loads(reply)
        assert all(0 <= s["start"] <= s["end"] < 10 ** 7 for s in sent)
        await ws.close()
    assert ws.close_code == 1000

    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=30) as client:
        processed = await client.post("/v1/conversations", content="{}")
        listed = await client.get("/v1/conversations")
    assert processed.status_code == 200, processed.text
    memory = processed.json()["conversation"]
    assert memory["id"] == poisoned.id and memory["status"] == "completed"
    words = " ".join(s["text"] for s in memory["transcript_segments"])
    for text in ("fine words here.", "huge.", "absurd.", "and more words now."):
        assert text in words
    assert listed.status_code == 200 and listed.json()[0]["status"] == "completed"


# --- 2: the local token endpoint ----------------------------------------------------------------

async def test_local_token_needs_the_printed_pairing_secret(make_gateway):
    server = start(make_gateway)
    async with httpx.AsyncClient(base_url=server.http) as client:
        bare = await client.post("/v1/local/token", json={"uid": "alice"})
        guessed = await client.post("/v1/local/token", json={"uid": "alice"}, headers={"X-Harken-Pairing": "guess"})
    assert bare.status_code == guessed.status_code == 403
    assert "token" not in bare.json() and "token" not in guessed.json()

    from harken.gateway.web import pairing_secret
    from harken.server import banner

    secret = pairing_secret(server.settings)
    assert f"#pair={secret}" in banner(server.settings)
    async with httpx.AsyncClient(base_url=server.http, headers={"X-Harken-Pairing": secret}) as client:
        paired = await client.post("/v1/local/token", json={"uid": "alice"})
        foreign = await client.post("/v1/local/token", json={"uid": "alice"},
                                    headers={"Origin": "http://evil.example"})
    assert paired.status_code == 200 and paired.json()["uid"] == "alice"
    assert foreign.status_code == 403


# --- 7: auth=none and browsers -------------------------------------------------------------------

async def test_auth_none_refuses_foreign_pages_and_rebinding_hosts(make_gateway):
    server = start(make_gateway, auth="none")
    own = f"127.0.0.1:{server.settings.port}"
    async with httpx.AsyncClient(base_url=server.http) as client:
        foreign_post = await client.post("/v1/users/developer/webhooks/realtime_transcript?uid=alice",
                                         content="http://203.0.113.9/x",
                                         headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        rebound = await client.get("/v1/conversations?uid=alice", headers={"Host": f"evil.example:{server.settings.port}"})
        tool = await client.get("/v1/conversations?uid=alice")
        own_page = await client.get("/v1/conversations?uid=alice", headers={"Origin": f"http://{own}"})
        setting = await client.get("/v1/users/developer/webhooks/realtime_transcript?uid=alice")
    assert foreign_post.status_code == 403 and rebound.status_code == 403
    assert tool.status_code == 200 and own_page.status_code == 200
    assert setting.json()["url"] is None                       # the foreign page changed nothing

    with pytest.raises(websockets.exceptions.InvalidStatus):
        async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}&uid=alice",
                                      origin="http://evil.example"):
            pass
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}&uid=alice") as ws:
        await until_ready(ws)


async def test_metrics_without_a_token_are_not_readable_by_a_rebinding_page(make_gateway):
    """auth=local on loopback, no metrics_token: a page whose name was rebound to 127.0.0.1 sends
    its own name as Host and must not read /metrics; Prometheus scraping 127.0.0.1 still does."""
    server = start(make_gateway)
    port = server.settings.port
    async with httpx.AsyncClient(base_url=server.http) as client:
        scraped = await client.get("/metrics")
        by_name = await client.get("/metrics", headers={"Host": f"localhost:{port}"})
        rebound = await client.get("/metrics", headers={"Host": f"evil.example:{port}"})
        rebound_slash = await client.get("/metrics/", headers={"Host": f"evil.example:{port}"})
        foreign = await client.get("/metrics", headers={"Origin": "http://evil.example"})
    assert scraped.status_code == by_name.status_code == 200
    assert "harken_active_sessions" in scraped.text and "harken_active_sessions" in by_name.text
    for refused in (rebound, rebound_slash, foreign):
        assert refused.status_code == 403 and "harken_" not in refused.text

    # With a token the token is the proof, whatever the Host (as documented).
    guarded = start(make_gateway, metrics_token="scrape-secret")
    async with httpx.AsyncClient(base_url=guarded.http) as client:
        rebound_bare = await client.get("/metrics", headers={"Host": f"evil.example:{guarded.settings.port}"})
        with_token = await client.get("/metrics", headers={"Authorization": "Bearer scrape-secret",
                                                           "Host": f"harken.internal:{guarded.settings.port}"})
    assert rebound_bare.status_code == 401
    assert with_token.status_code == 200 and "harken_active_sessions" in with_token.text


# --- 8: secrets in logs --------------------------------------------------------------------------

async def test_debug_logs_of_uvicorn_and_websockets_never_show_a_bearer_token(make_gateway, capfd):
    server = start(make_gateway, log_level="debug")
    token = token_for(server)
    async with websockets.connect(f"{server.base}/v4/listen?{PCM_QUERY}",
                                  additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await until_ready(ws)
    await asyncio.sleep(0.2)
    err = capfd.readouterr().err
    assert "GET /v4/listen" in err                 # the handshake was logged, at debug
    assert token not in err and token.split(".")[1] not in err


async def test_webhook_urls_in_info_logs_lose_their_query_secrets(tmp_path, capfd):
    import logging

    from harken.logs import configure_logging
    from tests.test_webhooks import delivering_service, receiver

    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("httpx").level)
    configure_logging("info")
    try:
        async with receiver() as hook, delivering_service(tmp_path, secret="") as service:
            await service.set_webhook("alice", "realtime_transcript", hook.url("/hook?token=s3cr3t-query"))
            live = await service.connect("alice", session_id="sess-1")
            await live.save_batch([{"id": "a", "text": "hi", "speaker": "SPEAKER_00", "speaker_id": 0,
                                    "is_user": True, "start": 0.0, "end": 1.0}], [])
            await hook.wait_for(1, timeout=10)
            logging.getLogger("probe").info("to %s", hook.url("/hook?token=s3cr3t-query"))
            await live.close()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("httpx").setLevel(saved[2])
    err = capfd.readouterr().err
    assert "s3cr3t-query" not in err
    assert "/hook?[redacted]" in err


# --- 9: the data folder --------------------------------------------------------------------------

def test_the_data_folder_and_its_database_are_private(make_gateway, tmp_path):
    existing = tmp_path / "g0"
    existing.mkdir(mode=0o755)
    os.chmod(existing, 0o755)
    server = start(make_gateway)
    assert server.settings.data_dir == existing
    assert stat.S_IMODE(existing.stat().st_mode) == 0o700
    databases = list(existing.glob("harken.db*"))
    assert databases
    for path in databases:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


# --- 10: bodies ----------------------------------------------------------------------------------

async def test_bodies_are_bounded_and_deep_json_is_a_400_on_every_route(make_gateway):
    server = start(make_gateway)
    headers = bearer(server)
    nested = "[" * 100_000 + "]" * 100_000
    async with httpx.AsyncClient(base_url=server.http, headers=headers, timeout=30) as client:
        deep_webhook = await client.put("/v1/users/developer/webhooks/realtime_transcript", content=nested,
                                        headers={"Content-Type": "application/json"})
        deep_people = await client.post("/v1/people", content=nested, headers={"Content-Type": "application/json"})
    # 3 MiB, declared: refused from the Content-Length. Without one (chunked): refused once the
    # bytes read pass the limit. (Raw sockets: the answer comes while the client still sends.)
    head = (b"PUT /v1/users/developer/webhooks/realtime_transcript HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Authorization: " + headers["Authorization"].encode() + b"\r\n")
    piece = b"a" * 65536
    declared, _ = raw_exchange(server.settings.port, [head + b"Content-Length: %d\r\n\r\n" % (48 * 65536),
                                                      *[piece] * 48])
    chunk = b"10000\r\n" + piece + b"\r\n"
    streamed, _ = raw_exchange(server.settings.port, [head + b"Transfer-Encoding: chunked\r\n\r\n",
                                                      *[chunk] * 48, b"0\r\n\r\n"])
    assert declared.startswith(b"HTTP/1.1 413"), declared[:60]
    assert streamed.startswith(b"HTTP/1.1 413"), streamed[:60]
    assert deep_webhook.status_code == 400 and deep_people.status_code == 400


# --- 12: webhook targets, DNS pinning, static files ----------------------------------------------

@pytest.mark.parametrize("host", ["[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[::7f00:1]", "[64:ff9b:1::a00:1]"])
async def test_ipv6_forms_of_loopback_and_private_addresses_are_refused_as_webhooks(make_gateway, host):
    server = start(make_gateway)
    async with httpx.AsyncClient(base_url=server.http, headers=bearer(server)) as client:
        answer = await client.put("/v1/users/developer/webhooks/realtime_transcript",
                                  json={"url": f"http://{host}:8080/hook"})
    assert answer.status_code == 422 and "private" in answer.json()["detail"]


@contextlib.asynccontextmanager
async def one_webhook_delivery(tmp_path, host: str, *, allow_private: bool, resolver=None):
    """A receiver on loopback, and a service on SQLite (quick retries) that has one batch of
    alice's to deliver to ``http://<host>:<receiver's port>/hook``; yields (receiver, deliverer)."""
    from harken.conversations import ConversationService, OutboxDeliverer
    from tests.fakes.webhook_receiver import WebhookReceiver
    from tests.test_store import opened_store

    hook = await WebhookReceiver().start()
    try:
        async with opened_store("sqlite", tmp_path) as store:
            deliverer = OutboxDeliverer(store, node_id="t", timeout=5, base_backoff=0.05, max_backoff=0.2,
                                        allow_private=allow_private, poll_interval=0.05, resolver=resolver)
            settings = Settings(data_dir=tmp_path, webhook_allow_private=allow_private)
            service = ConversationService(settings, store, deliverer=deliverer, check_interval=3600)
            await service.start()
            try:
                port = hook.url().split(":")[2].split("/")[0]
                await service.set_webhook("alice", "realtime_transcript", f"http://{host}:{port}/hook")
                live = await service.connect("alice", session_id="s1")
                await live.save_batch([{"id": "a", "text": "hi", "speaker": "SPEAKER_00", "speaker_id": 0,
                                        "is_user": True, "start": 0.0, "end": 1.0}], [])
                yield hook, deliverer
                await live.close()
            finally:
                await service.stop()
    finally:
        await hook.stop()


async def test_delivery_connects_to_the_address_the_resolver_gave_not_a_second_lookup(tmp_path):
    lookups = []

    async def resolver(host, port):
        lookups.append(host)
        return ["127.0.0.1"]

    # .invalid never resolves through the system: only the resolver's answer reaches the receiver.
    async with one_webhook_delivery(tmp_path, "pinned.invalid", allow_private=True, resolver=resolver) as (hook, _):
        (request,) = await hook.wait_for(1, timeout=10)
        port = hook.url().split(":")[2].split("/")[0]
    assert "pinned.invalid" in lookups
    assert request.headers["host"] == f"pinned.invalid:{port}"       # Host (and SNI) keep the name


async def test_a_webhook_name_that_rebinds_to_loopback_after_its_check_gets_no_post(tmp_path, monkeypatch):
    """Finding 4 as an attacker plays it, through the system resolver: their DNS answers a
    public address to the first two lookups (the check when the webhook is set, the check when
    it is sent) and 127.0.0.1 after that. The machine's network is faked as loopback-only (a
    connection to a public address fails at once): nothing may reach the receiver on loopback."""
    import httpcore

    real_getaddrinfo = socket.getaddrinfo
    answers: list[str] = []

    def rebinding_dns(host, port, *args, **kwargs):
        if host in ("rebind.example", b"rebind.example"):
            answers.append("1.2.3.4" if len(answers) < 2 else "127.0.0.1")
            return real_getaddrinfo(answers[-1], port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    real_connect = httpcore.AnyIOBackend.connect_tcp
    dialled: list[str] = []

    async def loopback_only_network(self, host, port, *args, **kwargs):
        dialled.append(host)
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host).is_global:
                raise httpcore.ConnectError(f"{host}: network unreachable (test network)")
        return await real_connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_dns)
    monkeypatch.setattr(httpcore.AnyIOBackend, "connect_tcp", loopback_only_network)
    async with one_webhook_delivery(tmp_path, "rebind.example", allow_private=False) as (hook, deliverer):
        async with asyncio.timeout(15):
            while deliverer.failed_attempts < 2 and hook.attempts == 0:
                await asyncio.sleep(0.05)
    assert answers[:2] == ["1.2.3.4", "1.2.3.4"]
    assert hook.attempts == 0, f"a POST reached loopback (dialled {dialled})"
    assert "1.2.3.4" in dialled


async def test_static_files_say_nosniff(make_gateway):
    server = start(make_gateway)
    async with httpx.AsyncClient(base_url=server.http) as client:
        for path in ("/static/app.js", "/healthz", "/v1/conversations"):
            answer = await client.get(path)
            assert answer.headers.get("x-content-type-options") == "nosniff", path


async def test_delivery_does_not_follow_a_redirect(tmp_path):
    """Kept from before: a receiver answering 302 towards another target gets no second request
    from us (the target would not have been checked); the delivery counts as failed."""
    from tests.fakes.webhook_receiver import WebhookReceiver
    from tests.test_webhooks import delivering_service

    class Redirecting(WebhookReceiver):
        async def handle(self, request):
            self.attempts += 1
            if request.path.startswith("/elsewhere"):
                self.requests.append(request)
                return 200, {}, b"{}"
            return 302, {"Location": self.url("/elsewhere")}, b""

    hook = await Redirecting().start()
    try:
        async with delivering_service(tmp_path, secret="") as service:
            await service.set_webhook("alice", "realtime_transcript", hook.url())
            live = await service.connect("alice", session_id="s1")
            await live.save_batch([{"id": "a", "text": "hi", "speaker": "SPEAKER_00", "speaker_id": 0,
                                    "is_user": True, "start": 0.0, "end": 1.0}], [])
            async with asyncio.timeout(10):
                while hook.attempts < 2:                 # the first attempt and a retry
                    await asyncio.sleep(0.05)
            await live.close()
            assert service.deliverer.delivered == 0 and service.deliverer.failed_attempts >= 2
    finally:
        await hook.stop()
    assert hook.requests == []
