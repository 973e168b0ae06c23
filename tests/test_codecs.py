"""Round trips through the real codecs: the committed vectors, every rate, duration and framing."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import opuslib
import opuslib.api
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from harken.codecs import (
    SAMPLE_RATES,
    DecodeError,
    UnsupportedFormat,
    codec_names,
    decoder_for,
    default_rate,
    open_decoder,
)
from harken.codecs.aac import AdtsFramer
from harken.codecs.encode import encode_for_device, message_duration
from harken.codecs.opus import opus_packet_duration

from .codec_samples import (
    CODECS,
    RATE,
    alignment,
    band_limited_reference,
    decode_all,
    encoded_messages,
    reference_pcm,
    vector_adts_frames,
    vector_bytes,
    vector_lc3_frames,
    vector_opus_packets,
    vector_pcm,
)

pytestmark = pytest.mark.timeout(60)

LOSSY_MIN_CORRELATION = 0.95
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
LC3_RATES = (8000, 16000, 24000, 32000, 48000)


def test_every_protocol_codec_is_registered():
    assert set(codec_names()) == set(CODECS)
    assert default_rate("pcm8") == 8000 and default_rate("pcm16") == 16000


# -- PCM -------------------------------------------------------------------------------------------
def test_pcm16_passes_samples_through_unchanged():
    raw = vector_bytes("speech16k_pcm16.raw")
    out = decode_all(decoder_for("pcm16", 16000), [raw[i:i + 320] for i in range(0, len(raw), 320)])
    assert np.array_equal(out, reference_pcm())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 63999), max_size=40))
def test_pcm16_survives_messages_cut_inside_samples(cuts):
    raw = vector_bytes("speech16k_pcm16.raw")
    bounds = [0, *sorted(set(cuts)), len(raw)]
    out = decode_all(decoder_for("pcm16", 16000), [raw[a:b] for a, b in zip(bounds, bounds[1:]) if b > a])
    assert np.array_equal(out, reference_pcm())


def test_pcm8_is_unsigned_8_bit_samples_as_omis_backend_reads_them():
    # Omi's receiver: audioop.lin2lin(audioop.bias(data, 1, -128), 1, 2), i.e. (u8 - 128) << 8.
    assert decoder_for("pcm8", 16000).decode(bytes([0, 128, 255, 129])).tolist() == [-32768, 0, 32512, 256]
    # The 8 kHz vector (16-bit samples) as a device sending 8-bit samples would: 10 ms messages.
    u8 = ((vector_pcm("speech8k_pcm8.raw") >> 8) + 128).astype(np.uint8).tobytes()
    out = decode_all(decoder_for("pcm8", 8000), [u8[i:i + 80] for i in range(0, len(u8), 80)])
    correlation, lag = alignment(out, reference_pcm())
    assert correlation >= 0.98 and lag < 8
    assert abs(len(out) - len(reference_pcm())) <= 2


def test_pcm16_at_44100():
    messages = encoded_messages("pcm16", 44100)
    assert len(messages[0]) == 2 * 441  # 10 ms at 44.1 kHz
    correlation, lag = alignment(decode_all(decoder_for("pcm16", 44100), messages), reference_pcm())
    assert correlation >= 0.99 and lag < 8


@pytest.mark.parametrize("codec,rate", [("pcm8", 8000), ("pcm16", 8000), ("pcm16", 44100), ("opus", 8000),
                                        ("opus", 12000), ("lc3", 24000), ("aac", 8000), ("aac", 48000)])
def test_the_same_messages_always_decode_to_the_same_samples(codec, rate):
    # soxr dithers its own int16 output with random noise: decoded twice, resampled audio once
    # differed by up to 2 LSB, and the engine's transcript of it changed from run to run.
    first = encode_for_device(reference_pcm(), codec, rate)
    assert encode_for_device(reference_pcm(), codec, rate) == first
    decoded = [decode_all(decoder_for(codec, rate), first) for _ in range(3)]
    assert all(np.array_equal(decoded[0], again) for again in decoded[1:])
    assert len(decoded[0]) > RATE        # and it is audio, not nothing


def test_declared_rate_wins_over_the_codec_name():
    out = decode_all(decoder_for("pcm8", 16000), encoded_messages("pcm8", 16000))
    assert len(out) == len(reference_pcm()) and alignment(out, reference_pcm())[0] >= 0.98


def test_pcm_rate_out_of_any_sane_range_is_a_bad_parameter():
    with pytest.raises(UnsupportedFormat):
        decoder_for("pcm16", 100)


# -- Opus ------------------------------------------------------------------------------------------
def test_opus_20ms_vector_is_bit_exact_with_libopus():
    for codec in ("opus", "opus_fs320"):  # the packet, not the codec name, sets the duration
        out = decode_all(decoder_for(codec, 16000), vector_opus_packets("speech16k_opus_20ms.bin"))
        assert np.array_equal(out, vector_pcm("speech16k_opus_20ms.decoded_s16le.raw"))


def test_opus_10ms_vector_lines_up_with_the_source():
    out = decode_all(decoder_for("opus", 16000), vector_opus_packets("speech16k_opus_10ms.bin"))
    correlation, lag = alignment(out, reference_pcm())
    assert correlation >= LOSSY_MIN_CORRELATION
    assert lag == 104  # libopus's delay at 16 kHz (vectors README)


@pytest.mark.parametrize("rate", OPUS_RATES)
@pytest.mark.parametrize("packet_ms", [2.5, 5, 10, 20, 40, 60])
def test_opus_every_rate_and_packet_duration(rate, packet_ms):
    # 2.5 and 5 ms packets at 32 kbps are 10 and 20 bytes: a device sending them spends more.
    bitrate = 64000 if packet_ms < 10 else 32000
    messages = encoded_messages("opus", rate, frame_ms=packet_ms, bitrate=bitrate)
    assert {opus_packet_duration(m) for m in messages} == {int(packet_ms * 48)}
    out = decode_all(decoder_for("opus", rate), messages)
    correlation, lag = alignment(out, band_limited_reference(rate))
    assert correlation >= LOSSY_MIN_CORRELATION, (correlation, lag)
    assert abs(len(out) - len(messages) * packet_ms * 16) <= 2


@pytest.mark.parametrize("rate", [32000, 44100, 11025])
def test_opus_refuses_rates_opus_does_not_have(rate):
    with pytest.raises(UnsupportedFormat):
        decoder_for("opus", rate)


def _libopus_accepts(packet: bytes) -> bool:
    """What libopus's own parser (opus_packet_parse) says of ``packet``, plus its 120 ms limit."""
    lib = opuslib.api.libopus
    lib.opus_packet_parse.argtypes = [
        ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
    ]
    sizes = (ctypes.c_int16 * 48)()
    if lib.opus_packet_parse(packet, len(packet), None, None, sizes, None) <= 0:
        return False
    lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    return lib.opus_packet_get_nb_samples(packet, len(packet), 48000) <= 5760


