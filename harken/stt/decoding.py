"""What one Whisper decode is asked for: the language (fixed, or identified per utterance within an
optional whitelist) and the user's vocabulary as hotwords. Pure option handling plus the one call
into faster-whisper; the streaming structure (when to decode what) lives in ``whisper.py``.
"""

from __future__ import annotations

import threading
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

# The encoder window. faster-whisper pads every clip to Whisper's 30 s (3,000 mel frames), and the
# encoder's cost grows faster than the frames (attention): tiny.en int8 on one core took 571 ms
# for 3,000 frames, 138 ms for 1,500 and 70 ms for 1,000, while an utterance is mostly 1-8 s. So a
# stream's decodes may give the encoder a shorter window: the clip plus WINDOW_PAD_S of the
# padding, never less than the configured window (``Decoding.window_s``). Shorter windows than
# ~10 s make Whisper loop or drop words (measured on tests/data/audio: 8 s 8.2-112 % WER, 6 s 89 %,
# 10 s 7.5 % = the full window's); at 10 s the WER of the 16 dev clips was unchanged at a third of
# the CPU, and on 64 utterances of real calls and meetings tiny.en moved from 19.3 to 19.9 % WER
# against the base model's full-window text. A decode that still looks like a loop or lost its
# words (``implausible``) is done again with the full window.
FULL_WINDOW_S = 30.0
WINDOW_PAD_S = 2.0
FRAMES_PER_SECOND = 100
# Signs of a decode gone wrong in a short window: gzip compression ratio above Whisper's own
# threshold (repetition), a temperature fallback, more words per second than people say, or a
# word stretched over seconds (below).
MAX_COMPRESSION_RATIO = 2.4
MAX_WORDS_PER_SECOND = 6.0
MIN_SECONDS_FOR_WORDS = 1.0          # a clip this long that came back empty is retried in full
# A last word Whisper itself barely believes: in a short window, a prompt (hotwords) sometimes
# makes it run on past the speech ("... ill-disposed. and", p = 0.02).
MIN_LAST_WORD_PROBABILITY = 0.05
MAX_TOKENS_PER_SECOND = 12.0         # text and timestamp tokens; fast speech needs about 6
# A decode whose words stop this long before the clip ends left speech out: an utterance ends
# after 0.7 s of silence (a pause decode after 0.3 s), so more than that is undecoded speech.
# On one CPU (AMD EPYC, CTranslate2 4.8) the 10 s window turned espeak_02's "The quick brown fox
# jumps over the lazy dog near the river bank." into "The quick round-foc-stump, silver-m",
# ending 2.0 s before the clip's end, where the full window gets all but two words. Over the 88
# utterances of tests/data/audio and the six development conversations, the short window's
# good decodes end at most 1.31 s before the clip's end; the four above 1.4 s (1.55-2.16 s) each
# lost words that the full window found.
MAX_UNDECODED_TAIL_S = 1.4
# A word after the first that lasts this long: Whisper's timing jumped over speech it left out.
# On call_chromecast the 10 s window gave "Okay, great. Would you like the new Conc" for a 5.5 s
# utterance, its "the" stretched over 2.3 s where "new Chromecast Ultra model or the regular"
# was said; the full window has every word. Inside an utterance a pause ends it after 0.7 s, so a
# word with the pause Whisper joins to it stays well under this (the first word is left out: it
# takes in the pre-roll and a soft onset, 1.7 s on the same call).
MAX_WORD_SECONDS = 2.0

# Silence that can be put in front of a VAD-cut utterance before it is decoded; now none. The VAD
# fires a little after a soft onset, and an utterance that begins inside its first word makes
# Whisper skip or mishear its first words ("Asterisk is an open source…" → "The BX and IVR…").
# 0.3 s of silence here helped with a 300 ms preroll (104 real clips, each alone: 5.13 → 3.94 %),
# but clips read one after another, as a stream reads them (the VAD's state after earlier speech
# makes it fire later), showed the cut itself was the problem: whisper.PREROLL_MS 450 ms with no
# silence added gives 3.29 % on 89 Asterisk prompts (1,185 words) and 2.87 % on 96 held-out short
# prompts (488 words, the same as each decoded whole), against 5.65 / 4.92 % for 300 ms + 0.3 s,
# 3.88 / 3.28 % for 450 ms + 0.3 s and 4.56 / 3.48 % for 450 ms + 0.15 s. The multilingual model
# never took it (69 real clips in 7 languages: 9.2 → 10.4 % with it).
UTTERANCE_LEAD_S = 0.0


def is_multilingual(model: "WhisperModel | None") -> bool:
    """Whether ``model`` is a multilingual Whisper (unknown models count as multilingual)."""
    return bool(getattr(getattr(model, "model", None), "is_multilingual", True))


def utterance_lead(model: "WhisperModel") -> float:
    """The silence to put in front of a cut utterance for ``model`` (see UTTERANCE_LEAD_S)."""
    return 0.0 if is_multilingual(model) else UTTERANCE_LEAD_S

