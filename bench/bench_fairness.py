"""Fairness under abuse: 20 honest streams beside one abusive client of each kind (issue #26).

A ``harken serve`` (null provider, so the engine's CPU does not dominate; otherwise default
settings) takes, in turn:

- ``baseline``: the 20 honest Opus streams alone (real-time pace, ``harken.loadtest``);
- the same 20 streams beside one abuser, run in its own process from 127.0.0.2:
  ``huge-headers`` (4 connections at a time, each sending a 1 MiB header), ``slowloris``
  (200 connections trickling a header line a second), ``compressed-flood`` (an authenticated
  stream asking for permessage-deflate and sending 64 KiB messages of silence as fast as the
  socket takes them), ``suggestion-flood`` (an authenticated custom_stt stream sending ~60 KB
  suggested_transcript messages, unpunctuated lowercase text that merges, as fast as it can),
  ``idle-1000`` (1,000 TCP connections that send nothing, reopened when closed, ≤ 100 a second);
- a ``baseline`` between every two abusers, so each abuser is compared with the baselines run
  just before and after it (the mean of the two): a shared machine's load drifts during a run.

For each phase it prints the honest streams' connect → ready (p50, p95), steady segment latency
(p50, p95) and the server's CPU seconds (its own, from /proc: the figure other engineers' load
disturbs least), each as a ratio to the neighbouring baselines; the goal is ≤ 1.2×.

Connect → ready of a burst of connects is what a loaded shared machine disturbs most (the
baselines of one run spanned 20–340 ms), so each phase also opens a separate burst of
``--streams`` connects (spaced as the honest streams' ramp), each closed at ``ready``, and
reports the server's CPU per connect: its CPU time over the burst (to the nanosecond, from
/proc/PID/task/*/schedstat) less what the abuser alone cost it in the 2 s before (its
background rate). Other people's load moves wall times by several times; it moves CPU per
connect far less. ``--repeat N`` runs the whole sequence N times and the summary gives each
abuser's median ratio over the repetitions. Each row ends with the load average when the phase
ended.

``--server-cpus 0 --contend 2`` runs the server on CPU 0 beside two busy loops there: a loaded
machine on demand. Wall times then swing by several times from burst to burst with or without
an abuser (and 20 honest streams no longer keep real time on a third of a core, so their rows
count errors); it is for seeing where connects wait (there, before the vocabulary was read with
the conversation: in the store's driver threads), not for ratios.

    python bench/bench_fairness.py [--seconds 15] [--streams 20] [--phases huge-headers,slowloris] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ABUSERS = ("huge-headers", "slowloris", "compressed-flood", "suggestion-flood", "idle-1000")
ABUSER_ADDRESS = "127.0.0.2"
GOAL = 1.2


# --- the abusers (each runs in its own process: --abuse KIND) -------------------------------------

async def _open(port: int):
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(ABUSER_ADDRESS, 0))


async def huge_headers(port: int, token: str, deadline: float) -> None:
    async def one() -> None:
        while time.monotonic() < deadline:
            try:
                reader, writer = await _open(port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
                for _ in range(16):
                    writer.write(b"a" * 65536)
                    await writer.drain()
                writer.write(b"\r\n\r\n")
                await writer.drain()
                await reader.read(1024)
                writer.close()
            except (ConnectionError, OSError):
                await asyncio.sleep(0.01)
    await asyncio.gather(*(one() for _ in range(4)))


async def slowloris(port: int, token: str, deadline: float) -> None:
    async def one(index: int) -> None:
        await asyncio.sleep(index * 0.01)
        while time.monotonic() < deadline:
            try:
                reader, writer = await _open(port)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                while time.monotonic() < deadline and not reader.at_eof():
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
                    await asyncio.sleep(1.0)
                writer.close()
            except (ConnectionError, OSError):
                await asyncio.sleep(0.5)
    await asyncio.gather(*(one(i) for i in range(200)))


async def compressed_flood(port: int, token: str, deadline: float) -> None:
    import websockets

    url = f"ws://127.0.0.1:{port}/v4/listen?codec=pcm16&sample_rate=16000&stt_service=null"
    silence = bytes(65000)
    while time.monotonic() < deadline:
        try:
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                          compression="deflate", max_size=None) as ws:
                while time.monotonic() < deadline:
                    await ws.send(silence)
        except (ConnectionError, OSError, websockets.exceptions.WebSocketException):
            await asyncio.sleep(0.5)


async def suggestion_flood(port: int, token: str, deadline: float) -> None:
    import websockets

    url = f"ws://127.0.0.1:{port}/v4/listen?codec=pcm16&sample_rate=16000&custom_stt=enabled"
    words = ("lorem ipsum dolor sit amet " * 30).strip()
    message = json.dumps({"type": "suggested_transcript", "segments": [
        {"text": words, "start": i * 0.01, "end": i * 0.01 + 0.01} for i in range(60)]})

    async def drain(ws) -> None:
        async for _ in ws:
            pass

    while time.monotonic() < deadline:
        try:
            async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                          max_size=None) as ws:
                reader = asyncio.create_task(drain(ws))
                while time.monotonic() < deadline:
                    await ws.send(message)
                reader.cancel()
        except (ConnectionError, OSError, websockets.exceptions.WebSocketException):
            await asyncio.sleep(0.5)


async def idle_1000(port: int, token: str, deadline: float) -> None:
    opened = asyncio.Semaphore(100)       # ≤ 100 (re)connections a second

    async def refill() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            for _ in range(100 - opened._value):
                opened.release()

    async def one() -> None:
        while time.monotonic() < deadline:
            await opened.acquire()
            try:
                reader, writer = await _open(port)
                await asyncio.wait_for(reader.read(1), max(0.1, deadline - time.monotonic()))
                writer.close()
            except (ConnectionError, OSError, TimeoutError):
                pass
    await asyncio.gather(refill(), *(one() for _ in range(1000)))


def run_abuser(kind: str, port: int, data_dir: str, seconds: float) -> None:
    from harken.config import Settings
    from harken.gateway.auth import mint_local_token

    token = mint_local_token(Settings(data_dir=Path(data_dir)), f"abuser-{kind}", 3600)
    attack = {"huge-headers": huge_headers, "slowloris": slowloris, "compressed-flood": compressed_flood,
              "suggestion-flood": suggestion_flood, "idle-1000": idle_1000}[kind]
    deadline = time.monotonic() + seconds

    async def bounded() -> None:
        try:
            await asyncio.wait_for(attack(port, token, deadline), seconds + 5)
        except TimeoutError:
            pass
    asyncio.run(bounded())


# --- the run ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, data_dir: Path, cpus: str | None = None) -> subprocess.Popen:
    # BENCH_SERVER_ROOT: serve another checkout's code (e.g. the code before a change), same clients.
    server_root = os.environ.get("BENCH_SERVER_ROOT", str(ROOT))
    env = dict(os.environ, HARKEN_DATA_DIR=str(data_dir), HARKEN_PORT=str(port), HARKEN_LOG_LEVEL="warning",
               HARKEN_NULL_PROVIDER="true", PYTHONPATH=server_root)
    pinned = ["taskset", "-c", cpus] if cpus else []
    process = subprocess.Popen([*pinned, sys.executable, "-m", "harken", "serve"], cwd=server_root, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("server did not become ready")


async def honest_run(port: int, data_dir: Path, streams: int, seconds: float, phase: str) -> dict[str, float]:
    import numpy as np

    from harken.config import Settings
    from harken.gateway.auth import mint_local_token
    from harken.loadtest import LoadTestConfig, run_load

    settings = Settings(data_dir=data_dir)
    run = f"{phase}-{time.monotonic_ns()}"
    config = LoadTestConfig(url=f"ws://127.0.0.1:{port}", streams=streams, duration=seconds, codec="opus",
                            tokens=lambda i: mint_local_token(settings, f"honest-{run}-{i}", 3600))
    report = await run_load(config)
    ready = np.array([o.ready_seconds for o in report.outcomes if o.ready_seconds is not None])
    steady = report.latency_percentiles(steady=True) or report.latency_percentiles()
    return {"ready_p50": float(np.percentile(ready, 50)) if ready.size else float("nan"),
            "ready_p95": float(np.percentile(ready, 95)) if ready.size else float("nan"),
            "latency_p50": steady.get("p50", float("nan")), "latency_p95": steady.get("p95", float("nan")),
            "errors": float(sum(report.errors.values()))}


async def connect_burst(port: int, data_dir: Path, streams: int, phase: str) -> list[float]:
    """``streams`` connects spaced as run_load's ramp, each closed at ``ready``: connect → ready
    seconds of each, as the honest streams measure it."""
    import websockets

    from harken.config import Settings
    from harken.gateway.auth import mint_local_token

    settings = Settings(data_dir=data_dir)
    run = f"burst-{phase}-{time.monotonic_ns()}"
    tokens = [mint_local_token(settings, f"{run}-{i}", 600) for i in range(streams)]
    url = f"ws://127.0.0.1:{port}/v4/listen?codec=opus&sample_rate=16000&stt_service=null"
    spacing = min(10.0, 0.02 * streams) / max(1, streams)

    async def one(index: int) -> float:
        await asyncio.sleep(index * spacing)
        began = time.monotonic()
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {tokens[index]}"},
                                      compression=None, open_timeout=30) as ws:
            async with asyncio.timeout(30):
                async for message in ws:
                    if isinstance(message, str) and json.loads(message).get("status") == "ready":
                        return time.monotonic() - began
        return float("nan")

    return list(await asyncio.gather(*(one(i) for i in range(streams))))


def burst_figures(pid: int, port: int, data_dir: Path, streams: int, phase: str) -> dict[str, float]:
    """The connect burst's wall times and the server's CPU per connect, less the background."""
    import numpy as np

    before, at = task_cpu_seconds(pid), time.monotonic()
    time.sleep(2.0)
    background = (task_cpu_seconds(pid) - before) / (time.monotonic() - at)
    before, at = task_cpu_seconds(pid), time.monotonic()
    ready = np.array(asyncio.run(connect_burst(port, data_dir, streams, phase)))
    spent = task_cpu_seconds(pid) - before - background * (time.monotonic() - at)
    return {"burst_p50": float(np.nanpercentile(ready, 50)), "burst_p95": float(np.nanpercentile(ready, 95)),
            "cpu_per_connect": spent / streams, "background_cpu": background}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="audio seconds each honest stream sends per phase")
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--phases", default=",".join(ABUSERS))
    parser.add_argument("--repeat", type=int, default=1, help="run the whole sequence this many times")
    parser.add_argument("--server-cpus", help="run the server on these CPUs only (taskset -c), e.g. 0: on a "
                        "shared machine its threads then queue for that core as on a busy one")
    parser.add_argument("--contend", type=int, default=0, help="with --server-cpus: this many busy-looping "
                        "processes on the same CPUs for the whole run (a loaded machine, reproducibly)")
    parser.add_argument("--abuse", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.abuse:
        run_abuser(args.abuse, args.port, args.data_dir, args.seconds)
        return 0

    phases = ["baseline"]
    for _ in range(max(1, args.repeat)):
        for abuser in (p for p in args.phases.split(",") if p):
            phases += [abuser, "baseline"]
    with tempfile.TemporaryDirectory(prefix="harken-fairness-") as tmp:
        data_dir, port = Path(tmp), free_port()
        server = start_server(port, data_dir, args.server_cpus)
        burners = [subprocess.Popen(["taskset", "-c", args.server_cpus, sys.executable, "-c", "while True: pass"])
                   for _ in range(args.contend if args.server_cpus else 0)]
        results: list[tuple[str, dict[str, float]]] = []
        try:
            for phase in phases:
                abuser = None
                if phase != "baseline":
                    abuser = subprocess.Popen(
                        [sys.executable, __file__, "--abuse", phase, "--port", str(port), "--data-dir", tmp,
                         "--seconds", str(args.seconds + 8)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                    time.sleep(3.0)            # the abuse is under way before the honest streams connect
                burst = burst_figures(server.pid, port, data_dir, args.streams, phase)
                cpu_before = cpu_seconds(server.pid)
                figures = asyncio.run(honest_run(port, data_dir, args.streams, args.seconds, phase))
                figures["server_cpu"] = cpu_seconds(server.pid) - cpu_before
                figures.update(burst)
                if abuser is not None:
                    try:
                        abuser.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        abuser.kill()
                        abuser.wait()
                figures["load"] = os.getloadavg()[0]
                results.append((phase, figures))
                print(f"{phase:17s} done: {figures}", file=sys.stderr, flush=True)
                time.sleep(2.0)
        finally:
            for burner in burners:
                burner.kill()
                burner.wait()
            server.terminate()
            try:
                server.wait(timeout=40)
            except subprocess.TimeoutExpired:
                server.kill()
    print_table(results, args)
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def task_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` in nanoseconds' resolution (/proc/stat counts 10 ms
    ticks, too coarse for a burst of 20 connects); threads that ended meanwhile are not counted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass
    return total / 1e9


NAMES = ("ready_p50", "ready_p95", "latency_p50", "latency_p95", "server_cpu", "burst_p50", "burst_p95",
         "cpu_per_connect")
WALL = ("ready_p50", "ready_p95", "latency_p95", "burst_p50", "burst_p95")


def print_table(results: list[tuple[str, dict[str, float]]], args) -> None:
    print(f"\n{args.streams} honest opus streams x {args.seconds:g} s per phase, null provider; each "
          f"abuser's ratios against the mean of the baselines just before and after it (goal <= {GOAL}x). "
          f"burst_*: a separate burst of {args.streams} connects closed at ready; cpu_per_connect: the "
          f"server's CPU per connect of that burst less the abuser's background (in brackets: its share "
          f"of a core). Shared machine: the baselines' spread shows its noise.")
    print(f"{'phase':17s} " + " ".join(f"{n:>18s}" for n in NAMES) + "  background errors  load")
    ratios: dict[str, dict[str, list[float]]] = {}
    differences: dict[str, dict[str, list[float]]] = {}     # abuser's figure less the baselines'
    for index, (phase, figures) in enumerate(results):
        if phase == "baseline":
            cells = [_cell(figures[n], None, n) for n in NAMES]
        else:
            around = [results[index - 1][1], results[index + 1][1]]
            bases = {n: sum(b[n] for b in around) / 2 for n in NAMES}
            cells = [_cell(figures[n], bases[n], n) for n in NAMES]
            for n in NAMES:
                ratios.setdefault(phase, {}).setdefault(n, []).append(figures[n] / bases[n] if bases[n] else float("nan"))
                differences.setdefault(phase, {}).setdefault(n, []).append(figures[n] - bases[n])
        print(f"{phase:17s} " + " ".join(f"{c:>18s}" for c in cells)
              + f"  {figures['background_cpu'] * 100:7.1f} % {figures['errors']:5.0f} {figures['load']:5.1f}")
    loads = [figures["load"] for _, figures in results]
    print(f"load average (1 min) over the run: {min(loads):.1f}-{max(loads):.1f}, median {statistics.median(loads):.1f}")
    if args.repeat > 1:
        print(f"\nmedian ratio over {args.repeat} repetitions (min-max):")
        print(f"{'abuser':17s} " + " ".join(f"{n:>18s}" for n in NAMES))
        for phase, by_name in ratios.items():
            print(f"{phase:17s} " + " ".join(
                f"{statistics.median(v):5.2f}x ({min(v):.2f}-{max(v):.2f})".rjust(18) for v in by_name.values()))
        # With connects of a few ms, a ratio moves by 0.2 for a millisecond: the difference says
        # how much time the abuser costs an honest connect.
        print(f"\nmedian difference to the baselines over {args.repeat} repetitions, ms (min to max):")
        print(f"{'abuser':17s} " + " ".join(f"{n:>18s}" for n in WALL))
        for phase, by_name in differences.items():
            print(f"{phase:17s} " + " ".join(
                f"{statistics.median(by_name[n]) * 1000:+6.1f} ({min(by_name[n]) * 1000:+.0f} to "
                f"{max(by_name[n]) * 1000:+.0f})".rjust(18) for n in WALL))


def _cell(value: float, base: float | None, name: str) -> str:
    if name == "server_cpu":
        shown = f"{value:5.1f} s"
    elif name == "cpu_per_connect":
        shown = f"{value * 1000:5.2f} ms"
    else:
        shown = f"{value * 1000:5.0f} ms"
    return shown + (f" ({value / base:4.2f}x)" if base else "        ")


if __name__ == "__main__":
    sys.exit(main())
