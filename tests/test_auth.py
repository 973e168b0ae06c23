"""Gateway authentication with real keys and real signatures: local RS256 tokens, Firebase ID
tokens checked by firebase-admin against a loopback certificate server, and auth=none."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import firebase_admin
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from firebase_admin import _token_gen
from firebase_admin import auth as firebase_auth

from harken.config import Settings
from harken.gateway.auth import (
    LOCAL_KEY_FILE,
    AuthError,
    auth_error_from_firebase,
    bearer_token,
    build_authenticator,
    ensure_local_signing_key,
    key_id,
    mint_local_token,
)
from tests.fakes.firebase_certs import FirebaseCertServer, firebase_cert_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(20)

GOOGLE_CERTS_URL = _token_gen.ID_TOKEN_CERT_URI


async def rejected(authenticator, token, code, claimed_uid=None) -> AuthError:
    """Assert the token is refused with ``code`` and a close reason fit for the wire."""
    with pytest.raises(AuthError) as caught:
        await authenticator.authenticate(token, claimed_uid)
    error = caught.value
    assert error.close_code == code, error.reason
    assert 0 < len(error.reason.encode()) < 123
    if token:
        assert token not in error.reason
    return error


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("header, token", [
    ("Bearer abc.def.ghi", "abc.def.ghi"),
    ("bearer  abc", "abc"),
    ("Basic abc", None),
    ("Bearer", None),
    ("Bearer ", None),
    ("Bearer a b", None),
    ("", None),
    (None, None),
])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


# --- local mode -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_settings(tmp_path_factory):
    return Settings(auth="local", data_dir=tmp_path_factory.mktemp("harken-data"), local_token_ttl=600)


@pytest.fixture
async def local_auth(local_settings):
    authenticator = build_authenticator(local_settings)
    yield authenticator
    await authenticator.aclose()


def local_claims(**changes):
    now = int(time.time())
    claims = {"iss": "harken-local", "aud": "harken", "sub": "alice", "iat": now, "exp": now + 600}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def test_local_key_is_created_once_private_and_reused(tmp_path):
    key = ensure_local_signing_key(tmp_path)
    path = tmp_path / LOCAL_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    pem = path.read_bytes()

    again = ensure_local_signing_key(tmp_path)
    assert again.public_key().public_numbers() == key.public_key().public_numbers()
    assert path.read_bytes() == pem
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_local_key_creation_race_yields_one_key(tmp_path):
    starters = 4
    barrier = threading.Barrier(starters, timeout=5)

    def start_server():
        barrier.wait()
        return ensure_local_signing_key(tmp_path).public_key().public_numbers()

    with ThreadPoolExecutor(starters) as pool:
        keys = list(pool.map(lambda _: start_server(), range(starters), timeout=15))
    assert all(k == keys[0] for k in keys)
    on_disk = serialization.load_pem_private_key((tmp_path / LOCAL_KEY_FILE).read_bytes(), None)
    assert on_disk.public_key().public_numbers() == keys[0]
    assert len(list((tmp_path / LOCAL_KEY_FILE).parent.iterdir())) == 1   # no temp files left


async def test_local_token_is_accepted_across_restarts(local_settings, local_auth):
    token = mint_local_token(local_settings, "alice")
    assert await local_auth.authenticate(token) == "alice"
    assert await local_auth.authenticate(token, claimed_uid="alice") == "alice"

    restarted = build_authenticator(local_settings)
    assert await restarted.authenticate(token) == "alice"

    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    key = ensure_local_signing_key(local_settings.data_dir)
    assert header["alg"] == "RS256" and header["kid"] == key_id(key.public_key())
    assert (claims["iss"], claims["aud"], claims["sub"]) == ("harken-local", "harken", "alice")
    assert claims["exp"] - claims["iat"] == local_settings.local_token_ttl
    short = jwt.decode(mint_local_token(local_settings, "alice", ttl=30), options={"verify_signature": False})
    assert short["exp"] - short["iat"] == 30


def forge_local(settings, case):
    key = ensure_local_signing_key(settings.data_dir)
    kid = {"kid": key_id(key.public_key())}
    if case == "expired":
        return jwt.encode(local_claims(iat=int(time.time()) - 700, exp=int(time.time()) - 100), key, "RS256", kid)
    if case == "tampered":
        head, _, sig = mint_local_token(settings, "alice").split(".")
        return ".".join([head, b64url(json.dumps(local_claims(sub="mallory")).encode()), sig])
    if case == "other key":
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return jwt.encode(local_claims(), other, "RS256", {"kid": key_id(other.public_key())})
    if case == "other key, our kid":
        return jwt.encode(local_claims(), rsa.generate_private_key(public_exponent=65537, key_size=2048),
                          "RS256", kid)
    if case == "alg none":
        return jwt.encode(local_claims(), None, "none", kid)
    if case == "HS256 with the public key":
        public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        signing_input = ".".join([b64url(json.dumps({"alg": "HS256", "typ": "JWT", **kid}).encode()),
                                  b64url(json.dumps(local_claims()).encode())])
        return signing_input + "." + b64url(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())
    if case == "wrong issuer":
        return jwt.encode(local_claims(iss="someone-else"), key, "RS256", kid)
    if case == "wrong audience":
        return jwt.encode(local_claims(aud="other-service"), key, "RS256", kid)
    if case == "no exp":
        return jwt.encode(local_claims(exp=None), key, "RS256", kid)
    if case == "garbage":
        return "not.a.jwt"
    raise AssertionError(case)


@pytest.mark.parametrize("case, code", [
    ("expired", 4001),
    ("tampered", 1008),
    ("other key", 1008),
    ("other key, our kid", 1008),
    ("alg none", 1008),
    ("HS256 with the public key", 1008),
    ("wrong issuer", 1008),
    ("wrong audience", 1008),
    ("no exp", 1008),
    ("garbage", 1008),
])
async def test_local_rejects_bad_tokens(local_settings, local_auth, case, code):
    await rejected(local_auth, forge_local(local_settings, case), code)


async def test_local_uid_mismatch(local_settings, local_auth):
    error = await rejected(local_auth, mint_local_token(local_settings, "alice"), 1008, claimed_uid="bob")
    assert "uid mismatch" in error.reason


# --- firebase mode --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs():
    with FirebaseCertServer("demo-harken") as server:
        yield server


def firebase_settings(server, **changes):
    return Settings(auth="firebase", firebase_project_id=server.project_id,
                    firebase_certs_url=server.url, firebase_http_timeout=5.0, **changes)


@pytest.fixture
async def firebase(certs, monkeypatch):
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    authenticator = build_authenticator(firebase_settings(certs))
    yield authenticator
    await authenticator.aclose()


async def test_firebase_accepts_valid_token_and_caches_certificates(certs, firebase):
    before = certs.fetches
    for uid in ("alice", "bob", "carol"):
        assert await firebase.authenticate(certs.mint(uid), claimed_uid=uid) == uid
    assert certs.fetches - before == 1   # Cache-Control honoured: Google is not asked per connection


@pytest.mark.parametrize("knobs, code", [
    ({"expired": True}, 4001),
    ({"audience": "other-project"}, 1008),
    ({"issuer": "https://securetoken.google.com/other-project"}, 1008),
    ({"bad_signature": True}, 1008),
    ({"alg_none": True}, 1008),
    ({"kid": None}, 1008),
    ({"kid": "unknown-key"}, 1008),
    ({"iat_in_future": True}, 1008),
])
async def test_firebase_rejects_bad_tokens(certs, firebase, knobs, code):
    await rejected(firebase, certs.mint("alice", **knobs), code)


@pytest.mark.parametrize("token", ["not.a.jwt", "garbage", "a.b"])
async def test_firebase_rejects_garbage(firebase, token):
    await rejected(firebase, token, 1008)


@pytest.mark.parametrize("mode", ["local", "firebase"])
@pytest.mark.parametrize("token", [None, ""])
async def test_missing_token(mode, token, firebase, local_auth):
    authenticator = {"local": local_auth, "firebase": firebase}[mode]
    error = await rejected(authenticator, token, 1008)
    assert error.reason == "missing token"


async def test_firebase_uid_mismatch(certs, firebase):
    error = await rejected(firebase, certs.mint("alice"), 1008, claimed_uid="bob")
    assert "uid mismatch" in error.reason


async def test_firebase_certificates_unreachable_is_retryable(firebase_cert_server, monkeypatch):
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    server = firebase_cert_server()
    authenticator = build_authenticator(firebase_settings(server))   # fresh: empty cert cache
    token = server.mint("alice")
    server.stop()
    try:
        await rejected(authenticator, token, 1013)
    finally:
        await authenticator.aclose()


async def test_firebase_verification_runs_off_the_event_loop(firebase_cert_server, monkeypatch):
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    server = firebase_cert_server(delay=0.5)
    authenticator = build_authenticator(firebase_settings(server))
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker():
        for _ in range(500):          # bounded: ~5 s at most
            ticks.append(time.monotonic())
            if done.is_set():
                return
            await asyncio.sleep(0.01)

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    try:
        assert await authenticator.authenticate(server.mint("alice")) == "alice"
    finally:
        elapsed = time.monotonic() - started
        done.set()
        await ticking
        await authenticator.aclose()
    assert elapsed >= 0.5                      # it did wait for the slow certificate server
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) >= 20 and max(gaps) < 0.2   # ...while the loop kept running


async def test_authenticators_keep_their_own_certificate_urls(firebase_cert_server, monkeypatch):
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    one, two = firebase_cert_server("demo-one"), firebase_cert_server("demo-two", kid="test-key-1")
    # Built at the same time from two threads: the cert URL patch must not leak between them.
    with ThreadPoolExecutor(2) as pool:
        auth_one, auth_two = pool.map(lambda s: build_authenticator(firebase_settings(s)), (one, two), timeout=10)
    try:
        assert _token_gen.ID_TOKEN_CERT_URI == GOOGLE_CERTS_URL   # restored for everyone else
        assert await auth_one.authenticate(one.mint("alice")) == "alice"
        assert await auth_two.authenticate(two.mint("bob")) == "bob"
        # Same kid, other server's key: only a fetch from the right URL makes this fail.
        wrong_key = two.mint("bob", claims={"aud": "demo-one", "iss": "https://securetoken.google.com/demo-one"})
        await rejected(auth_one, wrong_key, 1008)
        assert one.fetches == 1 and two.fetches == 1
    finally:
        await auth_one.aclose()
        await auth_two.aclose()


async def test_firebase_aclose_releases_its_app(certs, monkeypatch):
    monkeypatch.delenv("FIREBASE_AUTH_EMULATOR_HOST", raising=False)
    before = {app.name for app in firebase_admin._apps.values()}
    authenticator = build_authenticator(firebase_settings(certs))
    assert len(firebase_admin._apps) == len(before) + 1
    await authenticator.aclose()
    await authenticator.aclose()   # idempotent
    assert {app.name for app in firebase_admin._apps.values()} == before


@pytest.mark.parametrize("error, code", [
    (firebase_auth.RevokedIdTokenError("The Firebase ID token has been revoked."), 4004),
    (firebase_auth.UserDisabledError("The user record is disabled."), 4004),
    (firebase_auth.ExpiredIdTokenError("Token expired, 1 < 2", cause=None), 4001),
    (firebase_auth.InvalidIdTokenError("Could not verify token signature."), 1008),
    (firebase_auth.CertificateFetchError("Could not fetch certificates", cause=None), 1013),
])
def test_firebase_error_mapping(error, code):
    assert auth_error_from_firebase(error).close_code == code


def test_firebase_error_reason_never_quotes_the_token():
    token = "eyJhbGciOiJSUzI1NiJ9." + "x" * 400 + ".sig"
    # firebase-admin's own message for an illegal token quotes it verbatim.
    error = auth_error_from_firebase(ValueError(f"Illegal ID token provided: b'{token}'. It must be ..."), token)
    assert error.close_code == 1008
    assert token not in error.reason and "xxxx" not in error.reason
    assert len(error.reason.encode()) < 123


@pytest.mark.parametrize("allowed", [False, True])
def test_firebase_emulator_needs_explicit_permission(monkeypatch, allowed):
    monkeypatch.setenv("FIREBASE_AUTH_EMULATOR_HOST", "127.0.0.1:9099")
    settings = Settings(auth="firebase", firebase_project_id="demo-harken", allow_firebase_emulator=allowed)
    if allowed:
        settings.validate()
    else:
        with pytest.raises(ValueError, match="FIREBASE_AUTH_EMULATOR_HOST"):
            settings.validate()
        with pytest.raises(ValueError, match="FIREBASE_AUTH_EMULATOR_HOST"):
            build_authenticator(settings)


# --- none mode ------------------------------------------------------------------------------

async def test_none_mode_trusts_the_uid_parameter():
    authenticator = build_authenticator(Settings(auth="none", host="127.0.0.1"))
    assert authenticator.mode == "none"
    assert await authenticator.authenticate(None, claimed_uid="alice") == "alice"
    error = await rejected(authenticator, "some-token", 1008)
    assert "uid" in error.reason


def test_none_mode_refused_off_loopback():
    with pytest.raises(ValueError, match="loopback"):
        build_authenticator(Settings(auth="none", host="0.0.0.0"))
