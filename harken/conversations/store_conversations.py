"""Conversations and their segments: opening and resuming them, batches, live leases, the
processing claims, listing and deleting (``ConversationRecords``, part of ``Store``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .model import (
    COMPLETED,
    IN_PROGRESS,
    PROCESSING,
    Conversation,
    WebhookSetting,
    readable_conversation,
    readable_segments,
    word_count,
)
from .schema import conversations, segments
from .store_base import _USER_LOCKS, StoreBase, _dialect_insert, _json
from .store_rows import (
    BatchRequest,
    LeaseLost,
    OpenRequest,
    OpenResult,
    OutboxMessage,
    ProcessingClaim,
    ProcessingDone,
    SessionEnd,
)
from .store_users import _INSERT_USAGE, _VOCABULARIES_OF_USERS, _WEBHOOKS_OF_USERS, _webhook_setting, stored_terms


class ConversationRecords(StoreBase):
    async def open_conversation(self, new: Conversation, *, now: float, live_until: float,
                                holder: str | None = None) -> OpenResult:
        """Resume the user's in-progress conversation of ``new.source`` if its silence is under ``new.timeout_s``,
        else insert ``new``. In-progress ones that timed out (and are not live elsewhere) are
        returned as ``stale_ids`` for processing.

        ``holder`` takes the live lease even if another connection still holds it: the newest
        connection wins (the older one may be on a node that died, or about to notice its client
        left), and the older one's writes are refused from now on (``LeaseLost``)."""
        return (await self.open_conversations([OpenRequest(new, now, live_until, holder)]))[0]

    async def open_conversations(self, requests: Sequence[OpenRequest]) -> list[OpenResult]:
        """``open_conversation`` for many connecting sessions in ONE transaction with a fixed number
        of statements (group commit). A connection ramp (a node's clients coming back after a
        restart or a failover) opened one write transaction per session, and they queued for the
        writer lock ahead of the running sessions' batches: at 300 streams connecting over 6 s,
        an open waited up to 3.5 s and so did every batch behind it. At most one request per user
        (``ValueError`` otherwise): a user's decisions are serial."""
        by_uid = {request.new.uid: request for request in requests}
        if len(by_uid) != len(requests):
            raise ValueError("open_conversations: at most one request per user")
        if not requests:
            return []
        async with self._write() as conn:
            await self._lock(conn, _USER_LOCKS, by_uid)
            rows = (await conn.execute(_IN_PROGRESS_OF_USERS, {"uids": list(by_uid)})).mappings().all()
            resume: dict[str, Any] = {}
            stale: dict[str, list[str]] = {uid: [] for uid in by_uid}
            for row in rows:        # per user, newest first
                request = by_uid[row["uid"]]
                # One live conversation per source (a pendant and the phone at once never take
                # each other's over): another source's conversation is stale only once silent.
                same_source = row["source"] == request.new.source
                silence = request.now - row["finished_at"]
                if same_source and row["uid"] not in resume and silence < request.new.timeout_s:
                    resume[row["uid"]] = row
                elif ((row["live_until"] is None or row["live_until"] < request.now)
                      and (same_source or silence >= row["timeout_s"])):
                    stale[row["uid"]].append(row["id"])
            if resume:
                await conn.execute(
                    _RESUME,
                    [{"o_id": row["id"], "o_timeout": by_uid[uid].new.timeout_s, "o_until": by_uid[uid].live_until,
                      "o_holder": by_uid[uid].holder} for uid, row in resume.items()])
            fresh = [request for request in requests if request.new.uid not in resume]
            if fresh:
                await conn.execute(_INSERT_CONVERSATION, [{**_conversation_row(r.new), "live_until": r.live_until,
                                                   "live_by": r.holder} for r in fresh])
            segments_of = await self._segments_of(conn, [row["id"] for row in resume.values()])
            settings: dict[str, dict[str, WebhookSetting]] = {uid: {} for uid in by_uid}
            for row in (await conn.execute(_WEBHOOKS_OF_USERS, {"uids": list(by_uid)})).mappings():
                settings[row["uid"]][row["kind"]] = _webhook_setting(row)
            last_memories = dict((await conn.execute(_LAST_COMPLETED, {"uids": list(by_uid)})).all())
            # The vocabulary here too: read on its own, each connect paid a read transaction in
            # the threaded engine (~10 trips between the loop and a driver thread, and a new
            # connection and thread when a burst outran the pool); on a busy machine every trip
            # waits for the scheduler, and connect → ready took 0.3-1 s instead of 40 ms.
            vocabularies = dict((await conn.execute(_VOCABULARIES_OF_USERS, {"uids": list(by_uid)})).all())
            with_voices = [uid for uid, request in by_uid.items() if request.voices]
            voices = await self._voices_of(conn, with_voices) if with_voices else {}
        results = []
        for request in requests:
            uid = request.new.uid
            row = resume.get(uid)
            conversation, found = request.new, []
            if row is not None:
                conversation = _conversation(row)
                conversation.timeout_s = request.new.timeout_s
                found = segments_of[conversation.id]
            results.append(OpenResult(conversation, row is not None, found, stale[uid], settings[uid],
                                      last_memories.get(uid), voices.get(uid),
                                      tuple(stored_terms(vocabularies.get(uid)))))
        return results

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(conversations).where(conversations.c.id == conversation_id))
                   ).mappings().first()
        return _conversation(row) if row else None

    async def get_with_segments(self, conversation_id: str) -> tuple[Conversation, list[dict]] | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(conversations).where(conversations.c.id == conversation_id))
                   ).mappings().first()
            if row is None:
                return None
            return _conversation(row), await self._segments(conn, conversation_id)

    async def load_segments(self, conversation_id: str) -> list[dict]:
        async with self._read() as conn:
            return await self._segments(conn, conversation_id)

    async def _segments(self, conn: AsyncConnection, conversation_id: str) -> list[dict]:
        return (await self._segments_of(conn, [conversation_id]))[conversation_id]

    async def _segments_of(self, conn: AsyncConnection, conversation_ids: Sequence[str]) -> dict[str, list[dict]]:
        """Each conversation's segments in time order, with one query."""
        by_id: dict[str, list[dict]] = {cid: [] for cid in conversation_ids}
        if by_id:
            rows = await conn.execute(_SEGMENTS_OF, {"ids": list(by_id)})
            for conversation_id, data in rows:
                by_id[conversation_id].append(orjson.loads(data))
        return {cid: readable_segments(items) for cid, items in by_id.items()}

    async def list_conversations(self, uid: str, *, limit: int, offset: int = 0,
                                 include_discarded: bool = True) -> list[tuple[Conversation, list[dict]]]:
        """The user's conversations, newest first, with their segments."""
        c = conversations
        query = sa.select(c).where(c.c.uid == uid)
        if not include_discarded:
            query = query.where(c.c.discarded == sa.false())
        query = query.order_by(c.c.created_at.desc(), c.c.id.desc()).limit(limit).offset(offset)
        async with self._read() as conn:
            rows = [_conversation(r) for r in (await conn.execute(query)).mappings()]
            by_id = await self._segments_of(conn, [r.id for r in rows])
        return [(r, by_id[r.id]) for r in rows]

    async def last_completed_id(self, uid: str) -> str | None:
        async with self._read() as conn:
            return dict((await conn.execute(_LAST_COMPLETED, {"uids": [uid]})).all()).get(uid)

    async def save_batch(
        self,
        conversation: Conversation,
        changed: Sequence[dict],
        deleted_ids: Sequence[str],
        *,
        now: float,
        live_until: float,
        realtime: OutboxMessage | None,
        holder: str | None = None,
    ) -> bool:
        """Write one segment batch, and its realtime webhook row, in one transaction: the
        one-request case of ``save_batches`` (see there). Returns False if the conversation is no
        longer in progress; raises ``LeaseLost`` if another connection holds its lease."""
        request = BatchRequest(conversation, changed, deleted_ids, now=now, live_until=live_until,
                               realtime=realtime, holder=holder)
        (outcome,) = await self.save_batches([request])
        if isinstance(outcome, LeaseLost):
            raise outcome
        return outcome

    async def save_batches(self, requests: Sequence["BatchRequest"]) -> list["bool | LeaseLost"]:
        """Write many conversations' segment batches, and their realtime webhook rows, in ONE
        transaction with a fixed number of statements however many there are (group commit:
        a node's sessions share one commit per round instead of queueing for the writer lock one
        after another). At most one request per conversation (``ValueError`` otherwise).

        Each request's outcome, in order, is what ``save_batch`` would have given it alone:
        - True: written. ``conversation`` is the live handle's view: its ``started_at`` is
          written (the start is anchored at the first word), and the row is created if missing
          (its creation failed earlier);
        - False, nothing of it written: the conversation is no longer in progress (another node
          processed it); the caller starts a new one and saves again;
        - a ``LeaseLost``, nothing of it written: the request names a ``holder`` and another
          connection holds the lease.
        An unexpected error rolls back the whole group."""
        by_id = {request.conversation.id: request for request in requests}
        if len(by_id) != len(requests):
            raise ValueError("save_batches: at most one request per conversation")
        if not requests:
            return []
        segment_rows = {cid: [_segment_row(cid, seg) for seg in request.changed] for cid, request in by_id.items()}
        statements = _BATCH_STATEMENTS[self.dialect]
        async with self._write() as conn:
            self.batch_transactions += 1
            found = {row.id: row for row in await conn.execute(statements.found, {"ids": list(by_id)})}
            outcomes: list[bool | LeaseLost] = []
            updates: list[dict] = []
            inserts: list[dict] = []
            for request in requests:
                cid, row = request.conversation.id, found.get(request.conversation.id)
                finished_at = request.now if request.changed else None
                if row is None:
                    new = _conversation_row(request.conversation)
                    new.update(live_until=request.live_until, live_by=request.holder)
                    if finished_at is not None:
                        new["finished_at"] = finished_at
                    inserts.append(new)
                elif row.status != IN_PROGRESS:
                    outcomes.append(False)
                    continue
                elif request.holder is not None and row.live_by != request.holder:
                    outcomes.append(LeaseLost(cid))
                    continue
                else:
                    updates.append({"row_id": cid, "new_live_until": request.live_until,
                                    "new_started_at": request.conversation.started_at,
                                    "new_finished_at": finished_at})
                outcomes.append(True)
            written = [request for request, outcome in zip(requests, outcomes) if outcome is True]
            if updates:
                await conn.execute(statements.update, updates)
            if inserts:
                await conn.execute(_INSERT_CONVERSATION, inserts)
            upserts = [seg for request in written for seg in _unique_by_id(segment_rows[request.conversation.id])]
            if upserts:
                await conn.execute(statements.upsert, upserts)
            deletes = [{"cid": request.conversation.id, "sid": str(sid)}
                       for request in written for sid in request.deleted_ids]
            if deletes:
                await conn.execute(statements.delete, deletes)
            with_rows = [request for request in written if request.realtime is not None]
            if with_rows:
                await self._lock_keys(conn, [request.realtime.ordering_key for request in with_rows])
                rows = await self._enqueue(conn, [(request.realtime, request.now) for request in with_rows])
                # Only users with a realtime webhook get a row; the deliverer is woken for those.
                for request in with_rows:
                    request.enqueued = rows != 0
        return outcomes

    async def renew_live(self, leases: Iterable[tuple[str, str | None]], live_until: float) -> list[tuple[str, str]]:
        """Extend the leases given as (conversation id, holder). Returns the (id, holder) pairs
        whose lease a newer connection took (left alone); a holder of None renews
        unconditionally. One id may come with several holders: two handles of one node on one
        conversation, the older not told yet that the newer took it over."""
        c = conversations
        holders: dict[str, set[str | None]] = {}
        for conversation_id, holder in leases:
            holders.setdefault(conversation_id, set()).add(holder)
        if not holders:
            return []
        query = sa.select(c.c.id, c.c.live_by, c.c.status).where(c.c.id.in_(list(holders))).order_by(c.c.id)
        if self.dialect == "postgresql":      # dialect: rows locked in id order, as save_batches does
            query = query.with_for_update()
        async with self._write() as conn:
            rows = (await conn.execute(query)).all()
            renewed = [cid for cid, live_by, _ in rows if None in holders[cid] or live_by in holders[cid]]
            if renewed:
                await conn.execute(sa.update(c).where(c.c.id.in_(renewed)).values(live_until=live_until))
        return [(cid, holder) for cid, live_by, status in rows if status == IN_PROGRESS
                for holder in holders[cid] if holder is not None and holder != live_by]

    async def release_live(self, conversation_id: str, *, holder: str | None = None) -> None:
        """End a live lease (the session closed); a lease another connection took is kept."""
        await self.end_sessions([SessionEnd(conversation_id, uid="", now=0.0, holder=holder)])

    async def end_sessions(self, ends: Sequence[SessionEnd]) -> list[None]:
        """Closing sessions, in one transaction: live leases released (a lease another connection
        took is kept), usage rows recorded."""
        releases = sorted((e for e in ends if e.release), key=lambda e: e.conversation_id)  # rows locked in id order
        used = [e for e in ends if e.usage is not None]
        async with self._write() as conn:
            for holder_checked, release in ((True, _RELEASE_HELD), (False, _RELEASE)):
                params = [{"e_id": e.conversation_id, "e_holder": e.holder}
                          for e in releases if (e.holder is not None) == holder_checked]
                if params:
                    await conn.execute(release, params)
            if used:
                await conn.execute(_INSERT_USAGE, [
                    {"uid": e.uid, "session_id": e.session_id, "conversation_id": e.conversation_id,
                     "recorded_at": e.now, "audio_seconds": e.usage.audio_seconds,
                     "speech_seconds": e.usage.speech_seconds, "words": e.usage.words, "provider": e.usage.provider}
                    for e in used])
        return [None] * len(ends)

    async def create_conversation(self, conversation: Conversation, *, live_until: float | None = None,
                                  holder: str | None = None) -> None:
        async with self._write() as conn:
            await conn.execute(sa.insert(conversations).values(**_conversation_row(conversation),
                                                               live_until=live_until, live_by=holder))

    async def sweep_candidates(self, *, now: float, exclude: Iterable[str] = (), limit: int = 100) -> list[str]:
        """In-progress conversations silent past their timeout and live nowhere, and processing
        ones whose claim expired (their node died mid-way)."""
        c = conversations
        timed_out = sa.and_(c.c.status == IN_PROGRESS, c.c.finished_at + c.c.timeout_s <= now,
                            sa.or_(c.c.live_until.is_(None), c.c.live_until < now))
        abandoned = sa.and_(c.c.status == PROCESSING, c.c.claim_expires < now)
        query = sa.select(c.c.id).where(sa.or_(timed_out, abandoned)).order_by(c.c.finished_at).limit(limit)
        excluded = set(exclude)
        async with self._read() as conn:
            return [cid for (cid,) in await conn.execute(query) if cid not in excluded]

    async def claim_for_processing(self, conversation_id: str, *, node: str, now: float,
                                   lease: float) -> tuple[Conversation, list[dict]] | None:
        """Atomically take a conversation for processing; None if someone else has it or it is done."""
        return (await self.claim_for_processing_many([ProcessingClaim(conversation_id, node, now, lease)]))[0]

    async def claim_for_processing_many(
            self, claims: Sequence[ProcessingClaim]) -> list[tuple[Conversation, list[dict]] | None]:
        """Take many conversations for processing in ONE transaction with a fixed number of
        statements (group commit: a sweep's conversations are claimed together, not one
        transaction each). Each outcome, in order, is what ``claim_for_processing`` gives: the
        conversation and its segments, or None when it is done or another claim is still valid.
        At most one claim per conversation (``ValueError`` otherwise)."""
        c = conversations
        by_id = {claim.conversation_id: claim for claim in claims}
        if len(by_id) != len(claims):
            raise ValueError("claim_for_processing_many: at most one claim per conversation")
        if not claims:
            return []
        query = sa.select(c).where(c.c.id.in_(list(by_id))).order_by(c.c.id)
        if self.dialect == "postgresql":      # lock the rows, in id order (no deadlock cycles)
            query = query.with_for_update()
        async with self._write() as conn:
            found = {row["id"]: row for row in (await conn.execute(query)).mappings()}
            taken = [claim for claim in claims
                     if (row := found.get(claim.conversation_id)) is not None and (
                         row["status"] == IN_PROGRESS
                         or (row["status"] == PROCESSING and row["claim_expires"] is not None
                             and row["claim_expires"] < claim.now))]
            if not taken:
                return [None] * len(claims)
            await conn.execute(
                sa.update(c).where(c.c.id == sa.bindparam("k_id")).values(
                    status=PROCESSING, claimed_by=sa.bindparam("k_node"), claim_expires=sa.bindparam("k_expires")),
                [{"k_id": k.conversation_id, "k_node": k.node, "k_expires": k.now + k.lease} for k in taken])
            segments_of = await self._segments_of(conn, [k.conversation_id for k in taken])
        claimed = {}
        for k in taken:
            conversation = _conversation(found[k.conversation_id])
            conversation.status = PROCESSING
            claimed[k.conversation_id] = (conversation, segments_of[k.conversation_id])
        return [claimed.get(claim.conversation_id) for claim in claims]

    async def finish_processing(self, conversation: Conversation, *, node: str,
                                memory_webhook: OutboxMessage | None, now: float) -> bool:
        """Mark a claimed conversation completed with its summary and enqueue the memory webhook,
        together. False if the claim was lost (another node finished it)."""
        return (await self.finish_processing_many([ProcessingDone(conversation, node, memory_webhook, now)]))[0]

    async def finish_processing_many(self, done: Sequence[ProcessingDone]) -> list[bool]:
        """``finish_processing`` for many conversations in ONE transaction: each outcome, in
        order, is False when that claim was lost, and then nothing of it is written."""
        c = conversations
        by_id = {d.conversation.id: d for d in done}
        if len(by_id) != len(done):
            raise ValueError("finish_processing_many: at most one per conversation")
        if not done:
            return []
        query = sa.select(c.c.id, c.c.status, c.c.claimed_by).where(c.c.id.in_(list(by_id))).order_by(c.c.id)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        async with self._write() as conn:
            found = {row.id: row for row in await conn.execute(query)}
            held = [d for d in done if (row := found.get(d.conversation.id)) is not None
                    and row.status == PROCESSING and row.claimed_by == d.node]
            if held:
                await conn.execute(
                    sa.update(c).where(c.c.id == sa.bindparam("d_id")).values(
                        status=COMPLETED, structured=sa.bindparam("d_structured"),
                        discarded=sa.bindparam("d_discarded"), claimed_by=None, claim_expires=None, live_until=None),
                    [{"d_id": d.conversation.id, "d_structured": _json(d.conversation.structured),
                      "d_discarded": d.conversation.discarded} for d in held])
                webhooks = [(d.memory_webhook, d.now) for d in held if d.memory_webhook is not None]
                if webhooks:
                    await self._lock_keys(conn, [message.ordering_key for message, _ in webhooks])
                    await self._enqueue(conn, webhooks)
        finished = {d.conversation.id for d in held}
        return [d.conversation.id in finished for d in done]

    async def release_claims(self, node: str) -> int:
        """Give back the processing claims ``node`` holds (a graceful stop), so that the next
        sweep anywhere processes those conversations instead of waiting for the claims to expire."""
        c = conversations
        held = sa.and_(c.c.claimed_by == node, c.c.status == PROCESSING)
        async with self._write() as conn:
            if self.dialect == "postgresql":
                # Lock them in id order first, as batch saves do: an UPDATE alone locks rows in
                # scan order and could deadlock with a group commit holding some of them.
                await conn.execute(sa.select(c.c.id).where(held).order_by(c.c.id).with_for_update())
            result = await conn.execute(
                sa.update(c).where(held).values(status=IN_PROGRESS, claimed_by=None, claim_expires=None))
        return result.rowcount

    async def delete_conversation(self, conversation_id: str, *, node: str | None = None) -> bool:
        """Delete a conversation and its segments (only if ``node`` holds its claim, when given)."""
        c, s = conversations, segments
        condition = c.c.id == conversation_id
        if node is not None:
            condition = sa.and_(condition, c.c.claimed_by == node)
        async with self._write() as conn:
            result = await conn.execute(sa.delete(c).where(condition))
            if result.rowcount:
                await conn.execute(sa.delete(s).where(s.c.conversation_id == conversation_id))
            return bool(result.rowcount)


