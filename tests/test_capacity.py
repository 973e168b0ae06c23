"""max_sessions: a full node refuses new connections with 1013, and takes them again when a place frees."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from harken.client import listen_url
from harken.config import Settings

from .test_gateway import expect_refusal, token_for
from .test_metrics import scrape, value, wait_until

pytestmark = pytest.mark.timeout(120)


async def open_until_ready(server):
    """A pcm16 session that has reached ``service_status: ready``; the caller closes it."""
    url = listen_url(server.base, codec="pcm16", sample_rate=16000)
    headers = {"Authorization": f"Bearer {token_for(server)}"}
    ws = await websockets.connect(url, additional_headers=headers)
    async with asyncio.timeout(15):
        while True:
            raw = await ws.recv()
            if raw != "ping" and json.loads(raw).get("status") == "ready":
                return ws


async def readiness(server) -> tuple[int, dict]:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(f"{server.http}/readyz")
    return answer.status_code, answer.json()


async def test_a_full_node_refuses_with_1013_and_admits_again_once_a_place_frees(make_gateway):
    server = make_gateway(max_sessions=2)
    url = listen_url(server.base, codec="pcm16", sample_rate=16000)
    first = await open_until_ready(server)
    second = await open_until_ready(server)
    try:
        events, code, reason = await expect_refusal(url, {"Authorization": f"Bearer {token_for(server)}"})
        assert code == 1013 and "capacity" in reason
        assert any(e.get("type") == "error" and e.get("code") == 1013 for e in events)
        # the browser route shares the same places, and refuses before waiting for its auth message
        events, code, _ = await expect_refusal(listen_url(server.base + "/v4/web/listen", codec="pcm16"))
        assert code == 1013
        status, body = await readiness(server)
        assert status == 503 and "at capacity" in body["problems"]
        samples = await scrape(server)
        assert value(samples, "harken_capacity_refusals_total") == 2
        assert value(samples, "harken_session_limit") == 2
        assert value(samples, "harken_connections_total", code="1013") == 2
    finally:
        await first.close()

    async def ready_again() -> bool:
        return (await readiness(server))[0] == 200

    assert await wait_until(ready_again, timeout=10), "the closed session's place was not given back"
    third = await open_until_ready(server)
    await third.close()
    await second.close()


async def test_a_connection_refused_for_its_token_gives_its_place_back(make_gateway):
    server = make_gateway(max_sessions=1)
    url = listen_url(server.base, codec="pcm16", sample_rate=16000)
    for _ in range(3):
        _, code, _ = await expect_refusal(url, {"Authorization": "Bearer forged"})
        assert code == 1008
    _, code, _ = await expect_refusal(url + "&sample_rate=12345", {"Authorization": f"Bearer {token_for(server)}"})
    assert code == 1008
    ws = await open_until_ready(server)        # the one place is free: refusals did not keep it
    await ws.close()


async def test_without_a_limit_nothing_is_refused_for_capacity(make_gateway):
    server = make_gateway()
    sessions = [await open_until_ready(server) for _ in range(3)]
    status, body = await readiness(server)
    assert status == 200 and body["sessions"] == 3
    for ws in sessions:
        await ws.close()


def test_a_negative_limit_is_refused_at_start():
    with pytest.raises(ValueError, match="max_sessions"):
        Settings.from_env({"HARKEN_MAX_SESSIONS": "-1"})
