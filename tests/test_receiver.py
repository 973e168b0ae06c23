"""The reference audio receiver (harken/receiver.py), fed by real webhook delivery over loopback."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from harken.conversations import sign
from harken.receiver import build_receiver_app
from tests.fakes.webhook_receiver import ServedApp
from tests.test_webhooks import SECRET, delivering_service


def read_wav(path: Path) -> tuple[tuple[int, int, int], bytes]:
    with wave.open(str(path), "rb") as w:
        return (w.getnchannels(), w.getsampwidth(), w.getframerate()), w.readframes(w.getnframes())


async def wait_for_file_bytes(path: Path, size: int, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not path.exists() or path.stat().st_size < 44 + size:
            await asyncio.sleep(0.02)


@pytest.mark.timeout(30)
async def test_the_wav_files_written_equal_the_audio_streamed_bit_for_bit(tmp_path):
    rng = np.random.default_rng(3)
    streams = {"sess-one": rng.integers(-32768, 32767, size=int(16000 * 3.3), dtype=np.int16),
               "sess-two": rng.integers(-32768, 32767, size=int(16000 * 1.7), dtype=np.int16)}
    out = tmp_path / "audio"
    async with ServedApp(build_receiver_app(out, secret=SECRET)) as served, \
            delivering_service(tmp_path / "server") as service:
        await service.set_webhook("alice", "audio_bytes", {"url": served.base_url + "/audio", "interval_seconds": 1})
        for session_id, pcm in streams.items():
            live = await service.connect("alice", session_id=session_id)
            sizes = rng.integers(1, 900, size=2000)
            position = 0
            for size in sizes:                                 # uneven frames, as decoders produce
                if position >= len(pcm):
                    break
                live.add_audio(pcm[position:position + size])
                position += size
            await live.close()
        for session_id, pcm in streams.items():
            await wait_for_file_bytes(out / "alice" / f"{session_id}.wav", pcm.nbytes)
        await asyncio.sleep(0.2)                               # nothing more should arrive
        assert await service.store.outbox_counts() == {}
    for session_id, pcm in streams.items():
        params, frames = read_wav(out / "alice" / f"{session_id}.wav")
        assert params == (1, 2, 16000)
        assert frames == pcm.astype("<i2").tobytes()


@pytest.mark.timeout(30)
async def test_a_chunk_delivered_twice_is_written_once_and_bad_requests_are_refused(tmp_path):
    chunk_a, chunk_b = bytes(range(256)) * 4, bytes(reversed(range(256))) * 2

    def headers(body: bytes, offset: int | None, session: str | None = "s1", secret: str = SECRET) -> dict:
        out = {"X-Harken-Signature": sign(secret, body), "Content-Type": "application/octet-stream"}
        if offset is not None:
            out["X-Harken-Audio-Offset"] = str(offset)
        if session:
            out["X-Harken-Session"] = session
        return out

    async with ServedApp(build_receiver_app(tmp_path, secret=SECRET)) as served, \
            httpx.AsyncClient(base_url=served.base_url) as client:
        params = {"uid": "bob", "sample_rate": "16000"}
        for body, offset in [(chunk_a, 0), (chunk_b, len(chunk_a)), (chunk_a, 0), (chunk_b, len(chunk_a))]:
            assert (await client.post("/x", params=params, content=body, headers=headers(body, offset))).status_code == 200
        assert read_wav(tmp_path / "bob" / "s1.wav")[1] == chunk_a + chunk_b

        # Senders without Harken's headers (Omi) get their chunks appended in one burst file.
        for body in (chunk_a, chunk_b):
            assert (await client.post("/", params=params, content=body,
                                      headers=headers(body, None, session=None))).status_code == 200
        (burst,) = [p for p in (tmp_path / "bob").glob("*.wav") if p.name != "s1.wav"]
        assert burst.name[:8].isdigit() and read_wav(burst)[1] == chunk_a + chunk_b

        unsigned = await client.post("/", params=params, content=chunk_a)
        forged = await client.post("/", params=params, content=chunk_a, headers=headers(chunk_a, 0, secret="guess"))
        odd = await client.post("/", params=params, content=b"\x01\x02\x03", headers=headers(b"\x01\x02\x03", 0))
        no_uid = await client.post("/", content=chunk_a, headers=headers(chunk_a, 0))
        assert [r.status_code for r in (unsigned, forged, odd, no_uid)] == [401, 401, 400, 400]

        escaping = await client.post("/", params={"uid": "../../etc"}, content=chunk_a,
                                     headers=headers(chunk_a, 0, session="../x"))
        assert escaping.status_code == 200
        written = tmp_path / escaping.json()["file"]
        assert written.resolve().is_relative_to(tmp_path.resolve()) and read_wav(written)[1] == chunk_a
