"""The conversation store, run against SQLite and PostgreSQL alike.

PostgreSQL tests use a fresh schema per test on the server named by HARKEN_TEST_POSTGRES_URL
(default: the local test database) and drop it afterwards; they are skipped, saying why, only
when that server cannot be reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import uuid

import asyncpg
import pytest
import sqlalchemy as sa

from harken.conversations import migrations
from harken.conversations.model import (COMPLETED, IN_PROGRESS, PROCESSING, Conversation, Usage, WebhookSetting,
                                        readable_conversation, readable_segments)
from harken.conversations.schema import metadata
from harken.conversations.store import (BatchRequest, LeaseLost, OpenRequest, OutboxMessage, ProcessingClaim,
                                       PersonRow, ProcessingDone, Settlement, Store)

PG_URL = os.environ.get("HARKEN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]

_pg_problem: list[str | None] = []


async def postgres_problem() -> str | None:
    """Why PostgreSQL cannot be used (None if it can); checked once per run."""
    if not _pg_problem:
        try:
            conn = await asyncpg.connect(PG_URL, timeout=3)
            await conn.close()
            _pg_problem.append(None)
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
            _pg_problem.append(f"PostgreSQL at {PG_URL.rsplit('@', 1)[-1]} is unreachable: {exc}")
    return _pg_problem[0]


@contextlib.asynccontextmanager
async def database(backend: str, tmp_path):
    """Arguments for ``Store(**kwargs)`` naming an empty database, removed afterwards."""
    if backend == "sqlite":
        yield {"url": f"sqlite:///{tmp_path / 'harken.db'}"}
        return
    problem = await postgres_problem()
    if problem:
        pytest.skip(problem)
    schema = f"harken_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield {"url": PG_URL, "pg_schema": schema}
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


@contextlib.asynccontextmanager
async def opened_store(backend: str, tmp_path):
    async with database(backend, tmp_path) as kwargs:
        store = await Store(**kwargs).open()
        try:
            yield store
        finally:
            await store.close()


@pytest.fixture(params=BACKENDS)
async def store(request, tmp_path):
    async with opened_store(request.param, tmp_path) as opened:
        yield opened


def conversation(uid: str = "alice", *, now: float = 1000.0, timeout: float = 120.0, cid: str | None = None):
    return Conversation(id=cid or str(uuid.uuid4()), uid=uid, status=IN_PROGRESS, language="en", source="omi",
                        created_at=now, started_at=now, finished_at=now, timeout_s=timeout)


def segment(sid: str, text: str, start: float, end: float) -> dict:
    """The stored form the gateway's ``Segment.to_stored()`` produces."""
    return {"id": sid, "text": text, "speaker": "SPEAKER_00", "speakerId": 0, "speaker_id": 0, "is_user": True,
            "person_id": None, "start": start, "end": end, "stt_provider": "local",
            "speech_profile_processed": True, "translations": []}


def test_stored_times_no_reader_can_use_are_read_as_the_previous_end_and_good_rows_stay_as_they_are():
    good = [segment("a", "one", 0.5, 1.0), segment("b", "two", 1.2, 2.0)]
    assert readable_segments([dict(s) for s in good]) == good
    bad = good + [segment("c", "huge", 1e18, 1e18), segment("d", "absurd", 1e300, float("inf")),
                  segment("e", "nan", float("nan"), 3.0), {**segment("f", "null", 0, 0), "start": None},
                  segment("g", "int", 10 ** 400, 10 ** 400), segment("h", "end only", 2.5, 1e300)]
    read = readable_segments(bad)
    assert [s["text"] for s in read] == ["one", "two", "huge", "absurd", "nan", "null", "int", "end only"]
    assert [(s["start"], s["end"]) for s in read[2:]] == [(2.0, 2.0)] * 2 + [(2.0, 3.0)] + [(3.0, 3.0)] * 2 + [(2.5, 2.5)]

    now = 1_790_000_000.0
    fine = Conversation("c", "u", IN_PROGRESS, "en", "omi", now, now - 30, now + 5, 120)
    assert readable_conversation(fine) is fine
    for started in (now + 1e300, float("nan"), float("inf"), -1.0, now + 2e7):
        read = readable_conversation(Conversation("c", "u", IN_PROGRESS, "en", "omi", now, started, now + 5, 120))
        assert (read.started_at, read.finished_at) == (now, now + 5)


