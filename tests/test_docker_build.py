"""The Docker image's build, replayed step by step without a Docker engine (none runs here), then its
entrypoint and health check: the image's server transcribes English with diarization and other
languages with the multilingual model that the build joined from its two wheel halves and whose
halves it then uninstalled.

The Dockerfile is read, not copied: each stage gets its own folder standing in for its filesystem
(absolute paths such as ``/app`` or ``/opt/harken/models`` are mapped into it), ``COPY`` and
``COPY --from`` copy between them, ``ENV`` and ``WORKDIR`` apply, and each ``RUN`` runs in bash with a
fresh virtualenv's ``bin`` first on ``PATH`` (standing in for the image's Python). Left out, because
they need root or a container: ``apt-get`` lines (the packages they name must be installed here)
and ``useradd``; ``USER`` is not switched. ``PIP_NO_CACHE_DIR`` is not applied (pip's cache only
makes the download faster). ``HARKEN_HOST`` is kept on loopback for the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from harken.client import listen_url, read_wav_16k, stream_messages
from tests.test_install import free_port, two_voices

ROOT = Path(__file__).resolve().parent.parent
MULTILINGUAL = Path(__file__).parent / "data" / "multilingual"
ABSOLUTE = re.compile(r"(?<![\w./-])/(app|src|opt|data)(?=/|\b|$)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments), continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def env_pairs(arguments: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(arguments))


@dataclass
class Stage:
    root: Path
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)

    def path(self, inside: str) -> Path:
        absolute = inside if inside.startswith("/") else f"{self.workdir.rstrip('/')}/{inside}"
        return self.root / absolute.lstrip("/")

    def map(self, text: str) -> str:
        return ABSOLUTE.sub(lambda m: f"{self.root}/{m.group(1)}", text)


@dataclass
class Image:
    stage: Stage
    entrypoint: list[str]
    healthcheck: list[str]
    bin: Path


def copy(sources: list[Path], destination: Path, into_folder: bool) -> None:
    """Docker's COPY: a folder's contents go to the destination; files go into it when it is a folder."""
    for source in sources:
        if source.is_dir():
            shutil.copytree(source, destination, dirs_exist_ok=True)
        else:
            target = destination / source.name if into_folder else destination
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def build(dockerfile: Path, context: Path, base: Path) -> Image:
    """Replays ``dockerfile`` with build context ``context``; returns the last stage."""
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    python = base / "python"       # the base image's Python, one per replay
    subprocess.run([sys.executable, "-m", "venv", str(python)], check=True, timeout=300)
    entrypoint: list[str] = []
    healthcheck: list[str] = []
    for number, (keyword, arguments) in enumerate(instructions(dockerfile.read_text())):
        if keyword == "FROM":
            name = arguments.split(" AS ")[-1].strip() if " AS " in arguments else str(number)
            stage = stages[name] = Stage(base / f"stage-{name}")
            stage.root.mkdir()
        elif keyword == "WORKDIR":
            stage.workdir = arguments
            stage.path(".").mkdir(parents=True, exist_ok=True)
        elif keyword == "ENV":
            stage.env.update({k: stage.map(v) for k, v in env_pairs(arguments).items()})
        elif keyword == "COPY":
            words = arguments.split()
            source_stage = None
            if words[0].startswith("--from="):
                source_stage = stages[words.pop(0).split("=", 1)[1]]
            *sources, destination = words
            found = []
            for pattern in sources:
                if source_stage is None:
                    found += sorted(context.glob(pattern))
                else:
                    found += sorted(source_stage.root.glob(pattern.lstrip("/")))
            assert found, f"COPY {arguments}: nothing matches"
            copy(found, stage.path(destination), destination.endswith("/") or len(found) > 1)
        elif keyword == "RUN":
            if arguments.startswith("apt-get"):
                packages = re.findall(r"install -y --no-install-recommends ([^&]+)", arguments)[0].split()
                missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
                assert not missing, f"the image installs {missing}, which this machine lacks"
                continue
            if arguments.startswith("useradd"):
                continue
            env = {k: v for k, v in os.environ.items() if not k.startswith(("HARKEN_", "PYTHON", "PIP_", "VIRTUAL_ENV"))}
            env.update({k: v for k, v in stage.env.items() if k != "PIP_NO_CACHE_DIR"})
            env["PATH"] = f"{python / 'bin'}:{env['PATH']}"
            done = subprocess.run(["bash", "-c", f"set -e; {stage.map(arguments)}"], cwd=stage.path("."), env=env,
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"RUN {arguments}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(arguments)
        elif keyword == "HEALTHCHECK":
            healthcheck = json.loads(arguments.split(" CMD ", 1)[1])
    return Image(stage, entrypoint, healthcheck, python / "bin")


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Image:
    base = tmp_path_factory.mktemp("docker")
    context = base / "context"     # the build context, as .dockerignore leaves it
    ignored = [line.strip().rsplit("/", 1)[-1] for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(*ignored, "build"))
    return build(ROOT / "Dockerfile", context, base)


async def stream(port: int, token: str, pcm: np.ndarray, language: str):
    messages = [pcm[i:i + 1600].tobytes() for i in range(0, len(pcm), 1600)]
    url = listen_url(f"ws://127.0.0.1:{port}", codec="pcm16", sample_rate=16000, language=language)
    return await stream_messages(url, messages, 0.1, token=token, realtime=False, settle_seconds=10.0, max_wait=180)


async def test_the_images_server_transcribes_diarizes_and_speaks_other_languages(image, tmp_path):
    stage = image.stage
    assert not list((stage.root / "app").glob("harken")), "the build leaves the source in /app"
    installed = subprocess.run([str(image.bin / "pip"), "list", "--format=freeze"], capture_output=True,
                               text=True, check=True).stdout.lower()
    assert "whisper-base-part1" not in installed and "whisper-base-part2" not in installed, \
        "the halves served only the join and should be gone"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HARKEN_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(stage.env)
    env.update(HARKEN_HOST="127.0.0.1", HARKEN_PORT=str(port), PATH=f"{image.bin}:{env['PATH']}")
    data = Path(stage.env["HARKEN_DATA_DIR"])
    data.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "serve.log"
    assert image.entrypoint[:2] == ["harken", "serve"]
    server = subprocess.Popen([str(image.bin / image.entrypoint[0]), *image.entrypoint[1:]], cwd=data, env=env,
                              stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        health = None
        for _ in range(360):
            if server.poll() is not None:
                raise AssertionError(log.read_text()[-3000:])
            if subprocess.run(image.healthcheck, env=env, capture_output=True).returncode == 0:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    health = json.loads(response.read())
                break
            await asyncio.sleep(0.5)
        assert health is not None, "the image's HEALTHCHECK never passed: " + log.read_text()[-3000:]
        assert health["status"] == "ready"
        assert health["optional_models"] == {"speaker_model": "ok", "multilingual_model": "ok"}, health
        def token(uid: str) -> str:
            return subprocess.run([str(image.bin / "harken"), "token", "--uid", uid], env=env, cwd=data, check=True,
                                  capture_output=True, text=True, timeout=60).stdout.strip().splitlines()[-1]
        english = await stream(port, token("docker-en"), two_voices(), "en")
        spanish = await stream(port, token("docker-es"), np.concatenate([read_wav_16k(MULTILINGUAL / "es_pangrama.wav"),
                                                               np.zeros(32000, np.int16)]), "multi")
    finally:
        server.terminate()
        server.wait(60)
    assert english.close_code == 1000, (english.close_code, english.close_reason)
    assert len(english.transcript().split()) > 20
    assert len({s["speaker_id"] for s in english.segments.values()}) >= 2, english.ordered()
    assert spanish.close_code == 1000, (spanish.close_code, spanish.close_reason)
    assert [s.get("language") for s in spanish.ordered()] == ["es"], [(s.get("language"), s["id"], s["text"], s["start"], s["end"]) for s in spanish.ordered()]
    assert "kiwi" in spanish.transcript().lower(), spanish.transcript()
    # The joined model's checksum file is where the image keeps it, not in the data volume.
    assert list(Path(stage.env["HARKEN_MODEL_CACHE_DIR"]).rglob("model.bin.sha256"))
