"""OpenGlass photos arriving as ``image_chunk`` text messages, put back together (sans-I/O).

The app sends a photo as ``{"type": "image_chunk", "id", "index", "total", "data"}`` messages,
``data`` being a piece (8 KB) of the JPEG's base64 text (reference/omi-app-client.md §2). Upstream
keeps up to 50 photos in flight for 60 s and closes 1008 on a bad piece; Harken bounds the memory
a connection can make it hold (size and pieces per photo, photos in flight, their total size, a
deadline for unfinished photos) and answers a bad piece with an ``error`` event, never a close:
a close sends the app into its reconnect loop and loses the audio stream for a photo.

Pure logic: no socket, no clock of its own (the caller passes ``now``), so every rule is tested
without a server. ``PhotoAssembler.add`` returns a finished photo, None while pieces are missing,
or raises ``PhotoChunkError`` with a message for the client.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Mapping

_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
MAX_ID_LENGTH = 64


@dataclass(frozen=True)
class PhotoLimits:
    max_photo_bytes: int = 1024 * 1024        # base64 text of one photo (an OpenGlass JPEG is ~10-60 KB)
    max_pieces: int = 256                     # 8 KB pieces: 2 MB of text, past the size limit anyway
    max_in_flight: int = 4                    # unfinished photos per connection
    max_bytes_in_flight: int = 2 * 1024 * 1024
    timeout: float = 60.0                     # seconds an unfinished photo is kept (upstream's TTL)


class PhotoChunkError(ValueError):
    """A piece that cannot be used; ``temp_id`` names its photo when it is known."""

    def __init__(self, message: str, temp_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.temp_id = temp_id


@dataclass(frozen=True)
class Photo:
    temp_id: str                  # the app's id for it (``photo_processing`` echoes it)
    jpeg: bytes

    @property
    def base64(self) -> str:
        return base64.b64encode(self.jpeg).decode()


@dataclass
class _Pending:
    total: int
    started: float
    pieces: dict[int, str] = field(default_factory=dict)
    size: int = 0


class PhotoAssembler:
    def __init__(self, limits: PhotoLimits | None = None) -> None:
        self.limits = limits or PhotoLimits()
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self.expired = 0              # photos dropped unfinished (deadline or room for newer ones)

    @property
    def bytes_held(self) -> int:
        return sum(p.size for p in self._pending.values())

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def add(self, message: Mapping[str, Any], now: float) -> Photo | None:
        self.expire(now)
        temp_id, index, total, data = _fields(message, self.limits)
        pending = self._pending.get(temp_id)
        if pending is None:
            while len(self._pending) >= self.limits.max_in_flight:
                self._pending.popitem(last=False)          # the oldest unfinished photo gives way
                self.expired += 1
            pending = self._pending[temp_id] = _Pending(total, now)
        elif pending.total != total:
            raise PhotoChunkError(f"image_chunk total {total} differs from the photo's first piece ({pending.total})",
                                  temp_id)
        if index >= pending.total:
            raise PhotoChunkError(f"image_chunk index {index} is out of range for total {pending.total}", temp_id)
        if index in pending.pieces:                        # a resent piece: the first one stands
            return None
        if pending.size + len(data) > self.limits.max_photo_bytes:
            del self._pending[temp_id]
            raise PhotoChunkError(f"photo larger than {self.limits.max_photo_bytes} bytes of base64: dropped", temp_id)
        while self.bytes_held + len(data) > self.limits.max_bytes_in_flight and len(self._pending) > 1:
            oldest = next(iter(self._pending))
            if oldest == temp_id:
                break
            del self._pending[oldest]
            self.expired += 1
        pending.pieces[index] = data
        pending.size += len(data)
        if len(pending.pieces) < pending.total:
            return None
        del self._pending[temp_id]
        text = "".join(pending.pieces[i] for i in range(pending.total))
        try:
            jpeg = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise PhotoChunkError("the photo's pieces are not valid base64 together: dropped", temp_id) from None
        if not jpeg:
            raise PhotoChunkError("the photo is empty", temp_id)
        return Photo(temp_id, jpeg)

    def expire(self, now: float) -> int:
        """Drop photos unfinished past the deadline; returns how many."""
        late = [tid for tid, p in self._pending.items() if now - p.started > self.limits.timeout]
        for tid in late:
            del self._pending[tid]
        self.expired += len(late)
        return len(late)

    def clear(self) -> None:
        self._pending.clear()


def _fields(message: Mapping[str, Any], limits: PhotoLimits) -> tuple[str, int, int, str]:
    temp_id, index, total, data = (message.get(k) for k in ("id", "index", "total", "data"))
    if not isinstance(temp_id, str) or not temp_id or len(temp_id) > MAX_ID_LENGTH:
        raise PhotoChunkError(f"image_chunk id must be a string of 1-{MAX_ID_LENGTH} characters")
    if not _is_int(total) or not 1 <= total <= limits.max_pieces:
        raise PhotoChunkError(f"image_chunk total must be an integer from 1 to {limits.max_pieces}", temp_id)
    if not _is_int(index) or index < 0:
        raise PhotoChunkError("image_chunk index must be a non-negative integer", temp_id)
    if not isinstance(data, str) or not data or not _BASE64_TEXT.match(data):
        raise PhotoChunkError("image_chunk data must be base64 text", temp_id)
    return temp_id, index, total, data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
