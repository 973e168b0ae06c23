"""The device side: 16 kHz speech → the exact WebSocket binary messages a device sends.

Used by ``harken stream`` / ``harken loadtest`` and by the tests. What each codec's messages
look like by default (PROTOCOL.md §2, and what Omi devices and apps send):

| codec | one message |
|---|---|
| ``pcm16``, ``pcm`` | 10 ms of s16le at ``sample_rate``, channels interleaved |
| ``pcm8`` | 10 ms of unsigned 8-bit samples at ``sample_rate``, channels interleaved |
| ``pcm`` with 2+ channels | a phone call: 10 ms of one leg's s16le, prefixed with its channel id (1, 2, …) |
| ``opus`` | one 10 ms Opus packet (libopus, VOIP application) |
| ``opus_fs320`` | one 20 ms Opus packet |
| ``aac`` | one ADTS frame of AAC-LC (1024 samples) from FFmpeg's encoder |
| ``lc3`` | one 10 ms LC3 frame of 40 bytes per channel |
| ``lc3_fs1030`` | three 10 ms LC3 frames of 30 bytes per channel (a BLE notification) |

``frame_ms`` changes the PCM message duration or the Opus packet duration (2.5–60 ms);
``frames_per_message`` packs several AAC or ``lc3_fs1030`` frames into one message;
``bitrate`` (bits/s per channel) overrides the Opus and AAC defaults: 32 kbps, and 64 kbps for AAC
above 16 kHz (FFmpeg's AAC encoder at 32 kbps and 44.1/48 kHz measured a correlation of only 0.95
with its input, 0.98 at 64 kbps). Short Opus packets need more than 32 kbps too: a 2.5 ms packet
at 32 kbps is 10 bytes.
"""

from __future__ import annotations

import io

import numpy as np

from .aac import AdtsFramer
from .base import TARGET_RATE, UnsupportedFormat
from .channels import MAX_CHANNELS
from .lc3 import LC3_RATES
from .opus import OPUS_RATES
from .resample import resample_int16

_PCM = ("pcm8", "pcm16", "pcm")
_OPUS_DEFAULT_MS = {"opus": 10.0, "opus_fs320": 20.0}
_LC3_FRAME_BYTES = {"lc3": 40, "lc3_fs1030": 30}  # per channel
_LC3_DEFAULT_FRAMES = {"lc3": 1, "lc3_fs1030": 3}
_AAC_FRAME_SAMPLES = 1024
_BITRATE_PER_CHANNEL = 32000  # Opus and AAC; what the test vectors use
_AAC_HIGH_RATE_BITRATE = 64000  # per channel, above 16 kHz


def _framing(codec: str, frame_ms: float | None, frames_per_message: int | None) -> tuple[float, int]:
    """(frame duration in ms, frames per message) for ``codec``, checking the overrides."""
    if codec in _PCM:
        return (frame_ms or 10.0), 1
    if codec in _OPUS_DEFAULT_MS:
        if frames_per_message not in (None, 1):
            raise ValueError("an Opus message is exactly one packet")
        return (frame_ms or _OPUS_DEFAULT_MS[codec]), 1
    if codec == "aac":
        return 0.0, frames_per_message or 1  # the duration depends on the rate: 1024 samples
    if codec in _LC3_FRAME_BYTES:
        if frame_ms not in (None, 10, 10.0):
            raise ValueError("LC3 frames are 10 ms in this protocol")
        if codec == "lc3" and frames_per_message not in (None, 1):
            raise ValueError("an lc3 message is exactly one frame (its length is the frame length)")
        return 10.0, frames_per_message or _LC3_DEFAULT_FRAMES[codec]
    raise UnsupportedFormat(f"unknown codec {codec!r}")


def message_duration(
    codec: str, sample_rate: int, *, frame_ms: float | None = None, frames_per_message: int | None = None,
    channels: int = 1,
) -> float:
    """Seconds of audio in one message of ``encode_for_device`` (for real-time pacing)."""
    ms, count = _framing(codec, frame_ms, frames_per_message)
    if codec == "pcm" and channels >= 2:   # a call: each leg's 10 ms is a message of its own
        return message_duration(codec, sample_rate, frame_ms=frame_ms) / channels
    if codec == "aac":
        return count * _AAC_FRAME_SAMPLES / sample_rate
    if codec in _PCM:
        return round(sample_rate * ms / 1000) / sample_rate
    return count * ms / 1000


