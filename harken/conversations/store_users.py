"""A user's own settings and records: webhook settings, the owner's speech profile, people and
their voices, usage (``UserRecords``, part of ``Store``); the statements that read them for many
users at once (``Store.open_conversations``)."""

from __future__ import annotations

import json
from typing import Any, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from .model import Usage, WebhookSetting
from .schema import people, speech_profiles, usage, user_vocabulary, webhooks
from .store_base import StoreBase
from .store_rows import PersonRow, SessionEnd, SpeechProfileRow, Voices


class UserRecords(StoreBase):
    async def get_webhook(self, uid: str, kind: str) -> WebhookSetting | None:
        w = webhooks
        async with self._read() as conn:
            row = (await conn.execute(sa.select(w).where(w.c.uid == uid, w.c.kind == kind))).mappings().first()
        return _webhook_setting(row) if row else None

    async def set_webhook(self, uid: str, setting: WebhookSetting, *, now: float) -> None:
        w = webhooks
        stmt = self._insert(w).values(uid=uid, kind=setting.kind, url=setting.url,
                                      interval_seconds=setting.interval_seconds, updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[w.c.uid, w.c.kind], set_={
            "url": stmt.excluded.url, "interval_seconds": stmt.excluded.interval_seconds,
            "updated_at": stmt.excluded.updated_at})
        async with self._write() as conn:
            await conn.execute(stmt)

    async def delete_webhook(self, uid: str, kind: str) -> bool:
        w = webhooks
        async with self._write() as conn:
            result = await conn.execute(sa.delete(w).where(w.c.uid == uid, w.c.kind == kind))
        return bool(result.rowcount)

    async def get_speech_profile(self, uid: str) -> SpeechProfileRow | None:
        p = speech_profiles
        async with self._read() as conn:
            row = (await conn.execute(sa.select(p).where(p.c.uid == uid))).mappings().first()
        return SpeechProfileRow(**row) if row else None

    async def set_speech_profile(self, uid: str, embedding: bytes, *, speech_seconds: float, now: float) -> None:
        """Create or replace the user's profile (``created_at`` is kept on a replace)."""
        p = speech_profiles
        stmt = self._insert(p).values(uid=uid, embedding=embedding, speech_seconds=speech_seconds,
                                      created_at=now, updated_at=now)
        stmt = stmt.on_conflict_do_update(index_elements=[p.c.uid], set_={
            "embedding": stmt.excluded.embedding, "speech_seconds": stmt.excluded.speech_seconds,
            "updated_at": stmt.excluded.updated_at})
        async with self._write() as conn:
            await conn.execute(stmt)

    async def delete_speech_profile(self, uid: str) -> bool:
        async with self._write() as conn:
            result = await conn.execute(sa.delete(speech_profiles).where(speech_profiles.c.uid == uid))
        return bool(result.rowcount)

    async def add_person(self, person: PersonRow) -> None:
        async with self._write() as conn:
            await conn.execute(sa.insert(people).values(**vars(person)))

    async def get_person(self, uid: str, person_id: str) -> PersonRow | None:
        """The person, if it is ``uid``'s (another user's person is reported as missing)."""
        p = people
        async with self._read() as conn:
            row = (await conn.execute(sa.select(p).where(p.c.id == person_id, p.c.uid == uid))).mappings().first()
        return PersonRow(**row) if row else None

    async def list_people(self, uid: str) -> list[PersonRow]:
        p = people
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(p).where(p.c.uid == uid).order_by(p.c.created_at, p.c.id))).mappings()
            return [PersonRow(**row) for row in rows]

    async def delete_person(self, uid: str, person_id: str) -> bool:
        p = people
        async with self._write() as conn:
            result = await conn.execute(sa.delete(p).where(p.c.id == person_id, p.c.uid == uid))
        return bool(result.rowcount)

    async def set_person_voice(self, uid: str, person_id: str, embedding: bytes, *, samples: int,
                               speech_seconds: float, expected_samples: int) -> bool:
        """Store a person's new voice if it still has ``expected_samples`` samples (the count the
        new embedding was averaged from); False if the person is gone or changed meanwhile, so the
        caller can re-read and average again instead of losing a concurrent sample."""
        p = people
        async with self._write() as conn:
            result = await conn.execute(
                sa.update(p).where(p.c.id == person_id, p.c.uid == uid, p.c.samples == expected_samples)
                .values(embedding=embedding, samples=samples, speech_seconds=speech_seconds))
        return bool(result.rowcount)

    async def load_voices(self, uid: str) -> Voices:
        """``(owner embedding or None, [(person_id, name, embedding)])`` of the people with a
        voice, in one query (a session loads them before its audio flows; one that connects
        through ``open_conversations`` gets them from there)."""
        async with self._read() as conn:
            return (await self._voices_of(conn, [uid])).get(uid, (None, []))

    async def _voices_of(self, conn: AsyncConnection, uids: Sequence[str]) -> dict[str, Voices]:
        """``load_voices`` of several users in one query (every user in ``uids`` gets an entry)."""
        rows = (await conn.execute(_VOICES, {"uids": list(uids)})).all()
        found: dict[str, Voices] = {uid: (None, []) for uid in uids}
        for uid, is_owner, person_id, name, embedding, _ in rows:    # each user's in the people's order
            owner, named = found[uid]
            if is_owner:
                found[uid] = (bytes(embedding), named)
            else:
                named.append((person_id, name, bytes(embedding)))
        return found

    async def record_usage(self, uid: str, used: Usage, *, session_id: str | None,
                           conversation_id: str | None, now: float) -> None:
        await self.end_sessions([SessionEnd(conversation_id, uid, now, release=False, usage=used,
                                            session_id=session_id)])

    async def usage_totals(self, uid: str, *, since: float = 0.0) -> Usage:
        u = usage
        async with self._read() as conn:
            row = (await conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(u.c.audio_seconds), 0.0),
                          sa.func.coalesce(sa.func.sum(u.c.speech_seconds), 0.0),
                          sa.func.coalesce(sa.func.sum(u.c.words), 0))
                .where(u.c.uid == uid, u.c.recorded_at >= since))).one()
        return Usage(audio_seconds=float(row[0]), speech_seconds=float(row[1]), words=int(row[2]))


