"""Integration webhooks end to end: settings, the outbox, delivery to a real HTTP receiver.

The receiver (tests/fakes/webhook_receiver.py) is a real server on 127.0.0.1 that can be down,
hang or fail. Delivery runs with short backoffs so a test takes seconds; the logic is the
production one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np
import orjson
import pytest

from harken.config import Settings
from harken.conversations import AudioChunker, ConversationService, OutboxDeliverer, verify_signature
from harken.conversations.webhooks import (AUDIO_OFFSET_HEADER, SESSION_HEADER, WebhookSettingError, check_url,
                                           parse_setting)
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.test_store import opened_store, segment

SECRET = "webhook-test-secret"


@contextlib.asynccontextmanager
async def delivering_service(tmp_path, *, secret: str = SECRET, timeout: float = 5.0, horizon: float = 3600.0,
                             store=None):
    """A started service on SQLite whose deliverer retries quickly."""
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = await stack.enter_async_context(opened_store("sqlite", tmp_path))
        settings = Settings(data_dir=tmp_path, webhook_secret=secret, webhook_allow_private=True)
        deliverer = OutboxDeliverer(store, node_id="test", secret=secret, timeout=timeout, workers=8,
                                    retry_horizon=horizon, base_backoff=0.05, max_backoff=0.2,
                                    allow_private=True, poll_interval=0.05)
        service = ConversationService(settings, store, deliverer=deliverer, check_interval=3600)
        await service.start()
        stack.push_async_callback(service.stop)
        yield service


@contextlib.asynccontextmanager
async def receiver():
    server = await WebhookReceiver().start()
    try:
        yield server
    finally:
        await server.stop()


def _line(i: int, who: str) -> dict:
    return segment(f"{who}{i}", f"{who} says line number {i}", float(i), i + 0.9)


# --- settings ------------------------------------------------------------------------------------

def test_webhook_settings_accept_omi_and_json_forms():
    assert parse_setting("audio_bytes", "https://x.example/a,7").interval_seconds == 7
    assert parse_setting("audio_bytes", {"url": "https://x.example/a", "interval_seconds": 3}).interval_seconds == 3
    assert parse_setting("audio_bytes", {"url": "https://x.example/a,9"}).url == "https://x.example/a"
    assert parse_setting("audio_bytes", "https://x.example/a").interval_seconds == 5
    assert parse_setting("memory_created", "https://x.example/m?k=1").url == "https://x.example/m?k=1"
    for kind, bad in [("audio_bytes", "https://x.example/a,0"), ("audio_bytes", {"url": "https://x/a",
                                                                                "interval_seconds": "5"}),
                      ("memory_created", {"url": "https://x/a", "interval_seconds": 5}),
                      ("memory_created", "ftp://x.example/m"), ("memory_created", "https:///nohost"),
                      ("memory_created", 42), ("nonsense", "https://x.example/")]:
        with pytest.raises(WebhookSettingError):
            parse_setting(kind, bad)


@pytest.mark.timeout(10)
async def test_private_loopback_and_link_local_targets_are_refused_unless_allowed():
    for url in ["http://127.0.0.1:8080/h", "http://10.1.2.3/h", "http://192.168.0.10/h", "http://172.16.5.5/h",
                "http://169.254.169.254/latest/meta-data", "http://[::1]/h", "http://[fe80::1]/h",
                "http://[::ffff:127.0.0.1]/h", "http://100.64.0.1/h", "http://0.0.0.0/h", "http://localhost:9/h"]:
        with pytest.raises(WebhookSettingError):
            await check_url(url, allow_private=False)
        await check_url(url, allow_private=True)
    await check_url("https://93.184.216.34/hook", allow_private=False)

    async def resolves_to(address):
        async def resolver(host, port):
            return [address]
        return resolver
    # A public-looking name that resolves inside the network is refused; DNS failure too.
    with pytest.raises(WebhookSettingError, match="private"):
        await check_url("https://hooks.example.com/x", allow_private=False, resolver=await resolves_to("10.0.0.7"))
    await check_url("https://hooks.example.com/x", allow_private=False, resolver=await resolves_to("8.8.8.8"))

    async def fails(host, port):
        raise OSError("no such host")
    with pytest.raises(WebhookSettingError, match="cannot be resolved"):
        await check_url("https://nowhere.invalid/x", allow_private=False, resolver=fails)


# --- audio chunks ----------------------------------------------------------------------------------

def test_audio_chunks_are_exactly_n_seconds_and_concatenate_to_the_input():
    rng = np.random.default_rng(7)
    pcm = rng.integers(-32768, 32767, size=16000 * 7 + 1234, dtype=np.int16)
    chunker = AudioChunker(2)
    chunks, position = [], 0
    for size in rng.integers(1, 3000, size=10_000):
        if position >= len(pcm):
            break
        chunks += chunker.add(pcm[position:position + size])
        position += size
    remainder = chunker.flush()
    assert all(len(c) == 2 * 16000 * 2 for _, c in chunks) and len(chunks) == 3
    assert remainder is not None and len(remainder[1]) == (16000 * 7 + 1234 - 3 * 32000) * 2
    everything = chunks + [remainder]
    assert [o for o, _ in everything] == [sum(len(c) for _, c in everything[:i]) for i in range(len(everything))]
    assert b"".join(c for _, c in everything) == pcm.astype("<i2").tobytes()
    assert chunker.flush() is None


# --- delivery --------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
async def test_a_receiver_down_for_a_while_gets_everything_in_order_once_it_is_back(tmp_path):
    async with receiver() as hook, delivering_service(tmp_path) as service:
        url = hook.url("/realtime?token=abc")
        await hook.stop()                                       # down: connections refused
        for uid in ("alice", "bob"):
            await service.set_webhook(uid, "realtime_transcript", url)
        alice = await service.connect("alice", session_id="sess-a")
        bob = await service.connect("bob", session_id="sess-b")
        for i in range(10):
            await alice.save_batch([_line(i, "alice")])
            await bob.save_batch([_line(i, "bob")])
        async with asyncio.timeout(10):
            while service.deliverer.failed_attempts < 4:       # it keeps trying meanwhile
                await asyncio.sleep(0.02)

        await hook.start()                                      # back, same port
        received = await hook.wait_for(20, timeout=15)
        await asyncio.sleep(0.3)                                # room for any (wrong) extra sends

        by_session: dict[str, list[str]] = {}
        ids_of_body: dict[bytes, set[str]] = {}
        for request in received:
            assert request.path == "/realtime" and request.query["token"] == "abc"
            assert request.query["uid"] == {"sess-a": "alice", "sess-b": "bob"}[request.query["session_id"]]
            assert verify_signature(SECRET, request.body, request.headers["x-harken-signature"])
            ids_of_body.setdefault(request.body, set()).add(request.headers["x-harken-delivery"])
            batch = orjson.loads(request.body)
            by_session.setdefault(request.query["session_id"], []).extend(s["id"] for s in batch)
        assert by_session == {"sess-a": [f"alice{i}" for i in range(10)], "sess-b": [f"bob{i}" for i in range(10)]}
        assert all(len(ids) == 1 for ids in ids_of_body.values())           # a resend reuses its id
        assert len({i for ids in ids_of_body.values() for i in ids}) == 20
        await alice.close()
        await bob.close()


@pytest.mark.timeout(30)
async def test_realtime_bodies_have_the_protocol_shape(tmp_path):
    async with receiver() as hook, delivering_service(tmp_path, secret="") as service:
        await service.set_webhook("alice", "realtime_transcript", hook.url())
        live = await service.connect("alice", session_id="sess-1")
        await live.save_batch([_line(0, "alice"), _line(1, "alice")], ["gone"])
        (request,) = await hook.wait_for(1, timeout=10)
        body = orjson.loads(request.body)
        assert [set(s) for s in body] == [{"text", "speaker", "speakerId", "is_user", "start", "end", "id"}] * 2
        assert body[0] == {"id": "alice0", "text": "alice says line number 0", "speaker": "SPEAKER_00",
                           "speakerId": 0, "is_user": True, "start": 0.0, "end": 0.9}
        assert request.method == "POST" and request.headers["content-type"] == "application/json"
        assert "x-harken-signature" not in request.headers and request.headers["x-harken-delivery"]
        await live.close()


@pytest.mark.timeout(30)
async def test_pending_deliveries_survive_a_restart(tmp_path):
    async with opened_store("sqlite", tmp_path) as store:
        async with receiver() as hook:
            url = hook.url()
            await hook.stop()
            async with delivering_service(tmp_path, store=store) as service:
                await service.set_webhook("alice", "realtime_transcript", url)
                live = await service.connect("alice")
                for i in range(3):
                    await live.save_batch([_line(i, "alice")])
                await live.close()
            assert (await store.outbox_counts()).get("pending") == 3        # stopped with nothing sent
            await hook.start()
            async with delivering_service(tmp_path, store=store):           # the next run sends them
                received = await hook.wait_for(3, timeout=10)
            assert [orjson.loads(r.body)[0]["id"] for r in received] == ["alice0", "alice1", "alice2"]


@pytest.mark.timeout(30)
async def test_a_hanging_receiver_does_not_slow_save_batch(tmp_path):
    async def timed_batches(live, start: int, n: int) -> list[float]:
        latencies = []
        for i in range(start, start + n):
            t0 = time.perf_counter()
            await live.save_batch([_line(i, "alice")])
            latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(0.005)
        return latencies

    async with receiver() as hook, delivering_service(tmp_path, timeout=60) as service:
        await service.set_webhook("alice", "realtime_transcript", hook.url())
        live = await service.connect("alice")
        healthy = await timed_batches(live, 0, 30)
        await hook.wait_for(30, timeout=10)

        hook.hang_seconds = 30                                # every request now hangs 30 s
        hanging = await timed_batches(live, 30, 30)
        assert hook.attempts > len(hook.requests) == 30       # a delivery is stuck in the receiver
        slow = sorted(hanging)[int(0.9 * len(hanging))]
        assert slow < 0.05, f"p90 save_batch {slow * 1e3:.1f} ms while the receiver hangs " \
                            f"(healthy p90 {sorted(healthy)[27] * 1e3:.1f} ms)"
        await live.close()


@pytest.mark.timeout(30)
async def test_a_delivery_failing_past_the_retry_horizon_becomes_a_logged_dead_letter(tmp_path, caplog):
    async with receiver() as hook, delivering_service(tmp_path, horizon=0.5) as service:
        hook.status = 500
        await service.set_webhook("alice", "realtime_transcript", hook.url())
        live = await service.connect("alice")
        with caplog.at_level(logging.ERROR, logger="harken.conversations.outbox"):
            await live.save_batch([_line(0, "alice")])
            async with asyncio.timeout(10):
                while await service.store.outbox_counts() != {"dead": 1}:
                    await asyncio.sleep(0.02)
        assert hook.attempts >= 3 and service.deliverer.dead == 1
        assert any("dead letter" in r.message and "HTTP 500" in r.message for r in caplog.records)
        assert not any("token" in r.message for r in caplog.records)
        await live.close()


@pytest.mark.timeout(30)
async def test_memory_created_posts_the_conversation_object(tmp_path):
    async with receiver() as hook, delivering_service(tmp_path) as service:
        await service.set_webhook("alice", "memory_created", hook.url("/memories"))
        live = await service.connect("alice", conversation_timeout=120)
        live.time_offset(time.time())
        await live.save_batch([segment("s1", "please schedule a meeting with the design team", 0, 4)])
        await live.close()
        memory = await service.process(live.conversation_id)
        (request,) = await hook.wait_for(1, timeout=10)
        assert request.path == "/memories" and request.query == {"uid": "alice"}
        body = orjson.loads(request.body)
        assert body == memory
        assert set(body) == {"id", "created_at", "started_at", "finished_at", "language", "source", "status",
                             "transcript_segments", "structured", "apps_response", "discarded", "photos"}
        assert body["photos"] == []
        assert body["status"] == "completed"
        assert set(body["transcript_segments"][0]) == {"id", "text", "speaker", "speakerId", "speaker_id",
                                                       "is_user", "person_id", "start", "end"}
        assert body["structured"]["action_items"][0]["description"].startswith("Schedule a meeting")


@pytest.mark.timeout(30)
async def test_audio_bytes_arrive_as_exact_chunks_of_the_audio_streamed(tmp_path):
    rng = np.random.default_rng(11)
    pcm = rng.integers(-32768, 32767, size=int(16000 * 2.5), dtype=np.int16)
    async with receiver() as hook, delivering_service(tmp_path) as service:
        await service.set_webhook("alice", "audio_bytes", hook.url("/audio") + ",1")
        live = await service.connect("alice", session_id="sess-audio")
        for start in range(0, len(pcm), 320):                       # 20 ms frames
            live.add_audio(pcm[start:start + 320])
        await live.close()
        received = await hook.wait_for(3, timeout=10)
        assert [len(r.body) for r in received] == [32000, 32000, 16000]
        assert b"".join(r.body for r in received) == pcm.astype("<i2").tobytes()
        assert [int(r.headers[AUDIO_OFFSET_HEADER.lower()]) for r in received] == [0, 32000, 64000]
        for r in received:
            assert r.query == {"sample_rate": "16000", "uid": "alice"}
            assert r.headers["content-type"] == "application/octet-stream"
            assert r.headers[SESSION_HEADER.lower()] == "sess-audio"
            assert verify_signature(SECRET, r.body, r.headers["x-harken-signature"])

