"""Shared fixtures: a running gateway on loopback, test audio, tokens."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from harken.client import read_wav_16k
from harken.config import Settings

from .gateway_server import GatewayServer

DATA = Path(__file__).parent / "data"
AUDIO = DATA / "audio"


def transcripts() -> list[dict]:
    with open(AUDIO / "transcripts.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load_audio(name: str) -> np.ndarray:
    return read_wav_16k(AUDIO / name)


def test_settings(tmp_path: Path, **changes) -> Settings:
    """Settings for a server under test: local auth, its own data folder, any port. Audio is
    not paced to real time (tests stream recordings as fast as they can); test_hardening.py
    tests the pacing with the setting on."""
    base = Settings(data_dir=tmp_path, port=0, log_level="warning", audio_realtime_factor=0)
    return base.replace(**changes)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory) -> GatewayServer:
    """One server with default session settings, shared by the tests that need nothing special."""
    server = GatewayServer(test_settings(tmp_path_factory.mktemp("gateway")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_gateway(tmp_path):
    """Start servers with particular settings; all are stopped at the end of the test."""
    started: list[GatewayServer] = []

    def make(**changes) -> GatewayServer:
        server = GatewayServer(test_settings(tmp_path / f"g{len(started)}", **changes)).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
