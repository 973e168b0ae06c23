"""The ``/v1`` REST API: the caller's conversations and webhook settings (PROTOCOL §1, §7, §8).

Built as plain Starlette routes by ``build_rest_routes(service, authenticator)``, so the app can
add them to its route list (Starlette or FastAPI alike). Every route needs
``Authorization: Bearer <token>``, verified by the same authenticator as ``/v4/listen``; a
conversation that is not the caller's is reported as missing (404), never as forbidden, so ids
cannot be probed.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..conversations import ConversationService, WebhookSettingError
from ..conversations.webhooks import KINDS
from .auth import TRY_AGAIN_LATER, AuthError, Authenticator, bearer_token

log = logging.getLogger(__name__)

DEFAULT_PAGE = 25
MAX_PAGE = 100

Handler = Callable[[Request, str], Awaitable[Response]]


def _error(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


class _BadRequest(Exception):
    pass


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _BadRequest(f"{name} must be a whole number") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name} must be from {low} to {high}")
    return value


def _bool_param(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true"):
        return True
    if raw.lower() in ("0", "false"):
        return False
    raise _BadRequest(f"{name} must be true or false")


def authentication(authenticator: Authenticator | Callable[[], Authenticator]
                   ) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """A decorator turning ``handler(request, uid)`` into an endpoint that needs a valid bearer
    token (401/503 otherwise) and answers ``_BadRequest`` with 400. Shared by every /v1 module."""
    get_authenticator = authenticator if callable(authenticator) else (lambda: authenticator)

    def authenticated(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            authenticator = get_authenticator()
            token = bearer_token(request.headers.get("authorization"))
            if token is None and authenticator.mode != "none":
                return _error(401, "missing bearer token", **{"WWW-Authenticate": "Bearer"})
            try:
                uid = await authenticator.authenticate(token, request.query_params.get("uid"))
            except AuthError as exc:
                if exc.close_code == TRY_AGAIN_LATER:
                    return _error(503, exc.reason, **{"Retry-After": "5"})
                return _error(401, exc.reason, **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
            try:
                return await handler(request, uid)
            except _BadRequest as exc:
                return _error(400, str(exc))
        return endpoint
    return authenticated


def build_rest_routes(service: ConversationService | Callable[[], ConversationService],
                      authenticator: Authenticator | Callable[[], Authenticator]) -> list[Route]:
    """The /v1 routes. Either argument may instead be a function returning it, for an app that
    builds them in its lifespan, e.g. ``lambda: app.state.gateway.conversations``."""
    get_service = service if callable(service) else (lambda: service)
    authenticated = authentication(authenticator)

    async def list_conversations(request: Request, uid: str) -> Response:
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        include_discarded = _bool_param(request, "include_discarded", True)
        items = await get_service().list_conversations(uid, limit=limit, offset=offset,
                                                 include_discarded=include_discarded)
        return JSONResponse(items)

    async def get_conversation(request: Request, uid: str) -> Response:
        conversation = await get_service().get_conversation(uid, request.path_params["conversation_id"])
        if conversation is None:
            return _error(404, "conversation not found")
        return JSONResponse(conversation)

    async def webhook(request: Request, uid: str) -> Response:
        kind = request.path_params["kind"]
        if kind not in KINDS:
            return _error(404, f"unknown webhook kind {kind!r}: use one of {', '.join(KINDS)}")
        service = get_service()
        if request.method == "GET":
            setting = await service.get_webhook(uid, kind)
            return JSONResponse(setting.to_api() if setting else {"kind": kind, "url": None, "enabled": False})
        if request.method == "DELETE":
            await service.delete_webhook(uid, kind)
            return Response(status_code=204)
        payload = await _read_payload(request)
        try:
            setting = await service.set_webhook(uid, kind, payload)
        except WebhookSettingError as exc:
            return _error(422, str(exc))
        return JSONResponse(setting.to_api())

    return [
        Route("/v1/conversations", authenticated(list_conversations), methods=["GET"]),
        Route("/v1/conversations/{conversation_id}", authenticated(get_conversation), methods=["GET"]),
        # POST as well as PUT: the Omi app sets webhooks with POST.
        Route("/v1/users/developer/webhooks/{kind}", authenticated(webhook),
              methods=["GET", "PUT", "POST", "DELETE"]),
    ]


async def _read_payload(request: Request) -> Any:
    """A JSON body, or a plain-text URL (``"https://…"`` / Omi's ``"url,seconds"``)."""
    body = await request.body()
    text = body.decode("utf-8", errors="replace").strip()
    if "json" in request.headers.get("content-type", "") or text[:1] in ('{', '"'):
        try:
            return json.loads(text)
        except ValueError:
            raise _BadRequest("the body is not valid JSON") from None
    return text