# --- migrations -------------------------------------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_migrating_from_scratch_gives_the_schema_the_code_queries(backend, tmp_path):
    async with opened_store(backend, tmp_path) as store:
        async with store.engine.connect() as conn:
            version = await conn.run_sync(migrations._current_version)
            reflected = await conn.run_sync(
                lambda c: {t: {col["name"] for col in sa.inspect(c).get_columns(t)}
                           for t in sa.inspect(c).get_table_names()})
    assert version == migrations.SCHEMA_VERSION
    expected = {t.name: {c.name for c in t.columns} for t in metadata.sorted_tables}
    assert reflected == expected


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_an_oldest_version_database_is_upgraded_in_place_keeping_its_data(backend, tmp_path):
    async with database(backend, tmp_path) as kwargs:
        old = await Store(**kwargs).open(schema_version=1)
        async with old.engine.begin() as conn:     # rows as version 1 wrote them
            await conn.execute(sa.text(
                "INSERT INTO conversations (id, uid, status, language, source, created_at, started_at, finished_at,"
                " timeout_s, structured, discarded) VALUES ('c1', 'alice', 'in_progress', 'de', 'omi', 10, 10, 20,"
                " 120, NULL, false)"))
            await conn.execute(sa.text(
                "INSERT INTO segments (conversation_id, segment_id, start, \"end\", words, data) VALUES"
                " ('c1', 's1', 0, 1.5, 2, '{\"id\": \"s1\", \"text\": \"hallo welt\", \"start\": 0, \"end\": 1.5}')"))
            await conn.execute(sa.text(
                "INSERT INTO webhooks (uid, kind, url, interval_seconds, updated_at) VALUES"
                " ('alice', 'audio_bytes', 'https://example.com/a', 7, 5)"))
        await old.close()

        v3 = await Store(**kwargs).open(schema_version=3)      # outbox rows as version 3 wrote them
        async with v3.engine.begin() as conn:
            for row_id, key, status in [(1, "k1", "pending"), (2, "k2", "dead"), (3, "k1", "pending"),
                                        (4, "k2", "pending")]:
                await conn.execute(sa.text(
                    "INSERT INTO outbox (id, uid, kind, ordering_key, url, params, headers, content_type, body,"
                    " status, created_at, next_attempt_at, claimed_until, attempts) VALUES (:id, 'alice',"
                    " 'realtime_transcript', :key, 'https://example.com/h', '{}', '{}', 'application/json', :body,"
                    " :status, 1, 1, 0, 0)"), {"id": row_id, "key": key, "status": status, "body": b"x"})
        await v3.close()

        store = await Store(**kwargs).open()
        try:
            # The oldest pending row of each key became its head; the dead one did not.
            claimed = await store.claim_outbox(node="n", now=10, lease=30, limit=10)
            assert [r.id for r in claimed] == [1, 4]
            kept = await store.get_with_segments("c1")
            assert kept is not None
            found, segments = kept
            assert (found.uid, found.language, found.finished_at) == ("alice", "de", 20)
            assert segments == [{"id": "s1", "text": "hallo welt", "start": 0, "end": 1.5}]
            assert await store.get_webhook("alice", "audio_bytes") == WebhookSetting(
                "audio_bytes", "https://example.com/a", 7)
            # The columns added by later versions work on the old rows.
            assert await store.claim_for_processing("c1", node="n1", now=30, lease=60) is not None
            await store.record_usage("alice", Usage(audio_seconds=3), session_id="s", conversation_id="c1", now=30)
        finally:
            await store.close()
        again = await Store(**kwargs).open()      # opening an up-to-date database changes nothing
        await again.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_database_newer_than_the_code_is_refused(backend, tmp_path):
    async with database(backend, tmp_path) as kwargs:
        store = await Store(**kwargs).open()
        async with store.engine.begin() as conn:
            await conn.execute(sa.text("UPDATE schema_version SET version = 99"))
        await store.close()
        with pytest.raises(migrations.SchemaTooNew, match="newer than this harken"):
            await Store(**kwargs).open()


# --- SQLite: writes on the loop's thread ----------------------------------------------------------

@pytest.mark.timeout(30)
async def test_a_sqlite_write_waits_off_the_loop_while_another_process_holds_the_write_lock(tmp_path):
    """Writes run on the event loop's thread, but one that meets another process's write lock
    (workers sharing the file) must wait in a thread: the loop goes on (here it is the loop that
    lets the other process go) and the write lands once the lock is free."""
    async with opened_store("sqlite", tmp_path) as store:
        c = conversation()
        await store.open_conversation(c, now=1000, live_until=1030)
        other_process = sqlite3.connect(store.url.database, isolation_level=None)
        other_process.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        save = asyncio.create_task(store.save_batch(c, [segment("a", "while locked", 0, 1)], [], now=1001,
                                                    live_until=1031, realtime=None))
        late = []
        for _ in range(10):                      # the loop keeps its pace while the save waits
            asked = loop.time()
            await asyncio.sleep(0.02)
            late.append(loop.time() - asked - 0.02)
        assert not save.done()
        assert max(late) < 0.15, late
        other_process.execute("COMMIT")
        other_process.close()
        assert await asyncio.wait_for(save, 10) is True
        assert [s["text"] for s in await store.load_segments(c.id)] == ["while locked"]
        assert store.lock_waits == 1


