"""``harken loadtest``: many device-like clients at once, every reply checked, latency measured.

Each of ``streams`` clients connects to ``/v4/listen`` (spread over ``ramp`` seconds), waits for
``service_status: ready``, then sends one recording, encoded once for the codec and looped, at
real-time pace for ``duration`` seconds, in the device's framing (one Opus packet per message).
Frames due in one ``tick`` go out together, as a phone relaying BLE notifications would, so
hundreds of clients fit in one load-generator process.

Latency: the client remembers when it sent every frame. With the null provider
(``stt_service=null``, see ``harken.stt.null``) every word names its end in audio time, so each
word's latency is its arrival minus the send time of the frame that completed it; each word is
counted once, however often its segment is re-sent as it grows. With a real engine the segment's
``end`` stands in for the word (exact only for a new conversation, whose time 0 is the stream's).
Besides every word's latency, the report gives the *steady* latency: only words whose frame was
sent while every stream was sending (after the last one started, before the first one stopped),
which is the latency of N concurrent streams without the connection ramp and the closing.

Every reply is checked: segment arrays must carry the PROTOCOL §4 keys, events must be objects
with a ``type``, and with the null provider every word must arrive, once, in order. A stream fails
with the first problem it meets (a close code, a connect error, a bad reply, missing words); the
report groups failures by that cause.

The server's own figures come from ``/metrics`` when the server has one (Prometheus text format):
CPU seconds and resident memory, and every ``harken_*`` sample that changed during the run.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Callable, TextIO
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import orjson
import websockets

from .client import device_messages, listen_url
from .stt.null import WORD_SECONDS, audio_times

SEGMENT_KEYS = ("id", "text", "speaker", "speaker_id", "start", "end")
HEARTBEAT = bytes([0x8A, 0x00])       # the Omi app's keepalive: activity, not audio
IDLE_HEARTBEAT_SECONDS = 5.0
CLOSE_WAIT_SECONDS = 10.0
MAX_UNSENT_BYTES = 1 << 20            # frames queued in the socket beyond this: the server stopped reading


@dataclass
class LoadTestConfig:
    url: str                              # ws://host:port (or a full /v4/listen URL)
    streams: int = 10
    duration: float = 20.0                # seconds of audio each stream sends
    codec: str = "opus"
    sample_rate: int | None = None        # default: the codec's usual rate
    language: str = "en"
    stt_service: str | None = "null"
    tokens: Callable[[int], str | None] | None = None   # stream index → bearer token
    uid_prefix: str = ""                  # with auth=none: uid=<prefix><index> query parameter
    ramp: float | None = None             # seconds over which connections open (default: 20 ms each, ≤ 10 s)
    tick: float = 0.02                    # frames due within one tick are sent together
    settle: float = 1.5                   # seconds waited after the last frame for the last words
    idle: bool = False                    # connect and hold, sending only heartbeats (memory per connection)
    conversation_timeout: int | None = None   # the listen parameter (-1: the longest); None = server default
    open_timeout: float = 30.0

    def ramp_seconds(self) -> float:
        return self.ramp if self.ramp is not None else min(10.0, 0.02 * self.streams)


@dataclass
class StreamOutcome:
    index: int
    connect_seconds: float | None = None  # handshake done
    ready_seconds: float | None = None    # service_status ready received
    latencies: list[float] = field(default_factory=list)
    latency_sent_at: list[float] = field(default_factory=list)   # monotonic send time of each latency's frame
    sending: tuple[float, float] | None = None   # monotonic first and last frame times
    words: int = 0
    segment_versions: int = 0
    frames_sent: int = 0
    max_lag: float = 0.0                  # how far behind its schedule this client fell
    failure: str | None = None            # first problem met, None if the stream was clean

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason


@dataclass
class Progress:
    """Live counters shared by all clients (single event loop: plain ints are enough)."""

    streams: int
    connected: int = 0
    open_now: int = 0
    segments: int = 0
    words: int = 0
    failed: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        return (f"{time.monotonic() - self.started_at:6.1f}s  connected {self.connected}/{self.streams}  "
                f"open {self.open_now}  segments {self.segments}  words {self.words}  errors {self.failed}")


@dataclass
class LoadReport:
    config: LoadTestConfig
    outcomes: list[StreamOutcome]
    wall_seconds: float
    metrics_before: dict[str, float] | None
    metrics_after: dict[str, float] | None

    def _values(self, name: str) -> list[float]:
        return [v for o in self.outcomes if (v := getattr(o, name)) is not None]

    @property
    def latencies(self) -> np.ndarray:
        return np.fromiter((x for o in self.outcomes for x in o.latencies), dtype=float)

    @property
    def errors(self) -> collections.Counter:
        return collections.Counter(o.failure for o in self.outcomes if o.failure)

    def steady_window(self) -> tuple[float, float] | None:
        """From the moment the last stream started sending to the moment the first one stopped."""
        spans = [o.sending for o in self.outcomes if o.sending is not None]
        if len(spans) < len(self.outcomes) or not spans:
            return None
        start, end = max(s for s, _ in spans), min(e for _, e in spans)
        return (start, end) if end > start else None

    @property
    def steady_latencies(self) -> np.ndarray:
        window = self.steady_window()
        if window is None:
            return np.zeros(0)
        start, end = window
        return np.fromiter((x for o in self.outcomes for x, at in zip(o.latencies, o.latency_sent_at)
                            if start <= at <= end), dtype=float)

    def latency_percentiles(self, steady: bool = False) -> dict[str, float]:
        values = self.steady_latencies if steady else self.latencies
        if not values.size:
            return {}
        return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)} | {"max": float(values.max())}

    def server_figures(self) -> dict[str, float]:
        """Changes over the run of the server's /metrics samples (CPU, memory, harken_*)."""
        before, after = self.metrics_before or {}, self.metrics_after or {}
        figures: dict[str, float] = {}
        if "process_cpu_seconds_total" in after and "process_cpu_seconds_total" in before:
            figures["cpu seconds"] = after["process_cpu_seconds_total"] - before["process_cpu_seconds_total"]
        if "process_resident_memory_bytes" in after:
            figures["resident MiB"] = after["process_resident_memory_bytes"] / 2**20
        def change(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)

        for name, value in sorted(after.items()):
            if not name.startswith("harken_") or name.endswith(("_created", "_bucket", "_sum")):
                continue
            if name.endswith("_count"):            # a histogram: its mean over the run
                if change(name):
                    figures[name.removesuffix("_count") + " mean"] = change(name.removesuffix("_count") + "_sum") / change(name)
            elif name.endswith("_total"):
                if change(name):
                    figures[name] = change(name)
            else:
                figures[name] = value              # a gauge: its value now
        return figures

    def lines(self) -> list[str]:
        c = self.config
        out = [f"{c.streams} streams × {c.duration:g} s of {c.codec}"
               f"{' (idle)' if c.idle else ''}, stt_service={c.stt_service or '-'}: {self.wall_seconds:.1f} s"]
        connect, ready = self._values("connect_seconds"), self._values("ready_seconds")
        if connect:
            out.append(f"connect   p50 {_ms(np.percentile(connect, 50))}  p95 {_ms(np.percentile(connect, 95))}  "
                       f"max {_ms(max(connect))}   ready p50 {_ms(np.percentile(ready, 50)) if ready else '-'}  "
                       f"max {_ms(max(ready)) if ready else '-'}")
        latency = self.latency_percentiles()
        if latency:
            out.append("latency   " + "  ".join(f"{k} {_ms(v)}" for k, v in latency.items())
                       + f"   ({self.latencies.size} words)")
        steady = self.latency_percentiles(steady=True)
        if steady:
            start, end = self.steady_window()
            out.append("steady    " + "  ".join(f"{k} {_ms(v)}" for k, v in steady.items())
                       + f"   ({self.steady_latencies.size} words sent in the {end - start:.1f} s all streams were sending)")
        lags = self._values("max_lag")
        frames = sum(o.frames_sent for o in self.outcomes)
        out.append(f"sent      {frames} frames; client pace lag max {_ms(max(lags) if lags else 0.0)}"
                   f"   segments received {sum(o.segment_versions for o in self.outcomes)}")
        errors = self.errors
        out.append("errors    " + (", ".join(f"{reason}: {n}" for reason, n in errors.most_common()) or "none"))
        figures = self.server_figures()
        if figures:
            out.append("server    " + "  ".join(f"{k} {v:.4g}" for k, v in figures.items()))
        elif self.metrics_after is None:
            out.append("server    no /metrics endpoint")
        return out


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def default_audio(seconds: float = 6.0) -> np.ndarray:
    """Speech-like 16 kHz audio when no recording is given: noise shaped into ~4 Hz syllables."""
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t) ** 2)
    noise = np.convolve(rng.standard_normal(t.size), np.ones(8) / 8, mode="same")
    return (noise * envelope * 6000).astype(np.int16)


