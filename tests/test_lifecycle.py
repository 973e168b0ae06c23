"""Conversation lifecycle at the service level, on SQLite and PostgreSQL (PROTOCOL §7).

Time is a test clock given to the service, and silence checks are run by calling
``check_once()``, so "two minutes later" takes no time and nothing depends on timer luck.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest

from harken.config import Settings
from harken.conversations import ConversationService
from harken.conversations.llm import ChatSummariser
from harken.conversations.processing import ConversationProcessor
from harken.conversations.model import COMPLETED, IN_PROGRESS, WebhookSetting
from tests.fakes.llm import HANG, FakeChatServer
from tests.test_store import segment, store  # noqa: F401  (store: the SQLite/PostgreSQL fixture)

TIMEOUT = 120
SPEECH = "good morning everyone let us review the plan for the launch"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Events:
    def __init__(self) -> None:
        self.received: list[dict] = []

    async def __call__(self, event: dict) -> None:
        self.received.append(event)

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.received if e["type"] == kind]


@contextlib.asynccontextmanager
async def service_on(store, tmp_path, clock, *, start: bool = True, node_id: str | None = None):
    settings = Settings(data_dir=tmp_path)
    service = ConversationService(settings, store, clock=clock, check_interval=3600, node_id=node_id)
    if start:
        await service.start()
    try:
        yield service
    finally:
        await service.stop()


async def speak(live, clock, text: str = SPEECH, *, sid: str = "s1", start: float = 0.0, length: float = 4.0):
    """Save one batch holding a segment of ``text`` at conversation time ``start``."""
    seg = segment(sid, text, start, start + length)
    await live.save_batch([seg])
    return seg


@pytest.mark.timeout(30)
async def test_reconnecting_mid_conversation_resumes_it_and_times_continue(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        first = await service.connect("alice", conversation_timeout=TIMEOUT, session_id="sess-1")
        origin = clock.now
        offset = first.time_offset(origin, 2.0)       # the first word comes 2 s into the session
        assert offset == -2.0                         # … and is at conversation time 0
        said = await speak(first, clock, start=2.0 + offset)
        clock.advance(6)
        await first.close()

        clock.advance(24)                             # back 30 s after the first session began
        second = await service.connect("alice", conversation_timeout=TIMEOUT, session_id="sess-2")
        assert second.conversation_id == first.conversation_id
        assert second.existing_segments == [said]
        offset = second.time_offset(clock.now, 0.5)
        # A word 0.5 s into the new session was said 30.5 s after the first session began,
        # i.e. 28.5 s after the conversation's first word.
        assert 0.5 + offset == pytest.approx(28.5)
        await speak(second, clock, "and the follow up", sid="s2", start=0.5 + offset)
        await second.close()
        stored = await service.get_conversation("alice", first.conversation_id)
        assert [s["start"] for s in stored["transcript_segments"]] == [0.0, pytest.approx(28.5)]
        assert stored["status"] == IN_PROGRESS


@pytest.mark.timeout(30)
async def test_reconnecting_after_the_timeout_processes_the_old_one_and_starts_anew(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        first = await service.connect("alice", conversation_timeout=TIMEOUT)
        first.time_offset(clock.now)
        await speak(first, clock)
        await first.close()

        clock.advance(TIMEOUT + 1)
        events = Events()
        second = await service.connect("alice", conversation_timeout=TIMEOUT, events=events)
        assert second.conversation_id != first.conversation_id
        assert second.existing_segments == []
        await service.wait_for_processing()

        started, created = events.of_type("memory_processing_started"), events.of_type("memory_created")
        assert [e["memory"]["id"] for e in started] == [first.conversation_id]
        assert [e["memory"]["id"] for e in created] == [first.conversation_id]
        assert events.received.index(started[0]) < events.received.index(created[0])
        memory = created[0]["memory"]
        assert memory["status"] == COMPLETED and not memory["discarded"] and created[0]["messages"] == []
        assert memory["structured"]["title"] and memory["structured"]["title"].lower() in SPEECH
        assert memory["transcript_segments"][0]["text"] == SPEECH
        await second.close()
        assert await service.last_memory_id("alice") == first.conversation_id
        assert await service.last_memory_id("bob") is None


@pytest.mark.timeout(30)
async def test_a_connected_but_silent_session_rolls_over_to_a_new_conversation(store, tmp_path):
    clock = Clock()
    rolled: list[int] = []
    events = Events()
    async with service_on(store, tmp_path, clock) as service:
        live = await service.connect("alice", conversation_timeout=TIMEOUT, events=events,
                                     on_new_conversation=lambda handle: rolled.append(handle.generation))
        live.time_offset(clock.now)
        first_id = live.conversation_id
        await speak(live, clock)
        clock.advance(60)
        await service.check_once()
        await speak(live, clock, "still talking here about the launch", sid="s2", start=60)
        clock.advance(TIMEOUT - 1)                     # silence is counted from the last segment
        await service.check_once()
        assert (live.conversation_id, rolled) == (first_id, [])

        clock.advance(2)
        await service.check_once()
        assert live.conversation_id != first_id and live.generation == 1 and rolled == [1]
        await service.wait_for_processing()
        assert [e["memory"]["id"] for e in events.of_type("memory_created")] == [first_id]

        # The session keeps talking: that goes to the new conversation, from time 0.
        session_time = 400.0
        offset = live.time_offset(clock.now - session_time, session_time)
        await speak(live, clock, "a brand new topic", sid="s3", start=session_time + offset)
        await live.close()
        new = await service.get_conversation("alice", live.conversation_id)
        assert [(s["id"], s["start"]) for s in new["transcript_segments"]] == [("s3", 0.0)]
        old = await service.get_conversation("alice", first_id)
        assert old["status"] == COMPLETED and [s["id"] for s in old["transcript_segments"]] == ["s1", "s2"]


@pytest.mark.timeout(30)
async def test_a_restart_processes_silent_leftovers_and_resumes_recent_ones(store, tmp_path):
    clock = Clock()
    # The first server process: two users talking, then it dies (no close, no stop).
    crashed = ConversationService(Settings(data_dir=tmp_path), store, clock=clock, node_id="crashed")
    alice = await crashed.connect("alice", conversation_timeout=TIMEOUT)
    alice.time_offset(clock.now)
    await speak(alice, clock)
    clock.advance(100)
    bob = await crashed.connect("bob", conversation_timeout=TIMEOUT)
    bob.time_offset(clock.now)
    await speak(bob, clock)
    clock.advance(50)          # alice silent 150 s (> timeout), bob 50 s; their leases have lapsed

    async with service_on(store, tmp_path, clock, node_id="restarted") as service:   # start() sweeps
        await service.wait_for_processing()
        processed = await service.get_conversation("alice", alice.conversation_id)
        assert processed["status"] == COMPLETED and processed["structured"]["overview"]
        assert (await service.get_conversation("bob", bob.conversation_id))["status"] == IN_PROGRESS

        resumed = await service.connect("bob", conversation_timeout=TIMEOUT)
        assert resumed.conversation_id == bob.conversation_id
        assert [s["id"] for s in resumed.existing_segments] == ["s1"]
        await resumed.close()


@pytest.mark.timeout(30)
async def test_processing_abandoned_by_a_dead_node_is_taken_over(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock, start=False) as service:
        live = await service.connect("alice", conversation_timeout=TIMEOUT)
        live.time_offset(clock.now)
        await speak(live, clock)
        await live.close()
    assert await store.claim_for_processing(live.conversation_id, node="died", now=clock.now, lease=600)
    clock.advance(601)
    async with service_on(store, tmp_path, clock) as service:
        await service.wait_for_processing()
        assert (await service.get_conversation("alice", live.conversation_id))["status"] == COMPLETED


@pytest.mark.timeout(30)
async def test_a_conversation_without_words_is_deleted_not_processed(store, tmp_path):
    clock = Clock()
    events = Events()
    async with service_on(store, tmp_path, clock) as service:
        empty = await service.connect("alice", conversation_timeout=TIMEOUT)
        await empty.save_batch([segment("s1", "", 0.0, 1.0)])   # a segment, but no words
        await empty.close()
        clock.advance(TIMEOUT + 1)
        nxt = await service.connect("alice", conversation_timeout=TIMEOUT, events=events)
        await service.wait_for_processing()
        assert await service.get_conversation("alice", empty.conversation_id) is None
        assert events.received == []                  # nothing to announce
        await nxt.close()

        clock.advance(TIMEOUT + 1)                    # and the sweep does the same for nobody
        await service.check_once()
        await service.wait_for_processing()
        assert await service.get_conversation("alice", nxt.conversation_id) is None
        assert await service.list_conversations("alice") == []


@pytest.mark.timeout(30)
async def test_a_very_short_conversation_is_processed_as_discarded(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        live = await service.connect("alice", conversation_timeout=TIMEOUT)
        live.time_offset(clock.now)
        await speak(live, clock, "hi there", length=1.0)
        await live.close()
        memory = await service.process(live.conversation_id)
        assert memory["status"] == COMPLETED and memory["discarded"] is True
        assert await service.last_memory_id("alice") is None       # discarded ones are not "last memory"


@pytest.mark.timeout(30)
async def test_two_nodes_processing_one_conversation_make_one_memory(store, tmp_path):
    clock = Clock()
    await store.set_webhook("alice", WebhookSetting("memory_created", "https://example.com/memories"), now=clock.now)
    async with service_on(store, tmp_path, clock, start=False, node_id="a") as node_a, \
            service_on(store, tmp_path, clock, start=False, node_id="b") as node_b:
        live = await node_a.connect("alice", conversation_timeout=TIMEOUT)
        live.time_offset(clock.now)
        await speak(live, clock)
        await live.close()
        results = await asyncio.gather(node_a.process(live.conversation_id), node_b.process(live.conversation_id))
        again = await node_b.process(live.conversation_id)
    assert sum(r is not None for r in results) == 1 and again is None
    assert await store.outbox_counts() == {"pending": 1}


@pytest.mark.timeout(30)
async def test_usage_is_recorded_when_the_session_closes(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        live = await service.connect("alice", conversation_timeout=TIMEOUT)
        await live.close(usage={"audio_seconds": 42.5, "speech_seconds": 30.0, "words": 77, "provider": "local"})
    totals = await store.usage_totals("alice")
    assert (totals.audio_seconds, totals.speech_seconds, totals.words) == (42.5, 30.0, 77)


@pytest.mark.timeout(30)
async def test_sessions_connecting_together_open_their_conversations_in_few_transactions(
        store, tmp_path, monkeypatch):
    """A node's clients coming back at once (a restart, a failover): their openings share
    transactions instead of queueing one each for the writer, and each gets its own conversation."""
    groups = record_group_sizes(monkeypatch, store, "open_conversations")
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        lives = await asyncio.gather(*(service.connect(f"user{i}", conversation_timeout=TIMEOUT) for i in range(20)))
        for live in lives:
            live.time_offset(clock.now)
            await speak(live, clock, f"words of {live.uid}")
            await live.close()
    assert sum(groups) == 20 and len(groups) < 10, groups
    assert len({live.conversation_id for live in lives}) == 20
    for live in lives:
        assert [s["text"] for s in await store.load_segments(live.conversation_id)] == [f"words of {live.uid}"]


@pytest.mark.timeout(30)
async def test_sessions_closing_together_release_their_leases_and_record_usage_in_few_transactions(
        store, tmp_path, monkeypatch):
    """A drain closes every session at once: their ends share transactions, and none is lost."""
    groups = record_group_sizes(monkeypatch, store, "end_sessions")
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        lives = await connect_users(service, clock, 20)
        for live in lives:
            await speak(live, clock)
        await asyncio.gather(*(live.close(usage={"audio_seconds": 10.0 + i, "words": i})
                               for i, live in enumerate(lives)))
        # released leases: silent past the timeout, every conversation is due for processing
        due = await store.sweep_candidates(now=clock.now + TIMEOUT + 1)
    assert sorted(due) == sorted(live.conversation_id for live in lives)
    for i in range(20):
        totals = await store.usage_totals(f"user{i}")
        assert (totals.audio_seconds, totals.words) == (10.0 + i, i)
    assert sum(groups) == 20 and len(groups) <= 3, groups


@pytest.mark.timeout(30)
async def test_a_sweep_of_many_conversations_claims_and_completes_them_in_few_transactions(
        store, tmp_path, monkeypatch):
    """Many conversations due at once (a crowd of sessions that ended together): their claims and
    completions share transactions, and every one is processed with its memory webhook queued."""
    groups = {"claims": record_group_sizes(monkeypatch, store, "claim_for_processing_many"),
              "completions": record_group_sizes(monkeypatch, store, "finish_processing_many")}
    clock = Clock()
    async with service_on(store, tmp_path, clock, start=False) as service:     # no deliveries
        lives = await connect_users(service, clock, 20)
        for i, live in enumerate(lives):
            await store.set_webhook(f"user{i}", WebhookSetting("memory_created", "https://example.com/m"),
                                    now=clock.now)
            await speak(live, clock)
        await asyncio.gather(*(live.close() for live in lives))
        clock.advance(TIMEOUT + 1)
        assert len(await service.sweep()) == 20
        await service.wait_for_processing()
        for i, live in enumerate(lives):
            processed = await service.get_conversation(f"user{i}", live.conversation_id)
            assert processed["status"] == COMPLETED and processed["structured"]["overview"]
    assert await store.outbox_counts() == {"pending": 20}
    assert sum(groups["claims"]) == 20 and len(groups["claims"]) <= 3, groups
    assert sum(groups["completions"]) == 20 and len(groups["completions"]) <= 3, groups


@pytest.mark.timeout(30)
async def test_a_graceful_stop_hands_unfinished_processing_back(store, tmp_path):
    clock = Clock()
    model = await FakeChatServer([HANG]).start()            # a summary that never comes
    try:
        stuck = ConversationProcessor(ChatSummariser(model.api_base, "slow", timeout=60))
        service = ConversationService(Settings(data_dir=tmp_path), store, clock=clock, check_interval=3600,
                                      processor=stuck, node_id="stopping")
        await service.start()
        live = await service.connect("alice", conversation_timeout=TIMEOUT)
        live.time_offset(clock.now)
        await speak(live, clock)
        await live.close()
        clock.advance(TIMEOUT + 1)
        await service.check_once()                           # processing starts, and hangs
        async with asyncio.timeout(10):
            while not model.requests:
                await asyncio.sleep(0.01)
        await service.stop(processing_grace=0.1)
    finally:
        await model.stop()
    assert (await store.get_conversation(live.conversation_id)).status == IN_PROGRESS
    async with service_on(store, tmp_path, clock) as successor:     # its startup sweep finishes it
        await successor.wait_for_processing()
        assert (await successor.get_conversation("alice", live.conversation_id))["status"] == COMPLETED


def record_group_sizes(monkeypatch, store, method: str) -> list[int]:
    """A list that gets the size of every group the store's ``method`` (a group-commit writer)
    is called with from now on; patch before the service is made (its committers bind it)."""
    sizes: list[int] = []
    write = getattr(store, method)

    async def counted(requests):
        sizes.append(len(requests))
        return await write(requests)

    monkeypatch.setattr(store, method, counted)
    return sizes


async def connect_users(service, clock, count: int) -> list:
    """``count`` users (user0, user1, …) connected, each conversation's clock anchored now."""
    lives = [await service.connect(f"user{i}", conversation_timeout=TIMEOUT) for i in range(count)]
    for live in lives:
        live.time_offset(clock.now)
    return lives


