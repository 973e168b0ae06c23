"""The ``/v1`` REST API: the caller's conversations and webhook settings (PROTOCOL §1, §7, §8),
at Harken's paths and at the Omi app's (upstream backend's shapes: ``statuses`` filter, process
now, assign-bulk, starred, geolocation, singular developer-webhook routes), and the JSON 404 that
answers every path nobody serves.

Built as plain Starlette routes by ``build_rest_routes(service, authenticator)``, so the app can
add them to its route list (Starlette or FastAPI alike). Every route needs
``Authorization: Bearer <token>``, verified by the same authenticator as ``/v4/listen``; a
conversation that is not the caller's is reported as missing (404), never as forbidden, so ids
cannot be probed.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..conversations import AppQueries, ConversationService, UnknownSegments, WebhookSettingError
from ..conversations.model import app_conversation
from ..conversations.photos import photos_of
from ..conversations.queries import DEFAULT_STATUSES, KNOWN_STATUSES, Found
from ..conversations.webhooks import AUDIO_BYTES, KINDS
from .guard import BadJson, parse_json
from .auth import TRY_AGAIN_LATER, AuthError, Authenticator, bearer_token

log = logging.getLogger(__name__)

DEFAULT_PAGE = 100                 # upstream's default
MAX_PAGE = 100
MAX_STATUSES = 20                  # upstream refuses more values in one filter
MAX_ASSIGNED_SEGMENTS = 5000
MAX_JSON_BODY = 256 * 1024

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

    def queries() -> AppQueries:
        return AppQueries(get_service().store)

    async def list_conversations(request: Request, uid: str) -> Response:
        """Upstream's filtering: ``statuses`` comma-separated (empty: processing and completed),
        ``include_discarded`` (default true), ``starred``, newest first. The app always sends
        ``statuses``; without the parameter every status is listed (Harken's web page and
        clients before this filter existed read the live conversation that way)."""
        limit = _int_param(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        offset = _int_param(request, "offset", 0, 0, 10**9)
        include_discarded = _bool_param(request, "include_discarded", True)
        starred = _bool_param(request, "starred", None)
        raw = request.query_params.get("statuses")
        statuses = [v.strip() for v in (raw or "").split(",") if v.strip()]
        if len(statuses) > MAX_STATUSES:
            raise _BadRequest(f"statuses accepts at most {MAX_STATUSES} values")
        if raw is None:
            statuses = list(KNOWN_STATUSES)
        found = await queries().list(uid, statuses=statuses or DEFAULT_STATUSES, include_discarded=include_discarded,
                                     limit=limit, offset=offset, starred=starred)
        return JSONResponse([_shown(f) for f in found])

    async def get_conversation(request: Request, uid: str) -> Response:
        found = await queries().get(uid, request.path_params["conversation_id"])
        if found is None:
            return _error(404, "conversation not found")
        photos = await photos_of(get_service().store, [found.conversation.id])    # OpenGlass photos
        return JSONResponse(_shown(found, photos[found.conversation.id]))

    async def process_now(request: Request, uid: str) -> Response:
        """``POST /v1/conversations``: process the caller's in-progress conversation now.
        Upstream's optional body fields (calendar context, a client's own summary) are read as
        JSON and ignored."""
        await _json_object(request, required=False)
        memory = await get_service().process_now(uid)
        found = await queries().get(uid, memory["id"]) if memory else None
        if found is None:
            return _error(404, "Conversation in progress not found")
        shown = _shown(found)
        # Upstream's response is {conversation, messages}; older app builds read "memory".
        return JSONResponse({"conversation": shown, "memory": shown, "messages": []})

    async def assign_bulk(request: Request, uid: str) -> Response:
        conversation_id = request.path_params["conversation_id"]
        segment_ids, is_user, person_id = _assignment(await _json_object(request))
        if person_id is not None and await get_service().store.get_person(uid, person_id) is None:
            return _error(404, "person not found")
        try:
            mine = await get_service().assign_segments(uid, conversation_id, segment_ids, is_user=is_user,
                                                       person_id=person_id)
        except UnknownSegments as exc:
            return _error(409, f"Unable to resolve transcript segment assignment target(s): {', '.join(exc.ids)}")
        found = await queries().get(uid, conversation_id) if mine else None
        return JSONResponse(_shown(found)) if found else _error(404, "conversation not found")

    async def set_starred(request: Request, uid: str) -> Response:
        starred = _bool_param(request, "starred", None)
        if starred is None:
            raise _BadRequest("starred=true or starred=false is required")
        conversation_id = request.path_params["conversation_id"]
        if not await queries().set_starred(uid, conversation_id, starred):
            return _error(404, "conversation not found")
        return JSONResponse({"status": "Ok", "conversation": _shown(await queries().get(uid, conversation_id))})

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

    async def app_webhook(request: Request, uid: str) -> Response:
        """Upstream's ``/v1/users/developer/webhook/{type}``: GET → ``{"url"}`` (for
        audio_bytes ``"url,seconds"``, as the app splits it), POST ``{"url"}`` → ``{"status"}``;
        an empty URL (or ``","``) removes the setting. The SSRF rules are ``set_webhook``'s."""
        kind = request.path_params["kind"]
        if kind not in KINDS:
            return _error(404, f"webhook type {kind!r} is not served by Harken: use one of {', '.join(KINDS)}")
        service = get_service()
        if request.method == "GET":
            setting = await service.get_webhook(uid, kind) or await queries().disabled_webhook(uid, kind)
            return JSONResponse({"url": _app_url(setting)})
        url = (await _json_object(request)).get("url")
        if not isinstance(url, str):
            raise _BadRequest('the body must be {"url": "https://…"}')
        if url.strip() in ("", ","):
            await service.delete_webhook(uid, kind)
            await queries().forget_disabled_webhook(uid, kind)
            return JSONResponse({"status": "ok"})
        try:
            await service.set_webhook(uid, kind, url)
        except WebhookSettingError as exc:
            return _error(422, str(exc))
        await queries().forget_disabled_webhook(uid, kind)
        return JSONResponse({"status": "ok"})

    async def app_webhook_switch(request: Request, uid: str) -> Response:
        kind, action = request.path_params["kind"], request.path_params["action"]
        if kind not in KINDS or action not in ("enable", "disable"):
            return _error(404, "not found")
        switch = queries().enable_webhook if action == "enable" else queries().disable_webhook
        await switch(uid, kind, now=get_service().clock())
        return JSONResponse({"status": "ok"})

    async def app_webhooks_status(request: Request, uid: str) -> Response:
        service = get_service()
        status = {kind: await service.get_webhook(uid, kind) is not None for kind in KINDS}
        return JSONResponse(status | {"day_summary": False})     # a kind Harken does not deliver

    async def geolocation(request: Request, uid: str) -> Response:
        """``PATCH /v1/users/geolocation``: the user's last location is kept (one row per user);
        it is not yet attached to conversations."""
        location = _geolocation(await _json_object(request))
        await queries().save_geolocation(uid, location, now=get_service().clock())
        return JSONResponse({"status": "ok"})

    webhook_methods = ["GET", "PUT", "POST", "DELETE"]        # POST too: the Omi app sets webhooks with POST
    return [
        Route("/v1/conversations", authenticated(list_conversations), methods=["GET"]),
        Route("/v1/conversations", authenticated(process_now), methods=["POST"]),
        Route("/v1/conversations/{conversation_id}", authenticated(get_conversation), methods=["GET"]),
        Route("/v1/conversations/{conversation_id}/segments/assign-bulk", authenticated(assign_bulk),
              methods=["PATCH"]),
        Route("/v1/conversations/{conversation_id}/starred", authenticated(set_starred), methods=["PATCH"]),
        Route("/v1/users/geolocation", authenticated(geolocation), methods=["PATCH"]),
        Route("/v1/users/developer/webhooks/status", authenticated(app_webhooks_status), methods=["GET"]),
        Route("/v1/users/developer/webhook/{kind}", authenticated(app_webhook), methods=["GET", "POST"]),
        Route("/v1/users/developer/webhook/{kind}/{action}", authenticated(app_webhook_switch), methods=["POST"]),
        Route("/v1/users/developer/webhooks/{kind}", authenticated(webhook), methods=webhook_methods),
    ]


