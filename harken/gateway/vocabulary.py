"""``GET/PATCH /v1/users/transcription-preferences``: the user's custom vocabulary, in upstream
Omi's shape (the app reads ``{"vocabulary": [...]}`` and saves with a PATCH of that field).

``PUT`` replaces it too; ``{"vocabulary": []}`` clears it. Only ``vocabulary`` is kept: the
other preferences upstream stores there (``single_language_mode``) change nothing here, and are
answered with their upstream default so the app's parser finds them.

A session reads the vocabulary when it opens, in the transaction that opens its conversation
(``LiveConversation.vocabulary``; ``load_vocabulary`` without a conversation service), and hands
it to the speech engines in its ``StreamConfig``; a change applies to sessions opened after it.
"""

from __future__ import annotations

import logging
from typing import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..conversations import Store
from ..conversations.vocabulary import VocabularyError, clean_terms, get_vocabulary, set_vocabulary
from .auth import Authenticator
from .rest import _error, authentication, json_object

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
ROUTE = "/v1/users/transcription-preferences"


def _preferences(terms: list[str]) -> dict:
    return {"vocabulary": terms, "single_language_mode": False}


def build_vocabulary_routes(store: Store | Callable[[], Store | None],
                            authenticator: Authenticator | Callable[[], Authenticator]) -> list[Route]:
    get_store = store if callable(store) else (lambda: store)
    authenticated = authentication(authenticator)

    async def preferences(request: Request, uid: str) -> Response:
        store = get_store()
        if store is None:
            return _error(503, "no store is configured")
        if request.method == "GET":
            return JSONResponse(_preferences(await get_vocabulary(store, uid)))
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"the body is over {MAX_BODY_BYTES} bytes")
        payload = json_object(body or b"{}", '{"vocabulary": ["term", ...]}')   # 400 otherwise
        if "vocabulary" not in payload:
            # A PATCH of other preferences only: nothing of ours changes.
            return JSONResponse(_preferences(await get_vocabulary(store, uid)))
        if not isinstance(payload["vocabulary"], list):
            return _error(400, "vocabulary must be a list of strings")
        try:
            terms = clean_terms(payload["vocabulary"])
        except VocabularyError as exc:
            return _error(400, str(exc))
        await set_vocabulary(store, uid, terms)
        return JSONResponse(_preferences(terms))

    return [Route(ROUTE, authenticated(preferences), methods=["GET", "PATCH", "PUT"])]


async def load_vocabulary(store: Store | None, uid: str) -> tuple[str, ...]:
    """The user's terms for a new session; a storage failure costs the vocabulary, not the session."""
    if store is None:
        return ()
    try:
        return tuple(await get_vocabulary(store, uid))
    except Exception:
        log.exception("could not load the vocabulary of uid=%s; transcribing without it", uid)
        return ()
