"""The webhook outbox: enqueueing, claiming and settling deliveries (``OutboxRecords``, part of
``Store``)."""

from __future__ import annotations

from typing import Sequence

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .schema import DUE_HEADS, outbox, webhooks
from .store_base import StoreBase, _json
from .store_rows import DEAD, PENDING, OutboxMessage, OutboxRow, Settlement


class OutboxRecords(StoreBase):
    async def _enqueue(self, conn: AsyncConnection, messages: Sequence[tuple[OutboxMessage, float]]) -> int | None:
        """Insert ``(message, now)`` rows, in order, with one INSERT … SELECT from the user's
        webhook setting run for each (one executemany): no setting, no row; the URL is the one
        set when the change happened. A row is its key's head if no row of the key is pending
        (earlier rows of the same call count). The caller holds the keys' locks. Returns the
        rows written, or None when the driver does not say (asyncpg's executemany)."""
        result = await conn.execute(
            _ENQUEUE,
            [{"m_uid": m.uid, "m_kind": m.kind, "m_key": m.ordering_key, "m_params": _json(m.params),
              "m_headers": _json(m.headers), "m_content_type": m.content_type, "m_body": m.body, "m_now": at}
             for m, at in messages])
        return result.rowcount if result.rowcount >= 0 else None

    async def enqueue(self, messages: Sequence[OutboxMessage], *, now: float) -> None:
        """Enqueue several messages in one transaction, in order."""
        if messages:
            async with self._write() as conn:
                await self._lock_keys(conn, [m.ordering_key for m in messages])
                await self._enqueue(conn, [(message, now) for message in messages])

    async def exchange_outbox(self, settlement: Settlement, *, node: str, now: float, lease: float,
                              limit: int) -> list[OutboxRow]:
        """Record delivery outcomes, then claim up to ``limit`` due heads, in one transaction.

        Only a key's head is ever claimed, so each key's rows go out one at a time, in order; a
        delivered or dead head hands the role to the key's next pending row. On PostgreSQL this
        bookkeeping commits without waiting for the WAL flush: losing it in a database crash
        only means a row is sent again (same delivery id) or claimed again, which at-least-once
        delivery allows.
        """
        o = outbox
        async with self._write() as conn:
            if self.dialect == "postgresql":
                await conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
            if settlement:
                await self._settle(conn, settlement)
            if limit <= 0:
                return []
            due = (sa.select(o.c.id)
                   .where(sa.text(DUE_HEADS), o.c.next_attempt_at <= now, o.c.claimed_until < now)
                   .order_by(o.c.next_attempt_at, o.c.id).limit(limit))
            if self.dialect == "postgresql":
                due = due.with_for_update(skip_locked=True)
            rows = (await conn.execute(
                sa.update(o).where(o.c.id.in_(due.scalar_subquery()))
                .values(claimed_until=now + lease, claimed_by=node, attempts=o.c.attempts + 1)
                .returning(o.c.id, o.c.uid, o.c.kind, o.c.ordering_key, o.c.url, o.c.params, o.c.headers,
                           o.c.content_type, o.c.body, o.c.created_at, o.c.attempts))).all()
        claimed = [OutboxRow(id=r[0], uid=r[1], kind=r[2], ordering_key=r[3], url=r[4],
                             params=orjson.loads(r[5]), headers=orjson.loads(r[6]), content_type=r[7],
                             body=bytes(r[8]), created_at=r[9], attempts=r[10]) for r in rows]
        claimed.sort(key=lambda row: row.id)
        return claimed

    async def _settle(self, conn: AsyncConnection, settlement: Settlement) -> None:
        o = outbox
        finished = [row for row in settlement.delivered] + [row for row, _ in settlement.dead]
        await self._lock_keys(conn, [row.ordering_key for row in finished])
        if settlement.delivered:
            await conn.execute(sa.delete(o).where(o.c.id.in_([row.id for row in settlement.delivered])))
        if settlement.dead:
            await conn.execute(
                sa.update(o).where(o.c.id == sa.bindparam("row_id")).values(
                    status=DEAD, is_head=False, claimed_until=0.0, claimed_by=None, last_error=sa.bindparam("error")),
                [{"row_id": row.id, "error": error} for row, error in settlement.dead])
        if settlement.retry:
            await conn.execute(
                sa.update(o).where(o.c.id == sa.bindparam("row_id")).values(
                    next_attempt_at=sa.bindparam("next_at"), claimed_until=0.0, claimed_by=None,
                    last_error=sa.bindparam("error")),
                [{"row_id": row.id, "next_at": t, "error": e} for row, t, e in settlement.retry])
        if finished:
            keys = sorted({row.ordering_key for row in finished})
            next_heads = (sa.select(sa.func.min(o.c.id)).where(o.c.status == PENDING, o.c.ordering_key.in_(keys))
                          .group_by(o.c.ordering_key))
            await conn.execute(sa.update(o).where(o.c.id.in_(next_heads.scalar_subquery())).values(is_head=True))

    async def claim_outbox(self, *, node: str, now: float, lease: float, limit: int) -> list[OutboxRow]:
        return await self.exchange_outbox(Settlement(), node=node, now=now, lease=lease, limit=limit)

    async def settle_outbox(self, settlement: Settlement) -> None:
        await self.exchange_outbox(settlement, node="", now=0.0, lease=0.0, limit=0)

    async def outbox_counts(self) -> dict[str, int]:
        o = outbox
        async with self._read() as conn:
            rows = await conn.execute(sa.select(o.c.status, sa.func.count()).group_by(o.c.status))
            return {status: int(n) for status, n in rows}


def _enqueue_statement():
    """``Store._enqueue``'s INSERT … SELECT, built once: building it (an alias, a subquery)
    cost more than running it."""
    w, o, pending = webhooks, outbox, outbox.alias("pending")
    key, now = sa.bindparam("m_key", type_=sa.String), sa.bindparam("m_now", type_=sa.Double)
    uid, kind = sa.bindparam("m_uid", type_=sa.String), sa.bindparam("m_kind", type_=sa.String)
    no_pending = ~sa.exists().where(pending.c.ordering_key == key, pending.c.status == PENDING)
    source = sa.select(
        uid, kind, key, w.c.url, sa.bindparam("m_params", type_=sa.Text), sa.bindparam("m_headers", type_=sa.Text),
        sa.bindparam("m_content_type", type_=sa.String), sa.bindparam("m_body", type_=sa.LargeBinary),
        sa.literal(PENDING, sa.String), now, now, sa.literal(0.0, sa.Double), sa.literal(0, sa.Integer),
        no_pending,
    ).where(w.c.uid == uid, w.c.kind == kind)
    return sa.insert(o).from_select(
        ["uid", "kind", "ordering_key", "url", "params", "headers", "content_type", "body", "status",
         "created_at", "next_attempt_at", "claimed_until", "attempts", "is_head"], source)


_ENQUEUE = _enqueue_statement()
