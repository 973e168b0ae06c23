"""One ASGI middleware in front of every route, present and future: what no handler should have
to remember.

- Body limit: a request body larger than ``max_body_bytes`` (or a larger limit given for a path
  prefix, e.g. audio uploads) is answered 413, from its ``Content-Length`` or, when it has none,
  as soon as the bytes read pass the limit; a handler never holds more.
- JSON nested past the parser's depth: ``parse_json`` (orjson, depth 1024) answers 400; a
  handler that parses with something that raises ``RecursionError`` still gets 400, not 500.
- Browsers: where the caller proves nothing (``auth=none`` trusts a uid parameter; the local
  token endpoint is token-less; ``/metrics`` without a ``metrics_token`` on a loopback bind),
  a request is refused unless its ``Host`` names this machine (a DNS-rebinding page sends its
  own host name) and any ``Origin`` it carries is this server's own loopback origin (a foreign
  page's ``fetch``, form post or WebSocket always carries its origin). Clients that are not
  browsers (a Prometheus scraping ``127.0.0.1``) send a loopback ``Host`` and no ``Origin`` and
  are unaffected.
- Every response says ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import orjson

from ..config import Settings, is_loopback

LOCAL_TOKEN_PATH = "/v1/local/token"
METRICS_PATH = "/metrics"
NESTING_REFUSAL = "the JSON body is nested too deeply"
_NOSNIFF = (b"x-content-type-options", b"nosniff")


class BadJson(ValueError):
    """The body is not JSON (or nests too deeply); the message is safe to show."""


def parse_json(raw: bytes | str) -> Any:
    """JSON with a bounded depth: orjson refuses nesting past 1024 with a decode error."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadJson(NESTING_REFUSAL if "recursion" in str(exc).lower() else "the body is not valid JSON") from None


def host_name(host_header: str) -> str:
    """``127.0.0.1:8000`` → ``127.0.0.1``, ``[::1]:8000`` → ``::1``, ``localhost`` → ``localhost``."""
    host = host_header.strip().lower().rstrip(".")
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class GuardMiddleware:
    def __init__(self, app, settings: Settings, body_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.body_limits = sorted((body_limits or {}).items(), key=lambda item: -len(item[0]))

    async def __call__(self, scope, receive, send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._browser_refusal(scope)
        if refusal is not None:
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008, "reason": refusal})
            else:
                await _answer(send, 403, refusal)
            return
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        await self._http(scope, receive, send)

    # -- browsers -------------------------------------------------------------------------
    def _browser_refusal(self, scope) -> str | None:
        if self.settings.auth != "none" and not self._token_less(scope["path"]):
            return None
        headers = _headers(scope)
        if not is_loopback(host_name(headers.get("host", ""))):
            return "this server answers only requests addressed to localhost"
        origin = headers.get("origin")
        if origin is not None and not _own_origin(origin, headers.get("host", "")):
            return "requests from other web pages are refused"
        return None

    def _token_less(self, path: str) -> bool:
        """A route that a caller reaches without proving anything, on a server only this
        machine should reach. ``/metrics`` without a token on a non-loopback bind is open to
        whoever reaches the port (as the start-up warning says): Prometheus there scrapes by
        whatever name the network gives the node, so its Host cannot be checked."""
        if path == LOCAL_TOKEN_PATH:
            return True
        return (path.rstrip("/") == METRICS_PATH and not self.settings.metrics_token
                and is_loopback(self.settings.host))

    # -- bodies ---------------------------------------------------------------------------
    def _limit(self, path: str) -> int:
        for prefix, limit in self.body_limits:
            if path.startswith(prefix):
                return max(limit, self.settings.max_body_bytes)
        return self.settings.max_body_bytes

    async def _http(self, scope, receive, send) -> None:
        limit = self._limit(scope["path"])
        declared = _headers(scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, f"the body is larger than {limit} bytes")
            return
        state = {"read": 0, "over": False, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > limit:
                    state["over"] = True
                    raise _BodyTooLarge()
            return message

        async def marked_send(message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = list(message.get("headers", []))
                if not any(name.lower() == _NOSNIFF[0] for name, _ in headers):
                    headers.append(_NOSNIFF)
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, limited_receive, marked_send)
        except (_BodyTooLarge, RecursionError) as exc:
            if state["started"]:
                raise
            if isinstance(exc, _BodyTooLarge) or state["over"]:
                await _answer(send, 413, f"the body is larger than {limit} bytes")
            else:
                await _answer(send, 400, NESTING_REFUSAL)


class _BodyTooLarge(Exception):
    pass


def _headers(scope) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}


def _own_origin(origin: str, host_header: str) -> bool:
    """The Origin is this server's own page: a loopback host and the same host:port as Host."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return is_loopback(parts.hostname) and parts.netloc == host_header.strip().lower()


async def _answer(send, status: int, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            _NOSNIFF]})
    await send({"type": "http.response.body", "body": body})
