"""What a device's stream reveals about itself, learned from the stream, to reject implausible packets.

A Bluetooth link corrupts packets, and a corrupt packet that still passes a codec's framing rules
decodes to a burst of noise (random bytes pass the RFC 6716 checks about half of the time). But a
device is monotonous: it sends one Opus TOC configuration (or a few, when its encoder changes
bandwidth), fixed-length LC3 frames, ADTS headers whose fixed fields never change, PCM messages of
one size. ``Signature`` learns those *kinds* of packet as they come and holds back a packet of a
kind it has not seen before until that kind recurs: random bytes almost never repeat a kind, a
device repeats its own at once. Pure logic, no I/O; each codec says what a packet's kind is.

Rules (measured on tests/data/audio, bench/bench_garbage.py):
- the stream's first packet defines its first kind (nothing is lost at the start; if that packet
  was garbage, its kind stays admitted and the device's own kind is admitted by the rules below);
- another kind is admitted once it has been seen ``recur`` times (2) within one window of
  ``window`` held-back packets (32);
- a kind of an unknown *family* needs ``foreign_recur`` sightings (6). For Opus a family is the
  frame duration, channel count and frame packing of a TOC (an encoder switching bandwidth keeps
  them); for LC3 frame lengths and PCM message sizes every kind is its own family: a device does
  not change its frame size mid-stream, while garbage would otherwise get its own kinds admitted
  by chance (two random lengths coincide often within a window);
- the window is forgotten after ``window`` held-back packets, so that sightings of random kinds
  never add up over a long session.

Opus has two rules of its own (``ConfirmedKinds``: a new TOC must be confirmed by the next packet;
``SteadyFlag``: the in-band FEC flag of a stream that never sets it); LC3 has its own in ``lc3.py``
(the LSB-mode flag, bits the decoder never reads, LTPF activation, gain jumps), and a refused LC3
message is undone in the decoder.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable

import numpy as np

RECUR = 2
FOREIGN_RECUR = 6
WINDOW = 32


class Signature:
    def __init__(self, *, recur: int = RECUR, foreign_recur: int = FOREIGN_RECUR, window: int = WINDOW,
                 on_admit: Callable[[Hashable], None] | None = None):
        self.recur = recur
        self.foreign_recur = foreign_recur
        self.window = window
        self.on_admit = on_admit          # e.g. to tell the native Opus reader (native/opus_reader.c)
        self.known: set[Hashable] = set()
        self._families: set[Hashable] = set()
        self._sightings: dict[Hashable, int] = {}
        self._held = 0

    def learn(self, kind: Hashable, family: Hashable = None) -> None:
        """Admit ``kind`` without waiting for it to recur (a kind proved by other means)."""
        self.known.add(kind)
        self._families.add(family)

    def admits(self, kind: Hashable, family: Hashable = None) -> bool:
        """True when a packet of ``kind`` fits the stream (decode it), False to drop it."""
        if kind in self.known:
            return True
        if not self.known:
            self.learn(kind, family)
            if self.on_admit is not None:
                self.on_admit(kind)
            return True
        seen = self._sightings.get(kind, 0) + 1
        needed = self.recur if family in self._families else self.foreign_recur
        if seen >= needed:
            self.known.add(kind)
            self._families.add(family)
            self._sightings.pop(kind, None)
            if self.on_admit is not None:
                self.on_admit(kind)
            return True
        self._sightings[kind] = seen
        self._held += 1
        if self._held >= self.window:
            self._sightings.clear()
            self._held = 0
        return False


class ConfirmedKinds:
    """Opus's rule, stricter than ``Signature``: a packet of a new kind is held back and decoded only
    when the *next* packet confirms it (is of the same family: for Opus the TOC's configuration and
    stereo flag and the packet's duration, as an encoder at 40 ms alternates frame packings of one
    duration); else it is dropped.

    Why stricter: a random packet that gets into an Opus decoder does not only cost its own 10 ms
    of noise, it derails the decoder's prediction for the packets after it: letting 4 % of random
    packets through (every TOC of the stream's packet duration) still cost 6 points of WER. An
    encoder that switches bandwidth or mode sends runs of its new configuration, so waiting for one
    confirming packet loses nothing of it (it costs 10 ms of delay once per new configuration);
    inserted garbage is confirmed only when its TOC has the configuration of the packet after it
    and its frame count gives the same duration (for a device's 10 ms code 0 packets only a code 3
    packet holding one frame: about 1 in 16,000; without the duration every frame packing of the
    configuration got through, 1 in 64), or passes when its TOC byte is one of the stream's (1 in
    256 per TOC).

    ``check(kind, packet, mark)`` returns the packets to decode now, in order: ``[]`` (held back),
    ``[packet]``, or ``[held, packet]``. ``mark`` says whether another packet came in between
    without passing here (the native reader decodes admitted packets itself): a held packet is
    confirmed only when ``mark`` is the same as when it was held.
    """

    def __init__(self, on_admit: Callable[[Hashable], None] | None = None):
        self.known: set[Hashable] = set()
        self.on_admit = on_admit
        self._held: tuple[Hashable, bytes, object, Hashable] | None = None
        self.dropped = 0        # held packets the next one did not confirm (Decoder.held_dropped)

    def admit(self, kind: Hashable) -> None:
        self.known.add(kind)
        if self.on_admit is not None:
            self.on_admit(kind)

    def check(self, kind: Hashable, packet: bytes, mark: object = None, family: Hashable = None) -> list[bytes]:
        held, self._held = self._held, None
        if not self.known:                   # the stream's first packet defines it
            self.admit(kind)
            return [packet]
        confirmed = held is not None and held[3] == family and held[2] == mark
        self.dropped += held is not None and not confirmed
        if confirmed:
            self.admit(held[0])
        if kind in self.known:
            return [held[1], packet] if confirmed else [packet]
        if confirmed:
            self.admit(kind)
            return [held[1], packet]
        self._held = (kind, packet, mark, family)
        return []


FEC_LEARN = 100      # packets seen without the flag before it is checked (native/opus_reader.c: the same)
FEC_RECUR = 4        # flagged packets within FEC_SPAN packets: the stream does use the flag
FEC_SPAN = 50


def opus_fec_flag(packet: bytes) -> bool:
    """The in-band FEC (LBRR) flag of a 10 or 20 ms SILK or hybrid Opus packet: bit 6 of the first
    payload byte (the range coder's second symbol, after the voice-activity flag)."""
    return len(packet) > 1 and packet[0] >> 3 < 16 and bool(packet[1] & 0x40)


class SteadyFlag:
    """A flag a device never sets, learned from its stream: Opus's in-band FEC flag. A device
    encoder without FEC never sets it (0 of 11,288 packets of the development set, 10 and 20 ms),
    random bytes whose first byte is the stream's own TOC (which pass every other rule) set it
    half of the time. Once ``FEC_LEARN`` packets came without it, a packet with it is dropped,
    unless flagged packets recur (``FEC_RECUR`` within ``FEC_SPAN`` packets): an encoder whose FEC
    comes on sends it in most packets, and is then never checked again (a few packets lost).

    ``native/opus_reader.c`` keeps the counts when it decodes the stream (``packets``, ``free``
    are then read from it, and ``note`` tells it what the Python path decoded)."""

    def __init__(self, reader=None):
        self.reader = reader
        self._packets = 0
        self._seen = 0
        self._sightings: collections.deque[int] = collections.deque()

    @property
    def packets(self) -> int:
        return self.reader.packets if self.reader is not None else self._packets

    @property
    def free(self) -> bool:
        """True while the flag is checked: enough packets, none flagged."""
        if self.reader is not None:
            return self.reader.fec_free
        return self._seen == 0 and self._packets >= FEC_LEARN

    def note(self, packet: bytes) -> None:
        """A packet was decoded."""
        if self.reader is not None:
            self.reader.decoded_here(packet)
        else:
            self._packets += 1
            self._seen += opus_fec_flag(packet)

    def admits(self, packet: bytes) -> bool:
        """False for a flagged packet of a stream that never sets the flag (drop it)."""
        if not self.free or not opus_fec_flag(packet):
            return True
        position = self.packets
        self._sightings.append(position)
        while self._sightings and self._sightings[0] < position - FEC_SPAN:
            self._sightings.popleft()
        return len(self._sightings) >= FEC_RECUR


class SteadySize:
    """Message sizes of a client that sends one size (a device), learned from its first messages.

    A client that pipes a file (websocat, ``harken stream`` with odd chunks) cuts its messages
    anywhere: its sizes vary from the start and nothing is checked. Once the first ``learn``
    messages all had one size, a longer message, or one that is not a whole number of ``unit``
    bytes (a sample frame: random bytes of odd length would shift every later sample), is dropped
    until its size recurs (a ``Signature`` on sizes); a shorter whole one passes (a device's last
    message)."""

    def __init__(self, learn: int = 20, unit: int = 1):
        self._learn = learn
        self._unit = unit
        self._size: int | None = None
        self._count = 0
        self.steady = False
        self._signature = Signature()

    def admits(self, size: int) -> bool:
        if not self.steady:
            if self._count == 0 or size == self._size:
                self._size = size
                self._count += 1
                if self._count >= self._learn:
                    self.steady = True
                    self._signature.learn(size, size)
            else:
                self._count = -1       # sizes vary: a piped file, never checked
            return True
        if size < self._size and size % self._unit == 0:
            return True
        return self._signature.admits(size, size)   # a device never changes its message size


# Random bytes read as samples are full-scale white noise with a flat amplitude distribution: RMS
# ~18 900 (-5 dBFS, 17 500-20 000 over 10 ms), no correlation between neighbouring samples, and a
# kurtosis of 1.8 (uniform). Sound is never all three: loud speech at 8 kHz reached RMS 9 000 with
# a lag-1 correlation of 0.23-0.4 but a kurtosis of 3.2-4.1 (peaky); clipped speech is flat but
# strongly correlated; fricatives are white but 20-30 dB quieter. White means uncorrelated at every
# lag, so the correlation is checked at lags 1 and 2: a loud signal alternating between two levels
# (a test tone at half the Nyquist rate, the fake providers' timecode) is flat and has a small
# lag-1 correlation, but a lag-2 correlation near 1.
RANDOM_RMS = 13000.0
RANDOM_MAX_CORRELATION = 0.3
RANDOM_MAX_KURTOSIS = 2.4
MIN_SAMPLES = 32


def looks_like_random_bytes(samples: np.ndarray) -> bool:
    """True when int16 ``samples`` look like random bytes rather than sound (see above)."""
    if len(samples) < MIN_SAMPLES:
        return False
    x = samples.astype(np.float64)
    energy = float(np.dot(x, x))
    if energy < RANDOM_RMS * RANDOM_RMS * len(x):
        return False
    for lag in (1, 2):
        if abs(float(np.dot(x[:-lag], x[lag:])) / energy) >= RANDOM_MAX_CORRELATION:
            return False
    squares = x * x
    kurtosis = float(np.dot(squares, squares)) * len(x) / (energy * energy)
    return kurtosis < RANDOM_MAX_KURTOSIS
