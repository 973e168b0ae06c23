"""Uploads (``POST /v1/sync-local-files``) transcribed through a cloud provider's pre-recorded API.

A running server on loopback talks to protocol-faithful fakes of Deepgram's ``POST /v1/listen``,
Soniox's async file transcription and Speechmatics' batch jobs (``fakes.recorded``) through the
real clients. The fakes hear the audio they are sent: the recording is known to them, so they
report the words of the stretches they got, timed on the clip, as a real engine would. The app's
``pcm16`` files carry the recording's exact samples, so what the server sends can be placed.
"""

from __future__ import annotations

import functools
import re
import time
import uuid

import httpx
import pytest

from harken.wer import wer

from .conftest import load_audio, transcripts
from .fakes.recorded import FakeDeepgramRecorded, FakeSonioxRecorded, FakeSpeechmaticsRecorded, RecordedEar
from .fakes.recording import Joined, speech_with_pauses
from .test_sync import conversations, headers, upload, wait_done, wal_file, wall

pytestmark = pytest.mark.timeout(300)

KEY = "test-key"
FILES = ["ss_0870.wav", "ss_0880.wav", "ss_0890.wav", "ss_0920.wav", "ss_0930.wav"]
DAY = 86400
TIME_TOLERANCE = 0.15
PAUSE = 4.0


@functools.cache
def recording() -> Joined:
    """Five real read-speech clips, 4 s of room noise after each (~45 s: mostly not speech)."""
    reference = {row["file"]: row["reference"] for row in transcripts()}
    return speech_with_pauses([(load_audio(name), reference[name]) for name in FILES], PAUSE)


