"""Raw PCM: Omi's ``pcm8`` and ``pcm16`` are both 16-bit little-endian; the digit is the rate."""

from __future__ import annotations

import numpy as np

from .base import Decoder, UnsupportedFormat, mix_to_mono
from .resample import StreamResampler

# Any declared rate is resampled; outside this range the client is surely wrong about its audio.
MIN_RATE, MAX_RATE = 4000, 192000


class PCM16Decoder(Decoder):
    """s16le at any rate, interleaved when stereo.

    PCM has no framing, so nothing can be told apart from garbage and ``decode`` never raises.
    A message may end inside a sample (a client piping a file through websocat cuts reads
    anywhere): the partial sample frame is carried into the next message. A device sends whole
    samples, so for it the carry is always empty.
    """

    codec = "pcm16"

    def __init__(self, sample_rate: int, channels: int):
        super().__init__(sample_rate, channels)
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise UnsupportedFormat(f"PCM sample_rate must be {MIN_RATE}–{MAX_RATE} Hz; got {sample_rate}")
        self._frame_bytes = 2 * channels
        self._carry = b""  # the start of a sample frame cut off at the end of the previous message
        self._resampler = StreamResampler(sample_rate)

    def decode(self, message: bytes) -> np.ndarray:
        data = self._carry + message if self._carry else message
        usable = len(data) - len(data) % self._frame_bytes
        self._carry = bytes(data[usable:])
        samples = np.frombuffer(data, dtype="<i2", count=usable // 2)
        mono = mix_to_mono(samples, self.channels)
        if mono is samples and self._resampler.passthrough:
            mono = mono.copy()  # a view of the message's read-only bytes: hand out our own copy
        return self._resampler.process(mono)

    def flush(self) -> np.ndarray:
        return self._resampler.flush()
