"""``harken sync FILE…``: upload recordings to ``/v1/sync-local-files`` as the Omi app does, with
a progress bar, then follow the job until its conversations are made.

``.bin`` files named as the app names them (``audio_…_{timestamp}.bin``, a device dump) go up
as they are. A WAV file is turned into the app's format first (PCM16 frames of 10 ms, length
prefixed), timed by ``--at`` (Unix seconds) or else by the file's modification time minus its
duration. The body is streamed from disk: nothing is held whole in memory.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx

CHUNK = 256 * 1024


@dataclass
class Upload:
    name: str                  # the name the server sees
    size: int
    chunks: Callable[[], Iterator[bytes]]


def prepare(path: Path, at: float | None = None) -> Upload:
    """One file ready to send (a WAV file is converted to the app's format in memory-sized pieces)."""
    if path.suffix.lower() == ".bin":
        size = path.stat().st_size

        def from_disk() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk
        return Upload(path.name, size, from_disk)
    from .client import read_wav_16k
    from .codecs.wal import sync_filename, wal_bytes

    pcm = read_wav_16k(path)
    start = at if at is not None else path.stat().st_mtime - len(pcm) / 16000
    data = wal_bytes(pcm[i:i + 160].tobytes() for i in range(0, len(pcm), 160))
    return Upload(sync_filename("pcm16", 16000, int(start), device="harkencli"), len(data), lambda: iter([data]))


class MultipartBody:
    """The ``files`` parts of a multipart/form-data body, streamed, reporting bytes sent."""

    def __init__(self, uploads: list[Upload], on_progress: Callable[[int], None]):
        self.boundary = uuid.uuid4().hex
        self.uploads = uploads
        self.on_progress = on_progress
        self.heads = [(f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                       f"filename=\"{u.name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
                      for u in uploads]
        self.tail = f"--{self.boundary}--\r\n".encode()
        self.length = sum(len(h) + u.size + 2 for h, u in zip(self.heads, uploads)) + len(self.tail)

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        for head, upload in zip(self.heads, self.uploads):
            yield head
            for chunk in upload.chunks():
                sent += len(chunk)
                self.on_progress(sent)
                yield chunk
            yield b"\r\n"
        yield self.tail


class ProgressBar:
    def __init__(self, out, total: int):
        self.out, self.total, self.tty = out, max(1, total), out.isatty()
        self._last = -1.0

    def show(self, done: float, label: str) -> None:
        fraction = min(1.0, done / self.total)
        if not self.tty:
            if int(fraction * 10) != int(self._last * 10) or fraction == 1.0 and self._last != 1.0:
                self.out.write(f"{label} {fraction:4.0%}\n")
            self._last = fraction
            self.out.flush()
            return
        width = 30
        filled = int(fraction * width)
        self.out.write(f"\r\x1b[2K[{'#' * filled}{'.' * (width - filled)}] {fraction:4.0%} {label}")
        self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")


def sync_files(paths: list[Path], *, url: str, token: str | None, at: float | None = None, wait: bool = True,
               out=sys.stdout, poll_seconds: float = 1.0, timeout: float = 86400) -> int:
    """Upload ``paths`` in one request and (with ``wait``) follow the job; returns an exit code."""
    uploads = [prepare(p, at) for p in paths]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    total = sum(u.size for u in uploads)
    bar = ProgressBar(out, total)
    body = MultipartBody(uploads, lambda sent: bar.show(sent, f"uploading {sent / 2**20:.1f}/{total / 2**20:.1f} MiB"))
    base = url.rstrip("/")
    with httpx.Client(timeout=httpx.Timeout(60.0, write=None)) as client:
        answer = client.post(f"{base}/v1/sync-local-files", content=iter(body),
                             headers={**headers, "Content-Type": body.content_type,
                                      "Content-Length": str(body.length)})
        bar.end()
        if answer.status_code >= 400:
            out.write(f"refused ({answer.status_code}): {_detail(answer)}\n")
            return 1
        job = answer.json()
        out.write(f"job {job['job_id']}: {job['total_files']} file(s), {job['duplicate_files']} already uploaded\n")
        if not wait:
            return 0
        progress = ProgressBar(out, job["total_files"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = client.get(f"{base}/v1/sync-local-files/{job['job_id']}", headers=headers).json()
            handled = status["processed_files"] + status["duplicate_files"] + status["failed_files"]
            progress.show(handled, f"transcribing: {status['processed_files']}/{status['total_files']} file(s), "
                                   f"{status['audio_seconds']:.0f} s of audio, {status['status']}")
            if status["status"] in ("completed", "failed"):
                progress.end()
                result = status.get("result", {})
                out.write(f"{status['status']}: {len(result.get('new_memories', []))} new and "
                          f"{len(result.get('updated_memories', []))} updated conversation(s); "
                          f"{status['bad_frames']} bad frame(s) skipped, {status['truncated_files']} truncated, "
                          f"{status['failed_files']} unreadable file(s)\n")
                return 0 if status["status"] == "completed" and not status["failed_files"] else 1
            time.sleep(poll_seconds)
    out.write("gave up waiting for the job\n")
    return 1


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:200]


def default_token(url: str, uid: str, data_dir: Path | None) -> str | None:
    token = os.environ.get("HARKEN_TOKEN")
    if token:
        return token
    from .client import local_token_minter

    mint = local_token_minter(url, data_dir)
    return mint(uid) if mint else None