@pytest.mark.timeout(30)
async def test_concurrent_sessions_share_transactions_and_each_batch_is_stored(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        lives = await connect_users(service, clock, 20)
        before = store.batch_transactions
        for round_no in range(3):
            await asyncio.gather(*(live.save_batch([segment(f"s{round_no}", f"round {round_no} of {i}", round_no,
                                                            round_no + 1)])
                                   for i, live in enumerate(lives)))
        transactions = store.batch_transactions - before
        for live in lives:
            await live.close()
    assert transactions < 3 * len(lives) / 4, f"{transactions} transactions for {3 * len(lives)} batches"
    for i, live in enumerate(lives):
        stored = await store.load_segments(live.conversation_id)
        assert [s["text"] for s in stored] == [f"round {n} of {i}" for n in range(3)]


@pytest.mark.timeout(30)
async def test_a_batch_that_cannot_be_stored_fails_only_its_own_session(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        lives = await connect_users(service, clock, 4)
        broken = segment("s1", "a start that is no number", 0, 1) | {"start": "soon"}
        results = await asyncio.gather(*(live.save_batch([broken if i == 2 else segment("s1", f"fine {i}", 0, 1)])
                                         for i, live in enumerate(lives)), return_exceptions=True)
        assert isinstance(results[2], ValueError)
        assert [r for i, r in enumerate(results) if i != 2] == [None] * 3
        await speak(lives[2], clock, "and the next batch is stored")   # the session carries on
        for live in lives:
            await live.close()
    for i, live in enumerate(lives):
        expected = ["and the next batch is stored"] if i == 2 else [f"fine {i}"]
        assert [s["text"] for s in await store.load_segments(live.conversation_id)] == expected


@pytest.mark.timeout(30)
async def test_a_save_cancelled_mid_transaction_is_not_stored_and_its_group_is(store, tmp_path):
    """A session ended mid-save (its task cancelled) must not have stored a batch its client was
    never sent; the other sessions' batches of the same transaction are stored all the same.

    On SQLite a transaction runs on the loop's thread without suspending, so no cancel can land
    inside one, except in a transaction that waited for another process's write lock: those run
    in the threaded engine. The test holds the lock as that process would, until the group waits."""
    clock = Clock()
    loop = asyncio.get_running_loop()
    async with service_on(store, tmp_path, clock) as service:
        lives = [await service.connect(f"user{i}", conversation_timeout=TIMEOUT) for i in range(4)]
        for live in lives:
            live.time_offset(clock.now)
        other_process = None
        if store.dialect == "sqlite":
            other_process = sqlite3.connect(store.url.database, isolation_level=None)
            other_process.execute("BEGIN IMMEDIATE")
        before = store.batch_transactions
        saves = [asyncio.create_task(live.save_batch([segment("s1", f"words of {i}", 0, 1)]))
                 for i, live in enumerate(lives)]
        if other_process is not None:
            await asyncio.sleep(0.1)             # the group's BEGIN now waits in SQLite's busy handler
            other_process.execute("COMMIT")
            other_process.close()
        deadline = loop.time() + 5
        while store.batch_transactions == before and loop.time() < deadline:   # until it has begun
            await asyncio.sleep(0)
        assert store.batch_transactions == before + 1
        saves[1].cancel()
        results = await asyncio.gather(*saves, return_exceptions=True)
        assert isinstance(results[1], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 1] == [None] * 3
        assert store.batch_transactions == before + 2          # rolled back, then the others again
        for live in lives:
            await live.close()
    for i, live in enumerate(lives):
        expected = [] if i == 1 else [f"words of {i}"]
        assert [s["text"] for s in await store.load_segments(live.conversation_id)] == expected


@pytest.mark.timeout(60)
async def test_a_connect_on_a_quiet_node_does_not_wait_for_the_gather_pause_and_a_ramp_still_shares(
        store, tmp_path, monkeypatch):
    """Connects one after another on a quiet node each start their transaction at once (the
    gather pause, made 1 s here so that it cannot hide in the noise, was most of a connect →
    ready: up to 30 ms of ~18); a ramp faster than the pause still shares transactions once the
    burst credit is spent."""
    from harken.conversations import group_commit

    monkeypatch.setattr(group_commit, "GATHER_SECONDS", 1.0)
    sizes = record_group_sizes(monkeypatch, store, "open_conversations")
    loop = asyncio.get_running_loop()
    clock = Clock()
    async with service_on(store, tmp_path, clock) as service:
        waits = []
        for i in range(4):
            began = loop.time()
            await service.connect(f"quiet{i}", conversation_timeout=TIMEOUT)
            waits.append(loop.time() - began)
        assert max(waits) < 0.5, waits                  # before: 1 s for each after the first
        opened_alone = len(sizes)

        async def one(i: int) -> None:
            await asyncio.sleep(i * 0.005)
            await service.connect(f"ramp{i}", conversation_timeout=TIMEOUT)

        await asyncio.gather(*(one(i) for i in range(60)))   # 60 connects over 0.3 s
    ramp = sizes[opened_alone:]
    assert sum(ramp) == 60
    assert len(ramp) <= 20, ramp                          # not one transaction per connect
