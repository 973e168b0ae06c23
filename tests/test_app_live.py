"""The app's REST calls against a running gateway while its /v4/listen session runs: owner
enrolment through /v3/upload-audio then a streamed conversation, finding the live conversation
after a timeout, "stop and process now", and segment assignment reaching the live session.

Audio: LibriSpeech test-other utterances (tests/data/speakers, CC BY 4.0) and the pocketsphinx
LibriVox/CMU files in tests/data/audio; see tests/data/audio/SOURCES.md.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import numpy as np
import pytest
import websockets
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from harken.client import listen_url, stream_messages
from harken.gateway.auth import mint_local_token

from .fakes.webhook_receiver import ServedApp
from .test_app_rest import app_upload
from .test_gateway_conversations import pcm_messages, speech
from .test_speech_profile import OWNER, STRANGER, conversation, enrolment, wav_bytes, word_accuracy

pytestmark = pytest.mark.timeout(300)


def user(server, prefix: str) -> tuple[str, str, dict[str, str]]:
    uid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    token = mint_local_token(server.settings, uid, 900)
    return uid, token, {"Authorization": f"Bearer {token}"}


class LiveSession:
    """A /v4/listen connection whose messages are collected in the background."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.segments: dict[str, dict] = {}
        self.events: list[dict] = []

    async def __aenter__(self) -> "LiveSession":
        self.ws = await websockets.connect(self.url, additional_headers={"Authorization": f"Bearer {self.token}"},
                                           max_size=None)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        async for raw in self.ws:
            if raw == "ping":
                await self.ws.send(b"\x8a\x00")
                continue
            payload = json.loads(raw)
            if isinstance(payload, list):
                self.segments.update({s["id"]: s for s in payload})
            else:
                self.events.append(payload)

    async def send(self, pcm: np.ndarray) -> None:
        for message in pcm_messages(pcm):
            await self.ws.send(message)
            await asyncio.sleep(0.02)

    async def until(self, condition, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.1)

    def kinds(self) -> list[str]:
        return [e.get("type") for e in self.events]


def text_of(conversation: dict) -> str:
    return " ".join(s["text"] for s in conversation["transcript_segments"]).lower()


IN_PROGRESS = "/v1/conversations?include_discarded=false&limit=1&offset=0&statuses=in_progress"


# Owner and another (not enrolled) speaker, turn by turn; the enrolment uses other utterances
# of the owner (0, 1, 2).
OWNER_AND_OTHER = [(OWNER, 3), (STRANGER, 0), (OWNER, 4), (STRANGER, 2), (OWNER, 5), (STRANGER, 1)]


class IsUser:
    def __call__(self, segment: dict) -> bool:
        return bool(segment["is_user"])

    def truth(self, speaker: str) -> bool:
        return speaker == OWNER


async def test_enrolled_through_upload_audio_the_owner_is_told_from_another_speaker(gateway):
    _, token, auth = user(gateway, "enrol")
    audio, truth = conversation(OWNER_AND_OTHER)
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        uploaded = await http.post("/v3/upload-audio", headers=auth, **app_upload(wav_bytes(enrolment(OWNER, (0, 1, 2)))))
        assert uploaded.status_code == 200, uploaded.text
        assert (await http.get("/v3/speech-profile", headers=auth)).json() == {"has_profile": True}
        url = listen_url(gateway.base, codec="pcm16", sample_rate=16000, include_speech_profile="true")
        messages = [audio[i:i + 1600].tobytes() for i in range(0, audio.size, 1600)]
        await stream_messages(url, messages, 0.1, token=token, realtime=False, settle_seconds=6.0, max_wait=180)
        listing = (await http.get(IN_PROGRESS, headers=auth)).json()         # as the app finds it
    assert len(listing) == 1 and listing[0]["transcript_segments"], listing
    accuracy = word_accuracy(listing[0]["transcript_segments"], truth, IsUser())
    print(f"\nis_user right on this share of each speaker's words: {accuracy}")
    assert accuracy[OWNER] >= 0.9 and accuracy[STRANGER] >= 0.9, accuracy


