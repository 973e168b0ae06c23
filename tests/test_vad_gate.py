"""The VAD gate's own logic: what reaches the engine, when it is finalized, and word times.

The engine behind the gate is an in-process recorder (the gate is a pure wrapper around any
``STTStream``; no provider protocol is involved): it keeps what it is sent and, when closed, emits
one ``Word`` per stretch of non-zero audio it received, timed on its own (forwarded) time line,
as a real engine times words on the audio it was sent. The recordings are the development
files trimmed to their speech and joined with digital silence, so the true position of every
stretch on the full time line is known exactly.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from harken.audio import SAMPLE_RATE, StreamingVAD, speech_spans
from harken.stt.base import StreamConfig, STTStream, Word
from harken.stt.fallback import FallbackPolicy, FallbackStream
from harken.stt.gating import gate_wanted, gated
from harken.stt.base import Link
from harken.stt.vad_gate import VadGatedStream

from .test_vad import read_wav, transcripts

CHUNK = SAMPLE_RATE // 10             # 100 ms, a typical decoded message
MIN_ZERO_RUN = int(0.25 * SAMPLE_RATE)


def nonzero_spans(pcm: np.ndarray) -> list[tuple[int, int]]:
    """Stretches of non-zero samples, split at runs of ≥ 0.25 s of exact zeros."""
    nonzero = np.flatnonzero(pcm)
    if nonzero.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(nonzero) > MIN_ZERO_RUN)
    starts = np.concatenate(([nonzero[0]], nonzero[breaks + 1]))
    ends = np.concatenate((nonzero[breaks] + 1, [nonzero[-1] + 1]))
    return list(zip(starts.tolist(), ends.tolist()))


class RecordingStream(STTStream):
    provider_name = "recorder"

    def __init__(self, onset_error: float = 0.0) -> None:
        self.chunks: list[np.ndarray] = []
        self.received = 0
        self.finalized_at: list[int] = []      # samples received when finalize() was called
        self._onset_error = onset_error        # seconds the engine misplaces each word's onset by
        self._closed = asyncio.Event()

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.int16)

    async def send(self, pcm: np.ndarray) -> None:
        self.chunks.append(np.array(pcm, dtype=np.int16))
        self.received += len(pcm)

    async def finalize(self) -> None:
        self.finalized_at.append(self.received)

    async def close(self) -> None:
        self._closed.set()

    async def __aiter__(self):
        await self._closed.wait()
        for start, end in nonzero_spans(self.audio):
            yield Word(f"span@{start}", max(0.0, start / SAMPLE_RATE + self._onset_error), end / SAMPLE_RATE)


class KeepAliveRecordingStream(RecordingStream):
    def __init__(self) -> None:
        super().__init__()
        self.keepalives_at: list[int] = []

    async def keep_alive(self) -> None:
        self.keepalives_at.append(self.received)


def trimmed(name: str) -> np.ndarray:
    """A development file cut to its first through last sample of speech (no pad)."""
    pcm = read_wav(name)
    spans = speech_spans(pcm, 0.65, pad_ms=0)
    return pcm[spans[0][0] : spans[-1][1]]


def recording(gaps: list[float]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The real development files, trimmed, joined with the given pauses of digital silence;
    and each file's (start, end) sample."""
    names = [name for name, _ in transcripts("real")][: len(gaps) + 1]
    parts, files, position = [], [], 0
    for i, name in enumerate(names):
        pcm = trimmed(name)
        parts.append(pcm)
        files.append((position, position + pcm.size))
        position += pcm.size
        if i < len(gaps):
            parts.append(np.zeros(int(gaps[i] * SAMPLE_RATE), dtype=np.int16))
            position += parts[-1].size
    return np.concatenate(parts), files


async def run_gate(gate: VadGatedStream, pcm: np.ndarray, audio_time: list[float] | None = None) -> list[Word]:
    for i in range(0, pcm.size, CHUNK):
        if audio_time is not None:
            audio_time[0] = i / SAMPLE_RATE
        await gate.send(pcm[i : i + CHUNK])
    await gate.close()
    return [word async for word in gate]


def assert_words_at_true_positions(words: list[Word], pcm: np.ndarray) -> None:
    truth = nonzero_spans(pcm)
    assert len(words) == len(truth), "a stretch of speech was lost, cut or split"
    for word, (start, end) in zip(words, truth):
        assert abs(word.start - start / SAMPLE_RATE) <= 0.1, (word, start / SAMPLE_RATE)
        assert abs(word.end - end / SAMPLE_RATE) <= 0.1, (word, end / SAMPLE_RATE)