def _opus_like_packets():
    """Packets biased towards the tricky layouts: code 3 headers, VBR and padding bits, 2-byte lengths."""
    return st.builds(
        lambda toc, second, tail: bytes([toc]) + (bytes([second]) if second is not None else b"") + tail,
        st.integers(0, 255),
        st.one_of(st.none(), st.integers(0, 255)),
        st.one_of(st.binary(max_size=40), st.binary(min_size=1200, max_size=3000)),
    )


@settings(max_examples=400, deadline=None)
@given(_opus_like_packets())
def test_opus_packet_checks_agree_with_libopus_parser(packet):
    try:
        opus_packet_duration(packet)
        ours = True
    except DecodeError:
        ours = False
    assert ours == _libopus_accepts(packet)


@pytest.mark.parametrize(
    "packet, rule",
    [
        (b"", "R1"),
        (bytes([0x40]) + bytes(1276), "R2"),  # code 0, frame over 1275 bytes
        (bytes([0x41]) + bytes(3), "R3"),  # code 1, odd payload
        (bytes([0x42, 200]) + bytes(10), "R4"),  # code 2, first frame longer than the packet
        (bytes([0x43, 0x00]), "R5"),  # code 3, zero frames
        (bytes([0x5B, 0x03]) + bytes(30), "R5"),  # code 3, config 11 (60 ms): 3 × 60 ms = 180 ms
        (bytes([0x43, 0x03]) + bytes(31), "R6"),  # code 3 CBR, 31 bytes for 3 frames
        (bytes([0x43, 0x42, 0xFF]), "R7"),  # code 3, padding length runs past the end
        (bytes([0x43, 0x82, 50]) + bytes(10), "R7"),  # code 3 VBR, first frame overruns
    ],
)
def test_opus_malformed_packets_are_refused_with_the_rule_named(packet, rule):
    with pytest.raises(DecodeError, match=rule):
        opus_packet_duration(packet)
    decoder = decoder_for("opus", 16000)
    if packet:  # an empty message is not a packet: decode returns no samples for it
        with pytest.raises(DecodeError, match=rule):
            decoder.decode(packet)
    assert len(decoder.decode(encoded_messages("opus", 16000)[50])) == 160  # still usable