def not_served_route() -> Route:
    """The last route of the app: any other path (the Omi app's chat, apps, memories, …) gets a
    quick JSON 404 without authentication, never a 401 (which makes the app sign out)."""

    async def not_served(request: Request) -> Response:
        log.debug("not served: %s %s", request.method, request.url.path)
        return _error(404, f"{request.url.path} is not served by Harken")

    return Route("/{path:path}", not_served,
                 methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])


def _shown(found: Found, photos: list[dict] | None = None) -> dict:
    return app_conversation(found.conversation, found.segments, starred=found.starred, photos=photos)


def _app_url(setting) -> str:
    if setting is None:
        return ""
    if setting.kind == AUDIO_BYTES and setting.interval_seconds is not None:
        return f"{setting.url},{setting.interval_seconds}"
    return setting.url


async def _json_object(request: Request, *, required: bool = True) -> dict:
    """The body as a JSON object; ``_BadRequest`` if it is not one (an empty body is ``{}``
    unless ``required``)."""
    body = await request.body()
    if len(body) > MAX_JSON_BODY:
        raise _BadRequest(f"the body is larger than {MAX_JSON_BODY} bytes")
    if not body.strip():
        if required:
            raise _BadRequest("a JSON object body is required")
        return {}
    return json_object(body)


