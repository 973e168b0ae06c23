"""The Omi app's connection, replayed exactly as the app builds it, for every device kind.

Each test opens ``/v4/listen`` with the URL and headers the app (or its Android background
streamer) sends (reference/omi-app-client.md §1, read from ``transcription_service.dart`` and
``OmiBackgroundAudioStreamer.kt``), streams a real recording in the device's codec against a
running server on loopback, and checks EVERY text frame the server sends against the app's Dart
models (``harken.gateway.app_schema``): a frame the app cannot parse is an event it loses, and a
close it does not expect is an endless reconnect loop for its user.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import time
import uuid
from dataclasses import dataclass, field

import httpx
import numpy as np
import orjson
import pytest
import websockets

from harken.client import device_messages, listen_url
from harken.gateway.app_schema import check_server_message
from harken.gateway.auth import mint_local_token
from harken.gateway.drain import end_sessions
from harken.stt.null import audio_times

from .conftest import load_audio
from .fakes.llm import FakeChatServer
from .fakes.deepgram import FakeDeepgram
from .fakes.script import Plan, make_script, timecode
from .fakes.soniox import FakeSoniox

pytestmark = pytest.mark.timeout(180)

# (device kind, codec the app sends for it, source, encoder options)
DEVICE_KINDS = [
    ("phone mic", "pcm16", "phone", {}),
    ("Omi DevKit", "opus", "omi", {}),
    ("Omi CV1", "opus_fs320", "omi", {}),
    ("Plaud", "opus_fs320", "plaud", {}),
    ("Fieldy", "opus", "fieldy", {"bitrate": 32000}),       # 40-byte frames: 32 kbit/s at 10 ms
    ("Friend", "lc3_fs1030", "friend_com", {}),
    ("Bee", "aac", "bee", {}),
    ("old PCM firmware (pcm8)", "pcm8", "omi", {}),
    ("old PCM firmware (pcm16)", "pcm16", "omi", {}),
]
CLIP = "ss_0880.wav"            # "he was not an ill disposed young man"
CLIP_WORDS = {"he", "was", "not", "an", "ill", "disposed", "young", "man"}
READY_TIMES: dict[str, float] = {}


def app_headers(token: str, platform: str = "android") -> dict[str, str]:
    """``app/lib/backend/http/shared.dart`` buildHeaders."""
    return {"Authorization": f"Bearer {token}", "X-Request-Start-Time": f"{time.time():.3f}",
            "X-App-Platform": platform, "X-Device-Id-Hash": uuid.uuid4().hex[:16], "X-App-Version": "1.0.530"}


def app_url(base: str, uid: str, codec: str, source: str, **overrides) -> str:
    """What ``TranscriptSegmentSocketService.create`` builds, with a newer build's extra parameters."""
    params = {"language": "en", "sample_rate": 16000, "codec": codec, "uid": uid, "include_speech_profile": "true",
              "stt_service": "soniox", "conversation_timeout": 120, "source": source, "onboarding": "disabled",
              "speaker_auto_assign": "enabled", "create_speakers": "true", "vad_gate": "enabled"}
    params.update(overrides)
    return listen_url(base, **{k: v for k, v in params.items() if v is not None})


@dataclass
class AppSession:
    """What the app saw on one connection."""

    frames: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    segments: dict[str, dict] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    ready_after: float | None = None
    close_code: int | None = None
    close_reason: str = ""

    def statuses(self) -> list[str]:
        return [e["status"] for e in self.events if e.get("type") == "service_status"]

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind]

    def words(self) -> set[str]:
        text = " ".join(s["text"] for s in self.segments.values()).lower()
        return {w.strip(".,?!'\"") for w in text.split()}


