"""Streaming resampling to 16 kHz with soxr (state kept across messages: no seams).

int16 audio is resampled as float32 and rounded back here. soxr's own int16 output is dithered
with random noise (±1–2 LSB), so the same bytes resampled twice differed, and so did the
engine's transcript of them: at 8 kHz the same test audio gave 30 to 36 word errors from run to
run. In float32 soxr adds nothing random, so the same input always gives the same samples.
"""

from __future__ import annotations

import numpy as np
import soxr

from .base import TARGET_RATE


# Kept on the int16 scale (soxr's filtering is linear): fewer numpy passes per 10 ms chunk.
def _to_float(pcm: np.ndarray) -> np.ndarray:
    return pcm.astype(np.float32)


def _to_int16(samples: np.ndarray) -> np.ndarray:
    np.rint(samples, out=samples)
    return samples.clip(-32768, 32767).astype(np.int16)


def resample_int16(pcm: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """A whole int16 clip (samples, or samples × channels) at another rate, without dither."""
    if from_rate == to_rate:
        return np.asarray(pcm, dtype=np.int16)
    return _to_int16(soxr.resample(_to_float(np.asarray(pcm)), from_rate, to_rate))


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
        self._int16 = dtype == "int16"      # resampled as float32 (see the module docstring)
        self._stream = None if rate == TARGET_RATE else soxr.ResampleStream(rate, TARGET_RATE, 1, dtype="float32")

    @property
    def passthrough(self) -> bool:
        """True when ``process`` returns its input unchanged (the rate is already 16 kHz)."""
        return self._stream is None

    def process(self, pcm: np.ndarray) -> np.ndarray:
        if self._stream is None or len(pcm) == 0:
            return pcm
        if self._int16:
            return _to_int16(self._stream.resample_chunk(_to_float(pcm)))
        return self._stream.resample_chunk(pcm)

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, dtype=self.dtype)
        rest = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        return _to_int16(rest) if self._int16 else rest
