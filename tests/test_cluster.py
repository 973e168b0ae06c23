"""Several nodes, failover, graceful drain and ``--workers``, with real processes on loopback.

The cluster tests start two ``harken serve`` processes that share one PostgreSQL database
(created for this module, dropped afterwards) and one data folder (the local signing key),
behind nginx run with ``deploy/nginx.conf`` (its port placeholders filled in), as
docker-compose.yml does. Clients stream real speech as Opus through nginx with
``stt_service=null`` (scripted words on the audio clock: no engine time on a busy machine; the
decoder, lease, store, flush and close paths are the real ones).

Before them, smaller tests: the live lease at the service level (SQLite and PostgreSQL), a
second connection of a user taking the conversation over on one gateway, and in-flight webhook
requests finishing within the stop's grace.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import numpy as np
import orjson
import psutil
import pytest
import sqlalchemy as sa
import websockets
from prometheus_client.parser import text_string_to_metric_families

from harken.client import device_messages, listen_url
from harken.config import Settings
from harken.conversations import ConversationService, LeaseLost, OutboxDeliverer
from harken.conversations.schema import conversations
from harken.gateway.auth import mint_local_token
from harken.stt.null import audio_times
from tests.conftest import load_audio
from tests.gateway_server import free_port
from tests.test_lifecycle import Clock, service_on
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.test_store import PG_URL, opened_store, postgres_problem, segment, store  # noqa: F401  (store: both backends)

REPO = Path(__file__).resolve().parent.parent
NGINX_TEMPLATE = REPO / "deploy" / "nginx.conf"
DRAIN_TIMEOUT = 15.0
START_TIMEOUT = 120.0        # a node loads the store and the embedded engine before it is ready
SPEECH_FILES = [f"espeak_0{i}.wav" for i in range(1, 5)]
SPEED = 4.0                  # clients send audio this many times faster than real time
TICK = 0.05


# --- the live lease, at the service level ---------------------------------------------------

@pytest.mark.timeout(30)
async def test_the_newest_connection_takes_the_conversation_over_and_the_older_is_fenced(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock, start=False, node_id="a") as node_a, \
            service_on(store, tmp_path, clock, start=False, node_id="b") as node_b:
        old = await node_a.connect("alice", session_id="same-sid")
        old.time_offset(clock.now)
        await old.save_batch([segment("s1", "before the node went quiet", 0, 2)])

        # The client reconnects through another node while the first still holds a live lease
        # (its node died, or has not noticed the client left): no waiting for that lease.
        clock.advance(3)
        new = await node_b.connect("alice", session_id="same-sid")
        assert new.conversation_id == old.conversation_id
        assert [s["id"] for s in new.existing_segments] == ["s1"]

        await node_a.check_once()                 # renewing tells node a its lease was taken
        assert old.fenced
        with pytest.raises(LeaseLost):
            await old.save_batch([segment("s1", "a stale rewrite", 0, 2), segment("x", "stale words", 2, 3)])
        await new.save_batch([segment("s2", "after the reconnect", 3, 5)])
        await old.close()                         # must not end the newer connection's lease

        async with store.engine.connect() as conn:
            row = (await conn.execute(sa.select(conversations.c.live_until, conversations.c.live_by)
                                      .where(conversations.c.id == new.conversation_id))).one()
        assert row.live_by == new.holder and row.live_until is not None
        stored = await node_b.get_conversation("alice", new.conversation_id)
        assert [(s["id"], s["text"]) for s in stored["transcript_segments"]] == [
            ("s1", "before the node went quiet"), ("s2", "after the reconnect")]
        await new.close()


@pytest.mark.timeout(30)
async def test_a_conversation_taken_over_is_not_rolled_over_by_the_older_node(store, tmp_path):
    clock = Clock()
    async with service_on(store, tmp_path, clock, start=False, node_id="a") as node_a, \
            service_on(store, tmp_path, clock, start=False, node_id="b") as node_b:
        old = await node_a.connect("alice", conversation_timeout=120)
        old.time_offset(clock.now)
        await old.save_batch([segment("s1", "words on the first node", 0, 2)])
        new = await node_b.connect("alice", conversation_timeout=120)
        clock.advance(200)                        # silent past the timeout, as far as node a knows
        await node_a.check_once()
        await node_a.wait_for_processing()
        stored = await node_b.get_conversation("alice", new.conversation_id)
        assert stored["status"] == "in_progress", "node a processed a conversation it no longer holds"
        await new.close()
        await old.close()


@pytest.mark.timeout(90)
async def test_a_second_connection_of_the_user_takes_the_conversation_over_and_the_first_goes_on_alone(
        make_gateway, speech_frames):
    """A reconnect racing the old socket, or two live clients of one source: the newer connection
    takes the conversation over; the older is fenced off it but not closed (its client would
    reconnect and take it back, a loop): it goes on in a conversation of its own, and the words
    of the batch the fencing refused are stored there rather than lost."""
    server = make_gateway(null_provider=True)
    token = mint_local_token(server.settings, "two-devices", 600)
    frames, seconds = speech_frames
    first = await Client().connect(server.base, token)
    sent = await first.stream(frames, seconds, until=lambda: first.updates >= 2)
    assert first.updates >= 2
    second = await Client().connect(server.base, token)
    # The first keeps sending: its next batch meets the newer lease, and it moves on.
    moved = lambda: len([e for e in first.events if e.get("type") == "conversation_session"]) >= 2  # noqa: E731
    sent = await first.stream(frames, seconds, start=sent, until=moved, timeout=20)
    assert moved(), first.events
    await asyncio.gather(first.stream(frames, seconds, start=sent, until=lambda: first.updates >= 12),
                         second.stream(frames, seconds, until=lambda: second.updates >= 4))
    assert first.close_code is None and second.close_code is None      # neither was closed
    await first.close()
    await second.close()

    taken, own = (e["conversation_id"] for e in first.events if e.get("type") == "conversation_session")
    assert [e["conversation_id"] for e in second.events if e.get("type") == "conversation_session"] == [taken]

    async def check() -> dict:
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{server.http}/v1/conversations", headers={"Authorization": f"Bearer {token}"})
        stored = {c["id"]: {s["id"]: s["text"] for s in c["transcript_segments"]} for c in answer.json()}
        assert set(stored) == {taken, own}
        assert_all_received_are_stored(second.view, stored[taken])
        assert_all_received_are_stored({sid: t for sid, t in first.view.items() if sid not in stored[taken]},
                                       stored[own])
        return stored

    stored = await eventually(check)
    # Nothing is lost or stored twice. The null engine's words name their stream time (t300,
    # t600, ...): the two conversations together hold each connection's words up to the last
    # it got, each once. The first's last word is in its own conversation.
    def steps(last: float) -> collections.Counter:
        return collections.Counter(round(0.3 * k, 3) for k in range(1, round(last / 0.3) + 1))

    every = collections.Counter(t for conversation in stored.values() for text in conversation.values()
                                for t in audio_times(text))
    first_words = steps(max(t for text in stored[own].values() for t in audio_times(text)))
    assert first_words <= every
    second_words = every - first_words
    assert second_words == steps(max(second_words)), "words of the second lost or stored twice"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("grace, delivered", [(5.0, 1), (0.0, 0)])
async def test_stopping_lets_webhook_requests_in_flight_finish_within_the_grace(tmp_path, grace, delivered):
    async with opened_store("sqlite", tmp_path) as db:
        hook = await WebhookReceiver().start()
        hook.hang_seconds = 1.0                   # the receiver answers a second after the request
        deliverer = OutboxDeliverer(db, node_id="drain", timeout=10, allow_private=True, poll_interval=0.05)
        service = ConversationService(Settings(data_dir=tmp_path, webhook_allow_private=True), db,
                                      deliverer=deliverer, check_interval=3600)
        try:
            await service.start()
            await service.set_webhook("alice", "realtime_transcript", hook.url("/realtime"))
            live = await service.connect("alice")
            await live.save_batch([segment("s1", "said just before the stop", 0, 2)])
            await live.close()
            for _ in range(100):                  # until the request is under way
                if hook.attempts:
                    break
                await asyncio.sleep(0.02)
            assert hook.attempts == 1
            await service.stop(delivery_grace=grace)
            assert len(hook.requests) == delivered
            # What was cut short is handed back, to be sent again by any node; nothing is lost.
            assert await db.outbox_counts() == ({} if delivered else {"pending": 1})
        finally:
            await hook.stop()


# --- processes: two nodes behind nginx ------------------------------------------------------

def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARKEN_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Node:
    """One ``harken serve`` process (or a ``--workers`` supervisor) on a loopback port."""

    def __init__(self, name: str, port: int, data_dir: Path, log_dir: Path, *, database_url: str = "",
                 workers: int = 1, extra: tuple[str, ...] = ()) -> None:
        self.name, self.port, self.data_dir, self.database_url, self.workers = name, port, data_dir, database_url, workers
        self.extra = extra
        self.log = log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Node":
        args = [sys.executable, "-m", "harken", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--auth", "local", "--null-provider",
                "--drain-timeout", str(DRAIN_TIMEOUT), "--workers", str(self.workers), "--log-level", "info"]
        if self.database_url:
            args += ["--database-url", self.database_url]
        args += self.extra
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(), cwd=REPO)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready within {timeout}s:\n{_tail(self.log)}")

    def sessions(self) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).json()["sessions"]
        except (httpx.HTTPError, ValueError, KeyError):
            return 0

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


def _nginx_conf(prefix: Path, port: int, gateways: list[int]) -> Path:
    """deploy/nginx.conf with its placeholders filled in, inside a minimal main configuration."""
    values = {"NGINX_PORT": f"127.0.0.1:{port}", "GATEWAY_1": f"127.0.0.1:{gateways[0]}",
              "GATEWAY_2": f"127.0.0.1:{gateways[1]}"}
    body = re.sub(r"\$\{(NGINX_PORT|GATEWAY_1|GATEWAY_2)\}", lambda m: values[m.group(1)], NGINX_TEMPLATE.read_text())
    assert "${" not in body, "deploy/nginx.conf has a placeholder the test does not fill in"
    (prefix / "harken.conf").write_text(body)
    temp = "\n".join(f"    {kind}_temp_path {prefix / kind};" for kind in
                     ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = prefix / "nginx.conf"
    main.write_text(f"""daemon off;
