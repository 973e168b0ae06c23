"""The ASGI application: routes, and a lifespan that builds the ``Gateway`` and tears it down."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import AsyncIterator, Iterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from .. import native
from ..audio.speaker_models import SpeakerModel, model_named
from ..config import Settings
from ..data_dir import make_private
from ..conversations import ConversationService, Store
from ..stt.selection import build_providers
from ..stt.whisper import WhisperProvider
from .auth import build_authenticator
from .context import Gateway
from .drain import shutdown_graces
from .guard import GuardMiddleware
from .listen import listen_endpoint, web_listen_endpoint
from .metrics import metrics_routes
from .profiles import MAX_JSON_BYTES, build_profile_routes
from .rest import build_rest_routes, not_served_route
from .sync import build_sync_routes
from .sync_worker import start_sync_worker
from .vocabulary import build_vocabulary_routes
from .web import web_routes
from .worker_metrics import WorkerSlot

log = logging.getLogger("harken.app")


def create_app(settings: Settings, worker: WorkerSlot | None = None) -> Starlette:
    """The gateway's app; ``worker`` when it is one of ``--workers N`` (its metrics are shared)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        make_private(settings.data_dir)
        authenticator = build_authenticator(settings)
        with _startup_step("conversation store"):
            store = await Store.from_settings(settings).open()
            conversations = ConversationService(settings, store)
            await conversations.start()
        make_private(settings.data_dir)       # the database files SQLite just created
        whisper = WhisperProvider(settings)
        with _startup_step(f"speech engine (faster-whisper {settings.whisper_model})"):
            await whisper.load()
        providers = {**build_providers(settings), whisper.name: whisper}
        optional = _optional_models(whisper, model_named(settings.speaker_model))
        gateway = Gateway(settings=settings, authenticator=authenticator, providers=providers,
                          conversations=conversations, store=store)
        app.state.gateway = gateway
        app.state.optional_models = optional
        gateway.metrics.start()             # the event-loop lag probe
        if worker is not None:
            await gateway.metrics.share_with_workers(worker)
        _log_audio_path(settings)
        app.state.sync_worker = await start_sync_worker(settings, store, conversations, gateway.metrics,
                                                        live_gate=whisper.live_gate if settings.sync_live_first
                                                        else None)
        gateway.ready.set()
        try:
            yield
        finally:
            gateway.draining = True
            await gateway.metrics.stop()
            await app.state.sync_worker.stop()
            await conversations.stop(**shutdown_graces(gateway))    # within drain_timeout after a drain
            await store.close()
            for provider in gateway.providers.values():
                await provider.aclose()
            await authenticator.aclose()

    app = Starlette(
        routes=[
            WebSocketRoute("/v4/listen", listen_endpoint),
            WebSocketRoute("/v4/web/listen", web_listen_endpoint),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            *metrics_routes(settings),      # GET /metrics (unless metrics is off)
            *web_routes(settings),          # GET /, /static/*, POST /v1/local/token
            *build_rest_routes(lambda: app.state.gateway.conversations,
                               lambda: app.state.gateway.authenticator),
            *build_profile_routes(lambda: app.state.gateway.store, lambda: app.state.gateway.authenticator,
                                  model_named(settings.speaker_model)),
            *build_sync_routes(lambda: settings, lambda: getattr(app.state, "sync_worker", None),
                               lambda: app.state.gateway.authenticator),
            *build_vocabulary_routes(lambda: app.state.gateway.store, lambda: app.state.gateway.authenticator),
            not_served_route(),             # last: any other path is a JSON 404, never a 401
        ],
        lifespan=lifespan,
        # Body limits, JSON depth, browser origin checks, nosniff: for every route (guard.py).
        # Speech-profile uploads carry up to 60 s of audio: their routes allow bigger bodies.
        middleware=[Middleware(GuardMiddleware, settings=settings,
                               body_limits={**{path: MAX_JSON_BYTES for path in (
                                   "/v1/users/speech-profile", "/v3/upload-audio", "/v1/people", "/v1/users/people")},
                                   # offline recordings: the route streams them to disk under its own limits
                                   **{path: int(settings.sync_max_upload_mb * 1024 * 1024)
                                      for path in ("/v1/sync-local-files", "/v2/sync-local-files")}})],
    )
    return app


def _log_audio_path(settings: Settings) -> None:
    """Say which path decodes Opus: an operator whose build lacks the native reader should know
    why a node carries fewer streams than the README's figures."""
    if not settings.native_audio:
        log.info("opus: Python path (native_audio is off)")
    elif native.opus_reader is None:
        log.warning("opus: Python path, the native reader is not built (python -m harken.native.build)")
    else:
        log.info("opus: native reader")


def _optional_models(whisper: WhisperProvider, speaker_model: SpeakerModel) -> dict[str, str]:
    """The optional models and whether they are there, said once at start-up (and in /readyz):
    a missing one turns its feature off, it never fails a session."""
    status = {}
    speaker = speaker_model.problem()
    status["speaker_model"] = f"missing: {speaker}" if speaker else "ok"
    if speaker:
        log.warning("speaker model missing (%s): sessions transcribe without speaker labels, "
                    "and owner/people matching is off", speaker)
    if whisper.loaded:
        problem = whisper.multilingual_problem
        status["multilingual_model"] = f"missing: {problem}" if problem else "ok"
    return status


@contextlib.contextmanager
def _startup_step(what: str) -> Iterator[None]:
    """Logs a slow start-up step before and after, so a waiting operator sees progress."""
    started = time.perf_counter()
    log.info("loading %s…", what)
    yield
    log.info("%s ready in %.1f s", what, time.perf_counter() - started)


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    problems = []
    if gateway is None or not gateway.ready.is_set():
        problems.append("starting")
    else:
        if gateway.draining:
            problems.append("draining")
        if gateway.at_capacity:
            problems.append("at capacity")
        if not gateway.usable_providers():
            problems.append("no speech provider")
        if gateway.store is not None:
            try:
                await gateway.store.ping()
            except Exception:
                problems.append("storage unreachable")
    body = {"status": "ready" if not problems else "not ready", "problems": problems,
            "sessions": len(gateway.sessions) if gateway else 0,
            "optional_models": getattr(request.app.state, "optional_models", {})}
    return JSONResponse(body, status_code=200 if not problems else 503)
