"""Recorded speech through a cloud provider's pre-recorded (batch) API, with retries and failover.

Uploads (``sync-local-files``) are transcribed by the configured chain, as live audio is: where
``stt_chain`` puts a cloud provider that has a key and takes the language before ``local``, that
provider's pre-recorded API transcribes the upload's speech (``recorded_providers``: Deepgram
``POST /v1/listen``, Soniox's async files and transcriptions, Speechmatics' batch jobs).

Only speech is sent: the VAD's utterances of a stretch of the recording, one after another with
``GAP_SECONDS`` of silence between them (so no word spans two of them), as one 16 kHz mono WAV.
``SplicedClip`` keeps where each utterance came from and maps the provider's word times back to
the recording's time line. Sending the silence too would cost money and upload time for nothing.

``RecordedChain.transcribe`` tries each cloud link of the chain in order: up to
``stt_retry_attempts`` tries with the live chain's backoff (``FallbackPolicy``) for an error
retrying can fix (5xx, 408/429, a connection lost, a job that failed), at once to the next link
for one it cannot (400/401/402/403); when every cloud link failed it raises ``CloudUnavailable``
and the caller decodes with the embedded engine, so no upload is lost to a provider outage.
"""

from __future__ import annotations

import abc
import asyncio
import bisect
import io
import logging
import wave
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..audio import Utterance
from .base import EMBEDDED_PROVIDER, SAMPLE_RATE, STTError, Word
from .fallback import FallbackPolicy
from .selection import NoProviderError, select_chain

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

GAP_SECONDS = 0.5          # silence between two utterances in a spliced clip


class CloudUnavailable(Exception):
    """No cloud provider of the chain transcribed the clip: decode it with the embedded engine."""


@dataclass(frozen=True)
class RecordedRequest:
    """What a provider is asked for one clip."""

    wav: bytes                      # 16 kHz mono PCM16 WAV
    seconds: float
    language: str                   # normalised code, or "multi"
    model: str | None = None        # the chain entry's model (Deepgram: nova-3 or nova-2 by language)
    reference: str = ""             # for the provider's own logs (no user data)
    vocabulary: tuple[str, ...] = ()  # the user's terms (names, jargon), as a live stream's StreamConfig has them


class RecordedProvider(abc.ABC):
    """A cloud provider's pre-recorded API: one clip in, its words (clip seconds, the provider's
    speaker numbers from 0) out. Raises ``STTError`` (``retryable`` as the failure is)."""

    name: str = "?"

    @abc.abstractmethod
    def supports(self, language: str) -> bool: ...

    @abc.abstractmethod
    async def transcribe(self, request: RecordedRequest) -> list[Word]: ...

    async def aclose(self) -> None:
        """Release connections at shutdown."""