worker_processes 1;
pid {prefix / 'nginx.pid'};
error_log {prefix / 'error.log'} info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / 'access.log'};
{temp}
    include {prefix / 'harken.conf'};
}}
""")
    return main


class Cluster:
    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.database_url = database_url
        self.nodes = [Node(f"node{i}", free_port(), self.data_dir, self.logs, database_url=database_url)
                      for i in (1, 2)]
        self.nginx_port = free_port()
        self.nginx: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.nginx_port}"

    def token(self, uid: str) -> str:
        return mint_local_token(Settings(data_dir=self.data_dir), uid, 3600)

    def start(self) -> None:
        self.token("warm-up")                      # creates the shared signing key once
        for node in self.nodes:
            node.start()
        prefix = self.root / "nginx"
        prefix.mkdir()
        conf = _nginx_conf(prefix, self.nginx_port, [n.port for n in self.nodes])
        self.nginx = subprocess.Popen(["nginx", "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                                      stdout=subprocess.DEVNULL, stderr=open(prefix / "stderr.log", "wb"))
        self.ensure_running()
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.nginx_port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert self.nginx.poll() is None, f"nginx exited:\n{_tail(prefix / 'error.log')}\n{_tail(prefix / 'stderr.log')}"
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.2)

    def ensure_running(self) -> None:
        for node in self.nodes:
            if not node.alive():
                node.start()
        for node in self.nodes:
            node.wait_ready()

    async def node_of_session(self, timeout: float = 10.0) -> Node:
        """The node that holds the (only) open session."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = [n for n in self.nodes if n.alive() and await asyncio.to_thread(n.sessions) > 0]
            if len(busy) == 1:
                return busy[0]
            await asyncio.sleep(0.1)
        raise AssertionError("could not tell which node serves the session")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
            try:
                self.nginx.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait(5)