def words_of(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def fake_for(name: str, ear: RecordedEar, key: str = KEY):
    return {"deepgram": FakeDeepgramRecorded, "soniox": FakeSonioxRecorded,
            "speechmatics": FakeSpeechmaticsRecorded}[name](ear, key)


def settings_for(name: str, fake) -> dict:
    if name == "deepgram":
        return {"deepgram_api_key": KEY, "deepgram_url": fake.url}
    if name == "soniox":
        return {"soniox_api_key": KEY, "soniox_api_url": fake.api_url}
    return {"speechmatics_api_key": KEY, "speechmatics_batch_url": fake.batch_url}


CHAIN_ENTRY = {"deepgram": "dg-nova-3", "soniox": "soniox", "speechmatics": "speechmatics"}
FAST = {"sync_cloud_poll": 0.05, "stt_retry_base": 0.05}


async def sync_one(server, uid: str, pcm, timestamp: int) -> tuple[dict, dict]:
    """Upload one pcm16 file of ``pcm``; the finished job and the one conversation it made."""
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await upload(client, server, uid, [wal_file(pcm, "pcm16", 16000, timestamp)])
        assert answer.status_code == 200, answer.text
        status = await wait_done(client, server, uid, answer.json()["job_id"], timeout=240)
        (conversation,) = await conversations(client, server, uid)
    return status, conversation


def assert_words_and_times(conversation: dict, joined: Joined, timestamp: int) -> None:
    """Every scripted word once, in order, and each segment where its first word was recorded."""
    segments = sorted(conversation["transcript_segments"], key=lambda s: s["start"])
    said = [w for s in segments for w in words_of(s["text"])]
    assert said == [w for word in joined.script for w in words_of(word.text)]
    started = wall(conversation["started_at"])
    position = 0
    for segment in segments:
        first = joined.script[position]
        assert abs(started + segment["start"] - (timestamp + first.start)) < TIME_TOLERANCE, (segment, first)
        position += len(words_of(segment["text"]))


@pytest.mark.parametrize("name", ["deepgram", "soniox", "speechmatics"])
async def test_an_upload_is_transcribed_by_the_configured_cloud_provider_with_its_words_at_their_times(
        make_gateway, name):
    joined = recording()
    ear = RecordedEar(joined.recording, joined.script)
    fake = await fake_for(name, ear).start()
    try:
        server = make_gateway(stt_chain=f"{CHAIN_ENTRY[name]},local", **settings_for(name, fake), **FAST)
        timestamp = int(time.time()) - DAY
        status, conversation = await sync_one(server, f"cloud-{uuid.uuid4().hex[:6]}", joined.recording, timestamp)
    finally:
        await fake.stop()
    assert status["status"] == "completed" and status["processed_files"] == 1, status
    assert status["transcribed_by"] == [name]
    assert_words_and_times(conversation, joined, timestamp)
    # Only the speech went out (the VAD's utterances), in one request: most of the pauses were not sent.
    assert fake.transcriptions == 1
    assert ear.seconds_heard < joined.seconds - 0.5 * PAUSE * len(FILES), (ear.seconds_heard, joined.seconds)
    # Two speakers in the script (utterances alternate): the provider's diarization is kept.
    assert len({s["speaker_id"] for s in conversation["transcript_segments"]}) == 2
    if name == "deepgram":
        query = fake.requests[-1].query
        assert query["model"] == "nova-3" and query["language"] == "en"
        assert query["diarize"] == "true" and query["punctuate"] == "true"
    elif name == "soniox":
        (config,) = fake.configs
        assert config["model"] == "stt-async-v5" and config["language_hints"] == ["en"]
        assert config["enable_speaker_diarization"] is True
        assert fake.files == {} and fake.jobs == {}            # the audio was deleted at the provider
    else:
        (config,) = fake.configs
        assert config["transcription_config"]["language"] == "en"
        assert config["transcription_config"]["diarization"] == "speaker"
        assert fake.jobs == {}                                 # the job (and its audio) was deleted


async def test_a_failing_provider_is_retried_then_the_next_one_in_the_chain_transcribes(make_gateway):
    """Deepgram answers 503 every time (retried, then left), Soniox refuses the key (401: not
    retried), Speechmatics rejects the first job and does the second: its words are stored."""
    joined = recording()
    ear = RecordedEar(joined.recording, joined.script)
    deepgram = await FakeDeepgramRecorded(ear, KEY).start()
    soniox = await FakeSonioxRecorded(ear, "another-key").start()
    speechmatics = await FakeSpeechmaticsRecorded(ear, KEY).start()
    deepgram.plans = [503, 503, 503]
    speechmatics.plans = ["job_error"]
    try:
        server = make_gateway(stt_chain="dg-nova-3,soniox,speechmatics,local", stt_retry_attempts=3,
                              **settings_for("deepgram", deepgram), **settings_for("soniox", soniox),
                              **settings_for("speechmatics", speechmatics), **FAST)
        timestamp = int(time.time()) - DAY
        status, conversation = await sync_one(server, f"failover-{uuid.uuid4().hex[:6]}", joined.recording,
                                              timestamp)
    finally:
        for fake in (deepgram, soniox, speechmatics):
            await fake.stop()
    assert status["status"] == "completed" and status["processed_files"] == 1, status
    assert deepgram.transcriptions == 3                      # stt_retry_attempts tries, then the next link
    assert len(soniox.requests) == 1                         # a refused key is not tried again
    assert speechmatics.transcriptions == 2 and speechmatics.jobs == {}
    assert status["transcribed_by"] == ["speechmatics"]
    assert_words_and_times(conversation, joined, timestamp)


async def test_when_every_cloud_provider_fails_the_embedded_engine_transcribes_the_upload(make_gateway):
    joined = recording()
    reference = " ".join(w.text for w in joined.script)
    ear = RecordedEar(joined.recording, joined.script)
    deepgram = await FakeDeepgramRecorded(ear, KEY).start()
    deepgram.plans = [500, 500]
    try:
        server = make_gateway(stt_chain="dg-nova-3,local", stt_retry_attempts=2,
                              **settings_for("deepgram", deepgram), **FAST)
        status, conversation = await sync_one(server, f"down-{uuid.uuid4().hex[:6]}", joined.recording,
                                              int(time.time()) - DAY)
    finally:
        await deepgram.stop()
    assert deepgram.transcriptions == 2
    assert status["status"] == "completed" and status["processed_files"] == 1, status
    assert status["transcribed_by"] == ["local"]
    text = " ".join(s["text"] for s in sorted(conversation["transcript_segments"], key=lambda s: s["start"]))
    assert wer([(reference, text)]) < 0.25, text


async def test_the_owner_is_recognised_in_a_cloud_transcribed_upload_as_in_a_live_cloud_stream(make_gateway):
    """Deepgram diarizes (its speaker numbers); the server matches each speaker's voice with the
    owner's enrolled one, as a live session on a cloud provider does."""
    from .test_speech_profile import OWNER, STRANGER, enrolment, utterance, wav_bytes

    turns = [(OWNER, 3), (STRANGER, 3), (OWNER, 4), (STRANGER, 4), (OWNER, 5)]
    texts = {OWNER: "mine was the voice one two three four five six seven",
             STRANGER: "theirs was the other voice eight nine ten eleven twelve"}
    joined = speech_with_pauses([(utterance(who, i), texts[who]) for who, i in turns], 1.5)
    ear = RecordedEar(joined.recording, joined.script)
    deepgram = await FakeDeepgramRecorded(ear, KEY).start()
    try:
        server = make_gateway(stt_chain="dg-nova-3,local", **settings_for("deepgram", deepgram), **FAST)
        uid = f"owner-{uuid.uuid4().hex[:6]}"
        async with httpx.AsyncClient(timeout=60) as client:
            put = await client.put(f"{server.http}/v1/users/speech-profile", headers=headers(server, uid),
                                   content=wav_bytes(enrolment(OWNER, (0, 1, 2))))
            assert put.status_code == 200, put.text
        status, conversation = await sync_one(server, uid, joined.recording, int(time.time()) - DAY)
    finally:
        await deepgram.stop()
    segments = conversation["transcript_segments"]
    assert status["transcribed_by"] == ["deepgram"]
    owner = [s for s in segments if "mine" in s["text"].lower()]
    other = [s for s in segments if "theirs" in s["text"].lower()]
    assert len(owner) == 3 and len(other) == 2, [s["text"] for s in segments]
    assert all(s["is_user"] for s in owner), owner
    assert not any(s["is_user"] for s in other), other
