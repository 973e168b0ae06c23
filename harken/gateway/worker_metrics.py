"""One ``/metrics`` page for all the workers of ``harken serve --workers N``.

The workers share one port, so a scrape reaches whichever worker the kernel picks. Each worker's
registry only knows its own sessions; served alone, every scrape would show a different
worker's counters and Prometheus would read the jumps as counter resets. So each worker also
serves its own exposition text on a Unix socket in a directory the supervisor made for this run
(``worker-<index>.sock``), and the worker that answers a scrape reads its siblings' texts and
serves them all on one page, each sample labelled ``worker="<index>"``. Families that describe
the shared store rather than one worker (``SHARED_FAMILIES``) come once, from the answering
worker, unlabelled. ``harken_metrics_workers`` says how many workers the page covers: a worker
that is restarting or too busy to answer within ``SIBLING_TIMEOUT`` is left out of that scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("harken.metrics")

SIBLING_TIMEOUT = 1.0        # seconds a scrape waits for each sibling's text
MAX_TEXT_BYTES = 8 << 20     # a sibling's page is a few KiB; anything this big is not one


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker this process is, and where the workers of this run meet."""

    index: int
    directory: Path

    def socket_path(self, index: int | None = None) -> Path:
        return self.directory / f"worker-{self.index if index is None else index}.sock"


class SiblingMetrics:
    """Serves this worker's text to its siblings and gathers theirs for a scrape."""

    def __init__(self, slot: WorkerSlot, render_own: Callable[[], bytes]) -> None:
        self._slot = slot
        self._render_own = render_own
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = self._slot.socket_path()
        path.unlink(missing_ok=True)          # left by this slot's previous (dead) worker
        self._server = await asyncio.start_unix_server(self._answer, path=str(path))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
            self._slot.socket_path().unlink(missing_ok=True)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._render_own())
            await writer.drain()
        except (ConnectionError, OSError):
            pass                               # the asking worker gave up waiting
        finally:
            writer.close()

    async def page(self, own_text: bytes, shared: Iterable[str]) -> bytes:
        """This worker's text and every sibling that answers, merged into one page."""
        siblings = sorted(p for p in self._slot.directory.glob("worker-*.sock") if p != self._slot.socket_path())
        answers = await asyncio.gather(*(_read_sibling(p) for p in siblings))
        texts = {str(self._slot.index): own_text.decode()}
        for path, text in zip(siblings, answers):
            if text is not None:
                texts[path.stem.removeprefix("worker-")] = text
        return merge_worker_pages(texts, own=str(self._slot.index), shared=set(shared))


async def _read_sibling(path: Path) -> str | None:
    try:
        async with asyncio.timeout(SIBLING_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                data = await _read_to_end(reader)
            finally:
                writer.close()
        return data.decode()
    except (OSError, TimeoutError, UnicodeDecodeError, ValueError) as exc:
        # refused: a dead worker's socket, until its slot restarts; timeout: a stalled loop
        log.debug("metrics: worker socket %s did not answer (%s)", path.name, type(exc).__name__)
        return None


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    """The sibling's whole text: it closes the connection after writing it. (One ``read(n)``
    returns only what has arrived so far, and a busy worker's page spans several reads.)"""
    data = bytearray()
    while chunk := await reader.read(1 << 16):
        data += chunk
        if len(data) > MAX_TEXT_BYTES:
            raise ValueError(f"more than {MAX_TEXT_BYTES} bytes")
    return bytes(data)


def merge_worker_pages(texts: dict[str, str], own: str, shared: set[str]) -> bytes:
    """Exposition texts by worker label → one page, every sample labelled with its worker;
    ``shared`` families only from ``own``, without the label."""
    families: dict[str, Metric] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            is_shared = family.name in shared
            if is_shared and worker != own:
                continue
            label = {} if is_shared else {"worker": worker}
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                merged.add_sample(sample.name, {**sample.labels, **label}, sample.value, sample.timestamp)
    covered = GaugeMetricFamily("harken_metrics_workers", "workers whose figures this page holds")
    covered.add_metric([], len(texts))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), covered]))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
