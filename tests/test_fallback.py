"""FallbackStream over the three real provider clients and their fakes on loopback: failover at
any point loses and doubles no word, handshake refusals are retried or skipped as they deserve,
a dead chain reports stt_failed, and a recovered primary takes over again at a silence."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

import numpy as np
import pytest

from harken.config import Settings
from harken.stt import STTError, FallbackPolicy, FallbackStream, Link, StreamConfig, Word
from harken.stt.deepgram import DeepgramProvider
from harken.stt.null import NullProvider, NullStream
from harken.stt.soniox import SonioxProvider
from harken.stt.speechmatics import SpeechmaticsProvider

from .fakes.deepgram import FakeDeepgram
from .fakes.script import FakeServer, Plan, ScriptWord, make_script, play
from .fakes.soniox import FakeSoniox
from .fakes.speechmatics import FakeSpeechmatics

KEY = "test-key"
ORDERS = (("deepgram", "soniox", "speechmatics"), ("soniox", "speechmatics", "deepgram"),
          ("speechmatics", "deepgram", "soniox"))
# Everything shrunk so a test takes a second: retries, stall detection, probes.
FAST = FallbackPolicy(connect_timeout=3.0, retry_base=0.02, retry_cap=0.2, result_timeout=0.3,
                      probe_interval=60.0, close_timeout=10.0)


@dataclass
class Rig:
    script: list[ScriptWord]
    fakes: dict[str, FakeServer]
    providers: dict = field(default_factory=dict)
    statuses: list[dict] = field(default_factory=list)

    def stream(self, order, **policy) -> FallbackStream:
        links = [Link(self.providers[name], {}) for name in order]
        return FallbackStream(links, StreamConfig(language="en"), self.statuses.append, policy=FAST.replace(**policy))

    def switches(self) -> list[tuple[str, str, str]]:
        return [(s["previous_provider"], s["provider"], s["reason"]) for s in self.statuses
                if s["status"] == "stt_switched"]


@contextlib.asynccontextmanager
async def rig(script: list[ScriptWord]):
    fakes = {"deepgram": FakeDeepgram(script), "soniox": FakeSoniox(script),
             "speechmatics": FakeSpeechmatics(script)}
    for fake in fakes.values():
        await fake.start()
    settings = Settings(deepgram_api_key=KEY, deepgram_url=fakes["deepgram"].url, soniox_api_key=KEY,
                        soniox_url=fakes["soniox"].url, speechmatics_api_key=KEY,
                        speechmatics_url=fakes["speechmatics"].url)
    r = Rig(script, fakes, {"deepgram": DeepgramProvider(settings), "soniox": SonioxProvider(settings),
                            "speechmatics": SpeechmaticsProvider(settings)})
    try:
        yield r
    finally:
        for provider in r.providers.values():
            await provider.aclose()
        for fake in fakes.values():
            await fake.stop()


def assert_transcript(words: list[Word], script: list[ScriptWord], tolerance: float = 0.05) -> None:
    """Same words, none missing, none doubled, each within ``tolerance`` of its scripted times."""
    assert [w.text for w in words] == [s.text for s in script]
    for word, expected in zip(words, script):
        assert abs(word.start - expected.start) <= tolerance and abs(word.end - expected.end) <= tolerance, \
            (word, expected)
        assert word.speaker == expected.speaker


# --- failover at a random point, every failure kind ---------------------------------------------

REASONS = {
    "close": {"deepgram": "connection_lost", "soniox": "provider_error", "speechmatics": "provider_error"},
    "drop": dict.fromkeys(ORDERS[0], "connection_lost"),
    "stall": dict.fromkeys(ORDERS[0], "stalled"),
    "malformed": {"deepgram": "malformed_response", "soniox": "malformed_response",
                  "speechmatics": "connection_lost"},   # the SDK turns bad JSON into a lost session
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("kind", list(REASONS))
async def test_failover_mid_stream_loses_and_doubles_no_word(kind, seed):
    rng = random.Random(f"{kind}-{seed}")
    first, second, _ = ORDERS[seed % 3]
    fail_at = round(rng.uniform(1.0, 59.0), 2)
    script = make_script(seed, duration=60.0)
    async with rig(script) as r:
        r.fakes[first].plans = [Plan(fail_at=fail_at, kind=kind)]
        r.fakes[second].plans = [Plan(partial_words=True)]     # it may also hear half a word at the seam
        stream = r.stream(ORDERS[seed % 3])
        # half the runs at 120x real time, half as fast as the sockets go (failure found at close)
        played = await play(stream, 60.0, speed=120.0 if seed % 2 else None)
    assert played.error is None and played.send_error is None
    assert_transcript(played.words, script)
    assert r.switches() == [(first, second, REASONS[kind][first])]
    assert sum(fake.discontinuities() for fake in r.fakes.values()) == 0     # replayed audio is contiguous
    replay = r.fakes[second].accepted[0].listener
    assert replay.offset <= fail_at                    # the second provider heard from before the failure
    assert set(played.providers) <= {first, second}
    assert all(p == second for w, p in zip(played.words, played.providers) if w.start > fail_at + 0.5)


@pytest.mark.timeout(20)
async def test_seam_duplicates_are_caught_by_text_when_timings_differ():
    """The new provider re-hears a second of words with its own (later) timing: the time
    tolerance is off here, so only the text match keeps them from being doubled."""
    script = make_script(11, duration=30.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(fail_at=15.0, kind="drop")]
        r.fakes["soniox"].plans = [Plan(time_shift=0.04)]
        played = await play(r.stream(["deepgram", "soniox"], seam_tolerance=0.0, replay_preroll=1.0), 30.0,
                            speed=60)
    replay = r.fakes["soniox"].accepted[0].listener
    heard_twice = [w for w in script if replay.offset <= w.start and w.end <= 15.0]
    assert heard_twice, "the replay should overlap words already transcribed"
    assert_transcript(played.words, script)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(6))
async def test_a_word_the_new_provider_re_hears_and_times_later_is_not_doubled(seed):
    """The replay overlaps the last words already emitted (``replay_preroll``), and the new engine
    may place a word it re-hears later than the old one did, past that word's end when the word
    is short (Soniox re-reported "next." at a failover seam this way): the same text starting
    within the preroll of the emitted word's end is that word again, not a new one."""
    script = make_script(seed, duration=30.0)
    # In the middle of a sentence, so that the replay re-hears the words just before the failure.
    k = next(k for k, w in enumerate(script) if w.start > 15.0 and not w.text[-1] in ".?!,"
             and not script[k - 1].text[-1] in ".?!,")
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(fail_at=script[k].start + 0.1, kind="close")]
        r.fakes["soniox"].plans = [Plan(time_shift=0.25)]
        played = await play(r.stream(["deepgram", "soniox"], replay_preroll=1.0), 30.0, speed=60)
    replay = r.fakes["soniox"].accepted[0].listener
    emitted_until = max(w.end for w, p in zip(played.words, played.providers) if p == "deepgram")
    heard_twice = [w for w in script if replay.offset <= w.start and w.end <= emitted_until]
    assert heard_twice, "the replay should re-hear words already emitted"
    assert_transcript(played.words, script, tolerance=0.3)


