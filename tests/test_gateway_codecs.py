"""Every codec end to end through a live session: real encoders frame audio as devices do, the
gateway decodes it, and bad frames are dropped and counted without hurting the session."""

from __future__ import annotations

import asyncio
import json
import random
import uuid

import httpx

import numpy as np
import pytest
import websockets

from harken.client import device_messages, listen_url, stream_messages
from harken.gateway.auth import mint_local_token
from harken.native import opus_reader
from harken.wer import word_errors

from .conftest import load_audio, transcripts

pytestmark = pytest.mark.timeout(300)

CODECS = [("pcm16", 16000), ("pcm16", 8000), ("pcm8", 8000), ("opus", 16000), ("opus_fs320", 16000), ("aac", 16000),
          ("lc3", 16000), ("lc3_fs1030", 16000), ("opus", 48000), ("pcm16", 44100)]


@pytest.fixture(scope="module")
def development_set():
    """The development set's real recordings joined with 1 s pauses. The five espeak sentences
    are left out: tiny.en decodes synthetic speech differently on any perturbation (a 150 ms
    longer pre-roll moved lc3_fs1030 from 2 to 8 words above pcm16, all but one of them in
    those sentences), so they measured the model's whims, not the codecs."""
    rows = [r for r in transcripts() if r["set"] == "real"]
    gap = np.zeros(16000, np.int16)
    pcm = np.concatenate([x for r in rows for x in (load_audio(r["file"]), gap)] + [gap])
    return pcm, " ".join(r["reference"] for r in rows)


def vad_silence_ms() -> int:
    from harken.config import Settings

    return Settings().endpoint_silence_ms


def fresh_token(server, prefix: str) -> str:
    """A token for a new user, so that no run resumes (and merges into) another's conversation."""
    return mint_local_token(server.settings, f"{prefix}-{uuid.uuid4().hex[:8]}", 600)


