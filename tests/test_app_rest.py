"""The REST calls the Omi app makes around a recording, with the request shapes of its Dart
request builders (app/lib/backend/http/api/{speech_profile,users,conversations}.dart) and the
response shapes of the upstream backend's routers, over real HTTP on loopback, with real local
tokens, on SQLite and PostgreSQL.

Audio: LibriSpeech test-other utterances in tests/data/speakers (CC BY 4.0, see
tests/data/audio/SOURCES.md).
"""

from __future__ import annotations

import contextlib
import io

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from harken.config import Settings
from harken.conversations import AppQueries, ConversationService
from harken.gateway.auth import build_authenticator, mint_local_token
from harken.audio.speaker_models import model_named
from harken.gateway.profiles import MAX_AUDIO_BYTES, build_profile_routes, from_bytes
from harken.gateway.rest import build_rest_routes, not_served_route
from tests.fakes.webhook_receiver import ServedApp
from tests.test_lifecycle import Clock
from tests.test_speech_profile import OWNER, PERSON, STRANGER, enrolment, utterance, wav_bytes
from tests.test_store import BACKENDS, opened_store, segment

PUBLIC_HOOK = "https://93.184.216.34/hook"      # an address literal: no DNS needed


@contextlib.asynccontextmanager
async def app_api(backend: str, tmp_path):
    """(service, settings, client): the /v1, /v3, /v4 routes and the JSON 404 on 127.0.0.1."""
    settings = Settings(auth="local", data_dir=tmp_path)
    authenticator = build_authenticator(settings)
    async with opened_store(backend, tmp_path) as store:
        service = ConversationService(settings, store, clock=Clock(), check_interval=3600)
        app = Starlette(routes=[*build_rest_routes(service, authenticator),
                                *build_profile_routes(store, authenticator), not_served_route()])
        async with ServedApp(app) as served, httpx.AsyncClient(base_url=served.base_url, timeout=60) as client:
            yield service, settings, client
        await authenticator.aclose()


def bearer(settings: Settings, uid: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_local_token(settings, uid)}"}


def app_upload(content: bytes, filename: str = "speaker_profile.wav") -> dict:
    """What ``http.MultipartFile.fromPath('file', …)`` sends: no content type of its own, so
    application/octet-stream."""
    return {"files": {"file": (filename, io.BytesIO(content), "application/octet-stream")}}


async def stored_conversation(service: ConversationService, uid: str, texts: list[str], *,
                              complete: bool = True) -> tuple[str, list[str]]:
    """A conversation of ``uid`` with one segment per text; processed (completed) unless not
    ``complete``. Returns its id and segment ids."""
    live = await service.connect(uid, conversation_timeout=120)
    live.time_offset(service.clock())
    ids = [f"{live.conversation_id[:8]}-s{i}" for i in range(len(texts))]
    await live.save_batch([segment(sid, text, 4.0 * i, 4.0 * i + 3.5) for i, (sid, text) in enumerate(zip(ids, texts))])
    await live.close()
    if complete:
        assert await service.process(live.conversation_id)
    service.clock.advance(200)               # silent past the timeout: the next one is new
    return live.conversation_id, ids


# --- owner voice enrolment ------------------------------------------------------------------

