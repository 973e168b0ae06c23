"""Structured summaries from any OpenAI-compatible chat-completions endpoint.

OpenAI, Azure-style gateways, vLLM, llama.cpp's server, Ollama and LM Studio all accept
``POST {base_url}/chat/completions`` with ``response_format: json_schema``. The answer is still
validated here (servers that ignore the schema exist), and an invalid one is retried once with
the error shown to the model. Timeouts and connection failures are not retried: the caller
falls back to the offline summariser at once rather than keep a conversation waiting.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import orjson

log = logging.getLogger(__name__)

CATEGORIES = [
    "personal", "education", "health", "finance", "legal", "philosophy", "spiritual", "science",
    "entrepreneurship", "parenting", "romantic", "travel", "inspiration", "technology", "business",
    "social", "work", "sports", "politics", "literature", "history", "architecture", "music", "weather",
    "news", "entertainment", "psychology", "design", "family", "economics", "environment", "other",
]

STRUCTURED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "overview", "emoji", "category", "action_items", "events"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "overview": {"type": "string"},
        "emoji": {"type": "string"},
        "category": {"type": "string", "enum": CATEGORIES},
        "action_items": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["description", "completed"],
            "properties": {"description": {"type": "string", "minLength": 1}, "completed": {"type": "boolean"}},
        }},
        "events": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "required": ["title", "description", "start", "duration"],
            "properties": {"title": {"type": "string"}, "description": {"type": "string"},
                           "start": {"type": "string"}, "duration": {"type": "integer"}},
        }},
    },
}

SYSTEM_PROMPT = (
    "You summarise one recorded conversation for its owner. Answer only with a JSON object that "
    "matches the given schema. title: a few words naming the topic. overview: two to four sentences "
    "on what was said and decided. emoji: one emoji for the topic. category: the closest allowed value. "
    "action_items: tasks someone committed to or asked for, as short imperative descriptions, "
    "completed=false unless the transcript says it is done. events: only meetings or appointments with "
    "a clear time, start as ISO 8601 (resolve relative dates against the conversation start), duration "
    "in minutes (30 if unknown). Never invent content that is not in the transcript. Write in the "
    "conversation's language ({language})."
)


class LLMError(Exception):
    """The model could not give a valid summary; the message says why (no secrets in it)."""


class SchemaError(ValueError):
    pass


class _Overloaded(LLMError):
    """429 or 5xx: worth one more try, like an invalid answer."""


def validate(value: Any, schema: dict, path: str = "$") -> None:
    """Check ``value`` against the subset of JSON Schema used by ``STRUCTURED_SCHEMA``."""
    kind = schema.get("type")
    checks = {"object": dict, "array": list, "string": str, "boolean": bool}
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{path} must be an integer")
    elif kind in checks and not isinstance(value, checks[kind]):
        raise SchemaError(f"{path} must be a{'n' if kind in ('object', 'array') else ''} {kind}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{path} must be one of the allowed values")
    if kind == "string" and len(value.strip()) < schema.get("minLength", 0):
        raise SchemaError(f"{path} must not be empty")
    if kind == "object":
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaError(f"{path}.{key} is missing")
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(properties)
            if extra:
                raise SchemaError(f"{path} has unexpected keys {sorted(extra)}")
        for key, sub in properties.items():
            if key in value:
                validate(value[key], sub, f"{path}.{key}")
    if kind == "array":
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


def parse_answer(content: Any) -> dict:
    """The model's message content → a validated summary (code fences tolerated)."""
    if not isinstance(content, str):
        raise SchemaError("the answer has no text content")
    text = content.strip()
    if text.startswith("```"):
        text = text.strip("`")
        text = text[text.find("{"):] if "{" in text else text
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"the answer is not JSON ({exc})") from None
    validate(value, STRUCTURED_SCHEMA)
    for event in value["events"]:
        event["created"] = False
    return value


def transcript_text(segments: list[dict]) -> str:
    lines = []
    for s in segments:
        who = "Owner" if s.get("is_user") else str(s.get("speaker") or "SPEAKER_00")
        lines.append(f"[{float(s.get('start', 0.0)):.0f}s] {who}: {str(s.get('text') or '').strip()}")
    return "\n".join(lines)


class ChatSummariser:
    def __init__(self, base_url: str, model: str, *, api_key: str = "", timeout: float = 30.0,
                 attempts: int = 2, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.attempts = max(1, attempts)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers, transport=transport)

    @property
    def name(self) -> str:
        return f"llm:{self.model}"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def summarise(self, segments: list[dict], *, language: str, started_at_iso: str,
                        photo_descriptions: list[str] = ()) -> dict:
        content = f"Conversation started at {started_at_iso}.\n\n{transcript_text(segments)}"
        if photo_descriptions:
            content += "\n\nPhotos taken during the conversation:\n" + "\n".join(f"- {d}" for d in photo_descriptions)
        messages: list[dict] = [
            {"role": "system", "content": SYSTEM_PROMPT.format(language=language)},
            {"role": "user", "content": content},
        ]
        problem = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            try:
                content = await self._complete(messages)
            except _Overloaded as exc:
                problem = str(exc)
                if attempt < self.attempts:
                    await asyncio.sleep(1.0)
                continue
            try:
                return parse_answer(content)
            except SchemaError as exc:
                problem = str(exc)
                log.info("summary attempt %d from %s was invalid: %s", attempt, self.model, problem)
                messages = messages[:2] + [
                    {"role": "assistant", "content": content if isinstance(content, str) else ""},
                    {"role": "user", "content": f"That answer was invalid: {problem}. Answer again with only "
                                                "a JSON object that matches the schema."},
                ]
        raise LLMError(f"no valid answer after {self.attempts} attempts: {problem}")

    async def _complete(self, messages: list[dict]) -> Any:
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0.2,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "conversation_summary", "strict": True, "schema": STRUCTURED_SCHEMA}},
        }
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.post(self.url, content=orjson.dumps(body),
                                                   headers={"Content-Type": "application/json"})
        except TimeoutError:
            raise LLMError(f"no answer within {self.timeout:g}s") from None
        except httpx.HTTPError as exc:
            raise LLMError(f"request failed: {type(exc).__name__}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _Overloaded(f"HTTP {response.status_code} from the model endpoint")
        if response.status_code != 200:
            raise LLMError(f"HTTP {response.status_code} from the model endpoint")
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None          # treated as an invalid answer, so it is retried
