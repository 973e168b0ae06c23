"""The commands a person types: `harken serve`, `harken token`, `harken stream`, as subprocesses."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .gateway_server import free_port

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
AUDIO = Path(__file__).parent / "data" / "audio"


def harken(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harken", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120, **kwargs)


@pytest.fixture
def served(tmp_path):
    """`harken serve` on a free port with its own data folder; yields (port, env, stderr file)."""
    port = free_port()
    env = dict(os.environ, HARKEN_DATA_DIR=str(tmp_path / "data"), HARKEN_LOG_LEVEL="info")
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "harken", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                break
        except OSError:
            assert proc.poll() is None, "server exited early"
            assert time.monotonic() < deadline, "server not ready in 90 s"
            time.sleep(0.2)
    yield port, env, log
    proc.terminate()
    assert proc.wait(30) in (0, -15)       # uvicorn re-raises SIGTERM after its graceful shutdown
    log.close()


def test_serve_token_and_stream(served, tmp_path):
    port, env, log = served
    log.seek(0)
    banner = log.read()
    assert f"ws://127.0.0.1:{port}/v4/listen" in banner and "harken token" in banner

    token = harken("token", "--uid", "alice", env=env)
    assert token.returncode == 0 and token.stdout.count(".") == 2      # a JWT

    # `harken stream` mints its own local token from the data folder and prints the transcript.
    # (--settle 8: on a loaded machine the last utterance's decode can take more than the default 2 s)
    out = harken("stream", str(AUDIO / "goforward.wav"), "--url", f"ws://127.0.0.1:{port}/v4/listen",
                 "--fast", "--settle", "8", env=env)
    assert out.returncode == 0, out.stderr
    assert "forward" in out.stdout.lower()
    # Not a terminal: one line per segment version, then the status line once at the end.
    assert re.search(r"^-- local · \d+ segments · ready$", out.stdout, re.M), out.stdout
    assert (tmp_path / "data" / "auth" / "local_signing_key.pem").exists()

    log.seek(0)
    server_log = log.read()
    assert "session closed" in server_log and "audio_s=" in server_log
    assert re.search(r"speech engine \(faster-whisper embedded\) ready in \d+\.\d s", server_log)
    assert "engines: local faster-whisper (tiny.en, embedded, int8)" in server_log
    assert token.stdout.strip() not in server_log          # tokens never reach the logs


def test_serve_refuses_unsafe_settings(tmp_path):
    env = dict(os.environ, HARKEN_DATA_DIR=str(tmp_path), HARKEN_AUTH="none", HARKEN_HOST="0.0.0.0")
    out = harken("serve", env=env)
    assert out.returncode == 2 and "loopback" in out.stderr

    env = dict(os.environ, HARKEN_DATA_DIR=str(tmp_path), HARKEN_AUTH="firebase",
               HARKEN_FIREBASE_PROJECT_ID="demo", FIREBASE_AUTH_EMULATOR_HOST="127.0.0.1:9099")
    out = harken("serve", env=env)
    assert out.returncode == 2 and "FIREBASE_AUTH_EMULATOR_HOST" in out.stderr


@pytest.mark.parametrize("setting, value, says", [
    ("HARKEN_VAD_ONSET_THRESHOLD", "0.6", "vad_onset_threshold must be 0 (off) or below vad_threshold"),
    ("HARKEN_VAD_THRESHOLD", "1.5", "vad_threshold must be between 0 and 1"),
    ("HARKEN_VAD_ONSET_MS", "10", "vad_onset_ms must be at least 32"),
])
def test_serve_refuses_vad_settings_that_cannot_work(tmp_path, setting, value, says):
    out = harken("serve", env=dict(os.environ, HARKEN_DATA_DIR=str(tmp_path), **{setting: value}))
    assert out.returncode == 2 and says in out.stderr, out.stderr


def test_python_dash_m_and_console_script_agree():
    out = harken("--help")
    assert out.returncode == 0 and "serve" in out.stdout and "stream" in out.stdout
    script = Path(sys.executable).parent / "harken"
    if script.exists():
        assert subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout == out.stdout


def test_readme_documents_every_setting_and_the_quick_start():
    from harken.config import setting_fields

    readme = (ROOT / "README.md").read_text()
    missing = [f.name for f in setting_fields() if f"HARKEN_{f.name.upper()}" not in readme]
    assert not missing, f"settings missing from the README: {missing}"
    assert "./dev.sh serve" in readme and "./dev.sh test" in readme
    assert "./dev.sh test" in (ROOT / ".ci" / "run").read_text().replace("./dev.sh test -q", "./dev.sh test")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_live_view_rewrites_segments_in_place_with_provider_and_latency():
    from harken.cli import LiveView
    from harken.client import SegmentUpdate, StreamResult

    out = _Terminal()
    view = LiveView(out)
    result = StreamResult(sending_started_at=100.0)
    view.event(result, {"type": "service_status", "status": "ready"})
    first = {"id": "a", "start": 0.0, "end": 1.0, "text": "hello", "speaker": "SPEAKER_00",
             "is_user": False, "stt_provider": "deepgram"}
    grown = dict(first, end=2.5, text="hello there", is_user=True)
    for segment, arrived in ((first, 102.0), (grown, 104.0)):
        result.segments[segment["id"]] = segment
        result.updates.append(SegmentUpdate(segment, arrived, 0.0))
        view.update(result, segment)

    screen = out.getvalue()
    last_frame = screen.rsplit("\x1b[J", 1)[1]
    # The first version was erased (cursor up over its lines, clear) and the grown one drawn.
    assert screen.count("\x1b[J") == 2 and "hello there" in last_frame and "hello\n" not in last_frame
    assert "you: hello there" in last_frame
    # latency of the newest version: arrived 104.0 − (sending start 100.0 + end 2.5) = 1.5 s
    assert "deepgram · latency 1.5 s (p50 1.5 s) · 1 segments · ready" in last_frame
