"""The session's one audio clock: every timestamp in a session is derived from it."""

from __future__ import annotations

from ..codecs import TARGET_RATE


class AudioClock:
    """Counts decoded 16 kHz samples since the session began.

    Provider streams report times relative to the audio they were given; because the session
    gives them exactly the samples this clock counts (and records where a stream started on it),
    provider switches, gaps between messages and slow clients cannot skew segment times.
    """

    __slots__ = ("samples",)

    def __init__(self) -> None:
        self.samples = 0

    def advance(self, n: int) -> None:
        self.samples += n

    @property
    def seconds(self) -> float:
        return self.samples / TARGET_RATE