async def run_app(url: str, headers: dict, messages: list = (), seconds_each: float = 0.0, *,
                  realtime: bool = False, settle: float = 3.0, until=None, max_wait: float = 90.0,
                  after_ready=None) -> AppSession:
    """Connect as the app, answer every ``ping`` with [0x8A, 0x00] as ``pure_socket.dart`` does,
    send ``messages`` (bytes = audio, dict = a JSON text message), and wait until nothing changed
    for ``settle`` seconds (or ``until(session)``)."""
    session = AppSession()
    opened = time.monotonic()
    changed = time.monotonic()
    ready = asyncio.Event()
    async with websockets.connect(url, additional_headers=headers, max_size=None, open_timeout=30) as ws:
        async def receive():
            nonlocal changed
            async for raw in ws:
                session.frames.append(raw)
                session.problems += check_server_message(raw)
                if raw == "ping":
                    await ws.send(bytes([0x8A, 0x00]))
                    continue
                payload = orjson.loads(raw)
                changed = time.monotonic()
                if isinstance(payload, list):
                    for s in payload:
                        session.segments[s["id"]] = s
                else:
                    session.events.append(payload)
                    if payload.get("status") == "ready":
                        session.ready_after = time.monotonic() - opened
                        ready.set()
                    if payload.get("type") == "segments_deleted":
                        for sid in payload["segment_ids"]:
                            session.segments.pop(sid, None)

        reader = asyncio.create_task(receive())
        try:
            await asyncio.wait([reader, asyncio.create_task(ready.wait())], timeout=60,
                               return_when=asyncio.FIRST_COMPLETED)
            if after_ready is not None and not reader.done():
                await after_ready(ws, session)
            start = time.monotonic()
            for i, message in enumerate(messages):
                if reader.done():
                    break
                if realtime:
                    await asyncio.sleep(max(0.0, start + i * seconds_each - time.monotonic()))
                elif i % 25 == 0:
                    await asyncio.sleep(0)
                await ws.send(orjson.dumps(message).decode() if isinstance(message, dict) else message)
            changed = time.monotonic()
            deadline = time.monotonic() + max_wait
            while not reader.done() and time.monotonic() < deadline:
                if until is not None and until(session):
                    break
                if until is None and time.monotonic() - changed >= settle:
                    break
                await asyncio.sleep(0.05)
            if not reader.done():
                await ws.close(1000, "done")
            await asyncio.wait_for(reader, 15)
        except websockets.ConnectionClosed:
            pass
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        session.close_code, session.close_reason = ws.close_code, ws.close_reason or ""
    return session


def new_user(server, prefix: str) -> tuple[str, str]:
    uid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return uid, mint_local_token(server.settings, uid, 600)


# --- every device kind, embedded engine ------------------------------------------------------

@pytest.mark.parametrize("kind,codec,source,options", DEVICE_KINDS, ids=[k[0] for k in DEVICE_KINDS])
async def test_every_device_kind_connects_transcribes_and_sends_only_what_the_app_parses(
        gateway, kind, codec, source, options):
    uid, token = new_user(gateway, "device")
    pcm = np.concatenate([np.zeros(4000, np.int16), load_audio(CLIP), np.zeros(8000, np.int16)])
    from harken.codecs.encode import encode_for_device, message_duration

    messages = encode_for_device(pcm, codec, 16000, **options)
    # Waits for the words rather than a fixed quiet time: the engine shares a loaded machine.
    session = await run_app(app_url(gateway.base, uid, codec, source), app_headers(token), messages,
                            message_duration(codec, 16000), until=lambda s: len(s.words() & CLIP_WORDS) >= 6,
                            max_wait=90)
    READY_TIMES[kind] = session.ready_after
    print(f"\nFIGURE connect->ready {kind} ({codec}): {session.ready_after * 1000:.0f} ms; "
          f"words heard {sorted(session.words() & CLIP_WORDS)}")
    assert session.problems == [], session.problems[:5]
    assert session.close_code == 1000, (session.close_code, session.close_reason)
    assert session.statuses()[:4] == ["initiating", "in_progress_conversations_processing", "stt_initiating", "ready"]
    ready = session.of_type("service_status")[3]
    assert ready["provider"] == "local" and "en" in ready["reason"]
    assert not session.of_type("last_memory")                 # a new user has none
    assert session.of_type("conversation_session")[0]["status"] == "in_progress"
    assert len(session.words() & CLIP_WORDS) >= 5, session.segments
    assert all(s["start"] >= 0 for s in session.segments.values())


def test_ready_times_summary():
    """Prints the figure of the run (connect → ready per device kind, share that reached ready
    and transcribed); the per-kind tests above are what pass or fail."""
    if READY_TIMES:
        reached = sum(1 for t in READY_TIMES.values() if t is not None)
        print("\nFIGURE connect->ready ms: " + ", ".join(f"{k} {v * 1000:.0f}" for k, v in READY_TIMES.items())
              + f"; {reached}/{len(DEVICE_KINDS)} device kinds reached ready")


