"""Turning a finished conversation's segments into its structured summary.

The language model is used when one is configured; the offline summariser otherwise, for very
short conversations (they are marked ``discarded`` and not worth a model call), and whenever the
model fails. ``structured.processor`` always names what produced the summary, and
``structured.fallback_reason`` says why the model's answer was not used.
"""

from __future__ import annotations

import logging

from ..config import Settings
from .llm import ChatSummariser, LLMError
from .model import StoredSegments
from .summarise import PROCESSOR as OFFLINE_PROCESSOR
from .summarise import summarise

log = logging.getLogger(__name__)

# Below either, a conversation is kept but marked discarded (PROTOCOL §7).
MIN_WORDS = 5
MIN_SECONDS = 3.0


class ConversationProcessor:
    def __init__(self, llm: ChatSummariser | None = None) -> None:
        self.llm = llm

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConversationProcessor":
        if not settings.llm_base_url:
            return cls()
        return cls(ChatSummariser(settings.llm_base_url, settings.llm_model, api_key=settings.llm_api_key,
                                  timeout=settings.llm_timeout))

    async def aclose(self) -> None:
        if self.llm is not None:
            await self.llm.aclose()

    @staticmethod
    def is_too_short(segments: list[dict]) -> bool:
        stored = StoredSegments(segments)
        return stored.words < MIN_WORDS or stored.duration < MIN_SECONDS

    async def structure(self, segments: list[dict], *, language: str, started_at_iso: str,
                        photo_descriptions: list[str] = ()) -> tuple[dict, bool]:
        """``(structured, discarded)`` for a conversation's segments (and what its photos show,
        as upstream gives the summary model the photos' descriptions)."""
        discarded = self.is_too_short(segments) and not photo_descriptions
        if discarded or self.llm is None:
            return summarise(segments), discarded
        try:
            structured = await self.llm.summarise(segments, language=language, started_at_iso=started_at_iso,
                                                  photo_descriptions=list(photo_descriptions))
        except LLMError as exc:
            log.warning("summary by %s failed, using the offline summariser: %s", self.llm.name, exc)
            structured = summarise(segments)
            structured["fallback_reason"] = f"{self.llm.name}: {exc}"
            return structured, discarded
        structured["processor"] = self.llm.name
        return structured, discarded


__all__ = ["ConversationProcessor", "OFFLINE_PROCESSOR", "MIN_WORDS", "MIN_SECONDS"]
