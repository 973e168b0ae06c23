"""Raw PCM: Omi's ``pcm8`` and ``pcm16`` are both 16-bit little-endian; the digit is the rate."""

from __future__ import annotations

import numpy as np

from .base import Decoder, DecodeError, mix_to_mono
from .resample import StreamResampler


class PCM16Decoder(Decoder):
    codec = "pcm16"

    def __init__(self, sample_rate: int, channels: int):
        super().__init__(sample_rate, channels)
        self._frame_bytes = 2 * channels
        self._carry = b""  # an odd byte (or partial frame) left by the previous message
        self._resampler = StreamResampler(sample_rate)

    def decode(self, message: bytes) -> np.ndarray:
        data = self._carry + message
        usable = len(data) - len(data) % self._frame_bytes
        self._carry = data[usable:]
        if len(self._carry) > 64:  # cannot happen with sane frames; never let state grow
            self._carry = b""
            raise DecodeError("misaligned PCM frame")
        samples = np.frombuffer(data[:usable], dtype="<i2")
        return self._resampler.process(mix_to_mono(samples, self.channels))

    def flush(self) -> np.ndarray:
        return self._resampler.flush()
