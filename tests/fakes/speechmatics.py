"""A Speechmatics real-time server (``/v2``) speaking the real wire protocol.

Handshake: ``Authorization: Bearer <key>``. ``StartRecognition`` (raw pcm_s16le at 16 kHz, else an
``invalid_audio_type`` Error) → ``RecognitionStarted``. Every binary frame is acknowledged with
``AudioAdded`` (seq_no from 1). ``AddTranscript`` carries word results (speaker ``S1``, ``S2``…,
``UU`` for a script speaker of -1) followed by punctuation results that attach to the previous
word; an empty one goes out for each second of silence. ``ForceEndOfUtterance`` flushes and
sends ``EndOfUtterance``; ``EndOfStream`` flushes and sends ``EndOfTranscript``. The provider's
own mid-stream failure is an ``Error`` (``quota_exceeded``) and a close 4005.
"""

from __future__ import annotations

import json
import uuid

from websockets.asyncio.server import ServerConnection

from .script import Connection, FakeServer, ScriptWord, idle_recv

IDLE_TIMEOUT = 180.0


class FakeSpeechmatics(FakeServer):
    name = "speechmatics"
    path = "/v2"

    async def session(self, ws: ServerConnection, connection: Connection) -> None:
        start = json.loads(await ws.recv())
        connection.config = start
        audio = start.get("audio_format", {})
        if start.get("message") != "StartRecognition" or audio.get("type") != "raw" or \
                audio.get("encoding") != "pcm_s16le" or audio.get("sample_rate") != 16000:
            await ws.send(json.dumps({"message": "Error", "type": "invalid_audio_type",
                                      "reason": f"unsupported audio format {audio}"}))
            await ws.close(1003, "protocol_error")
            return
        await ws.send(json.dumps({
            "message": "RecognitionStarted", "id": str(uuid.uuid4()), "orchestrator_version": "2025.01.0",
            "language_pack_info": {"word_delimiter": " ", "writing_direction": "left-to-right", "itn": True,
                                   "adapted": False, "language_description": "English"}}))
        listener = connection.listener
        seq_no, reported = 0, 0.0
        while True:
            try:
                message = await idle_recv(ws, IDLE_TIMEOUT)
            except TimeoutError:
                await ws.send(json.dumps({"message": "Error", "type": "idle_timeout", "reason": "idle"}))
                await ws.close(1008, "policy_violation")
                return
            if connection.stalled:
                continue            # a stalled server reads on but never answers
            if isinstance(message, bytes):
                seq_no += 1
                await self.send(ws, connection, {"message": "AudioAdded", "seq_no": seq_no})
                listener.hear(message)
                if self.failure_due(connection) and await self.fail(ws, connection):
                    return
                words, settled = listener.due(), listener.settled()
                if words or settled - reported >= 1.0:
                    await self.send(ws, connection, self.transcript(reported, settled, words))
                    reported = settled
                continue
            control = json.loads(message)
            kind = control.get("message")
            connection.controls[kind] += 1
            if kind in ("ForceEndOfUtterance", "EndOfStream"):
                words, settled = listener.due(flush=True), listener.settled(flush=True)
                await self.send(ws, connection, self.transcript(reported, settled, words))
                reported = settled
            if kind == "ForceEndOfUtterance":
                await self.send(ws, connection, {"message": "EndOfUtterance",
                                                 "metadata": {"start_time": settled, "end_time": settled}})
            elif kind == "EndOfStream":
                connection.controls["last_seq_no"] = control.get("last_seq_no", -1)
                await self.send(ws, connection, {"message": "EndOfTranscript"})

    @staticmethod
    def transcript(start: float, end: float, words: list[ScriptWord]) -> dict:
        results = []
        for word in words:
            body = word.text.rstrip(".,?!")
            speaker = "UU" if word.speaker < 0 else f"S{word.speaker + 1}"
            results.append({"type": "word", "start_time": word.start, "end_time": word.end,
                            "alternatives": [{"content": body, "confidence": word.confidence, "language": "en",
                                              "speaker": speaker}]})
            for mark in word.text[len(body):]:
                results.append({"type": "punctuation", "start_time": word.end, "end_time": word.end,
                                "attaches_to": "previous", "is_eos": mark in ".?!",
                                "alternatives": [{"content": mark, "confidence": 1.0, "speaker": speaker}]})
        return {"message": "AddTranscript", "format": "2.1",
                "metadata": {"start_time": round(start, 6), "end_time": round(end, 6),
                             "transcript": " ".join(w.text for w in words)},
                "results": results}

    async def provider_error_close(self, ws: ServerConnection, connection: Connection) -> None:
        await ws.send(json.dumps({"message": "Error", "type": "quota_exceeded",
                                  "reason": "Concurrent session limit reached"}))
        await ws.close(4005, "quota_exceeded")
