"""The null provider (scripted words on the audio clock) and ``harken loadtest`` against a real gateway."""

from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

from harken import cli
from harken.client import device_messages, listen_url, stream_messages
from harken.gateway.auth import mint_local_token
from harken.loadtest import LoadTestConfig, run_load
from harken.stt import StreamConfig
from harken.stt.null import WORD_SECONDS, WORDS_PER_SENTENCE, NullProvider, audio_times

from .conftest import load_audio
from .test_gateway import token_for


async def collect(stream) -> list:
    return [word async for word in stream]


# --- the null provider on its own ------------------------------------------------------------

async def test_null_words_follow_the_samples_received():
    stream = await NullProvider().open(StreamConfig())
    rng = np.random.default_rng(3)
    sent = 0
    for size in rng.integers(1, 3000, size=200):          # odd chunk sizes, as decoders produce
        await stream.send(np.zeros(size, np.int16))
        sent += int(size)
    await stream.close()
    words = await collect(stream)

    assert len(words) == int(sent / 16000 / WORD_SECONDS) > 20
    for k, word in enumerate(words, start=1):
        assert word.end == pytest.approx(k * WORD_SECONDS)
        assert word.start == pytest.approx((k - 1) * WORD_SECONDS)
        assert audio_times(word.text) == [pytest.approx(word.end)]       # the text names its own time
        assert word.text.endswith(".") == (k % WORDS_PER_SENTENCE == 0)


async def test_a_null_word_waits_for_all_of_its_audio():
    stream = await NullProvider().open(StreamConfig())
    await stream.send(np.zeros(round(WORD_SECONDS * 16000) - 1, np.int16))
    await stream.finalize()
    assert stream.settled_until == 0.0
    await stream.send(np.zeros(1, np.int16))
    await stream.close()
    assert [w.end for w in await collect(stream)] == [pytest.approx(WORD_SECONDS)]


# --- through the gateway ---------------------------------------------------------------------

async def test_stt_service_null_is_only_a_preference_when_the_setting_is_off(gateway):
    """As every stt_service value the server does not serve (upstream's rule: a preference, not a
    contract): no close, the normal chain serves the session and ready says which."""
    url = listen_url(gateway.base, codec="pcm16", sample_rate=16000, stt_service="null")
    result = await stream_messages(url, [bytes(3200)] * 5, 0.1, token=token_for(gateway), realtime=False,
                                   settle_seconds=0.5, max_wait=10)
    assert result.close_code == 1000, (result.close_code, result.close_reason)
    ready = [e for e in result.events if e.get("status") == "ready"]
    assert ready and ready[0]["provider"] != "null"
    assert not [e for e in result.events if e.get("type") == "error"]


async def test_null_segments_carry_the_audio_clock_times(make_gateway):
    server = make_gateway(null_provider=True)
    pcm = load_audio("ss_0870.wav")[: 16000 * 4]
    messages, seconds = device_messages(pcm, "opus", 16000)
    url = listen_url(server.base, codec="opus", sample_rate=16000, stt_service="null")
    result = await stream_messages(url, messages, seconds, token=token_for(server), realtime=False,
                                   settle_seconds=1.5, max_wait=20)

    segments = result.ordered()
    times = [t for s in segments for t in audio_times(s["text"])]
    expected = [round(k * WORD_SECONDS, 3) for k in range(1, int(len(messages) * seconds / WORD_SECONDS + 1e-6) + 1)]
    assert times == pytest.approx(expected)          # every word once, in order, none invented
    for segment in segments:
        own = audio_times(segment["text"])
        assert segment["start"] == pytest.approx(own[0] - WORD_SECONDS)
        assert segment["end"] == pytest.approx(own[-1])
        assert segment["stt_provider"] == "null"


# --- the load tool ---------------------------------------------------------------------------

def load_config(server, **changes) -> LoadTestConfig:
    run = uuid.uuid4().hex[:8]
    base = LoadTestConfig(url=server.base, tokens=lambda i: mint_local_token(server.settings, f"load-{run}-{i}", 600))
    for name, value in changes.items():
        setattr(base, name, value)
    return base


async def test_loadtest_of_five_streams_reports_no_errors_and_plausible_latency(make_gateway):
    server = make_gateway(null_provider=True)
    report = await run_load(load_config(server, streams=5, duration=5.0))

    assert not report.errors, report.lines()
    words_each = int(5.0 / WORD_SECONDS)
    assert [o.words for o in report.outcomes] == [words_each] * 5
    assert all(o.connect_seconds is not None and o.connect_seconds < 10 for o in report.outcomes)
    latency = report.latency_percentiles()
    # A word waits for the next 600 ms flush: about 0.3 s in the median, never much past 0.6 s
    # on an idle machine; the bounds are wide for a shared one.
    assert 0.05 < latency["p50"] < 1.5
    assert latency["max"] < 5.0
    assert report.latencies.size == 5 * words_each
    text = "\n".join(report.lines())
    assert "errors    none" in text and "p99" in text


async def test_loadtest_reports_refused_streams_by_cause(gateway):
    report = await run_load(load_config(gateway, streams=3, duration=2.0))     # null provider off

    assert sum(report.errors.values()) == 3
    assert all("HARKEN_NULL_PROVIDER" in cause for cause in report.errors), report.errors
    assert report.latencies.size == 0


async def test_loadtest_idle_connections_hold_without_audio(make_gateway):
    server = make_gateway(null_provider=True)
    report = await run_load(load_config(server, streams=3, duration=2.0, idle=True))

    assert not report.errors, report.lines()
    assert all(o.frames_sent == 0 and o.ready_seconds is not None for o in report.outcomes)


def test_loadtest_command_prints_the_report(make_gateway, capsys):
    server = make_gateway(null_provider=True)
    code = cli.main(["loadtest", "--url", server.base, "--streams", "2", "--duration", "2",
                     "--data-dir", str(server.settings.data_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "2 streams" in out and "latency" in out and "errors    none" in out
    assert math.isfinite(float(out.split("p50 ")[1].split(" ms")[0]))