# --- connecting ---------------------------------------------------------------------------------

@pytest.mark.timeout(10)
@pytest.mark.parametrize("status", [401, 402, 403, 400])
async def test_a_refusal_retrying_cannot_fix_skips_to_the_next_provider_at_once(status):
    script = make_script(2, duration=8.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=status)] * 3
        stream = r.stream(["deepgram", "soniox"], retry_base=1.0)
        assert await asyncio.wait_for(stream.start(), 0.9) == "soniox"     # no 1 s backoff was waited
        played = await play(stream, 8.0)
    assert len(r.fakes["deepgram"].connections) == 1
    assert r.switches() == [("deepgram", "soniox", "initialization_failed")]
    assert_transcript(played.words, script)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("status", [429, 503])
async def test_a_retryable_refusal_is_retried_with_exponential_backoff(status):
    script = make_script(2, duration=8.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=status), Plan(handshake=status)]
        stream = r.stream(["deepgram", "soniox"], retry_base=0.1, retry_cap=5.0)
        assert await stream.start() == "deepgram"
        played = await play(stream, 8.0)
    attempts = [c.at for c in r.fakes["deepgram"].connections]
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert len(attempts) == 3
    # base·2ⁿ plus up to one base of jitter, plus 0.2 s for a loaded machine's connect
    assert 0.1 <= gaps[0] < 0.2 + 0.2 and 0.2 <= gaps[1] < 0.3 + 0.2
    assert r.switches() == [] and not r.fakes["soniox"].connections
    assert_transcript(played.words, script)