@pytest.fixture(scope="module")
async def cluster_database():
    problem = await postgres_problem()
    if problem:
        pytest.skip(problem)
    name = f"harken_cluster_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
def cluster(cluster_database, tmp_path_factory):
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed (./dev.sh test installs it)")
    running = Cluster(tmp_path_factory.mktemp("cluster"), cluster_database)
    try:
        running.start()
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def speech_frames() -> tuple[list[bytes], float]:
    pcm = np.concatenate([load_audio(name) for name in SPEECH_FILES] * 10)       # about 3 minutes of speech
    return device_messages(pcm, "opus", 16000)


class Client:
    """A device-like client: what it was sent, kept the way an app keeps it (by segment id)."""

    def __init__(self) -> None:
        self.view: dict[str, str] = {}
        self.updates = 0                  # segment versions received, over all connections
        self.events: list[dict] = []
        self.ws = None
        self.reader: asyncio.Task | None = None
        self.close_code: int | None = None

    async def connect(self, base: str, token: str, attempts: int = 40, **params) -> "Client":
        url = listen_url(base, **{"codec": "opus", "sample_rate": 16000, "language": "en", "stt_service": "null",
                                  **params})
        for attempt in range(attempts):
            try:
                self.ws = await websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                                   open_timeout=5, max_size=None)
                break
            except (OSError, websockets.InvalidStatus, websockets.InvalidHandshake, TimeoutError):
                if attempt == attempts - 1:
                    raise
                await asyncio.sleep(0.25)
        self.close_code = None
        self.reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message == "ping":
                    continue
                data = orjson.loads(message)
                if isinstance(data, list):
                    for seg in data:
                        self.view[seg["id"]] = seg["text"]
                        self.updates += 1
                elif data.get("type") == "segments_deleted":
                    for sid in data["segment_ids"]:
                        self.view.pop(sid, None)
                else:
                    self.events.append(data)
        except websockets.ConnectionClosed:
            pass
        self.close_code = self.ws.close_code if self.ws.close_code is not None else 1006

    async def stream(self, frames: list[bytes], seconds: float, *, start: int = 0, until=None,
                     timeout: float = 30.0) -> int:
        """Send frames at ``SPEED`` times real time from ``start`` until ``until()`` holds, the
        frames run out, the connection closes, or ``timeout``; returns the next frame's index."""
        deadline = time.monotonic() + timeout
        per_tick = max(1, round(TICK * SPEED / seconds))
        index = start
        while index < len(frames) and time.monotonic() < deadline:
            if until is not None and until():
                break
            try:
                for frame in frames[index:index + per_tick]:
                    await self.ws.send(frame)
            except websockets.ConnectionClosed:
                break
            index += per_tick
            await asyncio.sleep(TICK)
        return index

    async def closed(self, timeout: float) -> int:
        await asyncio.wait_for(asyncio.shield(self.reader), timeout)
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self.closed(10)


