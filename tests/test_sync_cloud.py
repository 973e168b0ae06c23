"""Uploads (``POST /v1/sync-local-files``) transcribed through a cloud provider's pre-recorded API.

A running server on loopback talks to protocol-faithful fakes of Deepgram's ``POST /v1/listen``,
Soniox's async file transcription and Speechmatics' batch jobs (``fakes.recorded``) through the
real clients. The fakes hear the audio they are sent: the recording is known to them, so they
report the words of the stretches they got, timed on the clip, as a real engine would. The app's
``pcm16`` files carry the recording's exact samples, so what the server sends can be placed.
"""

from __future__ import annotations

import collections
import functools
import re
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest

from harken.audio.diarization import labelling_accuracy
from harken.client import read_wav_16k
from harken.wer import wer

from .conftest import load_audio, transcripts
from .fakes.recorded import FakeDeepgramRecorded, FakeSonioxRecorded, FakeSpeechmaticsRecorded, RecordedEar
from .fakes.recording import Joined, dithered, speech_with_pauses
from .fakes.script import ScriptWord
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
        listed = await conversations(client, server, uid)
        assert len(listed) == 1, (status, listed)
        (conversation,) = listed
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


TERMS = ["Zyxelia", "Harken gateway", "Omi"]


@pytest.mark.parametrize("name", ["deepgram", "soniox", "speechmatics"])
async def test_an_upload_is_transcribed_with_the_users_vocabulary_as_a_live_stream_is(make_gateway, name):
    """The terms of ``/v1/users/transcription-preferences`` reach each pre-recorded API under its own
    name (Deepgram ``keyterm`` on nova-3, Soniox ``context.terms``, Speechmatics
    ``additional_vocab``), as they reach the live streams; a user without terms sends none."""
    joined = recording()
    ear = RecordedEar(joined.recording, joined.script)
    fake = await fake_for(name, ear).start()
    try:
        server = make_gateway(stt_chain=f"{CHAIN_ENTRY[name]},local", **settings_for(name, fake), **FAST)
        uid = f"terms-{uuid.uuid4().hex[:6]}"
        async with httpx.AsyncClient(timeout=60) as client:
            saved = await client.patch(f"{server.http}/v1/users/transcription-preferences",
                                       headers=headers(server, uid), json={"vocabulary": TERMS})
            assert saved.status_code == 200, saved.text
        status, _ = await sync_one(server, uid, joined.recording, int(time.time()) - DAY)
        assert status["status"] == "completed" and status["transcribed_by"] == [name], status
        await sync_one(server, f"plain-{uuid.uuid4().hex[:6]}", joined.recording[16000:], int(time.time()) - DAY)
    finally:
        await fake.stop()
    if name == "deepgram":
        with_terms, without = (parse_qs(r.raw_query) for r in fake.requests if r.path == "/v1/listen")
        assert with_terms["keyterm"] == TERMS and with_terms["model"] == ["nova-3"]
        assert "keyterm" not in without and "keywords" not in without
    elif name == "soniox":
        with_terms, without = fake.configs
        assert with_terms["context"] == {"terms": TERMS}
        assert not without.get("context")
    else:
        with_terms, without = (c["transcription_config"] for c in fake.configs)
        assert with_terms["additional_vocab"] == [{"content": term} for term in TERMS]
        assert "additional_vocab" not in without


def conversation_recording(name: str) -> Joined:
    """A real two-person call (tests/data/conversations, see its SOURCES.md), dithered so the fakes
    can place what they are sent, and a script of one word ("w0", "w1", ...) per 0.4 s of each
    speaker's turns in its reference (RTTM), under that speaker's number (in order of first turn); a
    turn's last word ends a sentence."""
    folder = Path(__file__).parent / "data" / "conversations"
    turns = [(float(f[3]), float(f[3]) + float(f[4]), f[7])
             for f in (line.split() for line in (folder / f"{name}.rttm").read_text().splitlines() if line.strip())]
    speakers: dict[str, int] = {}
    timed = []
    for start, end, who in turns:
        speaker = speakers.setdefault(who, len(speakers))
        count = max(1, int((end - start) / 0.4))
        step = (end - start) / count
        timed += [(start + k * step, start + (k + 1) * step - 0.05, speaker, k == count - 1) for k in range(count)]
    timed.sort()
    # A turn ends a sentence, so that the segment rules end its segment there.
    script = [ScriptWord(f"w{n}" + ("." if last else ""), round(a, 3), round(b, 3), speaker)
              for n, (a, b, speaker, last) in enumerate(timed)]
    return Joined(dithered(read_wav_16k(folder / f"{name}.wav")), script, [(a, b) for a, b, _ in turns])


async def test_speakers_keep_their_numbers_across_the_clips_of_an_upload(make_gateway):
    """A two-person call of 160 s (real audio) sent to Deepgram in clips of ~30 s of recording: the
    fake, as a real provider, numbers the speakers of every request afresh in the order they speak.
    The server links each clip's speakers to the recording's by voice: the conversation has two
    speakers, and its words are under the right one as often as when the whole call goes in one
    request (the segment rules put some words of overlapping speech under the other speaker
    either way)."""
    joined = conversation_recording("call_autorepair_b")
    truth = {words_of(word.text)[0]: word.speaker for word in joined.script}
    results = {}
    for clip_seconds in (600, 30):
        ear = RecordedEar(joined.recording, joined.script)
        deepgram = await FakeDeepgramRecorded(ear, KEY).start()
        try:
            server = make_gateway(stt_chain="dg-nova-3,local", sync_cloud_clip_seconds=clip_seconds,
                                  **settings_for("deepgram", deepgram), **FAST)
            status, conversation = await sync_one(server, f"clips-{uuid.uuid4().hex[:6]}", joined.recording,
                                                  int(time.time()) - DAY)
        finally:
            await deepgram.stop()
        assert status["status"] == "completed" and status["transcribed_by"] == ["deepgram"], status
        said = [(w, s["speaker_id"]) for s in conversation["transcript_segments"] for w in words_of(s["text"])]
        assert len(said) > 200
        labels = [label for _, label in said]
        results[clip_seconds] = (deepgram.transcriptions, len(set(labels)),
                                 labelling_accuracy(labels, [truth[w] for w, _ in said]), ear.numberings)
    (whole_requests, whole_speakers, whole_accuracy, _), (requests, speakers, accuracy, numberings) = results.values()
    assert whole_requests == 1 and whole_speakers == 2
    assert requests >= 4
    # The provider's numbers did restart: in some clip the caller (not the agent) was speaker 0.
    assert any(numbering.get(1) == 0 for numbering in numberings), numberings
    assert speakers == 2, results
    assert accuracy >= whole_accuracy - 0.02, results