@pytest.mark.timeout(60)
async def test_sqlite_writes_on_the_loop_are_checkpointed_so_the_wal_stays_bounded(tmp_path):
    """The loop's connection never checkpoints (the fsyncs would stall it); the store checkpoints
    in a thread instead. Without that the WAL file grows with every write for as long as the
    process runs: here 300 transactions of a 12 KB segment would leave it over 10 MB. On a busy
    machine (CI) a commit could land during every checkpoint, and the WAL grew to 5.6 MB before
    the writes learnt to wait for a whole checkpoint once they are far behind (six busy loops on
    two cores beside this test make that happen about once in three runs of the old code)."""
    async with opened_store("sqlite", tmp_path) as store:
        c = conversation()
        await store.open_conversation(c, now=1000, live_until=1030)
        text = "word " * 2400
        for i in range(300):
            await store.save_batch(c, [segment(f"s{i}", text, i, i + 1)], [], now=1001 + i, live_until=1031 + i,
                                   realtime=None)
            await asyncio.sleep(0.001)           # as a server does between batches: checkpoints get a turn
        wal = os.path.getsize(store.url.database + "-wal")
        assert wal < 3_000_000, f"WAL at {wal} bytes"
        assert len(await store.load_segments(c.id)) == 300


# --- conversations and segments -----------------------------------------------------------------

@pytest.mark.timeout(30)
async def test_segments_are_upserted_by_id_and_deleted_by_id(store):
    c = conversation()
    await store.open_conversation(c, now=1000, live_until=1030)
    await store.save_batch(c, [segment("a", "hello", 0.0, 0.5)], [], now=1001, live_until=1031, realtime=None)
    await store.save_batch(c, [segment("a", "hello there", 0.0, 1.0), segment("b", "second one", 2.0, 3.0),
                               segment("z", "merged away", 1.2, 1.4)], [], now=1002, live_until=1032, realtime=None)
    await store.save_batch(c, [segment("a", "hello there friend", 0.0, 1.1)], ["z"], now=1003, live_until=1033,
                           realtime=None)
    stored = await store.load_segments(c.id)
    assert [(s["id"], s["text"]) for s in stored] == [("a", "hello there friend"), ("b", "second one")]
    found = await store.get_conversation(c.id)
    assert found.finished_at == 1003


@pytest.mark.timeout(30)
async def test_a_saved_batch_is_durable_as_soon_as_save_batch_returns(store):
    c = conversation()
    await store.open_conversation(c, now=1000, live_until=1030)
    await store.save_batch(c, [segment("a", "kept across a crash", 0.0, 1.0)], [], now=1001, live_until=1031,
                           realtime=None)
    # A second store on the same database (another process after a crash) sees it.
    other = await Store(str(store.url.render_as_string(hide_password=False)), pg_schema=store._pg_schema).open()
    try:
        assert [s["text"] for s in await other.load_segments(c.id)] == ["kept across a crash"]
    finally:
        await other.close()


@pytest.mark.timeout(30)
async def test_the_realtime_outbox_row_commits_with_its_segments_or_not_at_all(store):
    c = conversation()
    await store.open_conversation(c, now=1000, live_until=1030)
    message = OutboxMessage(uid="alice", kind="realtime_transcript", ordering_key=f"rt:{c.id}", body=b"[]")
    # No webhook set: the segments are saved, no row is made.
    await store.save_batch(c, [segment("a", "one", 0, 1)], [], now=1001, live_until=1031, realtime=message)
    assert await store.outbox_counts() == {}
    await store.set_webhook("alice", WebhookSetting("realtime_transcript", "https://example.com/rt"), now=1001)
    await store.save_batch(c, [segment("b", "two", 1, 2)], [], now=1002, live_until=1032, realtime=message)
    assert await store.outbox_counts() == {"pending": 1}
    # Taken by another node: neither the segment nor the row is written.
    assert await store.claim_for_processing(c.id, node="other", now=1003, lease=60) is not None
    assert not await store.save_batch(c, [segment("c", "three", 2, 3)], [], now=1004, live_until=1034,
                                      realtime=message)
    assert [s["id"] for s in await store.load_segments(c.id)] == ["a", "b"]
    assert await store.outbox_counts() == {"pending": 1}
    rows = await store.claim_outbox(node="n", now=1005, lease=30, limit=10)
    assert [(r.url, r.kind) for r in rows] == [("https://example.com/rt", "realtime_transcript")]


