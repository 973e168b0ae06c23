"""Offline-recording uploads against live sessions: does a batch slow live transcription, and how
fast is the batch?

    .venv/bin/python bench/bench_sync.py                          # modest: 5 min upload, 3 streams, 30 s
    .venv/bin/python bench/bench_sync.py --full                   # the issue's run: 1-hour upload, 10 streams, 60 s
    .venv/bin/python bench/bench_sync.py --streams 0              # batch throughput alone (no live phases)
    .venv/bin/python bench/bench_sync.py --live-engine null --streams 10   # live through the gateway alone
    .venv/bin/python bench/bench_sync.py --no-live-first          # batch decodes not waiting for live ones

The live streams use the embedded engine (``--live-engine local``, the default): one decode at a
time in the live pool, so a 2-core machine carries only a few real-time streams before the live
engine itself falls behind, batch or not. ``--live-engine null`` streams to the null provider
(scripted words, no engine: the server's own path), to see whether the batch slows the gateway.

One ``harken serve`` process (embedded engine, its own data folder) on loopback. Phases:

1. baseline: ``--streams`` live streams of real speech at real-time pace for ``--live-seconds``;
2. the same live run while an upload of ``--upload-minutes`` of Opus WAL files (real speech from
   tests/data/audio, or ``--audio-dir``) is transcribed in the background;
3. the batch finishes alone.

Prints the live segment latency (seconds from the audio holding a segment's end being sent to the
segment arriving) over every version of every segment (relabels of old segments included) and over
each segment's final text only, p50/p95/max for phases 1 and 2 and their ratios,
and the batch throughput: audio hours per CPU hour of the batch threads (the server's threads at
the batch nice value, read from /proc), and audio seconds per wall second, with the batch
transcript's WER against the clips' references (tests/data/audio/transcripts.tsv) to show that
it is fast because it is quick, not because it skipped speech. Ratios are measured in
the same run; the machine may be shared, so the load average is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.client import device_messages, listen_url, read_wav_16k, stream_messages  # noqa: E402
from harken.codecs.encode import encode_for_device  # noqa: E402
from harken.codecs.wal import sync_filename, wal_bytes  # noqa: E402
from harken.config import Settings  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402
from harken.wer import wer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
AUDIO = REPO / "tests" / "data" / "audio"
CLIP_GAP = np.zeros(16000, dtype=np.int16)


def speech(audio_dir: Path, seconds: float, offset: int = 0) -> np.ndarray:
    """``seconds`` of real speech: the folder's WAV files one after the other (a second apart), looped."""
    return speech_and_text(audio_dir, seconds, offset)[0]


def speech_and_text(audio_dir: Path, seconds: float, offset: int = 0) -> tuple[np.ndarray, str | None]:
    """``speech`` and what is said in it (the clips' references from the folder's transcripts.tsv,
    the last clip's only if it fits whole), or None without references."""
    paths = sorted(audio_dir.rglob("*.wav"))
    clips = [read_wav_16k(p) for p in paths]
    if not clips:
        raise SystemExit(f"no WAV files in {audio_dir}")
    table = audio_dir / "transcripts.tsv"
    references = ({row["file"]: row["reference"] for row in csv.DictReader(table.open(), delimiter="\t")}
                  if table.exists() else {})
    pieces, said, total, i = [], [], 0, offset
    limit = int(seconds * 16000)
    while total < limit:
        clip = clips[i % len(clips)]
        pieces += [clip, CLIP_GAP]
        if total + len(clip) <= limit:
            said.append(references.get(paths[i % len(clips)].name))
        total += len(clip) + len(CLIP_GAP)
        i += 1
    text = None if None in said else " ".join(said)
    return np.concatenate(pieces)[:limit], text


