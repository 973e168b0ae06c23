"""A stand-in for Google's token-signing certificate endpoint, plus a Firebase ID-token minter.

Google serves ``{kid: "<PEM X.509 certificate>"}`` at
``https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com``
with a long ``Cache-Control: max-age``; Firebase ID tokens are RS256 JWTs signed by the key of
one of those certificates. This fake does the same on 127.0.0.1, so firebase-admin runs its real
checks (HTTP fetch, caching, signature, claims) against it when Harken is started with
``firebase_certs_url=server.url``.

    with FirebaseCertServer() as certs:
        settings = Settings(auth="firebase", firebase_project_id=certs.project_id,
                            firebase_certs_url=certs.url)
        token = certs.mint("alice")                 # valid
        certs.mint("alice", expired=True)           # → close 4001
        certs.stop()                                # certificates unreachable → close 1013

In a test module, ``from tests.fakes.firebase_certs import firebase_cert_server`` gives a
fixture: call it (``firebase_cert_server(delay=0.5)``) to get a started server, stopped at teardown.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

CERTS_PATH = "/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
_OWN_KID = object()   # default for mint(kid=...): the server's own key id


def make_signing_key(common_name: str = "harken-test-securetoken") -> tuple[rsa.RSAPrivateKey, str]:
    """An RSA-2048 key and a self-signed certificate for it (PEM), valid for ten years."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    return key, cert.public_bytes(serialization.Encoding.PEM).decode()


class FirebaseCertServer:
    """Serves one signing certificate the way Google does and mints tokens signed by it.

    ``delay`` makes every certificate request take that many seconds (a slow network);
    ``fetches`` counts the requests served.
    """

    def __init__(self, project_id: str = "demo-harken", *, delay: float = 0.0, kid: str = "test-key-1") -> None:
        self.project_id = project_id
        self.kid = kid
        self.delay = delay
        self.fetches = 0
        self._lock = threading.Lock()
        self.key, self.cert_pem = make_signing_key()
        self._other_key: rsa.RSAPrivateKey | None = None
        self._httpd: ThreadingHTTPServer | None = None

    # --- the endpoint -------------------------------------------------------------------
    def start(self) -> "FirebaseCertServer":
        body = json.dumps({self.kid: self.cert_pem}).encode()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.fetches += 1
                if server.delay:
                    time.sleep(server.delay)
                if self.path != CERTS_PATH:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Cache-Control", "public, max-age=3600")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:   # keep test output quiet
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="fake-firebase-certs", daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket: later fetches get "connection refused"."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{CERTS_PATH}"

    def __enter__(self) -> "FirebaseCertServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- tokens -------------------------------------------------------------------------
    def mint(
        self,
        uid: str = "user-1",
        *,
        expired: bool = False,
        iat_in_future: bool = False,
        audience: str | None = None,
        issuer: str | None = None,
        bad_signature: bool = False,
        alg_none: bool = False,
        kid: Any = _OWN_KID,
        ttl: int = 3600,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A Firebase-shaped ID token for ``uid``; each knob breaks one thing.

        ``audience``/``issuer`` override the project's; ``bad_signature`` signs with a key the
        server does not publish (same kid); ``alg_none`` leaves it unsigned; ``kid=None`` omits
        the key id, ``kid="x"`` names an unknown one; ``claims`` adds or replaces claims.
        """
        now = int(time.time())
        iat = now + 3600 if iat_in_future else now - 7200 if expired else now
        payload = {
            "iss": issuer or f"https://securetoken.google.com/{self.project_id}",
            "aud": audience or self.project_id,
            "sub": uid,
            "user_id": uid,
            "auth_time": iat,
            "iat": iat,
            "exp": now - 3600 if expired else iat + ttl,
            "firebase": {"identities": {}, "sign_in_provider": "custom"},
            **(claims or {}),
        }
        headers = {} if kid is None else {"kid": self.kid if kid is _OWN_KID else kid}
        if alg_none:
            return jwt.encode(payload, None, algorithm="none", headers=headers)
        return jwt.encode(payload, self._signing_key(bad_signature), algorithm="RS256", headers=headers)

    def _signing_key(self, other: bool) -> rsa.RSAPrivateKey:
        if not other:
            return self.key
        if self._other_key is None:
            self._other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._other_key


@pytest.fixture
def firebase_cert_server() -> Iterator[Any]:
    """Factory fixture: ``firebase_cert_server(project_id=..., delay=...)`` → a started
    ``FirebaseCertServer``; every server made is stopped at teardown."""
    servers: list[FirebaseCertServer] = []

    def make(project_id: str = "demo-harken", **kwargs: Any) -> FirebaseCertServer:
        server = FirebaseCertServer(project_id, **kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
