"""Prometheus metrics of one gateway, served at ``GET /metrics`` (text exposition format).

Every ``Gateway`` owns a ``GatewayMetrics`` with its own ``CollectorRegistry`` (never the
process-wide default), so several apps in one process (tests, ``--workers`` siblings built in
one interpreter) never share or collide on series. Labels carry only codecs, provider names,
failure reasons, close codes and delivery results: never a uid, session id or URL.

What the two latency histograms measure (both on the gateway's own clock, so they include
network and queueing, not just engine time):

- ``harken_stt_provider_latency_seconds{provider}``: for each final word from the speech
  provider, the time from the *arrival at the gateway* of the audio message holding the word's
  end to the word's arrival from the provider. It includes the engine's endpointing (the
  embedded engine waits for ``endpoint_silence_ms`` of silence before it decodes).
- ``harken_segment_latency_seconds``: for each segment whose end moved later, the time from the
  arrival of the audio holding the segment's end to the moment the batch carrying it was written
  to the client's socket: what a user sees as lag between speaking a word and reading it.

``harken_webhook_backlog`` and ``harken_webhook_dead_letters`` count outbox rows in the store,
which can only be read asynchronously: the ``/metrics`` handler refreshes them before rendering
(bounded by ``STORE_READ_TIMEOUT``; on a timeout the last value is served). Webhook delivery
results are read from the conversation service's deliverer at scrape time, and
``harken_store_lock_waits_total`` from the store's counter, so the conversations layer knows
nothing of this module.

This module knows nothing of the ``Gateway`` that owns it (``context.py`` imports this module,
not the other way round): the owner hands over what the metrics read, as ``MetricsSources``.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..codecs import TARGET_RATE
from ..config import Settings, is_loopback
from .auth import bearer_token
from .worker_metrics import SiblingMetrics, WorkerSlot

if TYPE_CHECKING:
    from ..conversations import Store
    from .segments import Segment

log = logging.getLogger("harken.metrics")

# Families read from the shared store, the same whichever worker reads them (worker_metrics.py).
SHARED_FAMILIES = ("harken_webhook_backlog", "harken_webhook_dead_letters")
LAG_INTERVAL = 0.5                  # seconds the loop-lag probe sleeps; the overshoot is the lag
STORE_READ_TIMEOUT = 2.0            # seconds /metrics waits for the outbox counts
ARRIVAL_WINDOW_SECONDS = 120.0      # audio whose arrival times a session remembers (as the replay buffer)

# Speech-to-screen latencies range from tens of milliseconds (cloud partials) to many seconds
# (the embedded engine's longest utterances).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(frozen=True)
class MetricsSources:
    """What the metrics read from their owner, each when a scrape asks: the owner's parts (the
    store, the conversation service) are built after the metrics, in the app's lifespan."""

    session_limit: int                          # max_sessions (0 = no limit)
    open_sessions: Callable[[], int]
    store: Callable[[], "Store | None"]         # outbox counts, lock waits
    deliverer: Callable[[], Any]                # the webhook deliverer (its counters), or None


