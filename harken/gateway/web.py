"""The browser page: ``GET /`` (live transcript), its static files, and ``POST /v1/local/token``.

The page is plain HTML/JS in ``static/`` (no build step). It streams the microphone to
``/v4/web/listen`` and authenticates with the first message, so it needs a token:

- With ``auth=local`` on a loopback-only server, the page may ask the server for a short-lived
  token (``POST /v1/local/token``), but only with the server's pairing secret in the
  ``X-Harken-Pairing`` header. Loopback alone proves nothing: another OS user on this machine, or
  anyone whose SSH/kubectl/IDE port-forward opens ``http://localhost``, reaches loopback too. The
  secret is derived from the signing key (so every worker agrees and only who can read the key
  could compute it) and printed in the start banner as ``http://127.0.0.1:PORT/#pair=SECRET``:
  the fragment never reaches a server or a log, the page keeps it for its tab only.
- The endpoint is refused besides off loopback (the server's bind address, the peer address),
  through a reverse proxy (forwarding headers: behind a proxy on this machine every visitor looks
  local), and, by ``guard.py``, to a ``Host`` that is not a loopback name (DNS rebinding) or an
  ``Origin`` that is not the page's own.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import re
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from ..config import Settings, is_loopback
from .auth import ensure_local_signing_key, mint_local_token
from .guard import host_name

log = logging.getLogger("harken.web")

STATIC_DIR = Path(__file__).parent / "static"

WEB_TOKEN_TTL = 600             # seconds: long enough for a session to start, short if it leaks
DEFAULT_WEB_UID = "web-user"
_UID = re.compile(r"^[A-Za-z0-9._@:+-]{1,128}$")
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")
PAIRING_HEADER = "x-harken-pairing"
_PAIRING_CONTEXT = b"harken web pairing v1"

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
    if not is_loopback(client):
        return f"only a client on this machine (loopback) may ask for a token: {paste}"
    if any(name in request.headers for name in _FORWARDING_HEADERS):
        return f"the request came through a proxy: {paste}"
    if not is_loopback(host_name(request.headers.get("host", ""))):
        return f"open the page as http://localhost or http://127.0.0.1 to get a token: {paste}"
    if not hmac.compare_digest(request.headers.get(PAIRING_HEADER, "").encode(),
                               pairing_secret(settings).encode()):
        return f"open the page with the address the server printed (…/#pair=…), or {paste}"
    return None


def pairing_secret(settings: Settings) -> str:
    """The secret the page must show to get a token (see the module docstring)."""
    return _pairing_secret(ensure_local_signing_key(settings.data_dir))


@functools.lru_cache(maxsize=4)
def _pairing_secret(key) -> str:
    # A PKCS#1 v1.5 signature is deterministic: signing a fixed context gives every worker the
    # same value, only a holder of the key can make it, and the key itself is never exported.
    signature = key.sign(_PAIRING_CONTEXT, padding.PKCS1v15(), hashes.SHA256())
    return base64.urlsafe_b64encode(hashlib.sha256(signature).digest()[:24]).decode()


def page_address(settings: Settings, base: str) -> str:
    """The page's address with the pairing secret, for the start banner."""
    return f"{base}/#pair={pairing_secret(settings)}"


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
