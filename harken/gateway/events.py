"""Constructors for the JSON events sent to clients (PROTOCOL.md §4), so their shapes live in one place."""

from __future__ import annotations

from typing import Any

STATUS_TEXT = {
    "initiating": "Service Starting",
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


def last_memory(memory_id: str | None) -> dict[str, Any]:
    return {"type": "last_memory", "memory_id": memory_id}


def segments_deleted(segment_ids: list[str]) -> dict[str, Any]:
    return {"type": "segments_deleted", "segment_ids": segment_ids}


def speaker_label_suggestion(speaker_id: int, person_id: str | None, person_name: str | None,
                             segment_id: str | None) -> dict[str, Any]:
    """A speaker's voice matched the owner (``person_id`` "user") or a known person."""
    return {"type": "speaker_label_suggestion", "speaker_id": speaker_id, "person_id": person_id,
            "person_name": person_name, "segment_id": segment_id}
