"""The browser page: ``GET /`` (live transcript), its static files, and ``POST /v1/local/token``.

The page is plain HTML/JS in ``static/`` (no build step). It streams the microphone to
``/v4/web/listen`` and authenticates with the first message, so it needs a token:

- With ``auth=local`` on a loopback-only server, a person at this machine may ask the server for
  a short-lived token (``POST /v1/local/token``). Anyone who can reach a loopback-bound server
  from this machine could run ``harken token`` anyway (same user, same data folder), so this
  grants nothing new; everywhere else the endpoint refuses and the page asks for a pasted token.
- "Loopback" is checked three ways, because each alone can be fooled: the server's bind address
  (not reachable from elsewhere), the peer address (a local process), and the ``Host`` header (a
  DNS-rebinding page in the user's browser sends its own host name, not ``localhost``). A request
  that came through a reverse proxy (forwarding headers) is refused too: behind a proxy on this
  machine every remote visitor would look local.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import Settings, is_loopback
from .auth import mint_local_token

log = logging.getLogger("harken.web")

STATIC_DIR = Path(__file__).parent / "static"

WEB_TOKEN_TTL = 600             # seconds: long enough for a session to start, short if it leaks
DEFAULT_WEB_UID = "web-user"
_UID = re.compile(r"^[A-Za-z0-9._@:+-]{1,128}$")
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")

# The page loads only its own files and talks only to its own origin.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
                               "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def web_routes(settings: Settings) -> list[BaseRoute]:
    """Routes of the page; ``settings`` decides whether the token endpoint may mint."""

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    async def local_token(request: Request) -> Response:
        refusal = _local_token_refusal(settings, request)
        if refusal:
            return JSONResponse({"error": refusal}, status_code=403)
        uid = await _requested_uid(request)
        if uid is None:
            return JSONResponse({"error": "uid must be 1-128 letters, digits or ._@:+-"}, status_code=400)
        token = mint_local_token(settings, uid, WEB_TOKEN_TTL)
        log.info("minted a %ss web token for uid=%s", WEB_TOKEN_TTL, uid)
        return JSONResponse({"token": token, "uid": uid, "expires_in": WEB_TOKEN_TTL},
                            headers={"Cache-Control": "no-store"})

    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Route("/v1/local/token", local_token, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]


def _local_token_refusal(settings: Settings, request: Request) -> str | None:
    """Why this request may not get a token from the server itself, or None if it may."""
    paste = "paste a token from `harken token` into the page instead"
    if settings.auth != "local":
        return f"tokens are minted here only with auth=local (this server uses auth={settings.auth})"
    if not is_loopback(settings.host):
        return f"the server is bound to {settings.host}, not a loopback address: {paste}"
    client = request.client.host if request.client else ""
    if not _is_loopback_address(client):
        return f"only a client on this machine (loopback) may ask for a token: {paste}"
    if any(name in request.headers for name in _FORWARDING_HEADERS):
        return f"the request came through a proxy: {paste}"
    if not is_loopback(_host_name(request.headers.get("host", ""))):
        return f"open the page as http://localhost or http://127.0.0.1 to get a token: {paste}"
    return None


async def _requested_uid(request: Request) -> str | None:
    """The ``uid`` of the JSON body, ``web-user`` when absent, None when unusable."""
    raw = await request.body()
    if not raw.strip():
        return DEFAULT_WEB_UID
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    uid = body.get("uid") if isinstance(body, dict) else None
    if uid is None or uid == "":
        return DEFAULT_WEB_UID
    return uid if isinstance(uid, str) and _UID.match(uid) else None


def _is_loopback_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)     # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _host_name(host_header: str) -> str:
    """``127.0.0.1:8000`` → ``127.0.0.1``, ``[::1]:8000`` → ``::1``, ``localhost`` → ``localhost``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
