"""Cloud providers through the whole gateway: a device streams to /v4/listen, the gateway talks
to protocol-faithful fake Deepgram/Soniox servers on loopback through the real SDKs."""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest

from harken.client import listen_url, stream_messages
from harken.gateway.auth import mint_local_token

from .fakes.deepgram import FakeDeepgram
from .fakes.script import Plan, make_script, timecode
from .fakes.soniox import FakeSoniox

pytestmark = pytest.mark.timeout(120)
KEY = "test-key"


def words_of(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def pcm_messages(pcm: np.ndarray, ms: int = 100) -> list[bytes]:
    step = 16 * ms
    return [pcm[i:i + step].tobytes() for i in range(0, len(pcm), step)]


async def test_deepgram_dies_mid_stream_and_soniox_continues_without_a_hole(make_gateway):
    script = make_script(seed=11, duration=20.0)
    async with FakeDeepgram(script, key=KEY) as deepgram, FakeSoniox(script, key=KEY) as soniox:
        deepgram.plans.append(Plan(fail_at=9.0, kind="close"))     # 1011 NET-0001 mid-stream
        server = make_gateway(deepgram_api_key=KEY, deepgram_url=deepgram.url, soniox_api_key=KEY,
                              soniox_url=soniox.url, stt_chain="dg-nova-3,soniox,local", stt_retry_base=0.05)
        token = mint_local_token(server.settings, f"cloud-{uuid.uuid4().hex[:6]}", 600)
        url = listen_url(server.base, codec="pcm16", sample_rate=16000)
        result = await stream_messages(url, pcm_messages(timecode(0, 20 * 16000)), 0.1, token=token,
                                       realtime=False, settle_seconds=2.0)
    switched = [e for e in result.events if e.get("status") == "stt_switched"]
    assert switched and switched[0]["provider"] == "soniox" and switched[0]["previous_provider"] == "deepgram"
    providers = {s["stt_provider"] for s in result.segments.values()}
    assert providers == {"deepgram", "soniox"}
    heard = [w for s in result.ordered() for w in words_of(s["text"])]
    assert heard == [w for word in script for w in words_of(word.text)]   # nothing lost, nothing doubled
    # Times stay on the audio clock across the switch (the first word anchors 0.0).
    first = result.ordered()[0]
    assert abs(first["start"]) < 0.05
    last = result.ordered()[-1]
    assert abs((last["end"] - first["start"]) - (script[-1].end - script[0].start)) < 0.1


async def test_all_providers_down_sends_stt_failed_then_1011(make_gateway):
    script = make_script(seed=5, duration=5.0)
    async with FakeDeepgram(script, key=KEY) as deepgram:
        deepgram.plans.extend([Plan(handshake=401)])
        # German without the multilingual model: the embedded tiny.en engine cannot take over, so
        # Deepgram is the whole chain.
        server = make_gateway(deepgram_api_key=KEY, deepgram_url=deepgram.url, stt_chain="dg-nova-3",
                              stt_retry_base=0.05, whisper_multilingual_model="")
        token = mint_local_token(server.settings, f"cloud-{uuid.uuid4().hex[:6]}", 600)
        url = listen_url(server.base, codec="pcm16", sample_rate=16000, language="de")
        result = await stream_messages(url, pcm_messages(timecode(0, 16000)), 0.1, token=token,
                                       realtime=False, settle_seconds=1.0)
    failed = [e for e in result.events if e.get("status") == "stt_failed"]
    assert failed and "retry_after" in failed[0] and "retryable" in failed[0]
    assert result.close_code == 1011
    assert len(deepgram.accepted) == 0                          # a bad key is not retried


