"""The Omi app's offline recordings ("WAL" files) as it uploads them to ``/v1/sync-local-files``.

A file is named ``audio_{device}_{codec}_{sample_rate}_{channels}_fs{frame_size}_{timestamp}.bin``
(``Wal.getFileNameByTimeStarts`` in the app: the device name lower-cased and stripped to
letters and digits, the codec as the app names it, ``opus_fs320`` and ``lc3_fs1030`` included,
the timestamp in Unix seconds, or milliseconds from some writers) and holds the device's frames
one after the other, each prefixed with its length as a little-endian uint32. Upstream's backend
also takes any ``…_{timestamp}.bin`` (then Opus, 16 kHz, mono): so does this module.

Channels. A file holds 1 channel, or 2 interleaved as in a live stereo stream. Not 3–8, which
the live socket takes as channel-prefixed legs of a call (``channels.py``): upstream's format
cannot carry them. What upstream does (BasedHardware/omi ``backend/routers/sync.py``, read
Dec 2026): a file is the device's BLE frames as the app received them (``_flushToDisk``: a uint32
length, then the frame), with no channel id; ``decode_opus_file_to_wav`` decodes every Opus file
with ``Decoder(16000, 1)`` and ``decode_pcm_file_to_wav`` every PCM file as mono, whatever the
name's channel count (``decode_files_to_wav`` reads only the codec, ``_fs``, a PCM file's rate and
the timestamp from the name), and the app writes only device streams to WAL files, never a call. So such a name is refused with
the reason (400), rather than guessing a framing no writer uses.

Pure logic, no I/O beyond a readable binary file object: name parsing, the frame reader used by
the sync worker, a counter fed chunk by chunk while an upload streams to disk, and the writer
tests and tools use to build files as the app does.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

from .channels import MAX_CHANNELS

# Frames longer than this are not audio frames of any codec the app writes (the longest, an AAC
# frame of a stereo 48 kHz stream, is a few KiB): the length prefix is corrupt, the rest of the
# file cannot be framed.
MAX_FRAME_BYTES = 64 * 1024
_PREFIX = struct.Struct("<I")
# Earliest accepted recording time (upstream: 2024-01-01); a later-than-now one is refused too.
EARLIEST_TIMESTAMP = 1704067200
_CODECS = ("opus_fs320", "opus", "pcm16", "pcm8", "aac", "lc3_fs1030", "lc3")
_FULL_NAME = re.compile(
    r"^audio_(?P<device>[A-Za-z0-9]*)_(?P<codec>" + "|".join(_CODECS) + r")_(?P<rate>\d+)_(?P<channels>\d+)"
    r"_fs(?P<frame_size>\d+)_(?P<timestamp>\d+)\.bin$")
_MINIMAL_NAME = re.compile(r"^[A-Za-z0-9_.-]*_(?P<timestamp>\d+)\.bin$")


class BadSyncFile(ValueError):
    """A file name the server cannot take: the message says what is wrong (a 400's detail)."""


@dataclass(frozen=True)
class SyncFileName:
    codec: str
    sample_rate: int
    channels: int
    frame_size: int          # samples per frame as the app names it (fs160 / fs320); informational
    timestamp: float         # Unix seconds of the first frame
    device: str = ""

    def frame_seconds(self) -> float:
        """Seconds of audio one frame carries, for estimating a file's duration before decoding."""
        if self.codec in ("pcm8", "pcm16"):
            return 0.0           # PCM frames vary: estimated from bytes instead (``estimate_seconds``)
        if self.codec == "aac":
            return 1024 / self.sample_rate
        if self.codec == "lc3_fs1030":
            return 0.03
        if self.codec == "lc3":
            return 0.01
        return 0.02 if self.codec == "opus_fs320" else 0.01

    def estimate_seconds(self, frames: int, payload_bytes: int) -> float:
        if self.codec in ("pcm8", "pcm16"):
            return payload_bytes / (2 * self.channels * self.sample_rate)
        return frames * self.frame_seconds()


def parse_sync_filename(name: str, *, now: float) -> SyncFileName:
    """What the name says about a file, or ``BadSyncFile``. ``now`` (Unix seconds) bounds the time."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if not base.endswith(".bin"):
        raise BadSyncFile(f"invalid file name {base!r}: expected a .bin file")
    full = _FULL_NAME.match(base)
    if full is not None:
        info = SyncFileName(codec=full["codec"], sample_rate=int(full["rate"]), channels=int(full["channels"]),
                            frame_size=int(full["frame_size"]), timestamp=_seconds(full["timestamp"]),
                            device=full["device"].lower())
    else:
        minimal = _MINIMAL_NAME.match(base)
        if minimal is None:
            raise BadSyncFile(f"invalid file name {base!r}: expected audio_DEVICE_CODEC_RATE_CHANNELS_fsN_TIMESTAMP.bin "
                              f"(codec one of {', '.join(_CODECS)})")
        info = SyncFileName(codec="opus", sample_rate=16000, channels=1, frame_size=160,
                            timestamp=_seconds(minimal["timestamp"]))
    if info.channels not in (1, 2):
        raise BadSyncFile(f"invalid file name {base!r}: {info.channels} channels: " + (
            "a sync file holds one device's frames, each without a channel id, so the legs of a "
            f"{info.channels}-channel call cannot be told apart in it (upstream reads every file as one "
            "mono stream); stream such a call live on /v4/listen, whose messages carry the channel id"
            if 3 <= info.channels <= MAX_CHANNELS else "a sync file has 1 or 2 (interleaved) channels"))
    if not EARLIEST_TIMESTAMP <= info.timestamp <= now + 300:
        raise BadSyncFile(f"invalid file name {base!r}: timestamp {info.timestamp:.0f} is not a recording time "
                          "(before 2024 or in the future)")
    return info


def _seconds(digits: str) -> float:
    value = int(digits)
    return value / 1000 if value > 10**10 else float(value)


@dataclass
class FrameStats:
    frames: int = 0
    payload_bytes: int = 0
    truncated: bool = False          # the file ended inside a frame (or its length prefix)
    corrupt_length: bool = False     # a length prefix past MAX_FRAME_BYTES (or zero): framing lost


def read_frames(source: BinaryIO, stats: FrameStats | None = None) -> Iterator[bytes]:
    """The frames of a WAL file, in order. Stops at a truncated tail or a corrupt length prefix
    (recorded in ``stats``): everything before it is still yielded."""
    stats = stats if stats is not None else FrameStats()
    while True:
        prefix = source.read(4)
        if not prefix:
            return
        if len(prefix) < 4:
            stats.truncated = True
            return
        (length,) = _PREFIX.unpack(prefix)
        if length == 0 or length > MAX_FRAME_BYTES:
            stats.corrupt_length = True
            return
        frame = source.read(length)
        if len(frame) < length:
            stats.truncated = True
            return
        stats.frames += 1
        stats.payload_bytes += length
        yield frame


class FrameCounter:
    """Counts the frames of a WAL file fed chunk by chunk (an upload streaming to disk), so the
    audio waiting can be estimated without reading the file again."""

    def __init__(self) -> None:
        self.stats = FrameStats()
        self._header = b""
        self._skip = 0          # payload bytes of the current frame still to come

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        stats = self.stats
        while view:
            if stats.corrupt_length:
                return
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
                if self._skip == 0:
                    stats.frames += 1
                continue
            need = 4 - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) == 4:
                (length,) = _PREFIX.unpack(self._header)
                self._header = b""
                if length == 0 or length > MAX_FRAME_BYTES:
                    stats.corrupt_length = True
                    return
                stats.payload_bytes += length
                self._skip = length

    def finish(self) -> FrameStats:
        if self._header or self._skip:
            self.stats.truncated = True
        return self.stats


def wal_bytes(frames: Iterable[bytes]) -> bytes:
    """Frames as the app writes them to a WAL file (the device side, for tests and tools)."""
    return b"".join(_PREFIX.pack(len(frame)) + frame for frame in frames)


def sync_filename(codec: str, sample_rate: int, timestamp: int, *, channels: int = 1, device: str = "omi",
                  frame_size: int | None = None) -> str:
    """The name the app gives a WAL file (``Wal.getFileNameByTimeStarts``)."""
    frame_size = frame_size if frame_size is not None else (320 if codec == "opus_fs320" else 160)
    return f"audio_{device}_{codec}_{sample_rate}_{channels}_fs{frame_size}_{timestamp}.bin"