def _last_completed_statement():
    """(uid, id) of the newest completed, not discarded conversation of each user in ``:uids``:
    the ``last_memory`` event. One row per user however many memories they have (a window, not
    all their rows)."""
    c = conversations
    newest = sa.func.row_number().over(partition_by=c.c.uid, order_by=(c.c.finished_at.desc(), c.c.id.desc()))
    ranked = (sa.select(c.c.uid, c.c.id, newest.label("rank"))
              .where(c.c.uid.in_(sa.bindparam("uids", expanding=True)), c.c.status == COMPLETED,
                     c.c.discarded == sa.false()).subquery())
    return sa.select(ranked.c.uid, ranked.c.id).where(ranked.c.rank == 1)


# What a connecting session reads and writes (``Store.open_conversations``), built once: a ramp
# of connections built them for every group, which cost more than running them.
_LAST_COMPLETED = _last_completed_statement()


_IN_PROGRESS_OF_USERS = (
    sa.select(conversations)
    .where(conversations.c.uid.in_(sa.bindparam("uids", expanding=True)), conversations.c.status == IN_PROGRESS)
    .order_by(conversations.c.uid, conversations.c.finished_at.desc()))


_RESUME = sa.update(conversations).where(conversations.c.id == sa.bindparam("o_id")).values(
    timeout_s=sa.bindparam("o_timeout"), live_until=sa.bindparam("o_until"), live_by=sa.bindparam("o_holder"))