@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_enrolment_through_upload_audio_as_the_app_sends_it(backend, tmp_path):
    async with app_api(backend, tmp_path) as (service, settings, client):
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
        assert (await client.get("/v3/speech-profile", headers=alice)).json() == {"has_profile": False}

        # The app's recording: a 16 kHz 16-bit mono WAV (WavBytesUtil.createWavFile), multipart.
        first = await client.post("/v3/upload-audio", headers=alice, **app_upload(wav_bytes(enrolment(OWNER, (0, 1, 2)))))
        assert first.status_code == 200, first.text
        assert set(first.json()) >= {"url"}
        assert (await client.get("/v3/speech-profile", headers=alice)).json() == {"has_profile": True}
        assert (await client.get("/v4/speech-profile", headers=alice)).json() == {"url": None}   # no audio kept
        assert (await client.get("/v3/speech-profile", headers=bob)).json() == {"has_profile": False}
        stored = await service.store.get_speech_profile("alice")
        owner_voice = from_bytes(stored.embedding, model_named().model_id)

        # Redo: the app records again and uploads again; the new voice replaces the old one. A
        # raw PCM16 part (no WAV header) is read as 16 kHz mono.
        redo = await client.post("/v3/upload-audio", headers=alice,
                                 **app_upload(enrolment(PERSON, (0, 1, 2, 3)).astype("<i2").tobytes(), "redo.pcm"))
        assert redo.status_code == 200, redo.text
        replaced = from_bytes((await service.store.get_speech_profile("alice")).embedding, model_named().model_id)
        assert float(np.dot(owner_voice, replaced)) < 0.9          # another voice now
        assert (await client.get("/v3/speech-profile", headers=alice)).json() == {"has_profile": True}

        # The app records up to 150 s: speech past the profile's 60 s is cut, not refused.
        long = np.tile(enrolment(OWNER, (0, 1, 2, 3, 4, 5)), 3)
        assert long.size / 16000 > 90
        capped = await client.post("/v3/upload-audio", headers=alice, **app_upload(wav_bytes(long)))
        assert capped.status_code == 200 and capped.json()["speech_seconds"] == 60.0, capped.text

        # Bad uploads: upstream's 400 with a detail (413 over the size limit), nothing stored for bob.
        huge = await client.post("/v3/upload-audio", headers=bob, **app_upload(bytes(MAX_AUDIO_BYTES + 128 * 1024)))
        assert huge.status_code == 413 and huge.json()["detail"]
        too_short = await client.post("/v3/upload-audio", headers=bob, **app_upload(wav_bytes(utterance(STRANGER, 0))))
        assert too_short.status_code == 400 and "speech" in too_short.json()["detail"]
        not_multipart = await client.post("/v3/upload-audio", headers=bob | {"Content-Type": "audio/wav"},
                                          content=wav_bytes(enrolment(OWNER, (0, 1))))
        assert not_multipart.status_code == 400 and "multipart" in not_multipart.json()["detail"]
        wrong_field = await client.post("/v3/upload-audio", headers=bob,
                                        files={"audio": ("a.wav", wav_bytes(enrolment(OWNER, (0, 1))), "audio/wav")})
        assert wrong_field.status_code == 400 and "'file'" in wrong_field.json()["detail"]
        broken_wav = await client.post("/v3/upload-audio", headers=bob, **app_upload(b"RIFF\x00\x00garbage" * 10))
        assert broken_wav.status_code == 400 and broken_wav.json()["detail"]
        assert await service.store.get_speech_profile("bob") is None
        assert (await client.post("/v3/upload-audio", **app_upload(b"x"))).status_code == 401


