"""Conversations and webhooks through the real path: WebSocket sessions against a running gateway,
its SQLite store, the REST API, and webhook receivers on loopback."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

import httpx
import numpy as np
import pytest
import websockets

from harken.client import listen_url, stream_messages
from harken.gateway.auth import mint_local_token
from harken.receiver import build_receiver_app

from .conftest import load_audio
from .fakes.webhook_receiver import ServedApp

pytestmark = pytest.mark.timeout(180)
SETTLE = 4.0


def pcm_messages(pcm: np.ndarray, ms: int = 100) -> list[bytes]:
    step = 16 * ms
    return [pcm[i:i + step].tobytes() for i in range(0, len(pcm), step)]


def speech(name: str, tail: float = 1.0) -> np.ndarray:
    return np.concatenate([load_audio(name), np.zeros(int(16000 * tail), np.int16)])


async def rest(server, token: str | None, method: str, path: str, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
        return await client.request(method, path, headers=headers, **kwargs)


async def test_reconnect_resumes_the_conversation_and_times_continue(gateway):
    uid = f"resumer-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(gateway.settings, uid, 600)
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000, conversation_timeout=120)
    first = await stream_messages(url, pcm_messages(speech("ss_0930.wav")), 0.1, token=token,
                                  realtime=False, settle_seconds=SETTLE)
    second = await stream_messages(url, pcm_messages(speech("goforward.wav")), 0.1, token=token,
                                   realtime=False, settle_seconds=SETTLE)
    assert first.segments and second.segments
    # No finished conversation yet: no last_memory (the app's parser needs a string id).
    assert not [e for e in first.events if e.get("type") == "last_memory"]

    listing = (await rest(gateway, token, "GET", "/v1/conversations")).json()
    conversations = listing["conversations"] if isinstance(listing, dict) else listing
    assert len(conversations) == 1, conversations           # one conversation spans both connections
    stored = (await rest(gateway, token, "GET", f"/v1/conversations/{conversations[0]['id']}")).json()
    texts = " ".join(s["text"] for s in stored["transcript_segments"]).lower()
    assert "amiable" in texts and "forward" in texts
    # Everything the client was sent is in the store (the latest version of each segment).
    stored_ids = {s["id"]: s for s in stored["transcript_segments"]}
    for segment in [*first.segments.values(), *second.segments.values()]:
        assert segment["id"] in stored_ids
    # The second connection's words come after the first's: times continue across reconnects.
    first_end = max(s["end"] for s in first.segments.values())
    assert min(s["end"] for s in second.segments.values()) > first_end

    # Someone else cannot read it.
    other = mint_local_token(gateway.settings, "someone-else", 600)
    assert (await rest(gateway, other, "GET", f"/v1/conversations/{conversations[0]['id']}")).status_code == 404
    assert (await rest(gateway, None, "GET", "/v1/conversations")).status_code == 401


async def test_times_continue_after_a_connection_that_sent_faster_than_real_time(gateway):
    # A file streamed at full speed leaves segment times past the wall clock; the next connection
    # of the conversation must not place its words back inside them (they came out with zero
    # length, clamped against the earlier segments).
    uid = f"fast-resumer-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(gateway.settings, uid, 600)
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000, conversation_timeout=120)
    long_file = np.concatenate([speech(name, tail=1.5) for name in ("ss_0870.wav", "ss_0880.wav", "ss_0890.wav",
                                                                      "ss_0920.wav", "ss_0930.wav")])
    first = await stream_messages(url, pcm_messages(long_file), 0.1, token=token, realtime=False,
                                  settle_seconds=SETTLE)
    first_end = max(s["end"] for s in first.segments.values())
    second = await stream_messages(url, pcm_messages(speech("goforward.wav")), 0.1, token=token,
                                   realtime=False, settle_seconds=SETTLE)
    later = [s for s in second.segments.values() if "forward" in s["text"].lower()]
    assert later, second.ordered()
    # "Go forward ten meters" lasts about 2 s, and the second connection came after the first.
    assert later[0]["end"] - first_end >= 1.0, (first_end, [(s["start"], s["end"], s["text"]) for s in later])


async def test_silence_past_the_timeout_processes_the_conversation_live(make_gateway):
    server = make_gateway(conversation_check_interval=0.3)
    uid = f"quiet-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(server.settings, uid, 600)
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, conversation_timeout=2)
    received = []
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        for message in pcm_messages(speech("espeak_01.wav")):
            await ws.send(message)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40
        while loop.time() < deadline and not any(e.get("type") == "memory_created" for e in received):
            await ws.send(b"\x8a\x00")                       # keepalive: the client stays, silent
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            if raw != "ping":
                payload = json.loads(raw)
                received.append(payload if isinstance(payload, dict) else {"type": "segments", "segments": payload})
    kinds = [e["type"] for e in received]
    assert "memory_processing_started" in kinds and "memory_created" in kinds
    assert kinds.index("memory_processing_started") < kinds.index("memory_created")
    memory = next(e for e in received if e["type"] == "memory_created")["memory"]
    assert memory["status"] == "completed" and not memory["discarded"] and memory["structured"]["title"]
    # The app is told which conversation the socket writes now (conversation_session).
    sessions = [e["conversation_id"] for e in received if e["type"] == "conversation_session"]
    assert sessions[0] == memory["id"] and len(sessions) == 2 and sessions[1] != memory["id"]
    assert any("meeting" in a["description"].lower() for a in memory["structured"]["action_items"]), memory["structured"]
    # The next connection is told about it, and starts a new conversation.
    again = await stream_messages(url, [b"\x00" * 3200], 0.1, token=token, realtime=False, settle_seconds=0.3)
    last = next(e for e in again.events if e.get("type") == "last_memory")
    assert last["memory_id"] == memory["id"]


async def test_audio_bytes_and_realtime_webhooks_deliver_what_was_streamed(make_gateway, tmp_path):
    server = make_gateway(webhook_allow_private=True)
    uid = f"hooked-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(server.settings, uid, 600)
    transcripts: list[tuple[dict, list]] = []

    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def realtime(request):
        transcripts.append((dict(request.query_params), json.loads(await request.body())))
        return Response(status_code=200)

    audio_dir = tmp_path / "audio"
    async with ServedApp(build_receiver_app(audio_dir)) as receiver, \
            ServedApp(Starlette(routes=[Route("/rt", realtime, methods=["POST"])])) as rt:
        answer = await rest(server, token, "PUT", "/v1/users/developer/webhooks/audio_bytes",
                            json={"url": f"{receiver.base_url}/audio", "interval_seconds": 1})
        assert answer.status_code == 200, answer.text
        answer = await rest(server, token, "PUT", "/v1/users/developer/webhooks/realtime_transcript",
                            json={"url": f"{rt.base_url}/rt"})
        assert answer.status_code == 200, answer.text

        pcm = speech("goforward.wav", tail=1.3)               # not a whole number of seconds
        url = listen_url(server.base, codec="pcm16", sample_rate=16000)
        result = await stream_messages(url, pcm_messages(pcm, ms=70), 0.07, token=token, realtime=False,
                                       settle_seconds=SETTLE)
        assert result.segments
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        files = []
        while loop.time() < deadline:
            files = sorted(audio_dir.rglob("*.wav"))
            if files and files[0].stat().st_size >= 44 + pcm.nbytes and transcripts:
                break
            await asyncio.sleep(0.2)
    assert len(files) == 1 and files[0].parent.name == uid
    import wave

    with wave.open(str(files[0])) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (16000, 1, 2)
        written = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert np.array_equal(written, pcm)                        # bit for bit, no gap, no overlap

    query, segments = transcripts[0]
    assert query["uid"] == uid and query["session_id"] and query["session_id"] != uid
    assert segments and {"text", "speaker", "speakerId", "is_user", "start", "end", "id"} <= set(segments[0])


async def test_custom_stt_segments_reach_the_client_the_store_and_the_webhook(make_gateway):
    """custom_stt=enabled: the phone transcribes; its suggested segments take the same path as a
    provider's words (client, stored conversation, realtime webhook) with no provider opened."""
    server = make_gateway(webhook_allow_private=True)
    uid = f"custom-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(server.settings, uid, 600)
    delivered: list[list] = []

    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def realtime(request):
        delivered.append(json.loads(await request.body()))
        return Response(status_code=200)

    suggestions = [
        {"text": "Lunch is at noon.", "start": 0.4, "end": 1.6, "speaker": "SPEAKER_00"},
        {"text": "I will book the table.", "start": 2.0, "end": 3.3, "speaker": "SPEAKER_01", "is_user": True},
    ]
    async with ServedApp(Starlette(routes=[Route("/rt", realtime, methods=["POST"])])) as rt:
        answer = await rest(server, token, "PUT", "/v1/users/developer/webhooks/realtime_transcript",
                            json={"url": f"{rt.base_url}/rt"})
        assert answer.status_code == 200, answer.text
        url = listen_url(server.base, codec="pcm16", sample_rate=16000, custom_stt="enabled")
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            for message in pcm_messages(np.zeros(16000 * 2, np.int16)):   # the phone's audio goes on too
                await ws.send(message)
            await ws.send(json.dumps({"type": "suggested_transcript", "stt_provider": "on-device",
                                      "segments": suggestions}))
            received: dict[str, dict] = {}
            statuses = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 15
            while len(received) < 2 and loop.time() < deadline:
                raw = await asyncio.wait_for(ws.recv(), 15)
                if raw == "ping":
                    continue
                payload = json.loads(raw)
                if isinstance(payload, list):
                    received.update({s["id"]: s for s in payload})
                elif payload.get("type") == "service_status":
                    statuses.append(payload["status"])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline and sum(len(batch) for batch in delivered) < 2:
            await asyncio.sleep(0.2)

    assert "stt_initiating" not in statuses                       # no provider was opened
    texts = [s["text"] for s in sorted(received.values(), key=lambda s: s["start"])]
    assert texts == ["Lunch is at noon.", "I will book the table."]
    assert all(s["stt_provider"] == "on-device" for s in received.values())
    owner = next(s for s in received.values() if s["text"].startswith("I will"))
    assert owner["is_user"] is True

    listing = (await rest(server, token, "GET", "/v1/conversations")).json()
    assert len(listing) == 1
    stored = (await rest(server, token, "GET", f"/v1/conversations/{listing[0]['id']}")).json()
    assert {s["id"]: s["text"] for s in stored["transcript_segments"]} == {i: s["text"] for i, s in received.items()}

    hooked = {s["id"]: s["text"] for batch in delivered for s in batch}
    assert hooked == {i: s["text"] for i, s in received.items()}


