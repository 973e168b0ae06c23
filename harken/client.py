"""A device-like client: streams audio to ``/v4/listen`` and collects segments by id.

Used by ``harken stream``, the tests and the benchmarks, so that all three exercise the gateway
the way an Omi app does: one binary message per device frame, at real-time pace unless asked to
go fast, segments upserted by id, ``segments_deleted`` honoured.
"""

from __future__ import annotations

import asyncio
import time
import wave
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
import orjson
import websockets

TARGET_RATE = 16000


@dataclass
class SegmentUpdate:
    segment: dict
    received_at: float          # time.monotonic() when the update arrived
    audio_sent: float           # seconds of audio the client had sent by then


@dataclass
class StreamResult:
    segments: dict[str, dict] = field(default_factory=dict)     # id → latest version
    updates: list[SegmentUpdate] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    pings: int = 0
    close_code: int | None = None
    close_reason: str = ""
    started_at: float = 0.0
    sending_started_at: float = 0.0   # monotonic time of the first audio message (audio time 0)
    connected_wall: float = 0.0       # wall time (time.time()) once the socket was open: the
                                      # server's audio clock starts within milliseconds of it

    def audio_time_at(self, server_time: str) -> float:
        """Seconds of the audio sent at which the server's ISO wall time ``server_time`` fell, on
        the session's audio clock (which read 0 as the socket opened, give or take the
        handshake): for the stored conversation's ``started_at``, where its time 0 lies in the
        audio, at any pace."""
        return datetime.fromisoformat(server_time).timestamp() - self.connected_wall

    def ordered(self) -> list[dict]:
        return sorted(self.segments.values(), key=lambda s: (s["start"], s["end"]))

    def transcript(self) -> str:
        return " ".join(s["text"] for s in self.ordered()).strip()

    def statuses(self) -> list[str]:
        return [e["status"] for e in self.events if e.get("type") == "service_status"]

    def latencies(self) -> list[float]:
        """Seconds from the end of each segment version's last word in the audio to its arrival.

        Meaningful at real-time pace only (audio time t was sent at ``sending_started_at + t``),
        and only for a fresh conversation: a resumed one numbers its times from its own start,
        so such versions (which would come out negative) are left out.
        """
        out = [u.received_at - (self.sending_started_at + u.segment["end"]) for u in self.updates]
        return [x for x in out if x >= 0]

    def text_latencies(self) -> list[float]:
        """Per segment: seconds from the end of its last word in the audio to the arrival of the
        first version holding its final text. Later versions that only relabel the speaker (a
        re-clustering re-sends old segments by id) do not count, unlike ``latencies``."""
        out = []
        for segment_id, final in self.segments.items():
            first = next((u for u in self.updates if u.segment["id"] == segment_id and u.segment["text"] == final["text"]),
                         None)
            if first is not None:
                out.append(first.received_at - (self.sending_started_at + first.segment["end"]))
        return [x for x in out if x >= 0]

    def providers(self) -> list[str]:
        """The speech providers that produced the segments, in order of first appearance."""
        seen: dict[str, None] = {}
        for update in self.updates:
            if update.segment.get("stt_provider"):
                seen.setdefault(update.segment["stt_provider"], None)
        return list(seen)


