"""Conversation records and the JSON shapes built from them (PROTOCOL §7, §8).

Segments arrive as the gateway's stored dicts (``Segment.to_stored()``); this package never
imports the gateway, so everything here works on those dicts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

IN_PROGRESS = "in_progress"
PROCESSING = "processing"
COMPLETED = "completed"

DEFAULT_EMOJI = "🧠"
DEFAULT_CATEGORY = "other"

# Keys of a transcript segment inside the conversation object (§7) and the realtime webhook (§8).
CONVERSATION_SEGMENT_KEYS = ("id", "text", "speaker", "speakerId", "speaker_id", "is_user", "person_id",
                             "start", "end")
REALTIME_SEGMENT_KEYS = ("text", "speaker", "speakerId", "is_user", "start", "end", "id")

_SPEAKER_NUMBER = re.compile(r"(\d+)\s*$")


@dataclass
class Conversation:
    id: str
    uid: str
    status: str
    language: str
    source: str
    created_at: float
    started_at: float
    finished_at: float
    timeout_s: float
    structured: dict | None = None
    discarded: bool = False


@dataclass
class Usage:
    """What one session used; added up per user by the store."""

    audio_seconds: float = 0.0
    speech_seconds: float = 0.0
    words: int = 0
    provider: str | None = None

    @classmethod
    def coerce(cls, value: "Usage | Mapping[str, Any] | None") -> "Usage | None":
        if value is None or isinstance(value, Usage):
            return value
        return cls(audio_seconds=float(value.get("audio_seconds") or 0.0),
                   speech_seconds=float(value.get("speech_seconds") or 0.0),
                   words=int(value.get("words") or 0),
                   provider=value.get("provider"))


@dataclass
class WebhookSetting:
    kind: str
    url: str
    interval_seconds: int | None = None

    def to_api(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind, "url": self.url, "enabled": True}
        if self.interval_seconds is not None:
            out["interval_seconds"] = self.interval_seconds
        return out


@dataclass
class StoredSegments:
    """A conversation's segments in time order, with the numbers processing needs."""

    items: list[dict] = field(default_factory=list)

    @property
    def words(self) -> int:
        return sum(word_count(s.get("text")) for s in self.items)

    @property
    def duration(self) -> float:
        if not self.items:
            return 0.0
        return max(float(s.get("end", 0.0)) for s in self.items) - min(float(s.get("start", 0.0)) for s in self.items)


def word_count(text: Any) -> int:
    return len(text.split()) if isinstance(text, str) else 0


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


def empty_structured() -> dict:
    return {"title": "", "overview": "", "emoji": DEFAULT_EMOJI, "category": DEFAULT_CATEGORY,
            "action_items": [], "events": []}


def speaker_number(segment: Mapping[str, Any]) -> int:
    for key in ("speaker_id", "speakerId"):
        value = segment.get(key)
        if isinstance(value, int):
            return value
    match = _SPEAKER_NUMBER.search(str(segment.get("speaker") or ""))
    return int(match.group(1)) if match else 0


def _project(segment: Mapping[str, Any], keys: tuple[str, ...]) -> dict:
    number = speaker_number(segment)
    full = {
        "id": segment.get("id"),
        "text": segment.get("text", ""),
        "speaker": segment.get("speaker") or f"SPEAKER_{number:02d}",
        "speakerId": number,
        "speaker_id": number,
        "is_user": bool(segment.get("is_user", False)),
        "person_id": segment.get("person_id"),
        "start": float(segment.get("start", 0.0)),
        "end": float(segment.get("end", segment.get("start", 0.0))),
    }
    return {k: full[k] for k in keys}


def conversation_segment(segment: Mapping[str, Any]) -> dict:
    return _project(segment, CONVERSATION_SEGMENT_KEYS)


def realtime_segment(segment: Mapping[str, Any]) -> dict:
    return _project(segment, REALTIME_SEGMENT_KEYS)


def conversation_object(conversation: Conversation, segments: list[dict], *, photos: list[dict] | None = None) -> dict:
    """The conversation as clients, events and the memory webhook see it (PROTOCOL §7).
    ``photos`` (``photos.photo_object`` each) is upstream's field, given where it was read."""
    extra = {} if photos is None else {"photos": photos}
    return {**extra, 
        "id": conversation.id,
        "created_at": iso(conversation.created_at),
        "started_at": iso(conversation.started_at),
        "finished_at": iso(conversation.finished_at),
        "language": conversation.language,
        "source": conversation.source,
        "status": conversation.status,
        "transcript_segments": [conversation_segment(s) for s in segments],
        "structured": conversation.structured or empty_structured(),
        "apps_response": [],
        "discarded": conversation.discarded,
    }


def app_conversation(conversation: Conversation, segments: list[dict], *, starred: bool = False,
                     photos: list[dict] | None = None) -> dict:
    """The conversation as the Omi app's REST calls read it: PROTOCOL §7's object with the
    fields of upstream's ``Conversation`` model that Harken has no feature for at their empty
    values (so the app's parser finds every key it expects)."""
    return conversation_object(conversation, segments) | {
        "photos": photos or [], "starred": starred, "geolocation": None, "apps_results": [], "plugins_results": [],
        "external_data": None, "app_id": None, "deleted": False, "visibility": "private",
        "processing_conversation_id": None,
    }
