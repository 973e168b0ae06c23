"""Connect → ``ready`` time for each device kind the Omi app supports, and the share of kinds that
reach ``ready`` and transcribe, through the app's own URL and headers against a local server.

    .venv/bin/python bench/bench_app_devices.py [--runs 10] [--null]

For each device kind (tests/test_app_conformance.py's table) it opens ``--runs`` connections as
the app does and measures the time from starting the WebSocket handshake to ``service_status
ready``; the first connection of each kind also streams a real recording in the device's codec
and counts it as transcribed when at least 6 of its 8 words come back. Baseline, measured in the
same run against the same server: the time to a refusal (a connection without a token, closed
1008 after accept), i.e. the handshake and the server's accept path with no session behind it.
Figures are p50/p95 in ms and the ratio of the p50 to the baseline's p50. ``--null`` uses the
null provider (no speech engine: the session's opening alone); default is the embedded engine.
Every server message is also checked against the app's Dart models (harken/gateway/app_schema).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harken.client import listen_url  # noqa: E402
from harken.codecs.encode import encode_for_device, message_duration  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402
from tests.conftest import load_audio, test_settings  # noqa: E402
from tests.gateway_server import GatewayServer  # noqa: E402
from tests.test_app_conformance import (CLIP, CLIP_WORDS, DEVICE_KINDS, app_headers, app_url,  # noqa: E402
                                        run_app)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def refusal_ms(server) -> float:
    start = time.monotonic()
    try:
        async with websockets.connect(listen_url(server.base, codec="pcm16"), open_timeout=30) as ws:
            async for _ in ws:
                pass
    except websockets.ConnectionClosed:
        pass
    return (time.monotonic() - start) * 1000


async def main(args) -> None:
    changes = {"null_provider": True} if args.null else {}
    server = GatewayServer(test_settings(Path(tempfile.mkdtemp(prefix="bench-app-")), **changes)).start()
    try:
        await refusal_ms(server)                  # warm the accept path
        baseline = [await refusal_ms(server) for _ in range(args.runs * 3)]
        base_p50 = statistics.median(baseline)
        print(f"baseline (refused connection): p50 {base_p50:.1f} ms, p95 {pct(baseline, 0.95):.1f} ms, "
              f"n={len(baseline)}")
        pcm = np.concatenate([np.zeros(4000, np.int16), load_audio(CLIP), np.zeros(8000, np.int16)])
        reached = transcribed = 0
        problems = 0
        for kind, codec, source, options in DEVICE_KINDS:
            times, heard = [], None
            for run in range(args.runs):
                uid = f"bench-{uuid.uuid4().hex[:8]}"
                token = mint_local_token(server.settings, uid, 600)
                extra = {"stt_service": "null"} if args.null else {}
                messages, each = (encode_for_device(pcm, codec, 16000, **options), message_duration(codec, 16000)) \
                    if run == 0 else ([], 0.0)
                session = await run_app(app_url(server.base, uid, codec, source, **extra), app_headers(token),
                                        messages, each, settle=0.1 if run else 3.0, max_wait=90,
                                        until=(lambda s: len(s.words() & CLIP_WORDS) >= 6) if run == 0 else None)
                problems += len(session.problems)
                if session.ready_after is not None:
                    times.append(session.ready_after * 1000)
                if run == 0:
                    heard = len(session.words() & CLIP_WORDS)
            ok = len(times) == args.runs
            reached += ok
            transcribed += heard is not None and heard >= 6
            p50 = statistics.median(times) if times else float("nan")
            print(f"{kind:28s} {codec:11s} connect->ready p50 {p50:6.1f} ms  p95 {pct(times, 0.95) if times else float('nan'):6.1f} ms"
                  f"  ({p50 / base_p50:.1f}x baseline)  ready {len(times)}/{args.runs}  words heard {heard}/8")
        n = len(DEVICE_KINDS)
        print(f"device kinds reaching ready: {reached}/{n} ({100 * reached / n:.0f} %); transcribing: "
              f"{transcribed}/{n} ({100 * transcribed / n:.0f} %){' (null provider: scripted words)' if args.null else ''}; "
              f"messages the app could not parse: {problems}")
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--null", action="store_true", help="null provider instead of the embedded engine")
    asyncio.run(main(parser.parse_args()))
