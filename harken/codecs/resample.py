"""Streaming resampling to 16 kHz with soxr (state kept across messages: no seams)."""

from __future__ import annotations

import numpy as np
import soxr

from .base import TARGET_RATE


class StreamResampler:
    """Resamples successive int16 chunks from ``rate`` to 16 kHz; identity when already 16 kHz."""

    def __init__(self, rate: int):
        self.rate = rate
        self._stream = None if rate == TARGET_RATE else soxr.ResampleStream(rate, TARGET_RATE, 1, dtype="int16")

    def process(self, pcm: np.ndarray) -> np.ndarray:
        if self._stream is None or len(pcm) == 0:
            return pcm
        return self._stream.resample_chunk(pcm)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        return self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
