"""The three cloud providers' pre-recorded (batch) APIs, for uploaded recordings (``prerecorded``).

Each takes one 16 kHz mono WAV and gives its words (seconds of the clip, speakers numbered from
0) or raises ``STTError``, retryable as the failure is. Options follow the live streams' (Omi's):
punctuation, diarization, the language (``multi`` where the provider has code-switching), and
the user's vocabulary under each API's own name (Deepgram ``keyterm`` on nova-3, ``keywords``
on older models; Soniox ``context.terms``; Speechmatics ``additional_vocab``).

- **Deepgram**: ``POST /v1/listen`` with the audio as the body (``deepgram-sdk``'s
  ``listen.v1.media.transcribe_file``); the answer holds the words. The SDK's own retries are off:
  ``RecordedChain`` retries, and then fails over.
- **Soniox**: upload the file (``POST /files``), create a transcription of it with the async
  model (``POST /transcriptions``), poll it (``GET /transcriptions/{id}``) until ``completed`` or
  ``error``, read the tokens (``GET …/transcript``, joined into words as the live stream does),
  then delete the transcription and the file (``soniox`` SDK).
- **Speechmatics**: a batch job (``POST /jobs``, multipart ``config`` + ``data_file``), polled
  (``GET /jobs/{id}``) until ``done`` or ``rejected``, its ``json-v2`` transcript read
  (``GET /jobs/{id}/transcript``: the same results as a real-time ``AddTranscript``), then the
  job deleted. Plain HTTP with ``httpx``: the ``speechmatics-batch`` SDK would bring ``aiohttp``
  and ``aiofiles`` for four requests.

The uploaded audio is deleted at Soniox and Speechmatics once its words are read (Deepgram keeps
none by default), so a recording does not stay with a provider longer than its transcription.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

import httpx

from .base import STTError, Word
from .word_queue import retryable_status
from .languages import SONIOX, normalize_language, primary_language
from .prerecorded import RecordedChain, RecordedProvider, RecordedRequest

if TYPE_CHECKING:
    from ..config import Settings

UPLOAD_TIMEOUT_SECONDS = 300.0      # one request carrying a clip (minutes of speech) or its answer


def _http_failure(provider: str, status: int, detail: str = "") -> STTError:
    text = f"{provider} answered HTTP {status}" + (f": {detail[:200]}" if detail else "")
    return STTError(text, retryable=retryable_status(status), code=status)


def _unreachable(provider: str, exc: BaseException) -> STTError:
    return STTError(f"cannot reach {provider}: {type(exc).__name__}: {exc}", retryable=True)


class _Polling:
    """Poll interval and deadline of an asynchronous job."""

    def __init__(self, settings: "Settings"):
        self.interval = max(0.01, settings.sync_cloud_poll)
        self.timeout = settings.sync_cloud_timeout

    async def until_done(self, provider: str, look) -> Any:
        """Call ``look()`` every interval until it returns something other than None."""
        deadline = time.monotonic() + self.timeout
        while True:
            result = await look()
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise STTError(f"{provider} did not finish within {self.timeout:.0f} s", retryable=True)
            await asyncio.sleep(self.interval)


# --- Deepgram ------------------------------------------------------------------------------------
class DeepgramRecorded(RecordedProvider):
    name = "deepgram"

    def __init__(self, settings: "Settings"):
        from .deepgram import deepgram_client

        self._client = deepgram_client(settings, timeout=UPLOAD_TIMEOUT_SECONDS)

    def supports(self, language: str) -> bool:
        from .deepgram import deepgram_supports

        return deepgram_supports(language)

    async def transcribe(self, request: RecordedRequest) -> list[Word]:
        from deepgram.core.api_error import ApiError

        from .deepgram import deepgram_model, vocabulary_options

        language = normalize_language(request.language)
        model = deepgram_model(language, request.model)
        try:
            response = await self._client.listen.v1.media.transcribe_file(
                request=request.wav, model=model, language=language,
                punctuate=True, smart_format=True, diarize=True, filler_words=False, profanity_filter=False,
                **vocabulary_options(model, request.vocabulary),
                request_options={"max_retries": 0, "timeout": UPLOAD_TIMEOUT_SECONDS})
        except ApiError as exc:
            raise _http_failure("deepgram", exc.status_code or 0, str(exc.body)) from None
        except (httpx.HTTPError, OSError) as exc:
            raise _unreachable("deepgram", exc) from None
        return deepgram_words(response)


def deepgram_words(response: Any) -> list[Word]:
    """The words of a ``ListenV1Response`` (first channel, first alternative)."""
    try:
        channels = response.results.channels
        alternatives = channels[0].alternatives if channels else []
        words = (alternatives[0].words or []) if alternatives else []
        return [Word(getattr(w, "punctuated_word", None) or w.word, float(w.start), float(w.end),
                     int(w.speaker or 0), float(w.confidence if w.confidence is not None else 1.0))
                for w in words]
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        raise STTError(f"deepgram sent an unreadable transcript: {exc!r}", retryable=True) from None


# --- Soniox --------------------------------------------------------------------------------------
class SonioxRecorded(RecordedProvider):
    name = "soniox"

    def __init__(self, settings: "Settings"):
        from soniox import AsyncSonioxClient

        self._client = AsyncSonioxClient(api_key=settings.soniox_api_key, api_base_url=settings.soniox_api_url,
                                         timeout_sec=UPLOAD_TIMEOUT_SECONDS)
        self._model = settings.soniox_async_model
        self._polling = _Polling(settings)

    def supports(self, language: str) -> bool:
        language = normalize_language(language)
        return language == "multi" or primary_language(language) in SONIOX

    async def transcribe(self, request: RecordedRequest) -> list[Word]:
        from soniox.errors import SonioxAPIError, SonioxError
        from soniox.types import CreateTranscriptionConfig

        from .soniox import TokenJoiner

        language = normalize_language(request.language)
        config = CreateTranscriptionConfig(
            language_hints=None if language == "multi" else [primary_language(language)],
            enable_speaker_diarization=True, enable_language_identification=language == "multi",
            context={"terms": list(request.vocabulary)} if request.vocabulary else None)
        stt = self._client.stt
        file_id = transcription_id = None
        try:
            uploaded = await self._client.files.upload(request.wav, filename="recording.wav")
            file_id = uploaded.id
            job = await stt.create(model=self._model, file_id=file_id, config=config)
            transcription_id = job.id

            async def finished():
                current = await stt.get(transcription_id)
                return None if current.status in ("queued", "processing") else current

            job = await self._polling.until_done("soniox", finished)
            if job.status != "completed":
                raise STTError(f"soniox transcription failed: {job.error_type}: {job.error_message}",
                               retryable=True, code=job.error_type)
            transcript = await stt.get_transcript(transcription_id)
        except SonioxAPIError as exc:
            raise _http_failure("soniox", exc.status_code or 0, str(exc)) from None
        except SonioxError as exc:
            raise STTError(f"soniox: {exc}", retryable=True) from None
        except (httpx.HTTPError, OSError) as exc:
            raise _unreachable("soniox", exc) from None
        except ValueError as exc:           # a body that is not the documented JSON
            raise STTError(f"soniox sent an unreadable answer: {exc}", retryable=True) from None
        finally:
            await self._forget(transcription_id, file_id)
        joiner = TokenJoiner()
        # The async transcript's tokens are all final (they carry no is_final).
        words = joiner.feed(token.model_copy(update={"is_final": True}) for token in transcript.tokens)
        return words + joiner.flush()

    async def _forget(self, transcription_id: str | None, file_id: str | None) -> None:
        """Delete the transcription and the uploaded audio at Soniox (best effort: they expire anyway)."""
        with contextlib.suppress(Exception):
            if transcription_id is not None:
                await self._client.stt.delete_if_exists(transcription_id)
        with contextlib.suppress(Exception):
            if file_id is not None:
                await self._client.files.delete_if_exists(file_id)

    async def aclose(self) -> None:
        await self._client.aclose()


# --- Speechmatics --------------------------------------------------------------------------------
class SpeechmaticsRecorded(RecordedProvider):
    name = "speechmatics"

    def __init__(self, settings: "Settings"):
        self._http = httpx.AsyncClient(base_url=settings.speechmatics_batch_url.rstrip("/"),
                                       headers={"Authorization": f"Bearer {settings.speechmatics_api_key}"},
                                       timeout=UPLOAD_TIMEOUT_SECONDS)
        self._polling = _Polling(settings)

    def supports(self, language: str) -> bool:
        from .speechmatics import speechmatics_supports

        return speechmatics_supports(language)

    async def transcribe(self, request: RecordedRequest) -> list[Word]:
        from .speechmatics import MAX_SPEAKERS, parse_transcript, speechmatics_language

        config = {"type": "transcription",
                  "transcription_config": {"language": speechmatics_language(request.language), "model": "enhanced",
                                           "diarization": "speaker",
                                           "speaker_diarization_config": {"max_speakers": MAX_SPEAKERS}}}
        if request.vocabulary:
            # The custom dictionary, as the live stream sends it.
            config["transcription_config"]["additional_vocab"] = [{"content": term} for term in request.vocabulary]
        job_id = None
        try:
            submitted = await self._http.post("/jobs", data={"config": json.dumps(config)},
                                              files={"data_file": ("recording.wav", request.wav, "audio/wav")})
            job_id = self._json(submitted).get("id")
            if not job_id:
                raise STTError("speechmatics returned no job id", retryable=True)

            async def finished():
                job = self._json(await self._http.get(f"/jobs/{job_id}")).get("job") or {}
                status = job.get("status")
                return None if status in ("created", "running", None) else job

            job = await self._polling.until_done("speechmatics", finished)
            if job.get("status") != "done":
                errors = "; ".join(str(e.get("message", e)) for e in job.get("errors") or ())
                raise STTError(f"speechmatics job {job.get('status')}: {errors}".rstrip(": "), retryable=True,
                               code=job.get("status"))
            transcript = self._json(await self._http.get(f"/jobs/{job_id}/transcript",
                                                         params={"format": "json-v2"}))
        except httpx.HTTPError as exc:
            raise _unreachable("speechmatics", exc) from None
        finally:
            if job_id is not None:
                with contextlib.suppress(Exception):
                    await self._http.delete(f"/jobs/{job_id}")
        try:
            return parse_transcript(transcript)[0]
        except (TypeError, ValueError, AttributeError) as exc:
            raise STTError(f"speechmatics sent an unreadable transcript: {exc!r}", retryable=True) from None

    @staticmethod
    def _json(response: httpx.Response) -> dict:
        if response.is_error:
            raise _http_failure("speechmatics", response.status_code, response.text)
        try:
            body = response.json()
        except ValueError as exc:
            raise STTError(f"speechmatics sent an unreadable answer: {exc}", retryable=True) from None
        if not isinstance(body, dict):
            raise STTError("speechmatics sent an unreadable answer", retryable=True)
        return body

    async def aclose(self) -> None:
        await self._http.aclose()


RECORDED_PROVIDERS: dict[str, type[RecordedProvider]] = {
    "deepgram": DeepgramRecorded, "soniox": SonioxRecorded, "speechmatics": SpeechmaticsRecorded}


def build_recorded_chain(settings: "Settings") -> RecordedChain:
    """The pre-recorded APIs of the cloud providers that have a key (none: uploads go to the
    embedded engine). Each provider's SDK is imported only when it is used."""
    keys = {"deepgram": settings.deepgram_api_key, "soniox": settings.soniox_api_key,
            "speechmatics": settings.speechmatics_api_key}
    return RecordedChain(settings, {name: provider(settings) for name, provider in RECORDED_PROVIDERS.items()
                                    if keys[name]})
