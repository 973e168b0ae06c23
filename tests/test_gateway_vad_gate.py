"""The VAD gate in real sessions: a device streams real speech with long pauses to /v4/listen,
the gateway talks to a protocol-faithful fake Deepgram on loopback through the real SDK.

The fake hears a known recording (``fakes.recording``): it finds every stretch it is sent in the
recording and reports the scripted words it heard, timed on the audio it was sent, as Deepgram
does. So the same recording streamed with the gate off and on must give the same words at the
same times, while the fake is sent only the speech (plus the gate's pre-roll and hang-over).
"""

from __future__ import annotations

import functools
import re
import uuid

import numpy as np
import pytest

from harken.client import listen_url, stream_messages
from harken.gateway.auth import mint_local_token
from harken.stt import gating

from .conftest import load_audio, transcripts
from .fakes.deepgram import FakeDeepgram
from .fakes.recording import Joined, speech_with_pauses

pytestmark = pytest.mark.timeout(180)
KEY = "test-key"
FILES = ["ss_0870.wav", "ss_0880.wav", "ss_0890.wav", "ss_0920.wav", "ss_0930.wav", "goforward.wav"]
PAUSE = 8.0                   # seconds of quiet noise after each utterance
PREROLL, IDLE = 0.3, 4.0      # the gate's (Omi's): sent before the speech, and after it until it closes
TIME_TOLERANCE = 0.1


@functools.cache
def recording(files: tuple[str, ...] = tuple(FILES)) -> Joined:
    reference = {row["file"]: row["reference"] for row in transcripts()}
    return speech_with_pauses([(load_audio(name), reference[name]) for name in files], PAUSE)


def words_of(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


async def stream(server, joined: Joined, vad_gate: str | None):
    token = mint_local_token(server.settings, f"gate-{uuid.uuid4().hex[:6]}", 600)
    url = listen_url(server.base, codec="pcm16", sample_rate=16000, vad_gate=vad_gate)
    step = 1600                                                     # 100 ms messages
    messages = [joined.recording[i:i + step].tobytes() for i in range(0, joined.recording.size, step)]
    # A generous settle: on a busy machine the gateway may lag behind a client this fast.
    return await stream_messages(url, messages, 0.1, token=token, realtime=False, settle_seconds=4.0)


async def test_gate_sends_only_speech_and_keeps_words_and_times(make_gateway):
    joined = recording()
    async with FakeDeepgram(joined.script, key=KEY, recording=joined.recording) as deepgram:
        # The setting turns the gate on; the parameter turns it off for one connection.
        server = make_gateway(deepgram_api_key=KEY, deepgram_url=deepgram.url, stt_chain="dg-nova-3",
                              vad_gate="active")
        plain = await stream(server, joined, "off")
        gated = await stream(server, joined, None)
    ungated_connection, gated_connection = deepgram.accepted

    # What the provider was sent: everything, then only speech plus pre-roll and hang-over.
    assert abs(ungated_connection.listener.now - joined.seconds) < 0.2
    expected = sum(end - start + PREROLL + IDLE for start, end in joined.speech)
    received = gated_connection.listener.now
    share = 1 - received / joined.seconds
    print(f"\n{joined.seconds:.1f} s streamed, {received:.1f} s sent to the provider with the gate "
          f"(expected {expected:.1f} s from the speech spans): {share:.0%} removed")
    assert abs(received - expected) < 0.5 * len(FILES), (received, expected)
    # Each pause cut the audio once the gate closed, and each utterance was finalized.
    assert gated_connection.listener.discontinuities == len(FILES) - 1
    assert gated_connection.listener.unmatched == 0
    assert gated_connection.controls["Finalize"] >= len(FILES)
    assert ungated_connection.controls["Finalize"] == 0

    # The transcript is unchanged and whole.
    script_words = [w for word in joined.script for w in words_of(word.text)]
    plain_words = [w for s in plain.ordered() for w in words_of(s["text"])]
    gated_words = [w for s in gated.ordered() for w in words_of(s["text"])]
    assert plain_words == script_words
    assert gated_words == script_words
    assert plain.close_code == gated.close_code == 1000

    # Times: the same segments at the same times (within 100 ms) on the session's audio clock.
    plain_segments, gated_segments = plain.ordered(), gated.ordered()
    assert [s["text"] for s in gated_segments] == [s["text"] for s in plain_segments]
    worst = max(max(abs(g["start"] - p["start"]), abs(g["end"] - p["end"]))
                for g, p in zip(gated_segments, plain_segments))
    print(f"{len(gated_segments)} segments; largest time difference gated vs ungated {worst * 1000:.0f} ms")
    assert worst <= TIME_TOLERANCE
    # ...although the provider's own times were compressed by the cuts: the gate mapped them back.
    assert gated_connection.listener.to_received(int(joined.script[-1].start * 16000)) / 16000 \
        < joined.script[-1].start - PAUSE


async def test_a_failing_vad_lets_everything_through_and_the_session_goes_on(make_gateway, monkeypatch):
    class BrokenVAD:
        def __init__(self, model=None):
            pass

        def process(self, pcm: np.ndarray) -> np.ndarray:
            raise RuntimeError("onnxruntime fell over")

    monkeypatch.setattr(gating, "StreamingVAD", BrokenVAD)
    joined = recording(tuple(FILES[:2]))
    async with FakeDeepgram(joined.script, key=KEY, recording=joined.recording) as deepgram:
        server = make_gateway(deepgram_api_key=KEY, deepgram_url=deepgram.url, stt_chain="dg-nova-3")
        result = await stream(server, joined, "active")
    (connection,) = deepgram.accepted
    assert abs(connection.listener.now - joined.seconds) < 0.2         # nothing held back
    assert connection.listener.discontinuities == 0
    assert [w for s in result.ordered() for w in words_of(s["text"])] == \
        [w for word in joined.script for w in words_of(word.text)]
    assert result.close_code == 1000
