"""Opus (``opus``: 10 ms packets, ``opus_fs320``: 20 ms packets), one packet per message.

Decoded with libopus (Debian ``libopus0``) through opuslib.

Output rate. An Opus decoder may synthesise any of Opus's five rates from any stream (RFC 6716
§2), so the decoder runs at min(declared rate, 16 kHz):

- 16, 24 or 48 kHz streams are decoded straight to 16 kHz, the rate the speech engines want: no
  resampler afterwards (no extra CPU or delay), and decoding at 48 kHz would only synthesise
  content that the resampling to 16 kHz then throws away, at 3-4 times the cost.
- 8 and 12 kHz streams are decoded at their own rate and brought to 16 kHz by soxr. They hold
  nothing above their Nyquist frequency anyway, and libopus's built-in SILK upsampler is an IIR
  filter that bends the waveform's phase: speech encoded at 8 kHz correlated 0.939 with the
  source when decoded at 16 kHz, 0.967 when decoded at 8 kHz and resampled with soxr.

The declared ``sample_rate`` must be one of Opus's rates: 32 or 44.1 kHz means the client is
confused about its own audio, and is refused as a bad parameter.

Garbage. libopus only rejects packets whose framing is impossible and "decodes" anything else
(``bytes(range(40))`` gives 10 ms of noise). ``opus_packet_duration`` applies the RFC 6716 §3
framing rules (TOC byte, frame counts and lengths of code 0/1/2/3 packets, padding, at most
120 ms) before libopus sees the packet, so a message that cannot be an Opus packet raises
``DecodeError`` without touching the decoder state. Random bytes still pass those rules about
half of the time (any byte is a valid TOC and a code 0 packet of 1–1276 bytes is well formed),
and decode to a burst of noise: one such message before every tenth packet took the development
set from 6 % to 15 % WER. So a packet must also fit the stream (``signature.ConfirmedKinds``): its TOC
byte must be one the stream has sent (a device sends one configuration), or be confirmed by the
next packet having its configuration (an encoder at 24/48 kHz switching bandwidth or mode sends
runs of its new one, of one packet duration). Random bytes then pass only with the stream's own
TOC byte (1 in 256), and of those the half with the in-band FEC flag set are dropped too, once the
stream has shown that it never sets it (``signature.SteadyFlag``): about 1 in 500 pass.

Packet loss concealment. libopus can conceal a lost packet (``decode(NULL)``), but the
protocol carries no sequence numbers or timestamps, so the gateway cannot tell that a packet
went missing; concealment is therefore never invoked.
"""

from __future__ import annotations

import ctypes

import numpy as np

from .. import native
from .base import TARGET_RATE, Decoder, DecodeError, HeldBack, UnsupportedFormat, mix_to_mono, no_samples
from .resample import StreamResampler
from .signature import ConfirmedKinds, SteadyFlag

try:
    import opuslib
    import opuslib.api.decoder as _libopus
except Exception as exc:  # opuslib raises a bare Exception when libopus is not installed
    opuslib = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
MAX_PACKET_MS = 120  # RFC 6716 §3.2.5: a packet never holds more than 120 ms of audio
MAX_FRAME_BYTES = 1275  # RFC 6716 §3.2.1

# Duration of one frame in 48 kHz samples, by TOC configuration number (RFC 6716 §3.1, table 2).
_FRAME_48K = (
    (480, 960, 1920, 2880) * 3  # 0-11: SILK-only NB/MB/WB, 10/20/40/60 ms
    + (480, 960) * 2  # 12-15: hybrid SWB/FB, 10/20 ms
    + (120, 240, 480, 960) * 4  # 16-31: CELT-only NB/WB/SWB/FB, 2.5/5/10/20 ms
)


def _frame_length(packet: bytes, pos: int) -> tuple[int, int]:
    """Read one frame length (RFC 6716 §3.2.1) at ``pos``; return (length, position after it)."""
    if pos >= len(packet):
        raise DecodeError("opus packet ends inside a frame length")
    first = packet[pos]
    if first < 252:
        return first, pos + 1
    if pos + 1 >= len(packet):
        raise DecodeError("opus packet ends inside a two-byte frame length")
    return first + 4 * packet[pos + 1], pos + 2


