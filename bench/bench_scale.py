"""How many Opus streams one core carries, CPU per stream, and memory per idle connection.

Two servers are measured in the same run, each pinned to one CPU (``taskset``), with the load
generator (``harken.loadtest``) pinned to another:

- the floor: a bare WebSocket relay on the same stack as Harken (uvicorn, websockets-sansio with
  Harken's binary sink, uvloop) that receives the Opus frames without decoding them and every 600 ms sends one small
  segment naming the words a null provider would have produced, so the load tool checks and
  times it exactly as it does Harken;
- Harken with the null provider (``--null-provider``, ``stt_service=null``): the whole gateway
  path (auth, conversation store, Opus decode, fallback stream, segment merging, storage of every
  batch) without a speech engine; ``--servers relay,harken,harken-python`` adds Harken with its
  native Opus reader off (``HARKEN_NATIVE_AUDIO=false``), to see what that reader saves.

For each server, N streams send real-time Opus (10 ms packets; ``--codec opus_fs320``: 20 ms) for ``--seconds``; N grows
through ``--steps`` until segment latency p99 exceeds the 600 ms batch interval + 100 ms, a
stream fails, or the load generator itself falls behind (then the figure is a lower bound).
The servers take turns at each N (relay, Harken, relay, Harken, ...), so a machine whose speed
drifts during the run (a shared VM's does, by 10-30 %) moves both alike and the ratio holds;
``--repeat K`` runs each server K times at each N and judges the medians.
The p99 judged is the steady one: words sent while all N streams were sending, so N concurrent
streams, not the connection ramp or the closing (the p99 over every word is printed beside it).
CPU per stream is the server's CPU time over the window in which all N streams were sending,
divided by N and the window's length; Harken's is also given as a ratio to the relay's at the
same N. Memory: server RSS before and while ``--idle`` connections are open, per connection; and
the server's CPU per such connection, over connecting, holding 8 s and closing them.

Every trial's streams are new users whose conversations get the longest ``conversation_timeout``,
so none is processed (summarised) during the run: with the default 120 s, one trial's 150
conversations timed out together inside a later trial and their processing (all within ~7 s; since then
processing's claims and completions are group-committed, ~1.5 ms of CPU per conversation instead of ~5, see
``bench_store.py --processing``) lifted that trial's p99 by ~70 ms and its maximum to 1.3 s. That is a
once-per-conversation cost, not a per-stream one, and a real node's conversations do not all end
at once; it is left out of the streaming figure rather than landing in random trials.

BENCH_HARKEN_COMMAND replaces ``python -m harken serve`` (to compare a variant of the server).

Run: .venv/bin/python bench/bench_scale.py [--steps 50,100,200,300,400] [--seconds 20] [--idle 200] [--repeat 3]
     [--codec opus|opus_fs320]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harken.codecs.encode import message_duration  # noqa: E402
from harken.config import Settings  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402
from harken.gateway.ws_protocol import SinkingWebSocketProtocol, binary_sink  # noqa: E402
from harken.loadtest import LoadReport, LoadTestConfig, run_load  # noqa: E402
from harken.stt.null import WORD_SECONDS, word_text, WORDS_PER_SENTENCE  # noqa: E402

BATCH_INTERVAL = 0.6
LATENCY_BUDGET = BATCH_INTERVAL + 0.1        # p99 must stay under this
MAX_CLIENT_LAG = 0.1                         # beyond this the load generator, not the server, is the limit
CODECS = ("opus", "opus_fs320")              # one Opus packet per message (10 / 20 ms), as devices send


# --- the floor: a relay that never decodes --------------------------------------------------
async def relay_app(scope, receive, send):
    """ASGI: accept, say ready, count packets (of the codec's duration), send the words they complete every 600 ms."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await receive()                                   # websocket.connect
    codec = urllib.parse.parse_qs(scope["query_string"].decode()).get("codec", ["opus"])[0]
    packet_seconds = message_duration(codec, 16000)
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": '{"type":"service_status","status":"ready"}'})
    frames = 0
    words_sent = 0
    segment_id = uuid.uuid4().hex

    async def flush_loop():
        nonlocal words_sent
        while True:
            await asyncio.sleep(BATCH_INTERVAL)
            words = int(frames * packet_seconds / WORD_SECONDS + 1e-6)
            if words > words_sent:
                text = " ".join(word_text(round(k * WORD_SECONDS * 1000), k % WORDS_PER_SENTENCE == 0)
                                for k in range(words_sent + 1, words + 1))
                segment = (f'[{{"id":"{segment_id}-{words}","text":"{text}","speaker":"SPEAKER_00","speaker_id":0,'
                           f'"start":{words_sent * WORD_SECONDS:.3f},"end":{words * WORD_SECONDS:.3f}}}]')
                words_sent = words
                await send({"type": "websocket.send", "text": segment})

    def count(data: bytes) -> None:
        nonlocal frames
        if len(data) > 2:
            frames += 1

    sink = binary_sink(scope)           # the same socket-to-session path as Harken's
    if sink is not None:
        sink.attach(count)
    flusher = asyncio.create_task(flush_loop())
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                count(message["bytes"])
    finally:
        flusher.cancel()


def serve_relay(port: int) -> None:
    import uvicorn

    uvicorn.run(relay_app, host="127.0.0.1", port=port, ws=SinkingWebSocketProtocol, loop="uvloop", http="httptools",
                lifespan="off", log_level="warning", access_log=False)


# --- servers under test ---------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(cpu: int | None) -> list[str]:
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    data_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def tokens(self):
        if self.data_dir is None:
            return None
        settings = Settings(data_dir=self.data_dir)
        run = uuid.uuid4().hex[:8]
        return lambda i: mint_local_token(settings, f"scale-{run}-{i}", 3600)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_harken(data_dir: Path, cpu: int | None, name: str = "harken") -> Server:
    """``harken``: as configured by default; ``harken-python``: with the native Opus reader off."""
    port = free_port()
    env = dict(os.environ, HARKEN_DATA_DIR=str(data_dir), HARKEN_PORT=str(port), HARKEN_LOG_LEVEL="warning",
               HARKEN_NULL_PROVIDER="true", HARKEN_IDLE_TIMEOUT="600",
               # every stream and idle socket comes from 127.0.0.1: no per-address cap here
               HARKEN_MAX_CONNECTIONS_PER_CLIENT="0",
               HARKEN_NATIVE_AUDIO="false" if name == "harken-python" else "true")
    command = os.environ.get("BENCH_HARKEN_COMMAND", f"{sys.executable} -m harken serve").split()
    process = subprocess.Popen([*pinned(cpu), *command], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/readyz", process)
    # taskset execs the interpreter: the pid is the server's own.
    return Server(name, process, port, data_dir)


def start_relay(cpu: int | None) -> Server:
    port = free_port()
    process = subprocess.Popen([*pinned(cpu), sys.executable, __file__, "--serve-relay", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/", process, any_status=True)
    return Server("relay", process, port)


def wait_ready(url: str, process: subprocess.Popen, any_status: bool = False, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            if any_status:
                return
        except OSError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not become ready")


# --- one step -------------------------------------------------------------------------------
@dataclass
class Trial:
    """One run of N streams against one server."""
    report: LoadReport
    cpu_per_stream: float          # fraction of one core per stream, over the all-sending window

    @property
    def p99(self) -> float:
        """Steady state: words sent while all N streams were sending (loadtest.LoadReport)."""
        return self.report.latency_percentiles(steady=True).get("p99", float("inf"))

    @property
    def client_lag(self) -> float:
        """p95 over streams of each stream's worst lag (a shared machine's odd stall is no verdict)."""
        lags = [o.max_lag for o in self.report.outcomes]
        return float(np.percentile(lags, 95)) if lags else 0.0


@dataclass
class Step:
    """``--repeat`` trials of one server at one N: judged on the medians, any error fails it."""
    server: str
    streams: int
    trials: list[Trial]

    def _median(self, values) -> float:
        return float(np.median(list(values)))

    @property
    def p99(self) -> float:
        return self._median(t.p99 for t in self.trials)

    @property
    def cpu_per_stream(self) -> float:
        return self._median(t.cpu_per_stream for t in self.trials)

    @property
    def client_lag(self) -> float:
        return self._median(t.client_lag for t in self.trials)

    @property
    def errors(self) -> collections.Counter:
        return sum((trial.report.errors for trial in self.trials), collections.Counter())

    @property
    def passed(self) -> bool:
        return not self.errors and self.p99 < LATENCY_BUDGET

    def _spread(self, values, scale: float, digits: int) -> str:
        """`` [min–max]`` over the trials, when there are several."""
        values = list(values)
        if len(values) < 2:
            return ""
        return f" [{min(values) * scale:.{digits}f}–{max(values) * scale:.{digits}f}]"

    def line(self) -> str:
        p50 = self._median(t.report.latency_percentiles(steady=True).get("p50", float("nan")) for t in self.trials)
        everything = self._median(t.report.latency_percentiles().get("p99", float("nan")) for t in self.trials)
        errors = dict(self.errors)
        count = sum(errors.values())
        median = " (medians of %d)" % len(self.trials) if len(self.trials) > 1 else ""
        return (f"  {self.server:6s} N={self.streams:4d}{median}  p50 {p50 * 1000:5.0f} ms  "
                f"p99 {self.p99 * 1000:6.0f} ms{self._spread((t.p99 for t in self.trials), 1000, 0)} "
                f"(with ramp and close {everything * 1000:5.0f})  "
                f"CPU/stream {self.cpu_per_stream * 100:6.3f} %"
                f"{self._spread((t.cpu_per_stream for t in self.trials), 100, 3)} of a core  "
                f"errors {count}{' ' + str(errors) if count else ''}  "
                f"client lag {self.client_lag * 1000:.0f} ms{'  (client-bound)' if self.client_lag > MAX_CLIENT_LAG else ''}"
                f"  {'ok' if self.passed else 'OVER'}")


async def run_trial(server: Server, streams: int, seconds: float, codec: str) -> Trial:
    config = LoadTestConfig(url=server.url, streams=streams, duration=seconds, codec=codec, sample_rate=16000,
                            stt_service="null", tokens=server.tokens(), uid_prefix="" if server.data_dir else "u",
                            conversation_timeout=-1)
    ramp = config.ramp_seconds()
    window = (ramp + 1.5, seconds - 0.5)         # every stream is connected and sending (connect < 1.5 s)
    if window[1] - window[0] < 3:
        raise SystemExit(f"--seconds {seconds} is too short for {streams} streams (ramp {ramp:.1f} s)")

    async def sample_cpu() -> float:
        await asyncio.sleep(window[0])
        before, t0 = server.cpu_seconds(), time.monotonic()
        await asyncio.sleep(window[1] - window[0])
        return (server.cpu_seconds() - before) / (time.monotonic() - t0)

    cores, report = await asyncio.gather(sample_cpu(), run_load(config))
    return Trial(report, cores / streams)


async def idle_connections(server: Server, connections: int) -> tuple[float, float]:
    """RSS added per idle connection (MiB), sampled mid-hold, and the server's CPU seconds per
    connection over connecting ``connections`` streams, holding them 8 s and closing them (what a
    ramp of reconnecting clients costs, e.g. after a failover)."""
    await asyncio.sleep(1.0)
    before, cpu_before = server.rss_mib(), server.cpu_seconds()
    config = LoadTestConfig(url=server.url, streams=connections, duration=8.0, idle=True,
                            stt_service="null", tokens=server.tokens(), uid_prefix="" if server.data_dir else "u")

    async def sample() -> float:
        await asyncio.sleep(config.ramp_seconds() + 5.0)
        return server.rss_mib()

    during, report = await asyncio.gather(sample(), run_load(config))
    await asyncio.sleep(1.0)                     # the closed sessions' last writes
    if report.errors:
        print(f"  {server.name}: idle connections failed: {dict(report.errors)}")
    return (during - before) / connections, (server.cpu_seconds() - cpu_before) / connections


async def climb(servers: list[Server], steps: list[int], seconds: float, repeat: int,
                codec: str) -> dict[str, list[Step]]:
    """Each N in turn, the servers taking turns trial by trial; a server leaves the climb at its
    first failed step (or when the load generator, not the server, is the limit)."""
    results: dict[str, list[Step]] = {server.name: [] for server in servers}
    climbing = list(servers)
    for n in steps:
        if not climbing:
            break
        trials: dict[str, list[Trial]] = {server.name: [] for server in climbing}
        for _ in range(repeat):
            for server in climbing:
                trials[server.name].append(await run_trial(server, n, seconds, codec))
                await asyncio.sleep(2.0)         # let closed sessions finish writing
        for server in list(climbing):
            step = Step(server.name, n, trials[server.name])
            print(step.line(), flush=True)
            results[server.name].append(step)
            if not step.passed or step.client_lag > MAX_CLIENT_LAG:
                climbing.remove(server)
    return results


def best(steps: list[Step]) -> Step | None:
    passing = [s for s in steps if s.passed]
    return passing[-1] if passing else None


async def main_async(args) -> None:
    server_cpu, client_cpu = (0, 1) if os.cpu_count() and os.cpu_count() >= 2 and not args.no_pin else (None, None)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    steps = [int(x) for x in args.steps.split(",")]
    print(f"{args.codec}; server on CPU {server_cpu}, load generator on CPU {client_cpu}; {args.seconds:g} s per trial, "
          f"{args.repeat} trial(s) per server and step; pass = no errors and p99 < {LATENCY_BUDGET * 1000:.0f} ms")
    memory: dict[str, tuple[float, float]] = {}
    servers: list[Server] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # All servers stay up for the whole run, taking turns; one waiting idle costs the
            # pinned core next to nothing (Harken idle: under 1 % of a core).
            for name in args.servers.split(","):
                servers.append(start_relay(server_cpu) if name == "relay" else start_harken(Path(tmp), server_cpu, name))
            if args.idle:
                for server in servers:
                    memory[server.name] = await idle_connections(server, args.idle)
            results = await climb(servers, steps, args.seconds, args.repeat, args.codec)
        finally:
            for server in servers:
                server.stop()

    print("\nsummary")
    relay_steps = {s.streams: s for s in results.get("relay", [])}
    for name, steps_run in results.items():
        top = best(steps_run)
        bound = " (or more: the load generator or the step list was the limit)" if top is steps_run[-1] else ""
        print(f"  {name}: most {args.codec} streams on one core with p99 < {LATENCY_BUDGET * 1000:.0f} ms: "
              f"{top.streams if top else 0}{bound}")
    for name in (n for n in results if n != "relay"):
        for step in results[name]:
            floor = relay_steps.get(step.streams)
            if floor and floor.cpu_per_stream > 0:
                print(f"  N={step.streams}: {name} CPU per stream {step.cpu_per_stream * 100:.3f} % of a core = "
                      f"{step.cpu_per_stream / floor.cpu_per_stream:.1f}x the relay's {floor.cpu_per_stream * 100:.3f} %")
    for name, (mib, cpu) in memory.items():
        print(f"  {name}: memory per idle connection {mib * 1024:.0f} KiB (RSS delta / {args.idle}); "
              f"CPU per connection (connect, 8 s idle, close) {cpu * 1000:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="50,100,200,300,400", help="stream counts tried in order")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per stream in each step")
    parser.add_argument("--idle", type=int, default=200, help="idle connections for the memory figure (0 = skip)")
    parser.add_argument("--servers", default="relay,harken",
                        help="taking turns: relay, harken, harken-python (the native Opus reader off)")
    parser.add_argument("--repeat", type=int, default=1, help="trials per server and step (judged on medians)")
    parser.add_argument("--codec", choices=CODECS, default="opus",
                        help="opus: 10 ms packets (Omi's default); opus_fs320: 20 ms packets")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and load generator to CPUs")
    parser.add_argument("--serve-relay", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_relay:
        serve_relay(args.serve_relay)
        return
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