async def test_in_progress_filter_finds_the_live_conversation_after_a_timeout(make_gateway):
    server = make_gateway(conversation_check_interval=0.3)
    _, token, auth = user(server, "timeout")
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, conversation_timeout=2)
    async with LiveSession(url, token) as live, httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        await live.send(speech("ss_0930.wav"))
        await live.until(lambda: "memory_created" in live.kinds(), 60, "the timeout's memory_created")
        processed = next(e for e in live.events if e.get("type") == "memory_created")["memory"]["id"]
        seen = set(live.segments)
        await live.send(speech("goforward.wav"))
        await live.until(lambda: set(live.segments) - seen, 60, "the next conversation's segments")
        found = (await http.get(IN_PROGRESS, headers=auth)).json()
        assert len(found) == 1 and found[0]["id"] != processed and found[0]["status"] == "in_progress"
        assert set(live.segments) - seen <= {s["id"] for s in found[0]["transcript_segments"]}
        completed = (await http.get("/v1/conversations?statuses=completed&limit=1", headers=auth)).json()
        assert [c["id"] for c in completed] == [processed]
        listed = (await http.get("/v1/conversations?statuses=&limit=50", headers=auth)).json()   # the app's list
        assert [c["id"] for c in listed] == [processed]


async def test_stop_and_process_now_during_a_live_session(gateway):
    _, token, auth = user(gateway, "stopnow")
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000, conversation_timeout=120)
    async with LiveSession(url, token) as live, httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        await live.send(speech("ss_0930.wav", tail=1.5))
        await live.until(lambda: live.segments, 60, "the first words")
        first = (await http.get(IN_PROGRESS, headers=auth)).json()[0]["id"]
        done = await http.post("/v1/conversations", headers=auth, content="{}")
        assert done.status_code == 200, done.text
        processed = done.json()["conversation"]
        assert processed["id"] == first and processed["status"] == "completed"
        await live.until(lambda: "memory_created" in live.kinds(), 30, "memory_created on the socket")
        kinds = live.kinds()
        assert kinds.index("memory_processing_started") < kinds.index("memory_created")
        assert next(e for e in live.events if e.get("type") == "memory_created")["memory"]["id"] == first
        before = set(live.segments)
        await live.send(speech("goforward.wav"))
        await live.until(lambda: set(live.segments) - before, 60, "words after the seam")
        await asyncio.sleep(4.0)                  # the engine's last words, and their flush
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        everything = (await http.get("/v1/conversations", headers=auth)).json()
    assert [c["status"] for c in everything] == ["in_progress", "completed"]
    second, ended = everything
    assert ended["id"] == first and "amiable" in text_of(ended)
    assert "forward" in text_of(second) and "amiable" not in text_of(second)
    # Nothing lost at the seam: every segment the client was sent is stored, as last sent.
    stored = {s["id"]: s for c in everything for s in c["transcript_segments"]}
    for segment_id, sent in live.segments.items():
        assert segment_id in stored, sent
        assert stored[segment_id]["text"] == sent["text"]


async def test_assigning_segments_reaches_the_live_session_and_the_realtime_webhook(make_gateway):
    server = make_gateway(webhook_allow_private=True)
    _, token, auth = user(server, "assign")
    delivered: list[dict] = []

    async def realtime(request):
        delivered.extend(json.loads(await request.body()))
        return Response(status_code=200)

    url = listen_url(server.base, codec="pcm16", sample_rate=16000)
    async with ServedApp(Starlette(routes=[Route("/rt", realtime, methods=["POST"])])) as receiver, \
            httpx.AsyncClient(base_url=server.http, timeout=30) as http:
        set_hook = await http.post("/v1/users/developer/webhook/realtime_transcript", headers=auth,
                                   json={"url": f"{receiver.base_url}/rt"})
        assert set_hook.status_code == 200, set_hook.text
        async with LiveSession(url, token) as live:
            await live.send(speech("espeak_01.wav", tail=2.0))
            await live.until(lambda: live.segments and not any(s["is_user"] for s in live.segments.values()),
                             60, "segments")
            await asyncio.sleep(2.0)
            live_id = (await http.get(IN_PROGRESS, headers=auth)).json()[0]["id"]
            ids = sorted(live.segments)
            assigned = await http.patch(f"/v1/conversations/{live_id}/segments/assign-bulk", headers=auth,
                                        json={"segment_ids": ids, "assign_type": "is_user", "value": "true"})
            assert assigned.status_code == 200, assigned.text
            assert all(s["is_user"] for s in assigned.json()["transcript_segments"])
            await live.until(lambda: all(live.segments[i]["is_user"] for i in ids if i in live.segments), 10,
                             "the relabelled segments on the socket")
            await live.until(lambda: any(d["id"] in ids and d["is_user"] for d in delivered), 20,
                             "the relabelled segments at the realtime webhook")
            await live.send(np.zeros(16000 * 2, np.int16))       # more flushes: they must not undo it
            await asyncio.sleep(2.0)
        stored = (await http.get(f"/v1/conversations/{live_id}", headers=auth)).json()["transcript_segments"]
    assert stored and all(s["is_user"] for s in stored if s["id"] in ids)
