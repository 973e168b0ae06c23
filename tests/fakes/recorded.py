"""The three cloud providers' pre-recorded (batch) APIs on loopback, speaking their real HTTP protocol.

Each hears the WAV it is sent the way a real engine would: the clip is cut from a *known
recording* (``recording.speech_with_pauses``: dithered, so every 64 samples are unique), and
``RecordedEar`` finds each stretch of the clip in the recording and reports the scripted words
it heard, timed on the clip (``RecordingListener``). Words cut away (silence that was not sent)
are not reported, as a real engine would not hear them.

- ``FakeDeepgramRecorded``: ``POST /v1/listen`` (``Authorization: Token``), the audio as the body,
  options in the query; answers a ``ListenV1Response`` (metadata; results.channels[0].alternatives[0]
  with ``words``: word, start, end, confidence, punctuated_word, speaker, speaker_confidence).
  Errors: ``{"err_code", "err_msg", "request_id"}`` with the status.
- ``FakeSonioxRecorded``: under ``/v1`` (``Authorization: Bearer``): ``POST /files`` (multipart
  ``file``) → 201 File; ``POST /transcriptions`` (JSON: model, file_id, language_hints, …) → 201
  Transcription ``queued``; ``GET /transcriptions/{id}`` → ``processing`` on the first look, then
  ``completed`` (or ``error`` with error_type/error_message); ``GET …/transcript`` → ``{id, text,
  tokens}`` (sub-word tokens, a leading space starts a word, speakers "1", "2"…); ``DELETE`` of a
  transcription or a file → 204. Errors: ``{"status_code", "error_type", "message",
  "validation_errors", "request_id"}``.
- ``FakeSpeechmaticsRecorded``: under ``/v2`` (``Authorization: Bearer``): ``POST /jobs``
  (multipart ``config`` JSON + ``data_file``) → 201 ``{"id"}``; ``GET /jobs/{id}`` → ``{"job":
  {…, "status": "running"}}`` on the first look, then ``done`` (or ``rejected`` with ``errors``);
  ``GET /jobs/{id}/transcript`` → json-v2 (``results`` as a real-time AddTranscript's);
  ``DELETE /jobs/{id}`` → ``{"job"}``. Errors: ``{"code", "error", "detail"}``.

``plans`` script what the next transcription requests meet, one entry per request (Deepgram's
POST, Soniox's and Speechmatics' job creation): an HTTP status to answer with, ``"job_error"``
(an async job that ends in error / rejected; Deepgram has no async job), or None (transcribe).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import uuid
import wave
from dataclasses import replace

import numpy as np

from .recording import MATCH_SAMPLES, RecordingListener
from .script import ScriptWord
from .soniox import FakeSoniox
from .speechmatics import FakeSpeechmatics
from .webhook_receiver import LoopbackHTTPServer, Request

CREATED = "2026-01-01T00:00:00Z"


class RecordedEar:
    """Hears a WAV clip cut from ``recording``: the script's words in it, on the clip's time line,
    with the speakers numbered as a real pre-recorded API numbers them: afresh in every request,
    from 0 in the order they first speak in it (``numberings`` keeps, per request, which script
    speaker got which number)."""

    def __init__(self, recording: np.ndarray, script: list[ScriptWord]):
        self.recording, self.script = recording, script
        self.seconds_heard = 0.0          # audio received, every clip
        self.numberings: list[dict[int, int]] = []

    def words(self, wav: bytes) -> list[ScriptWord]:
        with wave.open(io.BytesIO(wav)) as reader:
            if (reader.getframerate(), reader.getnchannels(), reader.getsampwidth()) != (16000, 1, 2):
                raise ValueError("not 16 kHz mono PCM16")
            pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16)
        self.seconds_heard += pcm.size / 16000
        listener = RecordingListener(self.recording, self.script, delay=0.0)
        # In pieces of one probe: silence between stretches is dropped without taking speech with it.
        for i in range(0, pcm.size, MATCH_SAMPLES):
            listener.hear(pcm[i:i + MATCH_SAMPLES].tobytes())
        words = listener.due(flush=True)
        numbers: dict[int, int] = {}
        for word in sorted(words, key=lambda w: w.start):
            if word.speaker >= 0:                      # -1: a speaker it could not tell stays so
                numbers.setdefault(word.speaker, len(numbers))
        self.numberings.append(numbers)
        return [replace(word, speaker=numbers.get(word.speaker, word.speaker)) for word in words]


def multipart_fields(request: Request) -> dict[str, bytes]:
    """The parts of a multipart/form-data body by field name (RFC 7578: parts between
    ``--boundary`` lines, each with its headers, a blank line and the content)."""
    boundary = re.search(r'boundary="?([^";]+)"?', request.headers.get("content-type", ""))
    if boundary is None:
        return {}
    fields = {}
    for part in request.body.split(b"--" + boundary.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break                                     # the closing delimiter
        head, _, content = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if name is not None:
            fields[name.group(1).decode()] = content[:-2] if content.endswith(b"\r\n") else content
    return fields


def _json(status: int, body) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


class _FakeRecorded(LoopbackHTTPServer):
    auth_scheme = "Bearer"

    def __init__(self, ear: RecordedEar, key: str = "test-key"):
        super().__init__()
        self.ear, self.key = ear, key
        self.plans: list = []
        self.requests: list[Request] = []
        self.transcriptions = 0              # transcription requests (jobs created), failed ones too
        self._ids = itertools.count(1)

    def new_id(self) -> str:
        return str(uuid.UUID(int=next(self._ids)))

    def next_plan(self):
        self.transcriptions += 1
        return self.plans.pop(0) if self.plans else None

    async def handle(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        self.requests.append(request)
        if request.headers.get("authorization") != f"{self.auth_scheme} {self.key}":
            return self.error(401, "invalid API key")
        return await self.route(request)

    async def route(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    def error(self, status: int, message: str) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError

    @staticmethod
    def public(job: dict) -> dict:
        """A job as the API shows it (without the fake's own bookkeeping keys)."""
        return {k: v for k, v in job.items() if not k.startswith("_")}


class FakeDeepgramRecorded(_FakeRecorded):
    auth_scheme = "Token"

    @property
    def url(self) -> str:
        return self.base_url          # the SDK appends /v1/listen

    def error(self, status: int, message: str):
        return _json(status, {"err_code": str(status), "err_msg": message, "request_id": str(uuid.uuid4())})

    async def route(self, request: Request):
        if (request.method, request.path) != ("POST", "/v1/listen"):
            return self.error(404, "not found")
        plan = self.next_plan()
        if isinstance(plan, int):
            return self.error(plan, "scripted failure")
        try:
            words = self.ear.words(request.body)
        except (ValueError, EOFError, wave.Error) as exc:
            return self.error(400, f"Bad Request: failed to process audio: {exc}")
        diarize = request.query.get("diarize") == "true"
        model = request.query.get("model", "base")
        items = [{"word": w.text.strip(".,?!").lower(), "start": w.start, "end": w.end, "confidence": w.confidence,
                  "punctuated_word": w.text, **({"speaker": w.speaker, "speaker_confidence": 0.9} if diarize else {})}
                 for w in words]
        model_id = str(uuid.uuid4())
        return _json(200, {
            "metadata": {"transaction_key": "deprecated", "request_id": str(uuid.uuid4()), "sha256": "0" * 64,
                         "created": CREATED, "duration": round(self.ear.seconds_heard, 3), "channels": 1,
                         "models": [model_id], "model_info": {model_id: {"name": model, "version": "2025-01-01",
                                                                         "arch": model}}},
            "results": {"channels": [{"alternatives": [{
                "transcript": " ".join(w.text for w in words), "confidence": 0.98 if words else 0.0,
                "words": items}]}]},
        })


class FakeSonioxRecorded(_FakeRecorded):
    def __init__(self, ear: RecordedEar, key: str = "test-key"):
        super().__init__(ear, key)
        self.files: dict[str, bytes] = {}            # uploaded and not deleted
        self.jobs: dict[str, dict] = {}              # transcriptions not deleted
        self.configs: list[dict] = []                # every transcription request's JSON

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def error(self, status: int, message: str):
        kinds = {400: "invalid_request", 401: "unauthenticated", 404: "not_found", 429: "rate_limit_exceeded"}
        return _json(status, {"status_code": status, "error_type": kinds.get(status, "internal_error"),
                              "message": message, "validation_errors": [], "request_id": str(uuid.uuid4())})

    async def route(self, request: Request):
        parts = request.path.removeprefix("/v1/").split("/")
        if request.method == "POST" and parts == ["files"]:
            fields = multipart_fields(request)
            if "file" not in fields:
                return self.error(400, "file is required")
            file_id = self.new_id()
            self.files[file_id] = fields["file"]
            return _json(201, {"id": file_id, "filename": "recording.wav", "size": len(fields["file"]),
                               "created_at": CREATED, "client_reference_id": None})
        if request.method == "POST" and parts == ["transcriptions"]:
            config = json.loads(request.body)
            self.configs.append(config)
            plan = self.next_plan()
            if isinstance(plan, int):
                return self.error(plan, "scripted failure")
            if config.get("file_id") not in self.files or not config.get("model"):
                return self.error(400, "file_id or model missing")
            job = {"id": self.new_id(), "status": "queued", "created_at": CREATED, "model": config["model"],
                   "audio_url": None, "file_id": config["file_id"], "filename": "recording.wav",
                   "language_hints": config.get("language_hints"),
                   "enable_speaker_diarization": bool(config.get("enable_speaker_diarization")),
                   "enable_language_identification": bool(config.get("enable_language_identification")),
                   "audio_duration_ms": None, "error_type": None, "error_message": None, "webhook_url": None,
                   "webhook_auth_header_name": None, "webhook_auth_header_value": None,
                   "webhook_status_code": None, "client_reference_id": None, "_plan": plan, "_looks": 0}
            self.jobs[job["id"]] = job
            return _json(201, self.public(job))
        if parts[0] == "transcriptions" and len(parts) >= 2:
            job = self.jobs.get(parts[1])
            if job is None:
                return self.error(404, "transcription not found")
            if request.method == "DELETE" and len(parts) == 2:
                del self.jobs[parts[1]]
                return 204, {}, b""
            if request.method == "GET" and len(parts) == 2:
                job["_looks"] += 1
                if job["_looks"] == 1:
                    job["status"] = "processing"
                elif job["_plan"] == "job_error":
                    job.update(status="error", error_type="audio_decode_error", error_message="scripted job failure")
                else:
                    job["status"] = "completed"
                return _json(200, self.public(job))
            if request.method == "GET" and parts[2:] == ["transcript"]:
                if job["status"] != "completed":
                    return self.error(409, "transcription is not completed")
                words = self.ear.words(self.files[job["file_id"]])
                tokens = []
                for n, word in enumerate(words):
                    for token in FakeSoniox.tokens(word, n == 0, final=True):
                        token.pop("is_final")
                        tokens.append(token)
                return _json(200, {"id": job["id"], "text": "".join(t["text"] for t in tokens), "tokens": tokens})
        if request.method == "DELETE" and parts[0] == "files" and len(parts) == 2:
            if self.files.pop(parts[1], None) is None:
                return self.error(404, "file not found")
            return 204, {}, b""
        return self.error(404, "not found")


class FakeSpeechmaticsRecorded(_FakeRecorded):
    def __init__(self, ear: RecordedEar, key: str = "test-key"):
        super().__init__(ear, key)
        self.jobs: dict[str, dict] = {}               # not deleted
        self.configs: list[dict] = []

    @property
    def batch_url(self) -> str:
        return self.base_url + "/v2"

    def error(self, status: int, message: str):
        names = {400: "Bad Request", 401: "Permission Denied", 404: "Job not found", 429: "Too Many Requests",
                 503: "Service Unavailable"}
        return _json(status, {"code": status, "error": names.get(status, "Internal Server Error"), "detail": message})

    async def route(self, request: Request):
        parts = request.path.removeprefix("/v2/").split("/")
        if request.method == "POST" and parts == ["jobs"]:
            fields = multipart_fields(request)
            plan = self.next_plan()
            if isinstance(plan, int):
                return self.error(plan, "scripted failure")
            if "config" not in fields or "data_file" not in fields:
                return self.error(400, "config and data_file are required")
            config = json.loads(fields["config"])
            self.configs.append(config)
            if config.get("type") != "transcription" or "language" not in config.get("transcription_config", {}):
                return self.error(400, "invalid config")
            job_id = self.new_id()
            self.jobs[job_id] = {"id": job_id, "created_at": CREATED, "data_name": "recording.wav",
                                 "status": "running", "config": config, "_audio": fields["data_file"],
                                 "_plan": plan, "_looks": 0}
            return _json(201, {"id": job_id})
        if parts[0] == "jobs" and len(parts) >= 2:
            job = self.jobs.get(parts[1])
            if job is None:
                return self.error(404, "job not found")
            if request.method == "DELETE" and len(parts) == 2:
                del self.jobs[parts[1]]
                return _json(200, {"job": self.public(job)})
            if request.method == "GET" and len(parts) == 2:
                job["_looks"] += 1
                if job["_looks"] > 1:
                    if job["_plan"] == "job_error":
                        job.update(status="rejected", errors=[{"timestamp": CREATED,
                                                               "message": "scripted rejection"}])
                    else:
                        job["status"] = "done"
                return _json(200, {"job": self.public(job)})
            if request.method == "GET" and parts[2:] == ["transcript"]:
                if job["status"] != "done":
                    return self.error(404, "transcript not ready")
                words = self.ear.words(job["_audio"])
                results = FakeSpeechmatics.transcript(0.0, 0.0, words)["results"]
                return _json(200, {"format": "2.9", "job": {"id": job["id"], "created_at": CREATED,
                                                            "data_name": "recording.wav", "duration": 0},
                                   "metadata": {"created_at": CREATED, "type": "transcription",
                                                "transcription_config": job["config"]["transcription_config"]},
                                   "results": results})
        return self.error(404, "not found")
