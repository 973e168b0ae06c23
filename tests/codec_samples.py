"""Audio and message samples for codec tests, reusable by session-level fuzzing.

- ``reference_pcm()``: the 2 s, 16 kHz speech signal every codec vector was made from.
- ``vector_*``: the committed codec vectors (see data/codec-vectors/README.md), as messages.
- ``encoded_messages(codec, rate, channels)``: the reference encoded as a device sends it (cached).
- ``alignment(decoded, reference)``: the codec delay found by cross-correlation, and the
  normalised correlation at that delay.
- ``hostile_message(valid, seed, kind)``: one deterministic hostile message (random bytes, bytes
  without any sync word, truncated or bit-flipped real frames, huge messages up to 64 KiB, real
  frames with junk around, fake sync words); ``garbage_messages(valid)`` is its hypothesis
  strategy. ``valid`` is a tuple of real messages, e.g. ``encoded_messages("aac", 16000)``.
"""

from __future__ import annotations

import functools
import struct
import wave
from pathlib import Path

import numpy as np
import soxr
from hypothesis import strategies as st

from harken.codecs import DecodeError
from harken.codecs.encode import encode_for_device

VECTORS = Path(__file__).parent / "data" / "codec-vectors"
RATE = 16000
MAX_MESSAGE = 65536  # PROTOCOL §3: anything larger is closed with 1009 before any decoder sees it

# Every codec with the rates and channel counts its decoder accepts (PROTOCOL §2).
CODECS = ("pcm8", "pcm16", "pcm", "opus", "opus_fs320", "aac", "lc3", "lc3_fs1030")


