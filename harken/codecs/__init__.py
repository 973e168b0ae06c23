"""Codec plugins: bytes in the declared codec → int16 mono PCM at 16 kHz.

``decoder_for(codec, sample_rate, channels)`` builds the decoder of one connection and raises
``UnsupportedFormat`` for a combination the codec cannot decode (a bad connection parameter).
The gateway calls ``await open_decoder(...)``, the same thing, run in a worker thread the first time
a codec is built in the process (it loads the codec's libraries: up to a few ms, which does not
belong on the event loop) and on the loop afterwards, when a build takes from microseconds (PCM,
LC3) to ~0.1 ms (Opus; AAC opens an FFmpeg context): less than a trip to a thread costs on a busy
loop, ~1 ms of CPU per connection during a 300-stream ramp.
``harken.codecs.encode`` is the device side: audio → the messages a device sends.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Callable

from .aac import AACDecoder
from .base import TARGET_RATE, Decoder, DecodeError, HeldBack, UnsupportedFormat, mix_to_mono
from .channels import MAX_CHANNELS, ChannelDemuxDecoder, channel_layout, uses_channel_prefix
from .lc3 import LC3Decoder
from .opus import OpusDecoder
from .pcm import PCM8Decoder, PCM16Decoder

# codec name → (decoder factory, default sample rate when the client gives none)
_Factory = Callable[[int, int], Decoder]
REGISTRY: dict[str, tuple[_Factory, int]] = {
    "pcm8": (PCM8Decoder, 8000),  # 8-bit unsigned, as Omi's backend reads it (see pcm.py)
    "pcm16": (PCM16Decoder, 16000),
    "pcm": (PCM16Decoder, 16000),  # the app's phone-call recorder (with channels=2: channel-prefixed)
    # One decoder for both: every Opus packet says its own duration in its TOC byte.
    "opus": (OpusDecoder, 16000),
    "opus_fs320": (OpusDecoder, 16000),
    "aac": (AACDecoder, 16000),
    "lc3": (LC3Decoder, 16000),  # frame length = message length
    "lc3_fs1030": (partial(LC3Decoder, frame_bytes=30), 16000),
}

# Rates a client may declare (PROTOCOL.md §2); each codec narrows them (Opus has no 32/44.1 kHz,
# LC3 no 12/44.1 kHz), which ``decoder_for`` reports as ``UnsupportedFormat``.
SAMPLE_RATES = (8000, 12000, 16000, 24000, 32000, 44100, 48000)


def register(name: str, factory: _Factory, default_rate: int) -> None:
    REGISTRY[name] = (factory, default_rate)


def codec_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def default_rate(codec: str) -> int:
    return REGISTRY[codec][1]


def decoder_for(codec: str, sample_rate: int, channels: int = 1, source: str | None = None) -> Decoder:
    """``source`` matters only with ``channels >= 2``: a phone call's messages are channel-prefixed
    (codecs/channels.py), other stereo streams interleaved."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise UnsupportedFormat(f"channels must be 1–{MAX_CHANNELS}; got {channels!r}")
    if uses_channel_prefix(codec, channels, source):
        return ChannelDemuxDecoder(codec, sample_rate, channel_layout(source, channels), decoder_for)
    try:
        factory, _ = REGISTRY[codec]
    except KeyError:
        raise UnsupportedFormat(f"unknown codec {codec!r}") from None
    decoder = factory(sample_rate, channels)
    decoder.codec = codec
    return decoder


# Codecs built once in this process: their libraries are loaded, a build is cheap.
_loaded: set[str] = set()


async def open_decoder(codec: str, sample_rate: int, channels: int = 1, source: str | None = None) -> Decoder:
    """``decoder_for``, in a worker thread the first time ``codec`` is built (see the module docstring)."""
    if codec in _loaded:
        return decoder_for(codec, sample_rate, channels, source)
    decoder = await asyncio.to_thread(decoder_for, codec, sample_rate, channels, source)
    _loaded.add(codec)
    return decoder


__all__ = [
    "TARGET_RATE", "Decoder", "DecodeError", "HeldBack", "UnsupportedFormat", "decoder_for", "open_decoder",
    "codec_names", "default_rate", "register", "mix_to_mono", "SAMPLE_RATES", "REGISTRY",
    "ChannelDemuxDecoder", "channel_layout", "uses_channel_prefix", "MAX_CHANNELS",
]
