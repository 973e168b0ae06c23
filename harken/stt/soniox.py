"""Soniox real-time transcription through the ``soniox`` 2.x SDK.

Soniox streams sub-word *tokens*: a token that begins with a space starts a word, others (word
pieces, punctuation) continue it. Final tokens are sent once; the non-final tail is re-sent and
may change, so only final tokens are used. Because a word is complete only when the next word
starts, the last word is held until a token with a leading space, an endpoint ``<end>`` (endpoint
detection is on so silences release it), a ``<fin>`` after ``finalize()``, or the end of the
stream; a non-final tail that begins with a space also shows it is complete. Endpoints come at
most 500 ms after speech stops (``max_endpoint_delay_ms``, Soniox's minimum). Speakers come as
"1", "2", … and become 0, 1, ….

In-band errors (``{"error_code": 503, ...}`` then a close) do not raise in the SDK; this stream
raises ``StreamFailure`` for them, retryable for 408/429/5xx and not for 400/401/402/403.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from soniox import AsyncSonioxClient
from soniox.errors import SonioxRealtimeError
from soniox.types.realtime import RealtimeSTTConfig

from .base import Provider, StreamConfig, Word
from .word_queue import StreamFailure, retryable_status, status_failure
from .queued import QueuedStream
from .languages import SONIOX, normalize_language, primary_language

if TYPE_CHECKING:
    from ..config import Settings

KEEPALIVE_SECONDS = 5.0        # Soniox closes after 20 s with neither audio nor keepalive
CONTROL_TOKENS = ("<end>", "<fin>")


def realtime_config(config: StreamConfig, model: str) -> RealtimeSTTConfig:
    language = normalize_language(config.language)
    return RealtimeSTTConfig(
        model=model, audio_format="pcm_s16le", sample_rate=config.sample_rate, num_channels=1,
        language_hints=None if language == "multi" else [primary_language(language)],
        enable_speaker_diarization=config.diarize, enable_endpoint_detection=True, max_endpoint_delay_ms=500,
        client_reference_id=config.session_id or None,
        context={"terms": list(config.vocabulary)} if config.vocabulary else None,
    )


def _starts_word(text: str) -> bool:
    """A leading space starts a word; so does a CJK character (those scripts use no spaces)."""
    first = text[:1]
    if not first:
        return False
    if first.isspace():
        return True
    name = unicodedata.name(first, "")
    return name.startswith(("CJK UNIFIED", "HIRAGANA", "KATAKANA"))


def _speaker(label: str | None) -> int:
    return int(label) - 1 if label and label.isdigit() and int(label) > 0 else 0


@dataclass
class _Piece:
    text: str
    start_ms: int
    end_ms: int
    speaker: str | None
    confidence: float


class TokenJoiner:
    """Final Soniox tokens in, whole words out (times in seconds of the stream)."""

    def __init__(self) -> None:
        self._pending: list[_Piece] = []

    @property
    def pending_start(self) -> float | None:
        return self._pending[0].start_ms / 1000 if self._pending else None

    def feed(self, tokens: Iterable[Any]) -> list[Word]:
        """Words completed by one response's tokens. Non-final tokens are not used, except that a
        tail beginning a new word shows the held word is complete."""
        words: list[Word] = []
        for token in tokens:
            if not token.is_final:
                if self._pending and _starts_word(token.text):
                    words += self.flush()
                break
            if token.text in CONTROL_TOKENS:
                words += self.flush()
                continue
            if not token.text:
                continue
            if self._pending and _starts_word(token.text):
                words += self.flush()
            self._pending.append(_Piece(token.text, token.start_ms or 0, token.end_ms or 0, token.speaker,
                                        1.0 if token.confidence is None else token.confidence))
        return words

    def flush(self) -> list[Word]:
        pieces, self._pending = self._pending, []
        text = "".join(p.text for p in pieces).strip()
        if not text:
            return []
        confidence = sum(p.confidence for p in pieces) / len(pieces)
        return [Word(text, pieces[0].start_ms / 1000, pieces[-1].end_ms / 1000, _speaker(pieces[0].speaker),
                     confidence)]


class SonioxProvider(Provider):
    name = "soniox"

    def __init__(self, settings: "Settings"):
        self._client = AsyncSonioxClient(api_key=settings.soniox_api_key, websocket_base_url=settings.soniox_url)
        self._model = settings.soniox_model

    def supports(self, language: str) -> bool:
        language = normalize_language(language)
        return language == "multi" or primary_language(language) in SONIOX

    async def open(self, config: StreamConfig) -> "SonioxStream":
        stream = SonioxStream()
        await stream.connect(self._client, realtime_config(config, self._model))
        return stream

    async def aclose(self) -> None:
        await self._client.aclose()


class SonioxStream(QueuedStream):
    provider_name = "soniox"

    def __init__(self) -> None:
        super().__init__()
        self._session: Any = None
        self._socket: Any = None
        self._joiner = TokenJoiner()
        self._last_send = time.monotonic()
        self._finish_sent = False
        self._closed = False

    async def connect(self, client: AsyncSonioxClient, config: RealtimeSTTConfig) -> None:
        session = client.realtime.stt.connect(config=config)
        try:
            await session.enter()
        except SonioxRealtimeError as exc:
            status = getattr(getattr(exc.__cause__, "response", None), "status_code", None)
            if status:
                raise status_failure("soniox", status) from None
            raise StreamFailure(f"cannot reach soniox: {exc.__cause__ or exc}",
                                reason="initialization_failed") from None
        self._session = session
        # The SDK's close() sends the end-of-audio frame and then forgets the socket without
        # closing it; keep it so close() can release it once Soniox has said "finished".
        self._socket = getattr(session, "_ws", None)
        self._last_send = time.monotonic()
        self._tasks = [asyncio.create_task(self._receive(), name="soniox-receive"),
                       asyncio.create_task(self._keep_alive(), name="soniox-keepalive")]

    async def send(self, pcm: np.ndarray) -> None:
        if not pcm.size:
            return                          # an empty frame means "end of audio"
        try:
            await self._session.send_byte_chunk(pcm.astype(np.int16, copy=False).tobytes())
        except SonioxRealtimeError as exc:
            raise StreamFailure(f"soniox connection lost: {exc.__cause__ or exc}", reason="connection_lost") from None
        self._last_send = time.monotonic()

    async def finalize(self) -> None:
        with contextlib.suppress(SonioxRealtimeError):
            await self._session.finalize()
            self._last_send = time.monotonic()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._finish_sent = True
        await self._finish(self._session.finish, SonioxRealtimeError, self._release, "soniox")

    async def _release(self) -> None:
        with contextlib.suppress(Exception):
            await self._session.close()
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close()

    async def _receive(self) -> None:
        try:
            while True:
                try:
                    event = await self._session.receive_event()
                except SonioxRealtimeError:
                    event = None             # the session was closed under us
                except ValueError as exc:    # bad JSON or a payload that is not a Soniox event
                    raise StreamFailure(f"soniox sent a malformed message: {exc}",
                                        reason="malformed_response") from None
                if event is None:        # closed without "finished": even after finish(), words may be missing
                    raise StreamFailure("soniox closed the connection", reason="connection_lost")
                if event.error_code is not None:
                    raise StreamFailure(f"soniox error {event.error_code}: {event.error_message}",
                                        reason="provider_error", retryable=retryable_status(event.error_code),
                                        code=event.error_code)
                for word in self._joiner.feed(event.tokens):
                    self._words.put(word)
                if event.finished:
                    break
                if event.final_audio_proc_ms is not None:
                    settled = event.final_audio_proc_ms / 1000
                    held = self._joiner.pending_start
                    # not past a held word: it has not been yielded yet
                    self._words.settle(settled if held is None else min(settled, held))
        except StreamFailure as exc:
            self._words.fail(exc)
            await self._drain()
        else:
            for word in self._joiner.flush():
                self._words.put(word)
            self._words.end()

    async def _drain(self) -> None:
        """After a failure, read on (and drop) until the socket closes: a server that is still
        talking must not block on us, or close() and the sends would wait on each other."""
        while True:
            try:
                if await self._session.receive_event() is None:
                    return
            except ValueError:
                continue
            except Exception:  # noqa: BLE001 - whatever ends the socket
                return

    async def _keep_alive(self) -> None:
        with contextlib.suppress(SonioxRealtimeError):
            while not self._finish_sent:
                idle = time.monotonic() - self._last_send
                if idle >= KEEPALIVE_SECONDS:
                    await self._session.keep_alive()
                    self._last_send = time.monotonic()
                    idle = 0.0
                await asyncio.sleep(KEEPALIVE_SECONDS - idle)