@pytest.mark.timeout(30)
async def test_one_group_commit_gives_each_batch_its_own_outcome(store):
    """Writable, fenced (another holder), processed, and missing conversations in one
    save_batches call: each gets what save_batch alone would give it, in one transaction."""
    await store.set_webhook("alice", WebhookSetting("realtime_transcript", "https://example.com/rt"), now=1000)
    await store.set_webhook("bob", WebhookSetting("realtime_transcript", "https://example.com/rt"), now=1000)
    writable, missing = conversation("alice", cid="c-writable"), conversation("alice", cid="c-missing")
    fenced, processed = conversation("bob", cid="c-fenced"), conversation("carol", cid="c-processed")
    for c in (writable, fenced, processed):
        await store.create_conversation(c, live_until=1030, holder=f"holder-{c.id}")
    await store.save_batch(writable, [segment("old", "merged away", 0, 1)], [], now=1000, live_until=1030,
                           realtime=None, holder=f"holder-{writable.id}")
    # Bob reconnects: the new connection takes c-fenced over; the old holder is fenced.
    resumed = await store.open_conversation(conversation("bob"), now=1001, live_until=1031, holder="bob-new")
    assert resumed.resumed and resumed.conversation.id == "c-fenced"
    assert await store.claim_for_processing("c-processed", node="other", now=1001, lease=60) is not None

    def request(c, text, *, deleted=()):
        message = OutboxMessage(uid=c.uid, kind="realtime_transcript", ordering_key=f"rt:{c.id}", body=b"[]")
        return BatchRequest(c, [segment("s1", text, 1.0, 2.0)], list(deleted), now=1002, live_until=1032,
                            realtime=message, holder=f"holder-{c.id}")

    before = store.batch_transactions
    outcomes = await store.save_batches([request(writable, "kept", deleted=["old"]), request(fenced, "refused"),
                                         request(processed, "too late"), request(missing, "created")])
    assert store.batch_transactions == before + 1
    assert outcomes[0] is True and outcomes[2] is False and outcomes[3] is True
    assert isinstance(outcomes[1], LeaseLost) and outcomes[1].args == ("c-fenced",)
    assert [s["text"] for s in await store.load_segments("c-writable")] == ["kept"]
    assert [s["text"] for s in await store.load_segments("c-missing")] == ["created"]
    assert await store.load_segments("c-fenced") == [] and await store.load_segments("c-processed") == []
    assert (await store.get_conversation("c-writable")).finished_at == 1002
    created = await store.get_conversation("c-missing")
    assert (created.status, created.finished_at) == (IN_PROGRESS, 1002)
    assert await store.renew_live([("c-missing", "holder-c-missing")], 1040) == []   # it holds the lease
    # One realtime row each for the two written batches only.
    rows = await store.claim_outbox(node="n", now=1003, lease=30, limit=10)
    assert sorted(r.ordering_key for r in rows) == ["rt:c-missing", "rt:c-writable"]
    with pytest.raises(ValueError, match="one request per conversation"):
        await store.save_batches([request(writable, "a"), request(writable, "b")])


@pytest.mark.timeout(30)
async def test_open_conversation_resumes_within_the_timeout_and_hands_back_stale_ones(store):
    first = conversation(now=1000, timeout=120)
    opened = await store.open_conversation(first, now=1000, live_until=1030)
    assert not opened.resumed
    await store.save_batch(first, [segment("a", "hi", 0, 1)], [], now=1010, live_until=1040, realtime=None)
    await store.release_live(first.id)

    again = await store.open_conversation(conversation(now=1100, timeout=120), now=1100, live_until=1130)
    assert again.resumed and again.conversation.id == first.id
    assert [s["id"] for s in again.segments] == ["a"]
    await store.release_live(first.id)

    later = conversation(now=1200, timeout=120)         # 190 s after the last segment
    fresh = await store.open_conversation(later, now=1200, live_until=1230)
    assert not fresh.resumed and fresh.conversation.id == later.id
    assert fresh.stale_ids == [first.id]


