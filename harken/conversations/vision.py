"""Photo descriptions from the configured OpenAI-compatible endpoint's vision model.

``HARKEN_LLM_VISION_MODEL`` names a model of ``HARKEN_LLM_BASE_URL`` that accepts images
(``image_url`` content parts with a ``data:`` URL: OpenAI, vLLM, llama.cpp's server with a
multimodal model, Ollama, LM Studio). Without one, photos get an empty description. A failure
(timeout, HTTP error, empty answer) also leaves the description empty: a photo is never held up
or lost because a model did not answer.
"""

from __future__ import annotations

import asyncio
import logging

import httpx
import orjson

from ..config import Settings

log = logging.getLogger(__name__)

PROMPT = ("Describe this photo, taken by the user's smart glasses during a conversation, in one or two "
          "plain sentences: what is seen, and any text that can be read. No preamble.")
MAX_DESCRIPTION_CHARS = 2000


class PhotoDescriber:
    def __init__(self, base_url: str, model: str, *, api_key: str = "", timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout, headers=headers, transport=transport)

    @classmethod
    def from_settings(cls, settings: Settings) -> "PhotoDescriber | None":
        if not settings.llm_base_url or not settings.llm_vision_model:
            return None
        return cls(settings.llm_base_url, settings.llm_vision_model, api_key=settings.llm_api_key,
                   timeout=settings.llm_timeout)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def describe(self, jpeg_base64: str) -> str:
        """The model's description, or "" when it could not give one (logged, no secret in it)."""
        body = {"model": self.model, "temperature": 0.2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": PROMPT},
            {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg_base64}"}}]}]}
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.post(self.url, content=orjson.dumps(body),
                                                   headers={"Content-Type": "application/json"})
            response.raise_for_status()
            content = response.json()["choices"][0]["message"]["content"]
        except TimeoutError:
            log.warning("photo description: no answer from %s within %gs", self.model, self.timeout)
            return ""
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
            log.warning("photo description by %s failed: %s", self.model, type(exc).__name__)
            return ""
        return content.strip()[:MAX_DESCRIPTION_CHARS] if isinstance(content, str) else ""
