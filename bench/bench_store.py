"""Store write cost of one 600 ms segment batch, SQLite and PostgreSQL, against baselines.

    .venv/bin/python bench/bench_store.py [--batches 600] [--postgres postgresql://postgres@127.0.0.1:5432/test]

A batch is what a session saves every 600 ms while someone talks: the growing last segment
re-sent, a new segment every fifth batch, through ``LiveConversation.save_batch`` (segment
upsert + conversation update + realtime webhook outbox row, one transaction). Printed per
backend, in µs: p50/p95/p99 of
- ``noop``: awaiting an empty coroutine (the floor of any awaited call),
- ``empty txn``: BEGIN, SELECT 1, COMMIT on the same engine (a round trip that writes nothing,
  so it shows what the commit of real data, e.g. PostgreSQL's WAL flush, adds),
- ``save_batch``: the real call, with a realtime webhook set (an outbox row each batch),
- ``save_batch, no webhook``: the same without the webhook (INSERT … SELECT finds no setting),
and the ratio of save_batch p50 to the empty transaction's. The calls are interleaved.
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

import asyncpg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.config import Settings  # noqa: E402
from harken.conversations import ConversationService, Store, WebhookSetting  # noqa: E402


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6  # noqa: E731
    return pick(0.50), pick(0.95), pick(0.99)


def segment(sid: str, words: int, start: float) -> dict:
    text = " ".join(["word"] * words)
    return {"id": sid, "text": text, "speaker": "SPEAKER_00", "speakerId": 0, "speaker_id": 0, "is_user": True,
            "person_id": None, "start": start, "end": start + 0.3 * words, "stt_provider": "local",
            "speech_profile_processed": True, "translations": []}


async def noop() -> None:
    return None


async def timed(n: int, calls: dict) -> dict[str, list[float]]:
    """Time each call ``n`` times, interleaved, so load drift on a shared machine hits all alike."""
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for i in range(n):
        for label, call in calls.items():
            t0 = time.perf_counter()
            await call(i)
            samples[label].append(time.perf_counter() - t0)
    return samples


async def bench_backend(name: str, store: Store, batches: int, data_dir: Path) -> None:
    service = ConversationService(Settings(data_dir=data_dir), store, check_interval=3600)
    await store.set_webhook("hooked", WebhookSetting("realtime_transcript", "https://example.com/rt"), now=time.time())

    async def empty_txn(_: int) -> None:
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("SELECT 1"))

    async def batches_for(uid: str):
        live = await service.connect(uid, session_id=uuid.uuid4().hex)
        live.time_offset(time.time())

        async def one(i: int) -> None:
            seg_no, grown = divmod(i, 5)
            await live.save_batch([segment(f"s{seg_no}", grown + 1, seg_no * 2.0)])
        return live, one

    hooked, with_hook = await batches_for("hooked")
    quiet, without_hook = await batches_for("quiet")
    await timed(20, {"warm-up": empty_txn})                  # fill the pool, compile caches
    results = await timed(batches, {
        "noop": lambda i: noop(),
        "empty txn": empty_txn,
        "save_batch": with_hook,
        "save_batch, no webhook": without_hook,
    })
    await hooked.close()
    await quiet.close()
    print(f"\n{name}: {batches} batches each (µs)")
    print(f"  {'':24} {'p50':>9} {'p95':>9} {'p99':>9} {'mean':>9}")
    for label, samples in results.items():
        p50, p95, p99 = percentiles(samples)
        print(f"  {label:24} {p50:9.0f} {p95:9.0f} {p99:9.0f} {statistics.fmean(samples) * 1e6:9.0f}")
    ratio = percentiles(results["save_batch"])[0] / percentiles(results["empty txn"])[0]
    print(f"  save_batch p50 / empty txn p50 = {ratio:.2f}x; "
          f"share of the 600 ms batch interval at p95: {percentiles(results['save_batch'])[1] / 6000:.3f}%")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = await Store(f"sqlite:///{tmp}/bench.db").open()
        try:
            await bench_backend("SQLite (WAL, synchronous=NORMAL)", store, args.batches, Path(tmp))
        finally:
            await store.close()

        schema = f"harken_bench_{uuid.uuid4().hex[:8]}"
        try:
            admin = await asyncpg.connect(args.postgres, timeout=3)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            print(f"\nPostgreSQL skipped: {exc}")
            return
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        try:
            store = await Store(args.postgres, pg_schema=schema).open()
            try:
                await bench_backend("PostgreSQL (asyncpg, loopback)", store, args.batches, Path(tmp))
            finally:
                await store.close()
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