class SplicedClip:
    """Utterances of one recording spliced into one clip, and the way back to recording time."""

    def __init__(self, utterances: Sequence[Utterance], gap_seconds: float = GAP_SECONDS):
        gap = np.zeros(int(gap_seconds * SAMPLE_RATE), dtype=np.int16)
        pieces: list[np.ndarray] = []
        self._clip_starts: list[float] = []        # where each utterance begins in the clip
        self._spans: list[tuple[float, float]] = []  # its (start, duration) in the recording
        position = 0
        for n, utterance in enumerate(utterances):
            if n:
                pieces.append(gap)
                position += gap.size
            self._clip_starts.append(position / SAMPLE_RATE)
            self._spans.append((utterance.start_seconds, utterance.pcm.size / SAMPLE_RATE))
            pieces.append(np.asarray(utterance.pcm, dtype=np.int16))
            position += utterance.pcm.size
        self.pcm = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)

    @property
    def seconds(self) -> float:
        return self.pcm.size / SAMPLE_RATE

    def wav(self) -> bytes:
        out = io.BytesIO()
        with wave.open(out, "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(SAMPLE_RATE)
            writer.writeframes(self.pcm.tobytes())
        return out.getvalue()

    def to_recording(self, words: Sequence[Word]) -> list[Word]:
        """Clip-time words → recording time, each in the utterance its middle falls in (clamped
        to it), made monotonic as the embedded engine's words are."""
        placed: list[Word] = []
        not_before = 0.0
        for word in sorted(words, key=lambda w: w.start):
            middle = (word.start + word.end) / 2
            n = max(0, bisect.bisect_right(self._clip_starts, middle) - 1)
            clip_start, (start, duration) = self._clip_starts[n], self._spans[n]
            begin = start + min(max(word.start - clip_start, 0.0), duration)
            end = start + min(max(word.end - clip_start, 0.0), duration)
            begin = max(begin, not_before)
            end = max(end, begin)
            placed.append(Word(word.text, round(begin, 3), round(end, 3), word.speaker, word.confidence,
                               word.language))
            not_before = end
        return placed


class _Local:
    """The embedded engine's place in the chain (``select_chain`` needs a name and ``supports``)."""

    name = EMBEDDED_PROVIDER

    def supports(self, language: str) -> bool:
        return True


@dataclass(frozen=True)
class CloudWords:
    provider: str
    words: list[Word]               # recording time, the provider's speaker numbers


class RecordedChain:
    """The cloud links of the configured chain for recorded audio."""

    def __init__(self, settings: "Settings", providers: Mapping[str, RecordedProvider],
                 policy: FallbackPolicy | None = None):
        self.settings = settings
        self.providers = dict(providers)
        self.policy = policy or FallbackPolicy.from_settings(settings)
        self.failures: dict[str, int] = {}         # failed tries per provider (logs, tests)

    def links(self, language: str) -> list[tuple[RecordedProvider, str | None]]:
        """``(provider, model)`` of each cloud link before ``local`` for ``language``, in order."""
        if not self.providers:
            return []
        try:
            chain = select_chain(language, None, {**self.providers, EMBEDDED_PROVIDER: _Local()},  # type: ignore[dict-item]
                                 self.settings)
        except NoProviderError:
            return []
        links = []
        for link in chain:
            if link.name == EMBEDDED_PROVIDER:
                break
            links.append((link.provider, link.overrides.get("extra", {}).get("model")))
        return links

    async def transcribe(self, clip: SplicedClip, language: str, reference: str = "",
                         vocabulary: Sequence[str] = ()) -> CloudWords:
        """The clip's words in recording time from the first link that transcribes it (each
        given the user's ``vocabulary``); raises ``CloudUnavailable`` when none did (or none is
        configured for the language)."""
        links = self.links(language)
        if not links:
            raise CloudUnavailable(f"no cloud provider for {language}")
        wav = clip.wav()
        problems = []
        for provider, model in links:
            request = RecordedRequest(wav, clip.seconds, language, model, reference, tuple(vocabulary))
            for attempt in range(self.policy.retry_attempts):
                try:
                    words = await provider.transcribe(request)
                except Exception as exc:  # noqa: BLE001 - an SDK's surprise must not lose the upload
                    failure = exc if isinstance(exc, STTError) else STTError(f"{type(exc).__name__}: {exc}")
                    self.failures[provider.name] = self.failures.get(provider.name, 0) + 1
                    log.warning("recorded audio: %s failed (try %d of %d): %s", provider.name, attempt + 1,
                                self.policy.retry_attempts, failure)
                    problems.append(f"{provider.name}: {failure}")
                    if not failure.retryable:
                        break
                    if attempt + 1 < self.policy.retry_attempts:
                        await asyncio.sleep(self.policy.backoff(attempt))
                    continue
                return CloudWords(provider.name, clip.to_recording(words))
        raise CloudUnavailable("; ".join(problems))

    async def aclose(self) -> None:
        for provider in self.providers.values():
            await provider.aclose()

