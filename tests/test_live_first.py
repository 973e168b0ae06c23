"""Live decodes go first: the batch engine (uploads) starts no decode while the live engine has one
queued or running. Shown by the order of real decodes of real speech on the real engines, not by
timing: every decode start and end is recorded from the threads that run them."""

from __future__ import annotations

import asyncio

import pytest

from harken.audio import Utterance
from harken.config import Settings
from harken.stt.batch import BatchTranscriber
from harken.stt.decoding import Decoding
from harken.stt.whisper import WhisperProvider

from .conftest import load_audio

pytestmark = pytest.mark.timeout(300)

BATCH_UTTERANCES = 24
ROUNDS = 4                   # times live decodes arrive while a batch decode runs
LIVE_PER_ROUND = 2


def traced(events: list, kind: str, decode):
    """``decode`` that notes when it starts and ends (``list.append`` is atomic across threads)."""
    def run(*args, **kwargs):
        events.append((kind, "start"))
        try:
            return decode(*args, **kwargs)
        finally:
            events.append((kind, "end"))
    return run


async def decode_while_live_arrives(tmp_path, *, gated: bool) -> tuple[list, int, BatchTranscriber]:
    live = WhisperProvider(Settings(data_dir=tmp_path, whisper_workers=1, whisper_threads=1))
    batch = BatchTranscriber(Settings(data_dir=tmp_path), nice=0, threads=1,
                             live_gate=live.live_gate if gated else None)
    events: list = []
    try:
        await live.load()
        await batch.load()
        decoding, model = await batch.decoding_for("en")
        speech = load_audio("ss_0890.wav")
        utterances = [Utterance(start=n * speech.size, pcm=speech, speech_windows=speech.size // 512)
                      for n in range(BATCH_UTTERANCES)]
        batch.engine.decode_clip = traced(events, "batch", batch.engine.decode_clip)
        live.decode_clip = traced(events, "live", live.decode_clip)
        batch_job = asyncio.ensure_future(batch.pool.run(batch.decode, utterances, decoding, model))
        arrived_during_batch = 0
        for _ in range(ROUNDS):
            # Wait until a batch decode is running, then queue live decodes at that moment.
            async with asyncio.timeout(120):
                while not (events and events[-1] == ("batch", "start")):
                    await asyncio.sleep(0.005)
            arrived_during_batch += 1
            events += [("live", "queued")] * LIVE_PER_ROUND
            futures = [live.submit(speech, Decoding("en")) for _ in range(LIVE_PER_ROUND)]
            await asyncio.gather(*futures)
        words, _, _ = await batch_job
        assert words                                   # the batch did its work
        return events, arrived_during_batch, batch
    finally:
        await batch.aclose()
        await live.aclose()


def batch_starts_while_live_waits(events: list) -> int:
    """Batch decodes that started while a live decode was queued or running."""
    waiting, count = 0, 0
    for kind, what in events:
        if kind == "live":
            waiting += {"queued": 1, "end": -1}.get(what, 0)
        elif what == "start" and waiting:
            count += 1
    return count


async def test_no_batch_decode_starts_while_a_live_decode_is_queued_or_running(tmp_path):
    events, arrived, batch = await decode_while_live_arrives(tmp_path, gated=True)
    assert arrived == ROUNDS
    assert sum(1 for e in events if e == ("live", "end")) == ROUNDS * LIVE_PER_ROUND
    assert sum(1 for e in events if e == ("batch", "end")) == BATCH_UTTERANCES
    # Each round's live decodes waited at most for the one batch decode already running.
    assert batch_starts_while_live_waits(events) == 0, events
    assert batch.pool.live_gate.batch_waits >= ROUNDS