_INSERT_USAGE = sa.insert(usage)


_WEBHOOKS_OF_USERS = sa.select(webhooks).where(webhooks.c.uid.in_(sa.bindparam("uids", expanding=True)))
# Their custom vocabularies (the rest of the vocabulary's queries: vocabulary.py).
_VOCABULARIES_OF_USERS = sa.select(user_vocabulary.c.uid, user_vocabulary.c.terms).where(
    user_vocabulary.c.uid.in_(sa.bindparam("uids", expanding=True)))


def stored_terms(raw: str | None) -> list[str]:
    """The terms of a stored ``user_vocabulary.terms`` value (None: the user has none)."""
    return list(json.loads(raw)) if raw else []


def _webhook_setting(row: Any) -> WebhookSetting:
    return WebhookSetting(row["kind"], row["url"], row["interval_seconds"])


def _voices_statement():
    """``Store._voices_of``'s query, built once: the owners' embeddings and the named people with a
    voice of the users in ``:uids``, each user's people in the order they were added."""
    sp, p, uids = speech_profiles, people, sa.bindparam("uids", expanding=True)
    owner = sa.select(sp.c.uid, sa.literal(True).label("is_owner"), sp.c.uid.label("id"), sp.c.uid.label("name"),
                      sp.c.embedding, sa.literal(0.0).label("created_at")).where(sp.c.uid.in_(uids))
    named = sa.select(p.c.uid, sa.literal(False), p.c.id, p.c.name, p.c.embedding, p.c.created_at).where(
        p.c.uid.in_(uids), p.c.embedding.is_not(None))
    return sa.union_all(owner, named).order_by(sa.column("uid"), sa.column("created_at"), sa.column("id"))


_VOICES = _voices_statement()