async def test_the_background_streamer_url_connects(gateway):
    """``OmiBackgroundAudioStreamer.kt`` buildUrl: no onboarding/create_speakers, the user's
    timeout (-1 = upstream's 4 h), and its own headers."""
    uid, token = new_user(gateway, "streamer")
    url = listen_url(gateway.base, language="en", sample_rate=16000, codec="opus", uid=uid,
                     include_speech_profile="true", stt_service="soniox", conversation_timeout=-1, source="omi",
                     speaker_auto_assign="enabled", vad_gate="enabled")
    session = await run_app(url, app_headers(token), device_messages(load_audio(CLIP), "opus", 16000)[0], settle=3.0)
    assert session.problems == [] and session.close_code == 1000 and "ready" in session.statuses()


@pytest.mark.parametrize("overrides", [
    {"vad_gate": "disabled"}, {"vad_gate": "active"}, {"vad_gate": "off"},
    {"stt_service": "whisperx"}, {"stt_service": "deepgram"}, {"stt_service": "speechmatics"},
    {"stt_service": "null"},                         # not enabled on this server: a preference, ignored
    {"onboarding": "enabled"}, {"custom_stt": "enabled"}, {"conversation_timeout": -1},
    {"source": ""}, {"source": "apple_watch"}, {"source": "rayban_meta"}, {"source": "limitless"}, {"source": "openglass"},
    {"call_id": "c-1", "client_conversation_id": "cc-1", "speech_profile_redo": "true"},
    {"create_speakers": "false", "speaker_auto_assign": "disabled"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
async def test_every_value_the_app_sends_is_accepted(gateway, overrides):
    uid, token = new_user(gateway, "values")
    overrides = {"source": "phone", **overrides}
    source = overrides.pop("source")
    session = await run_app(app_url(gateway.base, uid, "pcm16", source, **overrides), app_headers(token),
                            [np.zeros(1600, np.int16).tobytes()] * 3, settle=0.3)
    assert session.close_code == 1000, (session.close_code, session.close_reason, session.events)
    assert "ready" in session.statuses() and session.problems == []


async def test_messages_the_app_sends_but_harken_does_not_act_on_are_accepted_silently(gateway):
    uid, token = new_user(gateway, "quiet")
    texts = [{"type": "client_state", "foreground": True, "transcript_visible": False},
             {"type": "start_onboarding"}, {"type": "skip_question"}]
    session = await run_app(app_url(gateway.base, uid, "pcm16", "phone"), app_headers(token), texts, settle=0.5)
    assert session.close_code == 1000 and session.problems == [] and not session.of_type("error")


# --- keepalive -------------------------------------------------------------------------------

async def test_the_apps_ping_reply_stays_a_keepalive_not_audio(make_gateway):
    server = make_gateway(ping_interval=0.2)
    uid, token = new_user(server, "keepalive")
    seen: dict = {}

    async def look(ws, session):
        await asyncio.sleep(1.5)            # several pings answered with [0x8A, 0x00]
        stats = server.call(lambda: [(s.stats.keepalives, s.stats.audio_bytes, s.stats.decode_errors, s.clock.samples)
                                     for s in server.gateway.sessions])
        seen["stats"] = stats

    session = await run_app(app_url(server.base, uid, "opus", "omi"), app_headers(token), after_ready=look, settle=0.1)
    (keepalives, audio_bytes, decode_errors, samples), = seen["stats"]
    assert keepalives >= 3 and audio_bytes == 0 and decode_errors == 0 and samples == 0
    assert session.close_code == 1000


# --- cloud provider (fake Soniox: the app's default stt_service) ----------------------------

async def phone_with_fake_words(server, prefix: str, seconds: int) -> AppSession:
    """The phone's microphone streaming the fakes' timecode audio (their words are scripted on
    it, not heard: the VAD gate would skip it all, so the app's vad_gate is left out here)."""
    uid, token = new_user(server, prefix)
    pcm = timecode(0, seconds * 16000)
    messages = [pcm[i:i + 1600].tobytes() for i in range(0, pcm.size, 1600)]
    return await run_app(app_url(server.base, uid, "pcm16", "phone", vad_gate=None), app_headers(token),
                         messages, settle=2.0)


async def test_the_apps_default_soniox_is_served_by_soniox_when_configured(make_gateway):
    script = make_script(seed=3, duration=6.0)
    async with FakeSoniox(script, key="k") as soniox:
        server = make_gateway(soniox_api_key="k", soniox_url=soniox.url, stt_chain="soniox,local")
        session = await phone_with_fake_words(server, "soniox", seconds=6)
    assert session.problems == [], session.problems[:5]
    ready = [e for e in session.of_type("service_status") if e["status"] == "ready"][0]
    assert ready["provider"] == "soniox"
    assert {s["stt_provider"] for s in session.segments.values()} == {"soniox"}


async def test_a_provider_failing_mid_stream_switches_with_events_the_app_parses(make_gateway):
    script = make_script(seed=7, duration=10.0)
    async with FakeSoniox(script, key="k") as soniox, FakeDeepgram(script, key="k") as deepgram:
        soniox.plans.append(Plan(fail_at=4.0, kind="close"))
        server = make_gateway(soniox_api_key="k", soniox_url=soniox.url, deepgram_api_key="k",
                              deepgram_url=deepgram.url, stt_chain="soniox,dg-nova-3,local", stt_retry_base=0.05)
        session = await phone_with_fake_words(server, "failover", seconds=10)
    assert session.problems == [], session.problems[:5]
    switched = [e for e in session.of_type("service_status") if e["status"] == "stt_switched"]
    assert switched and switched[0]["provider"] == "deepgram"
    assert {s["stt_provider"] for s in session.segments.values()} == {"soniox", "deepgram"}


# --- drain and capacity ---------------------------------------------------------------------

async def test_a_draining_node_sends_what_the_app_parses_then_1012(make_gateway):
    server = make_gateway()
    uid, token = new_user(server, "drain")

    async def drain(ws, session):
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(end_sessions(server.gateway), server.loop))

    session = await run_app(app_url(server.base, uid, "opus", "omi"), app_headers(token), after_ready=drain,
                            until=lambda s: False, max_wait=10)
    assert session.close_code == 1012 and session.problems == []
    assert "draining" in session.statuses()


async def test_a_full_node_refuses_with_an_error_the_app_parses_and_1013(make_gateway):
    server = make_gateway(max_sessions=1)
    uid, token = new_user(server, "capacity")
    holding = asyncio.Event()
    release = asyncio.Event()

    async def hold(ws, session):
        holding.set()
        await release.wait()

    first = asyncio.create_task(run_app(app_url(server.base, uid, "opus", "omi"), app_headers(token),
                                        after_ready=hold, settle=0.1))
    await asyncio.wait_for(holding.wait(), 30)
    other_uid, other_token = new_user(server, "capacity")
    refused = await run_app(app_url(server.base, other_uid, "opus", "omi"), app_headers(other_token), settle=0.1)
    release.set()
    await first
    assert refused.close_code == 1013 and "capacity" in refused.close_reason
    assert refused.problems == [] and refused.of_type("error")


# --- profile matching ------------------------------------------------------------------------

@pytest.mark.timeout(300)
async def test_the_owner_suggestion_carries_a_name_the_app_can_parse(gateway):
    from .test_speech_profile import OWNER, enrolment, silence, utterance, wav_bytes

    uid, token = new_user(gateway, "owner")
    async with httpx.AsyncClient(base_url=gateway.http, timeout=60) as http:
        put = await http.put("/v1/users/speech-profile", headers={"Authorization": f"Bearer {token}"},
                             content=wav_bytes(enrolment(OWNER, (0, 1, 2))))
        assert put.status_code == 200, put.text
    audio = np.concatenate([silence(0.5)] + [np.concatenate((utterance(OWNER, i), silence(0.8))) for i in (3, 4, 5)])
    messages = [audio[i:i + 1600].tobytes() for i in range(0, audio.size, 1600)]
    session = await run_app(app_url(gateway.base, uid, "pcm16", "phone"), app_headers(token), messages,
                            until=lambda s: bool(s.of_type("speaker_label_suggestion")), max_wait=150)
    suggestions = session.of_type("speaker_label_suggestion")
    assert session.problems == [], session.problems[:5]
    assert any(s["person_id"] == "user" and s["person_name"] == "You" for s in suggestions), suggestions


# --- photos (OpenGlass) ------------------------------------------------------------------------

def jpeg_like(size: int, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, size, dtype=np.uint8).tobytes() + b"\xff\xd9"


def image_chunks(photo_id: str, jpeg: bytes, piece: int = 8192) -> list[dict]:
    text = base64.b64encode(jpeg).decode()
    parts = [text[i:i + piece] for i in range(0, len(text), piece)]
    return [{"type": "image_chunk", "id": photo_id, "index": i, "total": len(parts), "data": p}
            for i, p in enumerate(parts)]


async def test_an_openglass_photo_is_announced_described_stored_and_processed_with_the_conversation(make_gateway):
    answer = ('{"title": "Coffee", "overview": "A coffee.", "emoji": "☕", "category": "personal", '
              '"action_items": [], "events": []}')
    llm = await FakeChatServer(["A mug of coffee on a desk.", answer]).start()
    try:
        server = make_gateway(null_provider=True, llm_base_url=llm.api_base, llm_vision_model="vision-fake",
                              llm_model="text-fake")
        uid, token = new_user(server, "glass")
        jpeg = jpeg_like(20_000)
        pieces = image_chunks("temp-1", jpeg)
        shuffled = [pieces[2], pieces[0], pieces[0], pieces[3], pieces[1]]      # out of order, a duplicate
        bad = {"type": "image_chunk", "id": "temp-2", "index": 0, "total": 2, "data": "not base64!"}
        audio, seconds = device_messages(np.concatenate([load_audio(CLIP)] * 2), "opus", 16000)
        session = await run_app(
            app_url(server.base, uid, "opus", "openglass", stt_service="null"), app_headers(token),
            [bad, *shuffled, *audio], seconds, until=lambda s: bool(s.of_type("photo_described")) and s.segments,
            max_wait=30)
        assert session.problems == [], session.problems[:5]
        assert session.close_code == 1000
        errors = session.of_type("error")
        assert errors and errors[0]["param"] == "image_chunk" and "base64" in errors[0]["message"]
        processing, = session.of_type("photo_processing")
        described, = session.of_type("photo_described")
        assert processing["temp_id"] == "temp-1" and described["photo_id"] == processing["photo_id"]
        assert described["description"] == "A mug of coffee on a desk." and described["discarded"] is False
        vision_request = llm.json_bodies()[0]
        assert vision_request["model"] == "vision-fake"
        image_part = vision_request["messages"][0]["content"][1]["image_url"]["url"]
        assert base64.b64decode(image_part.split(",", 1)[1]) == jpeg

        conversation_id = session.of_type("conversation_session")[0]["conversation_id"]
        async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": f"Bearer {token}"}) as http:
            stored = (await http.get(f"/v1/conversations/{conversation_id}")).json()
        photo, = stored["photos"]
        assert base64.b64decode(photo["base64"]) == jpeg and photo["description"] == described["description"]
        # Processing gives the summary model the photo's description, and the memory carries it.
        memory = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            server.gateway.conversations.process(conversation_id), server.loop))
        assert memory["photos"][0]["id"] == photo["id"]
        summary_request = llm.json_bodies()[1]
        assert "A mug of coffee on a desk." in summary_request["messages"][1]["content"]

    finally:
        await llm.stop()

