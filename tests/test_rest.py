"""The /v1 REST API over real HTTP on loopback, with real local tokens (PROTOCOL §1, §7, §8)."""

from __future__ import annotations

import contextlib

import httpx
import pytest
from starlette.applications import Starlette

from harken.config import Settings
from harken.conversations import ConversationService
from harken.gateway.auth import build_authenticator, mint_local_token
from harken.gateway.rest import build_rest_routes
from tests.fakes.webhook_receiver import ServedApp
from tests.test_lifecycle import Clock
from tests.test_store import opened_store, segment

PUBLIC_HOOK = "https://93.184.216.34/hook"      # an address literal: no DNS needed


@contextlib.asynccontextmanager
async def api(tmp_path):
    """(service, settings, client) with the REST routes served on 127.0.0.1."""
    settings = Settings(auth="local", data_dir=tmp_path)
    authenticator = build_authenticator(settings)
    async with opened_store("sqlite", tmp_path) as store:
        service = ConversationService(settings, store, clock=Clock(), check_interval=3600)
        # The service as a function (as an app whose lifespan builds it passes it), the
        # authenticator as an object: both forms are accepted.
        app = Starlette(routes=build_rest_routes(lambda: service, authenticator))
        async with ServedApp(app) as served, httpx.AsyncClient(base_url=served.base_url) as client:
            yield service, settings, client
        await authenticator.aclose()


def bearer(settings: Settings, uid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_local_token(settings, uid)}"}


async def make_conversation(service: ConversationService, uid: str, text: str) -> str:
    live = await service.connect(uid, conversation_timeout=120)
    live.time_offset(service.clock())
    await live.save_batch([segment("s1", text, 0.0, 4.0)])
    await live.close()
    service.clock.advance(200)               # silent past the timeout: the next one is new
    return live.conversation_id


@pytest.mark.timeout(30)
async def test_every_route_needs_a_valid_bearer_token(tmp_path):
    async with api(tmp_path) as (service, settings, client):
        for path in ["/v1/conversations", "/v1/conversations/x", "/v1/users/developer/webhooks/memory_created"]:
            missing = await client.get(path)
            assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
            assert (await client.get(path, headers={"Authorization": "Bearer not-a-token"})).status_code == 401
            assert (await client.get(path, headers={"Authorization": "Basic abc"})).status_code == 401
        other = Settings(auth="local", data_dir=tmp_path / "another-server")     # signed by another key
        refused = await client.get("/v1/conversations", headers=bearer(other, "alice"))
        assert refused.status_code == 401 and "another key" in refused.json()["detail"]
        assert (await client.get("/v1/conversations", headers=bearer(settings, "alice"))).status_code == 200


@pytest.mark.timeout(30)
async def test_conversations_are_listed_newest_first_and_shown_only_to_their_owner(tmp_path):
    async with api(tmp_path) as (service, settings, client):
        first = await make_conversation(service, "alice", "the first talk about the garden plans")
        second = await make_conversation(service, "alice", "the second talk about the budget review")
        bobs = await make_conversation(service, "bob", "bob talks about his own things entirely")
        await service.wait_for_processing()      # the second connect processed the first
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")

        listed = (await client.get("/v1/conversations", headers=alice)).json()
        assert [c["id"] for c in listed] == [second, first]
        assert listed[1]["transcript_segments"][0]["text"] == "the first talk about the garden plans"
        page = (await client.get("/v1/conversations?limit=1&offset=1", headers=alice)).json()
        assert [c["id"] for c in page] == [first]
        assert (await client.get("/v1/conversations?limit=0", headers=alice)).status_code == 400
        assert (await client.get("/v1/conversations?offset=x", headers=alice)).status_code == 400

        shown = await client.get(f"/v1/conversations/{first}", headers=alice)
        assert shown.status_code == 200 and shown.json()["id"] == first
        assert shown.json()["status"] == "completed" and shown.json()["structured"]["title"]
        assert (await client.get(f"/v1/conversations/{first}", headers=bob)).status_code == 404
        assert (await client.get(f"/v1/conversations/{bobs}", headers=alice)).status_code == 404
        assert (await client.get("/v1/conversations/no-such-id", headers=alice)).status_code == 404
        assert [c["id"] for c in (await client.get("/v1/conversations", headers=bob)).json()] == [bobs]


@pytest.mark.timeout(30)
async def test_webhook_settings_are_validated_saved_and_removed(tmp_path):
    async with api(tmp_path) as (service, settings, client):
        alice = bearer(settings, "alice")
        path = "/v1/users/developer/webhooks/memory_created"
        assert (await client.get(path, headers=alice)).json() == {"kind": "memory_created", "url": None,
                                                                  "enabled": False}
        saved = await client.put(path, headers=alice, json={"url": PUBLIC_HOOK})
        assert saved.status_code == 200 and saved.json()["url"] == PUBLIC_HOOK
        assert (await client.get(path, headers=alice)).json()["url"] == PUBLIC_HOOK
        assert (await client.get(path, headers=bearer(settings, "bob"))).json()["url"] is None

        for bad in ["ftp://93.184.216.34/x", "http://127.0.0.1:8080/x", "http://localhost/x", "http://10.0.0.5/x",
                    "http://169.254.169.254/latest", "http://[::1]/x", "not a url"]:
            refused = await client.put(path, headers=alice, json={"url": bad})
            assert refused.status_code == 422, bad
            assert refused.json()["detail"]
        assert (await client.get(path, headers=alice)).json()["url"] == PUBLIC_HOOK     # unchanged

        audio = "/v1/users/developer/webhooks/audio_bytes"
        omi_style = await client.post(audio, headers=alice, content=f"{PUBLIC_HOOK},7")    # Omi's form, POST
        assert omi_style.status_code == 200 and omi_style.json()["interval_seconds"] == 7
        as_json = await client.put(audio, headers=alice, json={"url": PUBLIC_HOOK, "interval_seconds": 3})
        assert as_json.json() == {"kind": "audio_bytes", "url": PUBLIC_HOOK, "enabled": True, "interval_seconds": 3}
        assert (await client.put(audio, headers=alice, content="{broken")).status_code == 400

        assert (await client.delete(path, headers=alice)).status_code == 204
        assert (await client.get(path, headers=alice)).json()["url"] is None
        assert (await client.get("/v1/users/developer/webhooks/nonsense", headers=alice)).status_code == 404