class GatewayMetrics:
    """The gateway's metrics, the loop-lag probe, and the values read at scrape time."""

    def __init__(self, sources: MetricsSources) -> None:
        self._sources = sources
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.active_sessions = Gauge("harken_active_sessions", "WebSocket sessions now open", registry=registry)
        self.active_sessions.set_function(sources.open_sessions)
        self.session_limit = Gauge("harken_session_limit", "max_sessions of this process (0 = no limit)",
                                   registry=registry)
        self.session_limit.set(sources.session_limit)
        self.capacity_refusals = Counter("harken_capacity_refusals",
                                         "connections refused with 1013 because max_sessions were held",
                                         registry=registry)
        self.audio_seconds = Counter("harken_audio_seconds",
                                     "seconds of audio received and decoded, by codec (caught up every batch interval)",
                                     ["codec"], registry=registry)
        self.decode_errors = Counter("harken_decode_errors", "audio messages that could not be decoded",
                                     ["codec"], registry=registry)
        self.held_back = Counter("harken_held_back", "audio messages held until the next one confirmed or refuted "
                                 "them (a refuted one is counted in harken_decode_errors too, when refuted)",
                                 ["codec"], registry=registry)
        self.provider_latency = Histogram(
            "harken_stt_provider_latency_seconds",
            "arrival of the audio holding a final word's end to the word's arrival from the provider",
            ["provider"], buckets=LATENCY_BUCKETS, registry=registry)
        self.stt_failures = Counter("harken_stt_failures", "failed connection attempts and lost streams of a provider",
                                    ["provider", "reason"], registry=registry)
        self.stt_switches = Counter("harken_stt_switches", "sessions moved from one provider to another",
                                    ["from_provider", "to_provider", "reason"], registry=registry)
        self.segment_latency = Histogram(
            "harken_segment_latency_seconds",
            "arrival of the audio holding a segment's end to the batch carrying it being sent",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.webhook_backlog = Gauge("harken_webhook_backlog", "outbox rows waiting for delivery (all nodes)",
                                     registry=registry)
        self.webhook_dead_letters = Gauge("harken_webhook_dead_letters",
                                          "outbox rows given up after the retry horizon (all nodes)", registry=registry)
        self.loop_lag = Histogram("harken_event_loop_lag_seconds",
                                  f"how late a {LAG_INTERVAL:g}s sleep on the event loop wakes up",
                                  buckets=LAG_BUCKETS, registry=registry)
        self.connections = Counter("harken_connections", "WebSocket connections ended, by close code",
                                   ["code"], registry=registry)
        registry.register(_DeliveryCollector(sources.deliverer))
        registry.register(_StoreLockCollector(sources.store))
        self._lag_task: asyncio.Task | None = None
        self._siblings: SiblingMetrics | None = None
        # Other parts' gauges read from the store at each scrape (the sync backlog), and their names.
        self._store_readers: list[Callable[[], Awaitable[None]]] = []
        self._shared_families: tuple[str, ...] = SHARED_FAMILIES

    # --- per session ------------------------------------------------------------------------------
    def session(self, codec: str) -> "SessionMetrics":
        return SessionMetrics(self, codec)

    def connection_closed(self, code: int) -> None:
        self.connections.labels(str(code)).inc()

    # --- background probe -------------------------------------------------------------------------
    def start(self) -> None:
        if self._lag_task is None:
            self._lag_task = asyncio.create_task(self._measure_lag(), name="harken-loop-lag")

    async def stop(self) -> None:
        task, self._lag_task = self._lag_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        siblings, self._siblings = self._siblings, None
        if siblings is not None:
            await siblings.stop()

    async def share_with_workers(self, slot: WorkerSlot) -> None:
        """A ``--workers`` worker: serve this registry to the siblings, show theirs at scrapes."""
        siblings = SiblingMetrics(slot, lambda: generate_latest(self.registry))
        await siblings.start()
        self._siblings = siblings

    async def _measure_lag(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(LAG_INTERVAL)
            self.loop_lag.observe(max(0.0, time.monotonic() - before - LAG_INTERVAL))

    # --- scrape -----------------------------------------------------------------------------------
    def add_store_reader(self, refresh: Callable[[], Awaitable[None]], families: Iterable[str]) -> None:
        """``refresh()`` sets gauges of this registry from the shared store before each scrape
        (bounded by ``STORE_READ_TIMEOUT``); ``families`` are then shown once across workers."""
        self._store_readers.append(refresh)
        self._shared_families = (*self._shared_families, *families)

    async def render(self) -> bytes:
        await self._refresh_outbox()
        for refresh in self._store_readers:
            try:
                async with asyncio.timeout(STORE_READ_TIMEOUT):
                    await refresh()
            except Exception as exc:
                log.warning("metrics: a store reading failed (%s)", type(exc).__name__)
        own = generate_latest(self.registry)
        if self._siblings is None:
            return own
        return await self._siblings.page(own, self._shared_families)

    async def _refresh_outbox(self) -> None:
        store = self._sources.store()
        if store is None:
            return
        try:
            async with asyncio.timeout(STORE_READ_TIMEOUT):
                counts = await store.outbox_counts()
        except Exception as exc:       # an unreachable store must not take /metrics down with it
            log.warning("metrics: could not count outbox rows (%s)", type(exc).__name__)
            return
        self.webhook_backlog.set(counts.get("pending", 0))
        self.webhook_dead_letters.set(counts.get("dead", 0))


class SessionMetrics:
    """One session's view: label children bound once, and when each piece of audio arrived."""

    __slots__ = ("_metrics", "_audio", "_audio_counted", "_decode_errors", "_held_back", "_arrivals", "_measured_until",
                 "_provider_latency")

    def __init__(self, metrics: GatewayMetrics, codec: str) -> None:
        self._metrics = metrics
        self._audio = metrics.audio_seconds.labels(codec)
        self._audio_counted = 0          # audio-clock samples already in the audio counter
        self._decode_errors = metrics.decode_errors.labels(codec)
        self._held_back = metrics.held_back.labels(codec)
        self._arrivals = AudioArrivals()
        self._measured_until = 0.0       # audio-clock end of the latest segment end measured
        self._provider_latency: dict = {}   # provider -> its histogram child (labels() locks per call)

    def audio_arrived(self, clock_samples: int, at: float) -> None:
        """A message arrived at ``at`` (monotonic), bringing the audio to ``clock_samples``: the
        base of provider latency."""
        self._arrivals.add(clock_samples, at)

    def audio_through(self, clock_samples: int) -> None:
        """The session has passed on audio up to ``clock_samples``: the audio counter catches up.
        Called every batch interval and at the end, not per 40 ms piece: the counter takes a lock
        per increment, and at a few hundred streams a call per piece was ~1.5 % of the core."""
        new = clock_samples - self._audio_counted
        if new > 0:
            self._audio.inc(new / TARGET_RATE)
            self._audio_counted = clock_samples

    def decode_error(self) -> None:
        self._decode_errors.inc()

    def held_back(self) -> None:
        self._held_back.inc()

    def word(self, provider: str, end: float) -> None:
        """A final word ending at ``end`` (audio-clock seconds) came from ``provider``."""
        arrived = self._arrivals.arrival(end)
        if arrived is not None:
            histogram = self._provider_latency.get(provider)
            if histogram is None:
                histogram = self._provider_latency[provider] = self._metrics.provider_latency.labels(provider)
            histogram.observe(max(0.0, time.monotonic() - arrived))

    def batch_sent(self, segments: Iterable["Segment"], time_offset: float) -> None:
        """A batch went out; segments are on conversation time, ``time_offset`` maps them back.

        Only ends past the last one measured count: a segment re-sent for a new speaker label,
        or one resumed from an earlier session, says nothing about speech-to-screen latency."""
        now = time.monotonic()
        for segment in segments:
            end = segment.end - time_offset
            if end <= self._measured_until:
                continue
            arrived = self._arrivals.arrival(end)
            if arrived is not None:
                self._metrics.segment_latency.observe(max(0.0, now - arrived))
                self._measured_until = end

    def stt_failure(self, provider: str, reason: str) -> None:
        self._metrics.stt_failures.labels(provider, reason).inc()

    def stt_switch(self, status: dict) -> None:
        self._metrics.stt_switches.labels(str(status.get("previous_provider")), str(status.get("provider")),
                                          str(status.get("reason"))).inc()

    def closed(self, code: int) -> None:
        self._metrics.connection_closed(code)


class AudioArrivals:
    """When the audio up to each audio-clock sample arrived (monotonic time), for the last
    ``ARRIVAL_WINDOW_SECONDS`` of audio. One entry per audio message; lookups scan from the
    newest end, because the words asked about are nearly always a second or two old."""

    __slots__ = ("_entries", "_window", "_start")

    def __init__(self, window_seconds: float = ARRIVAL_WINDOW_SECONDS) -> None:
        self._entries: collections.deque[tuple[int, float]] = collections.deque()   # (end sample, arrived)
        self._window = int(window_seconds * TARGET_RATE)
        self._start = 0             # first sample still covered (end of the last evicted message)

    def add(self, clock_samples: int, at: float) -> None:
        self._entries.append((clock_samples, at))
        while self._entries[0][0] < clock_samples - self._window:
            self._start = self._entries.popleft()[0]

    def arrival(self, seconds: float) -> float | None:
        """Arrival time of the message holding the sample at ``seconds``; None when that audio
        is older than the window."""
        sample = int(seconds * TARGET_RATE)
        if not self._entries or sample < self._start:
            return None
        found = self._entries[-1][1]   # an engine may round a word's end past the last sample
        for end, at in reversed(self._entries):
            if end < sample:
                break
            found = at
        return found


class _DeliveryCollector:
    """``harken_webhook_deliveries_total{result}`` read from the deliverer's own counters."""

    def __init__(self, deliverer: Callable[[], Any]) -> None:
        self._deliverer = deliverer

    def describe(self):
        return [CounterMetricFamily("harken_webhook_deliveries", "webhook delivery attempts, by result",
                                    labels=["result"])]

    def collect(self):
        family = CounterMetricFamily("harken_webhook_deliveries", "webhook delivery attempts, by result",
                                     labels=["result"])
        deliverer = self._deliverer()
        if deliverer is not None:
            family.add_metric(["delivered"], deliverer.delivered)
            family.add_metric(["failed"], deliverer.failed_attempts)     # retried later
            family.add_metric(["dead"], deliverer.dead)                  # given up
        yield family


class _StoreLockCollector:
    """``harken_store_lock_waits_total`` read from the store's own counter (``Store.lock_waits``)."""

    HELP = "SQLite write transactions that found another process holding the write lock and waited in a thread"

    def __init__(self, store: Callable[[], "Store | None"]) -> None:
        self._store = store

    def describe(self):
        return [CounterMetricFamily("harken_store_lock_waits", self.HELP)]

    def collect(self):
        store = self._store()
        yield CounterMetricFamily("harken_store_lock_waits", self.HELP, value=store.lock_waits if store else 0)


# --- the route ------------------------------------------------------------------------------------

def metrics_routes(settings: Settings) -> list[Route]:
    """``GET /metrics`` unless ``metrics`` is off; behind ``metrics_token`` when one is set."""
    if not settings.metrics:
        return []
    if not settings.metrics_token and not is_loopback(settings.host):
        log.warning("/metrics is open to anyone who can reach %s (it shows load and error counts, no user "
                    "data); set metrics_token or block it at the proxy", settings.host)

    async def metrics_endpoint(request: Request) -> Response:
        expected = settings.metrics_token
        if expected:
            given = bearer_token(request.headers.get("authorization")) or ""
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return PlainTextResponse("metrics need Authorization: Bearer <metrics_token>\n", status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        gateway = getattr(request.app.state, "gateway", None)
        if gateway is None:
            return PlainTextResponse("starting\n", status_code=503)
        return Response(await gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return [Route("/metrics", metrics_endpoint)]
