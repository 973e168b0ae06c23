"""The sync job queue (``conversations.sync_jobs``) on real SQLite and PostgreSQL: claims that two
workers never share, resumption after a claim expires, a file committed exactly once, and
segments joining conversations by wall-clock time."""

from __future__ import annotations

import asyncio

import pytest

from harken.conversations.model import COMPLETED, IN_PROGRESS
from harken.conversations.sync_jobs import ClaimLost, FileCommit, SyncJobs, UploadedFile

from .test_store import conversation, segment, store  # noqa: F401  (the store fixture: both backends)

pytestmark = pytest.mark.timeout(60)


def uploaded(idx: int, sha: str, recorded_at: float = 10_000.0) -> UploadedFile:
    return UploadedFile(idx=idx, name=f"audio_omi_opus_16000_1_fs160_{int(recorded_at)}.bin", path=f"/x/{idx}.bin",
                        sha256=sha, size=100, recorded_at=recorded_at, estimated_seconds=30.0)


async def test_a_job_is_claimed_by_one_worker_only_and_resumed_after_its_claim_expires(store):
    jobs = SyncJobs(store)
    assert await jobs.create("job-1", "alice", [uploaded(0, "a" * 64), uploaded(1, "b" * 64)], now=100.0) == [
        "queued", "queued"]
    claims = await asyncio.gather(*(jobs.claim(node=f"node-{i}", now=101.0, lease=10.0) for i in range(4)))
    taken = [c for c in claims if c is not None]
    assert len(taken) == 1 and [f.idx for f in taken[0].files] == [0, 1]
    winner = claims.index(taken[0])
    assert await jobs.backlog() == (1, 2, 60.0)
    # Its node dies: nobody else may take it while the claim lasts, anyone may after.
    assert await jobs.claim(node="node-9", now=105.0, lease=10.0) is None
    resumed = await jobs.claim(node="node-9", now=112.0, lease=10.0)
    assert resumed is not None and resumed.id == "job-1"
    with pytest.raises(ClaimLost):                   # the dead node's late write is refused
        await jobs.commit_file("job-1", 0, node=f"node-{winner}", uid="alice", recorded_at=10_000.0,
                               commit=FileCommit(segments=[], stats={}), now=113.0)


async def test_a_committed_file_is_not_handed_out_again_and_its_segments_are_stored_once(store):
    jobs = SyncJobs(store)
    await jobs.create("job-2", "bob", [uploaded(0, "c" * 64), uploaded(1, "d" * 64, 20_000.0)], now=100.0)
    job = await jobs.claim(node="n1", now=101.0, lease=10.0)
    words = [segment("sync-c-1", "hello there", 1.0, 2.0), segment("sync-c-2", "and more", 3.0, 4.0)]
    result = await jobs.commit_file(job.id, 0, node="n1", uid="bob", recorded_at=10_000.0,
                                    commit=FileCommit(segments=words, stats={"segments": 2}), now=102.0)
    assert len(result.new_ids) == 1 and result.to_process == result.new_ids
    found = await store.get_with_segments(result.new_ids[0])
    assert found[0].started_at == 10_001.0 and [s["start"] for s in found[1]] == [0.0, 2.0]
    # The node dies before the job is done; the job resumes at the second file only.
    again = await jobs.claim(node="n2", now=200.0, lease=10.0)
    assert [f.idx for f in again.files] == [1]
    # Even if the same segments came again, nothing is stored twice.
    repeat = await jobs.commit_file(job.id, 1, node="n2", uid="bob", recorded_at=10_000.0,
                                    commit=FileCommit(segments=words, stats={}), now=201.0)
    assert repeat.new_ids == [] and repeat.updated_ids == []
    assert len((await store.get_with_segments(result.new_ids[0]))[1]) == 2


async def test_the_same_bytes_uploaded_again_are_marked_duplicate(store):
    jobs = SyncJobs(store)
    assert await jobs.create("j1", "carol", [uploaded(0, "e" * 64), uploaded(1, "e" * 64)], now=1.0) == [
        "queued", "duplicate"]
    assert await jobs.create("j2", "carol", [uploaded(0, "e" * 64)], now=2.0) == ["duplicate"]
    assert await jobs.create("j3", "dave", [uploaded(0, "e" * 64)], now=3.0) == ["queued"]   # another user's
    assert (await jobs.get("j2"))["status"] == "done"


async def test_segments_join_the_conversation_they_fall_in_and_reopen_a_completed_one(store):
    jobs = SyncJobs(store)
    live = conversation("erin", now=50_000.0, timeout=120.0)
    live.finished_at = 50_300.0
    done = conversation("erin", now=40_000.0, timeout=120.0)
    done.finished_at, done.status = 40_600.0, COMPLETED
    for c in (live, done):
        await store.create_conversation(c)
    await jobs.create("j", "erin", [uploaded(0, "f" * 64, 40_500.0)], now=1.0)
    job = await jobs.claim(node="n", now=2.0, lease=10.0)
    stored = [segment("sync-f-1", "inside the completed one", 10.0, 12.0),          # 40 510
              segment("sync-f-2", "inside the live one", 9_600.0, 9_603.0),          # 50 100
              segment("sync-f-3", "after both", 20_000.0, 20_002.0)]                 # 60 500
    result = await jobs.commit_file(job.id, 0, node="n", uid="erin", recorded_at=40_500.0,
                                    commit=FileCommit(segments=stored, stats={}), now=3.0)
    assert result.updated_ids == [done.id, live.id] and len(result.new_ids) == 1
    assert result.to_process == [done.id, *result.new_ids]           # the live one is left to its lifecycle
    reopened, segments = await store.get_with_segments(done.id)
    assert reopened.status == IN_PROGRESS and [s["start"] for s in segments] == [510.0]
    _, live_segments = await store.get_with_segments(live.id)
    assert [s["start"] for s in live_segments] == [100.0]


async def test_a_job_is_taken_only_by_nodes_that_share_the_data_folder_holding_its_files(store):
    here, elsewhere = SyncJobs(store, origin="folder-a"), SyncJobs(store, origin="folder-b")
    await here.create("job-a", "frank", [uploaded(0, "1" * 64)], now=1.0)
    assert await elsewhere.claim(node="b1", now=2.0, lease=10.0) is None
    assert (await here.claim(node="a1", now=2.0, lease=10.0)).id == "job-a"
