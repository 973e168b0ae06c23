"""What one Whisper decode is asked for: the language (fixed, or identified per utterance within an
optional whitelist) and the user's vocabulary as hotwords. Pure option handling plus the one call
into faster-whisper; the streaming structure (when to decode what) lives in ``whisper.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

# Whisper's own rule for dropping a segment: likely no speech AND a low-confidence decode.
NO_SPEECH_THRESHOLD = 0.6
LOG_PROB_THRESHOLD = -1.0
# Whisper's prompt holds at most 223 tokens and faster-whisper gives hotwords half of it; a few
# dozen terms fit. Beyond that, the first terms win (the user's list order).
MAX_HOTWORD_CHARS = 400

RawWord = tuple[str, float, float, float]     # text, start, end (seconds in the clip), probability


@dataclass(frozen=True)
class Decoding:
    """Options for decoding a stream's utterances.

    ``language`` is a Whisper language code, or None to identify it per utterance (``multi``),
    then among ``allowed`` only when that is not empty. ``vocabulary`` becomes faster-whisper's
    ``hotwords`` (a prompt before the start-of-transcript token, which survives ``prefix``-free
    decoding and needs no previous text).
    """

    language: str | None = "en"
    allowed: tuple[str, ...] = ()
    vocabulary: tuple[str, ...] = ()

    @property
    def identifies(self) -> bool:
        return self.language is None

    def hotwords(self) -> str | None:
        text = ""
        for term in self.vocabulary:
            candidate = f"{text}, {term}" if text else term
            if len(candidate) > MAX_HOTWORD_CHARS:
                break
            text = candidate
        return text or None


def identify_language(model: "WhisperModel", audio: np.ndarray, allowed: Sequence[str] = ()) -> tuple[str, float]:
    """The most likely language of ``audio`` (float32, 16 kHz) and its probability; with
    ``allowed``, the most likely of those (Omi issue #4742: a whitelist for auto-detect)."""
    language, probability, ranked = model.detect_language(audio=audio)
    if not allowed:
        return language, float(probability)
    for candidate, candidate_probability in ranked:
        if candidate in allowed:
            return candidate, float(candidate_probability)
    return allowed[0], 0.0


def decode(model: "WhisperModel", audio: np.ndarray, decoding: Decoding, *, beam_size: int) -> tuple[list[RawWord], str | None]:
    """Decode one float32 clip: Whisper's words and, when it was identified, the language."""
    language = decoding.language
    identified = None
    if language is None:
        language, _ = identify_language(model, audio, decoding.allowed)
        identified = language
    segments, _info = model.transcribe(
        audio,
        language=language,
        beam_size=beam_size,
        word_timestamps=True,
        condition_on_previous_text=False,     # each utterance stands alone: no error carry-over
        vad_filter=False,                     # already endpointed by our own VAD
        no_speech_threshold=NO_SPEECH_THRESHOLD,
        log_prob_threshold=LOG_PROB_THRESHOLD,
        hotwords=decoding.hotwords(),
    )
    # `segments` is lazy: the decoding happens while iterating, so iterate here, in the thread.
    words = [(w.word, float(w.start), float(w.end), float(w.probability))
             for segment in segments for w in (segment.words or ())]
    return words, identified
