"""The pure parts of offline-recording uploads: WAL file names and frames (``codecs.wal``), the
streaming multipart reader (``gateway.multipart``), and how segments group into conversations
(``conversations.sync_jobs``)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from harken.codecs.wal import (BadSyncFile, FrameCounter, FrameStats, parse_sync_filename, read_frames,
                               sync_filename, wal_bytes)
from harken.conversations.sync_jobs import choose_conversation, group_by_gaps
from harken.gateway.multipart import (MultipartError, MultipartReader, PartData, PartEnd, PartStart, boundary_of,
                                     read_part)

NOW = 1_765_000_000.0


@pytest.mark.parametrize("name, codec, rate, channels, timestamp", [
    ("audio_omidevkit2_opus_16000_1_fs160_1764900000.bin", "opus", 16000, 1, 1764900000.0),
    ("audio_omi_opus_fs320_16000_1_fs320_1764900000.bin", "opus_fs320", 16000, 1, 1764900000.0),
    ("audio_omi_pcm8_8000_1_fs160_1764900000.bin", "pcm8", 8000, 1, 1764900000.0),
    ("audio_omi_lc3_fs1030_16000_2_fs160_1764900000.bin", "lc3_fs1030", 16000, 2, 1764900000.0),
    ("audio_omi_aac_16000_1_fs160_1764900000250.bin", "aac", 16000, 1, 1764900000.25),   # milliseconds
    ("/var/mobile/Documents/audio_omi_pcm16_16000_1_fs160_1764900000.bin", "pcm16", 16000, 1, 1764900000.0),
    ("recording_1764900000.bin", "opus", 16000, 1, 1764900000.0),      # upstream's minimal rule
])
def test_app_file_names_are_read_as_the_app_writes_them(name, codec, rate, channels, timestamp):
    info = parse_sync_filename(name, now=NOW)
    assert (info.codec, info.sample_rate, info.channels, info.timestamp) == (codec, rate, channels, timestamp)


def test_the_name_the_app_gives_a_file_parses_back():
    name = sync_filename("opus_fs320", 16000, 1764900000)
    assert name == "audio_omi_opus_fs320_16000_1_fs320_1764900000.bin"
    assert parse_sync_filename(name, now=NOW).codec == "opus_fs320"


@pytest.mark.parametrize("name, reason", [
    ("audio_omi_opus_16000_1_fs160_1764900000.wav", ".bin"),
    ("audio.bin", "expected audio_"),
    ("audio_omi_opus_16000_3_fs160_1764900000.bin", "channels"),
    ("audio_omi_opus_16000_1_fs160_1600000000.bin", "timestamp"),          # 2020
    (f"audio_omi_opus_16000_1_fs160_{int(NOW) + 86400}.bin", "timestamp"),  # tomorrow
])
def test_a_bad_file_name_says_what_is_wrong(name, reason):
    with pytest.raises(BadSyncFile, match=reason):
        parse_sync_filename(name, now=NOW)


@pytest.mark.parametrize("channels", range(3, 9))
def test_a_file_of_a_multi_leg_call_is_refused_with_the_reason_and_what_to_do(channels):
    """The live socket takes 3–8 channels as channel-prefixed legs; a sync file cannot carry them
    (upstream's files are a device's frames without channel ids, decoded as mono): the refusal
    says so and points to the live socket, instead of only "1 or 2"."""
    name = f"audio_omi_pcm16_16000_{channels}_fs160_1764900000.bin"
    with pytest.raises(BadSyncFile, match=r"without a channel id.*stream such a call live on /v4/listen"):
        parse_sync_filename(name, now=NOW)


@pytest.mark.parametrize("channels", [0, 9])
def test_a_channel_count_no_stream_has_is_refused(channels):
    with pytest.raises(BadSyncFile, match="1 or 2"):
        parse_sync_filename(f"audio_omi_opus_16000_{channels}_fs160_1764900000.bin", now=NOW)


def test_frames_are_read_back_and_a_truncated_tail_is_reported():
    frames = [bytes([i]) * (i + 1) for i in range(20)]
    data = wal_bytes(frames)
    stats = FrameStats()
    assert list(read_frames(io.BytesIO(data), stats)) == frames
    assert (stats.frames, stats.truncated) == (20, False)
    cut = FrameStats()
    assert list(read_frames(io.BytesIO(data[:-3]), cut)) == frames[:-1]
    assert cut.truncated and cut.frames == 19


def test_a_corrupt_length_prefix_stops_framing_and_keeps_what_came_before():
    data = wal_bytes([b"abc", b"defg"]) + (10**6).to_bytes(4, "little") + b"x" * 100
    stats = FrameStats()
    assert list(read_frames(io.BytesIO(data), stats)) == [b"abc", b"defg"]
    assert stats.corrupt_length


@pytest.mark.parametrize("step", [1, 3, 4, 7, 1000])
def test_the_upload_frame_counter_agrees_with_the_reader_whatever_the_chunking(step):
    data = wal_bytes([bytes(n % 50 + 1) for n in range(300)])[:-2]
    counter = FrameCounter()
    for i in range(0, len(data), step):
        counter.feed(data[i:i + step])
    stats = counter.finish()
    reference = FrameStats()
    list(read_frames(io.BytesIO(data), reference))
    assert (stats.frames, stats.truncated) == (reference.frames, True) == (299, True)


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, filename, body in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + body + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize("step", [1, 2, 5, 13, 64, 100000])
def test_the_multipart_reader_gives_each_file_whole_whatever_the_chunking(step):
    first, second = bytes(range(256)) * 5 + b"\r\n--b0undar", b"\r\n\r\n--" * 40
    body = _multipart([("files", "a_1764900000.bin", first), ("note", None, b"hi"),
                       ("files", "b_1764900000.bin", second)])
    reader = MultipartReader(boundary_of("multipart/form-data; boundary=b0undary"))
    files: list[list] = []
    for i in range(0, len(body), step):
        for event in reader.feed(body[i:i + step]):
            if isinstance(event, PartStart):
                files.append([event.filename, b""])
            elif isinstance(event, PartData):
                files[-1][1] += event.data
            else:
                assert isinstance(event, PartEnd)
    reader.close()
    assert files == [["a_1764900000.bin", first], [None, b"hi"], ["b_1764900000.bin", second]]


def test_a_multipart_body_cut_short_or_without_boundary_is_refused():
    with pytest.raises(MultipartError):
        boundary_of("application/octet-stream")
    reader = MultipartReader(b"b0undary")
    reader.feed(_multipart([("files", "a_1764900000.bin", b"x" * 100)])[:60])
    with pytest.raises(MultipartError, match="ended"):
        reader.close()


def test_one_part_of_a_small_body_is_read_with_its_own_content_type():
    """The enrolment upload's reader: the named part whole, with its Content-Type."""
    recording = b"RIFF" + bytes(range(256)) * 3 + b"\r\n--b0undar"
    body = _multipart([("note", None, b"hi"), ("file", "recording.wav", recording)]).replace(
        b'filename="recording.wav"\r\n', b'filename="recording.wav"\r\nContent-Type: audio/wav\r\n', 1)
    content_type = "multipart/form-data; boundary=b0undary"
    assert read_part(body, content_type, "file") == (recording, "audio/wav")
    assert read_part(body, content_type, "note") == (b"hi", "application/octet-stream")
    assert read_part(body, content_type, "missing") is None
    with pytest.raises(MultipartError):
        read_part(body[:40], content_type, "missing")


