"""The one interface every speech-to-text provider implements.

A provider opens streams; a stream takes PCM16 mono 16 kHz audio with ``send`` and yields
*final* words with ``async for``. Word times are seconds of *stream* time: 0.0 is the first
sample the stream was sent. The session maps stream time onto its audio clock (a stream opened
after a failover starts at a later clock position).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, NamedTuple

import numpy as np

SAMPLE_RATE = 16000
# The embedded Whisper engine's provider name (in chains, segments' stt_provider, usage).
EMBEDDED_PROVIDER = "local"
# A sentence ends in one of these (English, CJK, Arabic/Urdu, Hindi/Sanskrit full stops), as in Omi.
SENTENCE_ENDERS = frozenset(".?!。！？؟۔।॥")


@dataclass(frozen=True, slots=True)
class Word:
    text: str           # as the engine punctuated it ("Hello," / "there.")
    start: float        # seconds of stream time
    end: float
    speaker: int = 0    # diarized speaker index; 0 when the engine has no diarization
    confidence: float = 1.0
    language: str | None = None   # the language the engine heard, when it identifies one (multi)

    def shifted(self, offset: float) -> "Word":
        return Word(self.text, self.start + offset, self.end + offset, self.speaker, self.confidence, self.language)


@dataclass(frozen=True, slots=True)
class Partial:
    """Provisional words of the utterance a stream is still hearing, yielded between final words.

    Each ``Partial`` replaces the one before it; an empty one withdraws it (its utterance's final
    words came, or it was dropped). Only the embedded engine makes them (the stable prefix of its
    re-decodes of the open utterance); they are shown to the client and never stored.
    """

    words: tuple[Word, ...] = ()

    def shifted(self, offset: float) -> "Partial":
        return Partial(tuple(w.shifted(offset) for w in self.words))


@dataclass(frozen=True)
class StreamConfig:
    language: str = "en"          # BCP-47 code or "multi"
    sample_rate: int = SAMPLE_RATE
    diarize: bool = True
    session_id: str = ""          # for logs only
    vocabulary: tuple[str, ...] = ()   # the user's terms (names, jargon) the engine should favour
    extra: dict = field(default_factory=dict)


class STTError(Exception):
    """A provider failed. ``retryable`` says whether trying the same provider again can help."""

    def __init__(self, message: str, *, retryable: bool = True, code: int | str | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.code = code


class STTStream(abc.ABC):
    """One live transcription stream. Not thread-safe: use from one event loop."""

    provider_name: str = "?"
    #: True when ``send`` never awaits anything: then ``send_nowait`` does the same without a
    #: coroutine, and ``FallbackStream`` feeds the stream straight from the session's read
    #: callback instead of waking its feeder task for every piece of audio.
    immediate_send: bool = False

    @abc.abstractmethod
    async def send(self, pcm: np.ndarray) -> None:
        """Queue int16 samples (16 kHz mono). Never blocks on the engine."""

    def send_nowait(self, pcm: np.ndarray) -> None:
        """``send`` for streams with ``immediate_send``."""
        raise NotImplementedError(f"{type(self).__name__} has no synchronous send")

    @abc.abstractmethod
    async def finalize(self) -> None:
        """Ask the engine to emit everything it has heard so far as final words."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finalize, let the last words out through iteration, then release everything."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[Word]:
        """Final words in stream-time order; ends after ``close`` or raises ``STTError``.

        A stream may also yield ``Partial``s (provisional words of the open utterance)."""


class Provider(abc.ABC):
    name: str = "?"

    @abc.abstractmethod
    def supports(self, language: str) -> bool: ...

    @abc.abstractmethod
    async def open(self, config: StreamConfig) -> STTStream: ...

    def describe(self, language: str) -> str:
        """How this provider transcribes ``language``, for ``ready``'s reason (e.g. which model)."""
        return self.name

    async def aclose(self) -> None:
        """Release shared resources (models, thread pools) at server shutdown."""


class Link(NamedTuple):
    """One step of a fallback chain: a provider and how to open it for this language."""

    provider: Provider
    overrides: Mapping[str, Any]   # StreamConfig fields to replace; "extra" is merged, not replaced

    @property
    def name(self) -> str:
        return self.provider.name

    def stream_config(self, base: StreamConfig) -> StreamConfig:
        changes = dict(self.overrides)
        changes["extra"] = {**base.extra, **changes.get("extra", {})}
        return dataclasses.replace(base, **changes)


def speech_seconds(stream: STTStream | None) -> float:
    """Seconds of speech a stream heard, for usage: its VAD's count (``stats.speech_seconds``: the
    embedded engine, the VAD gate), else what it computes itself (``FallbackStream``)."""
    stats = getattr(stream, "stats", None)
    if stats is not None:
        return float(stats.speech_seconds)
    return float(getattr(stream, "speech_seconds", 0.0) or 0.0)