def json_object(body: bytes, shape: str = "") -> dict:
    """``body`` parsed as a JSON object; ``_BadRequest`` naming ``shape`` (an example) if not."""
    hint = f": {shape}" if shape else ""
    try:
        payload = parse_json(body)
    except BadJson as exc:
        raise _BadRequest(f"{exc}{hint}") from None
    if not isinstance(payload, dict):
        raise _BadRequest(f"the body must be a JSON object{hint}")
    return payload


def _assignment(payload: dict) -> tuple[list[str], bool, str | None]:
    """``(segment ids, is_user, person_id)`` of an assign-bulk body:
    ``{"segment_ids": […], "assign_type": "is_user" | "person_id", "value": …}``."""
    ids = payload.get("segment_ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise _BadRequest("segment_ids must be a list of segment ids")
    if len(ids) > MAX_ASSIGNED_SEGMENTS:
        raise _BadRequest(f"at most {MAX_ASSIGNED_SEGMENTS} segment_ids per request")
    kind, value = payload.get("assign_type"), payload.get("value")
    if value == "null":
        value = None
    if kind == "is_user":
        if not isinstance(value, (str, bool)) and value is not None:
            raise _BadRequest('value must be "true", "false" or null for assign_type is_user')
        return ids, value not in (None, False, "false", ""), None
    if kind == "person_id":
        if value is not None and (not isinstance(value, str) or not value):
            raise _BadRequest("value must be a person id or null for assign_type person_id")
        return ids, False, value
    raise _BadRequest("Invalid assign type: use is_user or person_id")


def _geolocation(payload: dict) -> dict:
    """Upstream's ``Geolocation`` body: latitude and longitude required, the rest optional."""
    location = {}
    for key, low, high in (("latitude", -90, 90), ("longitude", -180, 180)):
        value = payload.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise _BadRequest(f"{key} must be a number from {low} to {high}")
        location[key] = float(value)
    for key in ("altitude", "accuracy"):
        value = payload.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _BadRequest(f"{key} must be a number or null")
        location[key] = value
    for key in ("address", "google_place_id", "location_type", "time"):
        value = payload.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 1000):
            raise _BadRequest(f"{key} must be a string (at most 1000 characters) or null")
        location[key] = value
    return location


async def _read_payload(request: Request) -> Any:
    """A JSON body, or a plain-text URL (``"https://…"`` / Omi's ``"url,seconds"``)."""
    body = await request.body()
    text = body.decode("utf-8", errors="replace").strip()
    if "json" in request.headers.get("content-type", "") or text[:1] in ('{', '"'):
        try:
            return parse_json(text)
        except BadJson as exc:
            raise _BadRequest(str(exc)) from None
    return text
