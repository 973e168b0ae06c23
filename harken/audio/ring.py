"""The last N seconds of a session's audio, addressed by audio-clock position.

Speaker identification embeds a clip of a segment some time after the words were spoken (the
engine's words and the segment merge come first), so the session keeps the recent audio here.
Position 0 is the first sample appended, which is the session's audio-clock zero when the session
appends every decoded chunk: segment times on the audio clock then address the ring directly.
"""

from __future__ import annotations

import numpy as np

from .replay import PCM16, ReplayBuffer

SAMPLE_RATE = 16000


class AudioRing:
    """The newest ``seconds`` of int16 16 kHz samples; older ones are forgotten.

    Chunks are kept by reference (``audio.replay.ReplayBuffer``), not copied into one circular
    array: an append is a list append. The session appends 40 ms pieces of a hundred or more
    streams; copying each into a preallocated 1.9 MB array (and faulting its pages in) cost
    about 0.05 % of a core per stream. Appended arrays must not be changed afterwards. Not
    thread-safe: the session appends on the event loop; ``slice`` returns an array that is never
    written again, which a worker thread may use freely.
    """

    def __init__(self, seconds: float = 60.0, sample_rate: int = SAMPLE_RATE):
        if seconds <= 0:
            raise ValueError("seconds must be positive")
        self.sample_rate = sample_rate
        self._buffer = ReplayBuffer(int(round(seconds * sample_rate)))

    @property
    def capacity(self) -> int:
        return self._buffer.max_samples

    @property
    def end_sample(self) -> int:
        """Audio-clock position just after the newest sample."""
        return self._buffer.end

    @property
    def start_sample(self) -> int:
        """Audio-clock position of the oldest sample still held."""
        return self._buffer.start

    @property
    def end_seconds(self) -> float:
        return self.end_sample / self.sample_rate

    @property
    def start_seconds(self) -> float:
        return self.start_sample / self.sample_rate

    def append(self, pcm: np.ndarray) -> None:
        if pcm.dtype is not PCM16 or pcm.ndim != 1:       # the session's pieces already are
            pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        self._buffer.append(pcm)

    def slice_samples(self, start: int, end: int) -> np.ndarray:
        """Clock samples ``[start, end)``, clipped to what the ring still holds.

        Audio that has aged out or not arrived yet is simply absent: the result may be shorter
        than asked for, or empty.
        """
        start = max(int(start), self.start_sample)
        end = min(int(end), self.end_sample)
        if end <= start:
            return np.zeros(0, dtype=np.int16)
        return self._buffer.read(start, end - start)

    def slice(self, start_s: float, end_s: float) -> np.ndarray:
        """The audio between two audio-clock times in seconds (see ``slice_samples``)."""
        return self.slice_samples(round(start_s * self.sample_rate), round(end_s * self.sample_rate))
