"""What the Omi app's Dart models accept, as pure checks on the messages Harken sends (sans-I/O).

Written from the app's parsers (BasedHardware/omi, ``app/lib/backend/schema/message_event.dart``,
``transcript_segment.dart``, ``conversation.dart``): a field the Dart class declares non-null
(``final String memoryId``) throws when the JSON has null or another type, and the app loses the
event; a ``double`` field must be a JSON number with a fraction part or the generated parser's cast
fails. ``check_server_message`` returns the problems of one text frame ([] = the app parses it);
the conformance tests run every frame a real session sends through it.

Types unknown to the app (``error``, ``segments_deleted``, ``conversation_session``, ...) become
the app's ``UnknownEvent`` and are ignored by it; they are checked against Harken's own contract
(PROTOCOL.md §4) so that other clients can rely on them too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

_STR, _INT, _FLOAT, _BOOL, _LIST, _DICT = str, int, float, bool, list, dict


def _type_ok(value: Any, kind: type) -> bool:
    if kind is _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is _FLOAT:
        return isinstance(value, float)
    return isinstance(value, kind)


def _field(problems: list[str], obj: dict, key: str, kind: type, *, required: bool, where: str) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            problems.append(f"{where}.{key} is {'null' if key in obj else 'missing'}; the app needs a {kind.__name__}")
        return None
    if not _type_ok(value, kind):
        problems.append(f"{where}.{key} is {type(value).__name__} {value!r:.40}; the app needs a {kind.__name__}")
        return None
    return value


def _iso(problems: list[str], obj: dict, key: str, *, required: bool, where: str) -> None:
    value = _field(problems, obj, key, _STR, required=required, where=where)
    if value is not None:
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            problems.append(f"{where}.{key} {value!r} is not an ISO-8601 time (Dart DateTime.parse)")


def check_segment(segment: Any, where: str = "segment") -> list[str]:
    """``TranscriptSegment.fromJson`` (generated wire model)."""
    problems: list[str] = []
    if not isinstance(segment, dict):
        return [f"{where} is not an object"]
    _field(problems, segment, "id", _STR, required=False, where=where)
    _field(problems, segment, "text", _STR, required=True, where=where)
    _field(problems, segment, "speaker", _STR, required=False, where=where)
    _field(problems, segment, "is_user", _BOOL, required=True, where=where)
    _field(problems, segment, "person_id", _STR, required=False, where=where)
    start = _field(problems, segment, "start", _FLOAT, required=True, where=where)
    end = _field(problems, segment, "end", _FLOAT, required=True, where=where)
    _field(problems, segment, "speech_profile_processed", _BOOL, required=False, where=where)
    _field(problems, segment, "stt_provider", _STR, required=False, where=where)
    for i, t in enumerate(_field(problems, segment, "translations", _LIST, required=False, where=where) or []):
        if not isinstance(t, dict):
            problems.append(f"{where}.translations[{i}] is not an object")
            continue
        _field(problems, t, "lang", _STR, required=True, where=f"{where}.translations[{i}]")
        _field(problems, t, "text", _STR, required=True, where=f"{where}.translations[{i}]")
    # Harken's own promises (PROTOCOL §4): times in ms, never negative, in order.
    for key, value in (("start", start), ("end", end)):
        if value is not None and (value < 0 or round(value, 3) != value):
            problems.append(f"{where}.{key} {value!r} is negative or finer than a millisecond")
    if start is not None and end is not None and end < start:
        problems.append(f"{where} ends ({end}) before it starts ({start})")
    return problems


def check_conversation(memory: Any, where: str = "memory") -> list[str]:
    """``ServerConversation.fromJson``."""
    if not isinstance(memory, dict):
        return [f"{where} is not an object"]
    problems: list[str] = []
    _field(problems, memory, "id", _STR, required=True, where=where)
    _iso(problems, memory, "created_at", required=True, where=where)
    _iso(problems, memory, "started_at", required=False, where=where)
    _iso(problems, memory, "finished_at", required=False, where=where)
    structured = _field(problems, memory, "structured", _DICT, required=True, where=where)
    if structured is not None:
        for key in ("title", "overview", "emoji", "category"):
            _field(problems, structured, key, _STR, required=True, where=f"{where}.structured")
        for key in ("action_items", "events"):
            _field(problems, structured, key, _LIST, required=False, where=f"{where}.structured")
    for i, s in enumerate(_field(problems, memory, "transcript_segments", _LIST, required=False, where=where) or []):
        problems += check_segment(s, f"{where}.transcript_segments[{i}]")
    for i, p in enumerate(_field(problems, memory, "photos", _LIST, required=False, where=where) or []):
        w = f"{where}.photos[{i}]"
        if not isinstance(p, dict):
            problems.append(f"{w} is not an object")
            continue
        _field(problems, p, "id", _STR, required=True, where=w)
        _field(problems, p, "base64", _STR, required=True, where=w)
        _field(problems, p, "description", _STR, required=False, where=w)
        _iso(problems, p, "created_at", required=False, where=w)
        _field(problems, p, "discarded", _BOOL, required=False, where=w)
    _field(problems, memory, "discarded", _BOOL, required=False, where=where)
    _field(problems, memory, "source", _STR, required=False, where=where)
    _field(problems, memory, "language", _STR, required=False, where=where)
    _field(problems, memory, "status", _STR, required=False, where=where)
    return problems


# type → (field, Python type, required) as the Dart model reads them; None: only ``type`` matters.
_EVENTS: dict[str, tuple[tuple[str, type, bool], ...]] = {
    "service_status": (("status", _STR, True), ("status_text", _STR, False)),
    "last_memory": (("memory_id", _STR, True),),
    "photo_processing": (("temp_id", _STR, True), ("photo_id", _STR, True)),
    "photo_described": (("photo_id", _STR, True), ("description", _STR, True), ("discarded", _BOOL, False)),
    "speaker_label_suggestion": (("speaker_id", _INT, True), ("person_id", _STR, True),
                                 ("person_name", _STR, True), ("segment_id", _STR, True)),
    "onboarding_question": (("question", _STR, False), ("question_index", _INT, False), ("total_questions", _INT, False)),
    "question_answered": (("question_index", _INT, False), ("answered", _BOOL, False)),
    "onboarding_complete": (("conversation_id", _STR, False), ("memories_created", _INT, False), ("error", _STR, False)),
    # Harken's own (the app ignores them as UnknownEvent): PROTOCOL.md §4.
    "error": (("code", _INT, True), ("message", _STR, True), ("param", _STR, False)),
    "segments_deleted": (("segment_ids", _LIST, True),),
    "conversation_session": (("conversation_id", _STR, True), ("status", _STR, True)),
}


def check_event(event: dict) -> list[str]:
    kind = event.get("type")
    if not isinstance(kind, str):
        return ["event without a string type"]
    problems: list[str] = []
    for key, python_type, required in _EVENTS.get(kind, ()):
        _field(problems, event, key, python_type, required=required, where=kind)
    if kind in ("memory_processing_started", "memory_created"):
        problems += check_conversation(event.get("memory"), f"{kind}.memory")
        if kind == "memory_created":
            _field(problems, event, "messages", _LIST, required=False, where=kind)
    if kind == "translating":
        for i, s in enumerate(_field(problems, event, "segments", _LIST, required=True, where=kind) or []):
            problems += check_segment(s, f"translating.segments[{i}]")
    if kind == "service_status" and event.get("status") == "ready":
        # Harken: ready names what serves the session (issue #22).
        _field(problems, event, "provider", _STR, required=True, where="ready")
        _field(problems, event, "reason", _STR, required=True, where="ready")
    if kind == "segments_deleted":
        if any(not isinstance(i, str) for i in event.get("segment_ids") or []):
            problems.append("segments_deleted.segment_ids must all be strings")
    return problems


def check_server_message(text: str) -> list[str]:
    """Problems the app would have with one text frame from the server ([] = none)."""
    if text == "ping":
        return []
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return [f"not JSON and not 'ping': {text[:60]!r}"]
    if isinstance(payload, list):
        return [p for i, s in enumerate(payload) for p in check_segment(s, f"segments[{i}]")]
    if isinstance(payload, dict):
        return check_event(payload)
    return [f"a JSON {type(payload).__name__} is neither an event nor a segment array"]