async def test_without_a_vision_model_a_photo_gets_an_empty_description(make_gateway):
    server = make_gateway(null_provider=True)
    uid, token = new_user(server, "glass-plain")
    session = await run_app(app_url(server.base, uid, "opus", "openglass", stt_service="null"), app_headers(token),
                            image_chunks("t", jpeg_like(3000)), until=lambda s: bool(s.of_type("photo_described")),
                            max_wait=15)
    described, = session.of_type("photo_described")
    assert described["description"] == "" and described["discarded"] is False and session.problems == []


# --- several sources of one user at once ------------------------------------------------------

SOURCES_SECONDS = 60.0


@pytest.mark.timeout(SOURCES_SECONDS + 90)
async def test_two_sources_of_one_user_stream_together_without_a_close_loop_and_every_word_is_stored_once(
        make_gateway):
    """A pendant (opus, source omi) and the phone mic (pcm16, source phone) of one user, for 60 s at
    real-time pace: neither is closed by the other, and what each was sent is stored once."""
    server = make_gateway(null_provider=True)
    uid, token = new_user(server, "two-sources")
    speech = np.concatenate([load_audio(name) for name in ("ss_0870.wav", "ss_0880.wav", "ss_0890.wav",
                                                           "ss_0920.wav", "ss_0930.wav")] * 8)
    speech = speech[: int(SOURCES_SECONDS * 16000)]
    pendant, pendant_s = device_messages(speech, "opus", 16000)
    phone, phone_s = device_messages(speech, "pcm16", 16000)
    sessions = await asyncio.gather(
        run_app(app_url(server.base, uid, "opus", "omi", stt_service="null"), app_headers(token), pendant,
                pendant_s, realtime=True, settle=2.0),
        run_app(app_url(server.base, uid, "pcm16", "phone", stt_service="null"), app_headers(token, "ios"),
                phone, phone_s, realtime=True, settle=2.0))
    for session in sessions:
        assert session.close_code == 1000, (session.close_code, session.close_reason)   # closed by us, not bounced
        assert session.problems == [] and sum(len(s["text"].split()) for s in session.segments.values()) >= 100
    ids = [s.of_type("conversation_session")[0]["conversation_id"] for s in sessions]
    assert ids[0] != ids[1]                                        # one live conversation per source
    async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": f"Bearer {token}"}) as http:
        stored = {cid: (await http.get(f"/v1/conversations/{cid}")).json() for cid in ids}
    all_ids = [seg["id"] for c in stored.values() for seg in c["transcript_segments"]]
    assert len(all_ids) == len(set(all_ids))                        # nothing stored twice
    for session, cid in zip(sessions, ids):
        texts = {seg["id"]: seg["text"] for seg in stored[cid]["transcript_segments"]}
        assert texts == {sid: s["text"] for sid, s in session.segments.items()}   # what it was sent, once


