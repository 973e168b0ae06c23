"""Corrupt frames cost no words: a packet must fit what its stream showed of itself
(harken/codecs/signature.py). Pure rules first, then every codec's decoder with one message of random
bytes, as long as the real one after it, before every tenth message (the hardest case: the size
gives nothing away)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from harken.codecs import DecodeError, decoder_for, default_rate
from harken.codecs.signature import (FEC_LEARN, ConfirmedKinds, Signature, SteadyFlag, SteadySize,
                                     looks_like_random_bytes, opus_fec_flag)

from harken.codecs.encode import encode_for_device

from .codec_samples import CODECS, reference_pcm


def test_the_first_kind_defines_the_stream_and_a_new_kind_must_recur():
    signature = Signature()
    assert signature.admits("a", "f")
    assert not signature.admits("b", "f")          # same family: once more
    assert signature.admits("b", "f")
    assert all(not signature.admits("z", "g") for _ in range(5))   # another family: six times
    assert signature.admits("z", "g")


def test_an_opus_packet_of_a_new_kind_waits_for_the_next_packet_to_confirm_it():
    kinds = ConfirmedKinds()
    assert kinds.check(0x40, b"first", family=0x40) == [b"first"]          # defines the stream
    assert kinds.check(0x70, b"garbage", family=0x70) == []                # held back
    assert kinds.check(0x40, b"next", family=0x40) == [b"next"]            # not confirmed: dropped
    assert kinds.check(0x70, b"switch", family=0x70) == []
    assert kinds.check(0x70, b"again", family=0x70) == [b"switch", b"again"]   # a run: both decoded
    assert kinds.check(0x71, b"code 1", family=0x70) == []                 # 40 ms: packings alternate
    assert kinds.check(0x70, b"code 0", family=0x70) == [b"code 1", b"code 0"]
    assert kinds.check(0x58, b"held", mark=1, family=0x58) == []
    assert kinds.check(0x58, b"later", mark=2, family=0x58) == []          # packets came in between


def test_an_opus_packet_is_confirmed_only_by_one_of_its_configuration_and_duration():
    # A device's 10 ms SILK packets (one TOC, code 0); garbage of that configuration with two
    # frames (code 1: 20 ms) is not confirmed by the device's next packet.
    decoder = decoder_for("opus", 16000)
    packets = encode_for_device(reference_pcm()[:16000], "opus", 16000)
    (toc,) = {p[0] for p in packets}
    assert toc & 3 == 0
    decoder.decode(packets[0])
    with pytest.raises(DecodeError, match="held back"):
        decoder.decode(bytes([toc | 1]) + bytes(range(40)))
    assert len(decoder.decode(packets[1])) == 160          # its own packet only: the garbage is dropped


@pytest.mark.parametrize("codec", ["lc3", "lc3_fs1030"])
def test_short_lc3_frames_with_lsb_mode_are_dropped_before_decoding(codec):
    """No encoder sets LSB mode in a frame this short; half of random frames have the flag."""
    from harken.codecs.lc3 import lsb_mode_flag

    messages = encode_for_device(reference_pcm(), codec, 16000)
    size = 40 if codec == "lc3" else 30
    assert not any(lsb_mode_flag(m[i:i + size], 16000) for m in messages for i in range(0, len(m), size))
    clean, dirty = decoder_for(codec, 16000), decoder_for(codec, 16000)
    rng = random.Random(3)
    for index, message in enumerate(messages):
        if index % 10 == 5:
            garbage = bytearray(rng.randbytes(len(message)))
            for end in range(size, len(garbage) + 1, size):
                garbage[end - 2] |= 0x01        # 16 kHz: the flag is bit 8 from a frame's end
            with pytest.raises(DecodeError, match="LSB mode"):
                dirty.decode(bytes(garbage))
        assert np.array_equal(_step(dirty, message), _step(clean, message)), index


def _step(decoder, message: bytes) -> np.ndarray:
    """One message's audio; none for one held back (it comes with the next)."""
    try:
        return decoder.decode(message)
    except DecodeError as exc:
        assert "held back" in str(exc), exc
        return np.zeros(0, np.int16)


