"""The durable queue of offline-recording uploads (``/v1/sync-local-files``) and the one
transaction that turns a file's segments into conversations.

Guarantees, on SQLite and PostgreSQL alike:

- **Claimed like the outbox.** The files are in the data folder of the node that received them,
  so a job is taken only by a node of that folder (``origin``: nodes sharing one folder, as
  ``--workers`` do, share it). A worker takes the oldest queued job (or one whose claim
  expired: its node died) with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (SQLite's writers are
  serial), and renews the claim while it works. Two nodes never process one job; a node killed
  mid-job leaves a claim that expires, and whichever node looks next (the restarted one
  included) resumes the job at its first unfinished file.
- **A file is transcribed into conversations exactly once.** Its segments, the conversations
  they join or create, and the file's ``done`` are one transaction, guarded by the claim: a
  crash before the commit leaves nothing, a crash after it leaves the file done. The segment
  ids derive from the user and the file's SHA-256, and ids already stored are skipped, as a
  second safety net.
- **The same file twice** (the app retries an upload) is recognised by its SHA-256 at upload
  and marked ``duplicate``: not transcribed again.
- **Conversations by wall-clock time**: a file's segments are grouped where they are more than
  the conversation timeout apart; a group that starts inside a user's conversation, or within
  that conversation's timeout after it, joins it (times relative to its start), other groups
  make new conversations. A completed conversation that gains segments is reopened, so it is
  processed again (summary and ``memory_created``); an in-progress one (a live session may be
  writing it) is left to its lifecycle.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import orjson
import sqlalchemy as sa

from .model import COMPLETED, IN_PROGRESS, Conversation
from .schema import conversations, segments, sync_files, sync_jobs
from .store import Store
from .store_conversations import _conversation_row, _segment_row

QUEUED, PROCESSING, DONE, FAILED, DUPLICATE = "queued", "processing", "done", "failed", "duplicate"


class ClaimLost(Exception):
    """The job's claim expired and another worker took it: stop, write nothing more."""


@dataclass(frozen=True)
class UploadedFile:
    idx: int
    name: str
    path: str
    sha256: str
    size: int
    recorded_at: float
    estimated_seconds: float


@dataclass(frozen=True)
class PendingFile:
    idx: int
    name: str
    path: str
    sha256: str
    recorded_at: float


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    uid: str
    files: list[PendingFile]          # not yet done, in recording order


@dataclass
class FileCommit:
    """What one file's processing produced. Segment dicts are ``Segment.to_stored()`` with times
    in seconds of the file (0 = its first sample)."""

    segments: list[dict]
    stats: dict
    language: str = "en"
    source: str = "omi"
    timeout_s: float = 120.0


@dataclass
class CommitResult:
    new_ids: list[str] = field(default_factory=list)
    updated_ids: list[str] = field(default_factory=list)
    to_process: list[str] = field(default_factory=list)   # new or reopened: process them now


def group_by_gaps(stored: Sequence[dict], gap: float) -> list[list[dict]]:
    """Segments (sorted by start) split where one starts more than ``gap`` s after the previous ended."""
    groups: list[list[dict]] = []
    end = None
    for segment in sorted(stored, key=lambda s: (s["start"], s["end"])):
        if groups and segment["start"] - end <= gap:
            groups[-1].append(segment)
            end = max(end, segment["end"])
        else:
            groups.append([segment])
            end = segment["end"]
    return groups


def choose_conversation(candidates: Sequence[Any], start: float) -> Any | None:
    """The conversation a group starting at wall time ``start`` joins: the latest one that began
    at or before ``start`` and had not yet timed out then. Rows need ``started_at``,
    ``finished_at``, ``timeout_s``."""
    joinable = [c for c in candidates if c.started_at <= start <= c.finished_at + c.timeout_s]
    return max(joinable, key=lambda c: c.started_at, default=None)


