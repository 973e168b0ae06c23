"""Audio kept by absolute sample position, so a stream can be (re)fed from any point still held.

``FallbackStream`` appends every sample it is given and reads forward from wherever the current
provider is; after a failure it reads again from the replay point. Chunks are stored as given (no
copy on append) in a list indexed by their start sample, so a read is a binary search plus a
concatenation of the chunks it spans.
"""

from __future__ import annotations

import bisect

import numpy as np


PCM16 = np.dtype(np.int16)      # the dtype every buffered piece has (compare with ``is``: a singleton)


class ReplayBuffer:
    """Bounded PCM16 store addressed by sample index since the first sample ever appended."""

    def __init__(self, max_samples: int):
        if max_samples <= 0:
            raise ValueError("max_samples must be positive")
        self.max_samples = max_samples
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []    # sample index of each chunk's first sample
        self._head = 0                  # index of the first live chunk (list compacted lazily)
        self._start = 0                 # first sample still held
        self._end = 0                   # one past the last sample appended

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._end

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, pcm: np.ndarray) -> int:
        """Store ``pcm`` (int16); returns how many of the oldest samples were evicted to stay bounded."""
        if pcm.size:
            self._chunks.append(pcm)
            self._starts.append(self._end)
            self._end += pcm.size
        overflow = self._end - self._start - self.max_samples
        if overflow > 0:
            self.discard_before(self._start + overflow)
            return overflow
        return 0

    def discard_before(self, sample: int) -> None:
        """Forget everything before ``sample`` (no-op if already gone)."""
        sample = min(sample, self._end)
        if sample <= self._start:
            return
        self._start = sample
        # drop whole chunks that end at or before the new start
        while self._head < len(self._chunks) and self._starts[self._head] + self._chunks[self._head].size <= sample:
            self._head += 1
        if self._head > 64 and self._head * 2 > len(self._chunks):
            del self._chunks[: self._head], self._starts[: self._head]
            self._head = 0

    def read(self, start: int, max_samples: int) -> np.ndarray:
        """Up to ``max_samples`` contiguous samples from ``start`` (which must be ≥ ``self.start``)."""
        if start < self._start:
            raise IndexError(f"sample {start} is no longer held (buffer starts at {self._start})")
        stop = min(self._end, start + max_samples)
        if stop <= start:
            return np.zeros(0, dtype=np.int16)
        i = bisect.bisect_right(self._starts, start, lo=self._head) - 1
        parts = []
        while i < len(self._chunks) and self._starts[i] < stop:
            chunk, chunk_start = self._chunks[i], self._starts[i]
            lo, hi = max(start, chunk_start) - chunk_start, min(stop, chunk_start + chunk.size) - chunk_start
            parts.append(chunk[lo:hi])
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
