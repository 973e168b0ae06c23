"""A fake OpenAI-compatible chat-completions server on 127.0.0.1.

It answers ``POST /v1/chat/completions`` in OpenAI's response format from a script of
behaviours, one per request: a content string to return, ``HANG`` (never answer within the
client's timeout) or an HTTP status. Requests are recorded, so tests can check what was asked
(model, response_format, the transcript in the messages, the bearer key).
"""

from __future__ import annotations

import asyncio

import orjson

from .webhook_receiver import LoopbackHTTPServer, Request

HANG = object()


class FakeChatServer(LoopbackHTTPServer):
    def __init__(self, script: list) -> None:
        super().__init__()
        self.script = list(script)
        self.requests: list[Request] = []

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    def json_bodies(self) -> list[dict]:
        return [orjson.loads(r.body) for r in self.requests]

    async def handle(self, request: Request) -> tuple[int, dict[str, str], bytes]:
        self.requests.append(request)
        if request.method != "POST" or request.path != "/v1/chat/completions":
            return 404, {}, b'{"error": {"message": "not found"}}'
        behaviour = self.script.pop(0) if self.script else 500
        if behaviour is HANG:
            await asyncio.sleep(3600)
        if isinstance(behaviour, int):
            return behaviour, {"Content-Type": "application/json"}, b'{"error": {"message": "scripted"}}'
        model = orjson.loads(request.body).get("model", "fake")
        answer = {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": behaviour}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        return 200, {"Content-Type": "application/json"}, orjson.dumps(answer)
