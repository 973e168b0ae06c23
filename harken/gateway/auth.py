"""Who is on the other end of a connection: bearer token in, uid out.

Three modes, chosen by ``Settings.auth``:

- ``local``: RS256 tokens minted by ``harken token`` with a key the server keeps in its data
  folder. Verified on the event loop with PyJWT (a cached public key makes that ~70 µs).
- ``firebase``: Firebase ID tokens checked by firebase-admin's ``verify_id_token``. That call
  blocks (an HTTP fetch of Google's certificates on a cold cache), so it runs in a small
  dedicated thread pool, never on the loop, and never queued behind other blocking work.
- ``none``: development only; trusts the ``uid`` query parameter (``Settings.validate`` refuses
  it off loopback).

Every failure is an ``AuthError`` carrying the WebSocket close code of PROTOCOL.md §5 and a
short reason that fits a close frame and never contains the token.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import firebase_admin
import google.auth.credentials
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from firebase_admin import _token_gen
from firebase_admin import auth as firebase_auth
from firebase_admin import credentials as firebase_credentials
from firebase_admin import exceptions as firebase_exceptions

from harken.config import Settings

log = logging.getLogger(__name__)

# Close codes (PROTOCOL.md §5).
POLICY_VIOLATION = 1008     # missing/invalid token, uid mismatch
TRY_AGAIN_LATER = 1013      # auth backend unavailable
TOKEN_EXPIRED = 4001        # refresh the token and reconnect
SIGN_IN_AGAIN = 4004        # revoked token, disabled or deleted user

LOCAL_ISSUER = "harken-local"
LOCAL_AUDIENCE = "harken"
LOCAL_KEY_FILE = Path("auth") / "local_signing_key.pem"
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "aud", "iss"]

# Google's clock and ours may differ by a few seconds; without slack a fresh token is
# refused as "used too early". firebase-admin allows up to 60.
FIREBASE_CLOCK_SKEW_SECONDS = 5
FIREBASE_VERIFY_THREADS = 4

_MAX_REASON_BYTES = 120      # a close frame's reason must stay under 123 bytes
_BYTES_REPR = re.compile(r"b'[^']*'|b\"[^\"]*\"")


class AuthError(Exception):
    """Authentication failed; close the connection with ``close_code`` and ``reason``."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.close_code} {self.reason}"


class Authenticator(Protocol):
    mode: str

    async def authenticate(self, token: str | None, claimed_uid: str | None = None) -> str:
        """Return the uid the token proves, or raise ``AuthError``."""
        ...

    async def aclose(self) -> None: ...


def build_authenticator(settings: Settings) -> Authenticator:
    # Validate again: a Settings built directly (not through from_env) must not bypass the
    # loopback rule of auth=none or the emulator guard of auth=firebase.
    settings.validate()
    if settings.auth == "local":
        return LocalAuthenticator(settings)
    if settings.auth == "firebase":
        return FirebaseAuthenticator(settings)
    return TrustingAuthenticator()


def bearer_token(authorization_header: str | None) -> str | None:
    """``"Bearer x"`` → ``"x"`` (scheme case-insensitive); anything else → None."""
    if not authorization_header:
        return None
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        return None
    return token


# --- shared rules --------------------------------------------------------------------------

def _require_token(token: str | None) -> str:
    if not token:
        raise AuthError(POLICY_VIOLATION, "missing token")
    return token


def _check_claimed_uid(uid: str, claimed_uid: str | None) -> str:
    if claimed_uid and claimed_uid != uid:
        raise AuthError(POLICY_VIOLATION, "uid mismatch: the uid parameter is not the token's user")
    return uid


def _short_reason(prefix: str, detail: str, token: str | None) -> str:
    """``prefix: first sentence of detail``, with the token cut out, within the byte budget.

    Library messages may quote the token (firebase-admin's "Illegal ID token provided: …")
    and run to several sentences with doc links; a close reason must be short and secret-free.
    """
    detail = _BYTES_REPR.sub("<redacted>", detail)   # how the JWT libraries quote token parts
    if token:
        for part in sorted({token, *token.split(".")}, key=len, reverse=True):
            if part == token or len(part) >= 8:
                detail = detail.replace(part, "<redacted>")
    detail = detail.split(". ", 1)[0].strip().rstrip(".")
    reason = f"{prefix}: {detail}" if detail else prefix
    return reason.encode()[:_MAX_REASON_BYTES].decode(errors="ignore")


