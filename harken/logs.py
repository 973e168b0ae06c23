"""Log setup: plain text or JSON lines, each record tagged with the session it belongs to.

The listen endpoint binds the session id and uid to the connection's task with
``bind_session``; contextvars are copied into every task the session starts (its task group,
the STT fallback's feeders and readers), so any record logged on the session's behalf carries
them, without each call having to pass them.

What is never logged: tokens, Authorization headers and audio. The code does not log them, and
``RedactSecrets`` is a safety net for the day a library or a careless message does: it blanks
bearer credentials, anything shaped like a JWT and the query of any URL (webhook URLs carry
secrets there) before a record is written. ``install_redaction`` applies it as each record is
made, so handlers set up by others (uvicorn's) are covered too.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import re
import sys
from typing import TextIO

import orjson

_session_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("harken_session_id", default=None)
_uid: contextvars.ContextVar[str | None] = contextvars.ContextVar("harken_uid", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
REDACTED = "[redacted]"
# "Bearer <anything>", and three base64url parts of which the first two start like a JSON
# object ("eyJ" = '{"'): a JWT, whoever issued it.
_SECRET_PATTERN = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+|\beyJ[\w-]*\.eyJ[\w-]*\.[\w-]*")
# The query of a URL: webhook URLs carry their owners' secrets there (``?token=…``), and httpx
# logs every request's URL at info level.
_URL_QUERY = re.compile(r"(?i)\b((?:https?|wss?)://[^\s?#\"'<>]+)\?[^\s#\"'<>]*")


def redact(text: str) -> str:
    """``text`` with bearer credentials, JWTs and URL queries blanked."""
    return _URL_QUERY.sub(rf"\1?{REDACTED}", _SECRET_PATTERN.sub(REDACTED, text))


def _needs_redaction(text: str) -> bool:
    return bool(_SECRET_PATTERN.search(text) or _URL_QUERY.search(text))


def bind_session(session_id: str, uid: str) -> tuple[contextvars.Token, contextvars.Token]:
    """Tag this task's (and its future child tasks') log records; undo with ``unbind_session``."""
    return _session_id.set(session_id), _uid.set(uid)


def unbind_session(tokens: tuple[contextvars.Token, contextvars.Token]) -> None:
    _session_id.reset(tokens[0])
    _uid.reset(tokens[1])


class SessionContext(logging.Filter):
    """Adds ``session_id`` and ``uid`` (None outside a session) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.session_id = _session_id.get()
        record.uid = _uid.get()
        return True


class RedactSecrets(logging.Filter):
    """Blanks bearer credentials and JWTs in a record's message and exception text."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True         # a malformed record: the handler reports it as such
        if _needs_redaction(message):
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_redaction() -> None:
    """Redact every record as it is made, whichever handler writes it: uvicorn's own handlers
    (its LOGGING_CONFIG, not propagating to the root) and any a library or embedder adds never
    pass through ``make_handler``'s filter. Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "harken_redacting", False):
        return
    redactor = RedactSecrets()

    def make_record(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        redactor.filter(record)
        return record

    make_record.harken_redacting = True
    logging.setLogRecordFactory(make_record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, session_id, uid,
    and exc (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "session_id": getattr(record, "session_id", None),
            "uid": getattr(record, "uid", None),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        return orjson.dumps(entry, default=str).decode()


def make_handler(log_format: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with the session tags, the redaction and the chosen format."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(SessionContext())
    handler.addFilter(RedactSecrets())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger writes to stderr in ``log_format``; replaces any handler set before."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(make_handler(log_format))
    root.setLevel(level.upper())
    install_redaction()
    # httpx logs each request's full URL at info: the redaction blanks its query, and below
    # debug the line says nothing an operator needs (webhook outcomes are logged by the outbox).
    if root.level > logging.DEBUG:
        logging.getLogger("httpx").setLevel(logging.WARNING)
