"""An httpx transport that connects only to addresses it has checked (webhook delivery).

``check_url`` resolves a webhook's host and refuses private targets; if httpx then resolved the
name again, a DNS server answering "public" to the check and "127.0.0.1" to the connection
(DNS rebinding) would get a POST to loopback. Here the connection itself resolves through the
deliverer's resolver, checks every answer, and connects to those addresses: what was checked is
what is reached. httpcore still uses the URL's host name for TLS (SNI, certificate check) and
httpx for the ``Host`` header, so virtual hosts and HTTPS work as before.

Environment proxies are ignored (``trust_env=False``): a proxy would connect on our behalf to
wherever the name resolves for it.
"""

from __future__ import annotations

import ipaddress
import typing
from typing import Awaitable, Callable

import httpcore
import httpx

Resolver = Callable[[str, int], Awaitable[list[str]]]
IsAllowed = Callable[[str], bool]


class CheckedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, resolve: Resolver, allowed: IsAllowed) -> None:
        self._resolve = resolve
        self._allowed = allowed
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: typing.Iterable | None = None) -> httpcore.AsyncNetworkStream:
        try:
            addresses = [str(ipaddress.ip_address(host.strip("[]")))]
        except ValueError:
            try:
                addresses = await self._resolve(host, port)
            except (OSError, UnicodeError) as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        refused = [a for a in addresses if not self._allowed(a)]
        if refused or not addresses:
            raise httpcore.ConnectError(f"{host} resolves to a refused address ({', '.join(refused) or 'none'})")
        error: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class CheckedTransport(httpx.AsyncHTTPTransport):
    """``httpx.AsyncHTTPTransport`` whose connection pool connects through ``CheckedBackend``."""

    def __init__(self, resolve: Resolver, allowed: IsAllowed, *, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        # httpx offers no network_backend option; its pool is rebuilt with the same settings.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=CheckedBackend(resolve, allowed),
        )
