"""Voices the gateway knows: the owner's speech profile and the people a user has named.

REST (same bearer token as the rest of /v1; another user's person is reported as missing):

- ``PUT /v1/users/speech-profile``: the body is a WAV file (PCM16, any rate, mono or stereo), or
  raw PCM16 mono with ``Content-Type: application/octet-stream`` (16 kHz unless
  ``?sample_rate=``). Silence is trimmed off with the Silero VAD; 10–60 s of speech must remain
  (422 says how much was found). The speech is embedded off the event loop and only the
  embedding is stored: the audio is never kept. ``GET`` → ``{exists, speech_seconds,
  created_at, updated_at}``; ``DELETE`` → 204.
- ``POST /v1/people`` with JSON ``{"name": "…", "samples": ["<base64 WAV>", …]}`` (samples
  optional, at most ``MAX_SAMPLES_PER_REQUEST``) → 201 with the person; ``GET /v1/people``,
  ``GET``/``DELETE /v1/people/{id}``; ``POST /v1/people/{id}/speech-samples`` with a WAV (or raw
  PCM, as above) adds one voice sample. A person's voice is the mean of its samples' embeddings,
  weighted by their speech seconds. A person without a sample is stored but never matched.
- Bodies above ``MAX_AUDIO_BYTES`` (``MAX_JSON_BYTES`` for the JSON form) → 413.
- The Omi app's calls, in the upstream backend's shapes: ``POST /v3/upload-audio`` (multipart,
  the recording in ``file``; errors are 400 with a ``detail``; speech past 60 s is cut to its
  first 60 s), ``GET /v3/speech-profile`` → ``{has_profile}``, ``GET /v4/speech-profile`` →
  ``{url: null}`` (no audio is kept); people also at ``/v1/users/people`` (created with 200, as
  upstream), with ``PATCH /v1/users/people/{id}/name?value=``.

Sessions opened with ``include_speech_profile=true`` get the voices once, before audio flows (read
with their conversation, ``voices_from_stored``; ``load_voices`` without a conversation service),
and give them to their ``SpeakerIdentifier``. A profile changed meanwhile applies
from the next session on. ``speech_profile_processed`` stays true on every segment, as in Omi's
current backend (reference/omi-listen-behaviour.md §5, "VC"): identification is per diarized
speaker and relabels that speaker's earlier segments (same ids, re-sent) when it matches, so a
segment never waits for it; false would also stop such segments merging with later ones and make
the Omi app ignore ``speaker_assigned`` for them.

Enrolment embeds on the embedder's one worker thread, which live sessions' identification shares:
a 60 s profile holds it for roughly 0.5–2 s (bench/bench_speakers.py ``--only enrol``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import time
import uuid
import wave
from dataclasses import dataclass
from typing import Callable

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..audio.embedding import SAMPLE_RATE
from ..audio.speaker_models import SpeakerModel, model_named
from ..audio.vad import speech_spans
from ..codecs import DecodeError, UnsupportedFormat
from ..codecs.pcm import PCM16Decoder
from ..conversations.model import iso
from ..conversations.queries import AppQueries
from ..conversations.store import PersonRow, Store, Voices
from .auth import Authenticator
from .multipart import MultipartError, read_part
from .rest import _BadRequest, _error, authentication, json_object

log = logging.getLogger("harken.profiles")

# The owner's profile: under 10 s of speech the embedding is noticeably less stable; Omi streams
# at most 30 s of its profile, and a minute is plenty while keeping one enrolment's CPU small.
MIN_PROFILE_SPEECH_SECONDS = 10.0
MAX_PROFILE_SPEECH_SECONDS = 60.0
# A person's sample is typically cut from a conversation, so it may be shorter; several samples
# are averaged. 5 s is about two of the 2 s clips the owner threshold was calibrated on.
MIN_SAMPLE_SPEECH_SECONDS = 5.0
MAX_SAMPLES_PER_REQUEST = 5
MAX_PEOPLE = 200
MAX_NAME_CHARS = 200
# 60 s of 48 kHz stereo PCM16 is 11.5 MB: the largest sensible upload (silence included).
MAX_AUDIO_BYTES = 12 * 1024 * 1024
MAX_JSON_BYTES = MAX_AUDIO_BYTES * 4 // 3 + 64 * 1024        # one such sample as base64, plus the rest
RAW_PCM_TYPE = "application/octet-stream"
MULTIPART_SLACK = 64 * 1024             # a multipart body's headers and boundaries around the file
APP_PEOPLE = "/v1/users/people"         # the app's path for people (``/v1/people`` stays)
_VOICE_WRITE_TRIES = 5


class UploadError(Exception):
    """An upload that cannot become a voice; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class Voice:
    embedding: np.ndarray          # (dimension of the model,) float32, unit length
    speech_seconds: float