GAPS = list(np.random.default_rng(3).uniform(3.0, 5.0, 5).round(2))   # 6 files, 5 pauses


@pytest.mark.timeout(60)
@pytest.mark.parametrize("idle_ms", [4000, 1000])
async def test_gate_forwards_speech_only_and_keeps_word_times(idle_ms):
    pcm, files = recording(GAPS)
    inner = RecordingStream()
    gate = VadGatedStream(inner, StreamingVAD(), silence_to_idle_ms=idle_ms)
    words = await run_gate(gate, pcm)

    # Each pause is sent up to the hang-over and the next stretch's 300 ms pre-roll; the rest of
    # it, and only that, is removed.
    expected_removed = sum(max(0.0, gap - idle_ms / 1000 - 0.3) for gap in GAPS)
    removed = (pcm.size - inner.received) / SAMPLE_RATE
    assert removed == pytest.approx(expected_removed, abs=0.1 * len(GAPS))
    assert gate.stats.received_seconds == pytest.approx(pcm.size / SAMPLE_RATE)
    assert gate.stats.forwarded_seconds == pytest.approx(inner.received / SAMPLE_RATE)
    assert gate.stats.removed_share == pytest.approx(removed / (pcm.size / SAMPLE_RATE))
    # Every speech stretch reached the engine whole, and its word lands where it was spoken.
    assert_words_at_true_positions(words, pcm)

    # The engine was asked to finalize in each pause, 300 ms (+ up to 5 windows) after the file's
    # last sample (on the engine's time line).
    file_ends = [end for _, end in nonzero_spans(inner.audio)][: len(files) - 1]
    assert len(file_ends) == len(GAPS)
    for end in file_ends:
        assert any(0.25 * SAMPLE_RATE <= at - end <= 0.5 * SAMPLE_RATE for at in inner.finalized_at), end


@pytest.mark.timeout(60)
async def test_keepalive_only_while_closed_for_five_seconds():
    pcm, _ = recording([10.0, 2.0])
    inner = KeepAliveRecordingStream()
    audio_time = [0.0]
    gate = VadGatedStream(inner, StreamingVAD(), clock=lambda: audio_time[0])
    await run_gate(gate, pcm, audio_time)
    # The 10 s pause: sent for 4 s of hang-over, then closed; 5 s after the last send one
    # keepalive. The 2 s pause never closes the gate.
    assert len(inner.keepalives_at) == 1
    assert gate.stats.keepalives == 1


@pytest.mark.timeout(60)
async def test_gate_without_keepalive_method_is_fine():
    pcm, _ = recording([10.0])
    audio_time = [0.0]
    inner = RecordingStream()
    gate = VadGatedStream(inner, StreamingVAD(), clock=lambda: audio_time[0])
    words = await run_gate(gate, pcm, audio_time)
    assert gate.stats.keepalives == 0
    assert_words_at_true_positions(words, pcm)


class FailingVAD:
    """A real VAD that raises from its ``fail_on``-th call on."""

    def __init__(self, fail_on: int):
        self._vad = StreamingVAD()
        self._calls = 0
        self._fail_on = fail_on

    def process(self, pcm):
        self._calls += 1
        if self._calls >= self._fail_on:
            raise RuntimeError("onnxruntime fell over")
        return self._vad.process(pcm)


@pytest.mark.timeout(60)
async def test_gate_fails_open_when_the_vad_raises_from_the_start():
    pcm, _ = recording([5.0, 5.0])
    inner = RecordingStream()
    gate = VadGatedStream(inner, FailingVAD(fail_on=1))
    words = await run_gate(gate, pcm)
    assert gate.stats.failed_open
    np.testing.assert_array_equal(inner.audio, pcm)      # everything, in order, nothing twice
    assert_words_at_true_positions(words, pcm)


@pytest.mark.timeout(60)
async def test_gate_fails_open_mid_stream_and_keeps_times():
    pcm, files = recording([6.0, 6.0, 6.0])
    inner = RecordingStream()
    # Fail inside the second pause, while the gate is closed: the pre-roll it held and all that
    # follows go through.
    fail_at = (files[1][1] + 5 * SAMPLE_RATE) // CHUNK
    gate = VadGatedStream(inner, FailingVAD(fail_on=fail_at))
    words = await run_gate(gate, pcm)
    assert gate.stats.failed_open
    tail = pcm[(fail_at - 1) * CHUNK - int(0.3 * SAMPLE_RATE):]
    np.testing.assert_array_equal(inner.audio[-tail.size:], tail)
    assert inner.received < pcm.size                     # the first pause was still gated
    assert_words_at_true_positions(words, pcm)


