"""Streaming resampling to 16 kHz with soxr (state kept across messages: no seams)."""

from __future__ import annotations

import numpy as np
import soxr

from .base import TARGET_RATE, no_samples


class StreamResampler:
    """Resamples successive int16 mono chunks from ``rate`` to 16 kHz; identity when already 16 kHz.

    soxr's ``ResampleStream`` keeps its filter state between calls, so chunk boundaries leave no
    clicks (a stateless per-chunk resampler does: see reference/auth-and-codecs.md B5). It holds a
    few milliseconds back; ``flush`` returns them at the end of the stream.
    """

    def __init__(self, rate: int):
        self.rate = rate
        self._stream = None if rate == TARGET_RATE else soxr.ResampleStream(rate, TARGET_RATE, 1, dtype="int16")

    @property
    def passthrough(self) -> bool:
        """True when ``process`` returns its input unchanged (the rate is already 16 kHz)."""
        return self._stream is None

    def process(self, pcm: np.ndarray) -> np.ndarray:
        if self._stream is None or len(pcm) == 0:
            return pcm
        return self._stream.resample_chunk(pcm)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return no_samples()
        return self._stream.resample_chunk(no_samples(), last=True)
