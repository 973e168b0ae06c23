"""Real-time pacing of what one session sends: audio seconds, and suggested-transcript text.

A device streams audio in real time; after a reconnect it may send a backlog at once. A client
that keeps sending faster than real time (a few MiB of audio inflate to hours of PCM for the
engine, the webhook chunker and the store) would take a core from everyone else, so each session
gets a token bucket: ``burst`` seconds of credit, refilled at ``rate`` seconds per second.
When a session runs out, it is *slowed*, not dropped: the session stops reading its socket
(``BinarySink.pause_reading`` or, without a sink, by sleeping in its receive loop) until the
credit is back, and TCP's flow control holds the client. Nothing it sent is lost.

``rate == 0`` turns pacing off (load tests, ``harken stream --fast`` against a test server).
Pure: the caller passes the clock.
"""

from __future__ import annotations

# Suggested transcripts (custom_stt): people speak ~15 characters a second; this leaves room
# for a client catching up and still bounds the merging and storing a flood could cost.
SUGGESTED_CHARS_PER_SECOND = 2000.0
SUGGESTED_BURST_CHARS = 256 * 1024.0


class Pacer:
    """A token bucket: ``take(amount, now)`` returns how long to wait before reading more."""

    __slots__ = ("rate", "burst", "_credit", "_at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._credit = burst
        self._at = now

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, amount: float, now: float) -> float:
        """Spend ``amount`` (it was received already); seconds until the credit is positive again."""
        if self.rate <= 0:
            return 0.0
        self._credit = min(self.burst, self._credit + (now - self._at) * self.rate) - amount
        self._at = now
        return 0.0 if self._credit >= 0 else -self._credit / self.rate
