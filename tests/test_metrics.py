"""Prometheus /metrics and structured logs, through the real path: WebSocket sessions against a
running gateway, then a scrape of its /metrics page over HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import uuid

import httpx
import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from harken.client import listen_url, stream_messages
from harken.config import Settings
from harken.gateway.app import create_app
from harken.gateway.auth import mint_local_token
from harken.logs import REDACTED, make_handler

from .conftest import load_audio
from .fakes.soniox import FakeSoniox
from .fakes.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.timeout(180)
SETTLE = 3.0
BAD_OPUS_FRAME = b"\xff\xff\xff\xff" + bytes(40)        # an invalid TOC: no decoder accepts it


def pcm_messages(pcm: np.ndarray, ms: int = 100) -> list[bytes]:
    step = 16 * ms
    return [pcm[i:i + step].tobytes() for i in range(0, len(pcm), step)]


def speech(name: str = "goforward.wav", tail: float = 1.0) -> np.ndarray:
    return np.concatenate([load_audio(name), np.zeros(int(16000 * tail), np.int16)])


def token_for(server, uid: str | None = None) -> str:
    return mint_local_token(server.settings, uid or f"metrics-{uuid.uuid4().hex[:8]}", 600)


async def scrape(server, token: str | None = None) -> dict[tuple[str, frozenset], float]:
    """The /metrics page as {(sample name, labels): value}."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"{server.http}/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_until(condition, timeout: float = 15.0, step: float = 0.2) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await condition():
            return True
        await asyncio.sleep(step)
    return await condition()


# --- counters move by what the sessions did ------------------------------------------------------

async def test_sessions_move_the_counters_by_what_they_did(gateway):
    before = await scrape(gateway)

    pcm = speech()
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000)
    result = await stream_messages(url, pcm_messages(pcm), 0.1, token=token_for(gateway), realtime=False,
                                   settle_seconds=SETTLE)
    assert result.close_code == 1000 and result.segments

    bad_frames = 5
    url = listen_url(gateway.base, codec="opus", sample_rate=16000)
    garbage = await stream_messages(url, [BAD_OPUS_FRAME] * bad_frames, 0.02, token=token_for(gateway),
                                    realtime=False, settle_seconds=0.3)
    assert garbage.close_code == 1000

    refused = listen_url(gateway.base, codec="pcm16", sample_rate=16000)
    async with websockets.connect(refused, additional_headers={"Authorization": "Bearer not-a-token"}) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await ws.recv()
    refused_code = ws.close_code
    assert refused_code in (1008, 4001, 4003), refused_code

    async def sessions_gone() -> bool:
        return value(await scrape(gateway), "harken_active_sessions") == 0

    assert await wait_until(sessions_gone)
    after = await scrape(gateway)

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("harken_audio_seconds_total", codec="pcm16") == pytest.approx(len(pcm) / 16000, abs=0.01)
    assert delta("harken_decode_errors_total", codec="opus") == bad_frames
    assert delta("harken_audio_seconds_total", codec="opus") == 0
    assert delta("harken_connections_total", code="1000") == 2
    assert delta("harken_connections_total", code=str(refused_code)) == 1

    segments = delta("harken_segment_latency_seconds_count")
    assert segments >= 1
    mean = delta("harken_segment_latency_seconds_sum") / segments
    assert 0.0 < mean < 30.0          # from the audio's arrival to the batch: positive, not absurd
    words = delta("harken_stt_provider_latency_seconds_count", provider="local")
    assert words >= 3                  # "go forward ten meters"
    assert 0.0 < delta("harken_stt_provider_latency_seconds_sum", provider="local") / words < 30.0

    assert value(after, "harken_event_loop_lag_seconds_count") >= 1
    assert value(after, "harken_stt_failures_total", provider="local", reason="initialization_failed") == 0
    # labels never carry user data
    assert not any(k for key in after for k, v in key[1] if k in ("uid", "session_id"))