def test_a_refused_lc3_message_leaves_no_trace_in_the_decoder():
    """Three frames: the first decodes (into the decoder's state), the second is invalid (its
    last non-zero line past the spectrum), so the message is refused, and undone: the messages
    after it decode exactly as if it had never come."""
    messages = encode_for_device(reference_pcm(), "lc3_fs1030", 16000)
    clean, dirty = decoder_for("lc3_fs1030", 16000), decoder_for("lc3_fs1030", 16000)
    for index, message in enumerate(messages):
        if index % 10 == 5:
            invalid = bytearray(messages[index - 3][30:60])
            invalid[-1] |= 0xFE
            with pytest.raises(DecodeError, match="corrupt"):
                dirty.decode(messages[index - 4][:30] + bytes(invalid) + messages[index - 2][:30])
        assert np.array_equal(_step(dirty, message), _step(clean, message)), index


def _plain_liblc3(messages: list[bytes], frame_bytes: int) -> np.ndarray:
    """Every frame through liblc3 itself, with no checks: what a device's frames decode to."""
    import lc3

    decoder = lc3.Decoder(10000, 16000)
    return np.concatenate([np.frombuffer(decoder.decode(m[i:i + frame_bytes], bit_depth=16), "<i2")
                           for m in messages for i in range(0, len(m), frame_bytes)])


def _decoded(decoder, messages: list[bytes]) -> tuple[np.ndarray, list[str]]:
    out, refusals = [], []
    for message in messages:
        try:
            out.append(decoder.decode(message))
        except DecodeError as exc:
            refusals.append(str(exc))
    out.append(decoder.flush())
    return np.concatenate(out), refusals


@pytest.mark.parametrize("codec, frame_bytes", [("lc3", 40), ("lc3_fs1030", 30)])
def test_lc3_frames_that_liblc3_takes_but_whose_bits_it_never_reads_are_random_bytes(codec, frame_bytes):
    """An encoder leaves the bits it does not need zero; random bytes that liblc3 takes for a
    frame leave random bits unread in the middle. Clearing the probed byte and decoding again
    tells them apart: a device's frames all decode exactly as liblc3 decodes them, with speech
    starting from silence (its loudness jumps, held until the next frame confirms it)."""
    speech = np.concatenate([np.zeros(4000, np.int16), np.tile(reference_pcm(), 3), np.zeros(4000, np.int16)])
    messages = encode_for_device(speech, codec, 16000)
    clean, _ = _decoded(decoder_for(codec, 16000), messages)
    assert np.array_equal(clean, _plain_liblc3(messages, frame_bytes))
    rng = random.Random(codec)
    taken = unread = 0
    decoder = decoder_for(codec, 16000)
    for index, message in enumerate(messages):
        if index % 4 == 3:
            for _ in range(3):
                try:
                    decoder.decode(rng.randbytes(frame_bytes))        # one frame (lc3_fs1030 takes any count)
                    taken += 1
                except DecodeError as exc:
                    if "never reads" in str(exc):
                        taken, unread = taken + 1, unread + 1
                    elif "held back" in str(exc):
                        taken += 1                    # passed the probe: the gain rule holds it
                    # else: liblc3's own check, or another rule (LSB mode, LTPF), before the probe
        try:
            decoder.decode(message)
        except DecodeError as exc:
            assert "held back" in str(exc), exc
    assert taken >= 20 and unread >= 0.6 * taken, (taken, unread)


