"""A Deepgram live-transcription server (``/v1/listen``) speaking the real wire protocol.

Handshake: ``Authorization: Token <key>``; refusals carry ``dg-error`` and ``dg-request-id`` headers.
Server messages: final ``Results`` (``is_final``, ``speech_final`` when a pause of at least the
endpointing time follows, ``from_finalize`` after Finalize; an empty final for each second of
silence), ``Metadata`` after CloseStream, then close 1000. Controls: KeepAlive (counted; without
audio or KeepAlive for ``idle_timeout`` the server closes 1011 ``NET-0001``), Finalize,
CloseStream. The provider's own mid-stream failure is a close 1011 ``NET-0001``.

Given ``recording`` (real speech, see ``recording.RecordingListener``), the fake hears it instead
of timecode: the script's times are then on the recording's time line, and any part of it may be
left out (a VAD gate), as a real engine would be sent it.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Response

from .recording import RecordingListener
from .script import Connection, FakeServer, ScriptWord, idle_recv

ENDPOINTING = 0.3


class FakeDeepgram(FakeServer):
    name = "deepgram"
    auth_scheme = "Token"
    path = ""          # the SDK appends /v1/listen to the base URL

    def __init__(self, *args, idle_timeout: float = 10.0, recording=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.idle_timeout = idle_timeout
        self.recording = recording          # int16 samples the audio is cut from, or None: timecode

    def refuse(self, ws: ServerConnection, status: int) -> Response:
        errors = {400: "Bad Request: failed to process query parameters", 401: "Invalid credentials.",
                  402: "Project does not have enough credits", 429: "Too many requests", 503: "Service unavailable"}
        response = ws.respond(status, json.dumps({"err_code": str(status), "err_msg": errors.get(status, "error")}))
        response.headers["dg-error"] = errors.get(status, "error")
        response.headers["dg-request-id"] = str(uuid.uuid4())
        return response

    def query(self, connection: Connection) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(connection.request.path).query).items()}

    async def session(self, ws: ServerConnection, connection: Connection) -> None:
        if urlsplit(connection.request.path).path != "/v1/listen":
            await ws.close(1008, "unknown path")
            return
        if self.recording is not None:
            connection.listener = RecordingListener(self.recording, self.script, self.delay)
        listener = connection.listener
        request_id = str(uuid.uuid4())
        reported = 0.0           # connection time up to which Results were sent
        while True:
            try:
                message = await idle_recv(ws, self.idle_timeout)
            except TimeoutError:
                await ws.close(1011, "NET-0001")
                return
            if connection.stalled:
                continue            # a stalled server reads on but never answers
            if isinstance(message, bytes):
                if not message:
                    connection.controls["empty_frame"] += 1
                    continue
                listener.hear(message)
                if self.failure_due(connection) and await self.fail(ws, connection):
                    return
                words, settled = listener.due(), listener.settled()
                if words or settled - reported >= 1.0:
                    await self.send(ws, connection, self.results(reported, settled, words, request_id, listener.offset))
                    reported = settled
                continue
            kind = json.loads(message).get("type")
            connection.controls[kind] += 1
            if kind in ("Finalize", "CloseStream"):
                words, settled = listener.due(flush=True), listener.settled(flush=True)
                results = self.results(reported, settled, words, request_id, listener.offset, finalize=True)
                await self.send(ws, connection, results)
                reported = settled
            if kind == "CloseStream":
                await self.send(ws, connection, {
                    "type": "Metadata", "transaction_key": "deprecated", "request_id": request_id,
                    "sha256": "0" * 64, "created": "2025-01-01T00:00:00.000Z", "duration": listener.now,
                    "channels": 1})
                await ws.close(1000)
                return

    def results(self, start: float, end: float, words: list[ScriptWord], request_id: str, offset: float,
                finalize: bool = False) -> dict:
        listener_words = [{"word": w.text.strip(".,?!").lower(), "start": w.start, "end": w.end,
                           "confidence": w.confidence, "punctuated_word": w.text, "speaker": w.speaker,
                           "speaker_confidence": 0.8} for w in words]
        last_end = words[-1].end + offset if words else None
        following = next((w.start for w in self.script if last_end is not None and w.start >= last_end), None)
        speech_final = last_end is not None and (following is None or following - last_end >= ENDPOINTING)
        return {
            "type": "Results", "channel_index": [0, 1], "duration": round(max(0.0, end - start), 6),
            "start": round(start, 6), "is_final": True, "speech_final": speech_final or finalize,
            "from_finalize": finalize,
            "channel": {"alternatives": [{"transcript": " ".join(w.text for w in words),
                                          "confidence": 0.98 if words else 0.0, "words": listener_words}]},
            "metadata": {"request_id": request_id, "model_uuid": str(uuid.uuid4()),
                         "model_info": {"name": "general-nova-3", "version": "2025-01-01.0", "arch": "nova-3"}},
        }

    async def provider_error_close(self, ws: ServerConnection, connection: Connection) -> None:
        await ws.close(1011, "NET-0001")
