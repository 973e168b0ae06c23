"""What a refused connection costs the server (issue #26): CPU of the event loop's thread per
connection closed at admission, beside what an accepted idle connection costs.

Abusers meet refusals by the hundred a second: 1,000 idle sockets from one address (256 are
held, the rest refused and reopened), a client that keeps reconnecting through its penalty for
oversized heads (``bench_fairness.py``). Each refusal is an accept, the admission check and an
abort; before ``edge.AdmissionGate`` it also built uvicorn's HTTP protocol first.

A ``harken serve`` (null provider) on this checkout, and with ``--compare DIR`` on another
checkout too, alternately, ``--rounds`` times each (a shared machine's load drifts): 256
connections from 127.0.0.2 fill its per-client cap, then ``--connects`` more from there are each
refused; then as many connections from 127.0.0.3 are accepted and closed by the client. CPU is
the server's main thread (/proc/PID/task/PID/schedstat), per connection.

    python bench/bench_refusals.py [--connects 5000] [--rounds 3] [--compare /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fairness import ROOT, free_port, start_server  # noqa: E402

PER_CLIENT_CAP = 256      # the default max_connections_per_client


def loop_thread_cpu(pid: int) -> float:
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def measure(root: str, connects: int) -> tuple[float, float]:
    """(µs per refused connection, µs per accepted idle connection) of one server."""
    os.environ["BENCH_SERVER_ROOT"] = root
    with tempfile.TemporaryDirectory(prefix="harken-refusals-") as tmp:
        port = free_port()
        server = start_server(port, Path(tmp))
        try:
            held = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
                    for _ in range(PER_CLIENT_CAP)]
            time.sleep(0.5)
            before = loop_thread_cpu(server.pid)
            for _ in range(connects):
                with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as sock:
                    try:
                        sock.recv(1)          # the server's abort (or close)
                    except OSError:
                        pass
            refused = (loop_thread_cpu(server.pid) - before) / connects
            for sock in held:
                sock.close()
            time.sleep(0.5)
            before = loop_thread_cpu(server.pid)
            for _ in range(connects // 10):
                batch = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0))
                         for _ in range(10)]
                for sock in batch:
                    sock.close()
            time.sleep(0.3)
            accepted = (loop_thread_cpu(server.pid) - before) / (connects // 10 * 10)
            return refused * 1e6, accepted * 1e6
        finally:
            server.terminate()
            server.wait(timeout=40)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connects", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", help="another checkout (e.g. the code before a change), run alternately")
    args = parser.parse_args()
    roots = {"this": str(ROOT)} | ({"compare": args.compare} if args.compare else {})
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in roots}
    for round_no in range(args.rounds):
        for name, root in roots.items():
            figures[name].append(measure(root, args.connects))
            refused, accepted = figures[name][-1]
            print(f"round {round_no + 1} {name:8s} refused {refused:6.1f} us  accepted idle {accepted:6.1f} us  "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    print(f"\nserver event-loop CPU per connection, median of {args.rounds} rounds (min-max); "
          f"{args.connects} refused connects (per-client cap full), as many accepted idle ones")
    for name, rows in figures.items():
        refused, accepted = [r for r, _ in rows], [a for _, a in rows]
        print(f"{name:8s} refused {statistics.median(refused):6.1f} us ({min(refused):.0f}-{max(refused):.0f})   "
              f"accepted idle {statistics.median(accepted):6.1f} us ({min(accepted):.0f}-{max(accepted):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
