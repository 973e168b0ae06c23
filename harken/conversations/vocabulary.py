"""Each user's custom vocabulary: names and jargon the speech engines should favour.

The shape is upstream Omi's ``/v1/users/transcription-preferences`` ``vocabulary`` (a list of
strings; the Omi app trims them and drops duplicates case-insensitively). Upstream sends the
words to Deepgram as ``keyterm``, at most 100; here they reach every engine that takes a list
(see ``harken/stt``: Deepgram ``keyterm``/``keywords``, Soniox ``context``, Speechmatics
``additional_vocab``, Whisper ``hotwords``).

The queries live here rather than in ``store.py`` (one concern per module); they use the
store's connection helpers so that SQLite writes queue like every other write.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Iterable

import sqlalchemy as sa

from .schema import user_vocabulary
from .store_users import stored_terms

if TYPE_CHECKING:
    from .store import Store

MAX_TERMS = 100          # upstream's limit
MAX_TERM_CHARS = 64


class VocabularyError(ValueError):
    """A vocabulary the API refuses (400), with a message for the client."""


def clean_terms(terms: Iterable[object]) -> list[str]:
    """Trimmed, inner whitespace collapsed, duplicates (case-insensitive) dropped, order kept.

    Raises ``VocabularyError`` for a non-string term, one longer than ``MAX_TERM_CHARS``, or more
    than ``MAX_TERMS`` terms.
    """
    cleaned: list[str] = []
    seen: set[str] = set()
    for term in terms:
        if not isinstance(term, str):
            raise VocabularyError(f"vocabulary terms must be strings, got {type(term).__name__}")
        text = " ".join(term.split())
        if not text:
            continue
        if len(text) > MAX_TERM_CHARS:
            raise VocabularyError(f"a vocabulary term is at most {MAX_TERM_CHARS} characters: {text[:80]!r}")
        if text.casefold() in seen:
            continue
        seen.add(text.casefold())
        cleaned.append(text)
    if len(cleaned) > MAX_TERMS:
        raise VocabularyError(f"at most {MAX_TERMS} vocabulary terms, got {len(cleaned)}")
    return cleaned


async def get_vocabulary(store: "Store", uid: str) -> list[str]:
    v = user_vocabulary
    async with store._read() as conn:
        raw = (await conn.execute(sa.select(v.c.terms).where(v.c.uid == uid))).scalar()
    return stored_terms(raw)


async def set_vocabulary(store: "Store", uid: str, terms: list[str]) -> None:
    """Replace the user's vocabulary (already cleaned with ``clean_terms``)."""
    v = user_vocabulary
    stmt = store._insert(v).values(uid=uid, terms=json.dumps(terms, ensure_ascii=False), updated_at=time.time())
    stmt = stmt.on_conflict_do_update(index_elements=[v.c.uid], set_={
        "terms": stmt.excluded.terms, "updated_at": stmt.excluded.updated_at})
    async with store._write() as conn:
        await conn.execute(stmt)
