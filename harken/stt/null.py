"""The null provider: scripted words on the audio clock, no speech engine at all.

For measuring the gateway's own cost (``harken loadtest``, ``bench/bench_scale.py``): a stream
emits one word per ``WORD_SECONDS`` of audio *received*, timed from the samples it was sent, so
what a client sees depends only on the gateway's path (decode, merge, 600 ms flush, send) and not
on an engine's speed. Each word's text names its end in stream time (``t1200`` = 1.2 s), so a
client that remembers when it sent each frame can compute segment latency from the text alone,
even after segments merge. Every ``WORDS_PER_SENTENCE``-th word ends a sentence, so segments stop
growing past Omi's long-segment limit as they would with real speech.

Reached only with ``stt_service=null`` and the ``null_provider`` setting on; off by default, the
gateway then rejects ``stt_service=null`` like any unknown provider.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, AsyncIterator

import numpy as np

from .base import SAMPLE_RATE, Provider, StreamConfig, STTStream, Word
from .word_queue import WordQueue

if TYPE_CHECKING:
    from ..config import Settings

NAME = "null"
WORD_SECONDS = 0.3
WORDS_PER_SENTENCE = 8
_WORD_TEXT = re.compile(r"\bt(\d+)\b")


def word_text(end_ms: int, ends_sentence: bool) -> str:
    return f"t{end_ms}." if ends_sentence else f"t{end_ms}"


def audio_times(text: str) -> list[float]:
    """The stream times (seconds) named by the null words in a segment's ``text``, in order."""
    return [int(ms) / 1000 for ms in _WORD_TEXT.findall(text)]


class NullProvider(Provider):
    name = NAME

    def __init__(self, settings: "Settings | None" = None, word_seconds: float = WORD_SECONDS):
        self.word_seconds = word_seconds

    def supports(self, language: str) -> bool:
        return True

    async def open(self, config: StreamConfig) -> "NullStream":
        return NullStream(round(self.word_seconds * config.sample_rate), config.sample_rate)


class NullStream(STTStream):
    provider_name = NAME
    immediate_send = True

    def __init__(self, word_samples: int, sample_rate: int = SAMPLE_RATE):
        self._word_samples = word_samples
        self._sample_rate = sample_rate
        self._received = 0                 # samples sent so far: this stream's clock
        self._next_end = word_samples      # sample at which the next word ends
        self._count = 0
        self._closed = False
        self._words = WordQueue()

    @property
    def settled_until(self) -> float:
        return self._words.settled_until

    async def send(self, pcm: np.ndarray) -> None:
        self.send_nowait(pcm)

    def send_nowait(self, pcm: np.ndarray) -> None:
        if self._closed:
            return
        self._received += len(pcm)
        if self._received < self._next_end:
            return
        while self._received >= self._next_end:
            self._count += 1
            start, end = (self._next_end - self._word_samples) / self._sample_rate, self._next_end / self._sample_rate
            self._words.put(Word(word_text(round(end * 1000), self._count % WORDS_PER_SENTENCE == 0), start, end))
            self._next_end += self._word_samples
        # Final up to the last word's end: a failover would replay only what follows it.
        self._words.settle((self._next_end - self._word_samples) / self._sample_rate)

    async def finalize(self) -> None:
        """Nothing is pending: a word exists only once all of its audio has arrived."""

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._words.end()

    def __aiter__(self) -> AsyncIterator[Word]:
        return self._words.__aiter__()
