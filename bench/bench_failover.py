"""Failover latency and gateway-side CPU of the cloud provider clients, against local fakes.

    .venv/bin/python bench/bench_failover.py [--runs 30] [--streams 20] [--seconds 60] [--speed 20]

1. **Failover latency**: a provider dies (each failure kind) just after a word ended and before
   it reported it, so the next provider's first word is owed at once. Measured: time from the
   death (stamped by the fake) to that first word from the next provider, p50/p95 over runs.
   Stall detection needs ``result_timeout`` of silence first; it is set to 1 s here (default 10 s).
2. **CPU per stream**: process CPU time of this process while ``--streams`` streams each send
   ``--seconds`` of audio at ``--speed``× real time, through each provider's client (and through
   ``FallbackStream`` over it), against a null stream that discards audio, all in the same run.
   The fakes run in another process, so only the client side is counted. Figures are CPU
   milliseconds per second of audio (= per mille of a core for one real-time stream), with and
   without permessage-deflate (whether the real services negotiate it is undocumented).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import multiprocessing
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harken.config import Settings  # noqa: E402
from harken.stt import FallbackPolicy, FallbackStream, Link, Provider, StreamConfig, STTStream  # noqa: E402
from harken.stt.deepgram import DeepgramProvider  # noqa: E402
from harken.stt.soniox import SonioxProvider  # noqa: E402
from harken.stt.speechmatics import SpeechmaticsProvider  # noqa: E402
from tests.fakes.deepgram import FakeDeepgram  # noqa: E402
from tests.fakes.script import Plan, make_script, timecode  # noqa: E402
from tests.fakes.soniox import FakeSoniox  # noqa: E402
from tests.fakes.speechmatics import FakeSpeechmatics  # noqa: E402

NAMES = ("deepgram", "soniox", "speechmatics")
FAKES = {"deepgram": FakeDeepgram, "soniox": FakeSoniox, "speechmatics": FakeSpeechmatics}
PROVIDERS = {"deepgram": DeepgramProvider, "soniox": SonioxProvider, "speechmatics": SpeechmaticsProvider}
SCRIPT_SEED, SCRIPT_SECONDS = 1, 600.0
KEY = secrets.token_hex(8)          # any key: the fake providers on loopback check it (passed to their process)


# --- the fakes, in their own process -----------------------------------------------------------------

def serve_fakes(pipe, compression: str | None, key: str) -> None:
    async def main() -> None:
        script = make_script(SCRIPT_SEED, SCRIPT_SECONDS)
        fakes = {name: FAKES[name](script, key=key, compression=compression) for name in NAMES}
        for fake in fakes.values():
            await fake.start()
        pipe.send({name: fake.url for name, fake in fakes.items()})
        loop = asyncio.get_running_loop()
        while True:
            command, *args = await loop.run_in_executor(None, pipe.recv)
            if command == "plans":
                name, plans = args
                fakes[name].plans = plans
                pipe.send(None)
            elif command == "deaths":
                pipe.send([c.failed_at for fake in fakes.values() for c in fake.connections if c.failed_at])
            elif command == "reset":
                for fake in fakes.values():
                    fake.connections.clear()
                pipe.send(None)
            else:
                break
        for fake in fakes.values():
            await fake.stop()

    asyncio.run(main())


class FakeProcess:
    def __init__(self, compression: str | None = None):
        self.pipe, child = multiprocessing.Pipe()
        self.process = multiprocessing.get_context("spawn").Process(target=serve_fakes, args=(child, compression, KEY),
                                                                    daemon=True)
        self.process.start()
        self.urls: dict[str, str] = self.pipe.recv()

    def call(self, *command):
        self.pipe.send(command)
        return self.pipe.recv()

    def stop(self) -> None:
        self.pipe.send(("stop",))
        self.process.join(5)

    def settings(self) -> Settings:
        return Settings(**{f"{n}_api_key": KEY for n in NAMES}, **{f"{n}_url": self.urls[n] for n in NAMES})


# --- 1. failover latency ------------------------------------------------------------------------------

async def failover_once(fakes: FakeProcess, providers: dict[str, Provider], order: tuple[str, ...],
                        kind: str, death: float) -> float | None:
    fakes.call("reset")
    fakes.call("plans", order[0], [Plan(fail_at=death, kind=kind)])
    stream = FallbackStream([Link(providers[n], {}) for n in order], StreamConfig(language="en"),
                            policy=FallbackPolicy(result_timeout=1.0, retry_base=0.05))
    first_new: list[float] = []

    async def read() -> None:
        async for _ in stream:
            if stream.provider_name == order[1] and not first_new:
                first_new.append(time.monotonic())

    reader = asyncio.create_task(read())
    step = 1600
    # 20x real time up to half a second before the death, then real time until the next
    # provider speaks (a stall is only noticed while audio flows)
    for position in range(0, int((death + 5.0) * 16000), step):
        if first_new:
            break
        await stream.send(timecode(position, step))
        pace = 20.0 if position / 16000 < death - 0.5 else 1.0
        await asyncio.sleep(max(0.0, step / 16000 / pace - 0.0005))
    await stream.close()
    await reader
    deaths = fakes.call("deaths")
    if not first_new or not deaths:
        return None
    return first_new[0] - deaths[0]


async def bench_failover(runs: int) -> None:
    fakes = FakeProcess()
    settings = fakes.settings()
    providers = {name: PROVIDERS[name](settings) for name in NAMES}
    script = make_script(SCRIPT_SEED, SCRIPT_SECONDS)
    rng = random.Random(7)
    print(f"failover latency: death → first word from the next provider, {runs} runs per kind "
          f"(primary rotates; result_timeout=1 s for stalls)")
    print(f"{'kind':<10} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  by next provider (p50 ms)")
    for kind in ("close", "drop", "malformed", "stall"):
        latencies: dict[str, list[float]] = {n: [] for n in NAMES}
        for run in range(runs):
            order = (NAMES[run % 3], NAMES[(run + 1) % 3], NAMES[(run + 2) % 3])
            # die 20 ms after a word ended (2–12 s in): too soon for the dying provider to report it
            word = rng.choice([w for w in script if 2.0 < w.end < 12.0])
            latency = await failover_once(fakes, providers, order, kind, round(word.end + 0.02, 3))
            if latency is not None:
                latencies[order[1]].append(latency * 1000)
        everything = sorted(v for values in latencies.values() for v in values)
        if not everything:
            print(f"{kind:<10} no successful runs")
            continue
        p95 = everything[min(len(everything) - 1, int(0.95 * len(everything)))]
        by = "  ".join(f"{n}={statistics.median(v):.0f}" for n, v in latencies.items() if v)
        print(f"{kind:<10} {statistics.median(everything):>8.0f} {p95:>8.0f} {everything[-1]:>8.0f}  {by}"
              f"   (n={len(everything)})")
    for provider in providers.values():
        await provider.aclose()
    fakes.stop()


# --- 2. CPU per stream ------------------------------------------------------------------------------------

class NullStream(STTStream):
    """Takes audio and discards it: the cost of the driver loop alone."""

    provider_name = "null"

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    async def send(self, pcm: np.ndarray) -> None:
        pcm.tobytes()          # the one copy every real client makes

    async def finalize(self) -> None:
        pass

    async def close(self) -> None:
        self._closed.set()

    async def __aiter__(self):
        await self._closed.wait()
        return
        yield


class NullProvider(Provider):
    name = "null"

    def supports(self, language: str) -> bool:
        return True

    async def open(self, config: StreamConfig) -> STTStream:
        return NullStream()


async def drive(open_stream, streams: int, seconds: float, speed: float, chunks: list[np.ndarray]) -> tuple[float, int]:
    """CPU seconds for ``streams`` concurrent streams of ``seconds`` audio at ``speed``× real time."""
    opened = [await open_stream() for _ in range(streams)]
    words = [0]

    async def one(stream: STTStream) -> None:
        async def read() -> None:
            async for _ in stream:
                words[0] += 1
        reader = asyncio.create_task(read())
        chunk_seconds = chunks[0].size / 16000
        loop = asyncio.get_running_loop()
        began = loop.time()
        for n, chunk in enumerate(chunks):
            await stream.send(chunk)
            await asyncio.sleep(max(0.0, began + (n + 1) * chunk_seconds / speed - loop.time()))
        await stream.close()
        await reader

    cpu = time.process_time()
    await asyncio.gather(*(one(s) for s in opened))
    return time.process_time() - cpu, words[0]


async def bench_cpu(streams: int, seconds: float, speed: float) -> None:
    chunks = [timecode(i, 1600) for i in range(0, int(seconds * 16000), 1600)]     # 100 ms frames
    audio = streams * seconds
    print(f"\nclient CPU: {streams} streams × {seconds:.0f} s of audio at {speed:.0f}× real time, 100 ms frames; "
          f"CPU ms per audio second (= ‰ of a core per real-time stream)")
    print(f"{'client':<28} {'deflate':>8} {'CPU ms/s':>9} {'× null':>8} {'words':>7}")
    null_cpu, _ = await drive(lambda: NullProvider().open(StreamConfig()), streams, seconds, speed, chunks)
    null_fb, _ = await drive(lambda: _fallback(NullProvider()), streams, seconds, speed, chunks)
    print(f"{'null stream':<28} {'-':>8} {1000 * null_cpu / audio:>9.2f} {1.0:>8.2f}")
    print(f"{'FallbackStream(null)':<28} {'-':>8} {1000 * null_fb / audio:>9.2f} {null_fb / null_cpu:>8.2f}")
    for compression in (None, "deflate"):
        fakes = FakeProcess(compression)
        settings = fakes.settings()
        for name in NAMES:
            provider = PROVIDERS[name](settings)
            opener = lambda: provider.open(StreamConfig(language="en"))  # noqa: E731
            cpu, words = await drive(opener, streams, seconds, speed, chunks)
            print(f"{name:<28} {'on' if compression else 'off':>8} {1000 * cpu / audio:>9.2f} {cpu / null_cpu:>8.2f} "
                  f"{words:>7}")
            cpu, words = await drive(lambda: _fallback(provider), streams, seconds, speed, chunks)
            label = f"FallbackStream({name})"
            print(f"{label:<28} {'on' if compression else 'off':>8} {1000 * cpu / audio:>9.2f} {cpu / null_cpu:>8.2f} "
                  f"{words:>7}")
            await provider.aclose()
        fakes.stop()


async def _fallback(provider: Provider) -> STTStream:
    stream = FallbackStream([Link(provider, {})], StreamConfig(language="en"))
    await stream.start()
    return stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="failover runs per failure kind")
    parser.add_argument("--streams", type=int, default=20, help="concurrent streams in the CPU benchmark")
    parser.add_argument("--seconds", type=float, default=60.0, help="audio per stream in the CPU benchmark")
    parser.add_argument("--speed", type=float, default=20.0, help="times real time in the CPU benchmark")
    parser.add_argument("--skip-failover", action="store_true")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if not args.skip_failover:
        asyncio.run(bench_failover(args.runs))
    if not args.skip_cpu:
        asyncio.run(bench_cpu(args.streams, args.seconds, args.speed))


if __name__ == "__main__":
    main()