async def stored_conversations(database_url: str, uid: str) -> list[dict]:
    """The user's conversations as stored, each with its segments as {id: text}."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, status, live_until FROM conversations WHERE uid = $1", uid)
        found = []
        for row in rows:
            segs = await conn.fetch("SELECT segment_id, data FROM segments WHERE conversation_id = $1", row["id"])
            found.append({"id": row["id"], "status": row["status"], "live_until": row["live_until"],
                          "segments": {s["segment_id"]: orjson.loads(s["data"])["text"] for s in segs}})
        return found
    finally:
        await conn.close()


async def eventually(check, timeout: float = 15.0):
    """``await check()`` until its assertions pass (at most ``timeout`` s). A session its client
    closed stores what it still held, the words shown before their speaker was decided (PROTOCOL
    §4) among them, in its teardown, just after the close handshake."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.25)


def assert_all_received_are_stored(view: dict[str, str], stored: dict[str, str]) -> None:
    """Every segment version the client saw is in the store: the same text, or a later version
    of the segment that grew from it. (A batch is stored before it is sent, so a node killed or
    a session cancelled between the two leaves the store one batch ahead of the client, never
    behind it.)"""
    missing = sorted(set(view) - set(stored))
    assert not missing, f"segments the client received but the store lacks: {missing}"
    changed = {sid: (text, stored[sid]) for sid, text in view.items() if not stored[sid].startswith(text)}
    assert not changed, f"client text is not what the store holds (or its beginning): {changed}"


