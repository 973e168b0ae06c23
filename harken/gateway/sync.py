"""``POST /v1/sync-local-files``: the Omi app's upload of audio recorded offline (and
``/v2/sync-local-files``, upstream's asynchronous variant), and the job's status.

The request is ``multipart/form-data`` with one or more files in the ``files`` field, named as
the app names its WAL files (``codecs.wal``). Each file streams to the data folder
(``DATA_DIR/sync/<job>/<n>.bin``) as it arrives, hashed and its frames counted on the way, never
held whole in memory; ``sync_max_file_mb`` and ``sync_max_upload_mb`` bound a file and the
request (413 as soon as one is passed, with what was written deleted). A name that is not a
WAL file name, a timestamp before 2024 or in the future, a body that is not multipart, or no
file at all: 400 with the reason, and nothing is kept.

Then the job is queued (``conversations.sync_jobs``) and the answer goes back at once; the
``SyncWorker`` transcribes in the background. ``/v1`` answers 200 with upstream v1's keys
(``new_memories``, ``updated_memories``: empty, since nothing is transcribed yet) plus the job's
id and status; ``/v2`` answers 202 as upstream v2 does. ``GET /v1|v2/sync-local-files/{job_id}``
gives the status: ``queued``, ``processing``, ``completed`` or ``failed`` (upstream's words), the
file counts, and once completed the conversations made and updated.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..codecs import UnsupportedFormat, decoder_for
from ..codecs.wal import BadSyncFile, FrameCounter, SyncFileName, parse_sync_filename
from ..conversations.sync_jobs import DONE, DUPLICATE, FAILED, PROCESSING, QUEUED, SyncJobs, UploadedFile
from .auth import Authenticator
from .multipart import MultipartError, MultipartReader, PartData, PartEnd, PartStart, boundary_of
from .rest import _error, authentication
from .sync_worker import SyncWorker, job_result

log = logging.getLogger("harken.sync")

MIB = 1024 * 1024
POLL_AFTER_MS = 3000
# Upstream's words for a job's status.
_STATUS_WORDS = {QUEUED: "queued", PROCESSING: "processing", DONE: "completed", FAILED: "failed"}


class _Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class _FileSink:
    """One uploaded file on its way to disk: written, hashed and its frames counted in a worker
    thread, a chunk at a time."""

    def __init__(self, path: Path, name: str, info: SyncFileName):
        self.path, self.name, self.info = path, name, info
        self.file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.counter = FrameCounter()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.counter.feed(data)

    def close(self) -> None:
        self.file.close()

    def uploaded(self, idx: int) -> UploadedFile:
        stats = self.counter.finish()
        return UploadedFile(idx=idx, name=self.name, path=str(self.path), sha256=self.sha256.hexdigest(),
                            size=self.size, recorded_at=self.info.timestamp,
                            estimated_seconds=round(self.info.estimate_seconds(stats.frames, stats.payload_bytes), 3))


async def receive_files(request: Request, folder: Path, *, max_file: int, max_request: int) -> list[UploadedFile]:
    """Stream the multipart body's files into ``folder``; ``_Refused`` (and nothing left on
    disk) if the body, a name or a size is not acceptable."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_request:
        raise _Refused(413, f"the upload is {int(declared) / MIB:.1f} MiB; at most {max_request / MIB:.0f} MiB "
                            "per request (send fewer files at a time)")
    try:
        reader = MultipartReader(boundary_of(request.headers.get("content-type", "")))
    except MultipartError as exc:
        raise _Refused(400, str(exc)) from None
    folder.mkdir(parents=True, exist_ok=True)
    sinks: list[_FileSink] = []
    sink: _FileSink | None = None
    total = 0
    now = time.time()
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_request:
                raise _Refused(413, f"the upload is over {max_request / MIB:.0f} MiB, the most per request")
            try:
                events = reader.feed(chunk)
            except MultipartError as exc:
                raise _Refused(400, str(exc)) from None
            data: list[bytes] = []
            for event in events:
                if isinstance(event, PartStart):
                    if event.filename is None:
                        continue                      # a plain form field: not ours
                    try:
                        info = parse_sync_filename(event.filename, now=now)
                        await asyncio.to_thread(_check_decodable, info)
                    except BadSyncFile as exc:
                        raise _Refused(400, str(exc)) from None
                    except UnsupportedFormat as exc:
                        raise _Refused(400, f"{event.filename}: {exc}") from None
                    sink = _FileSink(folder / f"{len(sinks)}.bin", event.filename, info)
                    sinks.append(sink)
                elif isinstance(event, PartData) and sink is not None:
                    sink.size += len(event.data)
                    if sink.size > max_file:
                        raise _Refused(413, f"{sink.name} is over {max_file / MIB:.0f} MiB, the most per file")
                    data.append(event.data)
                elif isinstance(event, PartEnd) and sink is not None:
                    if data:
                        await asyncio.to_thread(sink.write, b"".join(data))
                        data = []
                    sink.close()
                    sink = None
            if data and sink is not None:
                await asyncio.to_thread(sink.write, b"".join(data))
        try:
            reader.close()
        except MultipartError as exc:
            raise _Refused(400, str(exc)) from None
        if not sinks:
            raise _Refused(400, "no files: send the recordings as multipart files in the 'files' field")
        return [s.uploaded(i) for i, s in enumerate(sinks)]
    except BaseException:
        for s in sinks:
            s.close()
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _check_decodable(info: SyncFileName) -> None:
    """``UnsupportedFormat`` if the live codec plugins cannot decode what the name declares."""
    decoder_for(info.codec, info.sample_rate, info.channels).close()


