"""Deepgram live transcription (``/v1/listen``) through ``deepgram-sdk`` v7.

Options are Omi's: punctuation and smart formatting, diarization, 300 ms endpointing, finals
only, ``no_delay`` (finals do not wait for a possible entity), no filler words, raw linear16 at
16 kHz mono. ``no_delay`` and ``filler_words`` are not in the SDK's signature, so they travel as
additional query parameters. The SDK sends no KeepAlive by itself (since v5): this stream sends
one after ``KEEPALIVE_SECONDS`` without audio, well inside Deepgram's 10 s idle limit (NET-0001).
``finalize()`` sends Finalize; ``close()`` sends CloseStream and reads the remaining Results up to
Deepgram's own close.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from deepgram import AsyncDeepgramClient, DeepgramClientEnvironment
from deepgram.core.api_error import ApiError
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .base import Provider, StreamConfig, Word
from .word_queue import StreamFailure, status_failure
from .queued import QueuedStream
from .languages import DEEPGRAM_NOVA2, DEEPGRAM_NOVA3, N2, N2M, N3, N3M, normalize_language

if TYPE_CHECKING:
    from ..config import Settings

KEEPALIVE_SECONDS = 5.0
ENDPOINTING_MS = 300


def connect_options(config: StreamConfig) -> dict[str, Any]:
    """``listen.v1.connect`` keyword arguments for a stream config (Omi's option set)."""
    language = normalize_language(config.language)
    model = deepgram_model(language, config.extra.get("model"))
    options = dict(
        model=model, language=language, encoding="linear16", sample_rate=config.sample_rate, channels=1,
        punctuate="true", smart_format="true", diarize="true" if config.diarize else "false",
        endpointing=ENDPOINTING_MS, interim_results="false", profanity_filter="false",
        request_options={"additional_query_parameters": {"no_delay": "true", "filler_words": "false"}},
    )
    options.update(vocabulary_options(model, config.vocabulary))
    return options


def vocabulary_options(model: str, vocabulary) -> dict[str, list[str]]:
    """The user's terms as Deepgram takes them, live and pre-recorded alike: as Omi, ``keyterm``
    (one query parameter per term) on nova-3, the older ``keywords`` on other models; none
    without terms."""
    if not vocabulary:
        return {}
    return {"keyterm" if model.startswith("nova-3") else "keywords": list(vocabulary)}


def parse_message(message: Any) -> tuple[list[Word], float | None]:
    """Final words of one server message and the stream time up to which it settles everything.

    Interim results (not requested) and other message kinds give ``([], None)``; an ``Error``
    message raises.
    """
    kind = getattr(message, "type", None)
    if kind == "Error":
        detail = getattr(message, "description", None) or getattr(message, "message", "") or "error"
        raise StreamFailure(f"deepgram: {detail}", reason="provider_error",
                            code=getattr(message, "variant", None))
    if kind != "Results" or not message.is_final:
        return [], None
    words: list[Word] = []
    alternatives = message.channel.alternatives
    if alternatives:
        for w in alternatives[0].words or ():
            words.append(Word(w.punctuated_word or w.word, float(w.start), float(w.end),
                              int(w.speaker or 0), float(w.confidence)))
    return words, float(message.start) + float(message.duration)


def deepgram_client(settings: "Settings", **options: Any) -> AsyncDeepgramClient:
    """The SDK's client for ``deepgram_url`` (WebSocket for live, its http(s) twin for REST)."""
    url = settings.deepgram_url.rstrip("/")
    http = url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
    return AsyncDeepgramClient(
        api_key=settings.deepgram_api_key,
        environment=DeepgramClientEnvironment(base=http, production=url, agent=url, agent_rest=http), **options,
    )


def deepgram_supports(language: str) -> bool:
    language = normalize_language(language)
    return any(language in table for table in (N3M, N3, N2, N2M))


def deepgram_model(language: str, model: str | None = None) -> str:
    """The configured model, else Omi's choice: nova-3 where it has the language, nova-2 elsewhere."""
    language = normalize_language(language)
    return model or (DEEPGRAM_NOVA3 if language in N3M or language in N3 else DEEPGRAM_NOVA2)


class DeepgramProvider(Provider):
    name = "deepgram"

    def __init__(self, settings: "Settings"):
        self._client = deepgram_client(settings)

    def supports(self, language: str) -> bool:
        return deepgram_supports(language)

    async def open(self, config: StreamConfig) -> "DeepgramStream":
        stream = DeepgramStream()
        await stream.connect(self._client, connect_options(config))
        return stream


class DeepgramStream(QueuedStream):
    provider_name = "deepgram"

    def __init__(self) -> None:
        super().__init__()
        self._exit = contextlib.AsyncExitStack()
        self._conn: Any = None
        self._last_send = time.monotonic()
        self._close_sent = False
        self._closed = False

    async def connect(self, client: AsyncDeepgramClient, options: dict[str, Any]) -> None:
        try:
            self._conn = await self._exit.enter_async_context(client.listen.v1.connect(**options))
        except ApiError as exc:
            raise status_failure("deepgram", exc.status_code or 0) from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise StreamFailure(f"cannot reach deepgram: {exc}", reason="initialization_failed") from None
        self._last_send = time.monotonic()
        self._tasks = [asyncio.create_task(self._receive(), name="deepgram-receive"),
                       asyncio.create_task(self._keep_alive(), name="deepgram-keepalive")]

    async def send(self, pcm: np.ndarray) -> None:
        if not pcm.size:
            return                          # an empty binary frame would end the stream
        try:
            await self._conn.send_media(pcm.astype(np.int16, copy=False).tobytes())
        except ConnectionClosed as exc:
            raise _lost(exc) from None
        self._last_send = time.monotonic()

    async def finalize(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._conn.send_finalize()
            self._last_send = time.monotonic()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_sent = True
        await self._finish(self._conn.send_close_stream, ConnectionClosed, self._exit.aclose, "deepgram")

    async def _receive(self) -> None:
        try:
            while True:
                try:
                    message = await self._conn.recv()
                except ConnectionClosed as exc:
                    if self._close_sent and exc.rcvd is not None and exc.rcvd.code == 1000:
                        break
                    raise _lost(exc) from None
                except ValueError as exc:        # json.JSONDecodeError and unparseable payloads
                    raise StreamFailure(f"deepgram sent a malformed message: {exc}",
                                        reason="malformed_response") from None
                try:
                    words, settled = parse_message(message)
                except StreamFailure:
                    raise
                except Exception as exc:
                    raise StreamFailure(f"deepgram sent an unreadable message: {exc!r}",
                                        reason="malformed_response") from None
                for word in words:
                    self._words.put(word)
                if settled is not None:
                    self._words.settle(settled)
        except StreamFailure as exc:
            self._words.fail(exc)
            await self._drain()
        else:
            self._words.end()

    async def _drain(self) -> None:
        """After a failure, read on (and drop) until the socket closes: a server that is still
        talking must not block on us, or close() and the sends would wait on each other."""
        while True:
            try:
                await self._conn.recv()
            except ValueError:
                continue
            except Exception:  # noqa: BLE001 - ConnectionClosed or whatever ends the socket
                return

    async def _keep_alive(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while not self._close_sent:
                idle = time.monotonic() - self._last_send
                if idle >= KEEPALIVE_SECONDS:
                    await self._conn.send_keep_alive()
                    self._last_send = time.monotonic()
                    idle = 0.0
                await asyncio.sleep(KEEPALIVE_SECONDS - idle)


def _lost(exc: ConnectionClosed) -> StreamFailure:
    frame = exc.rcvd
    if frame is None:
        return StreamFailure("deepgram connection dropped without a close frame", reason="connection_lost")
    return StreamFailure(f"deepgram closed the stream: {frame.code} {frame.reason}".rstrip(),
                         reason="connection_lost", code=frame.code)