class SyncJobs:
    """Queries of the sync tables, on the conversation store's engine and transactions."""

    def __init__(self, store: Store, origin: str = "local"):
        self.store = store
        # The data folder this process writes uploads to: it creates and claims only jobs of it.
        self.origin = origin

    # --- uploads ----------------------------------------------------------------------------------
    async def create(self, job_id: str, uid: str, files: Sequence[UploadedFile], *, now: float) -> list[str]:
        """Queue a job; each file's status, in order: ``queued``, or ``duplicate`` when the user
        uploaded the same bytes before (in this job or an earlier one that did not fail)."""
        f = sync_files
        async with self.store._write() as conn:
            await self.store._lock(conn, _SYNC_LOCKS, [uid])     # two uploads of one file at once
            hashes = sorted({file.sha256 for file in files})
            seen = set((await conn.execute(
                sa.select(f.c.sha256).where(f.c.uid == uid, f.c.sha256.in_(hashes), f.c.status != FAILED)
            )).scalars())
            statuses = []
            for file in files:
                statuses.append(DUPLICATE if file.sha256 in seen else QUEUED)
                seen.add(file.sha256)
            await conn.execute(sa.insert(sync_jobs).values(
                id=job_id, uid=uid, origin=self.origin, status=QUEUED if QUEUED in statuses else DONE, created_at=now,
                updated_at=now, attempts=0, result=None if QUEUED in statuses else _EMPTY_RESULT))
            if files:
                await conn.execute(sa.insert(f), [
                    {"job_id": job_id, "idx": file.idx, "uid": uid, "name": file.name[:255], "path": file.path,
                     "sha256": file.sha256, "size": file.size, "recorded_at": file.recorded_at,
                     "estimated_seconds": file.estimated_seconds, "status": status, "stats": None}
                    for file, status in zip(files, statuses)])
        return statuses

    # --- claiming ---------------------------------------------------------------------------------
    async def claim(self, *, node: str, now: float, lease: float) -> ClaimedJob | None:
        """Take the oldest queued job, or one whose claim expired; None when there is none."""
        j = sync_jobs
        due = (sa.select(j.c.id)
               .where(j.c.origin == self.origin,
                      sa.or_(j.c.status == QUEUED, sa.and_(j.c.status == PROCESSING, j.c.claim_expires < now)))
               .order_by(j.c.created_at, j.c.id).limit(1))
        # Idle workers look every few seconds: a read first, so that looking takes no write lock.
        async with self.store._read() as conn:
            if (await conn.execute(due)).first() is None:
                return None
        if self.store.dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        async with self.store._write() as conn:
            row = (await conn.execute(
                sa.update(j).where(j.c.id.in_(due.scalar_subquery()))
                .values(status=PROCESSING, claimed_by=node, claim_expires=now + lease, updated_at=now,
                        attempts=j.c.attempts + 1)
                .returning(j.c.id, j.c.uid))).first()
            if row is None:
                return None
            f = sync_files
            files = (await conn.execute(
                sa.select(f.c.idx, f.c.name, f.c.path, f.c.sha256, f.c.recorded_at)
                .where(f.c.job_id == row.id, f.c.status == QUEUED).order_by(f.c.recorded_at, f.c.idx))).all()
        return ClaimedJob(row.id, row.uid, [PendingFile(*file) for file in files])

    async def renew(self, job_id: str, *, node: str, until: float) -> None:
        """Extend the claim; ``ClaimLost`` if another worker holds the job now."""
        j = sync_jobs
        async with self.store._write() as conn:
            held = await conn.execute(sa.update(j).where(j.c.id == job_id, j.c.claimed_by == node,
                                                         j.c.status == PROCESSING).values(claim_expires=until))
        if held.rowcount != 1:
            raise ClaimLost(job_id)

    async def release(self, node: str) -> int:
        """Hand back the jobs ``node`` holds (a graceful stop): queued again at once."""
        j = sync_jobs
        async with self.store._write() as conn:
            result = await conn.execute(sa.update(j).where(j.c.claimed_by == node, j.c.status == PROCESSING)
                                        .values(status=QUEUED, claimed_by=None, claim_expires=None))
        return result.rowcount

    # --- results ----------------------------------------------------------------------------------
    async def commit_file(self, job_id: str, idx: int, *, node: str, uid: str, recorded_at: float,
                          commit: FileCommit, now: float) -> CommitResult:
        """Store one file's segments into conversations and mark it done, in one transaction
        (see the module docstring). ``ClaimLost`` (and nothing written) if the claim is gone."""
        result = CommitResult()
        async with self.store._write() as conn:
            await self._check_claim(conn, job_id, node)
            await self.store._lock(conn, _SYNC_LOCKS, [uid])
            fresh = await self._unstored(conn, commit.segments)
            for group in group_by_gaps(fresh, commit.timeout_s):
                await self._store_group(conn, uid, group, recorded_at, commit, now, result)
            await self._mark_file(conn, job_id, idx, DONE, {
                **commit.stats, "new_memories": result.new_ids, "updated_memories": result.updated_ids,
                "to_process": result.to_process})
        return result

    async def fail_file(self, job_id: str, idx: int, *, node: str, stats: dict) -> None:
        """A file that cannot be decoded at all: marked failed (its upload can be retried)."""
        async with self.store._write() as conn:
            await self._check_claim(conn, job_id, node)
            await self._mark_file(conn, job_id, idx, FAILED, stats)

    async def finish(self, job_id: str, *, node: str, result: dict, now: float) -> None:
        j = sync_jobs
        async with self.store._write() as conn:
            await self._check_claim(conn, job_id, node)
            await conn.execute(sa.update(j).where(j.c.id == job_id).values(
                status=DONE, result=orjson.dumps(result).decode(), updated_at=now, claimed_by=None,
                claim_expires=None))

    # --- status -----------------------------------------------------------------------------------
    async def get(self, job_id: str) -> dict | None:
        """The job and its files (uid included, for the caller's ownership check)."""
        j, f = sync_jobs, sync_files
        async with self.store._read() as conn:
            job = (await conn.execute(sa.select(j).where(j.c.id == job_id))).mappings().first()
            if job is None:
                return None
            files = (await conn.execute(sa.select(f).where(f.c.job_id == job_id).order_by(f.c.idx))).mappings().all()
        return {**dict(job), "files": [dict(file) for file in files]}

    async def backlog(self) -> tuple[int, int, float]:
        """(jobs not done, files waiting, estimated seconds of audio waiting)."""
        j, f = sync_jobs, sync_files
        async with self.store._read() as conn:
            jobs = (await conn.execute(sa.select(sa.func.count()).where(j.c.status.in_([QUEUED, PROCESSING])))).scalar()
            files, seconds = (await conn.execute(
                sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(f.c.estimated_seconds), 0.0))
                .where(f.c.status == QUEUED))).one()
        return int(jobs or 0), int(files or 0), float(seconds or 0.0)

    async def paths_to_keep(self) -> set[str]:
        """Paths of files still waiting (start-up cleanup keeps these, deletes leftovers)."""
        f = sync_files
        async with self.store._read() as conn:
            return set((await conn.execute(sa.select(f.c.path).where(f.c.status == QUEUED))).scalars())

    # --- internals --------------------------------------------------------------------------------
    async def _check_claim(self, conn, job_id: str, node: str) -> None:
        j = sync_jobs
        query = sa.select(j.c.claimed_by, j.c.status).where(j.c.id == job_id)
        if self.store.dialect == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        if row is None or row.claimed_by != node or row.status != PROCESSING:
            raise ClaimLost(job_id)

    async def _mark_file(self, conn, job_id: str, idx: int, status: str, stats: dict) -> None:
        f = sync_files
        await conn.execute(sa.update(f).where(f.c.job_id == job_id, f.c.idx == idx).values(
            status=status, stats=orjson.dumps(stats).decode()))

    async def _unstored(self, conn, stored: Sequence[dict]) -> list[dict]:
        """The segments whose ids are not stored yet (a file committed before is not redone)."""
        if not stored:
            return []
        ids = [str(s["id"]) for s in stored]
        existing = set((await conn.execute(
            sa.select(segments.c.segment_id).where(segments.c.segment_id.in_(ids)))).scalars())
        return [s for s in stored if str(s["id"]) not in existing]

    async def _store_group(self, conn, uid: str, group: list[dict], recorded_at: float, commit: FileCommit,
                           now: float, result: CommitResult) -> None:
        c = conversations
        start = recorded_at + group[0]["start"]
        end = recorded_at + max(s["end"] for s in group)
        query = sa.select(c.c.id, c.c.status, c.c.started_at, c.c.finished_at, c.c.timeout_s).where(
            c.c.uid == uid, c.c.status.in_([IN_PROGRESS, COMPLETED]),
            c.c.started_at <= start, c.c.finished_at + c.c.timeout_s >= start).order_by(c.c.id)
        if self.store.dialect == "postgresql":
            query = query.with_for_update()
        target = choose_conversation((await conn.execute(query)).all(), start)
        if target is None:
            conversation = Conversation(id=str(uuid.uuid4()), uid=uid, status=IN_PROGRESS, language=commit.language,
                                        source=commit.source, created_at=now, started_at=start, finished_at=end,
                                        timeout_s=commit.timeout_s)
            await conn.execute(sa.insert(c).values(**_conversation_row(conversation)))
            origin, cid = start, conversation.id
            result.new_ids.append(cid)
            result.to_process.append(cid)
        else:
            origin, cid = target.started_at, target.id
            values: dict[str, Any] = {"finished_at": max(target.finished_at, end)}
            if target.status == COMPLETED:
                values.update(status=IN_PROGRESS, claimed_by=None, claim_expires=None)
                result.to_process.append(cid)
            await conn.execute(sa.update(c).where(c.c.id == cid).values(**values))
            result.updated_ids.append(cid)
        shift = recorded_at - origin
        rows = [_segment_row(cid, {**s, "start": round(s["start"] + shift, 3), "end": round(s["end"] + shift, 3)})
                for s in group]
        await conn.execute(self.store._insert(segments).on_conflict_do_nothing(), rows)


_EMPTY_RESULT = orjson.dumps({"new_memories": [], "updated_memories": []}).decode()
# Advisory-lock namespace (PostgreSQL) serialising one user's sync writes: a file's conversation
# choice must not race another file's of the same user.
_SYNC_LOCKS = 0x73796E63      # "sync"
