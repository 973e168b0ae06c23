"""The native Opus reader (harken/native/opus_reader.c) against the Python path it accelerates:
the same packet checks, bit-identical audio on one shared decoder state, and every frame it
must not take left at the right offset."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from websockets.frames import apply_mask

from harken.codecs import DecodeError
from harken.codecs.opus import OpusDecoder, opus_packet_duration
from harken.native import opus_reader

from .codec_samples import reference_pcm, vector_opus_packets
from .test_codecs import _opus_like_packets

PIECE = 640


def test_the_native_reader_is_built_by_setup():
    # dev.sh (and the Dockerfile) compile it; without it every stream silently takes the slower path.
    assert opus_reader is not None, "run python -m harken.native.build"


pytestmark_native = pytest.mark.skipif(opus_reader is None, reason="native reader not built")


def frame(payload: bytes, first: int = 0x82, masked: bool = True) -> bytes:
    size = len(payload)
    head = bytes([first, (0x80 if masked else 0) | size]) if size < 126 else \
        bytes([first, (0x80 if masked else 0) | 126]) + size.to_bytes(2, "big")
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


class Recorder:
    def __init__(self, max_message: int = 65536, piece: int = PIECE):
        self.decoder = OpusDecoder(16000, 1)
        self.reader = self.decoder.native_reader(piece, max_message, self.on_piece)
        self.pieces: list[tuple[np.ndarray, int, int, float]] = []

    def on_piece(self) -> None:
        self.take()

    def take(self) -> None:
        pcm, messages, size, arrived = self.reader.take()
        if messages:
            self.pieces.append((np.frombuffer(pcm, np.int16), messages, size, arrived))

    def pcm(self) -> np.ndarray:
        self.take()
        return np.concatenate([p for p, *_ in self.pieces])


def python_decode(packets: list[bytes]) -> np.ndarray:
    decoder = OpusDecoder(16000, 1)
    return np.concatenate([decoder.decode(p) for p in packets])


@pytestmark_native
@pytest.mark.parametrize("vector", ["speech16k_opus_10ms.bin", "speech16k_opus_20ms.bin"])
def test_real_packets_decode_bit_identical_to_the_python_path_in_pieces(vector):
    packets = vector_opus_packets(vector)
    recorder = Recorder()
    data = b"".join(frame(p) for p in packets)
    before = time.monotonic()
    assert recorder.reader.scan(data, 0, -1) == len(data)
    after = time.monotonic()
    assert np.array_equal(recorder.pcm(), python_decode(packets))
    # on_piece came as soon as a piece was there: every piece but the last is one piece long
    # (plus at most one packet), and the messages and bytes add up.
    per_packet = len(python_decode(packets[:1]))
    for pcm, *_ in recorder.pieces[:-1]:
        assert PIECE <= len(pcm) < PIECE + per_packet
    assert sum(m for _, m, _, _ in recorder.pieces) == len(packets)
    assert sum(s for _, _, s, _ in recorder.pieces) == sum(map(len, packets))
    assert all(before <= arrived <= after for *_, arrived in recorder.pieces)   # time.monotonic's clock
    assert recorder.reader.pending == 0


@pytestmark_native
def test_the_audio_the_reader_hands_over_gives_the_garbage_collector_nothing_to_walk():
    # A session keeps ~30 s of pieces per stream (its replay buffer). When numpy viewed them through
    # memoryviews (of a bytearray), 300 streams put ~450,000 tracked objects in every full
    # collection: ~200 ms pauses that pushed segment latency p99 over budget.
    packets = vector_opus_packets("speech16k_opus_10ms.bin")
    recorder = Recorder()
    recorder.reader.scan(b"".join(frame(p) for p in packets), 0, -1)
    recorder.take()
    assert len(recorder.pieces) > 10
    for pcm, *_ in recorder.pieces:
        assert not gc.is_tracked(pcm) and not gc.is_tracked(pcm.base)
    assert recorder.reader.take()[0] == b""          # nothing pending: no new object either


@pytestmark_native
def test_the_reader_stops_at_each_frame_it_must_leave_and_the_python_path_carries_on():
    packets = vector_opus_packets("speech16k_opus_10ms.bin")[:40]
    left = {
        "keepalive": frame(b"\x8a\x00"),
        "text": frame(b"hello", first=0x81),
        "ping": frame(b"p", first=0x89),
        "fragment": frame(packets[0], first=0x02),
        "unmasked": frame(packets[0], masked=False),
        "malformed": frame(bytes([0x43, 0x00]) + bytes(20)),   # code 3 with zero frames (R5)
        "oversized": frame(packets[0] + bytes(200)),           # over this reader's 150 bytes
    }
    for name, odd in left.items():
        recorder = Recorder(max_message=150)
        head = b"".join(frame(p) for p in packets[:10])
        data = head + odd + b"".join(frame(p) for p in packets[10:])
        assert recorder.reader.scan(data, 0, -1) == len(head), name
        assert recorder.reader.scan(data, len(head) + len(odd), -1) == len(data), name
        # Skipping the odd frame lost nothing of the decoder's state.
        assert np.array_equal(recorder.pcm(), python_decode(packets)), name


@pytestmark_native
def test_the_websocket_size_limit_and_incomplete_frames_are_left_too():
    packets = vector_opus_packets("speech16k_opus_10ms.bin")[:3]
    recorder = Recorder()
    data = b"".join(frame(p) for p in packets)
    assert recorder.reader.scan(data, 0, len(packets[0]) - 1) == 0        # over the connection's limit
    cut = len(frame(packets[0])) + 5
    assert recorder.reader.scan(data[:cut], 0, -1) == len(frame(packets[0]))   # the rest is not there yet
    assert recorder.reader.scan(data, len(frame(packets[0])), -1) == len(data)
    assert np.array_equal(recorder.pcm(), python_decode(packets))


@pytestmark_native
def test_after_close_the_reader_takes_nothing_and_keeps_what_it_had():
    packets = vector_opus_packets("speech16k_opus_10ms.bin")[:3]
    recorder = Recorder()
    first = frame(packets[0])
    assert recorder.reader.scan(first, 0, -1) == len(first)
    recorder.reader.close()
    assert recorder.reader.closed
    rest = b"".join(frame(p) for p in packets[1:])
    assert recorder.reader.scan(rest, 0, -1) == 0
    assert np.array_equal(recorder.pcm(), python_decode(packets[:1]))


@pytestmark_native
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failing_piece_callback_does_not_stop_the_reader():
    packets = vector_opus_packets("speech16k_opus_10ms.bin")[:20]
    decoder = OpusDecoder(16000, 1)
    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("owner bug")

    reader = decoder.native_reader(PIECE, 65536, broken)
    data = b"".join(frame(p) for p in packets)
    assert reader.scan(data, 0, -1) == len(data)
    assert calls                                                    # reported as unraisable, not raised
    pcm, messages, _, _ = reader.take()
    assert messages == len(packets)
    assert np.array_equal(np.frombuffer(pcm, np.int16), python_decode(packets))


def test_only_mono_streams_decoded_straight_to_16_khz_get_a_reader():
    on_piece = lambda: None  # noqa: E731
    expect = opus_reader is not None
    assert (OpusDecoder(16000, 1).native_reader(PIECE, 65536, on_piece) is not None) == expect
    assert (OpusDecoder(48000, 1).native_reader(PIECE, 65536, on_piece) is not None) == expect
    assert OpusDecoder(16000, 2).native_reader(PIECE, 65536, on_piece) is None   # downmixed in Python
    assert OpusDecoder(8000, 1).native_reader(PIECE, 65536, on_piece) is None    # resampled in Python


@pytestmark_native
@settings(max_examples=600, deadline=None)
@given(_opus_like_packets())
def test_the_native_packet_checks_agree_with_the_python_rules(packet):
    try:
        expected = opus_packet_duration(packet)
    except DecodeError:
        expected = -1
    assert opus_reader.packet_duration(packet) == expected


def _native_then_python(packets: list[bytes], rate: int = 16000) -> tuple[np.ndarray, int]:
    """What a session does: the reader decodes what it can, each frame it leaves goes to the
    decoder's Python path (a DecodeError drops it). Returns the audio and the messages dropped."""
    decoder = OpusDecoder(rate, 1)
    pieces: list[np.ndarray] = []
    reader = decoder.native_reader(PIECE, 65536, lambda: None)
    frames = [frame(p) for p in packets]
    data, starts = b"".join(frames), []
    offset = 0
    for f in frames:
        starts.append(offset)
        offset += len(f)
    pos, dropped = 0, 0
    while pos < len(data):
        pos = reader.scan(data, pos, -1)
        if pos >= len(data):
            break
        pcm, *_ = reader.take()
        pieces.append(np.frombuffer(pcm, np.int16))
        index = starts.index(pos)
        try:
            pieces.append(decoder.decode(packets[index]))
        except DecodeError:
            dropped += 1
        pos += len(frames[index])
    pieces.append(np.frombuffer(reader.take()[0], np.int16))
    return np.concatenate(pieces), dropped


