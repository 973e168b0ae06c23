"""Custom vocabulary: ``/v1/users/transcription-preferences`` (upstream's shape) reaches every
engine that takes a list of terms: Deepgram ``keyterm``, Soniox ``context.terms``, Speechmatics
``additional_vocab`` (checked on the fakes' wire), and the embedded Whisper as hotwords (checked
on real speech: a rare word is right with the term and wrong without it). Speech seconds of
the usage record are checked here too, for the embedded engine and a cloud one.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np

from harken.client import listen_url, stream_messages
from harken.gateway.auth import mint_local_token
from harken.stt.decoding import Decoding
from harken.wer import normalize

from .conftest import load_audio
from .fakes.deepgram import FakeDeepgram
from .fakes.script import make_script, timecode
from .fakes.soniox import FakeSoniox
from .fakes.speechmatics import FakeSpeechmatics

KEY = "test-key"
ROUTE = "/v1/users/transcription-preferences"


def pcm_messages(pcm: np.ndarray, ms: int = 100) -> list[bytes]:
    step = 16 * ms
    return [pcm[i:i + step].tobytes() for i in range(0, len(pcm), step)]


def auth(server, uid: str) -> dict:
    return {"Authorization": f"Bearer {mint_local_token(server.settings, uid, 600)}"}


async def set_terms(server, uid: str, terms: list[str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
        return await client.patch(ROUTE, json={"vocabulary": terms}, headers=auth(server, uid))


async def stream(server, uid: str, pcm: np.ndarray, **params):
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, **params)
    return await stream_messages(url, pcm_messages(np.concatenate([pcm, np.zeros(16000, np.int16)])), 0.1,
                                 token=mint_local_token(server.settings, uid, 600), realtime=False,
                                 settle_seconds=5.0, max_wait=60)


def usage_totals(server, uid: str):
    future = asyncio.run_coroutine_threadsafe(server.gateway.store.usage_totals(uid), server.loop)
    return future.result(10)


async def test_preferences_in_upstreams_shape(make_gateway):
    server = make_gateway()
    async with httpx.AsyncClient(base_url=server.http, timeout=10) as client:
        alice, bob = auth(server, "alice"), auth(server, "bob")
        assert (await client.get(ROUTE)).status_code == 401
        empty = await client.get(ROUTE, headers=alice)
        assert empty.status_code == 200 and empty.json() == {"vocabulary": [], "single_language_mode": False}
        saved = await client.patch(ROUTE, json={"vocabulary": [" Omi ", "omi", "Kubernetes  cluster", ""]},
                                   headers=alice)
        assert saved.status_code == 200 and saved.json()["vocabulary"] == ["Omi", "Kubernetes cluster"]
        assert (await client.get(ROUTE, headers=alice)).json()["vocabulary"] == ["Omi", "Kubernetes cluster"]
        assert (await client.get(ROUTE, headers=bob)).json()["vocabulary"] == []       # per user
        # A PATCH of another preference keeps the vocabulary.
        other = await client.patch(ROUTE, json={"single_language_mode": True}, headers=alice)
        assert other.json()["vocabulary"] == ["Omi", "Kubernetes cluster"]
        for bad in ({"vocabulary": "Omi"}, {"vocabulary": [3]}, {"vocabulary": ["x" * 65]},
                    {"vocabulary": [f"term{i}" for i in range(101)]}, ["Omi"]):
            response = await client.patch(ROUTE, json=bad, headers=alice)
            assert response.status_code == 400 and response.json()["detail"], bad
        assert (await client.put(ROUTE, json={"vocabulary": []}, headers=alice)).json()["vocabulary"] == []


async def test_terms_reach_deepgram_soniox_and_speechmatics_on_the_wire(make_gateway):
    terms = ["Zyxelia", "Harken gateway", "Omi"]
    script = make_script(seed=2, duration=3.0)
    async with FakeDeepgram(script, key=KEY) as deepgram, FakeSoniox(script, key=KEY) as soniox, \
            FakeSpeechmatics(script, key=KEY) as speechmatics:
        server = make_gateway(deepgram_api_key=KEY, deepgram_url=deepgram.url, soniox_api_key=KEY,
                              soniox_url=soniox.url, speechmatics_api_key=KEY, speechmatics_url=speechmatics.url,
                              stt_chain="dg-nova-3,soniox,speechmatics,local")
        uid = f"vocab-{uuid.uuid4().hex[:6]}"
        assert (await set_terms(server, uid, terms)).status_code == 200
        for service in ("deepgram", "soniox", "speechmatics"):
            result = await stream(server, uid, timecode(0, 3 * 16000), stt_service=service)
            assert result.close_code == 1000 and result.segments, service
        # Without vocabulary, none of them is sent.
        await stream(server, "no-vocabulary", timecode(0, 16000), stt_service="deepgram")
    query = parse_qs(urlsplit(deepgram.accepted[0].request.path).query)
    assert query["keyterm"] == terms and query["model"] == ["nova-3"]
    assert "keyterm" not in parse_qs(urlsplit(deepgram.accepted[1].request.path).query)
    assert soniox.accepted[0].config["context"] == {"terms": terms}
    assert speechmatics.accepted[0].config["transcription_config"]["additional_vocab"] == [
        {"content": term} for term in terms]
    # A cloud engine's usage counts speech from its words' spans.
    totals = usage_totals(server, uid)
    assert 0 < totals.speech_seconds <= totals.audio_seconds


@contextlib.asynccontextmanager
async def every_reader_connection_held(server):
    """Every connection of the store's threaded engine checked out until the block ends, as a
    burst of REST reads (or reads slowed by a busy machine) would hold them: a read meanwhile waits."""
    test_loop = asyncio.get_running_loop()
    held = asyncio.Event()               # set on this loop once the server's loop holds them
    release = None                       # the server loop's event that ends the hold

    async def hold() -> None:
        nonlocal release
        release = asyncio.Event()
        engine = server.gateway.store.engine
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(engine.pool.size() + max(0, getattr(engine.pool, "_max_overflow", 0))):
                await stack.enter_async_context(engine.connect())
            test_loop.call_soon_threadsafe(held.set)
            await release.wait()

    holding = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(hold(), server.loop))
    await asyncio.wait({holding, asyncio.ensure_future(held.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if holding.done():
        holding.result()                 # it failed: say why
    try:
        yield
    finally:
        server.loop.call_soon_threadsafe(release.set)
        await holding


async def test_a_connect_reads_the_terms_with_its_conversation_not_from_a_reader_connection(make_gateway):
    """The terms are read in the transaction that opens the session's conversation (on the event
    loop, shared by the connects of a ramp), so a connect never waits for a connection of the
    store's threaded engine: with all of them busy, the session still opens, and the engine is
    given the terms. A read of their own made each connect queue for those connections, and each
    read took ~10 trips to a driver thread: on a busy machine 20 connects took 0.3-1 s each
    instead of ~40 ms (bench/bench_fairness.py), and with the connections taken the terms were
    lost after the pool's 30 s timeout."""
    terms = ["Zyxelia", "Harken gateway"]
    script = make_script(seed=3, duration=2.0)
    async with FakeDeepgram(script, key=KEY) as deepgram:
        server = make_gateway(deepgram_api_key=KEY, deepgram_url=deepgram.url, stt_chain="dg-nova-3,local")
        uid = f"vocab-{uuid.uuid4().hex[:6]}"
        assert (await set_terms(server, uid, terms)).status_code == 200
        async with every_reader_connection_held(server):
            result = await stream(server, uid, timecode(0, 2 * 16000), stt_service="deepgram")
        assert result.close_code == 1000 and result.segments
    assert parse_qs(urlsplit(deepgram.accepted[0].request.path).query)["keyterm"] == terms


