"""What the Omi app's REST calls read and write besides a session's conversation.

The app lists conversations by status (``statuses=in_progress`` finds the live one), stars them,
assigns segments to the owner or a person after the fact, reports the phone's location, and
switches developer webhooks off and on. These queries live here, next to ``store.py`` (which
keeps the sessions' hot paths); they use its connections and run on both engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import orjson
import sqlalchemy as sa

from .model import Conversation, WebhookSetting
from .schema import conversations, disabled_webhooks, geolocations, people, segments, webhooks
from .store import Store, _conversation

# Upstream's default (and what an empty ``statuses=`` means): what the app's list shows.
DEFAULT_STATUSES = ("processing", "completed")
KNOWN_STATUSES = ("in_progress", "processing", "completed", "failed")


@dataclass
class Found:
    conversation: Conversation
    segments: list[dict]
    starred: bool


class UnknownSegments(LookupError):
    """Some segment ids of an assignment are not in the conversation (nothing was changed)."""

    def __init__(self, ids: Sequence[str]):
        super().__init__(", ".join(ids))
        self.ids = list(ids)


class AppQueries:
    def __init__(self, store: Store) -> None:
        self.store = store

    # --- conversations --------------------------------------------------------------------
    async def list(self, uid: str, *, statuses: Iterable[str] = DEFAULT_STATUSES, include_discarded: bool = True,
                   limit: int, offset: int = 0, starred: bool | None = None) -> list[Found]:
        """The user's conversations with one of ``statuses``, newest first (by creation), with
        their segments, as upstream's ``GET /v1/conversations`` filters them."""
        c = conversations
        query = sa.select(c).where(c.c.uid == uid, c.c.status.in_(list(statuses)))
        if not include_discarded:
            query = query.where(c.c.discarded == sa.false())
        if starred is not None:
            query = query.where(c.c.starred == (sa.true() if starred else sa.false()))
        query = query.order_by(c.c.created_at.desc(), c.c.id.desc()).limit(limit).offset(offset)
        async with self.store._read() as conn:
            rows = list((await conn.execute(query)).mappings())
            by_id = await self.store._segments_of(conn, [r["id"] for r in rows])
        return [Found(_conversation(r), by_id[r["id"]], bool(r["starred"])) for r in rows]

    async def get(self, uid: str, conversation_id: str) -> Found | None:
        """The conversation if it is the user's; None otherwise (another user's id is missing)."""
        c = conversations
        async with self.store._read() as conn:
            row = (await conn.execute(sa.select(c).where(c.c.id == conversation_id, c.c.uid == uid))
                   ).mappings().first()
            if row is None:
                return None
            found = await self.store._segments_of(conn, [conversation_id])
        return Found(_conversation(row), found[conversation_id], bool(row["starred"]))

    async def in_progress_ids(self, uid: str) -> list[str]:
        """The user's in-progress conversations, the most recently active first."""
        c = conversations
        query = (sa.select(c.c.id).where(c.c.uid == uid, c.c.status == "in_progress")
                 .order_by(c.c.finished_at.desc(), c.c.id.desc()))
        async with self.store._read() as conn:
            return [cid for (cid,) in await conn.execute(query)]

    async def set_starred(self, uid: str, conversation_id: str, starred: bool) -> bool:
        c = conversations
        async with self.store._write() as conn:
            result = await conn.execute(sa.update(c).where(c.c.id == conversation_id, c.c.uid == uid)
                                        .values(starred=starred))
        return bool(result.rowcount)

    async def assign_segments(self, uid: str, conversation_id: str, segment_ids: Sequence[str], *,
                              is_user: bool, person_id: str | None) -> list[dict] | None:
        """Set ``is_user``/``person_id`` on the given stored segments in one transaction. None if
        the conversation is not the user's; ``UnknownSegments`` (nothing written) if an id is
        not one of its segments. Returns the segments changed, as stored."""
        c, s = conversations, segments
        wanted = list(dict.fromkeys(segment_ids))
        async with self.store._write() as conn:
            owner = (await conn.execute(sa.select(c.c.uid).where(c.c.id == conversation_id))).scalar()
            if owner != uid:
                return None
            rows = {sid: orjson.loads(data) for sid, data in await conn.execute(
                sa.select(s.c.segment_id, s.c.data).where(s.c.conversation_id == conversation_id,
                                                          s.c.segment_id.in_(wanted)))}
            missing = [sid for sid in wanted if sid not in rows]
            if missing:
                raise UnknownSegments(missing)
            changed = []
            for sid in wanted:
                segment = rows[sid]
                segment["is_user"], segment["person_id"] = is_user, person_id
                changed.append(segment)
            if changed:
                await conn.execute(
                    sa.update(s).where(s.c.conversation_id == conversation_id, s.c.segment_id == sa.bindparam("k_id"))
                    .values(data=sa.bindparam("k_data")),
                    [{"k_id": seg["id"], "k_data": orjson.dumps(seg).decode()} for seg in changed])
        return changed

    # --- the user's location ----------------------------------------------------------------
    async def save_geolocation(self, uid: str, location: dict, *, now: float) -> None:
        g = geolocations
        stmt = self.store._insert(g).values(uid=uid, latitude=location["latitude"], longitude=location["longitude"],
                                            data=orjson.dumps(location).decode(), updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[g.c.uid], set_={
            "latitude": stmt.excluded.latitude, "longitude": stmt.excluded.longitude, "data": stmt.excluded.data,
            "updated_at": stmt.excluded.updated_at})
        async with self.store._write() as conn:
            await conn.execute(stmt)

    async def geolocation(self, uid: str) -> dict | None:
        g = geolocations
        async with self.store._read() as conn:
            data = (await conn.execute(sa.select(g.c.data).where(g.c.uid == uid))).scalar()
        return orjson.loads(data) if data else None

    # --- developer webhooks switched off ----------------------------------------------------
    async def disabled_webhook(self, uid: str, kind: str) -> WebhookSetting | None:
        d = disabled_webhooks
        async with self.store._read() as conn:
            row = (await conn.execute(sa.select(d).where(d.c.uid == uid, d.c.kind == kind))).mappings().first()
        return WebhookSetting(kind, row["url"], row["interval_seconds"]) if row else None

    async def disable_webhook(self, uid: str, kind: str, *, now: float) -> bool:
        """Move the setting out of ``webhooks`` (delivery stops at once) into ``disabled_webhooks``."""
        return await self._move(webhooks, disabled_webhooks, uid, kind, now)

    async def enable_webhook(self, uid: str, kind: str, *, now: float) -> bool:
        return await self._move(disabled_webhooks, webhooks, uid, kind, now)

    async def forget_disabled_webhook(self, uid: str, kind: str) -> None:
        """A new URL set while switched off replaces the one kept (and is on)."""
        d = disabled_webhooks
        async with self.store._write() as conn:
            await conn.execute(sa.delete(d).where(d.c.uid == uid, d.c.kind == kind))

    async def _move(self, source: sa.Table, target: sa.Table, uid: str, kind: str, now: float) -> bool:
        async with self.store._write() as conn:
            row = (await conn.execute(sa.select(source).where(source.c.uid == uid, source.c.kind == kind))
                   ).mappings().first()
            if row is None:
                return False
            await conn.execute(sa.delete(source).where(source.c.uid == uid, source.c.kind == kind))
            await conn.execute(sa.delete(target).where(target.c.uid == uid, target.c.kind == kind))
            await conn.execute(sa.insert(target).values(uid=uid, kind=kind, url=row["url"],
                                                        interval_seconds=row["interval_seconds"], updated_at=now))
        return True

    # --- people -------------------------------------------------------------------------------
    async def rename_person(self, uid: str, person_id: str, name: str) -> bool:
        p = people
        async with self.store._write() as conn:
            result = await conn.execute(sa.update(p).where(p.c.id == person_id, p.c.uid == uid).values(name=name))
        return bool(result.rowcount)
