"""Speechmatics real-time transcription through ``speechmatics-rt`` 1.x.

Configuration is Omi's: speaker diarization (at most 4 speakers), the enhanced model, flexible
``max_delay`` of 3 s, no partials, entities on, raw pcm_s16le at 16 kHz (the SDK's default rate
is 44.1 kHz, so it is always set). Words below 0.4 confidence are dropped, as Omi does.
Punctuation arrives as separate results that attach to the previous (or next) word; speakers
come as ``S1``, ``S2``, … (→ 0, 1, …) or ``UU`` when unknown (→ ``UNKNOWN_SPEAKER``).
``close()`` sends EndOfStream and waits for EndOfTranscript.

The SDK reports a lost connection only through its log; this stream learns of it from the
session-ended event the SDK keeps for itself, so iteration ends with a ``StreamFailure`` instead
of waiting for words that will never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING

import numpy as np
import speechmatics.rt as smrt
from speechmatics.rt import (AsyncClient, AudioEncoding, AudioFormat, ConnectionConfig, ServerMessageType,
                             SpeakerDiarizationConfig, TranscriptionConfig)

from .base import Provider, StreamConfig, Word
from .word_queue import StreamFailure, status_failure
from .queued import CLOSE_SECONDS, QueuedStream
from .languages import SPEECHMATICS, normalize_language, primary_language

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

UNKNOWN_SPEAKER = 99        # Speechmatics' "UU": a speaker it could not tell
MIN_CONFIDENCE = 0.4
MAX_DELAY = 3.0
MAX_SPEAKERS = 4
# In-band error types worth retrying (Speechmatics closes 4005, 4013, 1011 for them).
RETRYABLE_ERRORS = frozenset({"quota_exceeded", "job_error", "internal_error", "unknown_error",
                              "idle_timeout", "session_timeout"})
# Error types that mean what an HTTP status would say at the handshake.
_ERROR_STATUS = {"not_authorised": 401, "not_allowed": 403, "invalid_model": 400, "invalid_language": 400,
                 "invalid_config": 400, "invalid_audio_type": 400, "invalid_message": 400,
                 "timelimit_exceeded": 402, "quota_exceeded": 429}


def speechmatics_language(language: str) -> str:
    """Harken's BCP-47 code → Speechmatics' language pack code (Mandarin is ``cmn``)."""
    primary = primary_language(normalize_language(language))
    return "cmn" if primary == "zh" else primary


def speechmatics_supports(language: str) -> bool:
    """Speechmatics has no code-switching across all languages: ``multi`` is not taken."""
    return normalize_language(language) != "multi" and speechmatics_language(language) in SPEECHMATICS


def transcription_config(config: StreamConfig) -> TranscriptionConfig:
    return TranscriptionConfig(
        language=speechmatics_language(config.language), model="enhanced",
        diarization="speaker" if config.diarize else "none",
        speaker_diarization_config=SpeakerDiarizationConfig(max_speakers=MAX_SPEAKERS) if config.diarize else None,
        max_delay=MAX_DELAY, max_delay_mode="flexible", enable_partials=False, enable_entities=True,
        additional_vocab=[{"content": term} for term in config.vocabulary] or None,
    )


def _speaker(label: str | None) -> int:
    if not label:
        return 0
    if label.startswith("S") and label[1:].isdigit():
        return max(0, int(label[1:]) - 1)
    return UNKNOWN_SPEAKER


def parse_transcript(message: dict) -> tuple[list[Word], float | None]:
    """Words of one ``AddTranscript`` (punctuation attached, low-confidence words dropped) and
    the stream time it settles."""
    words: list[Word | None] = []        # None marks a dropped word, so its punctuation is dropped too
    leading = ""                         # punctuation waiting for the next word
    for result in message.get("results") or ():
        alternative = (result.get("alternatives") or [{}])[0]
        content = alternative.get("content", "")
        if result.get("type") == "punctuation":
            if result.get("attaches_to") == "next":
                leading += content
            elif words and words[-1] is not None:
                last = words[-1]
                words[-1] = Word(last.text + content, last.start, last.end, last.speaker, last.confidence)
            continue
        confidence = float(alternative.get("confidence", 1.0))
        if confidence < MIN_CONFIDENCE:
            words.append(None)
            leading = ""
            continue
        words.append(Word(leading + content, float(result.get("start_time", 0.0)), float(result.get("end_time", 0.0)),
                          _speaker(alternative.get("speaker")), confidence))
        leading = ""
    end = (message.get("metadata") or {}).get("end_time")
    return [w for w in words if w is not None], None if end is None else float(end)


class SpeechmaticsProvider(Provider):
    name = "speechmatics"

    def __init__(self, settings: "Settings"):
        self._key = settings.speechmatics_api_key
        self._url = settings.speechmatics_url
        self._ssl: ssl.SSLContext | None = None      # built once: loading CA certificates costs ~10 ms

    def supports(self, language: str) -> bool:
        return speechmatics_supports(language)

    async def open(self, config: StreamConfig) -> "SpeechmaticsStream":
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        client = AsyncClient(api_key=self._key, url=self._url,
                             conn_config=ConnectionConfig(ping_interval=20, ping_timeout=60, ssl_context=self._ssl))
        stream = SpeechmaticsStream(client)
        await stream.start(transcription_config(config),
                           AudioFormat(encoding=AudioEncoding.PCM_S16LE, sample_rate=config.sample_rate))
        return stream


class SpeechmaticsStream(QueuedStream):
    provider_name = "speechmatics"

    def __init__(self, client: AsyncClient):
        super().__init__()
        self._client = client
        self._error: dict | None = None
        self._ended = False                 # EndOfTranscript received
        self._closing = False
        self._watch: asyncio.Task | None = None
        client.on(ServerMessageType.ADD_TRANSCRIPT, self._on_transcript)
        client.on(ServerMessageType.ERROR, self._on_error)
        client.on(ServerMessageType.END_OF_TRANSCRIPT, self._on_end_of_transcript)

    async def start(self, config: TranscriptionConfig, audio_format: AudioFormat) -> None:
        try:
            await self._client.start_session(transcription_config=config, audio_format=audio_format)
        except smrt.ConnectionError as exc:
            status = getattr(getattr(exc.__context__, "response", None), "status_code", None)
            if status:
                raise status_failure("speechmatics", status) from None
            raise StreamFailure(f"cannot reach speechmatics: {exc}", reason="initialization_failed") from None
        except smrt.TranscriptionError as exc:
            raise self._failure(f"speechmatics refused the session: {exc}", "initialization_failed") from None
        except smrt.TimeoutError as exc:
            raise StreamFailure(f"speechmatics: {exc}", reason="initialization_failed") from None
        done = getattr(self._client, "_session_done_evt", None)
        if done is not None:
            self._watch = asyncio.create_task(self._watch_session(done), name="speechmatics-watch")

    async def send(self, pcm: np.ndarray) -> None:
        if not pcm.size:
            return
        try:
            await self._client.send_audio(pcm.astype(np.int16, copy=False).tobytes())
        except (smrt.TransportError, smrt.ConnectionError) as exc:
            raise self._failure(f"speechmatics connection lost: {exc}", "connection_lost") from None

    async def finalize(self) -> None:
        with contextlib.suppress(smrt.TransportError, smrt.ConnectionError):
            await self._client.force_end_of_utterance()

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            await asyncio.wait_for(self._client.stop_session(), CLOSE_SECONDS)
        except TimeoutError:
            self._words.fail(StreamFailure(f"speechmatics sent no EndOfTranscript within {CLOSE_SECONDS:.0f}s",
                                           reason="stalled"))
        except Exception as exc:  # noqa: BLE001 - closing a broken session may fail in many ways
            log.debug("speechmatics stop_session: %r", exc)
        finally:
            if self._watch is not None:
                self._watch.cancel()
            with contextlib.suppress(Exception):
                await self._client.close()
            self._words.end()

    # --- SDK callbacks (run inside the SDK's receive task) ----------------------------------
    def _on_transcript(self, message: dict) -> None:
        try:
            words, settled = parse_transcript(message)
        except (TypeError, ValueError, AttributeError) as exc:
            self._error = {"type": "malformed", "reason": repr(exc)}
            self._words.fail(self._failure("speechmatics sent an unreadable AddTranscript", "malformed_response"))
            return
        for word in words:
            self._words.put(word)
        if settled is not None:
            self._words.settle(settled)

    def _on_error(self, message: dict) -> None:
        self._error = message

    def _on_end_of_transcript(self, message: dict) -> None:
        self._ended = True
        self._words.end()

    async def _watch_session(self, done: asyncio.Event) -> None:
        await done.wait()
        if self._ended:
            return
        if self._error is not None:
            self._words.fail(self._failure("speechmatics error", "provider_error"))
        else:
            self._words.fail(StreamFailure("speechmatics connection lost", reason="connection_lost"))

    def _failure(self, text: str, reason: str) -> StreamFailure:
        error = self._error or {}
        kind = error.get("type")
        if kind is None:
            return StreamFailure(text, reason=reason)
        status = _ERROR_STATUS.get(kind)
        retryable = kind in RETRYABLE_ERRORS or kind not in _ERROR_STATUS
        detail = f"{text}: {kind}: {error.get('reason', '')}".rstrip(": ")
        return StreamFailure(detail, reason="malformed_response" if kind == "malformed" else reason,
                             retryable=retryable, code=status or kind)