_window = threading.local()          # the frames the encoder may see in this thread's decode


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
    window_s: float = FULL_WINDOW_S
    lead_s: float = 0.0               # silence put in front of the clip (UTTERANCE_LEAD_S for cut utterances)

    @property
    def identifies(self) -> bool:
        return self.language is None

    def window_frames(self, samples: int, sample_rate: int = 16000) -> int | None:
        """Mel frames the encoder gets for a clip of ``samples``; None for Whisper's full window."""
        seconds = max(self.window_s, samples / sample_rate + WINDOW_PAD_S)
        if seconds >= FULL_WINDOW_S:
            return None
        return int(round(seconds * FRAMES_PER_SECOND))

    def hotwords(self) -> str | None:
        text = ""
        for term in self.vocabulary:
            candidate = f"{text}, {term}" if text else term
            if len(candidate) > MAX_HOTWORD_CHARS:
                break
            text = candidate
        return text or None


def identify_language(model: "WhisperModel", audio: np.ndarray, allowed: Sequence[str] = (),
                      frames: int | None = None) -> tuple[str, float]:
    """The most likely language of ``audio`` (float32, 16 kHz) and its probability; with
    ``allowed``, the most likely of those (Omi issue #4742: a whitelist for auto-detect).

    ``frames`` gives the encoder the same short window as the decode that follows. Identifying
    on Whisper's full 30 s window cost a second encoder pass at full price: on the 69 real clips
    of tests/data/multilingual/real (7 languages), the base model named 69 of 69 either way, in
    184 ms per clip with the 10 s window against 872 ms with the full one (loaded machine)."""
    _window.frames = frames
    try:
        language, probability, ranked = model.detect_language(audio=audio)
    finally:
        _window.frames = None
    if not allowed:
        return language, float(probability)
    for candidate, candidate_probability in ranked:
        if candidate in allowed:
            return candidate, float(candidate_probability)
    return allowed[0], 0.0


def decode(model: "WhisperModel", audio: np.ndarray, decoding: Decoding, *, beam_size: int) -> tuple[list[RawWord], str | None]:
    """Decode one float32 clip: Whisper's words and, when it was identified, the language. Word
    times are seconds of ``audio`` (the ``lead_s`` silence does not shift them)."""
    lead = int(round(decoding.lead_s * 16000))
    if lead:
        audio = np.concatenate([np.zeros(lead, dtype=audio.dtype), audio])
    language = decoding.language
    identified = None
    frames = decoding.window_frames(audio.size)
    if language is None:
        language, _ = identify_language(model, audio, decoding.allowed, frames)
        identified = language
    words, segments = _transcribe(model, audio, language, decoding, beam_size, frames)
    if frames is not None and implausible(words, segments, audio.size / 16000):
        words, _ = _transcribe(model, audio, language, decoding, beam_size, None)
    if lead:
        words = [(text, start - decoding.lead_s, end - decoding.lead_s, p) for text, start, end, p in words]
    return words, identified


def implausible(words: list[RawWord], segments: Sequence, seconds: float) -> bool:
    """A short-window decode that should be done again with the full window."""
    if not words:
        return seconds >= MIN_SECONDS_FOR_WORDS
    if len(words) > MAX_WORDS_PER_SECOND * max(seconds, 1.0):
        return True
    if words[-1][3] < MIN_LAST_WORD_PROBABILITY or seconds - words[-1][2] > MAX_UNDECODED_TAIL_S:
        return True
    if any(end - start > MAX_WORD_SECONDS for _, start, end, _ in words[1:]):
        return True
    return any(s.compression_ratio > MAX_COMPRESSION_RATIO or s.temperature > 0 for s in segments) or (
        len(words) > MAX_WORDS_PER_SECOND / 2 * max(seconds, 1.0) and _repeats(words))


def _repeats(words: list[RawWord]) -> bool:
    """The decode's second half repeats its first (a loop cut short by the token cap)."""
    texts = [w[0].strip().lower() for w in words]
    half = len(texts) // 2
    return half >= 3 and texts[:half] == texts[half:2 * half]


def _transcribe(model: "WhisperModel", audio: np.ndarray, language: str, decoding: Decoding, beam_size: int,
                frames: int | None) -> tuple[list[RawWord], list]:
    _window.frames = frames
    # In a short window a decode that goes wrong must cost little, since it is done again in full:
    # no temperature fallback (up to six more decodes), and no more tokens than speech can hold.
    bounded = {} if frames is None else {
        "temperature": 0.0, "max_new_tokens": int(MAX_TOKENS_PER_SECOND * audio.size / 16000) + 16}
    try:
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
            **bounded,
        )
        # `segments` is lazy: the decoding happens while iterating, so iterate here, in the thread.
        segments = list(segments)
    finally:
        _window.frames = None
    words = [(w.word, float(w.start), float(w.end), float(w.probability))
             for segment in segments for w in (segment.words or ())]
    return words, segments


def windowed(model_class: type) -> type:
    """``model_class`` (faster-whisper's WhisperModel) whose encoder sees at most the frames that
    ``decode`` set for the calling thread (all of them outside ``decode``)."""

    class WindowedWhisperModel(model_class):
        def encode(self, features: np.ndarray):
            frames = getattr(_window, "frames", None)
            if frames is not None and features.shape[-1] > frames:
                features = np.ascontiguousarray(features[..., :frames])
            return super().encode(features)

    WindowedWhisperModel.__qualname__ = WindowedWhisperModel.__name__ = f"Windowed{model_class.__name__}"
    return WindowedWhisperModel
