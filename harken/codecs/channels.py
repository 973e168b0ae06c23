"""Channel-prefixed audio (phone calls): one binary message = one channel id byte + that channel's audio.

What Omi's backend does (BasedHardware/omi, read Dec 2026):
- ``backend/routers/listen/runtime.py``: a session is multi-channel when ``channels >= 2``, and its
  channels come from ``utils/listen_audio.py`` ``build_channel_config(source)``: id ``0x01`` "mic"
  is the owner (``is_user=True``, ``SPEAKER_00``), id ``0x02`` "remote" (or "system_audio" for
  ``source=desktop``) is the other party (``is_user=False``, ``SPEAKER_01``).
- ``backend/routers/listen/receiver.py`` ``_handle_multi_channel_audio``: ``data[0]`` is the channel
  id (an unknown id is dropped), ``data[1:]`` is that channel's audio: an Opus packet for
  ``codec=opus`` (one decoder per channel), else 16-bit PCM at ``sample_rate``. Each channel goes to
  its own STT stream whose segments get the channel's ``is_user`` and speaker label; the channels
  are mixed (summed, clipped) for the conversation's audio.
- The app's phone-call recorder opens ``codec=pcm&sample_rate=48000&channels=2&source=phone_call``.
- More channels: upstream refuses no ``channels`` value (``channels >= 2`` is all it checks), but
  ``build_channel_config`` ignores the count: a ``channels=3`` stream gets the same two channels,
  and a message of channel id 3 is dropped as unknown. No upstream client sends more than two.

More than two channels in Harken. Refusing ``channels >= 3`` (1008) would put a client that
upstream serves into the app's reconnect loop, and dropping the third leg would lose its words;
so a stream of ``channels=N`` (3 ≤ N ≤ ``MAX_CHANNELS``) has channel ids 1 … N, each its own STT
stream and speaker: 1 and 2 exactly as upstream (the owner, the other party), id k ≥ 3 the
speaker ``SPEAKER_{k-1:02d}``, not the owner (a conference bridge's further legs). A leg that
never sends is filled with silence (see Time below), so a client that declares 3 channels but
sends only ids 1 and 2, as it could to upstream, is served as a two-party call. Each channel costs
one STT stream, hence the bound. Such streams are always channel-prefixed, whatever the codec:
upstream reads every ``channels >= 2`` stream so, and Harken's interleaved reading exists only for
``channels=2`` (below).

Harken told apart from interleaved stereo: Harken has always accepted ``channels=2`` as interleaved
stereo (averaged to mono) for every codec, and the app's device streams never send ``channels``.
So the prefix is used where upstream's clients use it: ``codec=pcm`` with ``channels >= 2``, or
``source`` ``phone_call``/``desktop`` with ``channels >= 2`` (``uses_channel_prefix``); any other
``channels=2`` stream stays interleaved stereo. Each channel is decoded with the declared codec
(upstream reads anything but Opus as PCM; Harken decodes LC3 and AAC channels as what they are).

Time. The channels arrive as separate messages in turn. ``ChannelDemuxDecoder`` keeps each
channel's decoded audio until every channel has it, then hands on the common stretch: the mix for
the session's clock, ring and audio webhook, and each channel's own samples for its STT stream,
so every channel's stream time is the session's audio clock. A channel that stops sending (a
muted leg whose app sends nothing) would hold the others back: once it lags more than
``MAX_LAG_SECONDS`` behind the most advanced channel it is filled with silence up to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import TARGET_RATE, Decoder, DecodeError, no_samples

MAX_LAG_SECONDS = 1.0
PREFIXED_SOURCES = ("phone_call", "desktop")
MAX_CHANNELS = 8          # channel-prefixed legs of one stream, each its own STT stream


@dataclass(frozen=True)
class Channel:
    channel_id: int      # the message's first byte
    label: str
    is_user: bool        # the owner's own voice
    speaker: int         # speaker index: 0 → SPEAKER_00


def channel_layout(source: str | None, channels: int = 2) -> tuple[Channel, ...]:
    """Upstream's ``build_channel_config`` (the owner's microphone is channel 1, the other party
    channel 2), and for ``channels`` > 2 one more speaker per further channel id."""
    other = "system_audio" if source == "desktop" else "remote"
    further = tuple(Channel(k, f"channel{k}", False, k - 1) for k in range(3, channels + 1))
    return (Channel(0x01, "mic", True, 0), Channel(0x02, other, False, 1)) + further


def uses_channel_prefix(codec: str, channels: int, source: str | None) -> bool:
    """Whether a stream's binary messages start with a channel id (see the module docstring)."""
    return channels >= 3 or (channels == 2 and (codec == "pcm" or source in PREFIXED_SOURCES))


