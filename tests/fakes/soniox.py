"""A Soniox real-time server (``/transcribe-websocket``) speaking the real wire protocol.

Handshake: ``Authorization: Bearer <key>``. The first message is the JSON config (a raw format
without sample_rate/num_channels, or no model, is answered with ``error_code`` 400 and a close).
Responses carry sub-word tokens: a word's first piece has a leading space (except the very first
token of a connection), the rest and any punctuation follow without one; final tokens are sent
once, the word being heard is sent as a non-final tail that the next response replaces. ``<end>``
follows a word after an endpoint pause; ``finalize`` makes everything heard final and adds
``<fin>``; an empty frame (text or binary) ends the stream with ``finished: true`` and a close.
The provider's own mid-stream failure is a 503 error response followed by a close.

Given ``recording`` (real speech, see ``recording.RecordingListener``), the fake hears it instead
of timecode, as ``FakeDeepgram`` does (then it sends no non-final tail: the tail is placed by
timecode position).
"""

from __future__ import annotations

import json

from websockets.asyncio.server import ServerConnection

from .recording import RecordingListener
from .script import Connection, FakeServer, ScriptWord, idle_recv

ENDPOINT_PAUSE = 0.5
IDLE_TIMEOUT = 20.0


class FakeSoniox(FakeServer):
    name = "soniox"
    path = "/transcribe-websocket"

    def __init__(self, *args, recording=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recording = recording          # int16 samples the audio is cut from, or None: timecode

    async def session(self, ws: ServerConnection, connection: Connection) -> None:
        config = json.loads(await ws.recv())
        connection.config = config
        raw = config.get("audio_format", "").startswith("pcm_")
        if not config.get("model") or (raw and not (config.get("sample_rate") and config.get("num_channels"))):
            await ws.send(json.dumps({"error_code": 400, "error_message": "Invalid audio format or model.",
                                      "error_type": "invalid_request"}))
            await ws.close()
            return
        if self.recording is not None:
            connection.listener = RecordingListener(self.recording, self.script, self.delay)
        listener = connection.listener
        state = {"first": True, "reported": 0.0, "end_after": None}
        while True:
            try:
                message = await idle_recv(ws, IDLE_TIMEOUT)
            except TimeoutError:
                await ws.close(1000, "idle")
                return
            if connection.stalled:
                continue            # a stalled server reads on but never answers
            if message in ("", b""):
                await self.respond(ws, connection, listener.due(flush=True), state, flush=True)
                await self.send(ws, connection, {"tokens": [], "final_audio_proc_ms": int(listener.now * 1000),
                                                 "total_audio_proc_ms": int(listener.now * 1000), "finished": True})
                await ws.close(1000)
                return
            if isinstance(message, bytes):
                listener.hear(message)
                if self.failure_due(connection) and await self.fail(ws, connection):
                    return
                await self.respond(ws, connection, listener.due(), state)
                continue
            kind = json.loads(message).get("type")
            connection.controls[kind] += 1
            if kind == "finalize":
                await self.respond(ws, connection, listener.due(flush=True), state, flush=True, marker="<fin>")

    async def respond(self, ws: ServerConnection, connection: Connection, words: list[ScriptWord], state: dict,
                      flush: bool = False, marker: str | None = None) -> None:
        listener = connection.listener
        settled = listener.settled(flush)
        tokens = []
        for word in words:
            tokens += self.tokens(word, state["first"], final=True)
            state["first"] = False
            state["end_after"] = word.end
        # an endpoint once a pause follows the last word
        if state["end_after"] is not None and (flush or settled - state["end_after"] >= ENDPOINT_PAUSE):
            tokens.append(self.control_token("<end>" if marker is None else marker, state["end_after"]))
            state["end_after"] = None
        elif marker is not None:
            tokens.append(self.control_token(marker, settled))
        tail = self.heard_in_part(listener, state["first"])
        if not tokens and tail == state.get("tail") and settled - state["reported"] < 0.2:
            return                       # nothing new to say
        state["tail"] = tail
        await self.send(ws, connection, {
            "tokens": tokens + tail, "final_audio_proc_ms": int(round(settled * 1000)),
            "total_audio_proc_ms": int(round(listener.now * 1000))})
        state["reported"] = settled

    def heard_in_part(self, listener, first: bool) -> list[dict]:
        """The non-final tail: the first piece of a word being spoken now (it may change)."""
        if self.recording is not None:
            return []
        for word in self.script:
            start, end = word.start - listener.offset, word.end - listener.offset
            if start >= 0 and start < listener.now < end + listener.delay:
                return self.tokens(ScriptWord(word.text, start, end, word.speaker), first, final=False)[:1]
            if start > listener.now:
                break
        return []

    @staticmethod
    def tokens(word: ScriptWord, first: bool, final: bool) -> list[dict]:
        """Split a word into pieces of 2–4 letters and its punctuation, with millisecond times."""
        body = word.text.rstrip(".,?!")
        punctuation = word.text[len(body):]
        pieces = [body[i:i + 3] for i in range(0, len(body), 3)] if len(body) > 4 else [body]
        start_ms, end_ms = int(round(word.start * 1000)), int(round(word.end * 1000))
        step = (end_ms - start_ms) / len(pieces)
        out = []
        for n, piece in enumerate(pieces):
            out.append({"text": (" " if n == 0 and not first else "") + piece,
                        "start_ms": start_ms + int(round(n * step)),
                        "end_ms": end_ms if n == len(pieces) - 1 else start_ms + int(round((n + 1) * step)),
                        "confidence": word.confidence, "is_final": final, "speaker": str(word.speaker + 1),
                        "language": "en"})
        for mark in punctuation:
            out.append({"text": mark, "start_ms": end_ms, "end_ms": end_ms, "confidence": 0.99,
                        "is_final": final, "speaker": str(word.speaker + 1), "language": "en"})
        return out

    @staticmethod
    def control_token(text: str, at: float) -> dict:
        ms = int(round(at * 1000))
        return {"text": text, "start_ms": ms, "end_ms": ms, "confidence": 1.0, "is_final": True}

    async def provider_error_close(self, ws: ServerConnection, connection: Connection) -> None:
        await ws.send(json.dumps({"error_code": 503, "error_message":
                                  "Cannot continue request (code N). Please restart the request.",
                                  "error_type": "service_unavailable"}))
        await ws.close(1011)
