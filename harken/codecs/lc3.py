"""LC3 (Bluetooth LE Audio), 10 ms frames: ``lc3`` and ``lc3_fs1030``.

- ``lc3``: one frame per message, its length (20–400 bytes per channel) is the message length.
- ``lc3_fs1030``: 30-byte frames, any number back to back in one message (a BLE notification
  typically carries three).
A stereo frame is the channel 0 frame followed by the channel 1 frame, as lc3py encodes it.

The codec is Google's liblc3 as shipped inside the ``lc3py`` wheel, called through ctypes here
rather than through ``lc3.Decoder``, for three measured reasons (reference/auth-and-codecs.md B2):

- ``lc3.Decoder.decode`` ignores liblc3's return code. liblc3 reports a frame whose bitstream
  is invalid (it then conceals it, "PLC"): without it 40 random bytes "decode" silently and the
  gateway could never count them. It catches about three quarters of random frames; the rules in
  ``LC3Decoder.decode`` catch most of the rest.
- ``lc3.Decoder()`` runs ``ldconfig`` in a subprocess (``find_library("c")``) and costs ~1 ms;
  here a decoder costs a few microseconds and no fork.
- ``lc3.Decoder`` never frees its malloc'd state (~17 KiB per instance); here the state is a
  ctypes buffer that Python frees with the decoder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
from typing import NamedTuple

import numpy as np

from .. import native
from .base import TARGET_RATE, Decoder, DecodeError, HeldBack, UnsupportedFormat, mix_to_mono, no_samples
from .resample import StreamResampler
from .signature import Signature

LC3_RATES = (8000, 16000, 24000, 32000, 48000)
# The first side-information fields, read from a frame's last byte backwards, least significant
# bit first (LC3 spec 3.4.2): the bandwidth (this many bits by rate), then the spectrum's last
# non-zero line (log2 of half the 10 ms spectrum's lines), then the LSB-mode flag.
_BANDWIDTH_BITS = {8000: 0, 16000: 1, 24000: 2, 32000: 2, 48000: 3}
_LAST_NONZERO_BITS = {8000: 6, 16000: 7, 24000: 7, 32000: 8, 48000: 8}
_RATE_INDEX = {8000: 0, 16000: 1, 24000: 2, 32000: 3, 48000: 4}
_SUPER_WIDEBAND = 3    # bandwidth index from which a 10 ms frame has two TNS filters
_SNS_BITS = 38         # the spectral envelope's fields


def lsb_mode_possible(frame_bytes: int, sample_rate: int) -> bool:
    """An encoder uses LSB mode only in frames of at least 20 × (3 + rate index) bytes (liblc3's
    ``lc3_spec_analyze``; checked with lc3py: never below 80 bytes at 16 kHz, 100 at 24 kHz, 140 at
    48 kHz, and some frames at and above)."""
    return frame_bytes >= 20 * (3 + _RATE_INDEX[sample_rate])


def lsb_mode_flag(frame: bytes, sample_rate: int) -> bool:
    """The LSB-mode flag of one channel's frame (see the side-information fields above)."""
    position = _BANDWIDTH_BITS[sample_rate] + _LAST_NONZERO_BITS[sample_rate]
    return bool(frame[len(frame) - 1 - position // 8] >> (position % 8) & 1)


class SideInfo(NamedTuple):
    gain: int             # the global gain index: the quantiser's step, 28 steps a decade
    pitch: bool           # a pitch was found (the LTPF fields follow)
    ltpf_active: bool     # the long-term postfilter is on


def side_info(frame: bytes, sample_rate: int) -> SideInfo:
    """The fields of one channel's frame that the rules in ``LC3Decoder.decode`` read, in the
    order of the LC3 spec's bitstream (3.4.2, liblc3's ``decode``): from the frame's last byte
    backwards, least significant bit first: bandwidth, last non-zero line, LSB mode, global
    gain (8 bits), one TNS activation bit per filter (two from super wideband up), the pitch
    flag, the spectral envelope (38 bits), then, with a pitch, the LTPF activation bit."""
    bits = int.from_bytes(frame[::-1][:12], "little")    # bit k: the k-th read from the end
    bandwidth_bits, position = _BANDWIDTH_BITS[sample_rate], _BANDWIDTH_BITS[sample_rate]
    bandwidth = bits & ((1 << bandwidth_bits) - 1)
    position += _LAST_NONZERO_BITS[sample_rate] + 1
    gain = bits >> position & 0xFF
    position += 8 + 1 + (bandwidth >= _SUPER_WIDEBAND)
    pitch = bool(bits >> position & 1)
    return SideInfo(gain, pitch, pitch and bool(bits >> (position + 1 + _SNS_BITS) & 1))


def global_gain(frame: bytes, sample_rate: int) -> int:
    """The global gain index of one channel's frame (see ``side_info``)."""
    return side_info(frame, sample_rate).gain


def last_pair_dropped(frame: bytes, sample_rate: int) -> bytes | None:
    """``frame`` with its last non-zero line field one pair lower (None where it is the lowest):
    the spectrum without its last pair of lines. An encoder sets that field to just past the last
    pair that is not zero (the LC3 spec's ``lastnz``, 3.3.10.5; liblc3's ``lc3_spec_analyze``), so
    a device's frame decodes differently without the pair, while random bytes' last pair is often
    zero (see ``_decode_frames``)."""
    position, width = _BANDWIDTH_BITS[sample_rate], _LAST_NONZERO_BITS[sample_rate]
    tail = int.from_bytes(frame[:-3:-1], "little")      # the last two bytes, read from the end
    field = tail >> position & ((1 << width) - 1)
    if not field:
        return None
    tail += -1 << position
    return frame[:-2] + tail.to_bytes(2, "little")[::-1]


PROBE_WINDOW = 16      # bits searched for the probe's two set bits


def probe_start(frame_bytes: int) -> int:
    """Where ``LC3Decoder``'s probe looks for set bits to clear (see ``_decode_frames``), in bits
    from the frame's start: where an encoder's frames have their unused bits, and random bytes
    leave bits unread, most often (measured on the development set: from bit 144 of a 40-byte
    frame, 96 of a 30-byte one; 0 of 7,525 device frames refused at either size)."""
    return 8 * max(0, 3 * frame_bytes // 5 - 6)


def cleared(frame: bytes, at: int) -> bytes:
    """``frame`` with its bit ``at`` (byte ``at // 8``, least significant bit first) cleared."""
    byte = at // 8
    return frame[:byte] + bytes([frame[byte] & ~(1 << at % 8)]) + frame[byte + 1:]


def probe_bit(frame: bytes, start: int, window: int = PROBE_WINDOW) -> int | None:
    """The first set bit of ``frame`` from bit ``start`` (byte ``start // 8``, least significant
    bit first) within ``window`` bits, or None."""
    end = min(start + window, 8 * len(frame))
    if end <= start:
        return None
    span = int.from_bytes(frame[start // 8:(end + 7) // 8], "little") >> (start % 8)
    span &= (1 << (end - start)) - 1
    return start + (span & -span).bit_length() - 1 if span else None


# The global gain index (28 steps a decade) of a frame that sticks out of its stream: louder than
# the frame after it and the two before it by more than GAIN_JUMP, or quieter than all three by
# more than GAIN_DIP (see LC3Decoder._spike). Random bytes carry a uniformly random gain; the
# loud ones are the harmful ones (a burst of noise at or above the speech around it), so up is
# held tight: a device's frame never stood out by more than 33 steps, measured with liblc3's
# encoder on 1,228 s of real speech (tests/data: the dev set, the LibriSpeech speakers, the
# conversations; the Asterisk prompts) at 8 to 48 kHz and 20 to 400-byte frames (at most 22 at
# 16 kHz up to 40 bytes, 33 only in 400-byte frames at 8 and 32 kHz). At 64 (before), 40 % of
# the random frames let through were within 20 steps of their neighbours or louder; at 36, 7.0
# of 752 per seed instead of 9.8 (dev set, 5 seeds). Down needs more: a device's gain can dip
# far for 10 ms (a near-silent frame inside speech: 111 steps in the reference, 20 and 60-byte
# frames), and a random frame that quiet is a whisper of noise under the speech.
GAIN_JUMP = 36
GAIN_DIP = 128
FRAME_US = 10000  # the protocol's only LC3 frame duration
MIN_FRAME_BYTES, MAX_FRAME_BYTES = 20, 400  # LC3_MIN_FRAME_BYTES / LC3_MAX_FRAME_BYTES in lc3.h
_PCM_S16 = 0  # enum lc3_pcm_format: LC3_PCM_FORMAT_S16
_PCM_FLOAT = 3  # LC3_PCM_FORMAT_FLOAT: the synthesis before rounding, times 2^-15
_PLC = 1  # lc3_decode's return value when the frame was corrupt and got concealed


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None)
    libc.memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    libc.memcmp.restype = ctypes.c_int
    return libc


@functools.cache
def _liblc3() -> ctypes.CDLL:
    """liblc3 from the lc3py wheel (meson-python puts it beside ``lc3.py``), loaded once."""
    import lc3  # only to locate the library lc3py ships and was tested with

    bundled = glob.glob(os.path.join(os.path.dirname(lc3.__file__), ".lc3py.mesonpy.libs", "liblc3.so*"))
    path = bundled[0] if bundled else ctypes.util.find_library("lc3")
    if not path:
        raise RuntimeError("liblc3 not found: pip install lc3py==1.1.3")
    lib = ctypes.CDLL(path)
    lib.lc3_decoder_size.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.lc3_decoder_size.restype = ctypes.c_uint
    lib.lc3_setup_decoder.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.lc3_setup_decoder.restype = ctypes.c_void_p
    lib.lc3_decode.argtypes = [
        ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int
    ]
    lib.lc3_decode.restype = ctypes.c_int
    return lib


class LC3Decoder(Decoder):
    """One liblc3 decoder state per channel, for the lifetime of the connection.

    ``frame_bytes`` is fixed for ``lc3_fs1030`` (30) and None for ``lc3`` (taken from each
    message's length). Streams at 8 or 16 kHz are synthesised at 16 kHz by liblc3 itself (its
    output upsampling option works in the MDCT domain, so no resampler is needed); 24–48 kHz
    streams are decoded at their rate and resampled down with soxr.
    """

    codec = "lc3"

    def __init__(self, sample_rate: int, channels: int, frame_bytes: int | None = None):
        super().__init__(sample_rate, channels)
        if sample_rate not in LC3_RATES:
            raise UnsupportedFormat(
                f"LC3 sample_rate must be one of {', '.join(map(str, LC3_RATES))}; got {sample_rate}"
            )
        self._frame_bytes = frame_bytes
        output_rate = max(sample_rate, TARGET_RATE)
        self._resampler = StreamResampler(output_rate)
        lib = _liblc3()
        size = lib.lc3_decoder_size(FRAME_US, output_rate)
        self._memory = []
        self._handles = []
        self._state_bytes = size
        # A copy of each channel's state from before the message being decoded: a message found
        # to be garbage is undone (the state restored), so the frames after it decode exactly as
        # if it had never come. liblc3 keeps its state in the one block it is given, its pointers
        # into that same block, so a copy restored to the same address is the same state.
        self._saved = [ctypes.create_string_buffer(size) for _ in range(channels)]
        for _ in range(channels):
            memory = (ctypes.c_void_p * (size // ctypes.sizeof(ctypes.c_void_p) + 1))()  # pointer-aligned
            handle = lib.lc3_setup_decoder(FRAME_US, sample_rate, output_rate, memory)
            if not handle:
                raise UnsupportedFormat(f"liblc3 refused {sample_rate} Hz")
            self._memory.append(memory)
            self._handles.append(handle)
        self._frame_samples = FRAME_US * output_rate // 1_000_000
        # A device sends one frame length (lc3: the message length; lc3_fs1030 fixes it at 30): a
        # frame of another length is dropped until that length recurs (see signature.py).
        # liblc3's corrupt-frame report below catches most random bytes of the right length.
        self._signature = Signature()
        self._before_frame = ctypes.create_string_buffer(size)    # for the probe (see _decode_frames)
        self._after_frame = ctypes.create_string_buffer(size)
        self._probe_pcm = [np.empty(self._frame_samples, dtype=np.int16) for _ in range(2)]
        self._probe_addresses = [pcm.__array_interface__["data"][0] for pcm in self._probe_pcm]
        # Mono streams (what devices send) run each frame's probe in one native call when built.
        self._native = ((native.lc3_probe.probe, ctypes.cast(lib.lc3_decode, ctypes.c_void_p).value)
                        if native.lc3_probe is not None and channels == 1 else (None, None))
        # Each channel's side information of the last frame decoded (None: none yet), a message
        # held back because its gain jumped (see decode), and audio decoded but not returned yet.
        self._last: list[SideInfo] | None = None
        self._before_last: list[list[SideInfo]] = []      # the frame before that, if any
        self._held: tuple[list[bytes], list[list[SideInfo]], list[int]] | None = None
        self._ready: list[np.ndarray] = []
        self._ltpf_refused: list[SideInfo] | None = None    # the last message, refused by the LTPF rule
        self._dropped = 0      # held messages the next one refuted (held_dropped)

    def _frames(self, message: bytes) -> list[bytes]:
        """Split a message into per-frame blocks (all channels of one frame); DecodeError if it cannot."""
        size = len(message)
        if self._frame_bytes is None:  # lc3: the whole message is one frame
            if size % self.channels:
                raise DecodeError(f"LC3 message of {size} bytes does not split into {self.channels} channels")
            per_channel = size // self.channels
            if not MIN_FRAME_BYTES <= per_channel <= MAX_FRAME_BYTES:
                raise DecodeError(
                    f"LC3 frame of {per_channel} bytes per channel; must be {MIN_FRAME_BYTES}–{MAX_FRAME_BYTES}"
                )
            return [message]
        block = self._frame_bytes * self.channels
        if size % block:
            raise DecodeError(f"LC3 message of {size} bytes is not a whole number of {block}-byte frames")
        return [message[i:i + block] for i in range(0, size, block)]

    def decode(self, message: bytes) -> np.ndarray:
        if not message:
            return no_samples()
        frames = self._frames(bytes(message))
        frame_bytes = len(frames[0]) // self.channels
        if not self._signature.admits(frame_bytes, frame_bytes):
            raise DecodeError(f"LC3 frame of {frame_bytes} bytes, a length this stream has not sent")
        if not lsb_mode_possible(frame_bytes, self.sample_rate):
            # A frame this short never has LSB mode on, and half of random frames have the flag
            # set: of those liblc3 itself takes for valid, this drops half before they are decoded.
            for frame in frames:
                for channel in range(self.channels):
                    if lsb_mode_flag(frame[channel * frame_bytes:(channel + 1) * frame_bytes], self.sample_rate):
                        raise DecodeError(f"LC3 frame of {frame_bytes} bytes with LSB mode, which only "
                                          "longer frames use")
        # The gain rule (GAIN_JUMP, GAIN_DIP, _spike): a frame whose gain jumps from the frame
        # before it is refused when the frame after it comes straight back (the jumping frame
        # sticks out of the stream: random bytes' gain, not sound); a step that the next frame
        # keeps or continues is loudness changing. Inside a message the next frame is there; for
        # a message's last frame it is the next message's first, so such a message is held back
        # until then.
        sides = [[side_info(frame[c * frame_bytes:(c + 1) * frame_bytes], self.sample_rate)
                  for c in range(self.channels)] for frame in frames]
        gains = [[side.gain for side in frame] for frame in sides]
        held, self._held = self._held, None
        if held is not None:
            held_frames, held_sides, before_jump = held
            if not self._spike(before_jump, [side.gain for side in held_sides[-1]], gains[0]):
                # Confirmed (the frame after it did not come straight back: the held one is no
                # spike): decoded, then this one, in order (the held one cannot fail: it was
                # checked when it came, from the same state). If this one is refused, the held
                # one's audio comes with the next message.
                self._ready.append(self._decode_frames(held_frames))
                self._before_last = (([self._last] if self._last is not None else []) + held_sides[:-1])[-1:]
                self._last = held_sides[-1]
                return self.decode(message)
        try:
            previous = [self._last] if self._last is not None else []
            history = self._before_last + previous + sides
            for k, side in enumerate(sides, start=len(history) - len(sides)):
                # LTPF switches on only after a frame with a pitch (the encoder needs the previous
                # frame's pitch correlation above 0.94: the LC3 spec's LTPF activation, liblc3's
                # lc3_ltpf_analyse); random bytes set the flags at random. The frame before that
                # one counts too: the previous frame decoded may be random bytes let through.
                # But a frame refused by this rule just before, with a pitch, counts as one: random
                # bytes let through would otherwise refuse every frame of a pitched stretch after them.
                pitched = self._ltpf_refused if k == len(history) - len(sides) else None
                if k >= 2 and any(s.ltpf_active and not a.pitch and not b.pitch and not (pitched and pitched[c].pitch)
                                  for c, (a, b, s) in enumerate(zip(history[k - 2], history[k - 1], side))):
                    self._ltpf_refused = side
                    raise DecodeError("LC3 frame with LTPF on after frames without a pitch (random bytes)")
            self._ltpf_refused = None
            before = [[side.gain for side in frame] for frame in self._before_last + previous]
            chain = before + gains
            for k in range(max(1, len(before)), len(chain) - 1):
                if self._spike(chain[max(0, k - 2):k], chain[k], chain[k + 1]):
                    raise DecodeError("LC3 frame whose global gain jumps and comes straight back (random bytes)")
            if len(chain) > 1 and self._jumps(chain[-1], chain[-2]):
                self._decode_frames(frames, keep=False)     # checked now, so that a corrupt one is not held
                self._held = (frames, sides, chain[-3:-1])
                raise HeldBack("LC3 message whose global gain jumps from the stream's: held back until the "
                               "next message confirms it")
            out = self._decode_frames(frames)
        except DecodeError:
            if self._held is None:
                self._held, held = held, None    # garbage in between neither confirms nor refutes it
            raise
        finally:
            self._dropped += held is not None    # not confirmed by this message: dropped
        self._before_last = ([self._last] if self._last is not None else []) + sides[:-1]
        self._before_last = self._before_last[-1:]
        self._last = sides[-1]
        if self._ready:
            out, self._ready = np.concatenate([*self._ready, out]), []
        return out

    def held_dropped(self) -> int:
        return self._dropped

    @staticmethod
    def _jumps(gains: list[int], reference: list[int]) -> bool:
        """Louder than ``reference`` by more than GAIN_JUMP, or quieter by more than GAIN_DIP,
        on some channel: a jump."""
        return any(a - b > GAIN_JUMP or b - a > GAIN_DIP for a, b in zip(gains, reference))

    @staticmethod
    def _spike(before: list[list[int]], gains: list[int], after: list[int]) -> bool:
        """Whether a frame's ``gains`` (per channel) stick out of the stream: on some channel,
        louder than the frame ``after`` it and the one or two ``before`` it by more than GAIN_JUMP,
        or quieter than all of them by more than GAIN_DIP, and farther from the nearest
        neighbours than those are from each other (see GAIN_JUMP). Two frames before, and that
        last condition, so that random bytes let through just before (their gain is random) do
        not make a device's frame whose loudness falls or rises fast look like one."""
        for channel, gain in enumerate(gains):
            others = [frame[channel] for frame in before] + [after[channel]]
            spread = abs(before[-1][channel] - after[channel])
            if gain - max(others) > max(GAIN_JUMP, spread) or min(others) - gain > max(GAIN_DIP, spread):
                return True
        return False

    def _decode_frames(self, frames: list[bytes], keep: bool = True) -> np.ndarray:
        """Decode one message's frames; DecodeError (the decoder's state restored, as if the
        message had never come) if liblc3 finds one corrupt or the probe finds one random.
        ``keep=False`` restores the state after a successful decode too (a check only).

        The probe. An encoder fills the bits of a frame that it does not need with zeros (liblc3's
        ``lc3_flush_bits``: the gap between the arithmetic-coded spectrum, written from the
        front, and the side information and residual bits, written from the back), so every set
        bit of a real frame is read: clearing it changes the decoded audio (except in a few
        side-information fields, far from the probe). Random bytes that liblc3 takes for a frame
        (about a quarter of them, at 40 bytes) mostly leave bits in the middle unread, and those
        are random. So the first two set bits from ``probe_start`` are cleared in turn and the
        frame decoded again from the same state each time: the same audio twice means set bits
        the decoder never read, random bytes (one alone may be among the last bits of the
        arithmetic code, which its decoder does not need). Measured (tests/data/audio, 5 seeds):
        none of 7,525 device frames flagged, at 40 bytes nor at 30 (nor any of liblc3's frames of
        20 to 400 bytes at 16 and 48 kHz in the tests; frames in LSB mode are not probed); of the
        random frames that liblc3 and the LSB-mode rule let through, 59 % flagged at 40 bytes,
        48 % at 30 (more: the LTPF rule, checked first, takes some that it would flag). Of all
        random 40-byte frames, 4 % get through every rule. It costs one more decode for a
        frame with a set bit there (a device's frame changes its audio at the first).

        The last pair. A frame that passes the probe is decoded once more with its last non-zero
        line one pair lower (``last_pair_dropped``): an encoder's last pair is not zero, so a
        device's frame sounds different without it, while random bytes' last pair often decodes
        to zero and the frame sounds the same. Measured: none of the development set's 7,525
        frames sounds the same (nor any frame of it encoded by liblc3 at 8 to 48 kHz, 20 to 400
        bytes), while 127 of the 276 random 40-byte frames that got through the other rules on
        ten seeds do (leaks per seed of 752: 22-33 before, 10-18 with it).

        Cost: a device's frame is decoded three times (itself, the probe, the last pair). In
        Python (ctypes) the calls around those decodes cost more than the decodes; for mono
        streams the native module (native/lc3_probe.c) makes them in one call when it is built.
        Measured (16 kHz 40-byte frames, interleaved runs): 1.94 ms of CPU per audio second
        with it, 2.6 without, liblc3 alone 0.43; 48 kHz 3.8 (soxr included), liblc3 alone 0.75."""
        decode_frame, memmove, memcmp = _liblc3().lc3_decode, ctypes.memmove, _libc().memcmp
        self._save_state()
        channels, rate, size = self.channels, self.sample_rate, self._state_bytes
        samples = self._frame_samples
        block = samples * channels  # interleaved samples of one frame
        out = np.empty(len(frames) * block, dtype=np.int16)
        address = out.__array_interface__["data"][0]    # (``out.ctypes`` costs a few µs a call)
        probe_first, probe_last = self._probe_addresses
        native, decode_address = self._native
        corrupt = random = 0
        for index, frame in enumerate(frames):
            per_channel = len(frame) // channels
            start = probe_start(per_channel)
            lsb_possible = lsb_mode_possible(per_channel, rate)
            for channel, handle in enumerate(self._handles):
                data = frame[channel * per_channel:(channel + 1) * per_channel] if channels > 1 else frame
                pcm = address + 2 * (index * block + channel)  # liblc3 writes every channels-th sample
                memory = self._memory[channel]
                # The state before the frame: the message's saved copy for its first frame.
                before = self._saved[channel] if index == 0 else self._before_frame
                if index:
                    memmove(before, memory, size)
                if native is not None:       # mono: the same steps in C (native/lc3_probe.c), then the rare rest
                    status, first, second, first_same, last_same = native(
                        decode_address, handle, ctypes.addressof(memory), ctypes.addressof(before), size, data,
                        not (lsb_possible and lsb_mode_flag(data, rate)), start, PROBE_WINDOW,
                        _BANDWIDTH_BITS[rate], _LAST_NONZERO_BITS[rate], pcm, probe_first, probe_last, samples)
                    if status < 0:
                        self._restore_state()
                        raise DecodeError(f"liblc3 rejected a {per_channel}-byte frame")
                    corrupt += status == _PLC
                    random += not status and (
                        (first_same and self._same_unrounded(channel, handle, data, cleared(data, first), before)
                         and self._same_audio(channel, handle, data, cleared(data, second), pcm, before))
                        or (last_same == 1 and self._same_unrounded(channel, handle, data,
                                                                    last_pair_dropped(data, rate), before)))
                    continue
                first = second = lowered = None
                if not (lsb_possible and lsb_mode_flag(data, rate)):
                    # (A frame in LSB mode is not probed: one of 3,762 real 80-byte frames at
                    # 16 kHz, the shortest with LSB mode, left two set bits there unread.)
                    # Two set bits, each unread: one alone may be among the last bits of the
                    # arithmetic code, which its decoder does not need (rare, but seen).
                    first = probe_bit(data, start)
                    second = None if first is None else probe_bit(data, first + 1, start + PROBE_WINDOW - first - 1)
                    lowered = last_pair_dropped(data, rate)      # a device's last pair is never zero
                # The changed frames are decoded first, from the state before the frame, each
                # undone at once (one state copy each; after the frame's own decode it took three).
                if second is not None:
                    first_cleared = cleared(data, first)
                    decode_frame(handle, first_cleared, per_channel, _PCM_S16, probe_first, 1)
                    memmove(memory, before, size)
                if lowered is not None:
                    decode_frame(handle, lowered, per_channel, _PCM_S16, probe_last, 1)
                    memmove(memory, before, size)
                status = decode_frame(handle, data, per_channel, _PCM_S16, pcm, channels)
                if status < 0:
                    self._restore_state()
                    raise DecodeError(f"liblc3 rejected a {per_channel}-byte frame")
                corrupt += status == _PLC
                if status or (second is None and lowered is None):
                    continue
                # Mono: the frame's samples, where liblc3 wrote them; else a copy of the channel's.
                frame_out = pcm if channels == 1 else out[index * block + channel:(index + 1) * block:channels].copy()
                random += ((second is not None and self._same(probe_first, frame_out, channel, handle, data,
                                                              first_cleared, before)
                            and self._same_audio(channel, handle, data, cleared(data, second), frame_out, before))
                           or (lowered is not None and self._same(probe_last, frame_out, channel, handle, data,
                                                                  lowered, before)))
        if corrupt or random or not keep:
            # The message is reported whole: a real device's frames arrive intact (BLE checks
            # them), so a corrupt frame means the message is garbage, and passing its other frames
            # on would let random bytes through as "audio". liblc3 concealed the invalid frames and
            # decoded the others into its state: undone, or the next real frame's overlap carries
            # their noise and the concealment's.
            self._restore_state()
            if corrupt:
                raise DecodeError(f"{corrupt} corrupt LC3 frame(s) in a {sum(map(len, frames))}-byte message")
            if random:
                raise DecodeError(f"{random} LC3 frame(s) with set bits the decoder never reads (random bytes: an "
                                  "encoder leaves unused bits zero)")
        return self._resampler.process(mix_to_mono(out, channels)) if keep else no_samples()

    def _same_audio(self, channel: int, handle: int, frame: bytes, changed: bytes, decoded: int | np.ndarray,
                    before) -> bool:
        """Whether ``frame``, just decoded to ``decoded`` (its samples, or their address) from the
        state in ``before``, decodes to the same audio as ``changed`` (the frame with a bit
        cleared or a field lowered: see ``_decode_frames``); the channel's state is left as after
        ``frame``."""
        decode_frame, memory, size = _liblc3().lc3_decode, self._memory[channel], self._state_bytes
        ctypes.memmove(self._after_frame, memory, size)
        ctypes.memmove(memory, before, size)
        decode_frame(handle, changed, len(frame), _PCM_S16, self._probe_addresses[0], 1)
        ctypes.memmove(memory, self._after_frame, size)
        return self._same(self._probe_addresses[0], decoded, channel, handle, frame, changed, before)

    def _same(self, probe: int, decoded: int | np.ndarray, channel: int, handle: int, frame: bytes,
              changed: bytes, before) -> bool:
        """Whether ``changed``'s samples, decoded at the address ``probe``, are ``frame``'s
        (``decoded``: their address, or a copy) and stay the same before rounding."""
        if isinstance(decoded, int):
            if _libc().memcmp(probe, decoded, 2 * self._frame_samples):
                return False
        elif not np.array_equal(self._probe_pcm[self._probe_addresses.index(probe)], decoded):
            return False
        # The same 16-bit audio may only mean that the frame adds too little to survive the
        # rounding (a frame fading into silence): then compare liblc3's float output, before
        # rounding, which any bit the decoder reads changes.
        return self._same_unrounded(channel, handle, frame, changed, before)

    def _same_unrounded(self, channel: int, handle: int, frame: bytes, changed: bytes, before) -> bool:
        """Whether ``frame`` and ``changed`` decode to the same float samples from the state the
        frame was decoded from (``before``); the channel's state is left as after ``frame``."""
        decode_frame, memory, size = _liblc3().lc3_decode, self._memory[channel], self._state_bytes
        after = ctypes.create_string_buffer(size)
        ctypes.memmove(after, memory, size)
        results = []
        for data in (frame, changed):
            ctypes.memmove(memory, before, size)
            samples = np.empty(self._frame_samples, dtype=np.float32)
            decode_frame(handle, data, len(data), _PCM_FLOAT, samples.ctypes.data, 1)
            results.append(samples)
        ctypes.memmove(memory, after, size)
        return np.array_equal(results[0], results[1])

    def _save_state(self) -> None:
        for memory, saved in zip(self._memory, self._saved):
            ctypes.memmove(saved, memory, self._state_bytes)

    def _restore_state(self) -> None:
        for memory, saved in zip(self._memory, self._saved):
            ctypes.memmove(memory, saved, self._state_bytes)

    def flush(self) -> np.ndarray:
        if self._held is not None:
            # The stream ended on a message held back for a jump in loudness: nothing can refute
            # it now (a device's last frame may well fade out), so it is decoded.
            held, self._held = self._held, None
            self._ready.append(self._decode_frames(held[0]))
        ready, self._ready = self._ready, []
        return np.concatenate([*ready, self._resampler.flush()])

    def close(self) -> None:
        # The handles point into the memory buffers: drop both together.
        self._handles = []
        self._memory = []