# --- audio → voice ----------------------------------------------------------------------------

def decode_upload(body: bytes, content_type: str, sample_rate: int | None = None) -> np.ndarray:
    """An uploaded clip as int16 16 kHz mono: a WAV file (recognised by its header, whatever the
    content type says) or raw PCM16 mono at ``sample_rate`` (default 16 kHz)."""
    if body[:4] == b"RIFF":
        try:
            with wave.open(io.BytesIO(body), "rb") as wav:
                if wav.getsampwidth() != 2:
                    raise UploadError(415, f"the WAV file has {8 * wav.getsampwidth()}-bit samples; send 16-bit PCM")
                rate, channels = wav.getframerate(), wav.getnchannels()
                frames = wav.readframes(wav.getnframes())
        except (wave.Error, EOFError) as exc:
            raise UploadError(415, f"not a readable PCM WAV file ({exc}); send 16-bit PCM WAV") from None
    elif content_type.split(";")[0].strip().lower() == RAW_PCM_TYPE:
        rate, channels, frames = sample_rate or SAMPLE_RATE, 1, body
    else:
        raise UploadError(415, f"send a 16-bit PCM WAV file, or raw PCM16 mono as {RAW_PCM_TYPE} "
                               "(with ?sample_rate= if not 16000)")
    try:
        decoder = PCM16Decoder(rate, channels)
    except UnsupportedFormat as exc:
        raise UploadError(415, str(exc)) from None
    try:
        return np.concatenate((decoder.decode(frames), decoder.flush()))
    except DecodeError as exc:   # full-scale white noise: random bytes, not a recording
        raise UploadError(415, str(exc)) from None


def speech_only(pcm: np.ndarray) -> np.ndarray:
    """``pcm`` with the silence between speech spans cut out (Silero VAD)."""
    spans = speech_spans(pcm)
    return np.concatenate([pcm[a:b] for a, b in spans]) if spans else pcm[:0]


async def voice_from_upload(body: bytes, content_type: str, sample_rate: int | None, *, model: SpeakerModel,
                            min_seconds: float, max_seconds: float = MAX_PROFILE_SPEECH_SECONDS,
                            keep_first: bool = False) -> Voice:
    """Decode, trim to speech and embed an upload; ``UploadError`` (422) if the speech found is
    outside ``[min_seconds, max_seconds]`` (``keep_first``: longer speech is cut to its first
    ``max_seconds`` instead). The CPU work runs off the event loop. 503 without the (optional)
    speaker model (``model``)."""
    if model.problem():
        raise UploadError(503, f"voice enrolment is off on this server: {model.problem()}")

    def trimmed() -> np.ndarray:
        return speech_only(decode_upload(body, content_type, sample_rate))

    speech = await asyncio.to_thread(trimmed)
    if keep_first:
        speech = speech[:int(max_seconds * SAMPLE_RATE)]
    seconds = speech.size / SAMPLE_RATE
    if not min_seconds <= seconds <= max_seconds:
        raise UploadError(422, f"found {seconds:.1f} s of speech; {min_seconds:g}–{max_seconds:g} s are needed "
                               "(silence does not count)")
    embedder = await asyncio.to_thread(model.load)     # the first use loads the model
    return Voice(await embedder.embed_async(speech), seconds)


def combine(voices: list[Voice]) -> Voice:
    """One voice from several samples: their embeddings' mean, weighted by speech seconds."""
    seconds = sum(v.speech_seconds for v in voices)
    mean = sum(v.embedding.astype(np.float64) * v.speech_seconds for v in voices) / seconds
    return Voice((mean / (np.linalg.norm(mean) + 1e-12)).astype(np.float32), seconds)


# A stored voice names the model that embedded it: embeddings of two models are not comparable,
# and a voice of a model other than the configured one is ignored (its owner enrols again).
# Layout: VOICE_MAGIC, one byte n, n bytes of ASCII model id, then the float32 little-endian
# embedding. Voices stored before models had ids are the bare 256 floats of the d-vector model.
VOICE_MAGIC = b"HKV1"
_LEGACY_VOICE_BYTES = 256 * 4


