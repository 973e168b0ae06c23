"""The embedded engine's final words for a recording, as one gateway stream gets them, offline.

``engine_utterances`` replays a recording through the stream's own parts on a simulated clock:
its cuts (``harken.stt.cutting.UtteranceCutter`` with the server's settings, fed 40 ms pieces
as the session passes each message of the client on), which decode it starts when (``harken.stt.whisper.decode_due``, with
an ``EngineLoad`` on the simulated wall clock), a pool of ``whisper_workers`` whose every decode
takes ``decode_seconds`` of wall time (the recording goes by at ``speed`` times that), the
finals decoded one at a time in order, a pause decode that ends its utterance at a finished
sentence when it comes back, or serves as the final, and ``place_words``. Provisional decodes
are not run (their words are never final), but they take their worker for their time, and a
pause decode waits for them as it does in the gateway.

Only the pause decodes and the finals run Whisper; the result is cached under the temporary
folder (``harken-replica/``), keyed by everything that changes it: the settings, the decode
time, the pace, and this and the engine's cutting and decoding code.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import heapq
import itertools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from harken.config import Settings

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
PIECE = RATE * 40 // 1000
REPLICA_CACHE = Path(tempfile.gettempdir()) / "harken-replica"
# The code whose change changes the replica's cuts or words: its text is part of the cache key.
REPLICA_CODE = ("harken/audio/vad.py", "harken/stt/cutting.py", "harken/stt/decoding.py", "harken/stt/whisper.py",
                "bench/engine_replica.py")


@dataclass
class EngineUtterance:
    """One final decode of the embedded engine: when its words reach the session (audio clock)
    and the words, as ``WhisperStream`` yields them."""

    arrival: float
    words: list


def replica_key(path: Path, settings: Settings, decode_seconds: float, speed: float) -> str:
    """The cache name of one recording's decodes (see the module doc)."""
    code = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in REPLICA_CODE)).hexdigest()[:12]
    return (f"{path.stem}-{path.stat().st_size}-{settings.whisper_model}-{settings.whisper_window_s}-"
            f"{settings.whisper_beam_size}-{settings.endpoint_silence_ms}-{settings.endpoint_pause_ms}-"
            f"{settings.max_utterance_s}-{settings.vad_threshold}-{settings.vad_onset_threshold}-"
            f"{settings.vad_onset_ms}-{settings.partial_interval}-"
            f"{settings.whisper_workers}w-{decode_seconds:g}s-{speed:g}x-{code}")


@dataclass(eq=False)
class _Decode:
    """One decode in the simulated pool: its words (None for a provisional one, never run) and
    whether it is back."""

    raw: list | None
    done: bool = False
    then: list[Callable[[float], None]] = field(default_factory=list)    # called with the time it is back