@functools.cache
def reference_pcm() -> np.ndarray:
    with wave.open(str(VECTORS / "speech16k.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (RATE, 1, 2)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    pcm.flags.writeable = False
    return pcm


def band_limited_reference(rate: int) -> np.ndarray:
    """The reference as a device at ``rate`` can hold it: through ``rate`` and back to 16 kHz."""
    pcm = reference_pcm()
    if rate >= RATE:
        return pcm
    return soxr.resample(soxr.resample(pcm, RATE, rate), rate, RATE)


def vector_bytes(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def vector_pcm(name: str) -> np.ndarray:
    return np.frombuffer(vector_bytes(name), dtype="<i2")


def vector_opus_packets(name: str) -> list[bytes]:
    """Records of ``uint16 LE length`` + packet, as the vectors README describes them."""
    data, packets, pos = vector_bytes(name), [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<H", data, pos)
        packets.append(data[pos + 2:pos + 2 + length])
        pos += 2 + length
    return packets


def vector_adts_frames(name: str = "speech16k.aac") -> list[bytes]:
    """ADTS frames cut by the 13-bit frame length of each header (README), independently of harken."""
    data, frames, pos = vector_bytes(name), [], 0
    while pos < len(data):
        length = ((data[pos + 3] & 0x3) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
        frames.append(data[pos:pos + length])
        pos += length
    return frames


def vector_lc3_frames(name: str, frame_bytes: int) -> list[bytes]:
    data = vector_bytes(name)
    return [data[i:i + frame_bytes] for i in range(0, len(data), frame_bytes)]


@functools.cache
def encoded_messages(codec: str, rate: int, channels: int = 1, **options) -> tuple[bytes, ...]:
    """The reference signal as the messages a device streaming ``codec`` sends (cached)."""
    return tuple(encode_for_device(reference_pcm(), codec, rate, channels, **options))


def decode_all(decoder, messages) -> np.ndarray:
    """Decode ``messages`` in order and flush; every message must decode, except an Opus packet of a
    configuration the stream has not sent yet: it is held back until the next packet confirms it
    (codecs/signature.py ``ConfirmedKinds``), and its audio comes with that packet's; and an LC3
    message whose loudness jumps (codecs/lc3.py), held the same way, possibly several in a row
    (loudness changing in steps), its audio coming with a later message's."""
    parts, held = [], False
    for message in messages:
        try:
            parts.append(decoder.decode(message))
        except DecodeError as exc:
            assert "held back" in str(exc) and (not held or "LC3" in str(exc)), exc
            held = True
        else:
            held = False
    parts.append(decoder.flush())
    return np.concatenate(parts)


def alignment(decoded: np.ndarray, reference: np.ndarray, max_lag: int = 2048) -> tuple[float, int]:
    """(normalised correlation, lag) where ``decoded[lag:]`` best matches ``reference``.

    The lag is the codec's delay: the peak of the FFT cross-correlation over 0..max_lag samples.
    """
    x = decoded.astype(np.float64)
    y = reference.astype(np.float64)
    size = 1 << int(np.ceil(np.log2(len(x) + len(y))))
    cross = np.fft.irfft(np.fft.rfft(x, size) * np.conj(np.fft.rfft(y, size)), size)
    lag = int(np.argmax(cross[: max_lag + 1]))
    overlap = min(len(x) - lag, len(y))
    a, b = x[lag:lag + overlap], y[:overlap]
    return float(a @ b / np.sqrt((a @ a) * (b @ b) + 1e-12)), lag


# -- hostile input -----------------------------------------------------------------------------
HOSTILE_KINDS = (
    "random", "random_huge", "sync_free_huge", "truncated", "bit_flips", "repeated_huge", "junk_around", "fake_sync"
)


def hostile_message(valid: tuple[bytes, ...], seed: int, kind: str | None = None) -> bytes:
    """One message a broken or hostile client may send a decoder expecting ``valid``-like ones.

    Deterministic for a given ``seed`` (so loops, benchmarks and live-session fuzzing can replay
    it); every message is 3 bytes to 64 KiB: smaller ones are keepalives, larger ones are closed
    with 1009 before any decoder sees them.
    """
    rng = np.random.default_rng(seed)
    kind = kind or HOSTILE_KINDS[int(rng.integers(len(HOSTILE_KINDS)))]
    frame = valid[int(rng.integers(len(valid)))]

    def noise(size: int) -> bytes:
        return rng.integers(0, 256, size, dtype=np.uint8).tobytes()

    if kind == "random":
        message = noise(int(rng.integers(3, 600)))
    elif kind == "random_huge":
        message = noise(int(rng.integers(600, MAX_MESSAGE + 1)))
    elif kind == "sync_free_huge":  # no 0xFF byte: a parser hunting for a sync word never finds one
        message = noise(int(rng.integers(600, MAX_MESSAGE + 1))).replace(b"\xff", b"\x7f")
    elif kind == "truncated":
        message = frame[: max(3, int(len(frame) * rng.uniform(0, 0.95)))]
    elif kind == "bit_flips":
        data = bytearray(frame)
        for position in rng.integers(0, len(data), int(rng.integers(1, 17))):
            data[position] ^= 1 << int(rng.integers(0, 8))
        message = bytes(data)
    elif kind == "repeated_huge":
        message = frame * int(rng.integers(2, 400))
    elif kind == "junk_around":
        message = noise(int(rng.integers(0, 40))) + frame + noise(int(rng.integers(0, 40)))
    elif kind == "fake_sync":  # the bytes an ADTS or Opus parser keys on, with junk behind
        prefix = (b"\xff\xf1", b"\xff", b"\x00" * 7, b"\x43\xbf")[int(rng.integers(4))]
        message = prefix + noise(int(rng.integers(1, 300)))
    else:
        raise ValueError(kind)
    message = message[:MAX_MESSAGE]
    return message if len(message) > 2 else message + b"\x00" * 3


def garbage_messages(valid: tuple[bytes, ...]) -> st.SearchStrategy[bytes]:
    """Hypothesis strategy over ``hostile_message`` (all kinds, any seed)."""
    return st.builds(hostile_message, st.just(valid), st.integers(0, 2**32 - 1), st.sampled_from(HOSTILE_KINDS))