async def test_a_client_closing_while_its_words_are_being_stored_loses_none_of_them(make_gateway):
    """The session ends (task group cancelled) while a flush waits for the store: the batch must
    still be stored. It once was withdrawn with the cancelled flush, and the teardown's last flush
    found the builder already emptied, so the conversation was stored without those words."""
    server = make_gateway()
    committer = server.gateway.conversations._batches
    original_save = committer.save
    storing = threading.Event()

    async def slow_save(request):
        if request.changed and not storing.is_set():
            storing.set()
            await asyncio.sleep(1.5)           # the client closes meanwhile
        return await original_save(request)

    server.call(lambda: setattr(committer, "save", slow_save))
    uid = f"impatient-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(server.settings, uid, 600)
    url = listen_url(server.base, codec="pcm16", sample_rate=16000)
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        for message in pcm_messages(speech("goforward.wav")):
            await ws.send(message)
        # Bounded: the engine's words reach a flush within seconds.
        assert await asyncio.to_thread(storing.wait, 60), "no batch with words was stored"
    # The client has closed while its first batch with words was waiting for the store.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while server.call(lambda: len(server.gateway.sessions)) and loop.time() < deadline:
        await asyncio.sleep(0.1)
    listing = (await rest(server, token, "GET", "/v1/conversations")).json()
    conversations = listing["conversations"] if isinstance(listing, dict) else listing
    assert len(conversations) == 1
    stored = (await rest(server, token, "GET", f"/v1/conversations/{conversations[0]['id']}")).json()
    text = " ".join(s["text"] for s in stored["transcript_segments"]).lower()
    assert "forward" in text and "meters" in text, text