class _Replay:
    """One stream of the gateway on a simulated clock (audio seconds; the wall clock is that
    over ``speed``): what ``WhisperStream`` does around its cutter, in the order it does it."""

    def __init__(self, provider, decoding, model, settings: Settings, decode_seconds: float, speed: float):
        from harken.audio.vad import StreamingVAD
        from harken.stt.whisper import EngineLoad, utterance_cutter

        self.provider, self.decoding, self.model = provider, decoding, model
        self.speed = speed
        self.decode_seconds = decode_seconds
        self.latency = decode_seconds * speed                  # audio that goes by during a decode
        self.partial_interval = settings.partial_interval
        self.cutter = utterance_cutter(settings, StreamingVAD(), model)
        self.load = EngineLoad(settings.whisper_workers)
        self.now = 0.0
        self.events: list = []                                  # (audio time, order, callback)
        self.order = itertools.count()
        self.workers_free = settings.whisper_workers
        self.waiting: collections.deque[_Decode] = collections.deque()   # the pool's queue
        self.finals: collections.deque = collections.deque()    # (utterance, decode or None)
        self.finals_outstanding = 0
        self.final_running = False
        self.partial_running = False
        self.last_end = 0.0
        self.out: list[EngineUtterance] = []
        self.counts = collections.Counter()                     # what happened, for the log line
        self.whisper_seconds = 0.0                              # the real decodes' time, this machine

    # --- the clock and the pool ------------------------------------------------------------
    def run_until(self, time: float) -> None:
        """Everything that happens before ``time``, in order."""
        while self.events and self.events[0][0] < time:
            when, _, callback = heapq.heappop(self.events)
            self.now = when
            callback()
        self.now = time

    def submit(self, utterance, *, provisional: bool = False) -> _Decode:
        raw = None
        if not provisional:
            raw, seconds, _ = self.provider.decode_clip(utterance.pcm, self.decoding, self.model)
            self.whisper_seconds += seconds
            self.counts["whisper decodes"] += 1
        decode = _Decode(raw)
        self.load.started()
        if self.workers_free:
            self._start(decode)
        else:
            self.waiting.append(decode)
        return decode

    def _start(self, decode: _Decode) -> None:
        self.workers_free -= 1
        heapq.heappush(self.events, (self.now + self.latency, next(self.order), lambda: self._back(decode)))

    def _back(self, decode: _Decode) -> None:
        self.workers_free += 1
        self.load.finished(self.decode_seconds, now=self.now / self.speed)
        decode.done = True
        if self.waiting:
            self._start(self.waiting.popleft())
        for then in decode.then:
            then(self.now)

    # --- the stream ------------------------------------------------------------------------
    def send(self, pcm: np.ndarray) -> None:
        """``WhisperStream.send_nowait``: feed, queue the finals, then the provisional work."""
        from harken.stt.whisper import PAUSE_DECODE, decode_due

        for ended in self.cutter.feed(pcm):
            self.queue(ended.utterance, ended.decode)
        cutter = self.cutter
        if not cutter.in_utterance:
            return
        pause = cutter.pause
        due = decode_due(cutter, self.load, now=self.now / self.speed, finals_outstanding=self.finals_outstanding,
                         partial_running=self.partial_running,
                         pause_running=pause is not None and not pause.decode.done,
                         partial_interval=self.partial_interval, audio_ahead_s=self.now - self.now / self.speed)
        if due is None:
            return
        kind, utterance = due
        self.counts[f"{kind} decodes"] += 1
        if kind is PAUSE_DECODE:
            decode = self.submit(utterance)
            cutter.pause_decode_started(utterance, decode)
            decode.then.append(lambda _: self.pause_back(utterance, decode))
        else:
            self.partial_running = True
            self.submit(utterance, provisional=True).then.append(self.partial_back)

    def partial_back(self, _time: float) -> None:
        self.partial_running = False

    def pause_back(self, utterance, decode: _Decode) -> None:
        """``WhisperStream._on_pause_decode``: the sentence-end cut."""
        ended = self.cutter.pause_decode_back(utterance, decode.raw)
        if ended is not None:
            self.counts["sentence-end cuts"] += 1
            self.queue(ended.utterance, ended.decode)

    def queue(self, utterance, decode: _Decode | None) -> None:
        """``WhisperStream._queue``: finals are decoded one at a time, in order."""
        from harken.stt.whisper import MIN_SPEECH_SECONDS

        if utterance.speech_seconds < MIN_SPEECH_SECONDS:
            return
        self.counts["finals"] += 1
        self.counts["pause decodes reused"] += decode is not None
        self.finals.append((utterance, decode))
        self.finals_outstanding += 1
        self.next_final()

    def next_final(self) -> None:
        """``WhisperStream._decode_in_order``."""
        while not self.final_running and self.finals:
            utterance, decode = self.finals.popleft()
            if decode is None:
                decode = self.submit(utterance)
            if not decode.done:
                self.final_running = True
                decode.then.append(lambda time, u=utterance, d=decode: self.final_back(u, d))
                return
            self.emit(utterance, decode)

    def final_back(self, utterance, decode: _Decode) -> None:
        self.final_running = False
        self.emit(utterance, decode)
        self.next_final()

    def emit(self, utterance, decode: _Decode) -> None:
        from harken.stt.whisper import place_words

        self.finals_outstanding -= 1
        words = place_words(decode.raw, utterance, self.last_end)
        if words:
            self.last_end = words[-1].end
            self.out.append(EngineUtterance(self.now, words))


def engine_utterances(path: Path, pcm: np.ndarray, decode_seconds: float, speed: float,
                      message_seconds: float) -> list[EngineUtterance]:
    """The embedded engine's final words for ``pcm`` as a stream of the gateway gets them, each
    decode taking ``decode_seconds`` of wall time at ``speed`` times real time, the audio sent
    in messages of ``message_seconds`` (the session passes a message's 40 ms pieces on as it
    comes, so the stream hears each piece when the message holding its end arrives; see the
    module doc). Taken from the on-disk cache when there."""
    from harken.stt.base import Word
    from harken.stt.decoding import Decoding, utterance_lead
    from harken.stt.whisper import WhisperProvider

    settings = Settings.from_env()      # HARKEN_* as the gateway reads them (HARKEN_VAD_THRESHOLD, ...)
    cache_file = REPLICA_CACHE / f"{replica_key(path, settings, decode_seconds, speed)}-{message_seconds:g}m.json"
    if cache_file.exists():
        return [EngineUtterance(u["arrival"], [Word(*w) for w in u["words"]])
                for u in json.loads(cache_file.read_text())]
    provider = WhisperProvider(settings)
    asyncio.run(provider.load())
    model = provider._model
    decoding = Decoding("en", window_s=settings.whisper_window_s, lead_s=utterance_lead(model))
    replay = _Replay(provider, decoding, model, settings, decode_seconds, speed)
    message = int(round(message_seconds * RATE))
    for i in range(0, pcm.size, PIECE):
        replay.run_until(-(-min(i + PIECE, pcm.size) // message) * message / RATE)
        replay.send(pcm[i:i + PIECE])
    ended = replay.cutter.flush()
    if ended is not None:
        replay.queue(ended.utterance, ended.decode)
    replay.run_until(float("inf"))
    counts = replay.counts
    print(f"  {path.stem}: engine replayed: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; a Whisper decode took {replay.whisper_seconds / max(1, counts['whisper decodes']):.2f} s here",
          flush=True)
    REPLICA_CACHE.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps([{"arrival": u.arrival, "words": [dataclasses.astuple(w) for w in u.words]}
                                      for u in replay.out]))
    return replay.out