@pytest.mark.timeout(240)
async def test_a_client_whose_node_is_killed_continues_the_same_conversation_on_the_other(cluster, speech_frames):
    frames, seconds = speech_frames
    uid = f"failover-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(cluster.ensure_running)
    client = await Client().connect(cluster.url, cluster.token(uid))
    first = await cluster.node_of_session()
    # The node shows words at once and stores them once their speaker is decided (up to
    # OPEN_RUN_MAX_SECONDS of audio later): it is killed once it has stored some, so that what it
    # kept can be looked for after the failover.
    stored_some = asyncio.Event()

    async def watch_store() -> None:
        while not any(c["segments"] for c in await stored_conversations(cluster.database_url, uid)):
            await asyncio.sleep(0.1)
        stored_some.set()

    watcher = asyncio.create_task(watch_store())
    try:
        sent = await client.stream(frames, seconds, until=lambda: client.updates >= 3 and stored_some.is_set())
    finally:
        watcher.cancel()
    assert client.updates >= 3 and stored_some.is_set(), f"nothing stored by {first.name}:\n{_tail(first.log)}"
    before, updates_before = dict(client.view), client.updates

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    assert await client.closed(15) != 1000          # the connection just broke

    await client.connect(cluster.url, cluster.token(uid))             # through nginx, to the survivor
    survivor = await cluster.node_of_session()
    assert survivor is not first
    await client.stream(frames, seconds, start=sent, until=lambda: client.updates >= updates_before + 3)
    await client.close()

    assert client.updates >= updates_before + 3, f"no segments after the failover:\n{_tail(survivor.log)}"
    assert client.view != before
    # A node shows the engine's words before their speaker is decided and stores them once it
    # is (PROTOCOL §4): what the killed node showed last, and the survivor never re-sent, may
    # be ahead of the store (a segment of such words alone missing from it), never behind it.
    left = {sid: text for sid, text in client.view.items() if before.get(sid) == text}

    async def check() -> list[dict]:
        stored = await stored_conversations(cluster.database_url, uid)
        assert len(stored) == 1, f"the reconnect started another conversation: {[c['id'] for c in stored]}"
        kept = stored[0]["segments"]
        assert_all_received_are_stored({sid: t for sid, t in client.view.items() if sid not in left}, kept)
        ahead = {sid: (text, kept[sid]) for sid, text in left.items() if sid in kept and not text.startswith(kept[sid])}
        assert not ahead, f"the store holds text the killed node never showed: {ahead}"
        return stored

    stored = await eventually(check)
    assert stored[0]["status"] == "in_progress"
    assert set(before) & set(stored[0]["segments"]), "nothing from the killed node's session was kept"


@pytest.mark.timeout(240)
async def test_a_draining_node_tells_its_clients_and_closes_1012_losing_nothing(cluster, speech_frames):
    frames, seconds = speech_frames
    uid = f"drain-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(cluster.ensure_running)
    client = await Client().connect(cluster.url, cluster.token(uid))
    node = await cluster.node_of_session()
    sent = await client.stream(frames, seconds, until=lambda: client.updates >= 3)
    assert client.updates >= 3, f"no segments from {node.name}:\n{_tail(node.log)}"

    signalled = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    # The client keeps talking until the server closes; words said meanwhile must not be lost.
    sent = await client.stream(frames, seconds, start=sent, until=lambda: client.reader.done(), timeout=DRAIN_TIMEOUT + 10)
    code = await client.closed(DRAIN_TIMEOUT + 10)
    statuses = [e.get("status") for e in client.events if e.get("type") == "service_status"]
    assert "draining" in statuses, f"no draining status; events: {client.events}"
    assert code == 1012, f"closed {code}, expected 1012:\n{_tail(node.log)}"
    exit_code = await asyncio.to_thread(node.proc.wait, DRAIN_TIMEOUT + 10)
    took = time.monotonic() - signalled
    assert took < DRAIN_TIMEOUT + 5, f"the node took {took:.1f}s to exit (drain_timeout {DRAIN_TIMEOUT}s)"
    assert exit_code in (0, -signal.SIGTERM), f"exit {exit_code}:\n{_tail(node.log)}"

    stored = await stored_conversations(cluster.database_url, uid)
    assert len(stored) == 1
    assert_all_received_are_stored(client.view, stored[0]["segments"])
    assert stored[0]["status"] == "in_progress" and stored[0]["live_until"] is None, \
        "the conversation should be handed back to the store, in progress and free to resume"

    # Reconnecting lands on the other node and resumes the same conversation.
    before, updates_before = dict(client.view), client.updates
    await client.connect(cluster.url, cluster.token(uid))
    await client.stream(frames, seconds, start=sent, until=lambda: client.updates >= updates_before + 2)
    await client.close()
    assert client.updates >= updates_before + 2 and client.view != before

    async def check() -> None:
        resumed = await stored_conversations(cluster.database_url, uid)
        assert [c["id"] for c in resumed] == [stored[0]["id"]]
        assert_all_received_are_stored(client.view, resumed[0]["segments"])

    await eventually(check)