async def test_metrics_token_guards_the_page_and_metrics_can_be_off(make_gateway, tmp_path):
    server = make_gateway(metrics_token="scrape-secret")
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(f"{server.http}/metrics")).status_code == 401
        wrong = await client.get(f"{server.http}/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    samples = await scrape(server, token="scrape-secret")
    assert ("harken_active_sessions", frozenset()) in samples
    assert value(samples, "harken_webhook_backlog") == 0

    off = create_app(Settings(data_dir=tmp_path, metrics=False))
    assert "/metrics" not in {getattr(route, "path", None) for route in off.routes}
    on = create_app(Settings(data_dir=tmp_path))
    assert "/metrics" in {getattr(route, "path", None) for route in on.routes}


def test_each_gateway_has_its_own_registry(gateway, make_gateway):
    other = make_gateway()
    assert gateway.gateway.metrics.registry is not other.gateway.metrics.registry
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("harken_active_sessions") is None     # the global one stays clean


# --- provider failures and switches --------------------------------------------------------------

async def test_a_provider_failing_mid_stream_counts_a_failure_and_a_switch(make_gateway):
    from .fakes.deepgram import FakeDeepgram
    from .fakes.script import Plan, make_script, timecode

    key = "test-key"
    script = make_script(seed=3, duration=10.0)
    async with FakeDeepgram(script, key=key) as deepgram, FakeSoniox(script, key=key) as soniox:
        deepgram.plans.append(Plan(fail_at=5.0, kind="close"))
        server = make_gateway(deepgram_api_key=key, deepgram_url=deepgram.url, soniox_api_key=key,
                              soniox_url=soniox.url, stt_chain="dg-nova-3,soniox,local", stt_retry_base=0.05)
        url = listen_url(server.base, codec="pcm16", sample_rate=16000)
        result = await stream_messages(url, pcm_messages(timecode(0, 10 * 16000)), 0.1, token=token_for(server),
                                       realtime=False, settle_seconds=2.0)
        samples = await scrape(server)
    switched = [e for e in result.events if e.get("status") == "stt_switched"]
    assert len(switched) == 1
    reason = switched[0]["reason"]
    assert value(samples, "harken_stt_failures_total", provider="deepgram", reason=reason) == 1
    assert sum(v for (name, _), v in samples.items() if name == "harken_stt_failures_total") == 1
    assert value(samples, "harken_stt_switches_total", from_provider="deepgram", to_provider="soniox",
                 reason=reason) == 1
    assert value(samples, "harken_stt_provider_latency_seconds_count", provider="deepgram") >= 1
    assert value(samples, "harken_stt_provider_latency_seconds_count", provider="soniox") >= 1


# --- webhooks ------------------------------------------------------------------------------------

async def test_a_sqlite_write_that_waited_for_another_process_is_counted(make_gateway):
    """Workers sharing one SQLite file contend for its write lock. A write that meets it waits in
    a thread, never on the loop, and is counted, so an operator can see the contention."""
    server = make_gateway(webhook_allow_private=True)
    assert value(await scrape(server), "harken_store_lock_waits_total") == 0
    other_process = sqlite3.connect(server.settings.data_dir / "harken.db", isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")
    async with httpx.AsyncClient(base_url=server.http, timeout=30) as client:
        put = asyncio.create_task(client.put("/v1/users/developer/webhooks/realtime_transcript",
                                             headers={"Authorization": f"Bearer {token_for(server)}"},
                                             json={"url": "http://127.0.0.1:9/hook"}))
        await asyncio.sleep(0.3)
        assert not put.done()                    # waiting for the lock; /metrics still answers:
        assert value(await scrape(server), "harken_store_lock_waits_total") >= 1
        other_process.execute("COMMIT")
        other_process.close()
        answer = await put
    assert answer.status_code == 200, answer.text


async def test_webhook_backlog_and_failures_show_then_drain(make_gateway):
    server = make_gateway(webhook_allow_private=True)
    token = token_for(server)
    receiver = await WebhookReceiver().start()
    try:
        receiver.status = 503
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
            answer = await client.put("/v1/users/developer/webhooks/realtime_transcript",
                                      headers={"Authorization": f"Bearer {token}"}, json={"url": receiver.url()})
            assert answer.status_code == 200, answer.text

        url = listen_url(server.base, codec="pcm16", sample_rate=16000)
        result = await stream_messages(url, pcm_messages(speech()), 0.1, token=token, realtime=False,
                                       settle_seconds=SETTLE)
        assert result.segments

        async def failing() -> bool:
            samples = await scrape(server)
            return (value(samples, "harken_webhook_deliveries_total", result="failed") >= 1
                    and value(samples, "harken_webhook_backlog") >= 1)

        assert await wait_until(failing), await scrape(server)
        assert value(await scrape(server), "harken_webhook_deliveries_total", result="delivered") == 0

        receiver.status = 200

        async def drained() -> bool:
            samples = await scrape(server)
            return value(samples, "harken_webhook_backlog") == 0

        assert await wait_until(drained, timeout=30.0), await scrape(server)
        samples = await scrape(server)
        assert value(samples, "harken_webhook_deliveries_total", result="delivered") == len(receiver.requests) >= 1
        assert value(samples, "harken_webhook_deliveries_total", result="dead") == 0
    finally:
        await receiver.stop()


# --- structured logs -----------------------------------------------------------------------------

@pytest.fixture
def json_log():
    """Every record of the process, as the server writes it with log_format=json, at debug level."""
    stream = io.StringIO()
    handler = make_handler("json", stream)
    root, harken = logging.getLogger(), logging.getLogger("harken")
    saved = harken.level
    root.addHandler(handler)
    harken.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        harken.setLevel(saved)
        root.removeHandler(handler)


async def test_json_logs_name_the_session_and_never_hold_tokens_or_audio(gateway, json_log):
    uid = f"logged-{uuid.uuid4().hex[:6]}"
    token = token_for(gateway, uid)
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000)
    result = await stream_messages(url, pcm_messages(speech()), 0.1, token=token, realtime=False,
                                   settle_seconds=SETTLE)
    assert result.close_code == 1000
    marker = b"AUDIO-MARKER-" + uuid.uuid4().hex.encode()      # undecodable: exercises the decode-error log
    url = listen_url(gateway.base, codec="opus", sample_rate=16000)
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        # Sent once the session is ready, so it reaches the session straight from the socket's
        # read callback (ws_protocol.py), not through the task that reads the early messages.
        async for raw in ws:
            if raw != "ping" and json.loads(raw).get("status") == "ready":
                break
        await ws.send(b"\xff\xff\xff\xff" + marker)
        await asyncio.sleep(0.3)
    stale = token[:-4] + "AAAA"                                  # a forged token, refused
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {stale}"}) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await ws.recv()

    async def closed_logged() -> bool:
        return json_log.getvalue().count("session closed") >= 2

    assert await wait_until(closed_logged)
    text = json_log.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines and all({"ts", "level", "logger", "message", "session_id", "uid"} <= set(e) for e in lines)

    mine = [e for e in lines if e["uid"] == uid]
    opened = [e for e in mine if e["message"].startswith("session open")]
    closed = [e for e in mine if e["message"].startswith("session closed")]
    assert len(opened) == 2 and len(closed) == 2
    assert {e["session_id"] for e in closed} == {e["session_id"] for e in opened}
    assert all(e["session_id"] and e["session_id"] in e["message"] for e in opened)
    assert any(e["logger"] == "harken.session" and "decode error" in e["message"] for e in mine)

    for secret in (token, stale, token.split(".")[2], stale.split(".")[2]):
        assert secret not in text
    assert "Bearer" not in text
    assert marker.decode() not in text and "\\xff\\xff" not in text


def test_redaction_blanks_bearer_credentials_and_jwts():
    stream = io.StringIO()
    log = logging.getLogger("harken.test-redaction")
    handler = make_handler("text", stream)
    log.addHandler(handler)
    log.propagate = False
    try:
        jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
        log.warning("header was %s", f"Bearer {jwt}")
        log.warning("token %s in a message", jwt)
        try:
            raise ValueError(f"bad token {jwt}")
        except ValueError:
            log.exception("failed")
        log.warning("a plain message with eyJ but no token")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    text = stream.getvalue()
    assert "eyJhbGciOiJSUzI1NiJ9" not in text and "c2lnbmF0dXJl" not in text
    assert text.count(REDACTED) == 3 and "a plain message with eyJ but no token" in text


# --- one page for --workers ----------------------------------------------------------------------

def _registry_page(sessions: int, audio: float, backlog: int) -> str:
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

    registry = CollectorRegistry()
    Gauge("harken_active_sessions", "open", registry=registry).set(sessions)
    Counter("harken_audio_seconds", "audio", ["codec"], registry=registry).labels("opus").inc(audio)
    Gauge("harken_webhook_backlog", "rows", registry=registry).set(backlog)
    return generate_latest(registry).decode()


def test_worker_pages_merge_into_one_with_a_worker_label_and_the_store_figures_once():
    from harken.gateway.metrics import SHARED_FAMILIES
    from harken.gateway.worker_metrics import merge_worker_pages

    page = merge_worker_pages({"0": _registry_page(2, 1.5, 7), "1": _registry_page(3, 4.0, 6)}, own="1",
                              shared=set(SHARED_FAMILIES)).decode()
    assert page.count("# TYPE harken_active_sessions gauge") == 1
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(page) for s in f.samples}
    assert samples[("harken_active_sessions", frozenset({("worker", "0")}))] == 2
    assert samples[("harken_active_sessions", frozenset({("worker", "1")}))] == 3
    assert samples[("harken_audio_seconds_total", frozenset({("codec", "opus"), ("worker", "1")}))] == 4.0
    assert [(k, v) for k, v in samples.items() if k[0] == "harken_webhook_backlog"] == \
        [(("harken_webhook_backlog", frozenset()), 6)]          # the answering worker's read, unlabelled
    assert samples[("harken_metrics_workers", frozenset())] == 2


