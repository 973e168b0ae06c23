"""Store write cost of one 600 ms segment batch, SQLite and PostgreSQL, against baselines.

    .venv/bin/python bench/bench_store.py [--batches 600] [--postgres postgresql://postgres@127.0.0.1:5432/test]

A batch is what a session saves every 600 ms while someone talks: the growing last segment
re-sent, a new segment every fifth batch, through ``LiveConversation.save_batch`` (segment
upsert + conversation update + realtime webhook outbox row, one transaction). Printed per
backend, in µs: p50/p95/p99 of
- ``noop``: awaiting an empty coroutine (the floor of any awaited call),
- ``empty txn``: BEGIN, SELECT 1, COMMIT through the store's write path (a round trip that
  writes nothing, so it shows what the commit of real data, e.g. PostgreSQL's WAL flush, adds;
  on SQLite the write path runs on the loop's thread, see ``sqlite_loop.py``),
- ``save_batch``: the real call, with a realtime webhook set (an outbox row each batch),
- ``save_batch, no webhook``: the same without the webhook (INSERT … SELECT finds no setting),
and the ratio of save_batch p50 to the empty transaction's. The calls are interleaved and spaced
by the group-commit pause (``GATHER_SECONDS``): a lone session saves every 600 ms, so it never
waits for that pause; back to back, every call would.

Then many sessions at once (``--sessions 50,200``): each of N conversations saves one batch
(realtime webhook set) at the same moment, ``--rounds`` times, two ways, interleaved round by
round:
- ``one txn per batch``: every batch its own ``Store.save_batch`` transaction, all N awaited
  together (how sessions saved before group commit: they queue for the writer);
- ``group commit``: ``LiveConversation.save_batch`` through the service's committer, which
  writes what is pending in one ``Store.save_batches`` transaction.
Printed: wall time of a round (all N stored) p50/p99 in ms, per-batch latency p99 in ms, this
process's CPU per round in ms (SQLite's work runs here, PostgreSQL's does not), and
transactions per round.

Then a processing burst (``--processing``, 0 = skip): conversations due at once, each with a
minute of segments and a memory webhook set, processed with the offline summariser through the
service's grouped claims and completions, against one transaction each, 4 at a time (as before
group commit); CPU per conversation processed.
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
from harken.conversations import ConversationService, Conversation, Store, Usage, WebhookSetting  # noqa: E402
from harken.conversations.group_commit import GATHER_SECONDS  # noqa: E402
from harken.conversations.webhooks import realtime_message  # noqa: E402


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


async def timed(n: int, calls: dict, spacing: float = 0.0) -> dict[str, list[float]]:
    """Time each call ``n`` times, interleaved, so load drift on a shared machine hits all alike,
    ``spacing`` seconds apart (untimed)."""
    samples: dict[str, list[float]] = {label: [] for label in calls}
    for i in range(n):
        for label, call in calls.items():
            t0 = time.perf_counter()
            await call(i)
            samples[label].append(time.perf_counter() - t0)
            await asyncio.sleep(spacing)
    return samples


async def bench_backend(name: str, store: Store, batches: int, data_dir: Path, concurrent: list[int],
                        rounds: int, processing: int) -> None:
    service = ConversationService(Settings(data_dir=data_dir), store, check_interval=3600)
    await store.set_webhook("hooked", WebhookSetting("realtime_transcript", "https://example.com/rt"), now=time.time())

    async def empty_txn(_: int) -> None:
        async with store._write() as conn:
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
    }, spacing=GATHER_SECONDS)     # a session saves every 600 ms: alone, it never waits for the last commit
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
    for sessions in concurrent:
        await bench_concurrent(store, service, sessions, rounds)
    if processing:
        await bench_processing(store, data_dir, processing)


async def bench_concurrent(store: Store, service: ConversationService, sessions: int, rounds: int) -> None:
    """N conversations saving one batch each at the same moment: per-batch transactions against
    group commit (see the module docstring)."""
    now = time.time()
    tag = uuid.uuid4().hex[:6]
    for i in range(sessions):
        for uid in (f"{tag}-d{i}", f"{tag}-g{i}"):
            await store.set_webhook(uid, WebhookSetting("realtime_transcript", "https://example.com/rt"), now=now)
    # One txn per batch: conversations written straight through Store.save_batch.
    direct = []
    for i in range(sessions):
        c = Conversation(id=str(uuid.uuid4()), uid=f"{tag}-d{i}", status="in_progress", language="en", source="omi",
                         created_at=now, started_at=now, finished_at=now, timeout_s=120.0)
        await store.create_conversation(c, live_until=now + 60, holder=f"h{i}")
        direct.append((c, f"h{i}"))
    # Group commit: as many users' live handles through the service.
    lives = [await service.connect(f"{tag}-g{i}", session_id=f"{tag}-g{i}") for i in range(sessions)]
    for live in lives:
        live.time_offset(time.time())

    async def timed_call(call) -> float:
        t0 = time.perf_counter()
        await call
        return time.perf_counter() - t0

    async def direct_round(r: int) -> list[float]:
        seg = lambda: [segment(f"s{r // 5}", r % 5 + 1, r // 5 * 2.0)]  # noqa: E731
        t = time.time()
        return await asyncio.gather(*(timed_call(store.save_batch(
            c, seg(), [], now=t, live_until=t + 60, holder=holder,
            realtime=realtime_message(c.uid, c.uid, c.id, seg()))) for c, holder in direct))

    async def grouped_round(r: int) -> list[float]:
        return await asyncio.gather(*(timed_call(live.save_batch([segment(f"s{r // 5}", r % 5 + 1, r // 5 * 2.0)]))
                                      for live in lives))

    modes = {"one txn per batch": direct_round, "group commit": grouped_round}
    walls = {m: [] for m in modes}
    cpus = {m: [] for m in modes}
    latencies = {m: [] for m in modes}
    txns = {m: 0 for m in modes}
    for r in range(rounds):
        for mode, run in modes.items():
            before_txn = getattr(store, "batch_transactions", 0)
            c0, t0 = time.process_time(), time.perf_counter()
            latencies[mode] += await run(r)
            walls[mode].append(time.perf_counter() - t0)
            cpus[mode].append(time.process_time() - c0)
            txns[mode] += getattr(store, "batch_transactions", 0) - before_txn
    # All of them closing at once (a drain): lease release and usage, two transactions per
    # session as before, against the service's grouped session ends.
    used = Usage(audio_seconds=60.0, speech_seconds=30.0, words=100, provider="null")

    async def close_directly(c: Conversation, holder: str) -> None:
        await store.release_live(c.id, holder=holder)
        await store.record_usage(c.uid, used, session_id=c.uid, conversation_id=c.id, now=time.time())

    t0 = time.perf_counter()
    await asyncio.gather(*(close_directly(c, holder) for c, holder in direct))
    closes = {"two txns per session": time.perf_counter() - t0}
    t0 = time.perf_counter()
    await asyncio.gather(*(live.close(usage=used) for live in lives))
    closes["grouped session ends"] = time.perf_counter() - t0
    print(f"  {sessions} sessions saving at once, {rounds} rounds:")
    print(f"    {'':18} {'round p50 ms':>12} {'round p99 ms':>12} {'batch p99 ms':>12} {'CPU/round ms':>12} "
          f"{'txns/round':>10}")
    for mode in modes:
        p50, _, p99 = percentiles(walls[mode])
        print(f"    {mode:18} {p50 / 1e3:12.1f} {p99 / 1e3:12.1f} {percentiles(latencies[mode])[2] / 1e3:12.1f} "
              f"{statistics.fmean(cpus[mode]) * 1e3:12.1f} {txns[mode] / rounds:10.1f}")
    ratio = statistics.median(walls["one txn per batch"]) / statistics.median(walls["group commit"])
    print(f"    group commit: round p50 {ratio:.1f}x faster")
    print(f"  {sessions} sessions closing at once: " + ", ".join(f"{m} {w * 1e3:.0f} ms" for m, w in closes.items())
          + f" ({closes['two txns per session'] / closes['grouped session ends']:.1f}x)")


class OneTransactionEach:
    """Stands in for a ``GroupCommitter``: every request in a transaction of its own (how
    processing claimed and completed conversations before group commit)."""

    def __init__(self, write) -> None:
        self._write = write

    async def save(self, request):
        return (await self._write([request]))[0]


async def bench_processing(store: Store, data_dir: Path, conversations: int, rounds: int = 4) -> None:
    """A burst of conversations due at once (sessions that ended together, timed out together):
    CPU per conversation processed (claim, offline summary, completion with its memory webhook)
    with the service's grouped claims and completions against one transaction each with 4 at a
    time, as before. Rounds alternate between the two."""
    modes = {"one txn each": ConversationService(Settings(data_dir=data_dir), store, check_interval=3600),
             "group commit": ConversationService(Settings(data_dir=data_dir), store, check_interval=3600)}
    before = modes["one txn each"]
    before._claims = OneTransactionEach(store.claim_for_processing_many)
    before._completions = OneTransactionEach(store.finish_processing_many)
    before._processing_slots = asyncio.Semaphore(4)
    per_round = max(1, conversations // rounds)
    cpu = {mode: 0.0 for mode in modes}
    wall = {mode: 0.0 for mode in modes}
    done = {mode: 0 for mode in modes}
    for r in range(rounds):
        for mode, service in modes.items():
            tag = uuid.uuid4().hex[:6]
            ids = []
            for i in range(per_round):
                uid = f"{tag}-p{i}"
                await store.set_webhook(uid, WebhookSetting("memory_created", "https://example.com/m"), now=time.time())
                live = await service.connect(uid, session_id=uid)
                live.time_offset(time.time() - 60)
                await live.save_batch([segment(f"s{k}", 2, k * 1.2) for k in range(50)])   # a minute of talk
                await live.close()
                ids.append(live.conversation_id)
            c0, t0 = time.process_time(), time.perf_counter()
            for cid in ids:
                service._spawn_processing(cid, None)
            await service.wait_for_processing()
            cpu[mode] += time.process_time() - c0
            wall[mode] += time.perf_counter() - t0
            completed = [await store.get_conversation(cid) for cid in ids]
            done[mode] += sum(c is not None and c.status == "completed" for c in completed)
    print(f"  {per_round * rounds} conversations due at once, processed in {rounds} bursts (offline summary):")
    for mode in modes:
        print(f"    {mode:14} CPU {cpu[mode] * 1e3 / done[mode]:5.2f} ms per conversation, "
              f"{wall[mode] / rounds:.2f} s per burst of {per_round}, {done[mode]} completed")
    per = {mode: cpu[mode] / done[mode] for mode in modes}
    print(f"    group commit: {per['one txn each'] / per['group commit']:.1f}x less CPU per conversation")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--sessions", default="50,200", help="concurrent sessions (comma-separated; '' = skip)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--processing", type=int, default=200,
                        help="conversations due at once for the processing burst (0 = skip)")
    args = parser.parse_args()
    concurrent = [int(n) for n in args.sessions.split(",") if n.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        store = await Store(f"sqlite:///{tmp}/bench.db").open()
        try:
            await bench_backend("SQLite (WAL, synchronous=NORMAL)", store, args.batches, Path(tmp),
                                concurrent, args.rounds, args.processing)
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
                await bench_backend("PostgreSQL (asyncpg, loopback)", store, args.batches, Path(tmp),
                                    concurrent, args.rounds, args.processing)
            finally:
                await store.close()
        finally:
            await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
