"""Raw PCM: ``pcm16`` and ``pcm`` (16-bit little-endian) and ``pcm8`` (8-bit unsigned), at ``sample_rate``.

``pcm8`` follows Omi's backend as it reads the app's audio today: BasedHardware/omi
``backend/routers/listen/receiver.py`` (``ListenReceiver.receive_data``, checked Dec 2026 at two
stored versions, c1ea10e1 and 006756d2) decodes ``codec == 'pcm8'`` with
``audioop.lin2lin(audioop.bias(data, 1, -128), 1, 2)``: each byte is one unsigned 8-bit sample
(offset 128) widened to 16 bits, at the declared ``sample_rate`` (no resampling there; the app
declares 16000, the backend's default is 8000). An older reading of the same name (16-bit samples
at 8 kHz, the digit being the rate, from Omi's ``docs/_developer/Protocol.md``) is not what the
backend does any more. ``pcm`` is what the app's phone-call recorder declares
(``buildPhoneCallWebSocketUrl``: ``codec=pcm&sample_rate=48000&channels=2``); upstream treats any
codec other than opus/aac/lc3/pcm8 as 16-bit PCM, so ``pcm`` is ``pcm16`` by another name.

Garbage. PCM has no framing, so no byte sequence is invalid. Two things still give random bytes
away (``signature``): a device sends messages of one size and whole sample frames (a client piping
a file does not, and is then never checked), and random bytes read as samples are full-scale white noise, which speech and
room noise never are. A message failing either is dropped as a decode error; anything else is audio.
"""

from __future__ import annotations

import numpy as np

from .base import Decoder, DecodeError, UnsupportedFormat, mix_to_mono
from .resample import StreamResampler
from .signature import SteadySize, looks_like_random_bytes

# Any declared rate is resampled; outside this range the client is surely wrong about its audio.
MIN_RATE, MAX_RATE = 4000, 192000


class PCMDecoder(Decoder):
    """Linear PCM at any rate, interleaved when stereo; 2-byte signed LE or 1-byte unsigned samples.

    A message may end inside a sample frame (a client piping a file through websocat cuts reads
    anywhere): the partial frame is carried into the next message. A device sends whole frames,
    so for it the carry is always empty.
    """

    codec = "pcm16"

    def __init__(self, sample_rate: int, channels: int, sample_bytes: int = 2):
        super().__init__(sample_rate, channels)
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise UnsupportedFormat(f"PCM sample_rate must be {MIN_RATE}–{MAX_RATE} Hz; got {sample_rate}")
        self._sample_bytes = sample_bytes
        self._frame_bytes = sample_bytes * channels
        self._carry = b""  # the start of a sample frame cut off at the end of the previous message
        self._resampler = StreamResampler(sample_rate)
        self._sizes = SteadySize(unit=self._frame_bytes)

    def decode(self, message: bytes) -> np.ndarray:
        if not self._sizes.admits(len(message)):
            raise DecodeError(f"PCM message of {len(message)} bytes from a client that sends one size")
        data = self._carry + message if self._carry else message
        usable = len(data) - len(data) % self._frame_bytes
        carry = bytes(data[usable:])
        if self._sample_bytes == 2:
            samples = np.frombuffer(data, dtype="<i2", count=usable // 2)
        else:  # unsigned 8-bit: (u8 - 128) << 8, as audioop.bias + lin2lin
            samples = ((np.frombuffer(data, dtype=np.uint8, count=usable).astype(np.int16) - 128) << 8)
        mono = mix_to_mono(samples, self.channels)
        if looks_like_random_bytes(mono):
            raise DecodeError("PCM message reads as full-scale white noise (random bytes)")
        self._carry = carry
        if mono is samples and self._resampler.passthrough and self._sample_bytes == 2:
            mono = mono.copy()  # a view of the message's read-only bytes: hand out our own copy
        return self._resampler.process(mono)

    def flush(self) -> np.ndarray:
        return self._resampler.flush()


def PCM16Decoder(sample_rate: int, channels: int) -> PCMDecoder:
    return PCMDecoder(sample_rate, channels, 2)


def PCM8Decoder(sample_rate: int, channels: int) -> PCMDecoder:
    return PCMDecoder(sample_rate, channels, 1)