@pytest.mark.timeout(10)
async def test_a_provider_refusing_every_attempt_is_left_for_the_next():
    script = make_script(2, duration=6.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=503)] * 3
        played = await play(r.stream(["deepgram", "soniox"]), 6.0)
    assert len(r.fakes["deepgram"].connections) == FAST.retry_attempts
    assert r.switches() == [("deepgram", "soniox", "initialization_failed")]
    assert_transcript(played.words, script)


@pytest.mark.timeout(10)
async def test_audio_sent_while_connecting_waits_in_the_buffer():
    script = make_script(3, duration=10.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=503), Plan(handshake=503)]
        stream = r.stream(["deepgram"], retry_base=0.3)
        played_task = asyncio.create_task(play(stream, 10.0))
        await asyncio.sleep(0.2)
        assert stream.active_provider is None          # still backing off, yet send() went on
        played = await played_task
    connection = r.fakes["deepgram"].accepted[0]
    assert connection.listener.origin == 0 and connection.listener.discontinuities == 0
    assert_transcript(played.words, script)



class ReusingCaller:
    """A caller that fills one array for every send, as a decoder writing into its own buffer would."""

    def __init__(self, stream: FallbackStream):
        self.stream, self.scratch = stream, np.zeros(0, dtype=np.int16)

    async def send(self, pcm: np.ndarray) -> None:
        if self.scratch.size != pcm.size:
            self.scratch = np.empty(pcm.size, dtype=np.int16)
        self.scratch[:] = pcm
        await self.stream.send(self.scratch)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __aiter__(self):
        return self.stream.__aiter__()


@pytest.mark.timeout(10)
async def test_a_caller_reusing_its_array_does_not_change_the_audio_already_buffered():
    # Only read-only arrays (decoders' output over immutable bytes) are kept without a copy.
    script = make_script(3, duration=6.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=503)]      # audio waits in the buffer meanwhile
        played = await play(ReusingCaller(r.stream(["deepgram"], retry_base=0.3)), 6.0)
    connection = r.fakes["deepgram"].accepted[0]
    assert connection.listener.origin == 0 and connection.listener.discontinuities == 0
    assert_transcript(played.words, script)

# --- everything down ---------------------------------------------------------------------------

@pytest.mark.timeout(10)
async def test_all_providers_down_reports_stt_failed_and_raises():
    async with rig([]) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=401)]
        r.fakes["soniox"].plans = [Plan(handshake=503)] * 3
        r.fakes["speechmatics"].plans = [Plan(handshake=402)]
        stream = r.stream(ORDERS[0])
        with pytest.raises(STTError):
            await stream.start()
        played = await play(stream, 1.0)
    assert isinstance(played.error, STTError)
    assert [len(r.fakes[n].connections) for n in ORDERS[0]] == [1, 3, 1]
    failed = r.statuses[-1]
    assert failed == {"type": "service_status", "status": "stt_failed", "provider": "speechmatics",
                      "reason": "initialization_failed", "retryable": True,
                      "retry_after": int(FAST.probe_interval), "status_text": failed["status_text"]}
    assert failed["status_text"]