@pytest.mark.timeout(30)
async def test_each_source_of_a_user_has_its_own_live_conversation(store):
    """A pendant and the phone at once: neither resumes (and so takes the lease of) the other's
    conversation; another source's conversation is stale only once it is silent past its timeout."""
    from dataclasses import replace

    pendant = conversation(now=1000)
    await store.open_conversation(pendant, now=1000, live_until=1030, holder="pendant")
    await store.save_batch(pendant, [segment("p", "from the pendant", 0, 1)], [], now=1010, live_until=1040,
                           realtime=None, holder="pendant")
    phone = replace(conversation(now=1020), source="phone")
    opened = await store.open_conversation(phone, now=1020, live_until=1050, holder="phone")
    assert not opened.resumed and opened.conversation.id == phone.id and opened.stale_ids == []
    # The pendant still holds its own conversation: its next batch is stored.
    await store.save_batch(pendant, [segment("p2", "still the pendant", 1, 2)], [], now=1025, live_until=1055,
                           realtime=None, holder="pendant")
    await store.release_live(pendant.id)
    await store.release_live(phone.id)
    # The pendant reconnecting resumes its own; the phone's (silent 10 s) is left alone.
    back = await store.open_conversation(conversation(now=1035), now=1035, live_until=1065, holder="pendant-2")
    assert back.resumed and back.conversation.id == pendant.id and back.stale_ids == []
    await store.release_live(pendant.id)
    # Much later the phone's silent conversation is handed back for processing.
    late = await store.open_conversation(conversation(now=1300), now=1300, live_until=1330, holder="pendant-3")
    assert not late.resumed and sorted(late.stale_ids) == sorted([pendant.id, phone.id])


@pytest.mark.timeout(30)
async def test_many_sessions_open_in_one_transaction_each_as_if_alone(store):
    # carol: spoke 50 s ago (resumed, with her segments and her newer lease); dave: spoke 300 s ago
    # (a new conversation, the old one handed back as stale); erin: only a finished memory (a new one).
    # Read in the same transaction: each user's webhook settings and last memory, and the voices of
    # those who ask (carol: her own and a named person's; dave: a named person's; erin does not ask).
    recent, old, memory = conversation("carol", now=1000), conversation("dave", now=800), conversation("erin", now=500)
    for c in (recent, old, memory):
        await store.open_conversation(c, now=c.started_at, live_until=c.started_at + 30)
        await store.save_batch(c, [segment("a", f"{c.uid} spoke", 0, 1)], [], now=c.started_at + 10,
                               live_until=c.started_at + 40, realtime=None)
    claimed, _ = await store.claim_for_processing(memory.id, node="n", now=700, lease=60)
    assert await store.finish_processing(claimed, node="n", memory_webhook=None, now=701)
    audio = WebhookSetting("audio_bytes", "https://example.com/audio", 5)
    await store.set_webhook("carol", audio, now=1001)
    await store.set_speech_profile("carol", b"carol's voice", speech_seconds=20, now=1002)
    for person in (PersonRow("p2", "carol", "Cy", b"cy's voice", 1, 6.0, 1004),
                   PersonRow("p1", "carol", "Bea", b"bea's voice", 1, 6.0, 1003),
                   PersonRow("p0", "carol", "Al", None, 0, 0.0, 1000),         # no voice yet
                   PersonRow("p3", "dave", "Dee", b"dee's voice", 1, 6.0, 1005),
                   PersonRow("p4", "erin", "Eve", b"eve's voice", 1, 6.0, 1006)):
        await store.add_person(person)
    begun = count_transactions(store)
    asks = [OpenRequest(conversation(uid, now=1060), now=1060, live_until=1090, holder=f"{uid}-new",
                        voices=uid != "erin") for uid in ("carol", "dave", "erin")]
    carol, dave, erin = await store.open_conversations(asks)
    assert len(begun) == 1
    assert carol.voices == (b"carol's voice", [("p1", "Bea", b"bea's voice"), ("p2", "Cy", b"cy's voice")])
    assert dave.voices == (None, [("p3", "Dee", b"dee's voice")]) and erin.voices is None
    assert (carol.voices, dave.voices) == (await store.load_voices("carol"), await store.load_voices("dave"))
    assert carol.resumed and carol.conversation.id == recent.id and carol.stale_ids == []
    assert [s["text"] for s in carol.segments] == ["carol spoke"]
    assert not dave.resumed and dave.conversation.id == asks[1].new.id and dave.stale_ids == [old.id]
    assert not erin.resumed and erin.conversation.id == asks[2].new.id and erin.segments == []
    assert erin.stale_ids == [] and erin.last_memory_id == memory.id == await store.last_completed_id("erin")
    assert (carol.webhooks, dave.webhooks, erin.webhooks) == ({"audio_bytes": audio}, {}, {})
    assert carol.last_memory_id is None and dave.last_memory_id is None
    # The leases are the new connections': a write naming the older holder is refused.
    refused = await store.save_batches([BatchRequest(carol.conversation, [segment("b", "late", 1, 2)], [], now=1061,
                                                     live_until=1091, realtime=None, holder="carol-old")])
    assert isinstance(refused[0], LeaseLost)
    for opened in (dave, erin):
        assert (await store.get_conversation(opened.conversation.id)).status == IN_PROGRESS
    with pytest.raises(ValueError, match="one request per user"):
        await store.open_conversations([asks[0], asks[0]])


