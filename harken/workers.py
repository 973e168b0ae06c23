"""``harken serve --workers N``: N server processes on one port, and a supervisor over them.

Each worker is a whole gateway (its own engine, store connections and background tasks) that
binds the port with SO_REUSEPORT once its start-up is done, so the kernel spreads connections
over the workers that are ready. Workers share nothing but the store and the data folder:
migrations serialise their concurrent starts, the local signing key is created race-free, and a
user's conversation is written only by the newest connection (the live lease).

The supervisor (this process) only starts, watches and stops workers:
- a worker that dies is restarted, after a delay that doubles while it keeps dying young;
- SIGTERM/SIGINT is passed on once to every worker, which then drains (close 1012 after storing
  its sessions' last segments); a second signal is passed on too (the workers stop at once);
- workers run in their own process group, so Ctrl-C reaches them once, through here, and each
  ends itself if the supervisor disappears;
- the workers of one run meet in a private temporary directory, where each serves its metrics
  to the others so that any of them can answer ``/metrics`` for all (gateway/worker_metrics.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Callable

from .config import Settings
from .gateway.worker_metrics import WorkerSlot

log = logging.getLogger("harken.workers")

RESTART_DELAY = 1.0          # first delay before restarting a dead worker
MAX_RESTART_DELAY = 30.0
YOUNG = 60.0                 # a worker that dies sooner than this after its start "dies young"
GIVE_UP_AFTER = 5            # workers dying young in a row before the supervisor gives up
STOP_MARGIN = 10.0           # past drain_timeout (+ the worker's own hard stop) before SIGKILL
ORPHAN_CHECK = 1.0


# What a worker runs: ``serve(settings, worker=slot)`` (server.serve). Passed in rather than
# imported, so that this module does not import server.py, which imports it.
Serve = Callable[..., None]


def run_workers(settings: Settings, serve: Serve) -> int:
    """Run ``settings.workers`` workers, each ``serve(settings, worker=…)``, until a stop signal;
    returns the exit status."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("workers > 1 needs SO_REUSEPORT (Linux, BSD, macOS): run one process per port instead")
    context = multiprocessing.get_context("spawn")     # no inherited event loop, threads or locks
    meeting = Path(tempfile.mkdtemp(prefix="harken-workers-"))     # mode 0700: this user only
    slots: list[_Slot] = [_Slot(WorkerSlot(index, meeting)) for index in range(settings.workers)]
    signals: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        signals.append(sig)
        for slot in slots:
            slot.signal(sig)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for slot in slots:
            slot.start(context, settings, serve)
        while not signals:
            failed = _watch(slots, context, settings, serve)
            if failed:
                log.error("workers keep failing at start-up; stopping (see the errors above)")
                on_signal(signal.SIGTERM, None)
                return 1
        return _wait_for_stop(slots, settings)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(meeting, ignore_errors=True)


class _Slot:
    """One worker position: the current process and its restart history."""

    def __init__(self, worker: WorkerSlot) -> None:
        self.worker = worker
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started_at = 0.0
        self.young_deaths = 0
        self.restart_at: float | None = None

    @property
    def index(self) -> int:
        return self.worker.index

    def start(self, context, settings: Settings, serve: Serve) -> None:
        self.process = context.Process(target=_worker_main, args=(settings, self.worker, os.getpid(), serve),
                                       name=f"harken-worker-{self.index}", daemon=False)
        self.process.start()
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("worker %d started, pid %d", self.index, self.process.pid)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.is_alive() and self.process.pid:
            try:
                os.kill(self.process.pid, sig)
            except ProcessLookupError:
                pass


def _watch(slots: list[_Slot], context, settings: Settings, serve: Serve) -> bool:
    """Wait briefly for a worker to die; schedule and perform restarts. True = give up."""
    alive = [s.process.sentinel for s in slots if s.process is not None and s.process.is_alive()]
    if alive:
        multiprocessing.connection.wait(alive, timeout=0.5)
    else:
        time.sleep(0.5)
    now = time.monotonic()
    for slot in slots:
        process = slot.process
        if process is None or process.is_alive():
            continue
        if slot.restart_at is None:
            slot.young_deaths = slot.young_deaths + 1 if now - slot.started_at < YOUNG else 0
            if slot.young_deaths >= GIVE_UP_AFTER:
                return True
            delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** max(0, slot.young_deaths - 1))
            slot.restart_at = now + delay
            log.error("worker %d (pid %d) exited with %s; restarting in %.0fs", slot.index, process.pid,
                      process.exitcode, delay)
        elif now >= slot.restart_at:
            slot.start(context, settings, serve)
    return False


def _wait_for_stop(slots: list[_Slot], settings: Settings) -> int:
    from .gateway.drain import HARD_STOP_MARGIN

    deadline = time.monotonic() + settings.drain_timeout + HARD_STOP_MARGIN + STOP_MARGIN
    for slot in slots:
        if slot.process is None:
            continue
        slot.process.join(max(0.0, deadline - time.monotonic()))
        if slot.process.is_alive():
            log.error("worker %d (pid %d) did not stop in time: killing it", slot.index, slot.process.pid)
            slot.process.kill()
            slot.process.join(5)
    log.info("all workers stopped")
    return 0


def _worker_main(settings: Settings, worker: WorkerSlot, supervisor_pid: int, serve: Serve) -> None:
    """A worker process: its own process group, an orphan check, then one reuse-port server."""
    os.setpgid(0, 0)
    from .logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    threading.Thread(target=_stop_when_orphaned, args=(supervisor_pid,), name="harken-orphan-check",
                     daemon=True).start()
    serve(settings, worker=worker)


def _stop_when_orphaned(supervisor_pid: int) -> None:
    """If the supervisor is gone (killed outright), drain and stop like on SIGTERM."""
    while os.getppid() == supervisor_pid:
        time.sleep(ORPHAN_CHECK)
    os.kill(os.getpid(), signal.SIGTERM)
