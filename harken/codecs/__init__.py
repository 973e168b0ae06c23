"""Codec plugins: bytes in the declared codec → int16 mono PCM at 16 kHz.

``decoder_for(codec, sample_rate, channels)`` is the whole public surface; it raises
``UnsupportedFormat`` for a combination the codec cannot decode.
"""

from __future__ import annotations

from typing import Callable

from .base import TARGET_RATE, Decoder, DecodeError, UnsupportedFormat, mix_to_mono
from .pcm import PCM16Decoder

# codec name → (decoder factory, default sample rate when the client gives none)
_Factory = Callable[[int, int], Decoder]
REGISTRY: dict[str, tuple[_Factory, int]] = {
    "pcm8": (PCM16Decoder, 8000),
    "pcm16": (PCM16Decoder, 16000),
}

# Rates a client may declare (PROTOCOL.md §2).
SAMPLE_RATES = (8000, 12000, 16000, 24000, 32000, 44100, 48000)


def register(name: str, factory: _Factory, default_rate: int) -> None:
    REGISTRY[name] = (factory, default_rate)


def codec_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def default_rate(codec: str) -> int:
    return REGISTRY[codec][1]


def decoder_for(codec: str, sample_rate: int, channels: int = 1) -> Decoder:
    try:
        factory, _ = REGISTRY[codec]
    except KeyError:
        raise UnsupportedFormat(f"unknown codec {codec!r}") from None
    decoder = factory(sample_rate, channels)
    decoder.codec = codec
    return decoder


__all__ = [
    "TARGET_RATE", "Decoder", "DecodeError", "UnsupportedFormat", "decoder_for", "codec_names",
    "default_rate", "register", "mix_to_mono", "SAMPLE_RATES", "REGISTRY",
]
