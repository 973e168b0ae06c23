"""LC3 (Bluetooth LE Audio), 10 ms frames: ``lc3`` and ``lc3_fs1030``.

- ``lc3``: one frame per message, its length (20–400 bytes per channel) is the message length.
- ``lc3_fs1030``: 30-byte frames, any number back to back in one message (a BLE notification
  typically carries three).
A stereo frame is the channel 0 frame followed by the channel 1 frame, as lc3py encodes it.

The codec is Google's liblc3 as shipped inside the ``lc3py`` wheel, called through ctypes here
rather than through ``lc3.Decoder``, for three measured reasons (reference/auth-and-codecs.md B2):

- ``lc3.Decoder.decode`` ignores liblc3's return code. liblc3 reports a frame whose bitstream
  is invalid (it then conceals it, "PLC"), and that is the only garbage detection LC3 offers:
  without it 40 random bytes "decode" silently and the gateway could never count them.
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

import numpy as np

from .base import TARGET_RATE, Decoder, DecodeError, UnsupportedFormat, mix_to_mono, no_samples
from .resample import StreamResampler
from .signature import Signature

LC3_RATES = (8000, 16000, 24000, 32000, 48000)
# The first side-information fields, read from a frame's last byte backwards, least significant
# bit first (LC3 spec 3.4.2): the bandwidth (this many bits by rate), then the spectrum's last
# non-zero line (log2 of half the 10 ms spectrum's lines), then the LSB-mode flag.
_BANDWIDTH_BITS = {8000: 0, 16000: 1, 24000: 2, 32000: 2, 48000: 3}
_LAST_NONZERO_BITS = {8000: 6, 16000: 7, 24000: 7, 32000: 8, 48000: 8}
_RATE_INDEX = {8000: 0, 16000: 1, 24000: 2, 32000: 3, 48000: 4}


def lsb_mode_possible(frame_bytes: int, sample_rate: int) -> bool:
    """An encoder uses LSB mode only in frames of at least 20 × (3 + rate index) bytes (liblc3's
    ``lc3_spec_analyze``; checked with lc3py: never below 80 bytes at 16 kHz, 100 at 24 kHz, 140 at
    48 kHz, and some frames at and above)."""
    return frame_bytes >= 20 * (3 + _RATE_INDEX[sample_rate])


def lsb_mode_flag(frame: bytes, sample_rate: int) -> bool:
    """The LSB-mode flag of one channel's frame (see the side-information fields above)."""
    position = _BANDWIDTH_BITS[sample_rate] + _LAST_NONZERO_BITS[sample_rate]
    return bool(frame[len(frame) - 1 - position // 8] >> (position % 8) & 1)
FRAME_US = 10000  # the protocol's only LC3 frame duration
MIN_FRAME_BYTES, MAX_FRAME_BYTES = 20, 400  # LC3_MIN_FRAME_BYTES / LC3_MAX_FRAME_BYTES in lc3.h
_PCM_S16 = 0  # enum lc3_pcm_format: LC3_PCM_FORMAT_S16
_PLC = 1  # lc3_decode's return value when the frame was corrupt and got concealed


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
        decode_frame = _liblc3().lc3_decode
        self._save_state()
        channels = self.channels
        block = self._frame_samples * channels  # interleaved samples of one frame
        out = np.empty(len(frames) * block, dtype=np.int16)
        address = out.ctypes.data
        corrupt = 0
        for index, frame in enumerate(frames):
            per_channel = len(frame) // channels
            for channel, handle in enumerate(self._handles):
                data = frame[channel * per_channel:(channel + 1) * per_channel] if channels > 1 else frame
                pcm = address + 2 * (index * block + channel)  # liblc3 writes every channels-th sample
                status = decode_frame(handle, data, per_channel, _PCM_S16, pcm, channels)
                if status < 0:
                    self._restore_state()
                    raise DecodeError(f"liblc3 rejected a {per_channel}-byte frame")
                corrupt += status == _PLC
        if corrupt:
            # The message is reported whole: a real device's frames arrive intact (BLE checks
            # them), so a corrupt frame means the message is garbage, and passing its other frames
            # on would let random bytes through as "audio". liblc3 concealed the invalid frames and
            # decoded the others into its state: undone, or the next real frame's overlap carries
            # their noise and the concealment's.
            self._restore_state()
            raise DecodeError(f"{corrupt} corrupt LC3 frame(s) in a {len(message)}-byte message")
        return self._resampler.process(mix_to_mono(out, channels))

    def _save_state(self) -> None:
        for memory, saved in zip(self._memory, self._saved):
            ctypes.memmove(saved, memory, self._state_bytes)

    def _restore_state(self) -> None:
        for memory, saved in zip(self._memory, self._saved):
            ctypes.memmove(memory, saved, self._state_bytes)

    def flush(self) -> np.ndarray:
        return self._resampler.flush()

    def close(self) -> None:
        # The handles point into the memory buffers: drop both together.
        self._handles = []
        self._memory = []
