"""Runs the ASGI app on uvicorn with the websockets-sansio protocol and uvloop."""

from __future__ import annotations

import logging
import sys

import uvicorn

from .config import Settings

log = logging.getLogger("harken.server")

# uvicorn refuses frames larger than this at the protocol level; the session itself enforces
# the smaller ``max_message_bytes`` so that it can send an `error` event before closing 1009.
PROTOCOL_MAX_SIZE_FACTOR = 16


def uvicorn_config(settings: Settings, app=None) -> uvicorn.Config:
    from .gateway.app import create_app

    return uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        lifespan="on",
        ws_max_size=max(settings.max_message_bytes * PROTOCOL_MAX_SIZE_FACTOR, 1 << 20),
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        log_level=settings.log_level,
        access_log=False,       # query strings could carry uids; tokens never do
        timeout_graceful_shutdown=20,
    )


def run_server(settings: Settings) -> None:
    print(banner(settings), file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(settings)).run()


def banner(settings: Settings) -> str:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base = f"ws://{host}:{settings.port}"
    how = {
        "local": f"  token:   harken token --uid alice --data-dir {settings.data_dir}\n"
                 f"  try it:  harken stream recording.wav --url {base}/v4/listen",
        "firebase": f"  auth:    Firebase ID tokens of project {settings.firebase_project_id}",
        "none": f"  auth:    none (uid parameter trusted; loopback only)\n"
                f"  try it:  harken stream recording.wav --url {base}/v4/listen",
    }[settings.auth]
    return (
        f"Harken gateway\n"
        f"  listen:  {base}/v4/listen   (browsers: {base}/v4/web/listen)\n"
        f"  health:  http://{host}:{settings.port}/healthz, /readyz\n"
        f"  auth:    {settings.auth}\n"
        f"  engine:  faster-whisper {settings.whisper_model} ({settings.whisper_compute_type})\n"
        f"  data:    {settings.data_dir.resolve()}\n"
        f"{how}"
    )
