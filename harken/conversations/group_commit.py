"""Group commit: one transaction carries what many sessions submit at about the same time.

Every session saves a batch every 600 ms and must not send it before it is stored. Saved one
transaction each, N sessions queue N transactions behind the database's writer lock (SQLite's,
or PostgreSQL's row and WAL work), and each costs several round trips. A ``GroupCommitter``
instead gathers what sessions submit while a transaction is in flight and writes all of it with
one call of its ``write`` (``Store.save_batches`` for batches, ``Store.open_conversations`` for
sessions that connect, all at once in a ramp, ``Store.end_sessions`` for the lease releases and
usage rows of sessions that close, all at once in a drain): at most one
transaction in flight, so N sessions cost about one transaction per round, and a request waits
at most for the transaction before its own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Generic, Hashable, Sequence, TypeVar

log = logging.getLogger(__name__)

MAX_GROUP = 500      # requests per transaction (bounds statement size and one commit's latency)
# Transactions start at most this often. Sessions flush at their own phase of the 600 ms
# interval, so without a pause a fast store commits groups of one or two batches back to back,
# and a transaction's fixed cost (begin, six statements, commit, each a hop to the driver's
# thread) dwarfs a batch's own: at 100 streams that was a third of the server's CPU. A batch
# waits at most this long before its transaction starts.
GATHER_SECONDS = 0.03

Request = TypeVar("Request")
Item = tuple[Any, asyncio.Future]      # a request and the future its caller awaits


class GroupCommitter(Generic[Request]):
    """``write(requests)`` stores a group in one transaction and returns one outcome per request,
    in order; an outcome that is an exception is raised to that request's caller. ``key`` names
    what a request writes: two requests with one key never share a transaction (the later waits
    for the next, which keeps their order).

    ``await save(request)`` returns the request's outcome once its transaction committed.
    Cancelled, it withdraws the request as if a transaction of its own had been rolled back: a
    cancelled save is not stored (unless its transaction was already committing), so a session
    ended mid-save never has a batch stored that its client was not sent."""

    def __init__(self, write: Callable[[Sequence[Request]], Awaitable[list]],
                 key: Callable[[Request], Hashable], name: str, burst: int = 1) -> None:
        self._write, self._key, self._name = write, key, name
        self._pending: list[Item] = []
        self._in_flight: list[Item] = []
        self._transaction: asyncio.Task | None = None
        self._flusher: asyncio.Task | None = None
        # Transactions start at most one per GATHER_SECONDS on average, and up to ``burst`` of
        # them at once after a quiet spell (a token bucket; 1 = a pause after every transaction).
        self._burst = float(max(1, burst))
        self._credit = self._burst
        self._credit_at = float("-inf")      # loop time the credit was counted

    async def save(self, request: Request) -> Any:
        done = asyncio.get_running_loop().create_future()
        self._pending.append((request, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=f"harken-commit-{self._name}")
        try:
            outcome = await done            # cancelling the caller cancels ``done``: withdrawn
        except asyncio.CancelledError:
            self._withdraw(done)
            raise
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _withdraw(self, done: asyncio.Future) -> None:
        if not done.cancelled():
            return                           # its outcome was in: stored, only not delivered
        if any(waiter is done for _, waiter in self._in_flight) and self._transaction is not None:
            self._transaction.cancel()       # rolled back; ``_commit`` runs the rest again
        self._pending = [item for item in self._pending if item[1] is not done]

    async def _flush(self) -> None:
        """Write what is pending, group by group, until nothing is (then the task ends)."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                credit = self._credit_now(loop.time())
                if credit < 1:
                    await asyncio.sleep((1 - credit) * GATHER_SECONDS)
                now = loop.time()
                self._credit, self._credit_at = self._credit_now(now) - 1, now
                await self._commit(self._next_group())
        except asyncio.CancelledError:        # the loop is shutting down: nobody waits forever
            for _, done in self._in_flight + self._pending:
                done.cancel()
            self._pending = []
            raise

    def _credit_now(self, now: float) -> float:
        return min(self._burst, self._credit + (now - self._credit_at) / GATHER_SECONDS)

    def _next_group(self) -> list[Item]:
        group, later, seen = [], [], set()
        for item in self._pending:
            key = self._key(item[0])
            # One request per key per transaction; a second one (rare: two handles on one
            # conversation) waits for the next, which keeps their order.
            if key in seen or len(group) >= MAX_GROUP:
                later.append(item)
            else:
                seen.add(key)
                group.append(item)
        self._pending = later
        return group

    async def _commit(self, group: list[Item]) -> None:
        while group := [item for item in group if not item[1].done()]:     # minus the withdrawn
            self._in_flight = group
            self._transaction = asyncio.create_task(self._write([request for request, _ in group]))
            try:
                outcomes = await self._transaction
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise                    # the flusher itself is being cancelled
                continue                     # a waiter withdrew: write the others without it
            except Exception as exc:
                if len(group) == 1:
                    _settle(group[0][1], error=exc)
                    return
                # One bad request (or a deadlock abort on PostgreSQL) must not fail its
                # neighbours: each is tried again in a transaction of its own.
                log.warning("group commit of %d %s failed (%s: %s); saving them one by one",
                            len(group), self._name, type(exc).__name__, exc)
                for item in group:
                    await self._commit([item])
                return
            finally:
                self._in_flight, self._transaction = [], None
            for (_, done), outcome in zip(group, outcomes):
                _settle(done, outcome=outcome)
            return


def _settle(done: asyncio.Future, *, outcome: object = None, error: BaseException | None = None) -> None:
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(outcome)