def mix(blocks: list[np.ndarray]) -> np.ndarray:
    """Sum equal-length int16 channels, clipped (as upstream's ``mix_n_channel_buffers``)."""
    total = np.sum([b.astype(np.int32) for b in blocks], axis=0)
    return np.clip(total, -32768, 32767).astype(np.int16)


class ChannelDemuxDecoder(Decoder):
    """Decodes channel-prefixed messages with one mono decoder per channel (sans-I/O).

    ``decode`` returns the mix of the stretch every channel has; with ``keep_channels`` set (by the
    STT side, which takes them with ``take_channels``), each channel's samples of that stretch are
    kept too. A message with no payload or an unknown channel id raises ``DecodeError``.
    """

    def __init__(self, codec: str, sample_rate: int, layout: tuple[Channel, ...],
                 make_decoder: Callable[[str, int, int], Decoder]):
        super().__init__(sample_rate, 1)      # what it hands on is the mono mix
        self.codec = codec
        self.layout = layout
        self._index = {channel.channel_id: i for i, channel in enumerate(layout)}
        self._decoders = [make_decoder(codec, sample_rate, 1) for _ in layout]
        self._buffers: list[list[np.ndarray]] = [[] for _ in layout]
        self._lengths = [0] * len(layout)
        self._max_lag = int(MAX_LAG_SECONDS * TARGET_RATE)
        self.keep_channels = False
        self._kept: list[list[np.ndarray]] = [[] for _ in layout]

    def decode(self, message: bytes) -> np.ndarray:
        if not message:
            return no_samples()
        if len(message) < 2:
            raise DecodeError("channel-prefixed message without audio")
        index = self._index.get(message[0])
        if index is None:
            raise DecodeError(f"unknown channel id {message[0]:#04x}")
        self._append(index, self._decoders[index].decode(message[1:]))
        return self._release()

    def flush(self) -> np.ndarray:
        for index, decoder in enumerate(self._decoders):
            self._append(index, decoder.flush())
        longest = max(self._lengths)
        for index, length in enumerate(self._lengths):
            if length < longest:
                self._append(index, np.zeros(longest - length, np.int16))
        return self._release()

    def take_channels(self) -> list[np.ndarray]:
        """Each channel's samples handed on since the last call (kept only with ``keep_channels``)."""
        taken = [np.concatenate(parts) if parts else no_samples() for parts in self._kept]
        self._kept = [[] for _ in self.layout]
        return taken

    def close(self) -> None:
        for decoder in self._decoders:
            decoder.close()

    def _append(self, index: int, pcm: np.ndarray) -> None:
        if len(pcm):
            self._buffers[index].append(pcm)
            self._lengths[index] += len(pcm)
        leader = max(self._lengths)
        for other, length in enumerate(self._lengths):
            if leader - length > self._max_lag:    # a channel that went quiet: silence up to the others
                self._buffers[other].append(np.zeros(leader - length, np.int16))
                self._lengths[other] = leader

    def _release(self) -> np.ndarray:
        common = min(self._lengths)
        if common == 0:
            return no_samples()
        blocks = []
        for index in range(len(self.layout)):
            joined = np.concatenate(self._buffers[index]) if len(self._buffers[index]) > 1 else self._buffers[index][0]
            blocks.append(joined[:common])
            rest = joined[common:]
            self._buffers[index] = [rest] if len(rest) else []
            self._lengths[index] -= common
        if self.keep_channels:
            for index, block in enumerate(blocks):
                self._kept[index].append(block)
        return mix(blocks)