# -- AAC -------------------------------------------------------------------------------------------
def _aac_vector_output(messages) -> np.ndarray:
    return decode_all(decoder_for("aac", 16000), messages)


def test_aac_vector_one_frame_per_message():
    frames = vector_adts_frames()
    out = _aac_vector_output(frames)
    assert len(out) == len(frames) * 1024 - 1024  # the encoder's priming is stripped, once
    correlation, lag = alignment(out, reference_pcm())
    assert correlation >= LOSSY_MIN_CORRELATION and lag == 0


def test_aac_vector_three_frames_per_message_and_whole_file_decode_the_same():
    frames = vector_adts_frames()
    one_per_message = _aac_vector_output(frames)
    three_per_message = _aac_vector_output([b"".join(frames[i:i + 3]) for i in range(0, len(frames), 3)])
    whole = _aac_vector_output([vector_bytes("speech16k.aac")])
    assert np.array_equal(three_per_message, one_per_message)
    assert np.array_equal(whole, one_per_message)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, len(vector_bytes("speech16k.aac")) - 1), min_size=1, max_size=120))
@example(cuts=[6405])     # the rest of the cut frame starts with bytes that look like an ADTS header
def test_aac_frames_split_at_random_points_decode_the_same(cuts):
    data = vector_bytes("speech16k.aac")
    bounds = [0, *sorted(set(cuts)), len(data)]
    split = _aac_vector_output([data[a:b] for a, b in zip(bounds, bounds[1:])])
    assert np.array_equal(split, _aac_vector_output(vector_adts_frames()))


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100, 48000])
def test_aac_at_device_rates(rate):
    out = decode_all(decoder_for("aac", rate), encoded_messages("aac", rate))
    correlation, lag = alignment(out, band_limited_reference(rate))
    assert correlation >= LOSSY_MIN_CORRELATION and lag <= 2


def test_aac_adts_header_wins_over_the_declared_rate():
    out = decode_all(decoder_for("aac", 16000), encoded_messages("aac", 48000))
    correlation, _ = alignment(out, reference_pcm())
    assert correlation >= LOSSY_MIN_CORRELATION


def test_aac_decoder_recovers_from_an_end_of_stream_context():
    # An empty packet puts an FFmpeg context at end-of-stream for good (reference B3). The
    # decoder never sends one itself; this forces the state to prove it replaces the context.
    decoder = decoder_for("aac", 16000)
    frames = vector_adts_frames()
    decoder.decode(frames[0])
    decoder._context.decode(av.Packet(b""))
    with pytest.raises(DecodeError):
        decoder.decode(frames[1])
    assert len(decoder.decode(frames[2])) == 1024