def to_bytes(embedding: np.ndarray, model_id: str) -> bytes:
    """A voice as stored: tagged with the id of the model that made it."""
    tag = model_id.encode("ascii")
    return VOICE_MAGIC + bytes([len(tag)]) + tag + np.asarray(embedding, dtype="<f4").reshape(-1).tobytes()


def voice_model(blob: bytes) -> str | None:
    """The id of the model that made a stored voice (None if the bytes are no voice)."""
    if blob[:4] == VOICE_MAGIC and len(blob) > 5:
        return blob[5 : 5 + blob[4]].decode("ascii", "replace")
    return model_named("dvector").model_id if len(blob) == _LEGACY_VOICE_BYTES else None


def from_bytes(blob: bytes, model_id: str) -> np.ndarray | None:
    """The stored embedding if ``model_id`` made it, else None (never compared across models)."""
    if voice_model(blob) != model_id:
        return None
    payload = blob[5 + blob[4]:] if blob[:4] == VOICE_MAGIC else blob
    if not payload or len(payload) % 4:
        return None
    return np.frombuffer(payload, dtype="<f4").astype(np.float32)


def current_voice(blob: bytes | None, model_id: str) -> bool:
    """True if a stored voice was made by ``model_id`` (so it is used)."""
    return blob is not None and from_bytes(blob, model_id) is not None


# --- sessions ---------------------------------------------------------------------------------

async def load_voices(store: Store | None, uid: str,
                      model_id: str) -> tuple[np.ndarray | None, dict[str, tuple[str, np.ndarray]]]:
    """``(owner embedding or None, {person_id: (name, embedding)})`` for a ``SpeakerIdentifier``:
    the voices ``model_id`` made (others are ignored until enrolled again).

    A storage failure is logged and yields no voices: the session still transcribes, it only
    cannot tell who speaks.
    """
    if store is None:
        return None, {}
    try:
        stored = await store.load_voices(uid)
    except Exception:
        log.exception("could not load the voices of uid=%s; speakers will not be identified", uid)
        return None, {}
    return voices_from_stored(uid, stored, model_id)


def voices_from_stored(uid: str, stored: Voices,
                       model_id: str) -> tuple[np.ndarray | None, dict[str, tuple[str, np.ndarray]]]:
    """``load_voices``' result from the store's rows (``Store.load_voices``, or the voices a
    session's ``connect`` read with its conversation)."""
    owner_blob, named = stored
    owner = from_bytes(owner_blob, model_id) if owner_blob is not None else None
    people = {pid: (name, e) for pid, name, blob in named if (e := from_bytes(blob, model_id)) is not None}
    if (owner_blob is not None and owner is None) or len(people) < len(named):
        log.warning("uid=%s has voices of another speaker model than %s: they are ignored until enrolled again",
                    uid, model_id)
    return owner, people


# --- REST -------------------------------------------------------------------------------------

