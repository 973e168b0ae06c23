"""Audio analysis shared by the speech engines and the gateway: voice activity (VAD), speaker
embeddings, diarization, and the ring buffer of recent audio."""

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
from .diarization import ConversationDiarizer, OnlineDiarizer
from .embedding import EMBEDDING_DIM, OWNER_SIMILARITY_THRESHOLD, SpeakerEmbedder, cosine_similarity, mean_embedding
from .ring import AudioRing

__all__ = [
    "SAMPLE_RATE", "WINDOW_SAMPLES", "WINDOW_SECONDS", "Endpointer", "SileroVAD", "StreamingVAD",
    "Utterance", "speech_spans", "spans_from_probabilities",
    "AudioRing", "EMBEDDING_DIM", "OWNER_SIMILARITY_THRESHOLD", "ConversationDiarizer", "OnlineDiarizer", "SpeakerEmbedder",
    "cosine_similarity", "mean_embedding",
]
