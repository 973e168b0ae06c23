"""The two WebSocket routes: ``/v4/listen`` (header auth) and ``/v4/web/listen`` (first-message auth).

Both accept first, so that every refusal can carry a close code and reason the client can act on
(PROTOCOL.md §5), then authenticate, validate the parameters, and hand over to a ``Session``.

With ``max_sessions`` set, a process that already holds that many connections refuses the next
with 1013 ("retry later") right after accept: a node past the load it can carry would make every
stream's segments late, and the client's reconnect reaches another node through the balancer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable

import orjson
from starlette.websockets import WebSocket

from ..logs import bind_session, unbind_session
from . import events
from .auth import AuthError, bearer_token
from .context import Gateway
from .params import ParamError, parse_listen_params
from .session import Session, _truncate

log = logging.getLogger("harken.listen")


def _holding_a_place(endpoint: Callable[[WebSocket], Awaitable[None]]) -> Callable[[WebSocket], Awaitable[None]]:
    """Accept, then run ``endpoint`` holding one of the process's ``max_sessions`` places for the
    connection's whole life, or refuse with 1013 when none is free."""

    @functools.wraps(endpoint)
    async def holding(ws: WebSocket) -> None:
        gateway: Gateway = ws.app.state.gateway
        await ws.accept()
        if not gateway.try_hold_connection():
            gateway.metrics.capacity_refusals.inc()
            limit = gateway.settings.max_sessions
            await _refuse(ws, 1013, f"server at capacity ({limit} sessions): retry later")
            return
        try:
            await endpoint(ws)
        finally:
            gateway.release_connection()

    return holding


@_holding_a_place
async def listen_endpoint(ws: WebSocket) -> None:
    await _serve(ws, bearer_token(ws.headers.get("authorization")))


@_holding_a_place
async def web_listen_endpoint(ws: WebSocket) -> None:
    """Browsers cannot set headers: the token comes in the first text message, within 5 s."""
    gateway: Gateway = ws.app.state.gateway
    try:
        message = await asyncio.wait_for(ws.receive(), gateway.settings.web_auth_timeout)
    except TimeoutError:
        await _refuse(ws, 1008, "Auth timeout")
        return
    token = None
    if message.get("text"):
        try:
            body = orjson.loads(message["text"])
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and body.get("type") == "auth" and isinstance(body.get("token"), str):
            token = body["token"]
    if message["type"] == "websocket.disconnect":
        return
    await _serve(ws, token, web=True)


async def _serve(ws: WebSocket, token: str | None, *, web: bool = False) -> None:
    gateway: Gateway = ws.app.state.gateway
    query = ws.query_params
    try:
        uid = await gateway.authenticator.authenticate(token, query.get("uid"))
    except AuthError as exc:
        if web:
            await _send_quietly(ws, {"type": "auth_response", "success": False})
        await _refuse(ws, exc.close_code, exc.reason)
        return
    if web:
        await _send_quietly(ws, {"type": "auth_response", "success": True})
    try:
        params = parse_listen_params(query, null_provider=gateway.settings.null_provider)
    except ParamError as exc:
        await _refuse(ws, 1008, exc.message, param=exc.param)
        return
    if gateway.draining:
        await _refuse(ws, 1012, "server draining: reconnect")
        return

    session = Session(ws, gateway, uid, params, session_id=uuid.uuid4().hex)
    log_tags = bind_session(session.id, uid)      # every record of this connection's tasks names it
    gateway.sessions.add(session)
    log.info("session open sid=%s uid=%s codec=%s rate=%s lang=%s", session.id, uid, params.codec,
             params.sample_rate, params.language)
    try:
        await session.run()
    finally:
        gateway.sessions.discard(session)
        unbind_session(log_tags)


async def _refuse(ws: WebSocket, code: int, reason: str, *, param: str | None = None) -> None:
    ws.app.state.gateway.metrics.connection_closed(code)
    await _send_quietly(ws, events.error(code, reason, param))
    try:
        await ws.close(code, _truncate(reason))
    except Exception:
        pass


async def _send_quietly(ws: WebSocket, payload: dict) -> None:
    try:
        await ws.send_text(orjson.dumps(payload).decode())
    except Exception:
        pass
