"""Live decodes first: batch work (uploads) waits while the live engine has decodes queued or running.

Running the batch engine at ``nice`` 19 (``stt.batch``) makes the kernel give a live decode the
core whenever both want it, but it cannot stop a batch decode from *starting* while live
utterances wait for a worker, and with autogroup scheduling other programs' load is not ranked
by it at all. So the live engine holds this gate for every decode it queues (``hold`` when
submitted, ``release`` when done), and the batch pool's worker thread waits before each piece of
work, and before each utterance it decodes, until no live decode is queued or running. A batch
decode that already started runs on (about 0.3 s of one core for tiny.en) at its low priority.

It is per process, as the live engine is: with ``--workers N`` each process's batch worker
yields to its own process's live sessions.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class LiveFirstGate:
    """How many live decodes are queued or running; batch threads wait for none."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._live = 0
        self._closed = False
        self.batch_waits = 0            # times batch work waited for live decodes (metrics, tests)

    @property
    def live(self) -> int:
        return self._live

    def hold(self) -> None:
        """A live decode was queued (call from the live engine, any thread)."""
        with self._changed:
            self._live += 1

    def release(self) -> None:
        """A live decode finished, failed or was cancelled."""
        with self._changed:
            self._live = max(0, self._live - 1)
            if not self._live:
                self._changed.notify_all()

    def wait_for_live(self) -> None:
        """Block the calling (batch) thread while live decodes are queued or running."""
        with self._changed:
            if self._live and not self._closed:
                self.batch_waits += 1
                self._changed.wait_for(lambda: not self._live or self._closed)

    def close(self) -> None:
        """Let every waiting batch thread go (shutdown)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class LiveFirstExecutor(ThreadPoolExecutor):
    """A thread pool whose every job first waits at ``gate`` (no gate: an ordinary pool)."""

    def __init__(self, gate: LiveFirstGate | None, **kwargs: Any):
        super().__init__(**kwargs)
        self.gate = gate

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self.gate is None:
            return super().submit(fn, *args, **kwargs)
        return super().submit(self._after_live, fn, args, kwargs)

    def _after_live(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.gate.wait_for_live()
        return fn(*args, **kwargs)
