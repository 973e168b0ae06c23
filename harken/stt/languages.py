"""Language tables and codes shared by the providers and by chain selection.

The tables are Omi's (``backend/utils/stt/streaming.py``), copied unchanged, plus Speechmatics'
language packs. Providers import them from here, and ``selection`` imports providers lazily, so
the two never import each other.
"""

from __future__ import annotations

_EN = {"en", "en-US", "en-AU", "en-GB", "en-IN", "en-NZ"}

# Deepgram nova-3 with language=multi (code-switching).
N3M = frozenset({"multi", *_EN, "es", "es-419", "fr", "fr-CA", "de", "hi", "ru", "pt", "pt-BR", "pt-PT",
                 "ja", "it", "nl"})
# Deepgram nova-3 monolingual.
N3 = frozenset({
    "bg", "ca", "cs", "da", "da-DK", "nl", *_EN, "et", "fi", "nl-BE", "fr", "fr-CA", "de", "de-CH", "el", "hi",
    "hu", "id", "it", "ja", "ko", "ko-KR", "lv", "lt", "ms", "no", "pl", "pt", "pt-BR", "pt-PT", "ro", "ru",
    "sk", "es", "es-419", "sv", "sv-SE", "tr", "uk", "vi",
})
# Deepgram nova-2 only (not in nova-3).
N2 = frozenset({"zh", "zh-CN", "zh-Hans", "zh-TW", "zh-Hant", "zh-HK", "th", "th-TH"})
# Deepgram nova-2 with language=multi.
N2M = frozenset({"multi", *_EN, "es", "es-419"})
# Soniox (one set for both modes in Omi).
SONIOX = frozenset({
    "multi", "en", "af", "sq", "ar", "az", "eu", "be", "bn", "bs", "bg", "ca", "zh", "hr", "cs", "da", "nl",
    "et", "fi", "fr", "gl", "de", "el", "gu", "he", "hi", "hu", "id", "it", "ja", "kn", "kk", "ko", "lv", "lt",
    "mk", "ms", "ml", "mr", "no", "fa", "pl", "pt", "pa", "ro", "ru", "sr", "sk", "sl", "es", "sw", "sv", "tl",
    "ta", "te", "th", "tr", "uk", "ur", "vi", "cy",
})
# Speechmatics is in none of Omi's tables (its code there is dead); these are the language packs of
# Speechmatics' real-time API (docs.speechmatics.com/speech-to-text/languages), by their codes.
SPEECHMATICS = frozenset({
    "ar", "ba", "eu", "be", "bn", "bg", "yue", "ca", "hr", "cs", "da", "nl", "en", "eo", "et", "fi", "fr", "gl",
    "de", "el", "he", "hi", "hu", "id", "ga", "ia", "it", "ja", "ko", "lv", "lt", "ms", "mt", "cmn", "mr", "mn",
    "no", "fa", "pl", "pt", "ro", "ru", "sk", "sl", "es", "sw", "sv", "tl", "ta", "th", "tr", "uk", "ur", "ug",
    "vi", "cy",
})

DEEPGRAM_NOVA3 = "nova-3"
DEEPGRAM_NOVA2 = "nova-2-general"


def normalize_language(language: str) -> str:
    """BCP-47 casing (``zh-hant`` → ``zh-Hant``, ``en-us`` → ``en-US``); ``auto`` means ``multi``."""
    parts = language.strip().replace("_", "-").split("-")
    head = parts[0].lower()
    if head in ("auto", "multi") and len(parts) == 1:
        return "multi"
    tail = [p.title() if len(p) == 4 else p.upper() if len(p) == 2 else p for p in parts[1:]]
    return "-".join([head, *tail])


def primary_language(language: str) -> str:
    return language.split("-")[0].lower()
