"""Speech-to-text: providers behind one interface, their selection by language, and failover.

- ``base``: ``Word``, ``StreamConfig``, ``STTStream``, ``Provider``, ``STTError``, ``Link`` (a step of a chain).
- ``selection``: ``build_providers(settings)`` (cloud providers with keys) and
  ``select_chain(language, stt_service, providers, settings)`` → ordered ``Link``s, or
  ``NoProviderError``.
- ``fallback``: ``FallbackStream(links, config, on_status, policy=FallbackPolicy.from_settings(s))``.
- ``word_queue``: ``WordQueue`` and ``StreamFailure``, what every provider stream reports through.
- providers: ``WhisperProvider`` (embedded, ``local``), ``DeepgramProvider``, ``SonioxProvider``,
  ``SpeechmaticsProvider``. They are imported on first use (``harken.stt.DeepgramProvider``), so
  importing this package loads no SDK and no model.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import SAMPLE_RATE, Link, Provider, StreamConfig, STTError, STTStream, Word
from .fallback import FallbackPolicy, FallbackStream
from .word_queue import StreamFailure, WordQueue, retryable_status
from ..audio.replay import ReplayBuffer
from .selection import NoProviderError, build_providers, normalize_language, select_chain

_LAZY = {
    "WhisperProvider": ".whisper",
    "DeepgramProvider": ".deepgram",
    "SonioxProvider": ".soniox",
    "SpeechmaticsProvider": ".speechmatics",
    "UNKNOWN_SPEAKER": ".speechmatics",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "SAMPLE_RATE", "Word", "StreamConfig", "STTStream", "Provider", "STTError",
    "FallbackStream", "FallbackPolicy", "StreamFailure", "WordQueue", "retryable_status", "ReplayBuffer",
    "Link", "NoProviderError", "build_providers", "select_chain", "normalize_language",
    *_LAZY,
]
