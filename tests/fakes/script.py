"""What the fake providers share: a scripted transcript, audio that says where it is, and the
WebSocket server plumbing (handshake refusals, failure plans, bookkeeping).

A real engine transcribes what it hears. A fake cannot, so the audio carries a *timecode*: sample
``i`` of the stream encodes ``i`` itself (even samples hold bits 0–14 of ``i // 2`` and are ≥ 0,
odd samples hold bits 15–29 as ``-1 - bits`` and are < 0, so any two neighbours give the
position). A fake connection reads where its audio starts (a replay after a failover starts
mid-stream) and checks every frame continues where the last one ended, then reports the
scripted words it has fully heard once audio time passes a word's end plus ``delay``, with times
relative to its own first sample, as a real provider does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

SAMPLE_RATE = 16000
BYTES_PER_SECOND = 2 * SAMPLE_RATE

_VOCABULARY = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu harbour lantern meadow quartz "
    "saffron timber violet walnut ember falcon glacier horizon island jasmine kestrel"
).split()


@dataclass(frozen=True)
class ScriptWord:
    text: str            # as the engine would punctuate it
    start: float
    end: float
    speaker: int = 0     # -1: a speaker the engine could not tell
    confidence: float = 0.95

    def shifted(self, offset: float) -> "ScriptWord":
        return replace(self, start=round(self.start + offset, 6), end=round(self.end + offset, 6))


def make_script(seed: int, duration: float = 60.0, speakers: int = 2) -> list[ScriptWord]:
    """Random speech: words of 0.12–0.6 s, short gaps, a pause of 0.4–2.5 s about every tenth
    word (where the speaker may change and a sentence ends). Times are whole milliseconds."""
    rng = random.Random(seed)
    words: list[ScriptWord] = []
    t, speaker, sentence_start = rng.uniform(0.2, 0.8), 0, True
    while True:
        length = rng.uniform(0.12, 0.6)
        if t + length > duration - 0.6:
            break
        pause = rng.random() < 0.1
        text = rng.choice(_VOCABULARY)
        if sentence_start:
            text = text.capitalize()
        if pause:
            text += rng.choice(".?!")
        elif rng.random() < 0.08:
            text += ","
        words.append(ScriptWord(text, round(t, 3), round(t + length, 3), speaker))
        sentence_start = pause
        gap = rng.uniform(0.4, 2.5) if pause else rng.uniform(0.0, 0.2)
        if pause and speakers > 1 and rng.random() < 0.5:
            speaker = (speaker + 1) % speakers
        t = round(t + length + gap, 3)
    return words


def timecode(start: int, count: int) -> np.ndarray:
    """``count`` samples of timecode audio beginning at sample ``start``."""
    index = np.arange(start, start + count, dtype=np.int64)
    k = index >> 1
    return np.where(index & 1, -1 - ((k >> 15) & 0x7FFF), k & 0x7FFF).astype(np.int16)


def position_of(samples: np.ndarray) -> int | None:
    """The stream position of ``samples[0]`` read back from timecode (needs 3 samples)."""
    if samples.size < 3:
        return None
    j = 0 if samples[0] >= 0 else 1
    low, high = int(samples[j]), -1 - int(samples[j + 1])
    if low < 0 or high < 0:
        return None
    return 2 * (low | (high << 15)) - j


class Listener:
    """One fake connection's ear: where its audio started, how much it heard, what is due."""

    def __init__(self, script: list[ScriptWord], delay: float, partial_words: bool = False, time_shift: float = 0.0):
        self.script, self.delay, self.partial_words, self.time_shift = script, delay, partial_words, time_shift
        self.origin: int | None = None          # stream sample index of this connection's first sample
        self.received = 0                       # bytes of audio
        self.discontinuities = 0                # frames that did not continue the previous one
        self.frames = 0
        self._next = 0
        self._fragment: ScriptWord | None = None

    def hear(self, data: bytes) -> None:
        samples = np.frombuffer(data[: len(data) // 2 * 2], dtype=np.int16)
        if self.origin is None:
            self.origin = position_of(samples)
            if self.origin is not None:
                self._start_at(self.origin / SAMPLE_RATE)
        elif self.received % 2 == 0 and samples.size >= 3:
            if position_of(samples) != self.origin + self.received // 2:
                self.discontinuities += 1
        self.received += len(data)
        self.frames += 1

    def _start_at(self, offset: float) -> None:
        """Words that began before this connection's first sample were not heard (whole)."""
        while self._next < len(self.script) and self.script[self._next].start < offset - 1e-6:
            word = self.script[self._next]
            if self.partial_words and word.end > offset + 0.02:
                self._fragment = replace(word, text=word.text[len(word.text) // 2:] or "x", start=offset)
            self._next += 1

    @property
    def offset(self) -> float:
        return (self.origin or 0) / SAMPLE_RATE

    @property
    def now(self) -> float:
        """Seconds of audio this connection received."""
        return self.received / BYTES_PER_SECOND

    @property
    def position(self) -> float:
        """Stream time (the script's clock) of the latest sample heard."""
        return self.offset + self.now

    def due(self, flush: bool = False) -> list[ScriptWord]:
        """Words (in connection time) now ready: heard to their end plus ``delay`` (or just to
        their end when flushing), each once."""
        if self.origin is None:
            return []
        limit = self.position - (0.0 if flush else self.delay)
        out = []
        shift = self.time_shift - self.offset
        if self._fragment is not None and self._fragment.end <= limit:
            out.append(self._fragment.shifted(shift))
            self._fragment = None
        while self._next < len(self.script) and self.script[self._next].end <= limit + 1e-9:
            out.append(self.script[self._next].shifted(shift))
            self._next += 1
        return out

    def settled(self, flush: bool = False) -> float:
        """Connection time up to which every word has been reported by ``due``."""
        limit = self.now - (0.0 if flush else self.delay)
        if self._fragment is not None:
            limit = min(limit, self._fragment.start - self.offset)
        if self._next < len(self.script):
            limit = min(limit, self.script[self._next].start - self.offset)
        return max(0.0, round(limit, 6))


@dataclass
class Plan:
    """How one connection behaves. Plans queue on a server, one per connection attempt."""

    handshake: int | None = None     # refuse the upgrade with this HTTP status
    handshake_delay: float = 0.0     # answer the upgrade this many (wall-clock) seconds late
    fail_at: float | None = None     # stream seconds (script clock) at which the connection fails
    kind: str = "close"              # close (the provider's own error close) | drop | stall | malformed
    partial_words: bool = False      # also report the tail of a word heard only in part
    time_shift: float = 0.0          # report every time this much late (another engine's timing)


@dataclass
class Connection:
    request: Request
    plan: Plan
    at: float = field(default_factory=time.monotonic)
    listener: Listener | None = None
    controls: Counter = field(default_factory=Counter)
    failed: bool = False
    failed_at: float | None = None            # time.monotonic() when the plan's failure struck
    stalled: bool = False
    config: Any = None


class FakeServer:
    """Base of the three fakes: ``websockets.serve`` on 127.0.0.1, any port."""

    name = "fake"
    auth_scheme = "Bearer"
    path = "/"

    def __init__(self, script: list[ScriptWord], *, key: str = "test-key", delay: float = 0.05,
                 compression: str | None = None):
        self.script, self.key, self.delay = script, key, delay
        # Whether the real services negotiate permessage-deflate is not documented; it costs the
        # client CPU on every audio frame, so it is off unless a test or benchmark asks for it.
        self.compression = compression
        self.plans: list[Plan] = []
        self.connections: list[Connection] = []     # every handshake, refused ones included
        self._by_socket: dict[int, Connection] = {}
        self._server: Any = None
        self._ids = itertools.count(1)

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> "FakeServer":
        # max_queue=None: a client feeding audio much faster than real time must not fill the
        # receive queue while the server closes, or the client's close reply is never read.
        self._server = await serve(self._handle, "127.0.0.1", 0, process_request=self._process_request,
                                   max_size=2 ** 22, max_queue=None, compression=self.compression)
        return self

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def __aenter__(self) -> "FakeServer":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"

    # --- what tests look at -----------------------------------------------------------------
    @property
    def accepted(self) -> list[Connection]:
        return [c for c in self.connections if c.listener is not None]

    def discontinuities(self) -> int:
        return sum(c.listener.discontinuities for c in self.accepted)

    # --- plumbing -----------------------------------------------------------------------------
    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        plan = self.plans.pop(0) if self.plans else Plan()
        connection = Connection(request, plan)
        self.connections.append(connection)
        self._by_socket[id(ws)] = connection
        if plan.handshake_delay:
            await asyncio.sleep(plan.handshake_delay)
        if plan.handshake is not None:
            return self.refuse(ws, plan.handshake)
        if request.headers.get("Authorization") != f"{self.auth_scheme} {self.key}":
            return self.refuse(ws, 401)
        return None

    def refuse(self, ws: ServerConnection, status: int) -> Response:
        return ws.respond(status, f"refused with {status}\n")

    async def _handle(self, ws: ServerConnection) -> None:
        connection = self._by_socket.pop(id(ws))
        plan = connection.plan
        connection.listener = Listener(self.script, self.delay, plan.partial_words, plan.time_shift)
        try:
            await self.session(ws, connection)
        except ConnectionClosed:
            pass

    async def session(self, ws: ServerConnection, connection: Connection) -> None:
        raise NotImplementedError

    async def send(self, ws: ServerConnection, connection: Connection, message: dict) -> None:
        if not connection.stalled:
            await ws.send(json.dumps(message))

    def failure_due(self, connection: Connection) -> bool:
        plan = connection.plan
        return (plan.fail_at is not None and not connection.failed and connection.listener.origin is not None
                and connection.listener.position >= plan.fail_at)

    async def fail(self, ws: ServerConnection, connection: Connection) -> bool:
        """Carry out the plan's failure; True when the connection is gone (stop serving it)."""
        connection.failed = True
        connection.failed_at = time.monotonic()
        kind = connection.plan.kind
        if kind == "drop":
            ws.transport.abort()            # the network went away: no close frame
            return True
        if kind == "stall":
            connection.stalled = True       # keep reading, never answer again
            return False
        if kind == "malformed":
            await ws.send('{"type": "Results", "channel": {"alternatives": [{"words": [')
            return False
        await self.provider_error_close(ws, connection)
        return True

    async def provider_error_close(self, ws: ServerConnection, connection: Connection) -> None:
        raise NotImplementedError


def new_id(server: FakeServer) -> str:
    return f"{server.name}-{next(server._ids):06d}-0000-4000-8000-000000000000"


async def idle_recv(ws: ServerConnection, timeout: float) -> Any:
    """``recv`` that raises ``TimeoutError`` after ``timeout`` seconds without a message."""
    return await asyncio.wait_for(ws.recv(), timeout)


@dataclass
class Played:
    words: list                      # Word objects as the stream yielded them
    providers: list[str]             # stream.provider_name right after each word (FallbackStream)
    error: BaseException | None = None       # what iteration raised
    send_error: BaseException | None = None  # what send() raised (sending stops there)


async def play(stream: Any, seconds: float, *, chunk: float = 0.1, speed: float | None = None,
               pause_every: float = 1.0, close: bool = True, start_sample: int = 0) -> Played:
    """Send ``seconds`` of timecode audio to ``stream`` while collecting its words, then close it.

    ``speed`` is times real time (None: as fast as the stream takes it, yielding to the loop once
    per ``pause_every`` seconds of audio so sockets and fakes keep up).
    """
    played = Played([], [])

    async def read() -> None:
        try:
            async for word in stream:
                played.words.append(word)
                played.providers.append(getattr(stream, "provider_name", "?"))
        except Exception as exc:  # noqa: BLE001 - the caller asserts on it
            played.error = exc

    reader = asyncio.create_task(read())
    step = int(chunk * SAMPLE_RATE)
    total = int(seconds * SAMPLE_RATE)
    loop = asyncio.get_running_loop()
    began = loop.time()
    for n, position in enumerate(range(start_sample, start_sample + total, step)):
        try:
            await stream.send(timecode(position, min(step, start_sample + total - position)))
        except Exception as exc:  # noqa: BLE001 - the caller asserts on it
            played.send_error = exc
            break
        sent = (position - start_sample + step) / SAMPLE_RATE
        if speed is not None:
            await asyncio.sleep(max(0.0, began + sent / speed - loop.time()))
        elif n % max(1, int(pause_every / chunk)) == 0:
            await asyncio.sleep(0.001)
    if close:
        await stream.close()
        await reader
    else:
        reader.cancel()
    return played