def build_sync_routes(get_settings: Callable[[], Any], get_worker: Callable[[], SyncWorker | None],
                      authenticator: Authenticator | Callable[[], Authenticator]) -> list[Route]:
    """The sync routes; the arguments are functions, for an app that builds these in its lifespan."""
    authenticated = authentication(authenticator)

    def get_jobs() -> SyncJobs | None:
        worker = get_worker()
        return worker.jobs if worker is not None else None

    async def upload(request: Request, uid: str) -> Response:
        jobs, settings = get_jobs(), get_settings()
        if jobs is None:
            return _error(503, "the server is starting", **{"Retry-After": "5"})
        job_id = str(uuid.uuid4())
        folder = Path(settings.data_dir) / "sync" / job_id
        try:
            files = await receive_files(request, folder, max_file=int(settings.sync_max_file_mb * MIB),
                                        max_request=int(settings.sync_max_upload_mb * MIB))
        except _Refused as exc:
            log.info("sync upload of uid=%s refused (%d): %s", uid, exc.status, exc.detail)
            return _error(exc.status, exc.detail)
        try:
            statuses = await jobs.create(job_id, uid, files, now=time.time())
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        for file, status in zip(files, statuses):
            if status == DUPLICATE:                       # already transcribed: keep nothing
                Path(file.path).unlink(missing_ok=True)
        worker = get_worker()
        if worker is not None:
            worker.wake()
        queued = statuses.count(QUEUED)
        log.info("sync job %s queued for uid=%s: %d file(s), %d already uploaded before", job_id, uid, queued,
                 len(files) - queued)
        body = {"job_id": job_id, "status": "queued" if queued else "completed", "total_files": len(files),
                "duplicate_files": len(files) - queued, "total_segments": 0, "poll_after_ms": POLL_AFTER_MS}
        if request.url.path.startswith("/v2/"):
            return JSONResponse(body, status_code=202)
        return JSONResponse({"new_memories": [], "updated_memories": [], **body})

    async def status(request: Request, uid: str) -> Response:
        jobs = get_jobs()
        if jobs is None:
            return _error(503, "the server is starting", **{"Retry-After": "5"})
        job = await jobs.get(request.path_params["job_id"])
        if job is None or job["uid"] != uid:
            return _error(404, "sync job not found")
        return JSONResponse(job_status(job))

    return [
        Route("/v1/sync-local-files", authenticated(upload), methods=["POST"]),
        Route("/v2/sync-local-files", authenticated(upload), methods=["POST"]),
        Route("/v1/sync-local-files/{job_id}", authenticated(status), methods=["GET"]),
        Route("/v2/sync-local-files/{job_id}", authenticated(status), methods=["GET"]),
    ]


def job_status(job: dict) -> dict:
    """The status body: upstream v2's keys, with file and audio counts added."""
    files = job["files"]
    stats = [orjson.loads(f["stats"]) if f["stats"] else {} for f in files]
    by_status = [f["status"] for f in files]
    body = {
        "job_id": job["id"],
        "status": _STATUS_WORDS.get(job["status"], job["status"]),
        "total_files": len(files),
        "processed_files": by_status.count(DONE),
        "queued_files": by_status.count(QUEUED),
        "duplicate_files": by_status.count(DUPLICATE),
        "failed_files": by_status.count(FAILED),
        "total_segments": sum(s.get("segments", 0) for s in stats),
        "audio_seconds": round(sum(s.get("audio_seconds", 0.0) for s in stats), 3),
        "audio_seconds_waiting": round(sum(f["estimated_seconds"] for f in files if f["status"] == QUEUED), 3),
        "bad_frames": sum(s.get("bad_frames", 0) for s in stats),
        "truncated_files": sum(1 for s in stats if s.get("truncated")),
        # Which engines transcribed the files: a cloud provider's pre-recorded API, or local.
        "transcribed_by": sorted({s["engine"] for s in stats if s.get("engine")}),
        # Upstream's list of what went wrong (capped): here, files that could not be read at all.
        "errors": [f"{f['name']}: {s['error']}" for f, s in zip(files, stats) if s.get("error")][:10],
    }
    if job["status"] in (DONE, FAILED):
        result = orjson.loads(job["result"]) if job.get("result") else job_result(job)
        body["result"] = {"new_memories": result.get("new_memories", []),
                          "updated_memories": result.get("updated_memories", [])}
        if job.get("error"):
            body["error"] = job["error"]
    return body