async def test_a_rare_word_is_right_with_the_term_and_misheard_without_it(make_gateway):
    # Real speech (LibriVox, tests/data/audio/SOURCES.md): "... rather selfish is to be ill disposed".
    # Whisper tiny.en hears "old-sposed" unless "ill-disposed" is in the user's vocabulary.
    server = make_gateway()
    assert (await set_terms(server, "austen-reader", ["ill-disposed"])).status_code == 200
    with_term = await stream(server, "austen-reader", load_audio("ss_0890.wav"), language="en")
    without = await stream(server, "plain-reader", load_audio("ss_0890.wav"), language="en")
    heard_with, heard_without = (" ".join(normalize(r.transcript())) for r in (with_term, without))
    # "in", not "ends with": under a full suite's load one run's transcript ended "... is to be
    # ill-disposed. in the end." (session 24: words after the phrase, heard in the clip's tail);
    # what is tested is the term's word.
    assert "selfish is to be ill disposed" in heard_with, with_term.transcript()
    assert "selfish" in heard_without, without.transcript()
    # Without the term the same model mishears it: decoded whole, as a stream decodes (its encoder
    # window), it says "old-sposed". (Whether the gateway's own decode of the clip mishears depends
    # on where endpointing cuts it, so the contrast is shown on the whole-clip decode.)
    engine = server.gateway.providers["local"]
    pcm = load_audio("ss_0890.wav")
    window = server.gateway.settings.whisper_window_s
    plain, _, _ = await asyncio.to_thread(engine.decode_clip, pcm, Decoding("en", window_s=window))
    helped, _, _ = await asyncio.to_thread(engine.decode_clip, pcm,
                                           Decoding("en", (), ("ill-disposed",), window_s=window))
    plain_text, helped_text = (" ".join(normalize("".join(w[0] for w in words))) for words in (plain, helped))
    assert "ill disposed" not in plain_text and "ill disposed" in helped_text, (plain_text, helped_text)
    # The embedded engine's usage has its VAD's speech seconds (it was 0.00 before).
    totals = usage_totals(server, "austen-reader")
    assert 2.0 < totals.speech_seconds <= totals.audio_seconds