def test_segments_more_than_the_timeout_apart_make_separate_groups():
    segments = [{"start": s, "end": e} for s, e in [(0, 5), (6, 30), (200, 210), (215, 220), (400, 401)]]
    groups = group_by_gaps(segments, 120)
    assert [[s["start"] for s in g] for g in groups] == [[0, 6], [200, 215], [400]]


def test_a_group_joins_the_conversation_it_starts_in_or_right_after():
    live = SimpleNamespace(started_at=1000.0, finished_at=1100.0, timeout_s=120.0)
    older = SimpleNamespace(started_at=500.0, finished_at=1050.0, timeout_s=120.0)
    assert choose_conversation([older, live], 1050.0) is live            # inside both: the latest start
    assert choose_conversation([older, live], 1210.0) is live            # within the timeout after it
    assert choose_conversation([older, live], 1230.0) is None            # past it
    assert choose_conversation([live], 990.0) is None                    # before it: a conversation of its own


def _thread_nice() -> dict[int, int]:
    """Every thread of this process → its nice value (field 19 of /proc/self/task/TID/stat)."""
    from pathlib import Path

    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        out[int(task.name)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


@pytest.mark.timeout(120)
async def test_the_batch_engine_runs_every_thread_it_starts_at_the_low_priority(tmp_path):
    from harken.config import Settings
    from harken.stt.batch import BatchTranscriber

    before = _thread_nice()
    transcriber = BatchTranscriber(Settings(data_dir=tmp_path), nice=19, threads=1)
    try:
        await transcriber.load()
        decoding, model = await transcriber.decoding_for("en")
        words, _, _ = await transcriber.pool.run(transcriber.decode, [], decoding, model)
        assert words == []
        started = {tid: nice for tid, nice in _thread_nice().items() if tid not in before}
    finally:
        await transcriber.aclose()
    assert transcriber.pool.lowered
    # The pool's thread and the engine's own (CTranslate2) threads: all at nice 19, none at 0.
    assert len(started) >= 2 and set(started.values()) == {19}, started


@pytest.mark.timeout(180)
async def test_uploads_in_another_language_are_decoded_with_the_multilingual_model(tmp_path):
    """Recordings carry no language: ``sync_language`` says which, and ``multi`` identifies it per
    utterance with the multilingual model (tiny.en would turn Spanish into English words)."""
    from harken.audio import Utterance
    from harken.client import read_wav_16k
    from harken.config import Settings
    from harken.stt.batch import BatchTranscriber

    pcm = read_wav_16k(Path(__file__).parent / "data" / "multilingual" / "es_pangrama.wav")
    transcriber = BatchTranscriber(Settings(data_dir=tmp_path), nice=0, threads=1)
    try:
        await transcriber.load()
        english, english_model = await transcriber.decoding_for("en")
        multi, multi_model = await transcriber.decoding_for("multi")
        assert multi.language is None and multi_model is not english_model
        utterance = Utterance(start=0, pcm=pcm, speech_windows=len(pcm) // 512)
        words, _, _ = await transcriber.pool.run(transcriber.decode, [utterance], multi, multi_model)
    finally:
        await transcriber.aclose()
    assert "kiwi" in " ".join(w.text for w in words).lower()
