"""Reference receiver for the audio-bytes webhook: ``harken receive-audio --dir DIR``.

Like the storage example of Omi's audio-streaming guide, but local: every chunk is appended to
a playable WAV file, ``DIR/<uid>/<session>.wav``, whose header is fixed after each write.
Harken's chunks carry ``X-Harken-Session`` and ``X-Harken-Audio-Offset``; each is written at its
offset, so a chunk delivered twice (delivery is at-least-once) overwrites itself and the file
stays exactly the audio streamed. Senders without those headers (Omi) get one file per burst
of chunks, ``DIR/<uid>/<yyyymmdd-hhmmss>.wav``, a new one after ``NEW_FILE_AFTER`` seconds of quiet.
When a secret is given, unsigned or wrongly signed requests are refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import time
from datetime import datetime, timezone
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .conversations.webhooks import AUDIO_OFFSET_HEADER, SESSION_HEADER, SIGNATURE_HEADER, verify_signature

WAV_HEADER_BYTES = 44
NEW_FILE_AFTER = 60.0
MAX_CHUNK_BYTES = 32 * 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def safe_name(value: str) -> str:
    """A path component that cannot escape DIR: the value itself if harmless, else a hash."""
    if _SAFE_NAME.match(value) and ".." not in value:
        return value
    return "h-" + hashlib.sha256(value.encode()).hexdigest()[:32]


def wav_header(data_bytes: int, sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits)
            + b"data" + struct.pack("<I", data_bytes))


def write_chunk(path: Path, offset: int | None, chunk: bytes, sample_rate: int) -> int:
    """Write ``chunk`` at ``offset`` of the file's audio (None: append); fix the header.
    Returns the audio bytes now in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "r+b" if path.exists() else "w+b") as f:
        size = max(0, f.seek(0, 2) - WAV_HEADER_BYTES)
        if size == 0:
            f.seek(0)
            f.write(wav_header(0, sample_rate))
        else:
            f.seek(24)
            sample_rate = struct.unpack("<I", f.read(4))[0]    # the file's rate wins
        position = size if offset is None else offset
        f.seek(WAV_HEADER_BYTES + position)
        f.write(chunk)
        size = max(size, position + len(chunk))
        f.seek(0)
        f.write(wav_header(size, sample_rate))
    return size


def build_receiver_app(directory: str | Path, *, secret: str = "") -> Starlette:
    root = Path(directory)
    locks: dict[Path, asyncio.Lock] = {}
    bursts: dict[str, tuple[Path, float]] = {}      # uid → (file, last chunk) for header-less senders

    def target(uid: str, session: str | None) -> Path:
        folder = root / safe_name(uid)
        if session:
            return folder / f"{safe_name(session)}.wav"
        now = time.monotonic()
        current = bursts.get(uid)
        if current is None or now - current[1] > NEW_FILE_AFTER:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            current = (folder / f"{stamp}.wav", now)
        bursts[uid] = (current[0], now)
        return current[0]

    async def receive(request: Request) -> JSONResponse:
        uid = request.query_params.get("uid")
        if not uid:
            return JSONResponse({"detail": "missing uid parameter"}, status_code=400)
        try:
            sample_rate = int(request.query_params.get("sample_rate", "16000"))
            offset_header = request.headers.get(AUDIO_OFFSET_HEADER)
            offset = int(offset_header) if offset_header is not None else None
        except ValueError:
            return JSONResponse({"detail": "sample_rate and the offset must be whole numbers"}, status_code=400)
        if not 1000 <= sample_rate <= 192000 or (offset is not None and (offset < 0 or offset % 2)):
            return JSONResponse({"detail": "bad sample_rate or offset"}, status_code=400)
        body = await request.body()
        if secret and not verify_signature(secret, body, request.headers.get(SIGNATURE_HEADER)):
            return JSONResponse({"detail": "bad or missing signature"}, status_code=401)
        if len(body) % 2 or len(body) > MAX_CHUNK_BYTES:
            return JSONResponse({"detail": "the body must be 16-bit PCM"}, status_code=400)
        path = target(uid, request.headers.get(SESSION_HEADER))
        lock = locks.setdefault(path, asyncio.Lock())
        async with lock:
            size = await asyncio.to_thread(write_chunk, path, offset, body, sample_rate)
        return JSONResponse({"file": str(path.relative_to(root)), "bytes": size})

    return Starlette(routes=[Route("/", receive, methods=["POST"]),
                             Route("/{path:path}", receive, methods=["POST"])])


def run(directory: str | Path, host: str = "127.0.0.1", port: int = 8081, *, secret: str = "") -> None:
    import uvicorn

    uvicorn.run(build_receiver_app(directory, secret=secret), host=host, port=port)
