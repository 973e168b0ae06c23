"""One STT stream per channel of a phone call, seen by the session as one stream.

The session passes on the *mix* of the channels (its clock, ring and audio webhook run on it);
each channel stream gets that channel's own samples of the same stretch, which the channel
demultiplexer (codecs/channels.py) kept aside: ``take_channels()`` is called for every piece the
session sends, so all streams stay on the session's audio clock. Every word is labelled with the
speaker index of the channel it came from; the streams' words are merged as they come (the
segment builder orders them by time).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from .base import Partial, STTStream, Word, speech_seconds

_DONE = object()


@dataclass
class _Stats:
    speech_seconds: float


class ChannelStreams(STTStream):
    def __init__(self, streams: Sequence[STTStream], speakers: Sequence[int],
                 take_channels: Callable[[], list[np.ndarray]]):
        self.streams = list(streams)
        self.speakers = list(speakers)
        self._take = take_channels
        self.immediate_send = all(s.immediate_send for s in self.streams)
        self.provider_name = getattr(self.streams[0], "provider_name", "?")
        # Words are pumped out of every stream by tasks that outlive any one iteration: the
        # session iterates once live and once more at teardown, and a word must not be lost in
        # between.
        self._words: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._running = 0

    @property
    def stats(self) -> _Stats:
        return _Stats(sum(speech_seconds(s) for s in self.streams))

    def send_nowait(self, pcm: np.ndarray) -> None:
        for stream, samples in zip(self.streams, self._take()):
            if len(samples):
                stream.send_nowait(samples)

    async def send(self, pcm: np.ndarray) -> None:
        for stream, samples in zip(self.streams, self._take()):
            if len(samples):
                await stream.send(samples)

    async def finalize(self) -> None:
        await asyncio.gather(*(s.finalize() for s in self.streams))

    async def close(self) -> None:
        self._start_pumps()
        try:
            await asyncio.gather(*(s.close() for s in self.streams))
        except asyncio.CancelledError:
            # The session gave up waiting for the last words (its close timeout): stop pumping.
            for pump in self._pumps:
                pump.cancel()
            raise

    def _start_pumps(self) -> None:
        if self._pumps:
            return
        self._running = len(self.streams)
        self._pumps = [asyncio.create_task(self._pump(stream, speaker), name=f"channel-{speaker}")
                       for stream, speaker in zip(self.streams, self.speakers)]

    async def _pump(self, stream: STTStream, speaker: int) -> None:
        try:
            async for word in stream:
                if isinstance(word, Partial):   # one builder shows one utterance's provisional words: not per channel
                    continue
                provider = getattr(stream, "provider_name", None) or self.provider_name
                self._words.put_nowait((Word(word.text, word.start, word.end, speaker, word.confidence), provider))
        except Exception as exc:          # STTError: every provider of this channel's chain failed
            self._words.put_nowait(exc)
        self._words.put_nowait(_DONE)

    async def __aiter__(self) -> AsyncIterator[Word]:
        self._start_pumps()
        while self._running:
            item = await self._words.get()
            if item is _DONE:
                self._running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                word, self.provider_name = item
                yield word