@pytest.mark.timeout(10)
async def test_only_unfixable_refusals_say_not_retryable():
    async with rig([]) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=401)]
        r.fakes["soniox"].plans = [Plan(handshake=402)]
        played = await play(r.stream(["deepgram", "soniox"]), 1.0)
    assert isinstance(played.error, STTError) and not played.error.retryable
    assert r.statuses[-1]["status"] == "stt_failed" and r.statuses[-1]["retryable"] is False


@pytest.mark.timeout(15)
async def test_losing_every_provider_mid_stream_keeps_the_words_so_far():
    script = make_script(4, duration=30.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(fail_at=12.0, kind="close")] + [Plan(handshake=503)] * 3
        r.fakes["soniox"].plans = [Plan(handshake=401)]
        played = await play(r.stream(["deepgram", "soniox"]), 30.0, speed=60)
    assert isinstance(played.error, STTError)
    assert played.words and played.words[-1].end <= 12.0
    assert_transcript(played.words, script[: len(played.words)])
    assert [s["status"] for s in r.statuses] == ["stt_failed"]
    assert len(r.fakes["deepgram"].connections) == 1 + FAST.retry_attempts   # the lost one, then retries


# --- recovery -----------------------------------------------------------------------------------

@pytest.mark.timeout(20)
async def test_the_primary_takes_over_again_at_the_next_silence():
    script = make_script(6, duration=60.0)
    async with rig(script) as r:
        # 1st connection dies at 10 s; the first probe is refused, the second succeeds.
        r.fakes["deepgram"].plans = [Plan(fail_at=10.0, kind="drop"), Plan(handshake=503)]
        played = await play(r.stream(["deepgram", "soniox"], probe_interval=0.15), 60.0, speed=20)
    assert r.switches() == [("deepgram", "soniox", "connection_lost"), ("soniox", "deepgram", "recovered")]
    assert_transcript(played.words, script)
    back = r.fakes["deepgram"].accepted[-1].listener
    cut, eps = back.offset + FAST.replay_preroll, 0.002             # eps: the origin is a whole sample
    before = [w for w in script if w.start < cut - eps]
    assert not any(w.start < cut - eps and cut + eps < w.end for w in script)   # no word is cut in two
    assert cut - before[-1].end >= FAST.silence_gap - eps          # the cut ends a silence of 1 s or more
    assert all(p == "deepgram" for w, p in zip(played.words, played.providers) if w.start > cut)
    assert sum(fake.discontinuities() for fake in r.fakes.values()) == 0


@pytest.mark.timeout(20)
async def test_a_slow_reconnect_of_the_primary_keeps_the_cut_it_chose():
    """The switch-back connects for a second of wall time (20 s of audio here) after choosing its
    cut: the audio from the cut stays buffered for the primary and the words the outgoing provider
    yields meanwhile are left to the primary, so the cut still ends a silence and nothing is lost."""
    script = make_script(6, duration=60.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(fail_at=10.0, kind="drop"), Plan(), Plan(handshake_delay=1.0)]
        stream = r.stream(["deepgram", "soniox"], probe_interval=0.15)
        played = await play(stream, 60.0, speed=20)
    assert r.switches() == [("deepgram", "soniox", "connection_lost"), ("soniox", "deepgram", "recovered")]
    assert_transcript(played.words, script)
    assert stream.lost_seconds == 0
    cut = r.fakes["deepgram"].accepted[-1].listener.offset + FAST.replay_preroll
    before = [w for w in script if w.start < cut]
    assert cut - before[-1].end >= FAST.silence_gap - 0.002
    assert all(p == "deepgram" for w, p in zip(played.words, played.providers) if w.start > cut)
    assert sum(fake.discontinuities() for fake in r.fakes.values()) == 0


@pytest.mark.timeout(15)
async def test_an_idle_client_is_not_a_stalled_provider():
    script = make_script(8, duration=10.0)
    async with rig(script) as r:
        stream = r.stream(["deepgram", "soniox"], result_timeout=0.2)
        first = await play(stream, 5.0, close=False)
        await asyncio.sleep(1.0)                            # five stall timeouts without audio
        rest = await play(stream, 5.0, start_sample=5 * 16000)
    assert r.switches() == []
    assert_transcript(first.words + rest.words, script)


