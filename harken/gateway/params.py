"""Query parameters of ``/v4/listen`` (PROTOCOL.md §2), parsed and validated as pure functions.

Every bad value raises ``ParamError`` naming the parameter and what is allowed; the endpoint turns
it into an ``error`` event and a 1008 close. Unknown parameters are ignored, as Omi's app sends
some that mean nothing here (``onboarding``, ``call_id``, ``client_conversation_id``,
``speech_profile_redo``). ``create_speakers`` (default true, as upstream) and
``speaker_auto_assign`` (enabled/disabled, default disabled) say what a self-introduction does
(see session.py ``_introductions``); values the app never sends are read leniently (a
speaker_auto_assign of true/1 is enabled). Values the real app sends are
never refused: the app reconnects forever after any close it does not expect
(reference/omi-app-client.md), so strictness is kept for what would really hurt.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Mapping

from .. import codecs
from ..config import VAD_GATE_MODES

log = logging.getLogger("harken.params")

STT_SERVICES = ("deepgram", "soniox", "speechmatics", "local")
CHANNELS = tuple(range(1, codecs.MAX_CHANNELS + 1))   # 3 and more: channel-prefixed legs (codecs/channels.py)
TIMEOUT_MIN, TIMEOUT_MAX = 2, 14400
MAX_SOURCE_LENGTH = 64
_TRUE, _FALSE = ("true", "1"), ("false", "0")
# The app's toggle sends enabled/disabled; Omi's server-side gate mode names are active/off.
_VAD_GATE_ALIASES = {"enabled": "active", "disabled": "off", "true": "active", "false": "off"}
# BCP-47 in the shape clients send (en, en-US, pt-BR, zh-Hant, es-419); "multi" handled apart.
_LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")
_SOURCE_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class ParamError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class ListenParams:
    language: str = "en"
    sample_rate: int = 8000
    codec: str = "pcm8"
    channels: int = 1
    include_speech_profile: bool = True
    conversation_timeout: int = 120
    stt_service: str | None = None
    custom_stt: bool = False
    source: str = "omi"
    uid: str | None = None
    vad_gate: str | None = None       # off | active; None: the server setting decides
    create_speakers: bool = True      # a speaker who says "my name is X" makes person X
    speaker_auto_assign: bool = False  # suggestions name the person's id, and their segments get it


def parse_listen_params(query: Mapping[str, str], *, null_provider: bool = False) -> ListenParams:
    """``null_provider`` (a server setting) lets ``stt_service=null`` through, for load tests."""
    codec = query.get("codec", "pcm8").strip().lower()
    if codec not in codecs.codec_names():
        raise ParamError("codec", f"codec must be one of {', '.join(codecs.codec_names())}; got {codec!r}")

    return ListenParams(
        language=_language(query.get("language", "en")),
        sample_rate=_sample_rate(query.get("sample_rate"), codec),
        codec=codec,
        channels=_choice_int(query, "channels", 1, CHANNELS),
        include_speech_profile=_bool(query, "include_speech_profile", True),
        conversation_timeout=_timeout(query.get("conversation_timeout")),
        stt_service=_stt_service(query.get("stt_service"), STT_SERVICES + (("null",) if null_provider else ())),
        custom_stt=_enabled(query, "custom_stt"),
        source=_source(query.get("source") or "omi"),     # an empty source= is the default
        uid=query.get("uid") or None,
        vad_gate=_vad_gate(query.get("vad_gate")),
        create_speakers=_lenient_bool(query.get("create_speakers"), True),
        speaker_auto_assign=_lenient_bool(query.get("speaker_auto_assign"), False),
    )


def _lenient_bool(raw: str | None, default: bool) -> bool:
    """enabled/true/1 or disabled/false/0; anything else is the default (never a refusal: these
    come from app versions whose spellings vary)."""
    lowered = (raw or "").strip().lower()
    if lowered in ("enabled", "true", "1", "yes", "on"):
        return True
    if lowered in ("disabled", "false", "0", "no", "off"):
        return False
    return default


def _language(raw: str) -> str:
    value = raw.strip().replace("_", "-")     # en_US as well as en-US
    if value.lower() in ("auto", "multi"):
        return "multi"
    if not _LANGUAGE_RE.match(value):
        raise ParamError("language", f"language must be a BCP-47 code (en, pt-BR, …) or multi; got {raw!r}")
    return value


def _sample_rate(raw: str | None, codec: str) -> int:
    # The digit in pcm8/pcm16 is the device's rate; an explicit sample_rate wins (PROTOCOL §2).
    if raw is None or raw == "":
        return codecs.default_rate(codec)
    allowed = ", ".join(str(r) for r in codecs.SAMPLE_RATES)
    try:
        rate = int(raw)
    except ValueError:
        raise ParamError("sample_rate", f"sample_rate must be one of {allowed}; got {raw!r}") from None
    if rate not in codecs.SAMPLE_RATES:
        raise ParamError("sample_rate", f"sample_rate must be one of {allowed}; got {rate}")
    return rate


def _choice_int(query: Mapping[str, str], name: str, default: int, allowed: tuple[int, ...]) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value not in allowed:
        raise ParamError(name, f"{name} must be one of {', '.join(map(str, allowed))}; got {raw!r}")
    return value


def _bool(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ParamError(name, f"{name} must be true, false, 1 or 0; got {raw!r}")


def _enabled(query: Mapping[str, str], name: str) -> bool:
    raw = (query.get(name) or "disabled").strip().lower()
    if raw not in ("enabled", "disabled"):
        raise ParamError(name, f"{name} must be enabled or disabled; got {query.get(name)!r}")
    return raw == "enabled"


def _timeout(raw: str | None) -> int:
    if raw is None or raw == "":
        return 120
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value == -1:
        # Upstream's meaning (backend/routers/transcribe.py): -1 = "no timeout" capped at 4 h.
        return TIMEOUT_MAX
    if value is None or not TIMEOUT_MIN <= value <= TIMEOUT_MAX:
        raise ParamError(
            "conversation_timeout",
            f"conversation_timeout must be an integer from {TIMEOUT_MIN} to {TIMEOUT_MAX} seconds, or -1; got {raw!r}",
        )
    return value


def _stt_service(raw: str | None, allowed: tuple[str, ...]) -> str | None:
    """A preference, not a contract (as upstream): a name Harken does not know is logged and the
    normal chain serves the session. The app sends ``soniox`` by default, other names too."""
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    if value not in allowed:
        log.info("stt_service=%r is not a provider here (%s): using the normal chain", raw[:40], ", ".join(allowed))
        return None
    return value


def _source(raw: str) -> str:
    value = raw.strip()
    if not value or len(value) > MAX_SOURCE_LENGTH or not _SOURCE_RE.match(value):
        raise ParamError("source", f"source must be 1-{MAX_SOURCE_LENGTH} letters, digits, '_', '-' or '.'; got {raw[:80]!r}")
    return value


def _vad_gate(raw: str | None) -> str | None:
    if raw is None or raw == "":
        return None
    value = raw.strip().lower()
    value = _VAD_GATE_ALIASES.get(value, value)
    if value not in VAD_GATE_MODES:
        raise ParamError("vad_gate", f"vad_gate must be enabled, disabled, {' or '.join(VAD_GATE_MODES)}; got {raw!r}")
    return value