@pytest.mark.timeout(30)
async def test_the_last_memory_is_the_newest_completed_one_not_discarded(store):
    ids = []
    for at, discarded in ((500, False), (600, False), (700, True)):
        c = conversation("frank", now=at)
        await store.open_conversation(c, now=at, live_until=None)
        claimed, _ = await store.claim_for_processing(c.id, node="n", now=at + 150, lease=60)
        claimed.discarded = discarded
        assert await store.finish_processing(claimed, node="n", memory_webhook=None, now=at + 151)
        ids.append(c.id)
    assert await store.last_completed_id("frank") == ids[1]
    (opened,) = await store.open_conversations([OpenRequest(conversation("frank", now=900), now=900, live_until=930)])
    assert opened.last_memory_id == ids[1]
    assert await store.last_completed_id("nobody") is None


@pytest.mark.timeout(30)
async def test_only_one_of_two_concurrent_claims_wins_and_an_expired_claim_can_be_retaken(store):
    c = conversation()
    await store.open_conversation(c, now=1000, live_until=None)
    results = await asyncio.gather(*(store.claim_for_processing(c.id, node=f"n{i}", now=1500, lease=60)
                                     for i in range(4)))
    assert sum(r is not None for r in results) == 1
    assert (await store.get_conversation(c.id)).status == PROCESSING
    assert await store.claim_for_processing(c.id, node="late", now=1550, lease=60) is None
    assert await store.claim_for_processing(c.id, node="late", now=1561, lease=60) is not None


def count_transactions(store: Store) -> list:
    """A list that gets an item for each transaction begun on ``store`` from now on."""
    begun: list = []
    for engine in store.sync_engines:
        sa.event.listen(engine, "begin", begun.append)
    return begun


@pytest.mark.timeout(30)
async def test_many_processing_claims_in_one_transaction_each_get_their_own_outcome(store):
    """Free, done, validly held elsewhere, expired elsewhere, and unknown conversations claimed
    together: each gets what claim_for_processing alone would give it, in one transaction."""
    free, done, held, expired = (conversation(f"user{i}", cid=f"c-{name}")
                                 for i, name in enumerate(["free", "done", "held", "expired"]))
    for c in (free, done, held, expired):
        await store.create_conversation(c)
    await store.save_batch(free, [segment("b", "two", 1, 2), segment("a", "one", 0, 1)], [], now=1001,
                           live_until=None, realtime=None)
    finished = await store.claim_for_processing(done.id, node="other", now=1000, lease=60)
    assert await store.finish_processing(finished[0], node="other", memory_webhook=None, now=1001)
    assert await store.claim_for_processing(held.id, node="other", now=1450, lease=100) is not None
    assert await store.claim_for_processing(expired.id, node="dead", now=1000, lease=100) is not None

    begun = count_transactions(store)
    outcomes = await store.claim_for_processing_many(
        [ProcessingClaim(c.id, "me", 1500, 60) for c in (free, done, held, expired)]
        + [ProcessingClaim("c-unknown", "me", 1500, 60)])
    assert len(begun) == 1
    assert [o is not None for o in outcomes] == [True, False, False, True, False]
    claimed, segments = outcomes[0]
    assert claimed.id == free.id and claimed.status == PROCESSING and claimed.uid == "user0"
    assert [s["id"] for s in segments] == ["a", "b"]          # in time order
    assert outcomes[3][1] == []
    # The winners are held by "me" for the lease; the others are untouched.
    assert await store.claim_for_processing(free.id, node="late", now=1559, lease=60) is None
    assert await store.claim_for_processing(free.id, node="late", now=1561, lease=60) is not None
    assert (await store.get_conversation(done.id)).status == COMPLETED
    assert await store.claim_for_processing(held.id, node="late", now=1549, lease=60) is None
    with pytest.raises(ValueError):
        await store.claim_for_processing_many([ProcessingClaim(free.id, "me", 1, 1)] * 2)
    assert await store.claim_for_processing_many([]) == []


