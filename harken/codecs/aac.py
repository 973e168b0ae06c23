"""AAC in ADTS framing (``aac``): one frame, several frames, or pieces of frames per message.

Decoded with PyAV's bundled FFmpeg. The pitfalls this module exists for (all measured, see
reference/auth-and-codecs.md B3):

- ``av.Packet(b"")`` is end-of-stream: the context then raises ``EOFError`` for every later
  packet. Empty input never reaches PyAV, and a context that hit EOF anyway is replaced.
- ``av.AVError`` no longer exists; ``av.FFmpegError`` is what bad data raises.
- FFmpeg logs to stderr unless told not to (``_silence_ffmpeg``).
- The encoder's 1024 priming samples come out first; they are stripped once per stream.

Framing is done here (``AdtsFramer``) rather than with FFmpeg's parser (``ctx.parse``), which
was tried first and measured worse on the two things that matter for a network edge: it buffers
bytes that contain no ADTS sync word without limit (RSS grew by 20 MB after 300 messages of
64 KiB of garbage), and it glues the garbage in front of the next real frame, so the first good
frame after garbage was lost. The framer below keeps at most one partial frame (< 8 KiB: the
frame length is a 13-bit field), resyncs on the next header, and reports skipped bytes so that
garbage is counted.
"""

from __future__ import annotations

import av
import av.logging
import numpy as np

from .base import Decoder, DecodeError, no_samples
from .resample import StreamResampler
from .signature import Signature

PRIMING_SAMPLES = 1024  # encoder priming to strip (PROTOCOL §2); FFmpeg's AAC encoder writes exactly this
HEADER_BYTES = 7  # 9 with a CRC
_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_REPLACE_AFTER_FAILURES = 8  # consecutive undecodable frames after which the context is rebuilt


def _silence_ffmpeg() -> None:
    # PyAV's default already drops FFmpeg's log lines; set it explicitly (another library may
    # have turned it on) and make FFmpeg's own terminal logger quiet too, for the case where
    # somebody restores the default callback.
    av.logging.set_level(None)
    av.logging.set_libav_level(av.logging.PANIC)


def adts_frame_length(data: bytes | memoryview, pos: int = 0) -> int:
    """Length of the ADTS frame whose header starts at ``pos``, or 0 if no plausible header is there.

    Needs ``HEADER_BYTES`` bytes at ``pos``. Plausible: sync word 0xFFF, layer 0, a defined
    sampling frequency index, and a frame length that covers the header (ISO 14496-3 §1.A.2).
    """
    b1, b2 = data[pos + 1], data[pos + 2]
    if data[pos] != 0xFF or b1 & 0xF6 != 0xF0:  # 12-bit sync, then (ID, layer=00, protection_absent)
        return 0
    if (b2 >> 2) & 0xF >= len(_SAMPLE_RATES):
        return 0
    length = ((data[pos + 3] & 0x3) << 11) | (data[pos + 4] << 3) | (data[pos + 5] >> 5)
    header = HEADER_BYTES if b1 & 0x1 else HEADER_BYTES + 2
    return length if length > header else 0


def fixed_header(frame: bytes) -> bytes:
    """The 28 bits of an ADTS header that are the same in every frame of a stream."""
    return bytes((frame[0], frame[1], frame[2], frame[3] & 0xF0))