def build_profile_routes(store: Store | Callable[[], Store],
                         authenticator: Authenticator | Callable[[], Authenticator],
                         model: SpeakerModel | None = None) -> list[Route]:
    """The speech-profile and people routes, enrolling with ``model`` (default: the default
    speaker model). The store and authenticator may be functions returning them."""
    model = model or model_named()
    model_id = model.model_id
    get_store = store if callable(store) else (lambda: store)
    authenticated = authentication(authenticator)

    def answering_upload_errors(handler):
        async def wrapped(request: Request, uid: str) -> Response:
            try:
                return await handler(request, uid)
            except UploadError as exc:
                return _error(exc.status, exc.detail)
        return authenticated(wrapped)

    async def speech_profile(request: Request, uid: str) -> Response:
        store = get_store()
        if request.method == "PUT":
            voice = await voice_from_upload(await _read_body(request, MAX_AUDIO_BYTES),
                                            request.headers.get("content-type", ""), _sample_rate(request),
                                            model=model, min_seconds=MIN_PROFILE_SPEECH_SECONDS)
            await store.set_speech_profile(uid, to_bytes(voice.embedding, model_id), speech_seconds=voice.speech_seconds,
                                           now=time.time())
        elif request.method == "DELETE":
            await store.delete_speech_profile(uid)
            return Response(status_code=204)
        profile = await store.get_speech_profile(uid)
        if profile is None or not current_voice(profile.embedding, model_id):
            # A profile of another speaker model is not used: the caller should enrol again.
            return JSONResponse({"exists": False, "speech_seconds": None, "created_at": None, "updated_at": None,
                                 "model": voice_model(profile.embedding) if profile else None})
        return JSONResponse({"exists": True, "speech_seconds": round(profile.speech_seconds, 2),
                             "created_at": iso(profile.created_at), "updated_at": iso(profile.updated_at),
                             "model": voice_model(profile.embedding)})

    async def app_upload_audio(request: Request, uid: str) -> Response:
        """``POST /v3/upload-audio``, the app's enrolment: multipart, the recording in ``file``
        (the app writes a 16 kHz 16-bit mono WAV; raw PCM16 is read as ``decode_upload`` does).
        Errors are upstream's: 400 with a ``detail`` (413 for a body over the limit)."""
        try:
            part, part_type = await asyncio.to_thread(
                multipart_file, await _read_body(request, MAX_AUDIO_BYTES + MULTIPART_SLACK),
                request.headers.get("content-type", ""))
            # The app records up to 150 s while the question prompts run: beyond the profile's
            # 60 s of speech, the first 60 s are used rather than the enrolment failing (the
            # app ignores a failed upload and believes it has a profile).
            voice = await voice_from_upload(part, part_type, _sample_rate(request), model=model,
                                            min_seconds=MIN_PROFILE_SPEECH_SECONDS, keep_first=True)
        except UploadError as exc:
            return _error(413 if exc.status == 413 else 400, exc.detail)
        await get_store().set_speech_profile(uid, to_bytes(voice.embedding, model_id), speech_seconds=voice.speech_seconds,
                                             now=time.time())
        # Upstream answers with the stored recording's URL; Harken keeps only the embedding.
        return JSONResponse({"url": "", "speech_seconds": round(voice.speech_seconds, 2)})

    async def app_has_profile(request: Request, uid: str) -> Response:
        # False for a profile of another speaker model: the app then asks its user to enrol again.
        profile = await get_store().get_speech_profile(uid)
        return JSONResponse({"has_profile": profile is not None and current_voice(profile.embedding, model_id)})

    async def app_profile_url(request: Request, uid: str) -> Response:
        # The enrolment audio is never kept, so there is nothing to play back.
        return JSONResponse({"url": None})

    async def people_collection(request: Request, uid: str) -> Response:
        store = get_store()
        if request.method == "GET":
            return JSONResponse([_person_api(p, model_id) for p in await store.list_people(uid)])
        name, samples = _person_request(await _read_body(request, MAX_JSON_BYTES))
        if len(await store.list_people(uid)) >= MAX_PEOPLE:
            return _error(422, f"a user may name at most {MAX_PEOPLE} people: delete one first")
        voices = []
        for index, sample in enumerate(samples):
            try:
                voices.append(await voice_from_upload(sample, "", None, model=model, min_seconds=MIN_SAMPLE_SPEECH_SECONDS))
            except UploadError as exc:
                raise UploadError(exc.status, f"samples[{index}]: {exc.detail}") from None
        voice = combine(voices) if voices else None
        person = PersonRow(id=uuid.uuid4().hex, uid=uid, name=name,
                           embedding=to_bytes(voice.embedding, model_id) if voice else None, samples=len(voices),
                           speech_seconds=voice.speech_seconds if voice else 0.0, created_at=time.time())
        await store.add_person(person)
        # The app's path answers 200 as upstream does (the app reads the person only then).
        created = 200 if request.url.path.startswith(APP_PEOPLE) else 201
        return JSONResponse(_person_api(person, model_id), status_code=created)

    async def person(request: Request, uid: str) -> Response:
        store, person_id = get_store(), request.path_params["person_id"]
        if request.method == "DELETE":
            if not await store.delete_person(uid, person_id):
                return _error(404, "person not found")
            return Response(status_code=204)
        found = await store.get_person(uid, person_id)
        return JSONResponse(_person_api(found, model_id)) if found else _error(404, "person not found")

    async def person_samples(request: Request, uid: str) -> Response:
        store, person_id = get_store(), request.path_params["person_id"]
        if await store.get_person(uid, person_id) is None:        # before the CPU work
            return _error(404, "person not found")
        sample = await voice_from_upload(await _read_body(request, MAX_AUDIO_BYTES),
                                         request.headers.get("content-type", ""), _sample_rate(request),
                                         model=model, min_seconds=MIN_SAMPLE_SPEECH_SECONDS)
        # Average with the stored voice and write it back only if no other sample landed
        # meanwhile (compare-and-set on the sample count); else re-read and average again.
        for _ in range(_VOICE_WRITE_TRIES):
            current = await store.get_person(uid, person_id)
            if current is None:
                return _error(404, "person not found")
            # A voice of another speaker model is replaced, never averaged with this one.
            old = from_bytes(current.embedding, model_id) if current.embedding is not None else None
            voice = combine([Voice(old, current.speech_seconds), sample]) if old is not None else sample
            if await store.set_person_voice(uid, person_id, to_bytes(voice.embedding, model_id), samples=current.samples + 1,
                                            speech_seconds=voice.speech_seconds,
                                            expected_samples=current.samples):
                return JSONResponse(_person_api(await store.get_person(uid, person_id) or current, model_id))
        return _error(409, "the person changed while the sample was added: try again")

    async def rename_person(request: Request, uid: str) -> Response:
        """``PATCH /v1/users/people/{id}/name?value=…`` (upstream's form)."""
        name = (request.query_params.get("value") or "").strip()
        if not name or len(name) > MAX_NAME_CHARS:
            return _error(422, f"value must be a non-empty name of at most {MAX_NAME_CHARS} characters")
        if not await AppQueries(get_store()).rename_person(uid, request.path_params["person_id"], name):
            return _error(404, "person not found")
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/v1/users/speech-profile", answering_upload_errors(speech_profile), methods=["GET", "PUT", "DELETE"]),
        Route("/v3/upload-audio", authenticated(app_upload_audio), methods=["POST"]),
        Route("/v3/speech-profile", authenticated(app_has_profile), methods=["GET"]),
        Route("/v4/speech-profile", authenticated(app_profile_url), methods=["GET"]),
        Route(f"{APP_PEOPLE}/{{person_id}}/name", authenticated(rename_person), methods=["PATCH"]),
    ]
    for prefix in (APP_PEOPLE, "/v1/people"):      # the app's path, and Harken's first one
        routes += [
            Route(prefix, answering_upload_errors(people_collection), methods=["GET", "POST"]),
            Route(f"{prefix}/{{person_id}}", authenticated(person), methods=["GET", "DELETE"]),
            Route(f"{prefix}/{{person_id}}/speech-samples", answering_upload_errors(person_samples), methods=["POST"]),
        ]
    return routes