def batch_cpu_seconds(pid: int, nice: int) -> float:
    """CPU seconds (user + system) of the process's threads running at ``nice``: the batch engine."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[16]) == nice:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def live_run(base: str, settings: Settings, streams: int, seconds: float, audio_dir: Path,
                   engine: str, phase: str) -> tuple[list[float], list[float]]:
    """Latencies of every segment version, and of each segment's final text (relabels left out)."""
    async def one(i: int) -> tuple[list[float], list[float]]:
        pcm = speech(audio_dir, seconds, offset=i * 3)
        messages, message_seconds = device_messages(pcm, "opus", 16000)
        url = listen_url(base, codec="opus", sample_rate=16000, language="en", include_speech_profile="false",
                         stt_service="null" if engine == "null" else None)
        await asyncio.sleep(i * 0.3)              # a short ramp
        result = await stream_messages(url, messages, message_seconds, realtime=True, settle_seconds=5.0,
                                       token=mint_local_token(settings, f"bench-{phase}-{i}", 3600))
        # A fresh user per phase: a resumed conversation's times are not comparable.
        return result.latencies(), result.text_latencies()

    results = await asyncio.gather(*(one(i) for i in range(streams)))
    return [x for r in results for x in r[0]], [x for r in results for x in r[1]]


async def live_waits(client: httpx.AsyncClient, http: str) -> str:
    """``harken_sync_live_waits`` from /metrics ("-" without the live-first gate)."""
    for line in (await client.get(f"{http}/metrics")).text.splitlines():
        if line.startswith("harken_sync_live_waits "):
            return f"{float(line.split()[1]):.0f}"
    return "-"