# --- --workers ------------------------------------------------------------------------------

def _listens_on(pid: int, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections(kind="tcp"))
    except psutil.Error:
        return False


@pytest.mark.timeout(240)
async def test_workers_are_processes_that_share_one_port(tmp_path, speech_frames):
    port = free_port()
    (tmp_path / "logs").mkdir()
    supervisor = Node("workers", port, tmp_path / "data", tmp_path / "logs", workers=2).start()   # SQLite
    children: list[psutil.Process] = []
    workers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert supervisor.alive(), f"supervisor exited:\n{_tail(supervisor.log)}"
            # (multiprocessing's resource tracker is a child too, listening nowhere)
            children = psutil.Process(supervisor.proc.pid).children()
            workers = [c for c in children if _listens_on(c.pid, port)]
            if len(workers) == 2:
                break
            await asyncio.sleep(0.3)
        assert len(workers) == 2, f"expected two workers listening on {port}:\n{_tail(supervisor.log)}"
        assert not _listens_on(supervisor.proc.pid, port)

        # One open session lives in one worker: readiness answers then differ by worker.
        token = mint_local_token(Settings(data_dir=tmp_path / "data"), "workers-user", 600)
        client = await Client().connect(f"ws://127.0.0.1:{port}", token)
        frames, seconds = speech_frames
        await client.stream(frames, seconds, until=lambda: len(client.view) >= 1)
        assert client.view, f"no segments through a worker:\n{_tail(supervisor.log)}"
        seen: set[int] = set()
        async with httpx.AsyncClient() as http:
            for _ in range(60):
                # A new connection each time, so the kernel picks a worker afresh.
                answer = await http.get(f"http://127.0.0.1:{port}/readyz", headers={"Connection": "close"})
                seen.add(answer.json()["sessions"])
                if seen == {0, 1}:
                    break
        assert seen == {0, 1}, f"every answer came from one process: sessions seen {seen}"

        # Whichever worker answers /metrics, the page holds both workers' figures, so the one
        # open session and its audio are counted once in every scrape.
        async def audio_total(http: httpx.AsyncClient) -> float:
            page = await http.get(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"})
            families = {f.name: f for f in text_string_to_metric_families(page.text)}
            return sum(s.value for s in families["harken_audio_seconds"].samples if s.name.endswith("_total"))

        async with httpx.AsyncClient() as http:
            # The client sends no more audio, but what it sent last may still be in the server's
            # pipeline (read at real-time pace): wait until the total stops moving.
            previous = None
            for _ in range(20):
                total = await audio_total(http)
                if total == previous:
                    break
                previous = total
                await asyncio.sleep(0.5)
        audio: set[float] = set()
        async with httpx.AsyncClient() as http:
            for _ in range(8):
                page = await http.get(f"http://127.0.0.1:{port}/metrics", headers={"Connection": "close"})
                families = {f.name: f for f in text_string_to_metric_families(page.text)}
                assert families["harken_metrics_workers"].samples[0].value == 2
                sessions = {s.labels["worker"]: s.value for s in families["harken_active_sessions"].samples}
                assert sorted(sessions) == ["0", "1"] and sum(sessions.values()) == 1
                audio.add(sum(s.value for s in families["harken_audio_seconds"].samples if s.name.endswith("_total")))
                backlog = families["harken_webhook_backlog"].samples
                assert len(backlog) == 1 and "worker" not in backlog[0].labels     # the store's, once
        assert len(audio) == 1 and audio.pop() > 0

        supervisor.proc.send_signal(signal.SIGTERM)
        code = await client.closed(DRAIN_TIMEOUT + 10)
        assert code == 1012
        exit_code = await asyncio.to_thread(supervisor.proc.wait, DRAIN_TIMEOUT + 15)
        assert exit_code == 0, _tail(supervisor.log)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        _, left = psutil.wait_procs(children, timeout=5)      # the resource tracker follows its parent
        assert not left, f"processes left behind: {left}"
    finally:
        supervisor.stop()
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass


async def _final_words(node: Node) -> float:
    """Final words the null provider gave this node's sessions (its provider-latency count)."""
    page = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{node.port}/metrics", timeout=5)).text
    return sum(sample.value for family in text_string_to_metric_families(page) for sample in family.samples
               if sample.name == "harken_stt_provider_latency_seconds_count" and sample.labels.get("provider") == "null")


@pytest.mark.timeout(240)
async def test_process_now_on_the_older_node_racing_a_takeover_through_another_finishes_the_conversation(
        cluster_database, tmp_path, speech_frames):
    """Two real nodes sharing PostgreSQL. A phone call's older connection is on node 1, whose
    session holds words it has not stored yet (its flush interval is an hour; a call's legs say
    who speaks, so its words wait for no voice) and which has not learnt (no lease check for an
    hour) that the call reconnected through node 2, which took the conversation over and stores
    its words there. ``POST /v1/conversations`` then reaches node 1: its save of the older
    session's words is refused (``LeaseLost``). The request still finishes the conversation
    (from the store: node 2's words), and the older session stores its refused words in a
    conversation of its own. (The same race through a stub session:
    test_app_rest.py::test_process_now_racing_a_takeover_from_another_node_finishes_the_conversation.)"""
    from tests.test_channels import prefixed

    pcm = np.concatenate([load_audio(name) for name in SPEECH_FILES] * 4)
    frames = [m for i in range(0, len(pcm) - 159, 160) for m in (prefixed(1, pcm[i:i + 160]),
                                                                  prefixed(2, np.zeros(160, np.int16)))]
    seconds = 0.005                               # two messages (the legs) per 10 ms
    call = {"codec": "pcm", "channels": 2, "source": "phone_call"}
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    uid = f"race-{uuid.uuid4().hex[:6]}"
    token = mint_local_token(Settings(data_dir=data_dir), uid, 3600)      # the nodes' shared signing key
    older_node = Node("older", free_port(), data_dir, logs, database_url=cluster_database,
                      extra=("--flush-interval", "3600", "--conversation-check-interval", "3600"))
    newer_node = Node("newer", free_port(), data_dir, logs, database_url=cluster_database)
    nodes = [older_node.start(), newer_node.start()]
    try:
        for node in nodes:
            await asyncio.to_thread(node.wait_ready)
        older = await Client().connect(f"ws://127.0.0.1:{older_node.port}", token, **call)
        index = 0
        for _ in range(30):                       # until the older session holds a few words
            index = await older.stream(frames, seconds, start=index, timeout=0.5)
            if await _final_words(older_node) >= 5:
                break
        assert await _final_words(older_node) >= 5, _tail(older_node.log)
        (opened,) = await stored_conversations(cluster_database, uid)
        first = opened["id"]
        assert opened["segments"] == {} and older.updates == 0      # nothing stored nor sent yet

        newer = await Client().connect(f"ws://127.0.0.1:{newer_node.port}", token, **call)     # the takeover
        at = index
        for _ in range(30):
            at = await newer.stream(frames, seconds, start=at, timeout=0.5)
            stored = {c["id"]: c for c in await stored_conversations(cluster_database, uid)}
            if newer.updates >= 3 and stored[first]["segments"]:
                break
        taken = stored[first]["segments"]
        assert taken and set(taken) <= set(newer.view), _tail(newer_node.log)

        async with httpx.AsyncClient(timeout=60) as http:
            answer = await http.post(f"http://127.0.0.1:{older_node.port}/v1/conversations",
                                     headers={"Authorization": f"Bearer {token}"}, content="{}")
        assert answer.status_code == 200, (answer.text, _tail(older_node.log))
        finished = answer.json()["conversation"]
        assert finished["id"] == first and finished["status"] == "completed"
        assert {s["id"] for s in finished["transcript_segments"]} >= set(taken)

        async def refused_words_stored_apart() -> dict:
            conversations = await stored_conversations(cluster_database, uid)
            own = [c for c in conversations if c["id"] != first and c["segments"]
                   and not set(c["segments"]) & set(newer.view)]
            assert own, f"the older session's words are not stored: {conversations}"
            return own[0]

        own = await eventually(refused_words_stored_apart, timeout=30)
        assert not set(own["segments"]) & set(taken)
        await older.close()
        await newer.close()
    finally:
        for node in nodes:
            node.stop()
