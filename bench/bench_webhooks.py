"""Webhook deliveries per second of one node, from the outbox to a loopback receiver.

    .venv/bin/python bench/bench_webhooks.py [--rows 2000] [--workers 16] [--postgres URL]

The receiver is the test fake (tests/fakes/webhook_receiver.py), in the same process and event
loop as the deliverer, so both share one core: the figures are a floor for a node whose receiver
is elsewhere. Printed for SQLite and PostgreSQL:
- ``baseline``: the same number of POSTs sent straight with httpx at the same concurrency
  (no outbox): what the HTTP side alone allows,
- ``outbox, many keys``: rows spread over 200 conversations (10 each), as many sessions make,
- ``outbox, one key``: 300 rows of one conversation, which must go out strictly one by one,
each as deliveries/s and as a ratio to the baseline; the cost of one claim (p50, 16 rows) with
200 and with 20,000 rows pending behind a dead receiver (it must not grow with the backlog). Then ``save_batch`` latency (what a
session waits for each 600 ms batch, realtime webhook set) while the receiver is healthy, while
every request hangs for 30 s, and healthy again: the hang must not show.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.config import Settings  # noqa: E402
from harken.conversations import ConversationService, OutboxDeliverer, Store, WebhookSetting  # noqa: E402
from harken.conversations.schema import outbox  # noqa: E402
from harken.conversations.store import OutboxMessage  # noqa: E402
from tests.fakes.webhook_receiver import WebhookReceiver  # noqa: E402

BODY = b'[{"id":"s1","text":"a segment of about this size","speaker":"SPEAKER_00","speakerId":0,' \
       b'"is_user":true,"start":1.0,"end":2.5}]'


async def baseline(receiver: WebhookReceiver, rows: int, workers: int) -> float:
    receiver.requests.clear()
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(limits=limits) as client:
        semaphore = asyncio.Semaphore(workers)

        async def post(i: int) -> None:
            async with semaphore:
                await client.post(receiver.url(), content=BODY, params={"uid": "u", "session_id": str(i)},
                                  headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        await asyncio.gather(*(post(i) for i in range(rows)))
        return rows / (time.perf_counter() - t0)


async def through_outbox(store: Store, receiver: WebhookReceiver, rows: int, keys: int, workers: int) -> float:
    receiver.requests.clear()
    await store.enqueue([OutboxMessage(uid="u", kind="realtime_transcript", ordering_key=f"k{i % keys}", body=BODY,
                                       params={"uid": "u", "session_id": "s"}) for i in range(rows)],
                        now=time.time())
    deliverer = OutboxDeliverer(store, node_id="bench", secret=secrets.token_hex(16), workers=workers,
                                allow_private=True, poll_interval=0.5)
    t0 = time.perf_counter()
    await deliverer.start()
    await receiver.wait_for(rows, timeout=600)
    elapsed = time.perf_counter() - t0
    await deliverer.stop()
    assert len(receiver.requests) == rows and deliverer.failed_attempts == 0
    return rows / elapsed


async def claim_cost(store: Store, backlog: int) -> float:
    """p50 ms of claiming 16 due heads while ``backlog`` rows wait behind one dead key."""
    now = time.time()
    dead_key = [OutboxMessage(uid="u", kind="realtime_transcript", ordering_key="dead-receiver", body=BODY)
                for _ in range(backlog)]
    live_keys = [OutboxMessage(uid="u", kind="realtime_transcript", ordering_key=f"live{i}", body=BODY)
                 for i in range(16)]
    await store.enqueue(dead_key + live_keys, now=now)
    samples = []
    for _ in range(30):
        t0 = time.perf_counter()
        rows = await store.claim_outbox(node="bench", now=time.time(), lease=0.0, limit=16)
        samples.append(time.perf_counter() - t0)
        assert len(rows) == 16
    async with store.engine.begin() as conn:            # leave the outbox empty for what follows
        await conn.execute(outbox.delete())
    return sorted(samples)[len(samples) // 2] * 1e3


async def save_batch_latency(store: Store, receiver: WebhookReceiver, batches: int) -> None:
    deliverer = OutboxDeliverer(store, node_id="bench-latency", timeout=60, allow_private=True)
    with tempfile.TemporaryDirectory() as tmp:
        service = ConversationService(Settings(data_dir=Path(tmp)), store, deliverer=deliverer, check_interval=3600)
        await service.start()
        try:
            live = await service.connect("u", session_id="latency")
            live.time_offset(time.time())
            counter = iter(range(10**6))

            async def phase() -> list[float]:
                samples = []
                for _ in range(batches):
                    i = next(counter)
                    text = " ".join(["word"] * (i % 5 + 1))
                    t0 = time.perf_counter()
                    await live.save_batch([{"id": f"s{i // 5}", "text": text, "speaker": "SPEAKER_00",
                                            "speaker_id": 0, "is_user": True, "start": float(i), "end": i + 0.5}])
                    samples.append(time.perf_counter() - t0)
                    await asyncio.sleep(0.01)
                return sorted(samples)

            healthy = await phase()
            receiver.hang_seconds = 30
            before = receiver.attempts
            hanging = await phase()
            stuck = receiver.attempts - before
            receiver.hang_seconds = 0
            await receiver.stop()                   # drop the hanging requests
            await receiver.start()
            again = await phase()
            await live.close()
        finally:
            await service.stop()
    print(f"  save_batch while the receiver is (µs, {batches} batches each; {stuck} request(s) left hanging):")
    for label, samples in (("healthy", healthy), ("hanging 30 s", hanging), ("back (catch-up)", again)):
        p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1e6  # noqa: E731
        print(f"    {label:15} p50 {p(0.5):7.0f}  p95 {p(0.95):7.0f}  p99 {p(0.99):7.0f}  max {samples[-1] * 1e6:7.0f}")


async def bench(name: str, store: Store, rows: int, workers: int, receiver: WebhookReceiver) -> None:
    await store.set_webhook("u", WebhookSetting("realtime_transcript", receiver.url()), now=time.time())
    base = await baseline(receiver, rows, workers)
    many = await through_outbox(store, receiver, rows, 200, workers)
    one = await through_outbox(store, receiver, 300, 1, workers)
    print(f"\n{name}, {workers} workers")
    print(f"  baseline (httpx, no outbox)  {base:8.0f} /s")
    print(f"  outbox, many keys            {many:8.0f} /s   {many / base:.2f}x baseline  ({rows} rows, 200 keys)")
    print(f"  outbox, one key (in order)   {one:8.0f} /s   {one / base:.2f}x baseline  (300 rows)")
    small, large = await claim_cost(store, 200), await claim_cost(store, 20_000)
    print(f"  claim of 16 heads, p50       {small:8.2f} ms with 200 rows pending, {large:.2f} ms with 20,000")
    await save_batch_latency(store, receiver, 200)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    receiver = await WebhookReceiver().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = await Store(f"sqlite:///{tmp}/bench.db").open()
            try:
                await bench("SQLite", store, args.rows, args.workers, receiver)
            finally:
                await store.close()
        try:
            admin = await asyncpg.connect(args.postgres, timeout=3)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            print(f"\nPostgreSQL skipped: {exc}")
            return
        schema = f"harken_bench_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            store = await Store(args.postgres, pg_schema=schema).open()
            try:
                await bench("PostgreSQL", store, args.rows, args.workers, receiver)
            finally:
                await store.close()
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.close()
    finally:
        await receiver.stop()


if __name__ == "__main__":
    asyncio.run(main())