def _python_only(packets: list[bytes], rate: int = 16000) -> tuple[np.ndarray, int]:
    decoder, pieces, dropped = OpusDecoder(rate, 1), [], 0
    for packet in packets:
        try:
            pieces.append(decoder.decode(packet))
        except DecodeError:
            dropped += 1
    return np.concatenate(pieces), dropped


@pytestmark_native
def test_with_garbage_the_reader_and_the_python_path_keep_and_drop_the_same_packets():
    import random

    rng = random.Random(7)
    packets = []
    for index, packet in enumerate(vector_opus_packets("speech16k_opus_10ms.bin")):
        if index % 10 == 9:
            packets.append(rng.randbytes(len(packet)))
        packets.append(packet)
    native, native_dropped = _native_then_python(packets)
    python, python_dropped = _python_only(packets)
    assert native_dropped == python_dropped >= 15          # of 20 random packets
    assert np.array_equal(native, python)


@pytestmark_native
def test_an_encoder_alternating_frame_packings_loses_no_packet_on_the_native_path():
    # At 48 kHz and 40 ms the encoder alternates TOCs (one 40 ms SILK frame, two 20 ms hybrid
    # frames): each new TOC is confirmed by the packet after it, which must come to Python too.
    from harken.codecs.encode import encode_for_device

    packets = encode_for_device(reference_pcm(), "opus", 48000, frame_ms=40)
    assert len({p[0] for p in packets}) > 1
    native, _ = _native_then_python(packets, 48000)
    python, _ = _python_only(packets, 48000)
    assert np.array_equal(native, python)
    assert len(native) >= 640 * (len(packets) - 1)          # at most the last packet held back