async def stored_transcript(server, token: str, wait: float = 60) -> str:
    """The user's conversation as stored, once the server has finished that user's sessions.

    A client streaming faster than real time finishes long before the engine does; the session's
    teardown still decodes everything it received and stores it, so reading the store after the
    session ended measures the codec path without depending on how loaded the machine is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while server.call(lambda: len(server.gateway.sessions)) and loop.time() < deadline:
        await asyncio.sleep(0.2)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.http, timeout=10, headers=headers) as client:
        listing = (await client.get("/v1/conversations")).json()
        conversations = listing["conversations"] if isinstance(listing, dict) else listing
        assert len(conversations) == 1
        stored = (await client.get(f"/v1/conversations/{conversations[0]['id']}")).json()
    return " ".join(s["text"] for s in sorted(stored["transcript_segments"], key=lambda s: s["start"]))


async def transcribe_with(server, pcm, codec, rate):
    messages, seconds = device_messages(pcm, codec, rate)
    url = listen_url(server.base, codec=codec, sample_rate=rate)
    token = fresh_token(server, "codec")
    result = await stream_messages(url, messages, seconds, token=token, realtime=False, settle_seconds=1.0)
    return result, await stored_transcript(server, token)


@pytest.mark.slow
async def test_every_codec_transcribes_within_a_few_points_of_pcm16(make_gateway, development_set):
    # Utterances end only by the VAD's silence (no pause decodes, no provisional text): those
    # depend on how busy the engine is at that moment, so on a loaded machine the same audio was
    # cut differently from run to run, and pcm16 itself moved between 7.5 and 10.1 % WER.
    gateway = make_gateway(endpoint_pause_ms=vad_silence_ms(), partial_interval=0)
    pcm, reference = development_set
    words = len(reference.split())
    wers = {}
    for codec, rate in CODECS:
        result, transcript = await transcribe_with(gateway, pcm, codec, rate)
        assert result.close_code == 1000, (codec, result.close_code, result.close_reason)
        wers[(codec, rate)] = word_errors(reference, transcript)[0] / words
    print({f"{c}@{r}": round(w, 3) for (c, r), w in wers.items()})
    for (codec, rate), wer in wers.items():
        # 8 kHz audio carries no band above 4 kHz, so 8 kHz codecs are held to 16-bit PCM at
        # the same 8 kHz. This is an end-to-end check that every codec path works (a broken one
        # is tens of points off), not the codecs' accuracy figure (bench/bench_codecs.py): tiny.en
        # moves a few words on any perturbation of the audio ("ill-disposed" heard as "old
        # sposed", "clubs" as "close"). History: with the five espeak sentences in the set, the
        # others within 4 points of 159 words until a 150 ms longer pre-roll put lc3_fs1030 8
        # words above pcm16, 7 of them in those sentences. On the real 96 words alone, that run:
        # pcm16 8 errors, every 16 kHz codec 6-8, 8-bit pcm8 9 against pcm16 at 8 kHz's 3. So
        # every codec is held to 10 words (10.4 points) above its baseline.
        baseline = wers[("pcm16", 8000)] if rate == 8000 else wers[("pcm16", 16000)]
        margin = 10 / words
        assert wer <= baseline + margin, ((codec, rate), wer, baseline)


def garbage_messages(rng: random.Random, count: int) -> list[bytes]:
    kinds = [
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(3, 200))),      # random bytes
        lambda: b"\xff" * rng.randint(3, 40),                                       # invalid TOC / sync words
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1000, 60000))), # huge frames
    ]
    return [rng.choice(kinds)() for _ in range(count)]


@pytest.mark.parametrize("codec", ["opus", "opus_fs320", "aac", "lc3", "lc3_fs1030", "pcm16"])
async def test_garbage_mixed_into_a_live_stream_is_dropped_and_the_session_goes_on(gateway, codec):
    rng = random.Random(codec)
    speech = np.concatenate([load_audio("goforward.wav"), np.zeros(16000, np.int16)])
    valid, seconds = device_messages(speech, codec, 16000)
    mixed = []
    for message in valid:
        mixed.append(message)
        if rng.random() < 0.15:
            garbage = garbage_messages(rng, 1)[0]
            if codec == "pcm16":
                # Raw PCM has no framing to check: garbage is audio (noise) to it, so here it is a
                # click of at most 12 ms of whole samples (a stray odd byte would shift every later
                # sample: the decoder carries partial samples for clients that cut a file anywhere).
                garbage = garbage[:400]
                garbage = garbage[: len(garbage) - len(garbage) % 2]
            mixed.append(garbage)
    url = listen_url(gateway.base, codec=codec, sample_rate=16000)
    token = fresh_token(gateway, "fuzzer")
    result = await stream_messages(url, mixed, seconds, token=token, realtime=False, settle_seconds=1.0)
    assert result.close_code == 1000
    transcript = await stored_transcript(gateway, token)
    errors, words = word_errors("go forward ten meters", transcript)
    assert errors <= 2, (codec, transcript)


async def test_only_garbage_reports_decode_errors_once(make_gateway):
    server = make_gateway(decode_error_report_after=0.5)
    url = listen_url(server.base, codec="opus", sample_rate=16000)
    headers = {"Authorization": f"Bearer {fresh_token(server, 'garbage-only')}"}
    statuses = []
    async with websockets.connect(url, additional_headers=headers) as ws:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while loop.time() - start < 2.0:                     # bounded: ~40 garbage packets
            await ws.send(b"\xff\xff\xff\xff" + bytes(40))
            try:
                while True:
                    raw = await asyncio.wait_for(ws.recv(), 0.05)
                    if raw != "ping":
                        event = json.loads(raw)
                        if event.get("type") == "service_status":
                            statuses.append(event)
            except TimeoutError:
                pass
        assert ws.close_code is None                          # the session is still there
        count = server.call(lambda: sum(s.stats.decode_errors for s in server.gateway.sessions))
    warnings = [s for s in statuses if s["status"] == "decode_errors"]
    assert len(warnings) == 1
    assert count >= 20


async def session_figures(server, messages: list[bytes]) -> dict:
    """Stream ``messages`` into one open session (null provider) and read its counters once
    every message has been seen, before the session ends."""
    url = listen_url(server.base, codec="opus", sample_rate=16000, stt_service="null")
    headers = {"Authorization": f"Bearer {fresh_token(server, 'paths')}"}

    def figures() -> dict | None:
        sessions = list(server.gateway.sessions)
        if not sessions:
            return None
        session = sessions[0]
        if session._reader is not None:
            session._take_native()           # what the reader holds of the last piece
        stats = session.stats
        return {"messages": stats.messages, "audio_bytes": stats.audio_bytes, "keepalives": stats.keepalives,
                "decode_errors": stats.decode_errors, "samples": session.clock.samples + session._pending_samples,
                "native": session._reader is not None}

    async with websockets.connect(url, additional_headers=headers) as ws:
        for message in messages:
            await ws.send(message)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline:
            seen = server.call(figures)
            if seen is not None and seen["messages"] == len(messages):
                return seen
            await asyncio.sleep(0.05)
    raise AssertionError(f"the session saw {seen} of {len(messages)} messages")


@pytest.mark.skipif(opus_reader is None, reason="the native reader is not built")
async def test_a_session_counts_and_decodes_the_same_with_the_native_reader_and_without(make_gateway):
    rng = random.Random(5)
    valid, _ = device_messages(load_audio("goforward.wav"), "opus", 16000)
    messages = []
    for message in valid:
        messages.append(message)
        if rng.random() < 0.1:
            messages.append(rng.choice([b"\x8a\x00", b"\xff" * 12, bytes([0x43, 0x00]) + bytes(9)]))
    native = await session_figures(make_gateway(null_provider=True), messages)
    python = await session_figures(make_gateway(null_provider=True, native_audio=False), messages)
    assert native.pop("native") and not python.pop("native")
    assert native == python
    assert native["decode_errors"] > 0 and native["keepalives"] > 0
    assert native["samples"] == 160 * len(valid)
