"""What an installed wheel says its files are: the sha256 its RECORD gives for a file, so that a
model file shipped in a wheel pinned by hash (requirements-models.txt) can be checked without a
digest copied into the source."""

from __future__ import annotations

import base64
import importlib.metadata


class NotRecorded(Exception):
    """The distribution is missing, another version, or records no sha256 for the file."""


def recorded_sha256(distribution: str, version: str, file_name: str) -> str:
    """The hex sha256 that ``distribution`` (which must be ``version``) records for its file named
    ``file_name``."""
    try:
        installed = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise NotRecorded(f"{distribution} is not installed") from None
    if installed.version != version:
        raise NotRecorded(f"{distribution} {installed.version} is installed, {version} is needed "
                          "(requirements-models.txt)")
    recorded = next((f.hash for f in installed.files or () if f.name == file_name and f.hash), None)
    if recorded is None or recorded.mode != "sha256":
        raise NotRecorded(f"the installed {distribution} records no sha256 for {file_name}: reinstall it "
                          "from requirements-models.txt")
    return base64.urlsafe_b64decode(recorded.value + "=" * (-len(recorded.value) % 4)).hex()