@pytest.mark.timeout(SOURCES_SECONDS + 90)
async def test_two_connections_of_one_source_stream_together_without_a_close_loop_and_every_word_is_stored_once(
        make_gateway):
    """Android's background streamer and the foreground app on one phone: the same URL (opus,
    source omi) and the same device hash, both streaming, the second from 3 s after the first.
    Neither is closed by the other (either would reconnect and take the conversation back): the
    newer takes the conversation over and the older goes on in a conversation of its own. The
    null engine's words name their stream time, so each connection's words can be counted in
    the store: the 60 s one's t300 … t60000 and the 45 s one's t300 … t45000, each exactly once."""
    server = make_gateway(null_provider=True)
    uid, token = new_user(server, "one-source")
    headers = app_headers(token)
    url = app_url(server.base, uid, "opus", "omi", stt_service="null", vad_gate="disabled")   # every word counted
    speech = np.concatenate([load_audio(name) for name in ("ss_0870.wav", "ss_0880.wav", "ss_0890.wav",
                                                           "ss_0920.wav", "ss_0930.wav")] * 8)
    older_audio, older_s = device_messages(speech[: int(SOURCES_SECONDS * 16000)], "opus", 16000)
    newer_audio, newer_s = device_messages(speech[: int(45 * 16000)], "opus", 16000)

    async def newer():
        await asyncio.sleep(3.0)
        return await run_app(url, dict(headers), newer_audio, newer_s, realtime=True, settle=2.0)

    older, newer = await asyncio.gather(run_app(url, dict(headers), older_audio, older_s, realtime=True, settle=2.0),
                                        newer())
    for session in (older, newer):
        assert session.close_code == 1000, (session.close_code, session.close_reason)   # closed by us, not bounced
        assert session.problems == []
    first, moved = (e["conversation_id"] for e in older.of_type("conversation_session"))
    (taken,) = (e["conversation_id"] for e in newer.of_type("conversation_session"))
    assert taken == first and moved != first        # the newer took it over, the older went on in its own

    async with httpx.AsyncClient(base_url=server.http, headers={"Authorization": f"Bearer {token}"}) as http:
        listed = (await http.get("/v1/conversations", params={"limit": 10})).json()
    assert {c["id"] for c in listed} == {first, moved}
    stored = [seg for c in listed for seg in c["transcript_segments"]]
    assert len({seg["id"] for seg in stored}) == len(stored)
    words = collections.Counter(t for seg in stored for t in audio_times(seg["text"]))
    expected = collections.Counter(round(0.3 * k, 3) for k in range(1, int(SOURCES_SECONDS / 0.3 + 1e-6) + 1))
    expected.update(round(0.3 * k, 3) for k in range(1, int(45 / 0.3 + 1e-6) + 1))
    assert words == expected, (sorted((expected - words).elements())[:20], sorted((words - expected).elements())[:20])
    # What each app was shown is what its conversation holds.
    by_conversation = {c["id"]: {seg["id"]: seg["text"] for seg in c["transcript_segments"]} for c in listed}
    assert {sid: s["text"] for sid, s in newer.segments.items()}.items() <= by_conversation[first].items()
    assert {sid: s["text"] for sid, s in older.segments.items()
            if sid not in by_conversation[first]}.items() <= by_conversation[moved].items()