@pytest.mark.timeout(30)
async def test_many_completions_in_one_transaction_write_only_the_claims_still_held(store):
    await store.set_webhook("alice", WebhookSetting("memory_created", "https://example.com/m"), now=1000)
    await store.set_webhook("bob", WebhookSetting("memory_created", "https://example.com/m"), now=1000)
    mine, lost = conversation("alice", cid="c-mine"), conversation("bob", cid="c-lost")
    for c in (mine, lost):
        await store.create_conversation(c)
    claimed = await store.claim_for_processing_many([ProcessingClaim(c.id, "me", 1000, 60) for c in (mine, lost)])
    assert await store.claim_for_processing(lost.id, node="other", now=1061, lease=60) is not None   # expired: taken

    def done(c: Conversation, title: str) -> ProcessingDone:
        c.structured, c.discarded = {"title": title}, False
        message = OutboxMessage(uid=c.uid, kind="memory_created", ordering_key=f"m:{c.id}", body=title.encode())
        return ProcessingDone(c, "me", message, 1062)

    begun = count_transactions(store)
    outcomes = await store.finish_processing_many([done(claimed[0][0], "mine"), done(claimed[1][0], "lost")])
    assert len(begun) == 1
    assert outcomes == [True, False]
    assert (await store.get_conversation(mine.id)).structured == {"title": "mine"}
    assert (await store.get_conversation(mine.id)).status == COMPLETED
    assert (await store.get_conversation(lost.id)).status == PROCESSING         # still the other node's
    rows = await store.claim_outbox(node="n", now=1063, lease=30, limit=10)
    assert [r.body for r in rows] == [b"mine"]                                 # the lost one's webhook is not sent
    with pytest.raises(ValueError):
        await store.finish_processing_many([done(claimed[0][0], "a"), done(claimed[0][0], "b")])


@pytest.mark.timeout(30)
async def test_a_stopping_node_gives_back_only_its_own_processing_claims(store):
    mine, theirs = [conversation(f"user{i}") for i in range(3)], conversation("bob")
    for c in [*mine, theirs]:
        await store.open_conversation(c, now=1000, live_until=None)
    for c in mine:
        assert await store.claim_for_processing(c.id, node="stopping", now=1500, lease=60) is not None
    assert await store.claim_for_processing(theirs.id, node="other", now=1500, lease=60) is not None
    assert await store.release_claims("stopping") == 3
    assert [(await store.get_conversation(c.id)).status for c in mine] == [IN_PROGRESS] * 3
    assert (await store.get_conversation(theirs.id)).status == PROCESSING
    assert await store.claim_for_processing(mine[0].id, node="other", now=1501, lease=60) is not None


@pytest.mark.timeout(30)
async def test_sweep_finds_silent_unleased_and_abandoned_conversations(store):
    silent, live, recent = conversation(now=1000), conversation(now=1000), conversation(now=1190)
    await store.create_conversation(silent)
    await store.create_conversation(live, live_until=1300)
    await store.create_conversation(recent)
    abandoned = conversation(now=900)
    await store.create_conversation(abandoned)
    await store.claim_for_processing(abandoned.id, node="dead-node", now=950, lease=100)
    assert set(await store.sweep_candidates(now=1200)) == {silent.id, abandoned.id}
    assert set(await store.sweep_candidates(now=1200, exclude=[silent.id])) == {abandoned.id}


@pytest.mark.timeout(30)
async def test_list_is_the_users_newest_first_with_paging(store):
    ids = []
    for i in range(3):
        c = conversation("alice", now=1000 + i)
        await store.create_conversation(c)
        ids.append(c.id)
    await store.create_conversation(conversation("bob", now=2000))
    page = await store.list_conversations("alice", limit=2)
    assert [c.id for c, _ in page] == [ids[2], ids[1]]
    assert [c.id for c, _ in await store.list_conversations("alice", limit=2, offset=2)] == [ids[0]]


@pytest.mark.timeout(30)
async def test_webhook_settings_and_usage(store):
    await store.set_webhook("alice", WebhookSetting("audio_bytes", "https://a.example/x", 5), now=1)
    await store.set_webhook("alice", WebhookSetting("audio_bytes", "https://a.example/y", 9), now=2)
    assert await store.get_webhook("alice", "audio_bytes") == WebhookSetting("audio_bytes", "https://a.example/y", 9)
    assert await store.get_webhook("bob", "audio_bytes") is None
    assert await store.delete_webhook("alice", "audio_bytes")
    assert await store.get_webhook("alice", "audio_bytes") is None

    for seconds in (10.0, 2.5):
        await store.record_usage("alice", Usage(audio_seconds=seconds, speech_seconds=1.0, words=3, provider="local"),
                                 session_id="s", conversation_id="c", now=100)
    totals = await store.usage_totals("alice")
    assert (totals.audio_seconds, totals.speech_seconds, totals.words) == (12.5, 2.0, 6)


