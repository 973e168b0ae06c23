"""A streaming ``multipart/form-data`` reader (RFC 7578), sans I/O.

Feed it the body chunk by chunk as it arrives; it returns events: ``PartStart`` (the part's
field name and file name), ``PartData`` (bytes of the part, in order) and ``PartEnd``. Nothing
is buffered beyond one chunk plus the length of the boundary, so an upload of any size flows
to disk with bounded memory (Starlette's ``request.form()`` spools whole files first, in the
temp folder, and needs python-multipart).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEADER_BYTES = 16 * 1024


class MultipartError(ValueError):
    """The body is not well-formed multipart/form-data (a 400's detail)."""


@dataclass(frozen=True)
class PartStart:
    name: str
    filename: str | None
    content_type: str = "application/octet-stream"     # the part's own Content-Type, if it says


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


Event = PartStart | PartData | PartEnd


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type, or ``MultipartError``."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise MultipartError("expected a multipart/form-data body (files in the 'files' field)")
    match = re.search(r'boundary="?([^";]+)"?', params, flags=re.IGNORECASE)
    if match is None or len(match.group(1)) > 200:
        raise MultipartError("the multipart/form-data content type has no boundary")
    return match.group(1).encode("latin-1")


_DISPOSITION_PARAM = re.compile(r';\s*([A-Za-z0-9*_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


def _part_start(headers: bytes) -> PartStart:
    disposition, content_type = None, None
    for line in headers.decode("utf-8", errors="replace").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-disposition":
            disposition = value
        elif name.strip().lower() == "content-type":
            content_type = value.split(";")[0].strip().lower() or None
    if disposition is None:
        raise MultipartError("a multipart part has no Content-Disposition header")
    params = {}
    for key, quoted, bare in _DISPOSITION_PARAM.findall(disposition):
        params[key.lower()] = quoted.replace('\\"', '"') if quoted or not bare else bare.strip()
    return PartStart(params.get("name", ""), params.get("filename"), content_type or "application/octet-stream")


class MultipartReader:
    """``feed(chunk) -> events``; ``close()`` checks the body ended properly."""

    def __init__(self, boundary: bytes):
        self._delimiter = b"\r\n--" + boundary
        self._buffer = b"\r\n"            # so the first delimiter looks like every other
        self._state = "preamble"          # preamble → headers → data → (headers | done)
        self._events: list[Event] = []

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += chunk
        self._events = []
        while self._step():
            pass
        return self._events

    def close(self) -> None:
        if self._state != "done":
            raise MultipartError("the multipart body ended before its closing boundary")

    def _step(self) -> bool:
        if self._state == "preamble":
            at = self._buffer.find(self._delimiter)
            if at < 0:
                self._buffer = self._buffer[-len(self._delimiter):]
                return False
            self._buffer = self._buffer[at + len(self._delimiter):]
            self._state = "after_delimiter"
            return True
        if self._state == "after_delimiter":
            if len(self._buffer) < 2:
                return False
            if self._buffer.startswith(b"--"):
                self._state = "done"
                self._buffer = b""
                return False
            if not self._buffer.startswith(b"\r\n"):
                raise MultipartError("malformed multipart boundary line")
            self._buffer = self._buffer[2:]
            self._state = "headers"
            return True
        if self._state == "headers":
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEADER_BYTES:
                    raise MultipartError("multipart part headers are too long")
                return False
            self._events.append(_part_start(self._buffer[:end]))
            self._buffer = self._buffer[end + 4:]
            self._state = "data"
            return True
        if self._state == "data":
            at = self._buffer.find(self._delimiter)
            if at < 0:
                # Keep what could be the start of a delimiter split across chunks.
                keep = len(self._delimiter) - 1
                if len(self._buffer) > keep:
                    self._events.append(PartData(self._buffer[:-keep]))
                    self._buffer = self._buffer[-keep:]
                return False
            if at:
                self._events.append(PartData(self._buffer[:at]))
            self._events.append(PartEnd())
            self._buffer = self._buffer[at + len(self._delimiter):]
            self._state = "after_delimiter"
            return True
        return False                       # done: ignore an epilogue


def read_part(body: bytes, content_type: str, field: str) -> tuple[bytes, str] | None:
    """``(content, content type)`` of the first ``field`` part of a whole multipart body held
    in memory (a small upload such as an enrolment recording), or None if there is none.
    What follows that part is not read."""
    reader = MultipartReader(boundary_of(content_type))
    wanted: PartStart | None = None
    data: list[bytes] = []
    for event in reader.feed(body):
        if isinstance(event, PartStart):
            wanted = event if event.name == field else None
        elif isinstance(event, PartData) and wanted is not None:
            data.append(event.data)
        elif isinstance(event, PartEnd) and wanted is not None:
            return b"".join(data), wanted.content_type
    reader.close()
    return None