def opus_packet_duration(packet: bytes) -> int:
    """Audio in ``packet``, in 48 kHz samples, after checking RFC 6716 §3.4 rules R1–R7.

    Raises ``DecodeError`` naming the broken rule. Pure: touches no decoder.
    """
    size = len(packet)
    if size < 1:
        raise DecodeError("empty opus packet (R1)")
    toc = packet[0]
    frame = _FRAME_48K[toc >> 3]
    code = toc & 0x3
    if code == 0:  # one frame
        count = 1
        if size - 1 > MAX_FRAME_BYTES:
            raise DecodeError(f"opus frame of {size - 1} bytes exceeds {MAX_FRAME_BYTES} (R2)")
    elif code == 1:  # two frames of equal size
        count = 2
        if (size - 1) % 2:
            raise DecodeError("opus code 1 packet with an odd payload (R3)")
        if (size - 1) // 2 > MAX_FRAME_BYTES:
            raise DecodeError(f"opus frame exceeds {MAX_FRAME_BYTES} bytes (R2)")
    elif code == 2:  # two frames, the first one's length coded
        count = 2
        first, pos = _frame_length(packet, 1)
        if first > size - pos:
            raise DecodeError("opus code 2 first frame overruns the packet (R4)")
        if size - pos - first > MAX_FRAME_BYTES:
            raise DecodeError(f"opus frame exceeds {MAX_FRAME_BYTES} bytes (R2)")
    else:  # code 3: a frame count byte, optional padding, CBR or VBR frames
        if size < 2:
            raise DecodeError("opus code 3 packet without a frame count byte (R5)")
        count_byte = packet[1]
        count = count_byte & 0x3F
        if count == 0:
            raise DecodeError("opus code 3 packet with zero frames (R5)")
        pos, padding = 2, 0
        if count_byte & 0x40:  # padding length: 255 means 254 bytes and another length byte
            while True:
                if pos >= size:
                    raise DecodeError("opus padding length runs past the packet (R7)")
                value = packet[pos]
                pos += 1
                padding += 254 if value == 255 else value
                if value != 255:
                    break
        if count_byte & 0x80:  # VBR: every frame but the last has a coded length
            coded = 0
            for _ in range(count - 1):
                length, pos = _frame_length(packet, pos)
                coded += length
            last = size - pos - padding - coded
            if last < 0:
                raise DecodeError("opus VBR frame lengths overrun the packet (R7)")
            if last > MAX_FRAME_BYTES:
                raise DecodeError(f"opus frame exceeds {MAX_FRAME_BYTES} bytes (R7)")
        else:
            payload = size - pos - padding
            if payload < 0:
                raise DecodeError("opus padding overruns the packet (R6)")
            if payload % count:
                raise DecodeError("opus CBR payload is not a multiple of the frame count (R6)")
            if payload // count > MAX_FRAME_BYTES:
                raise DecodeError(f"opus frame exceeds {MAX_FRAME_BYTES} bytes (R6)")
    duration = count * frame
    if duration > 48 * MAX_PACKET_MS:
        raise DecodeError(f"opus packet of {duration / 48:g} ms exceeds {MAX_PACKET_MS} ms (R5)")
    return duration