# --- local mode ----------------------------------------------------------------------------

def ensure_local_signing_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """Load ``<data_dir>/auth/local_signing_key.pem``, creating it (mode 0600) on first use.

    Creation is race-free across processes: the key is written in full to a private temporary
    file, then hard-linked to its final name, which fails if another process got there first;
    the loser then loads the winner's key. No reader ever sees a half-written file.
    """
    path = Path(data_dir) / LOCAL_KEY_FILE
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                log.info("created local signing key %s", path)
                return key
            except FileExistsError:
                pass        # another process won the race: use its key
        finally:
            tmp.unlink(missing_ok=True)
    return _load_signing_key(path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_signing_key(path: Path, mtime_ns: int):
    """The RSA signing key in ``path`` (the type ``ensure_local_signing_key`` returns).

    Loading (and checking) an RSA key costs ~35 ms, a signature ~1 ms: keep what was loaded,
    keyed by the file's modification time so a replaced key file is read again."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path} does not hold an RSA signing key")
    return key


def key_id(public_key: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint: names the key in the token header, so a token from another
    key (e.g. after the data folder was reset) is reported as such."""
    numbers = public_key.public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()

    canonical = json.dumps({"e": b64(numbers.e), "kty": "RSA", "n": b64(numbers.n)},
                           separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def mint_local_token(settings: Settings, uid: str, ttl: int | None = None) -> str:
    """A token that ``auth=local`` accepts for ``uid``, valid ``ttl`` seconds
    (default ``settings.local_token_ttl``)."""
    if not uid:
        raise ValueError("uid must be a non-empty string")
    ttl = settings.local_token_ttl if ttl is None else ttl
    if ttl <= 0:
        raise ValueError("ttl must be positive")
    key = ensure_local_signing_key(settings.data_dir)
    now = int(time.time())
    claims = {"iss": LOCAL_ISSUER, "aud": LOCAL_AUDIENCE, "sub": uid, "iat": now, "exp": now + ttl}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": key_id(key.public_key())})


class LocalAuthenticator:
    mode = "local"

    def __init__(self, settings: Settings) -> None:
        self._public_key = ensure_local_signing_key(settings.data_dir).public_key()
        self._kid = key_id(self._public_key)

    async def authenticate(self, token: str | None, claimed_uid: str | None = None) -> str:
        token = _require_token(token)
        try:
            if jwt.get_unverified_header(token).get("kid", self._kid) != self._kid:
                raise AuthError(POLICY_VIOLATION, "invalid token: signed by another key")
            claims = jwt.decode(token, self._public_key, algorithms=["RS256"], audience=LOCAL_AUDIENCE,
                                issuer=LOCAL_ISSUER, options={"require": _REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError:
            raise AuthError(TOKEN_EXPIRED, "token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(POLICY_VIOLATION, _short_reason("invalid token", str(exc), token)) from None
        uid = claims["sub"]
        if not isinstance(uid, str) or not uid:
            raise AuthError(POLICY_VIOLATION, "invalid token: empty subject")
        return _check_claimed_uid(uid, claimed_uid)

    async def aclose(self) -> None:
        pass


# --- firebase mode -------------------------------------------------------------------------

class _AnonymousCredential(firebase_credentials.Base):
    """Verifying ID tokens needs only public certificates: no Google credential, no ADC lookup."""

    def get_credential(self):
        return google.auth.credentials.AnonymousCredentials()


# firebase-admin reads the module constant ID_TOKEN_CERT_URI once, when an auth Client is built
# (no public option exists). Authenticators patch it around that moment, one at a time.
_cert_url_lock = threading.Lock()


def _new_firebase_client(app: firebase_admin.App, certs_url: str) -> firebase_auth.Client:
    if not certs_url:
        return firebase_auth.Client(app)
    if not hasattr(_token_gen, "ID_TOKEN_CERT_URI"):
        raise RuntimeError("firebase_admin._token_gen.ID_TOKEN_CERT_URI is gone: this firebase-admin "
                           "cannot honour firebase_certs_url (harken needs firebase-admin 7.x)")
    with _cert_url_lock:
        default = _token_gen.ID_TOKEN_CERT_URI
        _token_gen.ID_TOKEN_CERT_URI = certs_url
        try:
            client = firebase_auth.Client(app)
        finally:
            _token_gen.ID_TOKEN_CERT_URI = default
    return client


def auth_error_from_firebase(exc: Exception, token: str | None = None) -> AuthError:
    """Map a firebase-admin verification error to a close code (PROTOCOL.md §5).

    Order matters: expired and revoked tokens are subclasses of InvalidIdTokenError, and a
    certificate fetch failure is our fault (retryable), not a bad token.
    """
    if isinstance(exc, firebase_auth.ExpiredIdTokenError):
        return AuthError(TOKEN_EXPIRED, "token expired")
    if isinstance(exc, firebase_auth.RevokedIdTokenError):
        return AuthError(SIGN_IN_AGAIN, "token revoked")
    if isinstance(exc, firebase_auth.UserDisabledError):
        return AuthError(SIGN_IN_AGAIN, "user disabled")
    if isinstance(exc, firebase_auth.UserNotFoundError):
        return AuthError(SIGN_IN_AGAIN, "user not found")
    if isinstance(exc, (firebase_auth.InvalidIdTokenError, ValueError)):
        return AuthError(POLICY_VIOLATION, _short_reason("invalid token", str(exc), token))
    if isinstance(exc, firebase_exceptions.FirebaseError):   # CertificateFetchError included
        return AuthError(TRY_AGAIN_LATER, "auth backend unavailable, retry later")
    raise TypeError(f"not a firebase verification error: {type(exc).__name__}") from exc


class FirebaseAuthenticator:
    mode = "firebase"

    def __init__(self, settings: Settings) -> None:
        # A named app per authenticator: no clash with the default app or with other
        # authenticators (tests, several servers in one process), each with its own cert cache.
        self._app = firebase_admin.initialize_app(
            _AnonymousCredential(),
            options={"projectId": settings.firebase_project_id, "httpTimeout": settings.firebase_http_timeout},
            name=f"harken-auth-{uuid.uuid4().hex}",
        )
        self._client = _new_firebase_client(self._app, settings.firebase_certs_url)
        self._executor = ThreadPoolExecutor(FIREBASE_VERIFY_THREADS, thread_name_prefix="harken-firebase-auth")

    async def authenticate(self, token: str | None, claimed_uid: str | None = None) -> str:
        token = _require_token(token)
        verify = functools.partial(self._client.verify_id_token, token,
                                   clock_skew_seconds=FIREBASE_CLOCK_SKEW_SECONDS)
        try:
            claims = await asyncio.get_running_loop().run_in_executor(self._executor, verify)
        except (firebase_exceptions.FirebaseError, ValueError) as exc:
            error = auth_error_from_firebase(exc, token)
            if error.close_code == TRY_AGAIN_LATER:
                log.warning("firebase token check failed on our side: %s",
                            _short_reason(type(exc).__name__, str(exc), token))
            raise error from None
        return _check_claimed_uid(claims["uid"], claimed_uid)

    async def aclose(self) -> None:
        if self._app is None:
            return
        # Don't wait for in-flight checks (a cold fetch may last httpTimeout); they finish alone.
        self._executor.shutdown(wait=False, cancel_futures=True)
        firebase_admin.delete_app(self._app)
        self._app = None


# --- none mode -----------------------------------------------------------------------------

class TrustingAuthenticator:
    """auth=none: the ``uid`` query parameter is believed; any token is ignored."""

    mode = "none"

    async def authenticate(self, token: str | None, claimed_uid: str | None = None) -> str:
        if not claimed_uid:
            raise AuthError(POLICY_VIOLATION, "missing uid parameter (auth=none)")
        return claimed_uid

    async def aclose(self) -> None:
        pass
