"""Integration webhooks: the user's settings, which targets are allowed, and the requests.

Request shapes are those of PROTOCOL §8. Besides the protocol's ``X-Harken-Delivery`` and
``X-Harken-Signature``, audio chunks carry ``X-Harken-Session`` and ``X-Harken-Audio-Offset``
(the chunk's byte offset in the session's audio), so a receiver can file chunks per session and
write each at its place: a redelivered chunk then overwrites itself instead of doubling audio.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import socket
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import orjson

from .model import WebhookSetting, realtime_segment
from .store import OutboxMessage

REALTIME_TRANSCRIPT = "realtime_transcript"
AUDIO_BYTES = "audio_bytes"
MEMORY_CREATED = "memory_created"
KINDS = (REALTIME_TRANSCRIPT, AUDIO_BYTES, MEMORY_CREATED)

AUDIO_SAMPLE_RATE = 16000
DEFAULT_AUDIO_INTERVAL = 5          # seconds, Omi's default
MIN_AUDIO_INTERVAL, MAX_AUDIO_INTERVAL = 1, 300
MAX_URL_LENGTH = 2048

DELIVERY_HEADER = "X-Harken-Delivery"
SIGNATURE_HEADER = "X-Harken-Signature"
SESSION_HEADER = "X-Harken-Session"
AUDIO_OFFSET_HEADER = "X-Harken-Audio-Offset"

Resolver = Callable[[str, int], Awaitable[list[str]]]


class WebhookSettingError(ValueError):
    """The webhook setting or URL is not acceptable; the message says why (safe to show)."""


class UnresolvableHost(WebhookSettingError):
    """The URL's host name does not resolve (now): a reason to refuse a setting, but only a
    reason to retry a delivery, since DNS failures pass."""


# --- settings -----------------------------------------------------------------------------------

def require_kind(kind: str) -> None:
    if kind not in KINDS:
        raise WebhookSettingError(f"unknown webhook kind {kind!r}: use one of {', '.join(KINDS)}")


def parse_setting(kind: str, payload: Any) -> WebhookSetting:
    """A setting from a REST body: ``{"url": …, "interval_seconds": N}``, or a bare string.

    For ``audio_bytes`` the Omi form ``"url,N"`` is accepted too (in the string or in ``url``).
    The URL is only checked for form here; ``check_url`` decides whether it may be reached.
    """
    require_kind(kind)
    interval: Any = None
    if isinstance(payload, str):
        url = payload
    elif isinstance(payload, dict) and isinstance(payload.get("url"), str):
        url = payload["url"]
        interval = payload.get("interval_seconds")
    else:
        raise WebhookSettingError('expected {"url": "https://…"} or a URL string')
    url = url.strip()
    if kind == AUDIO_BYTES:
        head, sep, tail = url.rpartition(",")
        if sep and tail.strip().isdigit():
            if interval is not None:
                raise WebhookSettingError('give the interval either as "url,N" or as interval_seconds, not both')
            url, interval = head.strip(), int(tail)
        if interval is None:
            interval = DEFAULT_AUDIO_INTERVAL
        if isinstance(interval, bool) or not isinstance(interval, int) or not (
                MIN_AUDIO_INTERVAL <= interval <= MAX_AUDIO_INTERVAL):
            raise WebhookSettingError(
                f"interval_seconds must be a whole number from {MIN_AUDIO_INTERVAL} to {MAX_AUDIO_INTERVAL}")
    elif interval is not None:
        raise WebhookSettingError(f"interval_seconds applies only to {AUDIO_BYTES}")
    _check_form(url)
    return WebhookSetting(kind=kind, url=url, interval_seconds=interval)


def _check_form(url: str) -> None:
    if len(url) > MAX_URL_LENGTH:
        raise WebhookSettingError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() for ch in url):
        raise WebhookSettingError("the URL contains white space")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookSettingError("the URL must start with http:// or https://")
    if not parts.hostname:
        raise WebhookSettingError("the URL has no host")
    try:
        parts.port
    except ValueError:
        raise WebhookSettingError("the URL's port is not a number from 0 to 65535") from None


# --- allowed targets ----------------------------------------------------------------------------

async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


# IPv6 forms that carry an IPv4 address in their last 32 bits and reach it: NAT64 (well-known
# and local-use prefixes) and the deprecated IPv4-compatible form. 6to4 and Teredo carry theirs
# elsewhere (ipaddress finds them). 64:ff9b::7f00:1 is "global" to ipaddress, yet reaches
# 127.0.0.1 on a host with a NAT64 gateway.
_EMBEDDING_IPV4_IN_LOW_BITS = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96"))


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if any(ip in network for network in _EMBEDDING_IPV4_IN_LOW_BITS):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        embedded = [e for e in embedded if e is not None]
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif embedded and not all(is_public(str(e)) for e in embedded):
            return False
    # is_global excludes loopback, private, link-local (cloud metadata at 169.254.169.254),
    # shared address space, documentation and reserved ranges.
    return ip.is_global and not ip.is_multicast


async def check_url(url: str, *, allow_private: bool, resolver: Resolver | None = None) -> None:
    """Refuse a URL that is malformed or, unless ``allow_private``, that reaches a loopback,
    private or link-local address, directly or through any address its host name resolves to
    (a server must not become a way into the network it sits in)."""
    _check_form(url)
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await (resolver or system_resolver)(host, port)
        except (OSError, UnicodeError):
            raise UnresolvableHost(f"the host {host!r} cannot be resolved") from None
        if not addresses:
            raise UnresolvableHost(f"the host {host!r} cannot be resolved")
    for address in addresses:
        if not is_public(address):
            raise WebhookSettingError(
                f"the URL reaches a private, loopback or link-local address ({address}); "
                "such targets are refused unless the server sets webhook_allow_private")


def safe_target(url: str) -> str:
    """scheme://host[:port] of a URL, for logs: paths and queries may hold the user's secrets."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"


# --- requests -----------------------------------------------------------------------------------

def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(sign(secret, body), header)


def realtime_message(uid: str, session_id: str, conversation_id: str, changed: list[dict]) -> OutboxMessage:
    """``POST {url}?session_id=&uid=`` with the changed segments, in order per conversation."""
    return OutboxMessage(
        uid=uid, kind=REALTIME_TRANSCRIPT, ordering_key=f"{REALTIME_TRANSCRIPT}:{conversation_id}",
        body=orjson.dumps([realtime_segment(s) for s in changed]),
        params={"session_id": session_id, "uid": uid})


def audio_message(uid: str, session_id: str, offset: int, pcm: bytes) -> OutboxMessage:
    """``POST {url}?sample_rate=16000&uid=`` with raw PCM16, in order per session."""
    return OutboxMessage(
        uid=uid, kind=AUDIO_BYTES, ordering_key=f"{AUDIO_BYTES}:{session_id}", body=pcm,
        content_type="application/octet-stream",
        params={"sample_rate": AUDIO_SAMPLE_RATE, "uid": uid},
        headers={SESSION_HEADER: session_id, AUDIO_OFFSET_HEADER: str(offset)})


def memory_message(uid: str, conversation: dict) -> OutboxMessage:
    """``POST {url}?uid=`` with the conversation object (PROTOCOL §7)."""
    return OutboxMessage(
        uid=uid, kind=MEMORY_CREATED, ordering_key=f"{MEMORY_CREATED}:{conversation['id']}",
        body=orjson.dumps(conversation), params={"uid": uid})