class AdtsFramer:
    """Cuts a byte stream into ADTS frames, whatever the message boundaries.

    ``push(message)`` returns the complete frames now available and the number of bytes that
    were skipped because they were not part of any frame. At most one incomplete frame is
    carried between messages.
    """

    def __init__(self) -> None:
        self._carry = b""

    def push(self, message: bytes) -> tuple[list[bytes], int]:
        skipped = 0
        if (self._carry and len(message) >= HEADER_BYTES and adts_frame_length(message)
                and not self._completed_by(message)):
            # A message that starts with a header starts a frame: whatever was waiting for
            # more bytes was a truncated frame or a false sync in garbage, not a split frame.
            skipped, self._carry = len(self._carry), b""
        data = self._carry + message if self._carry else message
        self._carry = b""
        frames: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            if data[pos] != 0xFF:  # not a header: skip to the next byte that could start one
                sync = data.find(b"\xff", pos + 1)
                resume = end if sync < 0 else sync
                skipped += resume - pos
                pos = resume
                continue
            if end - pos < HEADER_BYTES:  # a header cut by the message boundary, perhaps
                self._carry = data[pos:]
                break
            length = adts_frame_length(data, pos)
            if not length:
                skipped += 1
                pos += 1
                continue
            if pos + length > end:  # the rest of this frame comes in the next message(s)
                self._carry = data[pos:]
                break
            frames.append(data[pos:pos + length])
            pos += length
        return frames, skipped

    def _completed_by(self, message: bytes) -> bool:
        """Whether ``message`` holds the rest of the carried frame, ending where the message ends
        or where a header of the same stream follows. A split frame's remaining bytes can look
        like an ADTS header themselves (a random cut of a real stream found one); they are not
        taken for a new frame when the carried one completes cleanly with them."""
        if len(self._carry) < HEADER_BYTES:
            return False
        need = adts_frame_length(self._carry) - len(self._carry)
        if need <= 0 or need > len(message):
            return False
        if need == len(message):
            return True
        return (len(message) - need >= HEADER_BYTES and bool(adts_frame_length(message, need))
                and fixed_header(message[need:]) == fixed_header(self._carry))

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame waiting for the next message."""
        return len(self._carry)


class AACDecoder(Decoder):
    """ADTS AAC (LC, HE, any rate and channel layout the header declares) → 16 kHz mono.

    The ADTS header, not the declared ``sample_rate``, says what the audio is; a stream whose
    rate changes mid-way is followed. Channels are averaged (all of them, whatever the layout).
    """

    codec = "aac"

    def __init__(self, sample_rate: int, channels: int):
        super().__init__(sample_rate, channels)
        _silence_ffmpeg()
        self._framer = AdtsFramer()
        self._context = self._new_context()
        self._failures = 0  # consecutive frames that failed to decode
        self._priming_left = PRIMING_SAMPLES
        self._resampler: StreamResampler | None = None
        # The ADTS fixed header (ISO 14496-3 1.A.2.2.1: profile, rate, channels, ...) is the same in
        # every frame of a stream: the first frame's defines it, a different one must recur (a false
        # sync in garbage never does; a stream that really changes rate loses its first frames at
        # the new rate).
        self._signature = Signature()

    @staticmethod
    def _new_context() -> av.CodecContext:
        context = av.CodecContext.create("aac", "r")
        context.open()  # here (possibly off the event loop) rather than on the first packet
        return context

    def decode(self, message: bytes) -> np.ndarray:
        if not message:
            return no_samples()
        frames, skipped = self._framer.push(bytes(message))
        chunks: list[np.ndarray] = []
        errors: list[str] = []
        for frame in frames:
            fixed = fixed_header(frame)
            if not self._signature.admits(fixed, fixed):
                errors.append(f"ADTS header {fixed.hex()} is not this stream's")
                continue
            try:
                chunks.extend(self._decode_frame(frame))
            except DecodeError as exc:
                errors.append(str(exc))
        if chunks:
            return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
        if errors:
            raise DecodeError(f"{len(errors)} undecodable AAC frame(s): {errors[0]}")
        if skipped:
            raise DecodeError(f"{skipped} bytes with no ADTS frame in them")
        return no_samples()  # only part of a frame so far, or priming

    def _decode_frame(self, frame: bytes) -> list[np.ndarray]:
        try:
            decoded = self._context.decode(av.Packet(frame))
        except av.FFmpegError as exc:
            self._failures += 1
            if isinstance(exc, EOFError) or self._failures >= _REPLACE_AFTER_FAILURES:
                # A context at end-of-stream fails forever, and one that keeps failing may be
                # wedged: a fresh one costs ~0.2 ms and decodes the next good frame.
                self._context = self._new_context()
                self._failures = 0
            raise DecodeError(f"{type(exc).__name__}: {exc}") from None
        self._failures = 0
        return [pcm for pcm in map(self._to_16k_mono, decoded) if len(pcm)]

    def _to_16k_mono(self, frame: av.AudioFrame) -> np.ndarray:
        planes = frame.to_ndarray()  # float32 planar (channels, samples): FFmpeg's AAC output
        if frame.format.is_packed:  # defensive: not what FFmpeg's AAC decoder gives
            planes = planes.reshape(-1, len(frame.layout.channels)).T
        if len(planes) == 1:
            mono = planes[0]
        else:
            mono = planes[0] + planes[1] if len(planes) == 2 else planes.sum(axis=0)
            mono *= 1.0 / len(planes)
        if self._priming_left:
            cut = min(self._priming_left, len(mono))
            self._priming_left -= cut
            mono = mono[cut:]
        if self._resampler is None or self._resampler.rate != frame.sample_rate:
            # First frame, or the stream changed rate: finish the old resampler's tail first.
            tail = self._resampler.flush() if self._resampler is not None else np.zeros(0, np.float32)
            self._resampler = StreamResampler(frame.sample_rate, dtype="float32")
            return _to_int16(np.concatenate([tail, self._resampler.process(mono)]))
        return _to_int16(self._resampler.process(mono))

    def flush(self) -> np.ndarray:
        return _to_int16(self._resampler.flush()) if self._resampler is not None else no_samples()

    def close(self) -> None:
        self._context = None
        self._resampler = None


def _to_int16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] → int16, rounded and clipped (as FFmpeg converts fltp → s16)."""
    scaled = samples * 32768.0
    np.rint(scaled, out=scaled)
    np.clip(scaled, -32768, 32767, out=scaled)
    return scaled.astype(np.int16)
