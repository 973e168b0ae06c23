"""The last N seconds of a session's audio, addressed by audio-clock position.

Speaker identification embeds a clip of a segment some time after the words were spoken (the
engine's words and the segment merge come first), so the session keeps the recent audio here.
Position 0 is the first sample appended, which is the session's audio-clock zero when the session
appends every decoded chunk: segment times on the audio clock then address the ring directly.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000


class AudioRing:
    """A fixed-size circular buffer of int16 16 kHz samples; the oldest are overwritten.

    Memory is allocated once (``seconds`` × 32 kB). Not thread-safe: the session appends on the
    event loop, and ``slice`` returns a copy that a worker thread may use freely.
    """

    def __init__(self, seconds: float = 60.0, sample_rate: int = SAMPLE_RATE):
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        self.sample_rate = sample_rate
        self._data = np.zeros(int(round(seconds * sample_rate)), dtype=np.int16)
        self._end = 0                     # samples appended since the start (the clock position)

    @property
    def capacity(self) -> int:
        return self._data.size

    @property
    def end_sample(self) -> int:
        """Audio-clock position just after the newest sample."""
        return self._end

    @property
    def start_sample(self) -> int:
        """Audio-clock position of the oldest sample still held."""
        return max(0, self._end - self._data.size)

    @property
    def end_seconds(self) -> float:
        return self._end / self.sample_rate

    @property
    def start_seconds(self) -> float:
        return self.start_sample / self.sample_rate

    def append(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        size = self._data.size
        if pcm.size >= size:              # a chunk longer than the ring: only its tail survives
            self._end += pcm.size
            self._data[:] = pcm[-size:]
            self._data = np.roll(self._data, self._end % size)
            return
        at = self._end % size
        first = min(pcm.size, size - at)
        self._data[at : at + first] = pcm[:first]
        self._data[: pcm.size - first] = pcm[first:]
        self._end += pcm.size

    def slice_samples(self, start: int, end: int) -> np.ndarray:
        """A copy of clock samples ``[start, end)``, clipped to what the ring still holds.

        Audio that has aged out or not arrived yet is simply absent: the result may be shorter
        than asked for, or empty.
        """
        start = max(int(start), self.start_sample)
        end = min(int(end), self._end)
        if end <= start:
            return np.zeros(0, dtype=np.int16)
        size = self._data.size
        a, b = start % size, end % size
        if a < b or b == 0:
            return self._data[a : b or size].copy()
        return np.concatenate((self._data[a:], self._data[:b]))

    def slice(self, start_s: float, end_s: float) -> np.ndarray:
        """The audio between two audio-clock times in seconds (see ``slice_samples``)."""
        return self.slice_samples(round(start_s * self.sample_rate), round(end_s * self.sample_rate))