# --- outbox ---------------------------------------------------------------------------------------

async def _enqueue(store, key: str, n: int, now: float = 1000.0) -> None:
    await store.enqueue([OutboxMessage(uid="alice", kind="realtime_transcript", ordering_key=key,
                                       body=f"{key}-{i}".encode()) for i in range(n)], now=now)


@pytest.mark.timeout(30)
async def test_claims_hand_out_one_row_per_key_in_order(store):
    await store.set_webhook("alice", WebhookSetting("realtime_transcript", "https://example.com/h"), now=1)
    await _enqueue(store, "k1", 3)
    await _enqueue(store, "k2", 2)
    sent: list[bytes] = []
    for _ in range(10):
        rows = await store.claim_outbox(node="n", now=1001, lease=30, limit=10)
        if not rows:
            break
        assert len({r.ordering_key for r in rows}) == len(rows)      # never two of one key at once
        assert await store.claim_outbox(node="n", now=1001, lease=30, limit=10) == []   # heads are claimed
        sent += [r.body for r in rows]
        await store.settle_outbox(Settlement(delivered=rows))
    assert [b for b in sent if b.startswith(b"k1")] == [b"k1-0", b"k1-1", b"k1-2"]
    assert [b for b in sent if b.startswith(b"k2")] == [b"k2-0", b"k2-1"]
    assert await store.outbox_counts() == {}


@pytest.mark.timeout(30)
async def test_a_failing_row_holds_back_its_key_until_retried_and_dead_rows_do_not(store):
    await store.set_webhook("alice", WebhookSetting("realtime_transcript", "https://example.com/h"), now=1)
    await _enqueue(store, "k", 2)
    head = (await store.claim_outbox(node="n", now=1001, lease=30, limit=10))[0]
    await store.settle_outbox(Settlement(retry=[(head, 1100.0, "HTTP 500")]))
    assert await store.claim_outbox(node="n", now=1050, lease=30, limit=10) == []
    again = await store.claim_outbox(node="n", now=1100, lease=30, limit=10)
    assert [(r.id, r.attempts) for r in again] == [(head.id, 2)]
    await store.settle_outbox(Settlement(dead=[(head, "gave up")]))
    assert [r.body for r in await store.claim_outbox(node="n", now=1101, lease=30, limit=10)] == [b"k-1"]
    assert (await store.outbox_counts())["dead"] == 1


@pytest.mark.timeout(30)
async def test_an_expired_claim_is_handed_out_again(store):
    await store.set_webhook("alice", WebhookSetting("realtime_transcript", "https://example.com/h"), now=1)
    await _enqueue(store, "k", 1)
    first = await store.claim_outbox(node="crashed", now=1001, lease=30, limit=10)
    assert await store.claim_outbox(node="other", now=1030, lease=30, limit=10) == []
    retaken = await store.claim_outbox(node="other", now=1032, lease=30, limit=10)
    assert [r.id for r in retaken] == [first[0].id]


@pytest.mark.timeout(30)
async def test_concurrent_claimers_never_share_a_row(store):
    await store.set_webhook("alice", WebhookSetting("realtime_transcript", "https://example.com/h"), now=1)
    for k in range(40):
        await _enqueue(store, f"key{k}", 1)
    batches = await asyncio.gather(*(store.claim_outbox(node=f"n{i}", now=1001, lease=30, limit=7)
                                     for i in range(6)))
    ids = [r.id for batch in batches for r in batch]
    assert len(ids) == len(set(ids)) == 40


@pytest.mark.timeout(30)
async def test_rows_enqueued_while_earlier_ones_are_delivered_go_out_in_order_and_none_is_lost(store):
    await store.set_webhook("alice", WebhookSetting("realtime_transcript", "https://example.com/h"), now=1)
    total = 30
    delivered: list[bytes] = []

    async def produce() -> None:
        for i in range(total):
            await store.enqueue([OutboxMessage(uid="alice", kind="realtime_transcript", ordering_key="k",
                                               body=b"%02d" % i)], now=1000)
            await asyncio.sleep(0)

    async def consume() -> None:
        settlement = Settlement()
        async with asyncio.timeout(20):
            while len(delivered) < total:
                rows = await store.exchange_outbox(settlement, node="n", now=1001, lease=30, limit=5)
                assert len(rows) <= 1                       # one key: one row at a time
                delivered.extend(r.body for r in rows)
                settlement = Settlement(delivered=rows)
                await asyncio.sleep(0)
            await store.settle_outbox(settlement)

    await asyncio.gather(produce(), consume())
    assert delivered == [b"%02d" % i for i in range(total)]
    assert await store.outbox_counts() == {}
