"""Phone-call audio: channel-prefixed messages, one STT stream per channel, words labelled with the
channel's speaker (the owner's microphone is channel 1, ``is_user``), merged into one conversation."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import numpy as np
import orjson
import pytest
import soxr

from harken.client import device_messages, listen_url, stream_messages
from harken.codecs import (
    ChannelDemuxDecoder,
    DecodeError,
    decoder_for,
    uses_channel_prefix,
)
from harken.codecs.pcm import PCMDecoder
from harken.gateway.app_schema import check_server_message
from harken.gateway.auth import mint_local_token
from harken.wer import normalize, word_errors

from .conftest import load_audio, transcripts

pytestmark = pytest.mark.timeout(300)


def prefixed(channel_id: int, pcm: np.ndarray) -> bytes:
    return bytes([channel_id]) + pcm.astype("<i2").tobytes()


# -- framing (pure) --------------------------------------------------------------------------------
def test_the_prefix_is_used_where_upstreams_clients_use_it_and_stereo_stays_interleaved():
    assert uses_channel_prefix("pcm", 2, "phone_call")          # the app's phone-call recorder
    assert uses_channel_prefix("pcm", 2, "omi")                 # codec=pcm with 2 channels
    assert uses_channel_prefix("opus", 2, "phone_call") and uses_channel_prefix("pcm16", 2, "desktop")
    assert not uses_channel_prefix("pcm16", 2, "omi")           # interleaved stereo, as before
    assert not uses_channel_prefix("pcm", 1, "phone_call")
    assert isinstance(decoder_for("pcm", 48000, 2, "phone_call"), ChannelDemuxDecoder)
    assert isinstance(decoder_for("pcm16", 16000, 2, "omi"), PCMDecoder)


def test_channels_are_split_aligned_and_mixed():
    decoder = decoder_for("pcm", 16000, 2, "phone_call")
    decoder.keep_channels = True
    mic, remote = np.full(160, 1000, np.int16), np.full(160, -300, np.int16)
    assert len(decoder.decode(prefixed(1, mic))) == 0            # channel 2 has nothing yet
    mixed = decoder.decode(prefixed(2, remote))
    assert mixed.tolist() == [700] * 160                         # summed, as upstream mixes
    first, second = decoder.take_channels()
    assert first.tolist() == mic.tolist() and second.tolist() == remote.tolist()
    assert [len(c) for c in decoder.take_channels()] == [0, 0]


def test_an_unknown_channel_or_an_empty_message_is_a_decode_error():
    decoder = decoder_for("pcm", 16000, 2, "phone_call")
    with pytest.raises(DecodeError):
        decoder.decode(prefixed(3, np.zeros(160, np.int16)))
    with pytest.raises(DecodeError):
        decoder.decode(b"\x01")


def test_a_silent_leg_is_filled_so_the_other_is_not_held_back():
    decoder = decoder_for("pcm", 16000, 2, "phone_call")
    decoder.keep_channels = True
    out = [decoder.decode(prefixed(1, np.full(1600, 500, np.int16))) for _ in range(12)]   # 1.2 s, leg 2 mute
    assert sum(map(len, out)) >= 1600                            # held back at most ~1 s
    first, second = decoder.take_channels()
    assert len(first) == len(second) and not second.any()
    tail = decoder.flush()
    assert sum(map(len, out)) + len(tail) == 12 * 1600


def test_each_channel_has_its_own_opus_decoder():
    from harken.codecs.encode import encode_for_device

    speech = load_audio("goforward.wav")
    packets = encode_for_device(speech, "opus", 16000)
    decoder = decoder_for("opus", 16000, 2, "phone_call")
    decoder.keep_channels = True
    for packet in packets:                     # the same call on both legs, packets interleaved
        decoder.decode(bytes([1]) + packet)
        decoder.decode(bytes([2]) + packet)
    first, second = decoder.take_channels()
    assert np.array_equal(first, second) and len(first) == 160 * len(packets)


def test_three_or_more_channels_are_prefixed_legs_each_its_own_speaker():
    """Upstream refuses no channel count; Harken gives each further leg its own speaker."""
    assert uses_channel_prefix("opus", 3, "omi") and uses_channel_prefix("pcm16", 8, None)
    decoder = decoder_for("pcm16", 16000, 3, "omi")
    assert [(c.channel_id, c.is_user, c.speaker) for c in decoder.layout] == [(1, True, 0), (2, False, 1), (3, False, 2)]
    decoder.keep_channels = True
    legs = [np.full(160, level, np.int16) for level in (1000, -300, 200)]
    assert [len(decoder.decode(prefixed(k + 1, leg))) for k, leg in enumerate(legs)] == [0, 0, 160]
    assert [c.tolist() for c in decoder.take_channels()] == [leg.tolist() for leg in legs]
    with pytest.raises(DecodeError):
        decoder.decode(prefixed(4, np.zeros(160, np.int16)))


# -- a call through a running server ------------------------------------------------------------
def _reference(name: str) -> str:
    return next(row["reference"] for row in transcripts() if row["file"] == name)


def two_party_call() -> tuple[np.ndarray, np.ndarray, str, str]:
    """Two read-speech speakers taking turns, one per leg, at 16 kHz: the owner (LibriVox reader
    of ss_*) on the microphone, another speaker (goforward, cards: CMU recordings) on the remote
    leg; each leg is silent while the other speaks, as the two legs of a call are."""
    owner_turns, remote_turns = ["ss_0880.wav", "ss_0930.wav"], ["goforward.wav", "cards_005.wav"]
    mic, remote = [], []
    pause = np.zeros(16000, np.int16)
    for own, other in zip(owner_turns, remote_turns):
        a, b = load_audio(own), load_audio(other)
        mic += [a, pause, np.zeros(len(b), np.int16), pause]
        remote += [np.zeros(len(a), np.int16), pause, b, pause]
    return (np.concatenate(mic), np.concatenate(remote), " ".join(map(_reference, owner_turns)),
            " ".join(map(_reference, remote_turns)))


async def call_through(gateway, messages: list[bytes], seconds: float, **params):
    """Stream a call's channel-prefixed messages in real time as a new user (``codec=pcm``,
    ``source=phone_call``); returns the client's result and the user's stored conversations once
    the session has ended."""
    uid = f"caller-{uuid.uuid4().hex[:8]}"
    token = mint_local_token(gateway.settings, uid, 600)
    url = listen_url(gateway.base, source="phone_call", uid=uid, codec="pcm", language="en", **params)
    result = await stream_messages(url, messages, seconds, token=token, realtime=True, settle_seconds=3.0,
                                   max_wait=120)
    assert result.close_code == 1000, (result.close_code, result.close_reason)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while gateway.call(lambda: len(gateway.gateway.sessions)) and loop.time() < deadline:
        await asyncio.sleep(0.2)
    async with httpx.AsyncClient(base_url=gateway.http, timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        return result, (await client.get("/v1/conversations")).json()


async def test_a_two_channel_call_labels_each_partys_words_and_the_owner_is_the_user(gateway):
    mic, remote, owner_text, remote_text = two_party_call()
    # As the app's phone-call recorder sends it: 48 kHz 16-bit PCM, 20 ms per message and leg.
    rate, step = 48000, 960
    mic48, remote48 = (soxr.resample(x, 16000, rate).astype(np.int16) for x in (mic, remote))
    messages = []
    for i in range(0, len(mic48), step):
        messages += [prefixed(0x01, mic48[i:i + step]), prefixed(0x02, remote48[i:i + step])]
    # In real time (16 s), as a call comes: the engine then keeps up even on a loaded machine.
    result, conversations = await call_through(gateway, messages, 0.01, sample_rate=rate, channels=2,
                                               call_id="1765000000000")
    assert len(conversations) == 1                          # both legs in one conversation
    stored = conversations[0]
    segments = sorted(stored["transcript_segments"], key=lambda s: s["start"])

    by_speaker: dict[str, list[str]] = {}
    for segment in segments:
        assert segment["is_user"] == (segment["speaker"] == "SPEAKER_00"), segments
        by_speaker.setdefault(segment["speaker"], []).append(segment["text"])
    assert set(by_speaker) == {"SPEAKER_00", "SPEAKER_01"}
    owner_said, remote_said = " ".join(by_speaker["SPEAKER_00"]), " ".join(by_speaker["SPEAKER_01"])
    errors, words = word_errors(owner_text, owner_said)
    assert errors / words <= 0.25, [(s["speaker"], round(s["start"], 2), round(s["end"], 2), s["text"]) for s in segments]
    errors, words = word_errors(remote_text, remote_said)
    assert errors / words <= 0.25, remote_said
    # Nothing of one party's words in the other's segments.
    assert not set(normalize(remote_said)) & {"he", "amiable", "disposed"}, remote_said
    assert not set(normalize(owner_said)) & {"forward", "clubs", "spades"}, owner_said
    # Merged in time: the turns alternate owner, remote, owner, remote.
    turns = [s["speaker"] for s in segments]
    collapsed = [t for i, t in enumerate(turns) if i == 0 or t != turns[i - 1]]
    assert collapsed == ["SPEAKER_00", "SPEAKER_01", "SPEAKER_00", "SPEAKER_01"], turns
    # The live segments the app got say the same.
    live = list(result.segments.values())
    assert live and all(s["is_user"] == (s["speaker"] == "SPEAKER_00") for s in live)
    # Every frame of the call is one the app's Dart models parse (the conformance suite's schema).
    frames = [orjson.dumps(event).decode() for event in result.events]
    frames += [orjson.dumps([update.segment]).decode() for update in result.updates]
    problems = [problem for frame in frames for problem in check_server_message(frame)]
    assert not problems, problems[:5]


async def test_a_three_leg_call_gives_each_leg_its_own_speaker(gateway):
    """``channels=3``: a leg each for the owner, the other party and a third caller, taking turns;
    each leg's words carry its own speaker, only the owner's are the user's."""
    legs = [load_audio(name) for name in ("ss_0880.wav", "goforward.wav", "espeak_03.wav")]
    pause = np.zeros(16000, np.int16)
    tracks: list[list[np.ndarray]] = [[], [], []]
    for turn, clip in enumerate(legs):            # one speaks, the other two are silent
        for leg in range(3):
            tracks[leg] += [clip if leg == turn else np.zeros(len(clip), np.int16), pause]
    audio = np.stack([np.concatenate(track) for track in tracks], axis=1)
    messages, seconds = device_messages(audio, "pcm", 16000, channels=3)
    _, (conversation,) = await call_through(gateway, messages, seconds, sample_rate=16000, channels=3)
    said: dict[str, set[str]] = {}
    for segment in conversation["transcript_segments"]:
        assert segment["is_user"] == (segment["speaker"] == "SPEAKER_00"), segment
        said.setdefault(segment["speaker"], set()).update(normalize(segment["text"]))
    assert set(said) == {"SPEAKER_00", "SPEAKER_01", "SPEAKER_02"}, said
    assert {"young", "man"} <= said["SPEAKER_00"] and "forward" in said["SPEAKER_01"], said
    # The third leg is a synthetic voice; Whisper hears "lights" or "light" depending on the
    # silence around it, and either names the leg.
    assert "kitchen" in said["SPEAKER_02"] and said["SPEAKER_02"] & {"light", "lights"}, said
    assert not said["SPEAKER_02"] & {"young", "forward"} and not said["SPEAKER_00"] & {"kitchen", "forward"}