_INSERT_CONVERSATION = sa.insert(conversations)


# What a closing session writes (``Store.end_sessions``): its lease released (if it still holds
# it, when it names itself), its usage row.
_RELEASE = sa.update(conversations).where(conversations.c.id == sa.bindparam("e_id")).values(live_until=None)


_RELEASE_HELD = _RELEASE.where(conversations.c.live_by == sa.bindparam("e_holder"))


_SEGMENTS_OF = (
    sa.select(segments.c.conversation_id, segments.c.data)
    .where(segments.c.conversation_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(segments.c.conversation_id, segments.c.start, segments.c.end, segments.c.segment_id))


def _conversation(row: Any) -> Conversation:
    return readable_conversation(Conversation(
        id=row["id"], uid=row["uid"], status=row["status"], language=row["language"], source=row["source"],
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        timeout_s=row["timeout_s"], structured=orjson.loads(row["structured"]) if row["structured"] else None,
        discarded=bool(row["discarded"])))


def _conversation_row(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id, "uid": conversation.uid, "status": conversation.status,
        "language": conversation.language, "source": conversation.source,
        "created_at": conversation.created_at, "started_at": conversation.started_at,
        "finished_at": conversation.finished_at, "timeout_s": conversation.timeout_s,
        "structured": _json(conversation.structured), "discarded": conversation.discarded,
    }


def _unique_by_id(rows: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """The last row of each segment id: one upsert statement may not touch a row twice."""
    return {row["segment_id"]: row for row in rows}.values() if len(rows) > 1 else rows


def _segment_row(conversation_id: str, segment: dict) -> dict[str, Any]:
    start = float(segment.get("start", 0.0))
    return {"conversation_id": conversation_id, "segment_id": str(segment["id"]), "start": start,
            "end": float(segment.get("end", start)), "words": word_count(segment.get("text")),
            "data": orjson.dumps(segment).decode()}


@dataclass(frozen=True)
class _BatchStatements:
    """``Store.save_batches``' statements, built once per dialect: every 600 ms round rebuilt
    them (the upsert's ``excluded`` alias alone sets up a column collection) and generated
    their cache keys again, which a built statement keeps."""

    found: Any
    update: Any
    upsert: Any
    delete: Any


def _batch_statements(dialect: str) -> _BatchStatements:
    c, s = conversations, segments
    found = (sa.select(c.c.id, c.c.status, c.c.live_by)
             .where(c.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(c.c.id))
    if dialect == "postgresql":      # dialect: lock the rows, in id order (no deadlock cycles)
        found = found.with_for_update()
    update = sa.update(c).where(c.c.id == sa.bindparam("row_id")).values(
        live_until=sa.bindparam("new_live_until"), started_at=sa.bindparam("new_started_at"),
        finished_at=sa.func.coalesce(sa.bindparam("new_finished_at", type_=sa.Double), c.c.finished_at))
    upsert = _dialect_insert(dialect, s)
    upsert = upsert.on_conflict_do_update(
        index_elements=[s.c.conversation_id, s.c.segment_id],
        set_={"start": upsert.excluded.start, "end": upsert.excluded.end,
              "words": upsert.excluded.words, "data": upsert.excluded.data})
    delete = sa.delete(s).where(s.c.conversation_id == sa.bindparam("cid"), s.c.segment_id == sa.bindparam("sid"))
    return _BatchStatements(found, update, upsert, delete)


_BATCH_STATEMENTS = {dialect: _batch_statements(dialect) for dialect in ("sqlite", "postgresql")}