@pytest.mark.parametrize("rate", [16000, 48000])
def test_lc3_device_frames_of_every_size_decode_exactly_as_liblc3_decodes_them(rate):
    """None of the rules (probe, LTPF, gain) refuses or changes a device's frame, from the
    shortest frames to LSB-mode ones (liblc3's encoder through lc3py, as a device's)."""
    import lc3
    import soxr

    speech = np.concatenate([np.zeros(2000, np.int16), reference_pcm(), np.zeros(2000, np.int16)])
    speech = speech if rate == 16000 else soxr.resample(speech, 16000, rate).astype(np.int16)
    n = rate // 100
    for size in (20, 60, 80, 120, 400):
        encoder = lc3.Encoder(10000, rate)
        frames = [encoder.encode(speech[i:i + n].tobytes(), size, bit_depth=16)
                  for i in range(0, len(speech) - n + 1, n)]
        decoded, refusals = _decoded(decoder_for("lc3", rate), frames)
        plain = lc3.Decoder(10000, rate)
        expected = np.concatenate([np.frombuffer(plain.decode(f, bit_depth=16), "<i2") for f in frames])
        if rate != 16000:                      # the gateway resamples to 16 kHz: compare before that
            decoder = decoder_for("lc3", rate)
            decoder._resampler.process = lambda pcm: pcm        # noqa: E731 (the decoder's own output)
            decoder._resampler.flush = lambda: np.zeros(0, np.int16)   # noqa: E731
            decoded, refusals = _decoded(decoder, frames)
        assert np.array_equal(decoded, expected), size
        assert all("held back" in r for r in refusals), (size, refusals)


def test_an_lc3_frame_whose_loudness_jumps_and_comes_straight_back_is_dropped():
    """A valid frame out of place (a silent one amid speech: its global gain ~150 steps below its
    neighbours', as random bytes' gain mostly is) passes liblc3 and the probe; it is held back
    and dropped when the next frame is as loud as the ones before it, and the stream decodes
    exactly as without it. Speech that starts or stops holds one frame for 10 ms and loses none."""
    from harken.codecs.lc3 import global_gain

    speech = np.concatenate([np.zeros(3200, np.int16), reference_pcm(), np.zeros(3200, np.int16)])
    messages = encode_for_device(speech, "lc3", 16000)
    silent, loud = messages[5], next(i for i, m in enumerate(messages) if global_gain(m, 16000) > 150) + 30
    assert global_gain(silent, 16000) == 0 and global_gain(messages[loud], 16000) > 100
    clean, held = _decoded(decoder_for("lc3", 16000), messages)
    assert np.array_equal(clean, _plain_liblc3(messages, 40)) and held   # onsets held, then decoded
    dirty, refusals = _decoded(decoder_for("lc3", 16000), messages[:loud] + [silent] + messages[loud:])
    assert np.array_equal(dirty, clean)
    assert len(refusals) == len(held) + 1 and any("held back" in r for r in refusals)


def test_an_lc3_frame_louder_than_its_neighbours_by_more_than_a_device_ever_is_dropped():
    """The harmful random bytes are the loud ones: a burst of noise at or above the speech around
    it. A valid frame of the same stream, 40-60 steps (28-43 dB) louder than the frames around
    the place it is put (a device's frame never stands out by more than 33 steps: see
    GAIN_JUMP), is held back and dropped when the next frame comes back down, and the stream
    decodes exactly as without it, at every such place."""
    from harken.codecs.lc3 import side_info

    quiet = (reference_pcm() * 0.05).astype(np.int16)           # 26 dB down: 36 steps quieter
    speech = np.concatenate([np.zeros(3200, np.int16), quiet, reference_pcm(), np.zeros(3200, np.int16)])
    messages = encode_for_device(speech, "lc3", 16000)
    sides = [side_info(m, 16000) for m in messages]
    clean, _ = _decoded(decoder_for("lc3", 16000), messages)
    places = 0
    for at in range(3, len(messages) - 1, 3):
        around = [sides[k].gain for k in (at - 2, at - 1, at)]
        if max(around) - min(around) > 10 or sides[at].ltpf_active or not sides[at - 1].pitch:
            continue          # a steady stretch; the frame after the place needs no pitch before it
        loud = next((m for m, side in zip(messages, sides) if 40 <= side.gain - max(around) <= 60
                     and not side.ltpf_active), None)
        if loud is None:
            continue
        dirty, refusals = _decoded(decoder_for("lc3", 16000), messages[:at] + [loud] + messages[at:])
        assert np.array_equal(dirty, clean), at
        assert any("held back" in r for r in refusals)
        places += 1
    assert places >= 5, places