async def test_words_waiting_for_a_flush_when_the_conversation_times_out_land_in_the_next_one(make_gateway):
    """The conversation times out (``conversation_timeout`` after its last stored words) while
    words that came after the last flush wait in the session's segment builder: the first words
    of the next talk. The rollover replaced the builder and those words were in no conversation,
    never sent; they now start the next conversation (times from its start, as Omi's do).
    custom_stt places the words exactly: the phone sends them, and a 4 s flush interval keeps
    them waiting past the 2 s timeout."""
    server = make_gateway(conversation_check_interval=0.2, flush_interval=4.0)
    uid = f"seam-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(server.settings, uid, 600)
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, custom_stt="enabled", conversation_timeout=2)
    received: dict[str, dict] = {}
    kinds: list[str] = []

    async def until(done, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not done() and loop.time() < deadline:
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            if raw == "ping":
                continue
            payload = json.loads(raw)
            if isinstance(payload, list):
                received.update({s["id"]: s for s in payload})
            else:
                kinds.append(payload.get("type"))
        assert done(), (received, kinds)

    def texts() -> set[str]:
        return {s["text"] for s in received.values()}

    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(json.dumps({"type": "suggested_transcript", "stt_provider": "on-device", "segments": [
            {"text": "Lunch is at noon.", "start": 0.4, "end": 1.6, "speaker": "SPEAKER_00"}]}))
        await until(lambda: "Lunch is at noon." in texts(), 15)
        # Just after that flush: the next words wait ~4 s for theirs, the timeout comes at ~2 s.
        await ws.send(json.dumps({"type": "suggested_transcript", "stt_provider": "on-device", "segments": [
            {"text": "The table is booked.", "start": 3.0, "end": 4.2, "speaker": "SPEAKER_00"}]}))
        await until(lambda: "The table is booked." in texts() and "memory_created" in kinds, 20)

    conversations = (await rest(server, token, "GET", "/v1/conversations")).json()
    by_status = {c["status"]: c for c in conversations}
    assert sorted(by_status) == ["completed", "in_progress"], conversations
    assert [s["text"] for s in by_status["completed"]["transcript_segments"]] == ["Lunch is at noon."]
    (carried,) = by_status["in_progress"]["transcript_segments"]
    assert carried["text"] == "The table is booked." and carried["id"] in received
    assert carried["start"] == 0.0 and abs(carried["end"] - 1.2) < 1e-6