def metrics_url(ws_url: str) -> str:
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "/metrics", "", ""))


def fetch_metrics(url: str, timeout: float = 5.0) -> dict[str, float] | None:
    """Prometheus samples by name (labels summed), or None if the server has no /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    samples: dict[str, float] = collections.defaultdict(float)
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name] += sample.value
    except ValueError:
        return None          # a /metrics that is not Prometheus text (a web page, say)
    return dict(samples)


async def run_load(config: LoadTestConfig, pcm16k: np.ndarray | None = None,
                   progress_out: TextIO | None = None) -> LoadReport:
    """Run the load and return the report; ``progress_out`` gets a live progress line."""
    from .codecs import default_rate

    rate = config.sample_rate or default_rate(config.codec)
    messages, message_seconds = device_messages(default_audio() if pcm16k is None else pcm16k, config.codec, rate)
    base_params = dict(codec=config.codec, sample_rate=rate, language=config.language,
                       stt_service=config.stt_service, conversation_timeout=config.conversation_timeout)
    metrics_at = metrics_url(config.url)
    loop = asyncio.get_running_loop()
    before = await loop.run_in_executor(None, fetch_metrics, metrics_at)

    if config.tokens is not None:
        # Minted before the clock starts (a signature each, ~1 ms), not on the clients' loop.
        minted = await loop.run_in_executor(None, lambda: [config.tokens(i) for i in range(config.streams)])
        config = dataclasses.replace(config, tokens=minted.__getitem__)
    progress = Progress(config.streams)
    reporter = asyncio.create_task(_report_progress(progress, progress_out)) if progress_out else None
    ramp = config.ramp_seconds()
    started = time.monotonic()
    clients = [
        _Client(i, config, listen_url(config.url, **base_params,
                                      uid=f"{config.uid_prefix}{i}" if config.uid_prefix else None),
                messages, message_seconds, progress)
        for i in range(config.streams)
    ]
    try:
        outcomes = await asyncio.gather(*(c.run(start_delay=ramp * i / max(1, config.streams))
                                          for i, c in enumerate(clients)))
    finally:
        if reporter is not None:
            reporter.cancel()
            await asyncio.gather(reporter, return_exceptions=True)
            _draw(progress_out, progress.line(), final=True)
    wall = time.monotonic() - started
    after = await loop.run_in_executor(None, fetch_metrics, metrics_at) if before is not None else None
    return LoadReport(config, list(outcomes), wall, before, after)


async def _report_progress(progress: Progress, out: TextIO) -> None:
    every = 0.5 if out.isatty() else 10.0
    while True:
        await asyncio.sleep(every)
        _draw(out, progress.line())


def _draw(out: TextIO, line: str, final: bool = False) -> None:
    if out.isatty():
        out.write("\r\x1b[K" + line + ("\n" if final else ""))
    elif not final:
        out.write(line + "\n")
    out.flush()


class _Client:
    """One device: connect, wait for ready, send frames on schedule, check every reply."""

    def __init__(self, index: int, config: LoadTestConfig, url: str, messages: list[bytes],
                 message_seconds: float, progress: Progress):
        self.config = config
        self.url = url
        self.messages = messages
        self.message_seconds = message_seconds
        self.progress = progress
        self.outcome = StreamOutcome(index)
        self.frame_count = 0 if config.idle else max(1, round(config.duration / message_seconds))
        self.sent_at = np.full(self.frame_count, np.nan)   # monotonic send time of every frame
        self.null_words = config.stt_service == "null"
        self.last_word = 0.0                  # audio time of the newest word seen (null provider)
        self.last_end = 0.0                   # newest segment end seen (other providers)
        self.ready = asyncio.Event()

    async def run(self, start_delay: float) -> StreamOutcome:
        await asyncio.sleep(start_delay)
        token = self.config.tokens(self.outcome.index) if self.config.tokens else None
        headers = {"Authorization": f"Bearer {token}"} if token else None
        began = time.monotonic()
        try:
            ws = await websockets.connect(self.url, additional_headers=headers, max_size=None, compression=None,
                                          open_timeout=self.config.open_timeout, ping_interval=None)
        except Exception as exc:
            self._fail(f"connect: {_describe(exc)}")
            return self.outcome
        self.outcome.connect_seconds = time.monotonic() - began
        self.progress.connected += 1
        self.progress.open_now += 1
        receiver = asyncio.create_task(self._receive(ws, began))
        try:
            await self._converse(ws, receiver)
        except (websockets.ConnectionClosed, TimeoutError):
            pass                              # judged by _check_close below
        finally:
            self.progress.open_now -= 1
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
            await ws.close()
        self._check_close(ws)
        self._check_words()
        return self.outcome

    async def _converse(self, ws, receiver: asyncio.Task) -> None:
        ready = asyncio.ensure_future(self.ready.wait())
        await asyncio.wait([ready, receiver], timeout=self.config.open_timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not self.ready.is_set():
            if not receiver.done():
                self._fail("no ready status")
            return
        if self.config.idle:
            await self._hold(ws, receiver)
        else:
            await self._send_audio(ws, receiver)
            await asyncio.wait([receiver], timeout=self.config.settle)
        if not receiver.done():
            await asyncio.wait_for(ws.close(1000, "load test done"), CLOSE_WAIT_SECONDS)

    async def _send_audio(self, ws, receiver: asyncio.Task) -> None:
        start = time.monotonic()
        seconds, tick, frames = self.message_seconds, self.config.tick, self.messages
        index = 0
        while index < self.frame_count and not receiver.done():
            now = time.monotonic()
            due = min(self.frame_count, int((now - start) / seconds) + 1)
            # Batching by tick delays a frame by up to one tick; beyond that the client is overloaded.
            self.outcome.max_lag = max(self.outcome.max_lag, now - (start + index * seconds))
            # The due frames go out as separate WebSocket messages in one socket write: a write per
            # frame doubles the load generator's cost, and one core must drive hundreds of streams.
            protocol = ws.protocol
            if protocol.state is not websockets.State.OPEN:
                break
            first = index
            while index < due:
                protocol.send_binary(frames[index % len(frames)])
                index += 1
            ws.transport.write(b"".join(protocol.data_to_send()))
            self.sent_at[first:index] = time.monotonic()
            if ws.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
                self._fail("server not reading")
                break
            self.outcome.frames_sent = index
            self.outcome.sending = (start, time.monotonic())
            await asyncio.sleep(max(0.0, start + index * seconds + tick - seconds - time.monotonic()))

    async def _hold(self, ws, receiver: asyncio.Task) -> None:
        deadline = time.monotonic() + self.config.duration
        while not receiver.done() and time.monotonic() < deadline:
            await ws.send(HEARTBEAT)
            await asyncio.wait([receiver], timeout=min(IDLE_HEARTBEAT_SECONDS, deadline - time.monotonic()))

    async def _receive(self, ws, began: float) -> None:
        async for raw in ws:
            now = time.monotonic()
            if raw == "ping":
                continue
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError:
                self._fail("bad reply: not JSON")
                continue
            if isinstance(payload, list):
                self._on_segments(payload, now)
            elif isinstance(payload, dict) and isinstance(payload.get("type"), str):
                if payload["type"] == "service_status" and payload.get("status") == "ready" and not self.ready.is_set():
                    self.outcome.ready_seconds = now - began
                    if self.null_words and payload.get("provider") != "null":
                        # stt_service is a preference: a server without HARKEN_NULL_PROVIDER serves
                        # the stream with its real engine, which is not what this run measures.
                        self._fail("stt_service=null not served (start the server with HARKEN_NULL_PROVIDER=true)")
                        await ws.close(1000, "null provider off")
                        return
                    self.ready.set()
                elif payload["type"] == "error":
                    self._fail(f"error event {payload.get('code')}")
            else:
                self._fail("bad reply: neither a segment array nor an event")

    def _on_segments(self, segments: list, now: float) -> None:
        for segment in segments:
            if not isinstance(segment, dict) or any(k not in segment for k in SEGMENT_KEYS):
                self._fail("bad reply: segment without the PROTOCOL keys")
                continue
            self.outcome.segment_versions += 1
            self.progress.segments += 1
            if self.null_words:
                self._on_null_words(audio_times(segment["text"]), now)
            elif segment["end"] > self.last_end:
                self.last_end = segment["end"]
                self._record_latency(segment["end"], now)

    def _on_null_words(self, times: list[float], now: float) -> None:
        """Words are counted once, the first time they appear; they must come in order, none skipped."""
        for at in times:
            if at <= self.last_word + 1e-6:
                continue                      # a word already seen, re-sent in its growing segment
            if not math.isclose(at, self.last_word + WORD_SECONDS, abs_tol=0.002):
                self._fail("words missing or out of order")
            self.last_word = at
            self.outcome.words += 1
            self.progress.words += 1
            self._record_latency(at, now)

    def _record_latency(self, audio_time: float, now: float) -> None:
        # The frame holding the word's last sample: frames are message_seconds long from time 0.
        index = max(0, math.ceil(audio_time / self.message_seconds - 1e-6) - 1)
        if index < self.sent_at.size and not math.isnan(self.sent_at[index]):
            self.outcome.latencies.append(now - self.sent_at[index])
            self.outcome.latency_sent_at.append(float(self.sent_at[index]))

    def _check_close(self, ws) -> None:
        """Only a close we started, answered with 1000, is clean; a server that closes first fails the stream."""
        protocol = ws.protocol
        received = protocol.close_rcvd
        if received is None:
            self._fail("closed 1006 (no close frame)")
        elif protocol.close_rcvd_then_sent or received.code != 1000:
            self._fail(f"closed {received.code}" + (f" {received.reason}" if received.reason else ""))

    def _check_words(self) -> None:
        if not self.null_words or self.config.idle or self.outcome.failure:
            return
        expected = int(self.outcome.frames_sent * self.message_seconds / WORD_SECONDS + 1e-6)
        if self.outcome.words < expected:
            self._fail("words missing at the end")

    def _fail(self, reason: str) -> None:
        if self.outcome.failure is None:
            self.progress.failed += 1
        self.outcome.fail(reason)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, websockets.InvalidStatus):
        return f"HTTP {exc.response.status_code}"
    return type(exc).__name__


def print_report(report: LoadReport, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    for line in report.lines():
        out.write(line + "\n")
    out.flush()


def load_test_main(args) -> int:
    """``harken loadtest``: the CLI's arguments to a run and a printed report; exit 1 if any stream failed."""
    from .client import local_token_minter, read_wav_16k

    if args.streams < 1 or args.duration <= 0:
        raise ValueError("--streams must be at least 1 and --duration positive")
    prefix = f"loadtest-{uuid.uuid4().hex[:8]}-"      # a fresh user per stream, as devices are
    config = LoadTestConfig(url=args.url, streams=args.streams, duration=args.duration, codec=args.codec,
                            sample_rate=args.sample_rate, language=args.language,
                            stt_service=args.stt_service or None, ramp=args.ramp, idle=args.idle)
    mint = None if args.token else local_token_minter(args.url, args.data_dir)
    if args.token:
        config.tokens = lambda index: args.token
    elif mint is not None:
        config.tokens = lambda index: mint(f"{prefix}{index}")
    else:
        config.uid_prefix = prefix
    if getattr(args, "speech_dir", None):
        from .loadspeech import speech_main

        return speech_main(args, config.tokens, config.uid_prefix)
    pcm = read_wav_16k(args.file) if args.file else None
    report = _run(run_load(config, pcm, progress_out=sys.stderr))
    print_report(report)
    return 1 if report.errors else 0


def _run(coroutine):
    """uvloop when installed (as the server uses): the load generator's own cost per frame is lower."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