def test_an_opus_stream_without_fec_drops_packets_with_the_fec_flag_and_one_with_fec_keeps_them():
    flag = SteadyFlag()
    clean, flagged = bytes([0x40, 0x10, 1, 2]), bytes([0x40, 0x50, 1, 2])
    assert flag.admits(flagged)                       # not learned yet: nothing is checked
    for _ in range(FEC_LEARN):
        assert flag.admits(clean)
        flag.note(clean)
    assert not flag.admits(flagged)                   # random bytes with the stream's TOC: half are
    # An encoder whose FEC comes on: its flagged packets recur and are admitted, then never checked.
    admitted = []
    for _ in range(5):
        admitted.append(flag.admits(flagged))
        if admitted[-1]:
            flag.note(flagged)
    assert admitted == [False, False, True, True, True]
    # Through the decoder: a device's packets, then one with its TOC and the flag set.
    decoder = decoder_for("opus", 16000)
    packets = encode_for_device(reference_pcm(), "opus", 16000)
    assert not any(opus_fec_flag(p) for p in packets)
    for packet in packets[:FEC_LEARN]:
        decoder.decode(packet)
    with pytest.raises(DecodeError, match="FEC"):
        decoder.decode(bytes([packets[0][0], 0x40 | packets[0][1]]) + packets[0][2:])


def test_sightings_of_random_kinds_never_add_up():
    signature = Signature(window=32)
    signature.admits("device", "f")
    rng = random.Random(1)
    admitted = sum(signature.admits(rng.randrange(256), rng.randrange(256)) for _ in range(20000))
    assert admitted == 0


def test_steady_sizes_are_checked_and_a_piped_file_is_not():
    device = SteadySize(unit=2)
    assert all(device.admits(320) for _ in range(25))
    assert not device.admits(77) and not device.admits(640)
    assert device.admits(244)                      # a device's last message: shorter, whole samples
    piped = SteadySize()
    assert all(piped.admits(size) for size in [4096, 4096, 1000, 77, 4096, 3])


def test_random_bytes_read_as_samples_are_told_from_sound():
    rng = np.random.default_rng(0)
    for n in (80, 160, 441):
        assert all(looks_like_random_bytes(np.frombuffer(rng.bytes(2 * n), "<i2")) for _ in range(50))
    speech = reference_pcm()
    frames = [speech[i:i + 160] for i in range(0, len(speech) - 160, 160)]
    assert not any(looks_like_random_bytes(f) for f in frames)
    loud = np.clip(speech.astype(np.int32) * 8, -32768, 32767).astype(np.int16)   # clipped speech
    assert not any(looks_like_random_bytes(loud[i:i + 160]) for i in range(0, len(loud) - 160, 160))
    # Loud and flat but not white: a signal alternating between two levels (the fake providers'
    # timecode, a tone at half the Nyquist rate) is correlated at lag 2.
    alternating = np.tile(np.array([24000, -3], dtype=np.int16), 800)
    assert not looks_like_random_bytes(alternating)


def _with_garbage(messages: list[bytes], seed: str) -> tuple[list[bytes], set[int]]:
    rng = random.Random(seed)
    mixed, garbage = [], set()
    for index, message in enumerate(messages):
        if index % 10 == 9:
            garbage.add(len(mixed))
            mixed.append(rng.randbytes(len(message)))
        mixed.append(message)
    return mixed, garbage


