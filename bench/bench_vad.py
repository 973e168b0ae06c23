"""The VAD gate for cloud providers: what the VAD costs, and how much audio the gate keeps away
from the provider.

1. VAD cost: ``StreamingVAD`` (Silero v6 ONNX, one thread) over the development recordings
   (tests/data/audio, 16 files, real and espeak speech) in 100 ms chunks, as the gate runs it:
   CPU seconds per audio second (the real-time factor), µs per 32 ms window, against reading the
   same audio's RMS with numpy (the cheapest "is anything there" test), measured in the same run.
2. Share removed: the same 16 files joined with pauses of quiet noise (about -64 dBFS, RMS 20),
   1 s of it first; pauses of 1.5 s, 3–5 s (uniform, seeded), 8 s and 20 s, through
   ``VadGatedStream`` with Omi's settings (threshold 0.65, 300 ms pre-roll, closed after 4 s of
   silence) over a stream that only counts: seconds in, seconds forwarded, share removed, against
   the pauses' share of the audio.
3. Through the gateway: the 8 s case streamed to /v4/listen (pcm16, as fast as the server takes
   it) with ``vad_gate=off`` and ``active``, to a fake Deepgram on loopback (real SDK and wire
   protocol): seconds the provider received, and the whole process's CPU seconds per audio
   second (client, gateway and fake share the process; the difference is what gating costs or
   saves end to end).

Run: .venv/bin/python bench/bench_vad.py [--repeats N]. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harken.audio.vad import WINDOW_SAMPLES, SileroVAD, StreamingVAD  # noqa: E402
from harken.client import listen_url, stream_messages  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402
from harken.stt.base import SAMPLE_RATE, STTStream  # noqa: E402
from harken.stt.vad_gate import VadGatedStream  # noqa: E402
from tests.conftest import load_audio, test_settings, transcripts  # noqa: E402
from tests.fakes.deepgram import FakeDeepgram  # noqa: E402
from tests.fakes.recording import speech_with_pauses  # noqa: E402
from tests.gateway_server import GatewayServer  # noqa: E402

CHUNK = SAMPLE_RATE // 10
KEY = secrets.token_hex(8)          # any key: the fake providers on loopback check it


def section(title: str) -> None:
    print(f"\n== {title}")


def utterances() -> list[tuple[np.ndarray, str]]:
    return [(load_audio(row["file"]), row["reference"]) for row in transcripts()]


# --- 1. VAD cost ------------------------------------------------------------------------------
def vad_cost(audio: np.ndarray, repeats: int) -> None:
    section(f"VAD cost ({audio.size / SAMPLE_RATE:.1f} s of the development files, 100 ms chunks, "
            f"best of {repeats})")
    model = SileroVAD.shared()
    seconds = audio.size / SAMPLE_RATE
    vad_best = rms_best = float("inf")
    for _ in range(repeats):
        vad = StreamingVAD(model)
        began = time.process_time()
        for i in range(0, audio.size, CHUNK):
            vad.process(audio[i:i + CHUNK])
        vad_best = min(vad_best, time.process_time() - began)
        began = time.process_time()
        for i in range(0, audio.size, CHUNK):
            chunk = audio[i:i + CHUNK].astype(np.float32)
            float(np.sqrt(np.mean(chunk * chunk)))
        rms_best = min(rms_best, time.process_time() - began)
    windows = audio.size // WINDOW_SAMPLES
    print(f"  Silero: {vad_best / seconds:.4f} CPU-s per audio-s ({seconds / vad_best:.0f}× faster than real "
          f"time), {vad_best / windows * 1e6:.0f} µs per 32 ms window")
    print(f"  numpy RMS: {rms_best / seconds:.5f} CPU-s per audio-s; Silero costs {vad_best / max(rms_best, 1e-9):.0f}× that")


# --- 2. share removed --------------------------------------------------------------------------
class CountingStream(STTStream):
    provider_name = "counter"

    def __init__(self) -> None:
        self.samples = 0
        self.finalizes = 0

    async def send(self, pcm):
        self.samples += len(pcm)

    async def finalize(self):
        self.finalizes += 1

    async def close(self):
        pass

    async def __aiter__(self):
        return
        yield


async def share_removed(speech: list[tuple[np.ndarray, str]]) -> None:
    section("Share the gate removes (16 files, pauses of quiet noise; threshold 0.65, pre-roll 300 ms, "
            "closed after 4 s)")
    rng = np.random.default_rng(0)
    for name, pauses in (("1.5 s pauses", [1.5] * len(speech)), ("3–5 s pauses", list(rng.uniform(3, 5, len(speech)))),
                         ("8 s pauses", [8.0] * len(speech)), ("20 s pauses", [20.0] * len(speech))):
        # speech_with_pauses takes one pause length: join the files one by one for varied pauses.
        parts = [speech_with_pauses([u], p, lead=1.0 if i == 0 else 0.0, seed=i).recording
                 for i, (u, p) in enumerate(zip(speech, pauses))]
        recording = np.concatenate(parts)
        pause_share = (1.0 + sum(pauses)) * SAMPLE_RATE / recording.size
        inner = CountingStream()
        gate = VadGatedStream(inner)
        began = time.process_time()
        for i in range(0, recording.size, CHUNK):
            await gate.send(recording[i:i + CHUNK])
        await gate.close()
        cpu = time.process_time() - began
        s = gate.stats
        print(f"  {name:13s}: {s.received_seconds:6.1f} s in, {s.forwarded_seconds:6.1f} s forwarded, "
              f"removed {s.removed_share:5.1%} (pauses are {pause_share:5.1%}; VAD speech {s.speech_seconds:5.1f} s); "
              f"{inner.finalizes} finalizes; gate {cpu / s.received_seconds:.4f} CPU-s per audio-s")


# --- 3. through the gateway ---------------------------------------------------------------------
async def through_gateway(speech: list[tuple[np.ndarray, str]], tmp: Path) -> None:
    section("Through the gateway to a fake Deepgram (the 16 files, 8 s pauses, pcm16, as fast as taken)")
    joined = speech_with_pauses(speech, 8.0)
    messages = [joined.recording[i:i + CHUNK].tobytes() for i in range(0, joined.recording.size, CHUNK)]
    async with FakeDeepgram(joined.script, key=KEY, recording=joined.recording) as deepgram:
        server = GatewayServer(test_settings(tmp, deepgram_api_key=KEY, deepgram_url=deepgram.url,
                                             stt_chain="dg-nova-3")).start()
        try:
            token = mint_local_token(server.settings, f"bench-{uuid.uuid4().hex[:6]}", 600)
            for mode in ("off", "active"):
                url = listen_url(server.base, codec="pcm16", sample_rate=16000, vad_gate=mode)
                began_cpu, began = time.process_time(), time.perf_counter()
                result = await stream_messages(url, messages, 0.1, token=token, realtime=False, settle_seconds=3.0)
                cpu, wall = time.process_time() - began_cpu, time.perf_counter() - began
                connection = deepgram.accepted[-1]
                words = sum(len(s["text"].split()) for s in result.segments.values())
                print(f"  vad_gate={mode:6s}: streamed {joined.seconds:5.1f} s, provider received "
                      f"{connection.listener.now:5.1f} s ({connection.listener.now / joined.seconds:5.1%}), "
                      f"{connection.controls['Finalize']} Finalize, {words} words; process "
                      f"{cpu / joined.seconds:.4f} CPU-s per audio-s (wall {wall:.1f} s, incl. 3 s settle)")
        finally:
            await asyncio.to_thread(server.stop)     # the fake must keep answering while it closes


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing passes for the VAD cost")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    speech = utterances()
    vad_cost(np.concatenate([pcm for pcm, _ in speech]), args.repeats)
    await share_removed(speech)
    with tempfile.TemporaryDirectory() as tmp:
        await through_gateway(speech, Path(tmp))


if __name__ == "__main__":
    asyncio.run(main())