@pytest.mark.timeout(15)
async def test_beyond_the_replay_buffer_words_are_lost_and_counted():
    script = make_script(9, duration=60.0)
    async with rig(script) as r:
        r.fakes["deepgram"].plans = [Plan(fail_at=10.0, kind="stall")]
        stream = r.stream(["deepgram", "soniox"], replay_seconds=4.0, result_timeout=0.5)
        played = await play(stream, 60.0)                  # all 60 s arrive before the stall is noticed
    origin = r.fakes["soniox"].accepted[0].listener.offset
    assert origin >= 50.0 and stream.lost_seconds >= 35.0
    kept_before = [w for w, p in zip(played.words, played.providers) if p == "deepgram"]
    assert_transcript(played.words, kept_before + [w for w in script if w.start >= origin])
    assert_transcript(kept_before, script[: len(kept_before)])


@pytest.mark.timeout(10)
async def test_finalize_reaches_the_active_provider_and_async_status_callbacks_are_awaited():
    seen: list[dict] = []

    async def on_status(message: dict) -> None:
        await asyncio.sleep(0)
        seen.append(message)

    async with rig(make_script(1, duration=4.0)) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=401)]
        stream = FallbackStream([Link(r.providers["deepgram"], {}), Link(r.providers["soniox"], {})],
                                StreamConfig(language="en"), on_status, policy=FAST)
        await stream.start()
        await stream.finalize()
        await play(stream, 4.0)
    assert r.fakes["soniox"].accepted[0].controls["finalize"] == 1
    assert [m["status"] for m in seen] == ["stt_switched"]


@pytest.mark.timeout(60)
async def test_from_the_embedded_engine_back_to_the_cloud_at_a_quiet_second():
    """The embedded engine reports no progress, so the switch back waits for a second of quiet
    audio and cuts inside that pause; the cloud provider's audio starts at the cut minus the
    replay pre-roll (which may reach back past the pause's start, into the clip's quiet tail)."""
    from harken.client import read_wav_16k
    from harken.stt import WhisperProvider

    from .conftest import AUDIO, transcripts

    clips = [read_wav_16k(AUDIO / row["file"]) for row in transcripts()[:3]]
    gap = np.zeros(int(1.6 * 16000), dtype=np.int16)
    pcm = np.concatenate([clips[0], gap, clips[1], gap, clips[2], gap])
    pauses = []                                   # (start, end) seconds of each silent gap
    position = 0
    for clip in clips:
        position += clip.size
        pauses.append((position / 16000, (position + gap.size) / 16000))
        position += gap.size
    engine = WhisperProvider(Settings())
    async with rig([]) as r:
        r.fakes["deepgram"].plans = [Plan(handshake=503)] * 3      # down at first: the embedded engine starts
        links = [Link(r.providers["deepgram"], {}), Link(engine, {})]
        stream = FallbackStream(links, StreamConfig(language="en"), r.statuses.append,
                                policy=FAST.replace(probe_interval=0.1))
        words: list[Word] = []

        async def read() -> None:
            async for word in stream:
                words.append(word)

        reader = asyncio.create_task(read())
        for start in range(0, pcm.size, 1600):
            await stream.send(pcm[start:start + 1600])
            await asyncio.sleep(0.01)                  # 10× real time: the engine keeps up
        await stream.close()
        await reader
    await engine.aclose()
    assert r.switches() == [("deepgram", "local", "initialization_failed"), ("local", "deepgram", "recovered")]
    heard = r.fakes["deepgram"].accepted[-1].listener.received // 2
    origin = (pcm.size - heard) / 16000                 # where the cloud provider's audio began
    cut = origin + FAST.replay_preroll
    # The cut is inside a pause. (The origin was asserted inside it too, but a cut found early in
    # a pause puts the pre-roll before the pause: the full suite once gave origin 7.0 s, cut 7.3 s,
    # pause 7.1–8.7 s, the origin in the clip's last 0.1 s, which is near-silent.)
    assert any(a <= cut <= b for a, b in pauses), (cut, pauses)
    assert words and all(w.end <= cut for w in words)   # the engine's words all precede the cut


