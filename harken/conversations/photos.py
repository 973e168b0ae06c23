"""OpenGlass photos stored with their conversation: the ``photos`` table's queries.

A photo is stored as soon as it is reassembled (with an empty description), so that it belongs to
its conversation even if the connection ends before a vision model answers; the description is
filled in afterwards. ``photo_object`` is upstream's ``ConversationPhoto`` shape (``id``,
``base64``, ``description``, ``created_at``, ``discarded``), the one the conversation object's
``photos`` field carries in ``GET /v1/conversations/{id}``, the memory events and the
``memory_created`` webhook.
"""

from __future__ import annotations

import base64
from typing import Sequence

import sqlalchemy as sa

from .model import iso
from .schema import photos
from .store import Store

_OF_CONVERSATIONS = (
    sa.select(photos)
    .where(photos.c.conversation_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(photos.c.conversation_id, photos.c.created_at, photos.c.id))
_DESCRIBE = (sa.update(photos).where(photos.c.id == sa.bindparam("p_id"))
             .values(description=sa.bindparam("p_description"), discarded=sa.bindparam("p_discarded")))


def photo_object(row) -> dict:
    return {"id": row["id"], "base64": base64.b64encode(row["jpeg"]).decode(), "description": row["description"],
            "created_at": iso(row["created_at"]), "discarded": bool(row["discarded"])}


async def save_photo(store: Store, *, photo_id: str, conversation_id: str, uid: str, jpeg: bytes,
                     now: float, description: str = "", discarded: bool = False) -> None:
    async with store._write() as conn:
        await conn.execute(sa.insert(photos), [{
            "id": photo_id, "conversation_id": conversation_id, "uid": uid, "created_at": now,
            "description": description, "discarded": discarded, "jpeg": jpeg}])


async def describe_photo(store: Store, photo_id: str, description: str, *, discarded: bool = False) -> None:
    async with store._write() as conn:
        await conn.execute(_DESCRIBE, {"p_id": photo_id, "p_description": description, "p_discarded": discarded})


async def photos_of(store: Store, conversation_ids: Sequence[str]) -> dict[str, list[dict]]:
    """Each conversation's photos (upstream's shape), oldest first, in one query."""
    by_id: dict[str, list[dict]] = {cid: [] for cid in conversation_ids}
    if by_id:
        async with store._read() as conn:
            for row in (await conn.execute(_OF_CONVERSATIONS, {"ids": list(by_id)})).mappings():
                by_id[row["conversation_id"]].append(photo_object(row))
    return by_id


async def conversation_photos(store: Store, uid: str, conversation_id: str) -> list[dict] | None:
    """A conversation's photos in upstream's shape, for the REST routes: None if the
    conversation is not the user's (or does not exist)."""
    conversation = await store.get_conversation(conversation_id)
    if conversation is None or conversation.uid != uid:
        return None
    return (await photos_of(store, [conversation_id]))[conversation_id]


async def delete_photos_of(store: Store, conversation_id: str) -> None:
    async with store._write() as conn:
        await conn.execute(sa.delete(photos).where(photos.c.conversation_id == conversation_id))
