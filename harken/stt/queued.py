"""What the three cloud streams share: a receive task fills a ``WordQueue`` that consumers
iterate, and closing means "send the provider's end-of-audio, wait (bounded) for its last words,
release the connection"."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Awaitable, Callable

from .base import STTStream, Word
from .word_queue import StreamFailure, WordQueue

CLOSE_SECONDS = 10.0     # how long a provider may take to send its last words after end-of-audio


class QueuedStream(STTStream):
    def __init__(self) -> None:
        self._words = WordQueue()
        self._tasks: list[asyncio.Task] = []     # [receive, keepalive] once connected

    def __aiter__(self) -> AsyncIterator[Word]:
        return self._words.__aiter__()

    @property
    def settled_until(self) -> float:
        """Stream time up to which every word has been yielded (see ``fallback.FallbackStream``)."""
        return self._words.settled_until

    async def _finish(self, send_end: Callable[[], Awaitable[None]], lost: type[BaseException] | tuple,
                      release: Callable[[], Awaitable[None]], what: str) -> None:
        """Stop the keepalive, send end-of-audio, let the receive task take the last words
        (at most ``CLOSE_SECONDS``), then release the connection and end iteration."""
        receive, keepalive = self._tasks
        keepalive.cancel()
        try:
            with contextlib.suppress(lost):       # if it is gone, the receive task says why
                await send_end()
            await asyncio.wait_for(asyncio.shield(receive), CLOSE_SECONDS)
        except TimeoutError:
            self._words.fail(StreamFailure(f"{what} did not finish within {CLOSE_SECONDS:.0f}s of the end of audio",
                                           reason="stalled"))
        finally:
            receive.cancel()
            await release()
            self._words.end()
