"""Speaking streams through the gateway's embedded engine: latency and WER at 1, 4, 8, 12, 16 streams.

    .venv/bin/python bench/bench_stream.py                       # tests/data/audio, levels 1 4 8 12 16
    .venv/bin/python bench/bench_stream.py --audio-dir DIR --levels 1 8 16     # DIR: WAVs + transcripts.tsv
    .venv/bin/python bench/bench_stream.py --server-arg=--partial-interval=0   # finals only

A server (``harken serve``, auth none, its own data folder, an ephemeral port on 127.0.0.1) runs
in a child process; every stream is one user reading the recordings of the folder (real read
speech with reference transcripts) with ``--pause`` seconds between them, at real-time pace
(``harken.loadspeech``). Per level it prints, over all utterances of all streams:

- end of utterance → final text at the client, p50 / p95 / max, and each against the 1-stream run;
- word spoken → first shown at the client (provisional text counts), p50 / p95;
- WER through the gateway, and ("offline") the same engine decoding each recording whole in this
  process, scored over exactly the recordings that level's streams read (the goal: within 1
  point; word times from the same decode give "word spoken");
- late utterances (not back before the next one began) and the server's CPU seconds.

The machine may be shared: the load average is printed, and only the ratios against the
1-stream run of the same invocation are comparable between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.config import Settings  # noqa: E402
from harken.loadspeech import load_clips, run_speakers  # noqa: E402
from harken.stt.whisper import WhisperProvider  # noqa: E402
from harken.wer import wer, word_errors  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, extra: list[str], root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "harken", "serve", "--host", "127.0.0.1", "--port", str(port), "--auth", "none",
         "--data-dir", str(data_dir), "--log-level", "warning", *extra],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
            return process, f"ws://127.0.0.1:{port}"
        except Exception:
            if process.poll() is not None:
                raise SystemExit("the server exited at start-up")
            time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready in 120 s")


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def offline_baseline(clips) -> tuple[float, dict[str, str]]:
    """WER of the engine decoding each recording whole, and each recording's text by name; sets
    each clip's word_times."""
    engine = WhisperProvider(Settings(whisper_workers=1))
    asyncio.run(engine.load())
    pairs, texts = [], {}
    for clip in clips:
        words, _ = engine.transcribe_clip(clip.pcm, "en")
        clip.word_times = [end for text, _start, end, _p in words if text.strip()]
        texts[clip.name] = " ".join(w[0].strip() for w in words)
        pairs.append((clip.reference, texts[clip.name]))
    asyncio.run(engine.aclose())
    return wer(pairs), texts


def offline_same_schedule(report, texts: dict[str, str]) -> float:
    """The offline WER over exactly what this level's streams read (each stream's recordings in
    its order, scored as one text like the gateway's transcript): the levels read different
    subsets of the folder, so only this figure is comparable with the level's gateway WER."""
    errors = words = 0
    for outcome in report.outcomes:
        reference = " ".join(u.clip.reference for u in outcome.utterances)
        e, n = word_errors(reference, " ".join(texts[u.clip.name] for u in outcome.utterances))
        errors, words = errors + e, words + n
    return errors / words if words else float("nan")


def dump_transcripts(folder: Path, report, texts: dict[str, str]) -> None:
    """Per stream: reference, offline and gateway text, for diffing where the gateway loses words."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"streams-{report.streams}.tsv", "w") as f:
        f.write("stream\tclips\treference\toffline\tgateway\n")
        for o in report.outcomes:
            names = ",".join(u.clip.name for u in o.utterances)
            reference = " ".join(u.clip.reference for u in o.utterances)
            offline = " ".join(texts[u.clip.name] for u in o.utterances)
            gateway = " ".join(o.views[-1][1]) if o.views else ""
            f.write(f"{o.index}\t{names}\t{reference}\t{offline}\t{gateway}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio-dir", type=Path, default=ROOT / "tests" / "data" / "audio")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 12, 16])
    parser.add_argument("--utterances", type=int, default=6, help="recordings each stream reads")
    parser.add_argument("--pause", type=float, default=4.0, help="seconds of silence after each")
    parser.add_argument("--server-arg", action="append", default=[], help="extra `harken serve` argument")
    parser.add_argument("--dump", type=Path, help="write each level's per-stream transcripts here (TSV)")
    parser.add_argument("--server-root", type=Path, default=ROOT,
                        help="run the server from this source tree (e.g. the main branch, for a before/after)")
    args = parser.parse_args()

    print(f"cpus {sorted(os.sched_getaffinity(0))}  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
          "  (shared machine: compare ratios within this run)")
    clips = load_clips(args.audio_dir)
    offline, texts = offline_baseline(clips)
    print(f"{len(clips)} recordings from {args.audio_dir}; offline whole-file WER {offline:.1%}; "
          f"server {args.server_root} args {args.server_arg or '(defaults)'}")
    with tempfile.TemporaryDirectory() as tmp:
        server, url = start_server(Path(tmp), args.server_arg, args.server_root)
        try:
            baseline = None
            print(f"{'streams':>7} {'final p50':>9} {'p95':>6} {'max':>6} {'p95 ×1':>7} {'shown p50':>9} {'p95':>6} "
                  f"{'WER':>6} {'offline':>7} {'late':>7} {'failed':>6} {'server cpu s':>12} {'load':>5}")
            for streams in args.levels:
                cpu_before = cpu_seconds(server.pid)
                report = asyncio.run(run_speakers(url, clips, streams, utterances=args.utterances, pause=args.pause,
                                                  uid_prefix=f"bench-{streams}-"))
                cpu = cpu_seconds(server.pid) - cpu_before
                final, shown = report.percentiles("final_latencies"), report.percentiles("first_shown")
                baseline = baseline or final
                ratio = final.get("p95", float("nan")) / baseline["p95"] if baseline and baseline.get("p95") else float("nan")
                print(f"{streams:>7} {final.get('p50', float('nan')):9.2f} {final.get('p95', float('nan')):6.2f} "
                      f"{final.get('max', float('nan')):6.2f} {ratio:7.2f} {shown.get('p50', float('nan')):9.2f} "
                      f"{shown.get('p95', float('nan')):6.2f} {report.wer:6.1%} {offline_same_schedule(report, texts):7.1%} {report.late:>3}/{report.utterances:<3} "
                      f"{len(report.failures):>6} {cpu:12.1f} {os.getloadavg()[0]:5.2f}", flush=True)
                if args.dump:
                    dump_transcripts(args.dump, report, texts)
                for failure in report.failures[:3]:
                    print(f"        failure: {failure}")
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
