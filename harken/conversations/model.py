"""Conversation records and the JSON shapes built from them (PROTOCOL §7, §8).

Segments arrive as the gateway's stored dicts (``Segment.to_stored()``); this package never
imports the gateway, so everything here works on those dicts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
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

# Conversation time (seconds from a conversation's start) beyond this is nonsense: 115 days. The
# gateway refuses client times past it; readers repair stored times past it (``readable_segments``).
MAX_TIME_SECONDS = 1e7


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


def readable_segments(items: list[dict]) -> list[dict]:
    """Stored segments (in time order) as readers may use them.

    Before client times were bounded, a ``suggested_transcript`` with ``start: 1e300`` was
    stored as it came, and such rows are still in old databases. A time that is not a finite
    number within 0..MAX_TIME_SECONDS is read as the previous segment's end (0 for the first;
    an end, as its segment's start): the text stays, in order, and nothing downstream (JSON,
    resumed sessions, processing) meets a number it cannot handle. Good rows are returned as
    they are."""
    previous_end = 0.0
    for index, item in enumerate(items):
        start, end = _conversation_time(item.get("start")), _conversation_time(item.get("end"))
        if start is None or end is None:
            start = previous_end if start is None else start
            item = items[index] = {**item, "start": start, "end": start if end is None else max(start, end)}
        previous_end = max(previous_end, item["end"])
    return items


def readable_conversation(conversation: Conversation) -> Conversation:
    """The conversation with wall times that can be shown (``iso``) and computed with.

    ``created_at`` is the server's clock; ``started_at`` was the session's clock plus the first
    word's time, which an old Harken took from the client unbounded (``1e300`` made every read
    of the account fail). A start or finish that is not finite, before 1970 or more than
    MAX_TIME_SECONDS after the creation is read as the creation time."""
    latest = conversation.created_at + MAX_TIME_SECONDS
    started, finished = conversation.started_at, conversation.finished_at
    if _wall_time(started, latest) and _wall_time(finished, latest):
        return conversation
    started = started if _wall_time(started, latest) else conversation.created_at
    finished = finished if _wall_time(finished, latest) else max(conversation.created_at, started)
    return replace(conversation, started_at=started, finished_at=finished)


def time_within(value: Any, low: float, high: float) -> float | None:
    """A JSON number (a client's or a stored time) as a float within low..high, else None: not a
    number, a bool, NaN (it fails every comparison), infinite, or an int too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if low <= number <= high else None


def _conversation_time(value: Any) -> float | None:
    return time_within(value, 0.0, MAX_TIME_SECONDS)


def _wall_time(value: Any, latest: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= latest


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