async def test_a_worker_gathers_its_siblings_and_skips_one_that_is_gone(tmp_path):
    import socket

    from harken.gateway.worker_metrics import SiblingMetrics, WorkerSlot

    siblings = [SiblingMetrics(WorkerSlot(i, tmp_path), lambda i=i: _registry_page(i, 1.0, 0).encode())
                for i in range(2)]
    for sibling in siblings:
        await sibling.start()
    dead = socket.socket(socket.AF_UNIX)            # a worker killed outright leaves its socket file
    dead.bind(str(WorkerSlot(2, tmp_path).socket_path()))
    dead.close()
    try:
        page = await siblings[0].page(_registry_page(0, 1.0, 0).encode(), shared=())
    finally:
        for sibling in siblings:
            await sibling.stop()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for f in text_string_to_metric_families(page.decode()) for s in f.samples}
    assert samples[("harken_active_sessions", frozenset({("worker", "1")}))] == 1
    assert samples[("harken_metrics_workers", frozenset())] == 2
    assert not (tmp_path / "worker-0.sock").exists()         # stop() removes its own socket


async def test_a_sibling_page_larger_than_one_socket_read_arrives_whole(tmp_path):
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from harken.gateway.worker_metrics import SiblingMetrics, WorkerSlot

    # Many labelled series (a busy worker: codecs, providers, close codes): ~1 MiB of text,
    # several times what one read of a Unix socket returns.
    registry = CollectorRegistry()
    gauge = Gauge("harken_test_series", "one per label value", ["series"], registry=registry)
    for i in range(20000):
        gauge.labels(f"series-{i:05d}-{'x' * 20}").set(i)
    big = generate_latest(registry)
    assert len(big) > 512 * 1024
    siblings = [SiblingMetrics(WorkerSlot(0, tmp_path), lambda: _registry_page(0, 1.0, 0).encode()),
                SiblingMetrics(WorkerSlot(1, tmp_path), lambda: big)]
    for sibling in siblings:
        await sibling.start()
    try:
        page = await siblings[0].page(_registry_page(0, 1.0, 0).encode(), shared=())
    finally:
        for sibling in siblings:
            await sibling.stop()
    values = [s.value for f in text_string_to_metric_families(page.decode()) if f.name == "harken_test_series"
              for s in f.samples if s.labels.get("worker") == "1"]
    assert sorted(values) == [float(i) for i in range(20000)]


