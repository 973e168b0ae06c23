"""Compile the native extensions in place: ``python -m harken.native.build``.

dev.sh and the Dockerfile run this once at setup; it needs a C compiler and the Python headers
(Debian: gcc, python3-dev), not libopus's headers (opus_reader.c calls the libopus that opuslib
loaded). Without the compiled module Harken runs the same audio through its Python path, slower
(``harken.native.opus_reader`` is then None; the server says so in its log at startup).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = {"_opus_reader": "opus_reader.c", "_lc3_probe": "lc3_probe.c"}


def target(name: str) -> Path:
    return HERE / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"


def compile_module(name: str, source: Path) -> Path:
    out = target(name)
    compiler = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    command = [*compiler, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-std=c11", "-D_POSIX_C_SOURCE=200809L",
               f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(out)]
    subprocess.run(command, check=True)
    return out


def main() -> int:
    for name, source in MODULES.items():
        print(f"built {compile_module(name, HERE / source).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
