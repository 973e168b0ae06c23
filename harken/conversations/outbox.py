"""Webhook delivery from the transactional outbox.

Sessions only insert outbox rows (in the transaction of the change that causes them); this
deliverer, running as background tasks on every node, claims due rows, sends them with
``httpx`` under a hard time limit, and writes the outcomes back. So a slow or dead receiver
costs a worker slot, never transcription time, and nothing is lost on a crash: an unsettled
claim simply expires and the row is sent again, with the same ``X-Harken-Delivery`` id.

Per ordering key (a conversation, or a session's audio) rows go out one at a time and in order:
the store only hands out the oldest pending row of each key. A failing row is retried with
exponential backoff until ``retry_horizon`` after it was written (24 h by default, the last
attempt falling exactly at the horizon), then kept as a dead letter and logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Callable

import httpx

from .pinned import CheckedTransport
from .store import OutboxRow, Settlement, Store
from .webhooks import (DELIVERY_HEADER, SIGNATURE_HEADER, Resolver, UnresolvableHost, WebhookSettingError,
                       check_url, is_public, safe_target, sign, system_resolver)

log = logging.getLogger(__name__)

USER_AGENT = "harken-webhooks/1"
MAX_RESPONSE_BYTES = 64 * 1024      # read no more of a receiver's answer than this
CLAIM_MARGIN = 30.0                 # a claim outlives the request timeout by this much
DNS_CACHE_SECONDS = 60.0


class OutboxDeliverer:
    def __init__(
        self,
        store: Store,
        *,
        node_id: str,
        secret: str = "",
        timeout: float = 15.0,
        workers: int = 16,
        retry_horizon: float = 86400.0,
        max_backoff: float = 600.0,
        base_backoff: float = 1.0,
        allow_private: bool = False,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
        resolver: Resolver | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.secret = secret
        self.timeout = timeout
        self.workers = max(1, workers)
        self.retry_horizon = retry_horizon
        self.max_backoff = max_backoff
        self.base_backoff = base_backoff
        self.allow_private = allow_private
        self.poll_interval = poll_interval
        self.clock = clock
        self._resolver = resolver or system_resolver
        self._dns: dict[tuple[str, int], tuple[float, list[str]]] = {}
        self._wake = asyncio.Event()
        self._inflight: dict[asyncio.Task, OutboxRow] = {}
        self._settlement = Settlement()
        self._runner: asyncio.Task | None = None
        self._client: httpx.AsyncClient | None = None
        self.delivered = 0
        self.failed_attempts = 0
        self.dead = 0

    # --- control -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._runner is None:
            limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
            # Connections go to the addresses the (cached) resolver gave and the check passed,
            # never to a second lookup's answer (DNS rebinding): pinned.py.
            allowed = (lambda address: True) if self.allow_private else is_public
            self._client = httpx.AsyncClient(
                timeout=self.timeout, follow_redirects=False, trust_env=False,
                transport=CheckedTransport(self._cached_resolve, allowed, limits=limits))
            self._runner = asyncio.create_task(self._run(), name="harken-outbox")

    async def stop(self, *, grace: float = 0.0) -> None:
        """Stop sending. Requests under way get ``grace`` seconds to finish (no new rows are
        claimed meanwhile); deliveries cut short are handed back, to be sent again (same id) by
        the next run or another node; if even that write fails, their claims simply expire."""
        if self._runner is None:
            return
        self._runner.cancel()
        if grace > 0 and self._inflight:
            await asyncio.wait(list(self._inflight), timeout=grace)
        interrupted = dict(self._inflight)
        for task in interrupted:
            task.cancel()
        await asyncio.gather(self._runner, *interrupted, return_exceptions=True)
        self._runner = None
        # Hand interrupted rows back at once rather than leave them claimed until the lease
        # ends; the receiver may have got them already, so they go again with the same id.
        now = self.clock()
        self._settlement.retry += [(row, now, "interrupted by shutdown") for task, row in interrupted.items()
                                   if task.cancelled()]
        if self._settlement:
            try:
                async with asyncio.timeout(5.0):
                    await self.store.settle_outbox(self._take_settlement())
            except Exception:
                log.warning("could not record the last delivery outcomes; those rows will be sent again")
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def notify(self) -> None:
        """Rows were just written: look now instead of at the next poll."""
        self._wake.set()

    # --- loop ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                settlement = self._take_settlement()
                free = self.workers - len(self._inflight)
                rows: list[OutboxRow] = []
                if settlement or free > 0:
                    try:
                        rows = await self.store.exchange_outbox(settlement, node=self.node_id, now=self.clock(),
                                                                lease=self.timeout + CLAIM_MARGIN, limit=free)
                    except BaseException:
                        self._merge_back(settlement)
                        raise
                for row in rows:
                    task = asyncio.create_task(self._deliver(row), name=f"harken-webhook-{row.id}")
                    self._inflight[task] = row
                    task.add_done_callback(self._forget)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("outbox: store unavailable (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                continue
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that lands as the event fires, and stop() would then wait forever.
            try:
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _forget(self, task: asyncio.Task) -> None:
        self._inflight.pop(task, None)

    def _take_settlement(self) -> Settlement:
        settlement, self._settlement = self._settlement, Settlement()
        return settlement

    def _merge_back(self, settlement: Settlement) -> None:
        self._settlement.delivered += settlement.delivered
        self._settlement.retry += settlement.retry
        self._settlement.dead += settlement.dead

    # --- one request ---------------------------------------------------------------------------
    async def _deliver(self, row: OutboxRow) -> None:
        try:
            await self._attempt(row)
        except asyncio.CancelledError:
            raise
        except Exception as exc:               # a bug must not kill the deliverer
            log.exception("outbox: delivery %d crashed", row.id)
            self._record_failure(row, f"internal error: {type(exc).__name__}")
        finally:
            self._wake.set()                   # the loop settles outcomes and claims the next rows

    async def _attempt(self, row: OutboxRow) -> None:
        try:
            if not self.allow_private:       # again at send time: DNS may have changed since
                await check_url(row.url, allow_private=False, resolver=self._cached_resolve)
        except UnresolvableHost as exc:
            self._record_failure(row, str(exc))
            return
        except WebhookSettingError as exc:
            self._bury(row, f"refused: {exc}")
            return
        error = await self._send(row)
        if error is None:
            self.delivered += 1
            self._settlement.delivered.append(row)
        else:
            self._record_failure(row, error)

    async def _send(self, row: OutboxRow) -> str | None:
        """Send one row; None on success, else why it failed."""
        assert self._client is not None
        headers = {"Content-Type": row.content_type, "User-Agent": USER_AGENT, DELIVERY_HEADER: str(row.id),
                   **row.headers}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, row.body)
        # Merged into the user's own query (which may carry their token); ours win on a clash.
        target = httpx.URL(row.url).copy_merge_params(row.params)
        try:
            async with asyncio.timeout(self.timeout):
                async with self._client.stream("POST", target, content=row.body, headers=headers) as response:
                    received = 0
                    async for chunk in response.aiter_raw():
                        received += len(chunk)
                        if received > MAX_RESPONSE_BYTES:
                            break
                    status = response.status_code
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except httpx.HTTPError as exc:
            # Errors are stored and logged: keep the user's path and query (maybe a token) out.
            detail = str(exc).replace(str(target), safe_target(row.url)).replace(row.url, safe_target(row.url))
            return f"{type(exc).__name__}: {detail}"[:300]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    def _record_failure(self, row: OutboxRow, error: str) -> None:
        self.failed_attempts += 1
        now = self.clock()
        deadline = row.created_at + self.retry_horizon
        if now >= deadline:
            self._bury(row, error)
            return
        delay = min(self.max_backoff, self.base_backoff * 2 ** max(0, row.attempts - 1))
        delay *= random.uniform(0.75, 1.0)      # jitter: receivers coming back are not stampeded
        self._settlement.retry.append((row, min(now + delay, deadline), error))
        log.info("webhook delivery %d (%s to %s) failed, attempt %d: %s", row.id, row.kind,
                 safe_target(row.url), row.attempts, error)

    def _bury(self, row: OutboxRow, error: str) -> None:
        self.dead += 1
        self._settlement.dead.append((row, error))
        log.error("webhook dead letter: delivery=%d kind=%s target=%s attempts=%d age=%.0fs last error: %s",
                  row.id, row.kind, safe_target(row.url), row.attempts, self.clock() - row.created_at, error)

    async def _cached_resolve(self, host: str, port: int) -> list[str]:
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached and cached[0] > now:
            return cached[1]
        addresses = await self._resolver(host, port)
        if len(self._dns) > 1024:
            self._dns.clear()
        self._dns[(host, port)] = (now + DNS_CACHE_SECONDS, addresses)
        return addresses
