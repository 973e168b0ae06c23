"""Hostile input never hurts a decoder: only DecodeError escapes, good audio after garbage still
decodes as if the garbage had never come, and memory stays flat however long the garbage lasts."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harken.codecs import DecodeError, decoder_for, default_rate

from .codec_samples import (
    CODECS,
    alignment,
    decode_all,
    encoded_messages,
    garbage_messages,
    hostile_message,
)

pytestmark = pytest.mark.timeout(120)

PCM = ("pcm8", "pcm16", "pcm")
RECOVERY_SAMPLES = 1600  # codec state (prediction, overlap, resampler) settles within 100 ms


def _decode_or_drop(decoder, message: bytes) -> np.ndarray | None:
    """What the gateway does: decode, or drop the message on DecodeError. Anything else fails."""
    try:
        pcm = decoder.decode(message)
    except DecodeError:
        return None
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    return pcm


def _good(decoder, message: bytes) -> np.ndarray:
    """A good message's audio: it never raises, except when held back until the next message
    confirms it (an Opus TOC change, an LC3 onset), whose audio comes with that one's."""
    try:
        return decoder.decode(message)
    except DecodeError as exc:
        assert "held back" in str(exc), exc
        return np.zeros(0, np.int16)


def _setup(codec: str, channels: int = 1):
    rate = default_rate(codec)
    valid = encoded_messages(codec, rate, channels)
    clean = decode_all(decoder_for(codec, rate, channels), valid)
    return rate, valid, clean


@pytest.mark.parametrize("codec", CODECS)
def test_garbage_between_good_messages_changes_nothing_after_it(codec):
    rate, valid, clean = _setup(codec)
    half = len(valid) // 2

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(garbage_messages(valid), min_size=1, max_size=6))
    def check(garbage):
        if codec in PCM:
            # PCM has no framing: any whole samples are audio, and a stray odd byte shifts every
            # later sample (the decoder carries it, as clients that cut files anywhere need).
            garbage = [g[: len(g) - len(g) % 2] or b"\0\0" for g in garbage]
        decoder = decoder_for(codec, rate)
        before = sum(len(_good(decoder, m)) for m in valid[:half])
        for message in garbage:
            _decode_or_drop(decoder, message)
        # Good messages never raise, except: one held back (an LC3 message whose loudness jumps
        # from that of random bytes let through: its audio comes with the next), and the first
        # few after the garbage, which may be refused against it (LC3's LTPF rule).
        after = []
        for index, message in enumerate(valid[half:]):
            try:
                after.append(decoder.decode(message))
            except DecodeError as exc:
                assert "held back" in str(exc) or (codec.startswith("lc3") and index < 3), exc
        after.append(decoder.flush())
        after = np.concatenate(after)
        expected = clean[before:]
        # A resampler releases audio in blocks, so the good audio may come out a little earlier
        # or later than in the clean run: look for it within 0.5 s either way.
        a, b = after[RECOVERY_SAMPLES:], expected[RECOVERY_SAMPLES:]
        correlation = max(alignment(a, b, max_lag=8000)[0], alignment(b, a, max_lag=8000)[0])
        assert correlation >= 0.95

    check()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("channels", [1, 2])
def test_only_decode_error_escapes(codec, channels):
    rate = default_rate(codec)
    valid = encoded_messages(codec, rate, channels)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.one_of(garbage_messages(valid), st.binary(min_size=3, max_size=64)), max_size=10))
    def check(messages):
        decoder = decoder_for(codec, rate, channels)
        for message in messages:
            _decode_or_drop(decoder, message)
        assert _decode_or_drop(decoder, b"") is not None  # empty input never reaches a codec
        decoder.flush()

    check()


@pytest.mark.parametrize("codec", [c for c in CODECS if c not in PCM])
def test_pure_garbage_is_mostly_reported(codec):
    # What lets the gateway warn a client that sends only garbage: most random messages raise.
    # (PCM cannot tell noise from audio; Opus accepts any well-framed packet, about half of
    # random byte strings, see harken/codecs/opus.py.)
    rate, valid, _ = _setup(codec)
    decoder = decoder_for(codec, rate)
    kinds = ("random", "random_huge")
    dropped = sum(
        _decode_or_drop(decoder, hostile_message(valid, seed, kinds[seed % 2])) is None for seed in range(200)
    )
    assert dropped >= 80


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


@pytest.mark.parametrize("codec", CODECS)
def test_memory_stays_flat_under_a_garbage_flood(codec):
    # 3 rounds of 150 hostile messages (~5 MB per round, up to 64 KiB each, mixed with good
    # ones). Round 1 warms caches and allocator pools; rounds 2-3 must not keep anything: a
    # decoder that buffered its input (as FFmpeg's ADTS parser does with sync-less bytes) would
    # grow by megabytes per round.
    rate, valid, _ = _setup(codec)
    decoder = decoder_for(codec, rate, 2 if codec in ("opus", "lc3") else 1)
    valid = encoded_messages(codec, rate, decoder.channels)
    messages = [hostile_message(valid, seed) for seed in range(100)]
    messages += [hostile_message(valid, seed, "random_huge") for seed in range(20)]
    messages += [hostile_message(valid, seed, "sync_free_huge") for seed in range(20)]
    messages += [hostile_message(valid, seed, "repeated_huge") for seed in range(10)]
    messages += list(valid[:50])
    fed = sum(map(len, messages))

    def round_trip() -> None:
        for message in messages:
            _decode_or_drop(decoder, message)

    round_trip()
    rss_warm = _rss()
    tracemalloc.start()
    round_trip()
    python_growth, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    round_trip()
    rss_growth = _rss() - rss_warm
    assert fed > 1_000_000  # the flood is big enough for a leak to show
    assert python_growth < 256 * 1024, python_growth
    assert rss_growth < 4 * 1024 * 1024, rss_growth


@pytest.mark.parametrize("codec", CODECS)
def test_a_long_run_of_garbage_is_not_buffered(codec):
    # 128 messages (~4 MB) in which an ADTS parser finds no sync word: FFmpeg's parser keeps all
    # of them (measured +5.7 MB here), a bounded framer keeps at most one partial frame.
    rate, valid, _ = _setup(codec)
    decoder = decoder_for(codec, rate)
    for message in valid[:20]:
        _good(decoder, message)
    flood = [hostile_message(valid, seed, "sync_free_huge") for seed in range(128)]
    rss_before = _rss()
    for message in flood:
        _decode_or_drop(decoder, message)
    assert _rss() - rss_before < 2 * 1024 * 1024


@pytest.mark.parametrize("codec", CODECS)
def test_connections_come_and_go_without_leaking(codec):
    # lc3py's own Decoder never frees its native state: 1000 stereo 16 kHz ones grow RSS by ~7 MB.
    rate = default_rate(codec)
    first_message = encoded_messages(codec, rate, 2)[0]

    def connection() -> None:
        decoder = decoder_for(codec, rate, 2)
        decoder.decode(first_message)
        decoder.close()

    for _ in range(50):
        connection()
    rss_before = _rss()
    for _ in range(1000):
        connection()
    assert _rss() - rss_before < 3 * 1024 * 1024