@pytest.mark.parametrize("codec", CODECS)
def test_random_bytes_at_ten_percent_are_dropped_and_every_real_message_is_kept(codec):
    rate = default_rate(codec)
    speech = np.tile(reference_pcm(), 5)                     # 10 s: 100 garbage messages
    messages = encode_for_device(speech, codec, rate)
    mixed, garbage = _with_garbage(messages, codec)
    decoder = decoder_for(codec, rate)
    passed_levels, lost = [], 0
    for index, message in enumerate(mixed):
        try:
            pcm = decoder.decode(message)
        except DecodeError as exc:
            lost += index not in garbage and "held back" not in str(exc)   # a held one comes with the next
            continue
        if index in garbage:
            passed_levels.append(float(np.sqrt(np.mean(pcm.astype(float) ** 2))) if len(pcm) else 0.0)
    assert lost <= 1, lost                          # a device's own messages are kept (the last may be short)
    # lc3: one 40-byte frame per message, of the device's length: liblc3's corrupt-frame report,
    # the LSB-mode rule, the probe for unread bits and the gain rule leave about 3 % (2.5 % here).
    assert len(passed_levels) <= 0.06 * len(garbage), (len(passed_levels), len(garbage))


def test_random_bytes_let_through_cost_a_pitched_stretch_after_them_one_frame_at_most():
    """The LTPF rule refuses a frame with LTPF on after two frames without a pitch. Two copies of
    one random frame (the fuzzer's: the first held for its gain, the second, close to it, confirms
    it) put two pitchless frames in the decoder's history; the device's frames after them are a
    pitched stretch with LTPF on, and each was refused against that history, 50 ms in a row
    here. A frame refused by the rule with a pitch now counts as the pitched frame before the
    next, so the stretch loses one frame."""
    from .codec_samples import encoded_messages

    garbage = bytes.fromhex("1020001000000080000080002000000000000000110000000040000000000000"
                            "0a093e52a3400001")
    messages = encoded_messages("lc3", 16000)
    half = len(messages) // 2
    decoder = decoder_for("lc3", 16000)
    for message in messages[:half]:
        _step(decoder, message)
    for _ in range(2):
        try:
            decoder.decode(garbage)
        except DecodeError:
            pass
    refused = []
    for index, message in enumerate(messages[half:half + 20]):
        try:
            decoder.decode(message)
        except DecodeError as exc:
            if "held back" not in str(exc):
                refused.append(index)
    assert refused == [0], refused


@pytest.mark.parametrize("codec, rate", [("lc3", 16000), ("lc3_fs1030", 16000), ("lc3", 48000)])
def test_the_native_probe_decodes_and_refuses_exactly_as_the_python_path(codec, rate):
    """Mono LC3 frames take the probe in one native call (harken/native/lc3_probe.c) when it is
    built; the Python path, for builds without it, must give the same audio and the same
    refusals: a device's frames with random bytes before every tenth message."""
    from harken import native

    if native.lc3_probe is None:
        pytest.skip("harken.native not built (python -m harken.native.build)")
    speech = np.concatenate([np.zeros(3200, np.int16), np.tile(reference_pcm(), 3), np.zeros(3200, np.int16)])
    mixed, garbage = _with_garbage(encode_for_device(speech, codec, rate), codec + "native")
    in_c, in_python = decoder_for(codec, rate), decoder_for(codec, rate)
    assert in_c._native[0] is not None
    in_python._native = (None, None)
    outcomes = {"c": [], "python": []}
    for decoder, seen in ((in_c, outcomes["c"]), (in_python, outcomes["python"])):
        for message in mixed:
            try:
                seen.append(decoder.decode(message).tobytes())
            except DecodeError as exc:
                seen.append(str(exc))
        seen.append(decoder.flush().tobytes())
    assert outcomes["c"] == outcomes["python"]
    refused = [i for i, o in enumerate(outcomes["c"][:-1]) if isinstance(o, str) and "held back" not in o]
    assert set(refused) <= garbage and len(refused) >= 0.9 * len(garbage)