class OpusDecoder(Decoder):
    """One libopus decoder per connection, at min(declared rate, 16 kHz) (see the module docstring)."""

    codec = "opus"

    def __init__(self, sample_rate: int, channels: int):
        super().__init__(sample_rate, channels)
        if sample_rate not in OPUS_RATES:
            raise UnsupportedFormat(
                f"Opus sample_rate must be one of {', '.join(map(str, OPUS_RATES))}; got {sample_rate}"
            )
        if opuslib is None:
            raise RuntimeError(f"Opus needs libopus (apt-get install libopus0): {_IMPORT_ERROR}")
        # A stereo stream gets a stereo decoder, and its two channels are averaged below exactly
        # like every other codec's, so a downmix sounds the same whatever the codec.
        self._rate = min(sample_rate, TARGET_RATE)
        self._state = opuslib.Decoder(self._rate, channels)
        self._resampler = StreamResampler(self._rate)
        # opuslib's own ``decode`` allocates and zeroes a buffer and copies through a Python
        # list on every call (twice the cost of decoding a 10 ms packet); call the same ctypes
        # function of opuslib's api module into one reused buffer instead.
        self._max_samples = self._rate * MAX_PACKET_MS // 1000  # per channel: fits any packet
        self._pcm = np.zeros(self._max_samples * channels, dtype=np.int16)
        self._pcm_ptr = self._pcm.ctypes.data_as(ctypes.POINTER(ctypes.c_int16))
        self._kinds = ConfirmedKinds()
        self._fec = SteadyFlag()
        self._reader = None

    def decode(self, message: bytes) -> np.ndarray:
        if not message:
            return no_samples()
        packet = bytes(message)  # ctypes wants bytes; a no-op for the bytes websockets hands us
        duration = opus_packet_duration(packet)   # RFC 6716's checks first: a malformed packet raises here
        reader = self._reader
        if not self._kinds.known and reader is not None and reader.first_packet:
            self._kinds.admit(reader.first_packet[0])   # the native reader took the stream's first packet
        packets = self._kinds.check(packet[0], packet, reader.decoded if reader is not None else None,
                                    family=(packet[0] & 0xFC, duration))   # configuration, stereo flag, duration
        if not packets:
            if reader is not None:
                reader.leave_next()   # the next packet must come here to confirm this one
            raise HeldBack(f"opus packet with TOC {packet[0]:#04x}, not this stream's: held back until the "
                           "next packet confirms it")
        if not self._fec.admits(packets[-1]):
            raise DecodeError("opus packet with the in-band FEC flag, which this stream never sets")
        outputs = [self._decode_packet(p, opus_packet_duration(p) * self._rate // 48000) for p in packets]
        for p in packets:
            self._fec.note(p)
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def held_dropped(self) -> int:
        return self._kinds.dropped

    def _decode_packet(self, packet: bytes, expected: int) -> np.ndarray:
        count = _libopus.libopus_decode(
            self._state.decoder_state, packet, len(packet), self._pcm_ptr, self._max_samples, 0
        )
        if count < 0:
            raise DecodeError(f"libopus rejected the packet: {opuslib.exceptions.OpusError(count)}")
        if count != expected:  # cannot happen for a packet that passed the checks above
            raise DecodeError(f"opus packet decoded to {count} samples, its TOC says {expected}")
        pcm = self._pcm[: count * self.channels]
        mono = mix_to_mono(pcm, self.channels)
        if mono is pcm and self._resampler.passthrough:
            mono = mono.copy()  # the buffer is reused by the next packet
        return self._resampler.process(mono)

    def native_reader(self, piece_samples: int, max_message: int, on_piece):
        """The C reader (native/opus_reader.c) on this decoder's own libopus state, for a mono
        stream decoded straight to 16 kHz (what devices send); None otherwise or when unbuilt."""
        if native.opus_reader is None or self.channels != 1 or not self._resampler.passthrough:
            return None
        state = ctypes.cast(self._state.decoder_state, ctypes.c_void_p).value
        decode = ctypes.cast(_libopus.libopus_decode, ctypes.c_void_p).value
        reader = native.opus_reader.OpusPacketReader(
            owner=self._state, state=state, decode=decode, rate=self._rate,
            max_message=max_message, piece=piece_samples, on_piece=on_piece)
        # The reader decodes only packets whose TOC the signature admitted; the others come to
        # ``decode``, which admits or drops them and tells the reader what it admitted.
        for toc in self._kinds.known:
            reader.allow(toc)
        self._kinds.on_admit = reader.allow
        self._fec = SteadyFlag(reader)            # the reader counts the packets it decodes
        self._reader = reader
        return reader

    def flush(self) -> np.ndarray:
        return self._resampler.flush()

    def close(self) -> None:
        # opuslib frees the native state when its Decoder is collected; drop our reference now.
        self._state = None
        self._reader = None
