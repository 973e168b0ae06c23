"""Whether a session's speech stream goes through the VAD gate, and putting it there.

The gate (``vad_gate.VadGatedStream``) is for cloud providers, which bill every second they are
sent; the embedded engine (``local``) runs its own VAD and decodes only utterances, so a chain
of ``local`` alone is never gated. A chain with a cloud provider in it is gated as a whole: the
gate wraps the ``FallbackStream``, so

- a failover replays the *gated* audio and the words of every provider, the embedded one after
  a failover included, come back on the gated time line, which the gate maps onto the session's
  audio clock exactly once;
- the gate's pause ``finalize()`` goes through ``FallbackStream.finalize``, which sends it to the
  active provider after the audio before it (Deepgram ``Finalize``, Soniox ``finalize``,
  Speechmatics ``ForceEndOfUtterance``; the embedded engine decodes its open utterance);
- keep-alives while the gate is closed are the provider streams' own: Deepgram and Soniox send
  theirs after 5 s without audio, Speechmatics relies on WebSocket pings.

``mode`` is a listen parameter's value (``off`` | ``active``) or None, when the server setting
``vad_gate`` decides.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from ..audio.vad import SileroVAD, StreamingVAD
from .base import EMBEDDED_PROVIDER, Link, STTStream
from .vad_gate import VadGatedStream


def gate_wanted(mode: str | None, default_mode: str, chain: Sequence[Link]) -> bool:
    """Active (by the parameter, else the setting) and a cloud provider in the chain."""
    return (mode or default_mode) == "active" and any(link.name != EMBEDDED_PROVIDER for link in chain)


async def gated(stream: STTStream, mode: str | None, default_mode: str, chain: Sequence[Link],
                *, label: str = "") -> STTStream:
    """``stream`` behind a VAD gate when ``gate_wanted``, else ``stream`` itself."""
    if not gate_wanted(mode, default_mode, chain):
        return stream
    # The first session loads the model: off the event loop.
    model = await asyncio.to_thread(SileroVAD.shared)
    return VadGatedStream(stream, StreamingVAD(model), label=label)