def multipart_file(body: bytes, content_type: str, field: str = "file") -> tuple[bytes, str]:
    """``(content, content type)`` of the ``field`` part of a multipart/form-data body."""
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise UploadError(400, f"send multipart/form-data with the recording in a '{field}' part")
    try:
        found = read_part(body, content_type, field)
    except MultipartError as exc:
        raise UploadError(400, f"the multipart body could not be read: {exc}") from None
    if found is None:
        raise UploadError(400, f"the multipart body has no '{field}' part")
    return found


class _TooLarge(UploadError):
    def __init__(self, limit: int):
        super().__init__(413, f"the body is larger than {limit} bytes (about 60 s of 48 kHz stereo audio)")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _sample_rate(request: Request) -> int | None:
    raw = request.query_params.get("sample_rate")
    if raw is None:
        return None
    if not raw.isdigit():
        raise _BadRequest("sample_rate must be a whole number of Hz")
    return int(raw)


def _person_request(body: bytes) -> tuple[str, list[bytes]]:
    """``(name, decoded samples)`` of a ``POST /v1/people`` body."""
    payload = json_object(body, '{"name": "…", "samples": ["<base64 WAV>", …]}')
    name = payload.get("name")
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > MAX_NAME_CHARS:
        raise UploadError(422, f"name must be a non-empty string of at most {MAX_NAME_CHARS} characters")
    samples = payload.get("samples") or []
    if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
        raise UploadError(422, "samples must be a list of base64-encoded WAV files")
    if len(samples) > MAX_SAMPLES_PER_REQUEST:
        raise UploadError(422, f"at most {MAX_SAMPLES_PER_REQUEST} samples per request; add more with "
                               "POST /v1/people/{id}/speech-samples")
    decoded = []
    for index, sample in enumerate(samples):
        try:
            decoded.append(base64.b64decode(sample, validate=True))
        except (binascii.Error, ValueError):
            raise _BadRequest(f"samples[{index}] is not valid base64") from None
    return name.strip(), decoded


def _person_api(person: PersonRow, model_id: str) -> dict:
    """Upstream's ``Person`` (the app requires created_at and updated_at) and Harken's voice
    facts. No sample audio is kept, so ``speech_samples`` (upstream: their URLs) is empty."""
    return {"id": person.id, "name": person.name, "created_at": iso(person.created_at),
            "updated_at": iso(person.created_at), "speech_samples": [], "speech_samples_version": 3,
            "has_voice": current_voice(person.embedding, model_id), "samples": person.samples,
            "speech_seconds": round(person.speech_seconds, 2)}
