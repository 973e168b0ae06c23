"""Constructors for the JSON events sent to clients (PROTOCOL.md §4), so their shapes live in one place.

Every shape here must parse in the Omi app's Dart models (app/lib/backend/schema/message_event.dart):
a field the app declares as a non-null ``String`` never carries null (a null throws inside the
app's ``onMessage`` and the event is lost). ``harken/gateway/app_schema.py`` checks that.
"""

from __future__ import annotations

from typing import Any

STATUS_TEXT = {
    "initiating": "Service Starting",
    "in_progress_conversations_processing": "Processing Conversations",
    "stt_initiating": "STT Service Starting",
    "ready": None,
    "stt_switched": "Switched speech provider",
    "stt_failed": "Transcription temporarily unavailable",
    "decode_errors": "Audio frames could not be decoded: check the codec and sample_rate parameters",
    "draining": "Server restarting: reconnect",
}


def service_status(status: str, status_text: str | None = None, **fields: Any) -> dict[str, Any]:
    text = status_text if status_text is not None else STATUS_TEXT.get(status)
    return {"type": "service_status", "status": status, "status_text": text, **fields}


def error(code: int, message: str, param: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if param is not None:
        event["param"] = param
    return event


def last_memory(memory_id: str) -> dict[str, Any]:
    """Sent only when the user has a finished conversation: the app's ``memoryId`` is non-null."""
    return {"type": "last_memory", "memory_id": memory_id}


def conversation_session(conversation_id: str, *, resumed: bool, source: str) -> dict[str, Any]:
    """Which conversation this connection writes (newer apps track it; older ones ignore the type)."""
    return {"type": "conversation_session", "conversation_id": conversation_id, "status": "in_progress",
            "resumed": resumed, "source": source}


def photo_processing(temp_id: str, photo_id: str) -> dict[str, Any]:
    return {"type": "photo_processing", "temp_id": temp_id, "photo_id": photo_id}


def photo_described(photo_id: str, description: str, discarded: bool) -> dict[str, Any]:
    return {"type": "photo_described", "photo_id": photo_id, "description": description, "discarded": discarded}


def segments_deleted(segment_ids: list[str]) -> dict[str, Any]:
    return {"type": "segments_deleted", "segment_ids": segment_ids}


OWNER_NAME = "You"      # the owner's label when no name is known (the app shows it as is)


def speaker_label_suggestion(speaker_id: int, person_id: str | None, person_name: str | None,
                             segment_id: str | None) -> dict[str, Any]:
    """A speaker's voice matched the owner (``person_id`` "user") or a known person. The app's
    model has all four fields non-null: a missing name is the owner's "You" (or "" for a
    person), a missing segment id is ""."""
    name = person_name or (OWNER_NAME if person_id == "user" else "")
    return {"type": "speaker_label_suggestion", "speaker_id": int(speaker_id), "person_id": person_id or "",
            "person_name": name, "segment_id": segment_id or ""}
