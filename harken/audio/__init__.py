"""Audio analysis shared by the speech engines and the gateway: voice activity (VAD)."""

from .vad import (
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    WINDOW_SECONDS,
    Endpointer,
    SileroVAD,
    StreamingVAD,
    Utterance,
    speech_spans,
    spans_from_probabilities,
)

__all__ = [
    "SAMPLE_RATE", "WINDOW_SAMPLES", "WINDOW_SECONDS", "Endpointer", "SileroVAD", "StreamingVAD",
    "Utterance", "speech_spans", "spans_from_probabilities",
]
