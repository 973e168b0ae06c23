"""Speaking streams: real recordings with pauses, per utterance latency and accuracy, capacity.

``harken loadtest --speech-dir DIR`` (and ``bench/bench_stream.py``) drive a server's own engine
with real speech: each stream is one user reading the recordings of ``DIR`` (WAVs listed with
their reference text in ``DIR/transcripts.tsv``, as in ``tests/data/audio``) one after another,
each followed by ``pause`` seconds of silence, at real-time pace. Streams start ``pause`` /
``streams`` apart and each starts at a different recording, so they do not speak in step.

Measured on the wire, as the app sees it (the app upserts segments by id), per utterance:

- **final latency**: from the end of the utterance's speech (sent at real time) to the moment the
  client's transcript last changed before the next utterance began (0 if the words were already
  shown before the speech ended). An utterance whose words are not back before its successor
  began (plus ``LATE_GRACE``) is *late*: at real time it never catches up, so it counts as lost.
- **first shown**: for each word, from the moment it was spoken (its end, from ``word_times``
  when given, else the words spread evenly over the utterance's speech) to the first moment the
  client showed that many words of the utterance.
- **WER** of each stream's final transcript against the references of what it sent.

``capacity`` runs rising stream counts and reports the largest that holds a final-latency p95
target with no late utterance, no failed stream and WER within a margin of the one-stream run.
"""

from __future__ import annotations

import asyncio
import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import orjson
import websockets

from .client import device_messages, listen_url, read_wav_16k
from .wer import normalize, word_errors

LATE_GRACE = 0.3          # seconds after the next utterance's start that a final may still arrive
SETTLE = 2.0              # after its last frame, the client closes once nothing changed for this long
SETTLE_WORDS = 0.7        # ... and it holds this share of the references' words (late finals count
MAX_WAIT = 30.0           # for WER), or at the latest this many seconds after its last frame
ALL_WORDS = 0.9           # the share of the references' words that says every utterance is back:
LONG_SETTLE = 12.0        # with fewer, the client waits this long for nothing to change
SAMPLE_RATE = 16000


@dataclass
class Clip:
    name: str
    pcm: np.ndarray                     # int16, 16 kHz
    reference: str
    speech: tuple[float, float]         # first and last second of speech in the clip
    word_times: list[float] | None = None   # end of each spoken word, seconds in the clip


