"""What every codec plugin provides: bytes of one WebSocket message in, PCM16 mono 16 kHz out."""

from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np

TARGET_RATE = 16000


def no_samples() -> np.ndarray:
    """A fresh empty int16 array: what a decoder returns when a message yields no audio yet."""
    return np.zeros(0, dtype=np.int16)


class DecodeError(Exception):
    """One message could not be decoded. The caller drops it, counts it, and goes on."""


class HeldBack(DecodeError):
    """A message held back until the next one confirms it (an Opus TOC the stream has not sent,
    an LC3 jump in loudness): no audio now; if confirmed, its audio comes with the next
    message's, else it is dropped then. Not a corrupt frame (yet)."""


class UnsupportedFormat(ValueError):
    """The codec/rate/channels combination cannot be decoded (a bad connection parameter)."""


class Decoder(abc.ABC):
    """Stateful decoder for one connection.

    ``decode`` returns int16 samples at 16 kHz mono, possibly empty (a resampler or a codec may
    hold samples back). It raises ``DecodeError`` for a bad frame and leaves its state usable.
    It never keeps a reference to the array it returned, so callers may keep or mutate it.
    """

    codec: str = "?"

    def __init__(self, sample_rate: int, channels: int):
        if channels not in (1, 2):
            raise UnsupportedFormat(f"channels must be 1 or 2; got {channels!r}")
        if not isinstance(sample_rate, int) or sample_rate <= 0:
            raise UnsupportedFormat(f"sample_rate must be a positive integer; got {sample_rate!r}")
        self.sample_rate = sample_rate
        self.channels = channels

    @abc.abstractmethod
    def decode(self, message: bytes) -> np.ndarray: ...

    def flush(self) -> np.ndarray:
        """Samples still held back (resampler tail); called once when the stream ends."""
        return no_samples()

    def held_dropped(self) -> int:
        """How many messages this decoder has held back (``HeldBack``) and then dropped because
        the next one did not confirm them, so far: bad frames found late. A held message that is
        confirmed is decoded (its audio comes with the next) and is not counted here."""
        return 0

    def native_reader(self, piece_samples: int, max_message: int, on_piece: Callable[[], None]):
        """A native reader that decodes this stream's frames straight off the socket
        (native/opus_reader.c), sharing this decoder's state, or None when this codec and
        format have none: then every message comes through ``decode``."""
        return None

    def close(self) -> None:
        """Free native state."""


def mix_to_mono(interleaved: np.ndarray, channels: int) -> np.ndarray:
    """Average interleaved int16 channels into one (rounding down; the mean of int16s fits)."""
    if channels == 1:
        return interleaved
    usable = interleaved[: len(interleaved) - len(interleaved) % channels]
    if channels == 2:  # the only multi-channel case of the protocol: 3-4x faster than the general sum
        return ((usable[0::2].astype(np.int32) + usable[1::2]) >> 1).astype(np.int16)
    frames = usable.reshape(-1, channels).astype(np.int32)
    return (frames.sum(axis=1) // channels).astype(np.int16)
