"""Each cloud provider client, driven through its real SDK against a protocol-faithful fake on
127.0.0.1: clean transcripts, the options on the wire, controls, and the errors a session meets."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

from harken.config import Settings
from harken.stt import StreamConfig, Word
from harken.stt import deepgram as deepgram_module
from harken.stt import soniox as soniox_module
from harken.stt.deepgram import DeepgramProvider, parse_message
from harken.stt.word_queue import StreamFailure, retryable_status
from harken.stt.soniox import SonioxProvider, TokenJoiner
from harken.stt.speechmatics import UNKNOWN_SPEAKER, SpeechmaticsProvider, parse_transcript

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .fakes.deepgram import FakeDeepgram
from .fakes.script import Plan, ScriptWord, make_script, play, timecode
from .fakes.soniox import FakeSoniox
from .fakes.speechmatics import FakeSpeechmatics

KEY = "test-key"
PROVIDERS = {
    "deepgram": (FakeDeepgram, DeepgramProvider),
    "soniox": (FakeSoniox, SonioxProvider),
    "speechmatics": (FakeSpeechmatics, SpeechmaticsProvider),
}


def provider_for(name: str, fake) -> object:
    _, provider_class = PROVIDERS[name]
    return provider_class(Settings(**{f"{name}_api_key": KEY, f"{name}_url": fake.url}))


def assert_transcript(words: list[Word], script: list[ScriptWord], tolerance: float = 0.05) -> None:
    assert [w.text for w in words] == [s.text for s in script]
    for word, expected in zip(words, script):
        assert abs(word.start - expected.start) <= tolerance, (word, expected)
        assert abs(word.end - expected.end) <= tolerance, (word, expected)


def with_speakers(script: list[ScriptWord], speakers: list[int]) -> list[ScriptWord]:
    return [ScriptWord(w.text, w.start, w.end, speakers[i % len(speakers)], w.confidence) for i, w in enumerate(script)]


# --- clean streams -----------------------------------------------------------------------------

@pytest.mark.timeout(20)
@pytest.mark.parametrize("name", list(PROVIDERS))
async def test_clean_stream_gives_exactly_the_scripted_words(name):
    script = make_script(seed=7, duration=20.0, speakers=3)
    assert {w.speaker for w in script} >= {0, 1}
    fake_class, _ = PROVIDERS[name]
    async with fake_class(script) as fake:
        provider = provider_for(name, fake)
        stream = await provider.open(StreamConfig(language="en"))
        played = await play(stream, 20.0)
        await provider.aclose()
    assert played.error is None
    assert_transcript(played.words, script)
    assert [w.speaker for w in played.words] == [s.speaker for s in script]
    assert fake.discontinuities() == 0 and len(fake.accepted) == 1


@pytest.mark.timeout(20)
async def test_speechmatics_drops_low_confidence_words_and_maps_unknown_speakers():
    script = with_speakers(make_script(seed=3, duration=15.0), [0, 1, -1])
    script = [ScriptWord(w.text, w.start, w.end, w.speaker, 0.3 if i % 5 == 4 else 0.9)
              for i, w in enumerate(script)]
    async with FakeSpeechmatics(script) as fake:
        played = await play(await provider_for("speechmatics", fake).open(StreamConfig(language="en")), 15.0)
    kept = [w for w in script if w.confidence >= 0.4]
    assert len(kept) < len(script)
    assert_transcript(played.words, kept)
    assert [w.speaker for w in played.words] == [UNKNOWN_SPEAKER if s.speaker < 0 else s.speaker for s in kept]


# --- options on the wire -------------------------------------------------------------------

@pytest.mark.timeout(10)
async def test_deepgram_connects_with_omis_options_and_ends_with_close_stream():
    script = make_script(seed=1, duration=3.0)
    async with FakeDeepgram(script) as fake:
        config = StreamConfig(language="zh", extra={"model": "nova-2-general"})
        stream = await provider_for("deepgram", fake).open(config)
        played = await play(stream, 3.0)
    request = fake.connections[0].request
    query = {k: v[-1] for k, v in parse_qs(urlsplit(request.path).query).items()}
    assert urlsplit(request.path).path == "/v1/listen"
    assert request.headers["Authorization"] == f"Token {KEY}"
    assert query == {
        "model": "nova-2-general", "language": "zh", "encoding": "linear16", "sample_rate": "16000",
        "channels": "1", "punctuate": "true", "smart_format": "true", "diarize": "true", "endpointing": "300",
        "interim_results": "false", "profanity_filter": "false", "no_delay": "true", "filler_words": "false",
    }
    assert fake.connections[0].controls["CloseStream"] == 1
    assert fake.connections[0].controls["empty_frame"] == 0      # never the legacy zero-length close
    assert_transcript(played.words, script)


@pytest.mark.timeout(10)
async def test_soniox_sends_its_config_as_the_first_message():
    async with FakeSoniox(make_script(seed=1, duration=2.0)) as fake:
        await play(await provider_for("soniox", fake).open(StreamConfig(language="pt-BR", session_id="s1")), 2.0)
    connection = fake.connections[0]
    assert connection.request.headers["Authorization"] == f"Bearer {KEY}"
    assert connection.config == {
        "model": "stt-rt-v5", "audio_format": "pcm_s16le", "sample_rate": 16000, "num_channels": 1,
        "language_hints": ["pt"], "enable_speaker_diarization": True, "enable_endpoint_detection": True,
        "max_endpoint_delay_ms": 500, "client_reference_id": "s1",
    }


@pytest.mark.timeout(10)
async def test_soniox_multi_sends_no_language_hint():
    async with FakeSoniox(make_script(seed=1, duration=1.0)) as fake:
        await play(await provider_for("soniox", fake).open(StreamConfig(language="multi")), 1.0)
    assert "language_hints" not in fake.connections[0].config


@pytest.mark.timeout(10)
async def test_speechmatics_starts_recognition_like_omi_at_16khz_and_ends_with_end_of_stream():
    async with FakeSpeechmatics(make_script(seed=1, duration=2.0)) as fake:
        played = await play(await provider_for("speechmatics", fake).open(StreamConfig(language="de-CH")), 2.0)
    start = fake.connections[0].config
    assert start["audio_format"] == {"type": "raw", "encoding": "pcm_s16le", "sample_rate": 16000}
    config = start["transcription_config"]
    assert (config["language"], config["diarization"], config["max_delay"], config["max_delay_mode"]) == \
        ("de", "speaker", 3.0, "flexible")
    assert config["speaker_diarization_config"] == {"max_speakers": 4}
    assert config["enable_partials"] is False and config["enable_entities"] is True
    controls = fake.connections[0].controls
    # the SDK reports the last acknowledged frame, which trails the frames sent by a few
    assert controls["EndOfStream"] == 1 and 0 < controls["last_seq_no"] <= fake.accepted[0].listener.frames
    assert played.error is None


# --- controls ------------------------------------------------------------------------------

@pytest.mark.timeout(10)
async def test_deepgram_keepalive_holds_an_idle_stream_open(monkeypatch):
    monkeypatch.setattr(deepgram_module, "KEEPALIVE_SECONDS", 0.1)
    script = make_script(seed=2, duration=4.0)
    async with FakeDeepgram(script, idle_timeout=0.5) as fake:
        stream = await provider_for("deepgram", fake).open(StreamConfig(language="en"))
        first = await play(stream, 2.0, close=False)
        await asyncio.sleep(1.2)                     # more than twice Deepgram's idle limit here
        rest = await play(stream, 2.0, start_sample=32000)
    assert rest.error is None
    assert fake.connections[0].controls["KeepAlive"] >= 5
    assert_transcript(first.words + rest.words, script)


@pytest.mark.timeout(10)
async def test_deepgram_without_keepalive_is_closed_by_the_server(monkeypatch):
    monkeypatch.setattr(deepgram_module, "KEEPALIVE_SECONDS", 30.0)
    async with FakeDeepgram(make_script(seed=2, duration=4.0), idle_timeout=0.3) as fake:
        stream = await provider_for("deepgram", fake).open(StreamConfig(language="en"))
        words = stream.__aiter__()
        with pytest.raises(StreamFailure, match="1011 NET-0001"):
            await asyncio.wait_for(words.__anext__(), 3)
        await stream.close()


@pytest.mark.timeout(10)
async def test_soniox_keepalive_while_idle(monkeypatch):
    monkeypatch.setattr(soniox_module, "KEEPALIVE_SECONDS", 0.1)
    async with FakeSoniox(make_script(seed=2, duration=2.0)) as fake:
        stream = await provider_for("soniox", fake).open(StreamConfig(language="en"))
        await asyncio.sleep(0.55)
        played = await play(stream, 2.0)
    assert fake.connections[0].controls["keepalive"] >= 3
    assert played.error is None


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", list(PROVIDERS))
async def test_finalize_releases_every_word_heard_without_closing(name):
    script = make_script(seed=4, duration=10.0)
    fake_class, _ = PROVIDERS[name]
    async with fake_class(script, delay=0.8) as fake:          # words lag 0.8 s until finalized
        stream = await provider_for(name, fake).open(StreamConfig(language="en"))
        heard = await play(stream, 6.0, close=False)
        expected = [w for w in script if w.end <= 6.0]
        got: list[Word] = list(heard.words)
        await stream.finalize()
        words = stream.__aiter__()
        while len(got) < len(expected):
            got.append(await asyncio.wait_for(words.__anext__(), 3))
        await stream.close()
    assert_transcript(got, expected)
    controls = fake.connections[0].controls
    assert controls["Finalize"] + controls["finalize"] + controls["ForceEndOfUtterance"] == 1


# --- failures ------------------------------------------------------------------------------

@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", list(PROVIDERS))
@pytest.mark.parametrize("status, retryable", [(401, False), (402, False), (403, False), (400, False),
                                               (429, True), (503, True), (500, True)])
async def test_refused_handshake_says_whether_retrying_can_help(name, status, retryable):
    fake_class, _ = PROVIDERS[name]
    async with fake_class([]) as fake:
        fake.plans = [Plan(handshake=status)]
        with pytest.raises(StreamFailure) as caught:
            await provider_for(name, fake).open(StreamConfig(language="en"))
    assert (caught.value.code, caught.value.retryable, caught.value.reason) == \
        (status, retryable, "initialization_failed")


@pytest.mark.timeout(10)
async def test_fake_deepgram_refuses_like_deepgram_with_error_headers():
    async with FakeDeepgram([]) as fake:
        fake.plans = [Plan(handshake=402)]
        with pytest.raises(InvalidStatus) as caught:
            headers = {"Authorization": f"Token {KEY}"}
            async with connect(fake.url + "/v1/listen?model=nova-3", additional_headers=headers):
                pass
    headers = caught.value.response.headers
    assert caught.value.response.status_code == 402 and headers["dg-error"] and headers["dg-request-id"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", list(PROVIDERS))
async def test_wrong_key_is_refused_as_not_retryable(name):
    fake_class, provider_class = PROVIDERS[name]
    async with fake_class([]) as fake:
        provider = provider_class(Settings(**{f"{name}_api_key": "wrong", f"{name}_url": fake.url}))
        with pytest.raises(StreamFailure) as caught:
            await provider.open(StreamConfig(language="en"))
    assert (caught.value.code, caught.value.retryable) == (401, False)


@pytest.mark.timeout(10)
async def test_unreachable_provider_is_a_retryable_failure():
    async with FakeDeepgram([]) as fake:
        url = fake.url
    provider = DeepgramProvider(Settings(deepgram_api_key=KEY, deepgram_url=url))     # nothing listens now
    with pytest.raises(StreamFailure) as caught:
        await provider.open(StreamConfig(language="en"))
    assert caught.value.retryable and caught.value.reason == "initialization_failed"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name, kind, reason, code", [
    ("deepgram", "close", "connection_lost", 1011),
    ("soniox", "close", "provider_error", 503),
    ("speechmatics", "close", "provider_error", 429),
    ("deepgram", "drop", "connection_lost", None),
    ("soniox", "drop", "connection_lost", None),
    ("speechmatics", "drop", "connection_lost", None),
    ("deepgram", "malformed", "malformed_response", None),
    ("soniox", "malformed", "malformed_response", None),
])
async def test_mid_stream_failure_ends_iteration_with_a_retryable_stream_failure(name, kind, reason, code):
    script = make_script(seed=5, duration=10.0)
    fake_class, _ = PROVIDERS[name]
    async with fake_class(script) as fake:
        fake.plans = [Plan(fail_at=5.0, kind=kind)]
        stream = await provider_for(name, fake).open(StreamConfig(language="en"))
        played = await play(stream, 10.0, speed=40)
    assert isinstance(played.error, StreamFailure)
    assert (played.error.reason, played.error.retryable) == (reason, True)
    if code is not None:
        assert played.error.code == code
    # what came before the failure is a prefix of the script (the rest is for a failover to replay)
    assert played.words and played.words[-1].end <= 5.0
    assert_transcript(played.words, script[: len(played.words)])


@pytest.mark.timeout(10)
async def test_soniox_in_band_rejection_of_the_config_is_not_retryable():
    async with FakeSoniox(make_script(seed=1, duration=2.0)) as fake:
        provider = SonioxProvider(Settings(soniox_api_key=KEY, soniox_url=fake.url, soniox_model=""))
        played = await play(await provider.open(StreamConfig(language="en")), 2.0)
    assert isinstance(played.error, StreamFailure)
    assert (played.error.code, played.error.retryable, played.error.reason) == (400, False, "provider_error")


@pytest.mark.parametrize("status, retryable", [(400, False), (401, False), (402, False), (403, False), (404, False),
                                               (408, True), (429, True), (500, True), (502, True), (503, True),
                                               (None, True)])
def test_which_statuses_are_worth_retrying(status, retryable):
    assert retryable_status(status) is retryable


# --- message parsing (pure) ----------------------------------------------------------------------

def _token(text, start, end, final=True, speaker="1", confidence=0.9):
    return SimpleNamespace(text=text, start_ms=start, end_ms=end, is_final=final, speaker=speaker,
                           confidence=confidence)


def test_soniox_tokens_join_into_words_with_first_and_last_token_times():
    joiner = TokenJoiner()
    words = joiner.feed([_token("Hel", 100, 250), _token("lo", 250, 400), _token(",", 400, 400),
                         _token(" wor", 500, 650, speaker="2"), _token("ld", 650, 800, speaker="2"),
                         _token("s", 800, 850, final=False)])
    assert words == [Word("Hello,", 0.1, 0.4, 0, 0.9)]          # "world" waits: it may go on
    assert joiner.pending_start == 0.5
    words = joiner.feed([_token("<end>", 800, 800)])
    assert words == [Word("world", 0.5, 0.8, 1, 0.9)]
    assert joiner.feed([_token("Ok", 900, 950), _token("ay", 950, 990, final=False)]) == []   # a piece follows
    assert joiner.feed([_token(" so", 1000, 1100, final=False)]) == [Word("Ok", 0.9, 0.95, 0, 0.9)]
    assert joiner.feed([_token("<fin>", 900, 900)]) == [] and joiner.pending_start is None


def test_soniox_cjk_characters_are_words_of_their_own():
    words = TokenJoiner().feed([_token("你", 0, 200), _token("好", 200, 400), _token("。", 400, 400),
                                _token("<end>", 400, 400)])
    assert [w.text for w in words] == ["你", "好。"]


def test_speechmatics_punctuation_attaches_and_follows_dropped_words_out():
    message = {"message": "AddTranscript", "metadata": {"start_time": 0.0, "end_time": 3.0},
               "results": [
                   {"type": "word", "start_time": 0.1, "end_time": 0.5,
                    "alternatives": [{"content": "Hello", "confidence": 0.9, "speaker": "S2"}]},
                   {"type": "punctuation", "start_time": 0.5, "end_time": 0.5, "attaches_to": "previous",
                    "alternatives": [{"content": ",", "confidence": 1.0}]},
                   {"type": "word", "start_time": 0.6, "end_time": 0.9,
                    "alternatives": [{"content": "uh", "confidence": 0.2, "speaker": "S1"}]},
                   {"type": "punctuation", "start_time": 0.9, "end_time": 0.9, "attaches_to": "previous",
                    "alternatives": [{"content": ".", "confidence": 1.0}]},
                   {"type": "punctuation", "start_time": 1.0, "end_time": 1.0, "attaches_to": "next",
                    "alternatives": [{"content": "¿", "confidence": 1.0}]},
                   {"type": "word", "start_time": 1.0, "end_time": 1.4,
                    "alternatives": [{"content": "Qué", "confidence": 0.8, "speaker": "UU"}]},
               ]}
    words, settled = parse_transcript(message)
    assert words == [Word("Hello,", 0.1, 0.5, 1, 0.9), Word("¿Qué", 1.0, 1.4, UNKNOWN_SPEAKER, 0.8)]
    assert settled == 3.0


def test_deepgram_error_message_is_a_provider_error():
    with pytest.raises(StreamFailure) as caught:
        parse_message(SimpleNamespace(type="Error", description="bad audio", variant="DataError"))
    assert caught.value.reason == "provider_error" and caught.value.code == "DataError"


def test_deepgram_interim_results_are_ignored():
    interim = SimpleNamespace(type="Results", is_final=False)
    assert parse_message(interim) == ([], None)


@pytest.mark.timeout(10)
async def test_close_is_idempotent_and_iteration_ends_the_same_way_twice():
    async with FakeDeepgram(make_script(seed=1, duration=3.0)) as fake:
        stream = await provider_for("deepgram", fake).open(StreamConfig(language="en"))
        await stream.send(timecode(0, 3 * 16000))
        await stream.close()
        await stream.close()
        first = [w async for w in stream]
        assert first and [w async for w in stream] == []
    assert fake.connections[0].controls["CloseStream"] == 1