def load_clips(folder: Path, speech_bounds: Callable[[np.ndarray], tuple[float, float]] | None = None) -> list[Clip]:
    """The recordings of ``folder/transcripts.tsv`` (columns ``file`` and ``reference``)."""
    bounds = speech_bounds or vad_speech_bounds
    with open(folder / "transcripts.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clips = []
    for row in rows:
        pcm = read_wav_16k(folder / row["file"])
        clips.append(Clip(row["file"], pcm, row["reference"], bounds(pcm)))
    return clips


def vad_speech_bounds(pcm: np.ndarray) -> tuple[float, float]:
    """First and last second of speech by the Silero VAD (the server's own)."""
    from .audio import speech_spans

    spans = speech_spans(pcm, pad_ms=0)
    if not spans:
        return 0.0, pcm.size / SAMPLE_RATE
    return spans[0][0] / SAMPLE_RATE, spans[-1][1] / SAMPLE_RATE


@dataclass
class Utterance:
    clip: Clip
    start: float                        # stream seconds where the clip starts
    speech_start: float
    speech_end: float


@dataclass
class SpeakerOutcome:
    """One stream: what it sent, every transcript view it received, what it measured."""

    index: int
    utterances: list[Utterance] = field(default_factory=list)
    views: list[tuple[float, list[str]]] = field(default_factory=list)   # (arrival, normalized transcript)
    frame_sent_at: np.ndarray = field(default_factory=lambda: np.zeros(0))
    message_seconds: float = 0.1
    failure: str | None = None
    final_latencies: list[float] = field(default_factory=list)
    first_shown: list[float] = field(default_factory=list)
    late: int = 0
    errors: int = 0
    words: int = 0

    def sent_at(self, audio_seconds: float) -> float:
        """When the frame holding ``audio_seconds`` of audio went out."""
        index = min(max(0, int(np.ceil(audio_seconds / self.message_seconds - 1e-6)) - 1), self.frame_sent_at.size - 1)
        return float(self.frame_sent_at[index])

    def analyse(self) -> None:
        if not self.views or self.failure:
            return
        arrivals = np.array([t for t, _ in self.views])
        owed = 0        # words of earlier late utterances, still to come (estimated by their references)
        for k, utterance in enumerate(self.utterances):
            began = self.sent_at(utterance.speech_start)
            ended = self.sent_at(utterance.speech_end)
            following = self.utterances[k + 1].speech_start if k + 1 < len(self.utterances) else None
            until = self.sent_at(following) + LATE_GRACE if following is not None else np.inf
            base = self._view_at(arrivals, began)
            window = [(t, words) for t, words in self.views if began <= t < until]
            last = window[-1][1] if window else base
            added = len(last) - len(base)          # words added to the transcript in this window
            expected = len(normalize(utterance.clip.reference))
            if added - owed < max(1, expected // 2):
                self.late += 1                      # its words are not back (a late predecessor's may be)
                owed += expected
                continue
            base_words, owed = len(base) + owed, 0
            settled_at = next(t for t, words in window if words == last)
            self.final_latencies.append(max(0.0, settled_at - ended))
            spoken = utterance.clip.word_times or _even_times(utterance)
            for i, spoken_at in enumerate(spoken[:len(last) - base_words]):
                shown = next((t for t, words in window if len(words) - base_words >= i + 1), None)
                if shown is not None:
                    self.first_shown.append(max(0.0, shown - self.sent_at(utterance.start + spoken_at)))
        reference = " ".join(u.clip.reference for u in self.utterances)
        self.errors, self.words = word_errors(reference, " ".join(self.views[-1][1]))

    def _view_at(self, arrivals: np.ndarray, t: float) -> list[str]:
        index = int(np.searchsorted(arrivals, t, side="right")) - 1
        return self.views[index][1] if index >= 0 else []


def _even_times(utterance: Utterance) -> list[float]:
    n = max(1, len(normalize(utterance.clip.reference)))
    a, b = utterance.clip.speech
    return [a + (b - a) * (i + 1) / n for i in range(n)]


@dataclass
class SpeechReport:
    streams: int
    outcomes: list[SpeakerOutcome]
    wall_seconds: float

    def _all(self, name: str) -> np.ndarray:
        return np.array([x for o in self.outcomes for x in getattr(o, name)], dtype=float)

    def percentiles(self, name: str) -> dict[str, float]:
        values = self._all(name)
        if not values.size:
            return {}
        return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
                "max": float(values.max())}

    @property
    def utterances(self) -> int:
        return sum(len(o.utterances) for o in self.outcomes)

    @property
    def late(self) -> int:
        return sum(o.late for o in self.outcomes)

    @property
    def failures(self) -> list[str]:
        return [o.failure for o in self.outcomes if o.failure]

    @property
    def wer(self) -> float:
        words = sum(o.words for o in self.outcomes)
        return sum(o.errors for o in self.outcomes) / words if words else float("nan")

    def line(self) -> str:
        final, shown = self.percentiles("final_latencies"), self.percentiles("first_shown")
        fmt = lambda d: " / ".join(f"{d[k]:.2f}" for k in ("p50", "p95", "max")) if d else "-"
        return (f"{self.streams:>3} streams: final p50/p95/max {fmt(final)} s   first shown {fmt(shown)} s   "
                f"WER {self.wer:6.1%}   late {self.late}/{self.utterances}   failed {len(self.failures)}")


async def run_speakers(url: str, clips: Sequence[Clip], streams: int, *, utterances: int = 6, pause: float = 4.0,
                       codec: str = "pcm16", sample_rate: int = 16000, language: str = "en",
                       uid_prefix: str = "", tokens: Callable[[int], str | None] | None = None,
                       open_timeout: float = 60.0) -> SpeechReport:
    """``streams`` users at once, each reading ``utterances`` recordings with ``pause`` s between.

    The streams start at recordings spread evenly over ``clips`` (not at neighbouring ones), so
    a level's WER is measured over as many different recordings as it reads."""
    started = time.monotonic()
    outcomes = await asyncio.gather(*(
        _speak(i, url, clips, utterances, pause, codec, sample_rate, language, uid_prefix,
               tokens(i) if tokens else None, open_timeout, start_delay=pause * i / streams,
               first_clip=i * len(clips) // streams)
        for i in range(streams)))
    for outcome in outcomes:
        outcome.analyse()
    return SpeechReport(streams, list(outcomes), time.monotonic() - started)


def _schedule(first: int, clips: Sequence[Clip], utterances: int, pause: float) -> tuple[np.ndarray, list[Utterance]]:
    silence = np.zeros(int(pause * SAMPLE_RATE), np.int16)
    parts, plan, at = [silence[: SAMPLE_RATE // 2]], [], 0.5
    for k in range(utterances):
        clip = clips[(first + k) % len(clips)]
        plan.append(Utterance(clip, at, at + clip.speech[0], at + clip.speech[1]))
        parts += [clip.pcm, silence]
        at += clip.pcm.size / SAMPLE_RATE + pause
    return np.concatenate(parts), plan


async def _speak(index: int, url: str, clips: Sequence[Clip], utterances: int, pause: float, codec: str,
                 sample_rate: int, language: str, uid_prefix: str, token: str | None, open_timeout: float,
                 start_delay: float, first_clip: int) -> SpeakerOutcome:
    pcm, plan = _schedule(first_clip, clips, utterances, pause)
    messages, seconds = device_messages(pcm, codec, sample_rate)
    outcome = SpeakerOutcome(index, plan, message_seconds=seconds, frame_sent_at=np.full(len(messages), np.nan))
    await asyncio.sleep(start_delay)
    full_url = listen_url(url, codec=codec, sample_rate=sample_rate, language=language,
                          uid=f"{uid_prefix}{index}" if uid_prefix else None)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    ready = asyncio.Event()
    segments: dict[str, dict] = {}

    async def receive(ws) -> None:
        async for raw in ws:
            if raw == "ping":
                continue
            payload = orjson.loads(raw)
            if isinstance(payload, list):
                for segment in payload:
                    segments[segment["id"]] = segment
            elif isinstance(payload, dict):
                kind = payload.get("type")
                if kind == "service_status" and payload.get("status") == "ready":
                    ready.set()
                elif kind == "segments_deleted":
                    for segment_id in payload.get("segment_ids", []):
                        segments.pop(segment_id, None)
                elif kind == "error":
                    outcome.failure = outcome.failure or f"error event {payload.get('code')}"
                continue
            else:
                continue
            text = " ".join(s["text"] for s in sorted(segments.values(), key=lambda s: (s["start"], s["end"])))
            outcome.views.append((time.monotonic(), normalize(text)))

    try:
        async with websockets.connect(full_url, additional_headers=headers, max_size=None, compression=None,
                                      open_timeout=open_timeout, ping_interval=None) as ws:
            receiver = asyncio.create_task(receive(ws))
            await asyncio.wait_for(ready.wait(), open_timeout)
            start = time.monotonic()
            for i, message in enumerate(messages):
                delay = start + i * seconds - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(message)
                outcome.frame_sent_at[i] = time.monotonic()
            all_words = sum(len(normalize(u.clip.reference)) for u in plan)
            expected = SETTLE_WORDS * all_words
            done_at = time.monotonic()
            # A quiet spell is the end only once (nearly) every word is in: a loaded server's finals
            # come seconds late (the last utterance's after the one before it), and what the server
            # still had queued is lost when the client hangs up. A stream that stays short of that
            # closes after a longer quiet spell.
            while not receiver.done() and time.monotonic() - done_at < MAX_WAIT:
                last = outcome.views[-1] if outcome.views else (done_at, [])
                quiet = time.monotonic() - max(last[0], done_at)
                if ((len(last[1]) >= ALL_WORDS * all_words and quiet >= SETTLE)
                        or (len(last[1]) >= expected and quiet >= LONG_SETTLE)):
                    break
                await asyncio.sleep(0.2)
            await ws.close(1000, "done")
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    except Exception as exc:
        outcome.failure = outcome.failure or f"{type(exc).__name__}: {exc}"
    return outcome


async def capacity(url: str, clips: Sequence[Clip], target_p95: float, *, levels: Sequence[int] = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32),
                   wer_margin: float = 0.01, report: Callable[[SpeechReport], None] = lambda r: None,
                   **kwargs) -> tuple[int, list[SpeechReport]]:
    """The largest stream count of ``levels`` holding ``target_p95`` (s, final latency) with no late
    utterance, no failed stream and WER within ``wer_margin`` of the first level's; stops at the
    first level that does not."""
    held, reports = 0, []
    for streams in levels:
        result = await run_speakers(url, clips, streams, **kwargs)
        reports.append(result)
        report(result)
        p95 = result.percentiles("final_latencies").get("p95", np.inf)
        ok = (p95 <= target_p95 and not result.late and not result.failures
              and result.wer <= reports[0].wer + wer_margin)
        if not ok:
            break
        held = streams
    return held, reports


def speech_main(args, config_tokens: Callable[[int], str | None] | None, uid_prefix: str) -> int:
    """``harken loadtest --speech-dir``: one level (``--streams``) or, with ``--target-p95``, the
    capacity search; prints a line per level. Exit 1 if a stream failed."""
    import sys

    clips = load_clips(Path(args.speech_dir))
    kwargs = dict(utterances=args.utterances, pause=args.pause, codec=args.codec if args.codec != "opus" else "pcm16",
                  sample_rate=args.sample_rate or 16000, language=args.language, uid_prefix=uid_prefix,
                  tokens=config_tokens)
    show = lambda report: print(report.line(), flush=True)
    if args.target_p95:
        held, reports = asyncio.run(capacity(args.url, clips, args.target_p95, report=show, **kwargs))
        print(f"holds {held} speaking streams at final p95 <= {args.target_p95:g} s "
              f"(no late utterance, WER within 1 point of 1 stream)", file=sys.stdout)
        return 1 if any(r.failures for r in reports[:-1]) else 0
    report = asyncio.run(run_speakers(args.url, clips, args.streams, **kwargs))
    show(report)
    return 1 if report.failures else 0