# --- people ---------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_people_at_the_apps_path_in_upstreams_shape(backend, tmp_path):
    async with app_api(backend, tmp_path) as (service, settings, client):
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
        created = await client.post("/v1/users/people", headers=alice, json={"name": "Petra"})   # createPerson
        assert created.status_code == 200, created.text            # the app reads the person only on 200
        person = created.json()
        assert {"id", "name", "created_at", "updated_at", "speech_samples"} <= set(person)
        assert person["name"] == "Petra" and person["speech_samples"] == [] and not person["has_voice"]

        listed = await client.get("/v1/users/people?include_speech_samples=true", headers=alice)   # getAllPeople
        assert [p["id"] for p in listed.json()] == [person["id"]]
        assert [p["id"] for p in (await client.get("/v1/people", headers=alice)).json()] == [person["id"]]   # alias
        single = await client.get(f"/v1/users/people/{person['id']}?include_speech_samples=false", headers=alice)
        assert single.json()["name"] == "Petra"
        renamed = await client.patch(f"/v1/users/people/{person['id']}/name?value=Petra%20B", headers=alice)
        assert renamed.status_code == 200 and renamed.json() == {"status": "ok"}
        assert (await client.get(f"/v1/users/people/{person['id']}", headers=alice)).json()["name"] == "Petra B"

        # A voice sample (Harken's addition at the same path family).
        sample = await client.post(f"/v1/users/people/{person['id']}/speech-samples", headers=alice,
                                   content=wav_bytes(np.concatenate([utterance(PERSON, i) for i in (2, 5)])))
        assert sample.status_code == 200, sample.text
        assert sample.json()["has_voice"] and sample.json()["samples"] == 1

        # Another user's person is missing, whatever the call.
        for method, path in [("GET", ""), ("DELETE", ""), ("PATCH", "/name?value=X")]:
            assert (await client.request(method, f"/v1/users/people/{person['id']}{path}", headers=bob)).status_code == 404
        assert (await client.post(f"/v1/users/people/{person['id']}/speech-samples", headers=bob,
                                  content=wav_bytes(utterance(PERSON, 2)))).status_code == 404
        assert (await client.get("/v1/users/people", headers=bob)).json() == []

        # Bad bodies: a 4xx with a reason, nothing stored.
        for body in [{"content": b"{not json"}, {"json": {}}, {"json": {"name": "  "}}, {"json": {"name": 7}},
                     {"json": ["Petra"]}]:
            refused = await client.post("/v1/users/people", headers=alice, **body)
            assert 400 <= refused.status_code < 500 and refused.json()["detail"], body
        assert (await client.patch(f"/v1/users/people/{person['id']}/name?value=", headers=alice)).status_code == 422
        assert len((await client.get("/v1/users/people", headers=alice)).json()) == 1

        assert (await client.delete(f"/v1/users/people/{person['id']}", headers=alice)).status_code == 204
        assert (await client.get("/v1/users/people", headers=alice)).json() == []
        assert (await client.post("/v1/people", headers=alice, json={"name": "Cy"})).status_code == 201


# --- conversations --------------------------------------------------------------------------

CONVERSATION_KEYS = {"id", "created_at", "started_at", "finished_at", "structured", "transcript_segments",
                     "photos", "status", "source", "language", "discarded", "geolocation", "starred"}


def ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["id"] for c in response.json()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_conversations_are_filtered_as_upstream_filters_them(backend, tmp_path):
    async with app_api(backend, tmp_path) as (service, settings, client):
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
        older, _ = await stored_conversation(service, "alice", ["we planned the garden beds for spring"])
        dropped, _ = await stored_conversation(service, "alice", ["the budget review moves to friday"])
        async with service.store.engine.begin() as conn:         # as processing marks a short chat
            await conn.execute(sa.text("UPDATE conversations SET discarded = true WHERE id = :id"), {"id": dropped})
        live, _ = await stored_conversation(service, "alice", ["this one is still going on"], complete=False)
        bobs, _ = await stored_conversation(service, "bob", ["bob talks about his own things"])

        # What the app sends after connecting: the live conversation, and only it.
        query = "/v1/conversations?include_discarded=false&limit=1&offset=0&statuses=in_progress"
        assert ids_of(await client.get(query, headers=alice)) == [live]
        assert ids_of(await client.get(query, headers=bob)) == []
        # Its list (statuses empty: upstream's processing,completed), discarded ones included or not.
        everything = "/v1/conversations?include_discarded=true&limit=50&offset=0&statuses="
        assert ids_of(await client.get(everything, headers=alice)) == [dropped, older]
        assert ids_of(await client.get(everything.replace("=true", "=false", 1), headers=alice)) == [older]
        assert ids_of(await client.get("/v1/conversations?statuses=completed,in_progress", headers=alice)) == [
            live, dropped, older]
        assert ids_of(await client.get("/v1/conversations?statuses=processing", headers=alice)) == []
        assert ids_of(await client.get(f"{everything}&limit=1&offset=1".replace("limit=50&", ""), headers=alice)) == [older]
        assert ids_of(await client.get("/v1/conversations", headers=alice)) == [live, dropped, older]   # no filter
        assert (await client.get("/v1/conversations?statuses=" + ",".join(["completed"] * 21), headers=alice)
                ).status_code == 400
        assert (await client.get("/v1/conversations?include_discarded=maybe", headers=alice)).status_code == 400

        shown = await client.get(f"/v1/conversations/{older}", headers=alice)
        body = shown.json()
        assert CONVERSATION_KEYS <= set(body)
        assert body["status"] == "completed" and body["photos"] == [] and body["structured"]["title"]
        assert body["transcript_segments"][0]["text"] == "we planned the garden beds for spring"
        assert {"id", "text", "speaker", "speaker_id", "is_user", "person_id", "start", "end"} <= set(
            body["transcript_segments"][0])
        assert (await client.get(f"/v1/conversations/{bobs}", headers=alice)).status_code == 404
        assert (await client.get(f"/v1/conversations/{older}", headers=bob)).status_code == 404


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_stop_and_process_now_without_a_live_session(backend, tmp_path):
    """With no session of the user here, the newest in-progress conversation is processed."""
    async with app_api(backend, tmp_path) as (service, settings, client):
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
        assert (await client.post("/v1/conversations", headers=alice, content="{}")).status_code == 404
        live, _ = await stored_conversation(service, "alice", ["please book the team dinner for thursday"],
                                            complete=False)
        assert (await client.post("/v1/conversations", headers=bob, content="{}")).status_code == 404
        assert (await client.post("/v1/conversations", headers=alice, content="{broken")).status_code == 400
        assert (await client.get(f"/v1/conversations/{live}", headers=alice)).json()["status"] == "in_progress"

        done = await client.post("/v1/conversations", headers=alice, content="{}")    # processInProgressConversation
        assert done.status_code == 200, done.text
        body = done.json()
        assert body["messages"] == [] and body["conversation"]["id"] == live and body["memory"] == body["conversation"]
        assert body["conversation"]["status"] == "completed" and body["conversation"]["structured"]["title"]
        assert ids_of(await client.get("/v1/conversations?statuses=in_progress", headers=alice)) == []
        assert (await client.post("/v1/conversations", headers=alice)).status_code == 404    # nothing left


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_starred_geolocation_and_segment_assignment_are_stored(backend, tmp_path):
    async with app_api(backend, tmp_path) as (service, settings, client):
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
        cid, (s0, s1, s2) = await stored_conversation(service, "alice", ["hello there", "hi how are you", "fine"])
        queries = AppQueries(service.store)

        # Starred (setConversationStarred): PATCH …/starred?starred=true, no body.
        starred = await client.patch(f"/v1/conversations/{cid}/starred?starred=true", headers=alice)
        assert starred.status_code == 200 and starred.json()["status"] == "Ok"
        assert starred.json()["conversation"]["starred"] is True
        assert ids_of(await client.get("/v1/conversations?statuses=&starred=true", headers=alice)) == [cid]
        assert (await client.patch(f"/v1/conversations/{cid}/starred", headers=alice)).status_code == 400
        assert (await client.patch(f"/v1/conversations/{cid}/starred?starred=true", headers=bob)).status_code == 404
        unstarred = await client.patch(f"/v1/conversations/{cid}/starred?starred=false", headers=alice)
        assert unstarred.json()["conversation"]["starred"] is False

        # Geolocation (updateUserGeolocation): Geolocation.toJson().
        where = {"id": 0, "altitude": 35.2, "accuracy": 12.0, "time": "2026-12-06T04:00:00.000Z",
                 "google_place_id": None, "location_type": None, "address": None,
                 "latitude": 52.52, "longitude": 13.405}
        assert (await client.patch("/v1/users/geolocation", headers=alice, json=where)).json() == {"status": "ok"}
        assert (await queries.geolocation("alice"))["latitude"] == 52.52
        for bad in [b'{"longitude": 13.4}', b'{"latitude": 200, "longitude": 1}', b'{"latitude": "52", "longitude": 1}',
                    b'{"latitude": Infinity, "longitude": 1}', b'{"latitude": NaN, "longitude": 1}', b"[1, 2]", b"{"]:
            refused = await client.patch("/v1/users/geolocation", headers=alice, content=bad)
            assert refused.status_code == 400 and refused.json()["detail"], bad
        assert (await queries.geolocation("alice"))["longitude"] == 13.405       # unchanged
        assert await queries.geolocation("bob") is None

        # Assigning segments (assignBulkConversationTranscriptSegments), not live: straight to the store.
        person = (await client.post("/v1/users/people", headers=alice, json={"name": "Petra"})).json()
        path = f"/v1/conversations/{cid}/segments/assign-bulk"
        to_person = await client.patch(path, headers=alice, json={"segment_ids": [s1, s2], "assign_type": "person_id",
                                                                  "value": person["id"]})
        assert to_person.status_code == 200, to_person.text
        labels = {s["id"]: (s["is_user"], s["person_id"]) for s in to_person.json()["transcript_segments"]}
        assert labels == {s0: (True, None), s1: (False, person["id"]), s2: (False, person["id"])}
        to_owner = await client.patch(path, headers=alice, json={"segment_ids": [s2], "assign_type": "is_user",
                                                                 "value": "true"})
        assert {s["id"]: (s["is_user"], s["person_id"]) for s in to_owner.json()["transcript_segments"]}[s2] == (
            True, None)
        unassigned = await client.patch(path, headers=alice, json={"segment_ids": [s0], "assign_type": "person_id",
                                                                   "value": None})
        assert {s["id"]: s["is_user"] for s in unassigned.json()["transcript_segments"]}[s0] is False

        before = (await client.get(f"/v1/conversations/{cid}", headers=alice)).json()["transcript_segments"]
        bobs_person = (await client.post("/v1/users/people", headers=bob, json={"name": "Dee"})).json()
        refusals = [
            (alice, {"segment_ids": [s0, "no-such-segment"], "assign_type": "is_user", "value": "true"}, 409),
            (alice, {"segment_ids": [s0], "assign_type": "speaker", "value": "true"}, 400),
            (alice, {"segment_ids": "s0", "assign_type": "is_user", "value": "true"}, 400),
            (alice, {"segment_ids": [s0], "assign_type": "person_id", "value": bobs_person["id"]}, 404),
            (bob, {"segment_ids": [s0], "assign_type": "is_user", "value": "true"}, 404),
        ]
        for who, body, status in refusals:
            refused = await client.patch(path, headers=who, json=body)
            assert refused.status_code == status and refused.json()["detail"], (body, refused.text)
        assert (await client.patch(path, headers=alice, content=b"not json")).status_code == 400
        after = (await client.get(f"/v1/conversations/{cid}", headers=alice)).json()["transcript_segments"]
        assert after == before                                   # nothing changed by a refused request


