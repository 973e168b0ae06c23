"""End-to-end figures of one gateway process: segment latency and memory.

Starts ``harken serve`` as a subprocess on a free loopback port (its own data folder), then
streams the development recordings joined with 1 s pauses at real-time pace, as a device would.

Prints:
- latency from the end of a segment's last word in the audio to that segment version reaching the
  client (p50/p95/max), beside its floor in the same run: the engine's endpoint wait (silence that
  must pass before an utterance is decoded) plus the measured mean decode time;
- server RSS idle (model loaded), with one active stream (peak), and a bare Python interpreter
  with numpy as the baseline.

Run: .venv/bin/python bench/bench_gateway.py [--files N]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harken.client import listen_url, read_wav_16k, stream_messages  # noqa: E402
from harken.config import Settings  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402

AUDIO = ROOT / "tests" / "data" / "audio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def start_server(data_dir: Path, port: int, **settings: object) -> subprocess.Popen:
    """A ``harken serve`` subprocess on loopback; ``settings`` as ``HARKEN_<NAME>`` variables."""
    env = dict(os.environ, HARKEN_DATA_DIR=str(data_dir), HARKEN_PORT=str(port), HARKEN_LOG_LEVEL="warning")
    env.update({f"HARKEN_{name.upper()}": str(value) for name, value in settings.items()})
    proc = subprocess.Popen([sys.executable, "-m", "harken", "serve"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become ready")


def bare_python_rss() -> float:
    out = subprocess.run([sys.executable, "-c", "import numpy, resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout) / 1024


async def run(files: int) -> None:
    with open(AUDIO / "transcripts.tsv", newline="") as f:
        rows = [r for r in csv.DictReader(f, delimiter="\t")][:files]
    gap = np.zeros(16000, np.int16)
    pcm = np.concatenate([x for r in rows for x in (read_wav_16k(AUDIO / r["file"]), gap)] + [gap])
    messages = [pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)]

    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = start_server(Path(tmp), port)
        try:
            process = psutil.Process(server.pid)
            await asyncio.sleep(1.0)
            idle_rss = process.memory_info().rss / 2**20
            settings = Settings(data_dir=Path(tmp))
            token = mint_local_token(settings, "bench", 3600)
            url = listen_url(f"ws://127.0.0.1:{port}", codec="pcm16", sample_rate=16000)

            peak = idle_rss
            sampling = True

            async def sample_rss():
                nonlocal peak
                while sampling:
                    peak = max(peak, process.memory_info().rss / 2**20)
                    await asyncio.sleep(0.2)

            sampler = asyncio.create_task(sample_rss())
            cpu_before = sum(process.cpu_times()[:2])
            result = await stream_messages(url, messages, 0.1, token=token, realtime=True, settle_seconds=3.0)
            cpu_used = sum(process.cpu_times()[:2]) - cpu_before
            sampling = False
            await sampler
        finally:
            server.terminate()
            server.wait(30)

    latencies = result.latencies()
    audio_seconds = len(pcm) / 16000
    endpoint = Settings().endpoint_silence_ms / 1000
    print(f"audio streamed: {audio_seconds:.1f} s at real-time pace, {len(rows)} files, "
          f"{len(result.segments)} segments, {len(result.updates)} segment versions received")
    print("segment latency (end of last word in the audio → segment version at the client):")
    print(f"  p50 {percentile(latencies, 50) * 1000:7.0f} ms   p95 {percentile(latencies, 95) * 1000:7.0f} ms   "
          f"max {max(latencies) * 1000:7.0f} ms")
    print(f"  floor: endpoint silence {endpoint * 1000:.0f} ms + mean half flush interval "
          f"{Settings().flush_interval * 500:.0f} ms + decode time (see bench_engine.py)")
    print(f"server CPU while streaming: {cpu_used:.2f} s for {audio_seconds:.1f} s of audio "
          f"({cpu_used / audio_seconds:.3f} CPU-s per audio-s)")
    bare = bare_python_rss()
    print("memory (RSS):")
    print(f"  bare python + numpy   {bare:7.1f} MiB (baseline)")
    print(f"  server idle           {idle_rss:7.1f} MiB ({idle_rss / bare:.1f}x baseline)")
    print(f"  server, one stream    {peak:7.1f} MiB peak (+{peak - idle_rss:.1f} MiB over idle)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16, help="how many development recordings to stream")
    args = parser.parse_args()
    asyncio.run(run(args.files))


if __name__ == "__main__":
    main()
