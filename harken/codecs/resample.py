"""Streaming resampling to 16 kHz with soxr (state kept across messages: no seams)."""

from __future__ import annotations

import numpy as np
import soxr

from .base import TARGET_RATE


class StreamResampler:
    """Resamples successive mono chunks from ``rate`` to 16 kHz; identity when already 16 kHz.

    ``dtype`` is that of the chunks, int16 (PCM, Opus, LC3) or float32 (AAC decodes to floats,
    which are cheaper to resample first and convert at the lower rate).

    soxr's ``ResampleStream`` keeps its filter state between calls, so chunk boundaries leave no
    clicks (a stateless per-chunk resampler does: see reference/auth-and-codecs.md B5). It holds a
    few milliseconds back; ``flush`` returns them at the end of the stream.
    """

    def __init__(self, rate: int, dtype: str = "int16"):
        self.rate = rate
        self.dtype = dtype
        self._stream = None if rate == TARGET_RATE else soxr.ResampleStream(rate, TARGET_RATE, 1, dtype=dtype)

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
            return np.zeros(0, dtype=self.dtype)
        return self._stream.resample_chunk(np.zeros(0, dtype=self.dtype), last=True)