def encode_for_device(
    pcm16k: np.ndarray,
    codec: str,
    sample_rate: int,
    channels: int = 1,
    *,
    frame_ms: float | None = None,
    frames_per_message: int | None = None,
    bitrate: int | None = None,
) -> list[bytes]:
    """Encode 16 kHz int16 audio as a device streaming ``codec`` at ``sample_rate`` would.

    ``pcm16k`` is mono (copied to every channel) or shaped (samples, channels). The last
    frame is padded with silence where the codec needs whole frames.
    """
    if channels not in (1, 2) and not (codec == "pcm" and 2 < channels <= MAX_CHANNELS):
        raise UnsupportedFormat(f"channels must be 1 or 2 (pcm: up to {MAX_CHANNELS} legs); got {channels}")
    ms, count = _framing(codec, frame_ms, frames_per_message)
    audio = _device_audio(pcm16k, sample_rate, channels)  # (samples, channels) int16 at the rate
    if codec in _PCM:
        step = round(sample_rate * ms / 1000)
        if codec == "pcm8":
            audio = ((audio >> 8) + 128).astype(np.uint8)
        if codec == "pcm" and channels >= 2:   # a phone call: each leg's messages prefixed (codecs/channels.py)
            return [bytes([index + 1]) + audio[i:i + step, index].tobytes()
                    for i in range(0, len(audio), step) for index in range(channels)]
        return [audio[i:i + step].tobytes() for i in range(0, len(audio), step)]
    if codec in _OPUS_DEFAULT_MS:
        _check_rate(codec, sample_rate, OPUS_RATES)
        return _opus(audio, sample_rate, channels, ms, bitrate or _BITRATE_PER_CHANNEL)
    if codec == "aac":
        default = _BITRATE_PER_CHANNEL if sample_rate <= TARGET_RATE else _AAC_HIGH_RATE_BITRATE
        frames = _aac(audio, sample_rate, channels, bitrate or default)
    else:
        _check_rate(codec, sample_rate, LC3_RATES)
        frames = _lc3(audio, sample_rate, channels, _LC3_FRAME_BYTES[codec])
    return [b"".join(frames[i:i + count]) for i in range(0, len(frames), count)]


def _check_rate(codec: str, sample_rate: int, allowed: tuple[int, ...]) -> None:
    if sample_rate not in allowed:
        raise UnsupportedFormat(f"{codec} sample_rate must be one of {', '.join(map(str, allowed))}; got {sample_rate}")


def _device_audio(pcm16k: np.ndarray, sample_rate: int, channels: int) -> np.ndarray:
    pcm = np.asarray(pcm16k, dtype=np.int16)
    if pcm.ndim == 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1)
    if pcm.ndim != 2 or pcm.shape[1] != channels:
        raise ValueError(f"audio shaped {pcm.shape} does not have {channels} channel(s)")
    if sample_rate != TARGET_RATE:
        pcm = resample_int16(pcm, TARGET_RATE, sample_rate)
    return np.ascontiguousarray(pcm, dtype=np.int16)


def _whole_frames(audio: np.ndarray, frame_samples: int) -> np.ndarray:
    missing = -len(audio) % frame_samples
    return np.pad(audio, ((0, missing), (0, 0))) if missing else audio


def _opus(audio: np.ndarray, sample_rate: int, channels: int, frame_ms: float, bitrate: int) -> list[bytes]:
    import opuslib

    frame = round(sample_rate * frame_ms / 1000)
    encoder = opuslib.Encoder(sample_rate, channels, opuslib.APPLICATION_VOIP)
    encoder.bitrate = bitrate * channels
    audio = _whole_frames(audio, frame)
    return [encoder.encode(audio[i:i + frame].tobytes(), frame) for i in range(0, len(audio), frame)]


def _aac(audio: np.ndarray, sample_rate: int, channels: int, bitrate: int) -> list[bytes]:
    import av

    layout = "mono" if channels == 1 else "stereo"
    sink = io.BytesIO()
    with av.open(sink, "w", format="adts") as container:
        stream = container.add_stream("aac", rate=sample_rate)
        stream.layout = layout
        stream.bit_rate = bitrate * channels
        frame = av.AudioFrame.from_ndarray(audio.reshape(1, -1), format="s16", layout=layout)
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    frames, skipped = AdtsFramer().push(sink.getvalue())
    if skipped:
        raise RuntimeError("FFmpeg's ADTS muxer wrote bytes outside frames")
    return frames


def _lc3(audio: np.ndarray, sample_rate: int, channels: int, frame_bytes: int) -> list[bytes]:
    import lc3

    encoder = lc3.Encoder(10000, sample_rate, num_channels=channels)
    frame = encoder.get_frame_samples()
    audio = _whole_frames(audio, frame)
    # lc3py returns the channel frames one after the other, as the decoder expects them.
    return [
        encoder.encode(audio[i:i + frame].tobytes(), frame_bytes * channels, bit_depth=16)
        for i in range(0, len(audio), frame)
    ]