# --- streams whose send never waits are fed without the feeder task ------------------------------

class CountingNullStream(NullStream):
    """The null engine, counting how its audio came: through the feeder (``send``) or handed
    over synchronously (``send_nowait``); it fails every call past ``fail_after`` samples."""

    def __init__(self, *args, fail_after: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_after = fail_after
        self.calls = {"send": 0, "send_nowait": 0}

    async def send(self, pcm):
        self.calls["send"] += 1
        self.send_nowait(pcm, counted=False)

    def send_nowait(self, pcm, counted: bool = True):
        if counted:
            self.calls["send_nowait"] += 1
        if self.fail_after is not None and self._received + len(pcm) > self.fail_after:
            raise STTError("engine crashed")
        super().send_nowait(pcm)


class CountingNullProvider(NullProvider):
    def __init__(self, fail_after: int | None = None):
        super().__init__()
        self.fail_after = fail_after
        self.streams: list[CountingNullStream] = []

    async def open(self, config):
        stream = CountingNullStream(round(self.word_seconds * config.sample_rate), config.sample_rate,
                                    fail_after=self.fail_after)
        self.streams.append(stream)
        return stream


async def feed_like_a_session(stream: FallbackStream, seconds: float, piece: float = 0.04) -> list[Word]:
    """Pieces of audio through ``send_nowait`` as a session's read callback hands them over, at
    10x real time, with a finalize now and then; returns every word once the stream closed."""
    words: list[Word] = []

    async def read() -> None:
        async for word in stream:
            words.append(word)

    reader = asyncio.create_task(read())
    await stream.start()
    size = int(piece * 16000)
    for index in range(int(seconds / piece)):
        stream.send_nowait(np.full(size, index % 100, np.int16))
        if index % 50 == 49:
            await stream.finalize()
        await asyncio.sleep(piece / 10)
    await stream.close()
    await asyncio.wait_for(reader, 10)
    return words


@pytest.mark.timeout(20)
async def test_a_stream_whose_send_never_waits_gets_the_audio_straight_from_send_nowait():
    provider = CountingNullProvider()
    stream = FallbackStream([Link(provider, {})], StreamConfig(language="en"), policy=FAST)
    words = await feed_like_a_session(stream, 6.0)
    engine = provider.streams[0]
    # Every sample arrived once, in order: the null engine names each 0.3 s word by its end.
    assert [w.end for w in words] == pytest.approx([0.3 * k for k in range(1, 21)])
    assert engine._received == 6 * 16000
    # Nearly all of it without waking the feeder (which still sends what arrives while it is busy).
    assert engine.calls["send_nowait"] >= 0.9 * 150, engine.calls
    assert engine.calls["send"] <= 0.1 * 150, engine.calls


@pytest.mark.timeout(20)
async def test_a_synchronous_send_that_fails_hands_over_to_the_next_provider_without_a_hole():
    failing, spare = CountingNullProvider(fail_after=3 * 16000), CountingNullProvider()
    spare.name = "spare"
    statuses: list[dict] = []
    stream = FallbackStream([Link(failing, {}), Link(spare, {})], StreamConfig(language="en"),
                            statuses.append, policy=FAST)
    words = await feed_like_a_session(stream, 6.0)
    assert [(s["previous_provider"], s["reason"]) for s in statuses if s["status"] == "stt_switched"] \
        == [("null", "send_failed")]
    assert failing.streams[0].calls["send_nowait"] > 0      # it did fail on the synchronous path
    ends = [w.end for w in words]
    assert ends == sorted(ends) and len(set(ends)) == len(ends)          # nothing doubled
    gaps = np.diff([0.0, *ends])
    assert gaps.max() <= 0.3 + 1e-6                                      # nothing lost
    assert ends[-1] == pytest.approx(6.0, abs=0.3)