async def test_a_resampled_stream_counts_every_sample_including_the_resampler_tail(make_gateway):
    """8 kHz PCM goes through soxr, which holds a few milliseconds back until the stream ends:
    the session flushes them, so all 1.6 s sent reach the stream (and the audio webhook)."""
    server = make_gateway(null_provider=True)
    url = listen_url(server.base, codec="pcm16", sample_rate=8000, stt_service="null")
    rng = np.random.default_rng(5)
    pcm8k = rng.integers(-8000, 8000, size=int(8000 * 1.6), dtype=np.int16)
    await stream_messages(url, [pcm8k[i:i + 800].tobytes() for i in range(0, len(pcm8k), 800)], 0.1,
                          token=token_for(server), realtime=False, settle_seconds=0.5)

    async def ended() -> bool:
        samples = await scrape(server)
        return value(samples, "harken_active_sessions") == 0 and value(samples, "harken_connections_total",
                                                                      code="1000") == 1

    assert await wait_until(ended)
    seconds = value(await scrape(server), "harken_audio_seconds_total", codec="pcm16")
    assert abs(seconds - 1.6) < 0.5 / 16000, f"{seconds} s of 1.6 s passed on"


async def test_audio_seconds_catch_up_while_a_session_streams_not_only_at_its_end(make_gateway):
    """The audio counter is caught up every 600 ms batch (not per 40 ms piece): a scrape during a
    stream already shows the audio passed on so far, at most a batch interval behind."""
    server = make_gateway(null_provider=True)
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, stt_service="null")
    pcm = np.random.default_rng(3).integers(-3000, 3000, size=16000 * 3, dtype=np.int16)
    before = value(await scrape(server), "harken_audio_seconds_total", codec="pcm16")
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token_for(server)}"}) as ws:
        while "ready" not in str(await ws.recv()):
            pass
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i, message in enumerate(pcm_messages(pcm[:16000 * 2])):          # 2 s in real time
            await asyncio.sleep(max(0.0, started + i * 0.1 - loop.time()))
            await ws.send(message)
        await asyncio.sleep(1.0)                # more than one batch interval later
        during = value(await scrape(server), "harken_audio_seconds_total", codec="pcm16") - before
        assert 2.0 - 0.05 <= during <= 2.0 + 1e-9, during
        for message in pcm_messages(pcm[16000 * 2:]):
            await ws.send(message)
        await asyncio.sleep(0.2)

    async def all_counted() -> bool:
        now = value(await scrape(server), "harken_audio_seconds_total", codec="pcm16") - before
        return abs(now - 3.0) < 1e-6

    assert await wait_until(all_counted)