def describe(label: str, latencies: tuple[list[float], list[float]]) -> str:
    versions, texts = latencies
    if not versions:
        return f"{label}: no segment came back (the machine is too loaded for the live engine)"
    return (f"{label}: {len(versions)} segment versions, latency p50 {percentile(versions, 0.5):.2f} s, "
            f"p95 {percentile(versions, 0.95):.2f} s, max {max(versions, default=float('nan')):.2f} s; "
            f"final text of {len(texts)} segments p50 {percentile(texts, 0.5):.2f} s, "
            f"p95 {percentile(texts, 0.95):.2f} s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="the issue's run: a 1-hour upload beside 10 live streams of 60 s "
                             "(= --upload-minutes 60 --streams 10 --live-seconds 60)")
    parser.add_argument("--streams", type=int, default=3, help="live streams (0: measure the batch alone)")
    parser.add_argument("--live-seconds", type=float, default=30.0)
    parser.add_argument("--live-engine", choices=("local", "null"), default="local")
    parser.add_argument("--job-timeout", type=float, default=3600.0, help="seconds to wait for the batch to finish")
    parser.add_argument("--upload-minutes", type=float, default=5.0, help="60 for the full run")
    parser.add_argument("--file-minutes", type=float, default=10.0, help="length of each uploaded file")
    parser.add_argument("--audio-dir", type=Path, default=AUDIO, help="WAV files of real speech to loop")
    parser.add_argument("--nice", type=int, default=19, help="the server's sync_nice")
    parser.add_argument("--whisper-window-s", type=float, default=None,
                        help="the server's encoder window (default: its own, 10 s; 30 = Whisper's full window)")
    parser.add_argument("--no-live-first", action="store_true",
                        help="the server's --no-sync-live-first: batch decodes do not wait for live ones")
    args = parser.parse_args()
    if args.full:
        args.upload_minutes, args.streams, args.live_seconds = 60.0, 10, 60.0
    began = time.perf_counter()

    print(f"cpus {os.cpu_count()}, affinity {sorted(os.sched_getaffinity(0))}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine may be shared: compare ratios)")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    settings = Settings(data_dir=data_dir)
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARKEN_")}
    log = open(data_dir / "serve.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "harken", "serve", "--port", str(port), "--data-dir",
                               str(data_dir), "--sync-nice", str(args.nice), "--log-level", "warning",
                               *(["--null-provider"] if args.live_engine == "null" else []),
                               *(["--no-sync-live-first"] if args.no_live_first else []),
                               *(["--whisper-window-s", str(args.whisper_window_s)] if args.whisper_window_s else [])],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    http, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=600) as client:
            for _ in range(600):
                try:
                    if (await client.get(f"{http}/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
            # The upload, encoded before any timing starts.
            started = time.perf_counter()
            files, minutes, at = [], args.upload_minutes, int(time.time()) - 7 * 86400
            said: list[str | None] = []
            while minutes > 0:
                length = min(args.file_minutes, minutes)
                pcm, text = speech_and_text(args.audio_dir, length * 60, offset=len(files) * 7)
                said.append(text)
                files.append((sync_filename("opus", 16000, at), wal_bytes(encode_for_device(pcm, "opus", 16000))))
                at += int(length * 60) + 600
                minutes -= length
            audio_seconds = args.upload_minutes * 60
            print(f"upload: {len(files)} Opus WAL file(s), {audio_seconds / 60:.0f} min of audio, "
                  f"{sum(len(d) for _, d in files) / 2**20:.1f} MiB (encoded in {time.perf_counter() - started:.0f} s)")

            live = args.streams > 0

            async def phase(name: str) -> tuple[list[float], list[float]]:
                if not live:
                    return [], []
                return await live_run(ws, settings, args.streams, args.live_seconds, args.audio_dir,
                                      args.live_engine, name)

            baseline = await phase("alone")
            if live:
                print(describe(f"live alone ({args.streams} streams to the {args.live_engine} engine, "
                               f"{args.live_seconds:.0f} s)", baseline))

            token = mint_local_token(settings, "bench-uploader", int(args.job_timeout) + 3600)
            cpu_before = batch_cpu_seconds(server.pid, args.nice)
            upload_started = time.perf_counter()
            answer = await client.post(f"{http}/v1/sync-local-files", headers={"Authorization": f"Bearer {token}"},
                                       files=[("files", (n, d, "application/octet-stream")) for n, d in files])
            answer.raise_for_status()
            job_id = answer.json()["job_id"]
            with_batch = await phase("with-batch")
            status = (await client.get(f"{http}/v1/sync-local-files/{job_id}",
                                       headers={"Authorization": f"Bearer {token}"})).json()
            if live:
                print(describe("live with the batch running", with_batch))
                print(f"  (the batch had done {status['audio_seconds']:.0f} s of audio by the end of the live run "
                      f"(counted per finished file); job {status['status']}; batch work waited for live decodes "
                      f"{await live_waits(client, http)} times)")
            job_deadline = time.monotonic() + args.job_timeout
            while status["status"] not in ("completed", "failed") and time.monotonic() < job_deadline:
                await asyncio.sleep(2.0)
                status = (await client.get(f"{http}/v1/sync-local-files/{job_id}",
                                           headers={"Authorization": f"Bearer {token}"})).json()
            wall = time.perf_counter() - upload_started
            cpu = batch_cpu_seconds(server.pid, args.nice) - cpu_before
            print(f"batch: {status['audio_seconds']:.0f} s of audio in {wall:.0f} s wall "
                  f"({status['audio_seconds'] / wall:.1f} audio s per wall s), {cpu:.0f} CPU s in the batch threads "
                  f"= {status['audio_seconds'] / max(cpu, 1e-9):.1f} audio hours per CPU hour; "
                  f"{status['total_segments']} segments, job {status['status']}, "
                  f"{len(status.get('result', {}).get('new_memories', []))} conversations")
            if None not in said:
                # That it is fast because it transcribes, not because it skips: the batch's words
                # against what the upload says (the last clip of each file may be cut: a little worse).
                listed = (await client.get(f"{http}/v1/conversations?limit=100",
                                           headers={"Authorization": f"Bearer {token}"})).json()
                heard = " ".join(s["text"] for c in sorted(listed, key=lambda c: c["started_at"])
                                 for s in sorted(c["transcript_segments"], key=lambda s: s["start"]))
                print(f"  batch transcript: {len(heard.split())} words, WER {wer([(' '.join(said), heard)]):.1%} "
                      f"against the clips' references")
            # Live alone again, after the batch: the machine's load drifts, so the baseline is
            # taken on both sides of the batch run and pooled.
            if not live:
                return
            after = await phase("alone-after")
            print(describe("live alone again, after the batch", after))
            for kind, k in (("segment versions", 0), ("final text", 1)):
                alone = baseline[k] + after[k]
                for q in (0.5, 0.95):
                    print(f"latency ratio ({kind}) p{int(q * 100)} with the batch / alone (before and after pooled): "
                          f"{percentile(with_batch[k], q) / percentile(alone, q):.2f} "
                          f"(before only: {percentile(with_batch[k], q) / percentile(baseline[k], q):.2f})")
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; the run took "
              f"{(time.perf_counter() - began) / 60:.1f} min; server log: {data_dir / 'serve.log'}")


if __name__ == "__main__":
    asyncio.run(main())
