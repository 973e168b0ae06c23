"""The live transcript page (``GET /``) in a real headless Chromium, and ``POST /v1/local/token``.

The browser tests play a development recording into Chromium's fake microphone and read what
a person would see. Screenshots go to ``test-artifacts/`` at the repository root.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import jwt
import numpy as np
import pytest
import websockets
from starlette.applications import Starlette

from harken.gateway.auth import LocalAuthenticator, mint_local_token
from harken.gateway.web import PAIRING_HEADER, WEB_TOKEN_TTL, pairing_secret, web_routes

from .browser import chromium, chromium_missing, write_microphone_wav
from .conftest import load_audio
from .conftest import test_settings as settings_for_test


def page_url(server, query: str = "") -> str:
    """The page's address as the server's banner prints it: with the pairing secret."""
    return f"{server.http}/{query}#pair={pairing_secret(server.settings)}"

pytestmark = pytest.mark.timeout(120)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
needs_chromium = pytest.mark.skipif(chromium_missing() is not None, reason=str(chromium_missing()))

START = "Start transcribing from the microphone"     # the buttons' accessible names
STOP = "Stop transcribing"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.exists() and path.stat().st_size > 1000
    return path


def microphone(tmp_path: Path) -> Path:
    return write_microphone_wav(tmp_path / "microphone.wav", [load_audio("espeak_01.wav")])


def watch_urls(page) -> list[str]:
    """Every URL the page requests, WebSockets included (to check that no token is in one)."""
    urls: list[str] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("websocket", lambda ws: urls.append(ws.url))
    return urls


# --- the page end to end, against a real gateway ------------------------------------------------

@needs_chromium
@pytest.mark.parametrize("codec", ["auto", "pcm16"])
def test_page_transcribes_the_microphone_live(make_gateway, tmp_path, codec):
    from playwright.sync_api import expect

    server = make_gateway()
    with chromium(tmp_path / "profile", microphone(tmp_path)) as browser:
        page = browser.new_page()
        urls = watch_urls(page)
        page.goto(page_url(server, "?codec=pcm16" if codec == "pcm16" else ""))
        expect(page.locator("#identity")).to_have_text("Signed in on this machine as web-user.", timeout=10_000)
        expect(page.locator("#token-panel")).to_be_hidden()
        expect(page.locator("#transcript")).to_have_attribute("aria-live", "polite")

        if codec == "pcm16":
            expected = "PCM16"
        else:   # Opus where this browser's WebCodecs can encode it, PCM16 otherwise
            opus = page.evaluate("""async () => typeof AudioEncoder !== 'undefined' &&
                (await AudioEncoder.isConfigSupported({codec: 'opus', sampleRate: 16000, numberOfChannels: 1}))
                .supported""")
            expected = "Opus" if opus else "PCM16"
        page.get_by_role("button", name=START).click()
        expect(page.locator("#status")).to_have_text(f"Listening ({expected}, 16 kHz).", timeout=15_000)
        transcript = page.locator("#transcript")
        expect(transcript).to_contain_text(re.compile("meeting", re.I), timeout=40_000)
        expect(transcript).to_contain_text(re.compile("design team", re.I), timeout=10_000)
        assert page.locator("#transcript .segment").count() >= 1
        screenshot(page, f"web-page-live-{codec}.png")

        page.get_by_role("button", name=STOP).click()
        expect(page.locator("#status")).to_have_text("Stopped.", timeout=15_000)
        expect(page.get_by_role("button", name=START)).to_be_enabled()
        expect(transcript).to_contain_text(re.compile("design team", re.I))   # kept after stopping
        path = screenshot(page, f"web-page-stopped-{codec}.png")

    assert path.exists()
    deadline = time.monotonic() + 10      # the gateway saw the close and released the session
    while server.call(lambda: len(server.gateway.sessions)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.call(lambda: len(server.gateway.sessions)) == 0
    listen = [u for u in urls if "/v4/web/listen" in u]
    assert listen and all("codec=" + ("opus" if expected == "Opus" else "pcm16") in u for u in listen)
    assert all("sample_rate=16000" in u and "language=en" in u for u in listen)
    assert not [u for u in urls if "token=" in u or "eyJ" in u], "a token travelled in a URL"


@needs_chromium
def test_conversation_panel_follows_the_rest_api(gateway, tmp_path):
    """The panel shows when ``GET /v1/conversations`` answers and hides when it is missing (404)."""
    from playwright.sync_api import expect

    token = mint_local_token(gateway.settings, "web-user", 60)
    answer = httpx.get(f"{gateway.http}/v1/conversations", headers={"Authorization": f"Bearer {token}"})
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        with page.expect_response(lambda r: "/v1/conversations" in r.url, timeout=10_000) as listing:
            page.goto(page_url(gateway))
        response = listing.value
        assert response.request.headers["authorization"].startswith("Bearer ey")
        assert response.status == answer.status_code
        panel = page.locator("#conversations")
        if answer.status_code == 200:
            expect(panel).to_be_visible(timeout=10_000)
        else:
            page.wait_for_load_state("networkidle")
            expect(panel).to_be_hidden()
            expect(page.locator("#status")).to_have_text("Idle.")     # no error shown for it


# --- the page's side of the protocol, against a scripted server ---------------------------------
# The events below (deletions, the owner's segments, several speakers, a finished conversation)
# cannot be produced on demand by the real engine from a recording, so a Playwright WebSocket
# route plays the server's part of PROTOCOL.md §4 word for word.

def segment(id_, text, start, speaker_id=0, is_user=False):
    return {"id": id_, "text": text, "speaker": f"SPEAKER_{speaker_id:02d}", "speaker_id": speaker_id,
            "is_user": is_user, "person_id": None, "start": start, "end": start + 1.0,
            "speech_profile_processed": True, "stt_provider": "local", "translations": []}


@needs_chromium
def test_page_speaks_the_web_listen_protocol(gateway, tmp_path):
    from playwright.sync_api import expect

    received: list = []
    routes: list = []

    def on_socket(ws):
        routes.append(ws)
        ws.on_message(lambda message: received.append(message))

    with chromium(tmp_path / "profile", microphone(tmp_path)) as browser:
        page = browser.new_page()
        page.route_web_socket(re.compile(r".*/v4/web/listen\?.*"), on_socket)
        page.goto(page_url(gateway, "?codec=pcm16"))
        expect(page.locator("#identity")).to_contain_text("Signed in", timeout=10_000)
        page.get_by_role("button", name=START).click()
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        ws = routes[0]
        assert "codec=pcm16" in ws.url and "sample_rate=16000" in ws.url and "language=en" in ws.url

        # First message: the token, as JSON text, and one the gateway accepts.
        auth = json.loads(received[0])
        assert auth["type"] == "auth"
        assert jwt.decode(auth["token"], options={"verify_signature": False})["sub"] == "web-user"
        assert "token" not in ws.url
        page.wait_for_timeout(600)
        assert len(received) == 1, "audio was sent before the server accepted the token"

        ws.send(json.dumps({"type": "auth_response", "success": True}))
        ws.send(json.dumps({"type": "service_status", "status": "stt_initiating",
                            "status_text": "STT Service Starting"}))
        expect(page.locator("#status")).to_have_text("STT Service Starting")
        ws.send(json.dumps({"type": "service_status", "status": "ready", "status_text": None}))
        expect(page.locator("#status")).to_have_text("Listening (PCM16, 16 kHz).")
        ws.send("ping")

        # Audio: PCM16 in 100 ms messages (3200 bytes) at real-time pace; audio captured while
        # the token was being checked is sent too, not lost.
        started = time.monotonic()
        page.wait_for_timeout(2000)
        audio = [m for m in received[1:] if isinstance(m, bytes)]
        elapsed = time.monotonic() - started
        assert all(len(m) == 3200 for m in audio)
        assert 8 * elapsed <= len(audio) <= 10 * (elapsed + 1.5) + 3, (len(audio), elapsed)
        samples = np.frombuffer(b"".join(audio), "<i2")
        assert np.abs(samples).max() > 1000, "the microphone's speech did not reach the socket"

        # Segments: upserted by id, ordered by start, speakers coloured apart, the owner badged.
        ws.send(json.dumps([segment("a", "Please schedule", 0.5)]))
        ws.send(json.dumps([segment("a", "Please schedule a meeting", 0.5),
                            segment("b", "Sure, which day?", 3.0, speaker_id=1, is_user=True)]))
        ws.send(json.dumps([segment("c", "with the", 2.0)]))
        rows = page.locator("#transcript .segment")
        expect(rows).to_have_count(3)
        expect(rows.locator(".text")).to_have_text(["Please schedule a meeting", "with the", "Sure, which day?"])
        expect(rows.nth(2).locator(".you-badge")).to_be_visible()
        expect(rows.nth(0).locator(".you-badge")).to_be_hidden()
        colours = [rows.nth(i).evaluate("n => getComputedStyle(n).borderLeftColor") for i in range(3)]
        assert colours[0] == colours[1] != colours[2]

        ws.send(json.dumps({"type": "segments_deleted", "segment_ids": ["c"]}))
        expect(rows).to_have_count(2)
        expect(rows.locator(".text")).to_have_text(["Please schedule a meeting", "Sure, which day?"])

        memory = {"id": "conv-1", "started_at": "2025-01-01T10:00:00+00:00", "status": "completed",
                  "structured": {"title": "Design team meeting", "overview": "Tuesday at three.", "emoji": "📅",
                                 "category": "work", "action_items": [{"description": "Book a room",
                                                                       "completed": False}], "events": []},
                  "transcript_segments": [segment("a", "Please schedule a meeting", 0.5)], "discarded": False}
        ws.send(json.dumps({"type": "memory_created", "memory": memory, "messages": []}))
        summary = page.locator("#summary")
        expect(summary).to_be_visible()
        expect(summary).to_contain_text("Design team meeting")
        expect(summary).to_contain_text("Tuesday at three.")
        expect(summary).to_contain_text("Book a room")
        screenshot(page, "web-page-protocol.png")

        ws.close(code=1011, reason="transcription_service_unavailable")
        expect(page.locator("#status")).to_contain_text("Transcription is unavailable")
        expect(page.get_by_role("button", name=START)).to_be_enabled()


# --- the capture worklet's resampler ----------------------------------------------------------
# Chromium opens its AudioContext at 16 kHz and resamples itself; browsers that cannot (Firefox)
# run the microphone at 44.1 or 48 kHz and the worklet resamples. Rendered offline, so exact.

RENDER_TONE = """async ([rate, frequency]) => {
  const context = new OfflineAudioContext(1, rate, rate);          // one second
  await context.audioWorklet.addModule("/static/worklet.js");
  const node = new AudioWorkletNode(context, "pcm-capture", {numberOfInputs: 1, numberOfOutputs: 0,
    processorOptions: {targetRate: 16000, chunkSamples: 1600}});
  const chunks = [];
  node.port.onmessage = (event) => chunks.push(Array.from(event.data));
  const buffer = context.createBuffer(1, rate, rate);
  const data = buffer.getChannelData(0);
  for (let i = 0; i < rate; i++) data[i] = 0.5 * Math.sin(2 * Math.PI * frequency * i / rate);
  const source = context.createBufferSource();
  source.buffer = buffer;
  source.connect(node);
  source.start();
  await context.startRendering();
  node.port.postMessage("stop");
  await new Promise((resolve) => setTimeout(resolve, 300));
  return chunks;
}"""


@needs_chromium
def test_worklet_resamples_44k_and_48k_microphones_to_16k_without_aliasing(gateway, tmp_path):
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(page_url(gateway))
        for rate in (48000, 44100):
            speech_band = page.evaluate(RENDER_TONE, [rate, 1000])
            above_nyquist = page.evaluate(RENDER_TONE, [rate, 12000])   # would fold back to 4 kHz
            assert [len(c) for c in speech_band[:-1]] == [1600] * (len(speech_band) - 1)
            tone = np.concatenate([np.array(c) for c in speech_band])
            assert abs(len(tone) - 16000) <= 130, len(tone)       # 1 s (the tail may hold the last 128-frame block)
            steady = tone[400:15600]
            spectrum = np.abs(np.fft.rfft(steady * np.hanning(len(steady))))
            assert abs(np.argmax(spectrum) * 16000 / len(steady) - 1000) < 5     # still a 1 kHz tone
            assert 0.9 < np.sqrt(np.mean(steady ** 2)) / (0.5 / np.sqrt(2)) < 1.05
            folded = np.concatenate([np.array(c) for c in above_nyquist])[400:15600]
            assert np.sqrt(np.mean(folded ** 2)) < 0.01 * (0.5 / np.sqrt(2)), "12 kHz aliased into the 16 kHz audio"


# --- pasted tokens, where the server will not mint one -----------------------------------------

@needs_chromium
def test_page_asks_for_a_token_when_not_opened_on_loopback(gateway, tmp_path):
    """Opened by a host name (as after DNS rebinding, or on a LAN), the page gets no token from
    the server, asks for one, keeps it in sessionStorage only, and streams with it."""
    from playwright.sync_api import expect

    origin = f"http://harken.test:{gateway.settings.port}"
    extra = ["--host-resolver-rules=MAP harken.test 127.0.0.1",
             f"--unsafely-treat-insecure-origin-as-secure={origin}"]   # the microphone needs a secure origin
    with chromium(tmp_path / "profile", microphone(tmp_path), extra) as browser:
        page = browser.new_page()
        urls = watch_urls(page)
        page.goto(f"{origin}/?codec=pcm16#pair={pairing_secret(gateway.settings)}")
        expect(page.locator("#token-panel")).to_be_visible(timeout=10_000)
        expect(page.locator("#token-reason")).to_contain_text("localhost")
        screenshot(page, "web-page-token.png")

        page.get_by_label("Paste a token").fill("not-a-token")
        page.get_by_role("button", name="Use token").click()
        page.get_by_role("button", name=START).click()
        expect(page.locator("#token-panel")).to_be_visible(timeout=15_000)       # refused: asked again
        expect(page.locator("#token-reason")).to_contain_text("refused")
        assert page.evaluate("sessionStorage.getItem('harken.token')") is None

        token = mint_local_token(gateway.settings, "bob", 300)
        page.get_by_label("Paste a token").fill(token)
        page.get_by_role("button", name="Use token").click()
        expect(page.locator("#token-panel")).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('harken.token')") == token
        page.get_by_role("button", name=START).click()
        expect(page.locator("#status")).to_have_text("Listening (PCM16, 16 kHz).", timeout=15_000)
        page.get_by_role("button", name=STOP).click()
        expect(page.locator("#status")).to_have_text("Stopped.", timeout=15_000)
    assert not [u for u in urls if token in u or "not-a-token" in u]


# --- POST /v1/local/token -----------------------------------------------------------------------

async def test_local_token_from_loopback_is_short_lived_and_accepted(make_gateway):
    server = make_gateway()
    pairing = {PAIRING_HEADER: pairing_secret(server.settings)}
    async with httpx.AsyncClient(base_url=server.http, headers=pairing) as client:
        named = await client.post("/v1/local/token", json={"uid": "alice"})
        default = await client.post("/v1/local/token")
        bad = await client.post("/v1/local/token", json={"uid": "no spaces/or slashes"})
    assert named.status_code == 200 and default.status_code == 200
    assert named.headers["cache-control"] == "no-store"
    body = named.json()
    assert body["uid"] == "alice" and body["expires_in"] == WEB_TOKEN_TTL
    authenticator = LocalAuthenticator(server.settings)
    assert await authenticator.authenticate(body["token"]) == "alice"
    assert await authenticator.authenticate(default.json()["token"]) == "web-user"
    claims = jwt.decode(body["token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == WEB_TOKEN_TTL == 600
    assert bad.status_code == 400

    # The page's route: the minted token opens a session.
    async with websockets.connect(f"{server.base}/v4/web/listen?codec=pcm16&sample_rate=16000") as ws:
        await ws.send(json.dumps({"type": "auth", "token": body["token"]}))
        assert json.loads(await ws.recv()) == {"type": "auth_response", "success": True}


def token_app(tmp_path, **changes) -> Starlette:
    return Starlette(routes=web_routes(settings_for_test(tmp_path, **changes)))


async def ask_for_token(app, client=("127.0.0.1", 50123), host="127.0.0.1:8000", headers=None):
    transport = httpx.ASGITransport(app=app, client=client)
    async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as http:
        return await http.post("/v1/local/token", json={}, headers=headers or {})


@pytest.mark.parametrize("client,host", [
    (("127.0.0.1", 50123), "127.0.0.1:8000"),
    (("::1", 50123), "[::1]:8000"),
    (("::ffff:127.0.0.1", 50123), "localhost:8000"),
])
async def test_local_token_is_minted_for_every_loopback_form(tmp_path, client, host):
    app = token_app(tmp_path)
    secret = pairing_secret(settings_for_test(tmp_path))
    answer = await ask_for_token(app, client=client, host=host, headers={PAIRING_HEADER: secret})
    assert answer.status_code == 200 and answer.json()["token"]


REFUSALS = {
    "auth-none": ({"auth": "none"}, {}, "auth=local"),
    "bound-to-all-interfaces": ({"host": "0.0.0.0"}, {}, "loopback"),
    "remote-client": ({}, {"client": ("192.0.2.7", 50123)}, "loopback"),
    "through-a-proxy": ({}, {"headers": {"X-Forwarded-For": "192.0.2.7"}}, "proxy"),
    "rebinding-host-name": ({}, {"host": "attacker.example:8000"}, "localhost"),
}


@pytest.mark.parametrize("name", REFUSALS)
async def test_local_token_is_refused_off_loopback_or_without_local_auth(tmp_path, name):
    settings_changes, request, words = REFUSALS[name]
    answer = await ask_for_token(token_app(tmp_path, **settings_changes), **request)
    assert answer.status_code == 403
    message = answer.json()["error"]
    assert words in message
    assert "token" not in answer.json() and not list(tmp_path.rglob("*.pem"))   # nothing was minted