async def test_lc3_messages_held_back_count_apart_and_only_the_refuted_one_as_a_decode_error(make_gateway, json_log):
    """An LC3 message whose loudness jumps is held until the next one confirms it (codecs/lc3.py):
    speech starting from silence holds its first frame, and its audio comes with the next. Those
    are not bad frames: the session counts them in harken_held_back, and only a held message the
    next one refutes (a silent frame amid speech, as random bytes' gain mostly is) in
    harken_decode_errors. Every real message's 10 ms reaches the stream."""
    from harken.codecs import HeldBack, decoder_for, encode
    from harken.codecs.lc3 import global_gain

    from .codec_samples import reference_pcm

    server = make_gateway(null_provider=True)
    pcm = np.concatenate([np.zeros(3200, np.int16), reference_pcm(), np.zeros(3200, np.int16), reference_pcm(),
                          np.zeros(3200, np.int16)])
    messages = encode.encode_for_device(pcm, "lc3", 16000)
    silent = messages[5]
    loud = next(i for i, m in enumerate(messages) if global_gain(m, 16000) > 150) + 30
    assert global_gain(silent, 16000) == 0 and global_gain(messages[loud], 16000) > 100
    sent = messages[:loud] + [silent] + messages[loud:]
    held = 0
    decoder = decoder_for("lc3", 16000)      # how many the decoder holds: the onsets and the silent frame
    for message in sent:
        try:
            decoder.decode(message)
        except HeldBack:
            held += 1
    assert held >= 3 and decoder.held_dropped() == 1

    before = await scrape(server)
    url = listen_url(server.base, codec="lc3", sample_rate=16000, stt_service="null")
    uid = f"held-{uuid.uuid4().hex[:6]}"
    result = await stream_messages(url, sent, 0.01, token=token_for(server, uid), realtime=False, settle_seconds=0.5)
    assert result.close_code == 1000

    async def ended() -> bool:
        samples = await scrape(server)
        return value(samples, "harken_active_sessions") == 0 and value(samples, "harken_connections_total",
                                                                      code="1000") == 1

    assert await wait_until(ended)
    after = await scrape(server)

    def delta(name: str) -> float:
        return value(after, name, codec="lc3") - value(before, name, codec="lc3")

    assert delta("harken_decode_errors_total") == 1
    assert delta("harken_held_back_total") == held
    assert delta("harken_audio_seconds_total") == pytest.approx(len(messages) / 100, abs=0.5 / 16000)
    closed = [json.loads(line)["message"] for line in json_log.getvalue().splitlines() if uid in line]
    closed = [m for m in closed if m.startswith("session closed")]
    assert len(closed) == 1 and "decode_errors=1 " in closed[0] and f"held_back={held} " in closed[0], closed