# --- developer webhooks ---------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_developer_webhooks_at_upstreams_paths(backend, tmp_path):
    async with app_api(backend, tmp_path) as (service, settings, client):
        alice, bob = bearer(settings, "alice"), bearer(settings, "bob")
        hook = "/v1/users/developer/webhook/memory_created"
        assert (await client.get(hook, headers=alice)).json() == {"url": ""}       # getUserWebhookUrl
        saved = await client.post(hook, headers=alice, json={"url": PUBLIC_HOOK})  # setUserWebhookUrl
        assert saved.status_code == 200 and saved.json() == {"status": "ok"}
        assert (await client.get(hook, headers=alice)).json() == {"url": PUBLIC_HOOK}
        assert (await client.get(hook, headers=bob)).json() == {"url": ""}
        status = (await client.get("/v1/users/developer/webhooks/status", headers=alice)).json()
        assert status == {"audio_bytes": False, "memory_created": True, "realtime_transcript": False,
                          "day_summary": False}

        # disableWebhook / enableWebhook: delivery stops (no setting) but the URL is kept.
        assert (await client.post(f"{hook}/disable", headers=alice, content="")).json() == {"status": "ok"}
        assert await service.get_webhook("alice", "memory_created") is None
        assert (await client.get(hook, headers=alice)).json() == {"url": PUBLIC_HOOK}
        assert not (await client.get("/v1/users/developer/webhooks/status", headers=alice)).json()["memory_created"]
        assert (await client.post(f"{hook}/enable", headers=alice, content="")).status_code == 200
        assert (await service.get_webhook("alice", "memory_created")).url == PUBLIC_HOOK
        assert (await client.post(f"{hook}/enable", headers=bob)).status_code == 200     # nothing to enable
        assert await service.get_webhook("bob", "memory_created") is None

        # The audio interval as upstream names it: "url,seconds" in the url.
        audio = "/v1/users/developer/webhook/audio_bytes"
        assert (await client.post(audio, headers=alice, json={"url": f"{PUBLIC_HOOK},7"})).status_code == 200
        assert (await client.get(audio, headers=alice)).json() == {"url": f"{PUBLIC_HOOK},7"}
        assert (await service.get_webhook("alice", "audio_bytes")).interval_seconds == 7

        # SSRF rules stay; bad bodies are refused with a reason; nothing changes.
        for url in ["http://127.0.0.1:8080/x", "http://169.254.169.254/latest", "ftp://93.184.216.34/x", "no url"]:
            refused = await client.post(hook, headers=alice, json={"url": url})
            assert refused.status_code == 422 and refused.json()["detail"], url
        for body in [{"content": b"{"}, {"json": {"uri": PUBLIC_HOOK}}, {"json": [PUBLIC_HOOK]}]:
            assert (await client.post(hook, headers=alice, **body)).status_code == 400, body
        assert (await client.get(hook, headers=alice)).json() == {"url": PUBLIC_HOOK}
        assert (await client.get("/v1/users/developer/webhook/day_summary", headers=alice)).status_code == 404

        # An empty URL (or ",") removes it; the plural routes stay as aliases.
        assert (await client.post(hook, headers=alice, json={"url": ","})).status_code == 200
        assert (await client.get(hook, headers=alice)).json() == {"url": ""}
        plural = await client.put("/v1/users/developer/webhooks/memory_created", headers=alice, json={"url": PUBLIC_HOOK})
        assert plural.status_code == 200 and (await client.get(hook, headers=alice)).json() == {"url": PUBLIC_HOOK}


