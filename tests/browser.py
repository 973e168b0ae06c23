"""Headless Debian Chromium driven by Playwright, with a fake microphone playing a WAV file.

Playwright's own browser downloads are not used (nothing may download here): it drives the
system's ``/usr/bin/chromium``. The flags keep Chromium from reaching for the network (this
machine has none; without them it stalls on refused connections) and let a page use the
microphone without a permission prompt.
"""

from __future__ import annotations

import contextlib
import wave
from pathlib import Path
from typing import Iterator

import numpy as np

CHROMIUM = Path("/usr/bin/chromium")

QUIET_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def chromium_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can. Only the browser may be
    missing (a machine without the Debian package); a missing Python ``playwright`` is a set-up
    error and fails loudly instead."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install chromium"
    return None


def write_microphone_wav(path: Path, pieces: list[np.ndarray], gap_seconds: float = 1.0) -> Path:
    """16-bit mono 16 kHz WAV of ``pieces`` with silence around each (Chromium loops the file,
    so the silence also separates one pass from the next)."""
    gap = np.zeros(int(16000 * gap_seconds), np.int16)
    audio = np.concatenate([part for piece in pieces for part in (gap, piece.astype(np.int16))] + [gap])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(audio.astype("<i2").tobytes())
    return path


@contextlib.contextmanager
def chromium(profile_dir: Path, microphone_wav: Path | None = None, extra_args: list[str] = ()) -> Iterator:
    """A Playwright browser context on a fresh profile; with ``microphone_wav``, the page's
    microphone plays that file (looped) and the permission prompt is answered yes."""
    from playwright.sync_api import sync_playwright

    args = list(QUIET_FLAGS)
    if microphone_wav is not None:
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={microphone_wav}",
                 "--autoplay-policy=no-user-gesture-required"]
    args += list(extra_args)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir), executable_path=str(CHROMIUM), headless=True, args=args,
            viewport={"width": 1000, "height": 800}, timeout=30_000,
        )
        try:
            yield context
        finally:
            context.close()