def read_wav_16k(path: str | Path) -> np.ndarray:
    """A WAV file as 16 kHz mono int16 (mixing channels and resampling as needed)."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV files are supported")
        channels, rate = wav.getnchannels(), wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    if channels > 1:
        pcm = pcm[: len(pcm) - len(pcm) % channels].reshape(-1, channels).mean(axis=1).astype(np.int16)
    if rate != TARGET_RATE:
        from .codecs.resample import resample_int16

        pcm = resample_int16(pcm, rate, TARGET_RATE)
    return pcm.astype(np.int16)


def device_messages(pcm16k: np.ndarray, codec: str, sample_rate: int, channels: int = 1) -> tuple[list[bytes], float]:
    """Frame audio as a device does for ``codec``; returns (messages, seconds of audio per message)."""
    from .codecs.encode import encode_for_device, message_duration

    return (encode_for_device(pcm16k, codec, sample_rate, channels),
            message_duration(codec, sample_rate, channels=channels))


def local_token_minter(url: str, data_dir: Path | None = None) -> Callable[[str], str] | None:
    """For a gateway on this machine with local auth: a function minting a 1-hour token for a uid
    (signed with the key in the server's data folder). None elsewhere: a token must be given."""
    from .config import Settings, is_loopback

    if not is_loopback(urlsplit(url).hostname or ""):
        return None
    settings = Settings.from_env(data_dir=data_dir)
    if settings.auth != "local":
        return None
    from .gateway.auth import mint_local_token

    return lambda uid: mint_local_token(settings, uid, 3600)


def listen_url(base: str, **params: object) -> str:
    """``base`` (ws://host:port or a full /v4/listen URL) with query parameters added."""
    parts = urlsplit(base)
    path = parts.path if parts.path not in ("", "/") else "/v4/listen"
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


async def stream_messages(
    url: str,
    messages: list[bytes],
    message_seconds: float,
    *,
    token: str | None = None,
    realtime: bool = True,
    settle_seconds: float = 2.0,
    max_wait: float = 60.0,
    on_update: Callable[[StreamResult, dict], None] | None = None,
    on_event: Callable[[StreamResult, dict], None] | None = None,
    open_timeout: float = 15.0,
    busy: Callable[[], bool] | None = None,
) -> StreamResult:
    """Send ``messages`` and collect what comes back, then close with 1000.

    After the last message the client keeps the connection open until no segment has changed for
    ``settle_seconds`` (the engine's last utterance needs a moment), at most ``max_wait`` seconds.
    ``on_update`` is called with each segment version, ``on_event`` with each event (a dict).
    ``busy`` (for a server in the same process) says the server is still working on the audio:
    while it returns True the settle countdown starts again, so a loaded engine's queued
    utterances are waited for however long they take (up to ``max_wait``).
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    result = StreamResult(started_at=time.monotonic())
    sent_seconds = 0.0
    last_change = time.monotonic()

    async with websockets.connect(url, additional_headers=headers, max_size=None,
                                  open_timeout=open_timeout, ping_interval=20) as ws:
        result.connected_wall = time.time()

        async def receive() -> None:
            nonlocal last_change
            async for raw in ws:
                now = time.monotonic()
                if raw == "ping":
                    result.pings += 1
                    continue
                payload = orjson.loads(raw)
                if isinstance(payload, list):
                    for segment in payload:
                        result.segments[segment["id"]] = segment
                        result.updates.append(SegmentUpdate(segment, now, sent_seconds))
                        if on_update:
                            on_update(result, segment)
                    last_change = now
                elif isinstance(payload, dict):
                    result.events.append(payload)
                    if on_event:
                        on_event(result, payload)
                    if payload.get("type") == "segments_deleted":
                        for segment_id in payload.get("segment_ids", []):
                            result.segments.pop(segment_id, None)
                        last_change = now

        receiver = asyncio.create_task(receive())
        try:
            start = result.sending_started_at = time.monotonic()
            for index, message in enumerate(messages):
                if receiver.done():
                    break
                if realtime:
                    delay = start + index * message_seconds - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await ws.send(message)
                sent_seconds = (index + 1) * message_seconds
                if not realtime and index % 50 == 0:
                    await asyncio.sleep(0)   # let replies in, as a fast device still would
            last_change = time.monotonic()
            deadline = time.monotonic() + max_wait
            while not receiver.done() and time.monotonic() < deadline:
                if busy is not None and busy():
                    last_change = time.monotonic()
                if time.monotonic() - last_change >= settle_seconds:
                    break
                await asyncio.sleep(0.05)
            if not receiver.done():
                await ws.close(1000, "done")
            await asyncio.wait_for(receiver, 10)
        except websockets.ConnectionClosed:
            pass
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
        if ws.close_code is not None:
            result.close_code = ws.close_code
            result.close_reason = ws.close_reason or ""
    return result
