"""What a provider stream hands its consumer: words through a ``WordQueue``, or a ``StreamFailure``.

Every provider stream (the cloud ones, the null one) and ``FallbackStream`` above them speak
this; it lives apart from ``fallback.py`` so that a provider needs nothing of the failover that
wraps it (``selection`` imports the providers, ``fallback`` imports ``Link`` from ``base``:
with these in ``fallback`` the three formed an import circle).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from .base import STTError

# Statuses after which trying the same provider again can help. Others in 4xx (400 bad request,
# 401 bad key, 402 payment required, 403 forbidden, ...) need a human.
RETRYABLE_STATUSES = frozenset({408, 425, 429, 499})


def retryable_status(status: int | None) -> bool:
    if status is None:
        return True
    return status in RETRYABLE_STATUSES or not 400 <= status < 500


class StreamFailure(STTError):
    """A provider failure with the ``reason`` reported in ``service_status`` events:
    ``initialization_failed``, ``connection_lost``, ``stalled``, ``provider_error``,
    ``malformed_response``, ``send_failed``."""

    def __init__(self, message: str, *, reason: str, retryable: bool = True, code: int | str | None = None):
        super().__init__(message, retryable=retryable, code=code)
        self.reason = reason


def status_failure(provider: str, status: int, detail: str = "") -> StreamFailure:
    """A refused handshake (HTTP status) as a failure, retryable or not by its status."""
    text = f"{provider} refused the connection: HTTP {status}" + (f" ({detail})" if detail else "")
    return StreamFailure(text, reason="initialization_failed", retryable=retryable_status(status), code=status)


class _Settled(float):
    """A progress mark travelling through a WordQueue between the words."""


class WordQueue:
    """Words (or any results) produced by a task, read by ``async for``; iteration ends after
    ``end()`` or raises what ``fail()`` was given, and every later iteration ends the same way.
    A provider stream reads its socket into one whether or not anyone iterates yet, so its
    ``close()`` never depends on the consumer.

    ``settle(t)`` queues a progress mark; ``settled_until`` takes its value when iteration
    reaches it, so it never runs ahead of the words the consumer has actually received.
    """

    _END = object()

    def __init__(self) -> None:
        self._items: asyncio.Queue = asyncio.Queue()
        self.settled_until = 0.0

    def put(self, item: Any) -> None:
        self._items.put_nowait(item)

    def settle(self, until: float) -> None:
        self._items.put_nowait(_Settled(until))

    def end(self) -> None:
        self._items.put_nowait(self._END)

    def fail(self, exc: BaseException) -> None:
        self._items.put_nowait(exc)

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            item = await self._items.get()
            if type(item) is _Settled:
                self.settled_until = float(item)
                continue
            if item is self._END or isinstance(item, BaseException):
                self._items.put_nowait(item)
                if item is self._END:
                    return
                raise item
            yield item