@pytest.mark.timeout(30)
async def test_explicit_finalize_sends_the_held_partial_window():
    pcm = trimmed(transcripts("real")[0][0])
    inner = RecordingStream()
    gate = VadGatedStream(inner, StreamingVAD())
    cut = (pcm.size // 512 - 1) * 512 + 300    # 300 samples into a window: held by the gate
    for i in range(0, cut, CHUNK):
        await gate.send(pcm[i : min(i + CHUNK, cut)])
    held = cut - inner.received
    assert 0 < held < 512
    await gate.finalize()
    assert inner.received == cut and inner.finalized_at[-1] == cut
    await gate.send(pcm[cut:])
    await gate.close()
    np.testing.assert_array_equal(inner.audio, pcm[: inner.received])


@pytest.mark.timeout(60)
async def test_an_onset_placed_early_does_not_jump_into_the_removed_pause():
    # An engine that puts every onset 0.35 s early (more than the 300 ms pre-roll) reports the
    # first word after a cut at a point that was the end of the previous forwarded stretch. The
    # gate keeps such a word at the start of its own stretch instead of seconds too early.
    pcm, _ = recording([6.0, 6.0])
    inner = RecordingStream(onset_error=-0.35)
    gate = VadGatedStream(inner, StreamingVAD())
    words = await run_gate(gate, pcm)
    truth = nonzero_spans(pcm)
    assert len(words) == len(truth)
    for word, (start, _) in zip(words, truth):
        assert -0.36 <= word.start - start / SAMPLE_RATE <= 0.0, (word, start / SAMPLE_RATE)


@pytest.mark.timeout(60)
async def test_what_is_forwarded_does_not_depend_on_message_size():
    # Decisions are made per 32 ms window, so 20 ms, 100 ms and 1 s messages forward the same
    # samples and finalize at the same places.
    pcm, _ = recording([5.0, 4.5])
    results = []
    for chunk in (320, 1600, 16000):
        inner = RecordingStream()
        gate = VadGatedStream(inner, StreamingVAD())
        for i in range(0, pcm.size, chunk):
            await gate.send(pcm[i : i + chunk])
        await gate.close()
        results.append((inner.audio, inner.finalized_at))
    for audio, finalized_at in results[1:]:
        np.testing.assert_array_equal(audio, results[0][0])
        assert finalized_at == results[0][1]


# --- which sessions are gated (harken.stt.gating) -------------------------------------------------
class NamedProvider:
    def __init__(self, name: str) -> None:
        self.name = name


def chain(*names: str) -> list[Link]:
    return [Link(NamedProvider(name), {}) for name in names]


@pytest.mark.parametrize("param,setting,names,wanted", [
    (None, "off", ("deepgram", "local"), False),
    (None, "active", ("deepgram", "local"), True),
    ("off", "active", ("deepgram", "local"), False),      # the parameter wins
    ("active", "off", ("soniox",), True),
    ("active", "active", ("local",), False),              # the embedded engine has its own VAD
])
def test_the_gate_is_for_cloud_chains_the_parameter_overriding_the_setting(param, setting, names, wanted):
    assert gate_wanted(param, setting, chain(*names)) is wanted


async def test_a_gated_stream_reads_through_to_the_wrapped_one():
    inner = RecordingStream()
    inner.switches = 2                                     # as a FallbackStream has
    stream = await gated(inner, "active", "off", chain("deepgram", "local"), label="sid=test")
    assert isinstance(stream, VadGatedStream) and stream.inner is inner
    assert stream.provider_name == "recorder" and stream.switches == 2
    assert await gated(inner, "off", "active", chain("deepgram")) is inner


async def test_a_fallback_stream_finalizes_only_after_the_audio_before_it():
    # FallbackStream forwards audio from its own task; a pause's finalize must not overtake the
    # audio the gate sent just before it, or the provider would settle too little.
    class Provider:
        name = "recorder"

        def __init__(self) -> None:
            self.streams: list[RecordingStream] = []

        async def open(self, config):
            self.streams.append(RecordingStream())
            return self.streams[-1]

    provider = Provider()
    stream = FallbackStream([Link(provider, {})], StreamConfig(), policy=FallbackPolicy(max_frame_seconds=0.01))
    await stream.start()
    for _ in range(20):                                    # 2 s in 100 ms pieces, then at once:
        await stream.send(np.ones(CHUNK, dtype=np.int16))
    await stream.finalize()
    await stream.send(np.ones(CHUNK, dtype=np.int16))
    await stream.finalize()
    await asyncio.wait_for(stream.close(), 10)
    assert provider.streams[0].finalized_at == [20 * CHUNK, 21 * CHUNK]