# --- everything else ------------------------------------------------------------------------

@pytest.mark.timeout(30)
async def test_other_app_routes_get_a_quick_json_404_never_a_401(tmp_path):
    async with app_api("sqlite", tmp_path) as (service, settings, client):
        alice = bearer(settings, "alice")
        for method, path in [("GET", "/v1/apps?include_reviews=true"), ("POST", "/v2/messages"),
                             ("GET", "/v3/memories?limit=100"), ("GET", "/v1/users/profile"),
                             ("GET", "/v1/conversations/c1/photos"), ("DELETE", "/v1/conversations/c1"),
                             ("GET", "/v3/speech-profile/expand"), ("PATCH", "/v1/users/language")]:
            for headers in (alice, {}, {"Authorization": "Bearer not-a-token"}):
                answer = await client.request(method, path, headers=headers)
                assert answer.status_code == 404, (method, path, answer.status_code)
                assert answer.headers["content-type"] == "application/json" and answer.json()["detail"]
        # The routes Harken serves still ask for a token.
        assert (await client.get("/v3/speech-profile")).status_code == 401


# --- the seam of "process now", without sockets -------------------------------------------------

class SessionStub:
    """A session's hooks (lifecycle.SessionHooks): words it has not flushed yet."""

    def __init__(self, unsaved: list[dict]):
        self.unsaved = unsaved
        self.new_conversations = 0
        self.taken: list[dict] = []
        self.refused: list[dict] = []

    @contextlib.asynccontextmanager
    async def settled(self, timeout: float):
        yield                               # no words wait for a step of the session's own here

    def take_unsaved(self) -> tuple[list[dict], list[str]]:
        self.taken, self.unsaved = self.unsaved, []
        return self.taken, []

    def unsaved_refused(self) -> None:
        self.refused += self.taken          # a session goes on alone with them (_continue_alone)

    async def assign(self, segment_ids, *, is_user, person_id):
        raise AssertionError("not used here")

    def on_new_conversation(self, live) -> None:
        self.new_conversations += 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_process_now_stores_the_sessions_unflushed_words_in_the_conversation_that_ends(backend, tmp_path):
    from tests.test_lifecycle import Events

    async with opened_store(backend, tmp_path) as store:
        service = ConversationService(Settings(data_dir=tmp_path), store, clock=Clock(), check_interval=3600)
        events, stub = Events(), SessionStub([segment("s2", "and the unflushed end of it", 4.0, 7.0)])
        live = await service.connect("alice", conversation_timeout=120, events=events, hooks=stub,
                                     on_new_conversation=stub.on_new_conversation)
        live.time_offset(service.clock())
        first = live.conversation_id
        await live.save_batch([segment("s1", "the first words of the talk", 0.0, 3.5)])

        memory = await service.process_now("alice")
        assert memory["id"] == first and memory["status"] == "completed"
        assert [s["id"] for s in memory["transcript_segments"]] == ["s1", "s2"]     # nothing left behind
        assert [e["type"] for e in events.received] == ["memory_processing_started", "memory_created"]
        assert stub.new_conversations == 1 and live.conversation_id != first

        await live.save_batch([segment("s3", "words after the seam go on", 0.0, 3.0)])
        queries = AppQueries(store)
        assert await queries.in_progress_ids("alice") == [live.conversation_id]
        assert [s["id"] for s in (await queries.get("alice", live.conversation_id)).segments] == ["s3"]
        assert await service.process_now("bob") is None
        await live.close()
        await service.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_process_now_racing_a_takeover_from_another_node_finishes_the_conversation(backend, tmp_path):
    """``POST /v1/conversations`` reaches the node of the user's older connection just after the
    phone reconnected through another node (a same-source takeover the older handle has not
    learnt of yet): its save of the session's unflushed words is refused (``LeaseLost``). That
    was an HTTP 500; the conversation is finished all the same (processed from the store: the
    newer connection goes on in a new one at its next save), and the refused words go back to
    the session, which stores them in a conversation of its own."""
    settings = Settings(auth="local", data_dir=tmp_path)
    authenticator = build_authenticator(settings)
    async with opened_store(backend, tmp_path) as store:
        clock = Clock()
        here = ConversationService(settings, store, clock=clock, check_interval=3600, node_id="here")
        there = ConversationService(settings, store, clock=clock, check_interval=3600, node_id="there")
        stub = SessionStub([segment("s2", "words the older session had not stored", 4.0, 7.0)])
        older = await here.connect("alice", conversation_timeout=120, hooks=stub,
                                   on_new_conversation=stub.on_new_conversation)
        older.time_offset(clock())
        first = older.conversation_id
        await older.save_batch([segment("s1", "the first words of the talk", 0.0, 3.5)])
        clock.advance(2.0)
        newer = await there.connect("alice", conversation_timeout=120)
        assert newer.conversation_id == first and not older.fenced        # not learnt yet
        app = Starlette(routes=build_rest_routes(here, authenticator))
        async with ServedApp(app) as served, httpx.AsyncClient(base_url=served.base_url, timeout=60) as client:
            answer = await client.post("/v1/conversations", headers=bearer(settings, "alice"), content="{}")
        assert answer.status_code == 200, answer.text
        finished = answer.json()["conversation"]
        assert finished["id"] == first and finished["status"] == "completed"
        assert [s["id"] for s in finished["transcript_segments"]] == ["s1"]
        assert [s["id"] for s in stub.refused] == ["s2"]        # not stored there: the session keeps them
        await newer.save_batch([segment("n1", "the newer connection goes on", 0.0, 2.0)])
        assert newer.conversation_id != first                   # in a new conversation, nothing lost
        assert [s["id"] for s in (await AppQueries(store).get("alice", newer.conversation_id)).segments] == ["n1"]
        await older.close()
        await newer.close()
        await here.stop()
        await there.stop()
        await authenticator.aclose()
