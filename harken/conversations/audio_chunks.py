"""Exact N-second chunks of a PCM16 stream, for the audio-bytes webhook.

Omi cut chunks whenever "more than N seconds" had piled up, so chunk lengths wandered and
receivers saw garbled or misaligned audio (omi#2193). Here every chunk is exactly
``interval × rate × 2`` bytes, the remainder goes out when the session ends, and each chunk
knows its byte offset, so the chunks concatenate to exactly the audio received.
"""

from __future__ import annotations

from typing import Any

BYTES_PER_SAMPLE = 2


class AudioChunker:
    def __init__(self, interval_seconds: int, sample_rate: int = 16000) -> None:
        if interval_seconds <= 0:
            raise ValueError("interval_seconds must be positive")
        self.chunk_bytes = int(interval_seconds * sample_rate) * BYTES_PER_SAMPLE
        self._buffer = bytearray()
        self._offset = 0            # stream offset of the buffer's first byte

    @property
    def received(self) -> int:
        """Bytes taken in so far."""
        return self._offset + len(self._buffer)

    def add(self, pcm: Any) -> list[tuple[int, bytes]]:
        """Take PCM16 (bytes-like, or an int16 array) and return the chunks now complete,
        as ``(byte offset, chunk)``."""
        if hasattr(pcm, "astype"):                 # numpy: make sure of little-endian int16
            pcm = pcm.astype("<i2", copy=False).tobytes()
        self._buffer += pcm
        chunks = []
        while len(self._buffer) >= self.chunk_bytes:
            chunks.append((self._offset, bytes(self._buffer[:self.chunk_bytes])))
            del self._buffer[:self.chunk_bytes]
            self._offset += self.chunk_bytes
        return chunks

    def flush(self) -> tuple[int, bytes] | None:
        """The partial last chunk (None if there is none); the chunker is then empty."""
        if not self._buffer:
            return None
        chunk = (self._offset, bytes(self._buffer))
        self._offset += len(self._buffer)
        self._buffer.clear()
        return chunk