def test_ffmpeg_stays_quiet_on_garbage_even_if_logging_was_turned_on():
    # Another library may have routed FFmpeg's log to Python logging (which prints warnings to
    # stderr); a client sending garbage must not be able to flood the server's stderr.
    script = (
        "import av.logging, numpy as np\n"
        "av.logging.set_level(av.logging.VERBOSE)\n"
        "from harken.codecs import decoder_for, DecodeError\n"
        "decoder = decoder_for('aac', 16000)\n"
        "for seed in range(30):\n"
        "    junk = np.random.default_rng(seed).integers(0, 256, 300, dtype=np.uint8).tobytes()\n"
        "    try:\n"
        "        decoder.decode(b'\\xff\\xf1\\x50\\x80\\x26\\x00\\xfc' + junk)\n"
        "    except DecodeError:\n"
        "        pass\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_empty_message_never_reaches_a_codec():
    for codec in CODECS:
        decoder = decoder_for(codec, default_rate(codec))
        assert len(decoder.decode(b"")) == 0
        assert len(decode_all(decoder, encoded_messages(codec, default_rate(codec)))) > 30000


# -- ADTS framing (pure) ---------------------------------------------------------------------------
def test_adts_framer_resyncs_after_junk_and_drops_a_truncated_frame():
    frames = vector_adts_frames()
    framer = AdtsFramer()
    got, skipped = framer.push(b"\x00junk\xff" + frames[0] + frames[1][:50])
    assert got == [frames[0]] and skipped == 6 and framer.pending == 50
    got, skipped = framer.push(frames[2])  # a new header: the truncated frame was never finished
    assert got == [frames[2]] and skipped == 50 and framer.pending == 0


def test_adts_framer_holds_at_most_one_partial_frame():
    framer = AdtsFramer()
    for _ in range(100):
        framer.push(np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes())
        assert framer.pending < 8192


# -- LC3 -------------------------------------------------------------------------------------------
def test_lc3_fs1030_vector_is_bit_exact_with_lc3py():
    import lc3

    frames = vector_lc3_frames("speech16k_lc3_10ms_30B.bin", 30)
    reference = lc3.Decoder(10000, 16000)
    expected = np.concatenate([np.frombuffer(reference.decode(f, bit_depth=16), np.int16) for f in frames])
    # liblc3 computes in floating point, and libm picks its code per CPU: the stored decode
    # (made on another machine) differs from this machine's by at most one step in a few samples.
    stored = vector_pcm("speech16k_lc3_10ms_30B.decoded_s16le.raw")
    assert len(stored) == len(expected) and np.abs(stored.astype(np.int32) - expected).max() <= 1
    assert np.count_nonzero(stored != expected) <= len(stored) // 1000
    for per_message in (1, 3, 5):
        messages = [b"".join(frames[i:i + per_message]) for i in range(0, len(frames), per_message)]
        assert np.array_equal(decode_all(decoder_for("lc3_fs1030", 16000), messages), expected)


def test_lc3_frame_length_comes_from_the_message():
    for name, size in (("speech16k_lc3_10ms_40B.bin", 40), ("speech16k_lc3_10ms_30B.bin", 30)):
        out = decode_all(decoder_for("lc3", 16000), vector_lc3_frames(name, size))
        correlation, lag = alignment(out, reference_pcm())
        assert correlation >= LOSSY_MIN_CORRELATION and lag == 40  # liblc3's delay at 10 ms


@pytest.mark.parametrize("codec", ["lc3", "lc3_fs1030"])
@pytest.mark.parametrize("rate", LC3_RATES)
def test_lc3_every_rate(codec, rate):
    out = decode_all(decoder_for(codec, rate), encoded_messages(codec, rate))
    correlation, _ = alignment(out, band_limited_reference(rate))
    assert correlation >= LOSSY_MIN_CORRELATION


@pytest.mark.parametrize("rate", [12000, 44100])
def test_lc3_refuses_rates_lc3_does_not_have(rate):
    with pytest.raises(UnsupportedFormat):
        decoder_for("lc3", rate)


def test_lc3_fs1030_refuses_a_message_that_is_not_whole_frames():
    decoder = decoder_for("lc3_fs1030", 16000)
    with pytest.raises(DecodeError):
        decoder.decode(encoded_messages("lc3_fs1030", 16000)[0][:-1])


# -- stereo ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", [c for c in CODECS if c != "pcm"])   # pcm stereo is a call: tests/test_channels.py
def test_stereo_is_the_average_of_both_channels(codec):
    # Speech on the left, silence on the right: the mix is the speech at half level. A decoder
    # that kept one channel (or summed them) would be off by a factor of 2 or would be silent.
    speech = reference_pcm()
    stereo = np.stack([speech, np.zeros_like(speech)], axis=1)
    rate = default_rate(codec)
    messages = encode_for_device(stereo, codec, rate, channels=2)
    out = decode_all(decoder_for(codec, rate, channels=2), messages)
    correlation, lag = alignment(out, speech)
    assert correlation >= LOSSY_MIN_CORRELATION
    overlap = min(len(out) - lag, len(speech))
    level = np.std(out[lag:lag + overlap].astype(float)) / np.std(speech[:overlap].astype(float))
    assert 0.4 < level < 0.6


@pytest.mark.parametrize("channels", [0, 9])
def test_one_to_eight_channels(channels):
    with pytest.raises(UnsupportedFormat):
        decoder_for("pcm16", 16000, channels)


# -- device side -----------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODECS)
def test_message_duration_paces_the_audio(codec):
    rate = default_rate(codec)
    messages = encoded_messages(codec, rate)
    seconds = message_duration(codec, rate)
    audio_seconds = len(reference_pcm()) / RATE
    # The last message is padded to a whole frame, and AAC adds its encoder's 1024-sample priming.
    assert audio_seconds <= len(messages) * seconds <= audio_seconds + 2 * seconds


def test_device_message_shapes():
    assert {len(m) for m in encoded_messages("lc3", 16000)} == {40}
    assert {len(m) for m in encoded_messages("lc3_fs1030", 16000)[:-1]} == {90}
    assert {opus_packet_duration(m) for m in encoded_messages("opus_fs320", 16000)} == {960}
    assert all(m[:2] in (b"\xff\xf1", b"\xff\xf9") for m in encoded_messages("aac", 16000))


# -- construction ----------------------------------------------------------------------------------
async def test_open_decoder_builds_a_working_decoder_the_first_time_and_after():
    for _ in range(2):          # in a thread (libraries loading), then on the loop
        decoder = await open_decoder("lc3_fs1030", 16000, 1)
        assert len(decoder.decode(encoded_messages("lc3_fs1030", 16000)[10])) == 480
    with pytest.raises(UnsupportedFormat):
        await open_decoder("opus", 44100, 1)
    with pytest.raises(UnsupportedFormat):
        await open_decoder("mp3", 16000, 1)


def test_every_declared_rate_either_decodes_or_is_a_bad_parameter():
    accepted = {codec: set() for codec in CODECS}
    for codec in CODECS:
        for rate in SAMPLE_RATES:
            try:
                decoder = decoder_for(codec, rate)
            except UnsupportedFormat:
                continue
            accepted[codec].add(rate)
            decoder.close()
    everything = set(SAMPLE_RATES)
    assert accepted["pcm8"] == accepted["pcm16"] == accepted["aac"] == everything
    assert accepted["opus"] == accepted["opus_fs320"] == set(OPUS_RATES)
    assert accepted["lc3"] == accepted["lc3_fs1030"] == set(LC3_RATES)
