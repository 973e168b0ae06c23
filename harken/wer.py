"""Word error rate, normalised the way ``reference/local-stt-engines.md`` §8 measured it.

Normalisation (applied to reference and hypothesis alike): lower case; ``mr.`` → mister; commas
inside numbers removed; digit strings of 4 or more digits, or with a leading 0, spelled digit by
digit, other numbers as words (10 → ten, 123 → one hundred twenty three); ``oh`` → zero;
hyphens become spaces; other punctuation and apostrophes dropped. Errors are word-level
Levenshtein edits (substitutions + deletions + insertions), summed over files before dividing.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterable

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

_MISTER = re.compile(r"\bmr\.(?=\W|$)")
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DIGITS = re.compile(r"\d+")
_DROPPED = re.compile(r"[^\w\s]|_")


def normalize(text: str) -> list[str]:
    """The words of ``text`` after normalisation."""
    text = text.lower()
    text = _MISTER.sub("mister", text)
    text = _NUMBER_COMMA.sub("", text)
    text = text.replace("-", " ")
    text = _DROPPED.sub("", text)
    text = _DIGITS.sub(lambda m: f" {_spell_digits(m.group())} ", text)
    return ["zero" if word == "oh" else word for word in text.split()]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance in words, number of reference words) after normalisation."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    return edit_distance(ref, hyp), len(ref)


def wer(pairs: Iterable[tuple[str, str]]) -> float:
    """WER over several (reference, hypothesis) pairs: total errors ÷ total reference words."""
    errors = words = 0
    for reference, hypothesis in pairs:
        e, n = word_errors(reference, hypothesis)
        errors += e
        words += n
    if words == 0:
        raise ValueError("the references contain no words")
    return errors / words


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (each substitution, deletion or insertion costs 1)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1,              # deletion of r
                               current[j - 1] + 1,           # insertion of h
                               previous[j - 1] + (r != h)))  # match or substitution
        previous = current
    return previous[-1]


def _spell_digits(digits: str) -> str:
    if len(digits) >= 4 or (len(digits) > 1 and digits[0] == "0"):
        return " ".join(_ONES[int(d)] for d in digits)
    return _number_words(int(digits))


def _number_words(n: int) -> str:
    """0–999 in words, without "and" (Whisper's and the references' style)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {_number_words(rest)}" if rest else "")


# Languages written without spaces between words: their error rate is counted in characters (CER).
CHARACTER_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "km", "yue"})
_NOT_WORD = re.compile(r"[^\w\s]|_")


def multilingual_errors(reference: str, hypothesis: str, language: str) -> tuple[int, int]:
    """(edits, reference units) for any language: words (any script) after lower-casing, dropping
    punctuation and folding Latin diacritics, or characters for ``CHARACTER_LANGUAGES`` (not
    folded: that would split a kana from its voicing mark). Numbers are compared as written: no
    language's number words are spelled out, so "3" against "tres" is an error.

    Diacritics are folded because published transcripts often leave them out (the Asterisk
    Spanish prompts are written in ASCII: "numero", "buzon") while Whisper writes them; an
    accent alone then costs nothing, on every path alike."""
    ref, hyp = (_NOT_WORD.sub(" ", t.lower()) for t in (reference, hypothesis))
    if language.split("-")[0].lower() in CHARACTER_LANGUAGES:
        return edit_distance(list(ref.replace(" ", "")), list(hyp.replace(" ", ""))), len(ref.replace(" ", ""))
    ref, hyp = _fold_diacritics(ref), _fold_diacritics(hyp)
    return edit_distance(ref.split(), hyp.split()), len(ref.split())


def _fold_diacritics(text: str) -> str:
    """``número`` → ``numero`` (Latin letters lose their marks) and ``ё`` → ``е`` (Russian
    writing mostly omits its dots); other scripts' marks are letters of their own (``й``)."""
    return "".join(_latin_base(c) for c in text).replace("ё", "е")


def _latin_base(char: str) -> str:
    base = unicodedata.normalize("NFKD", char)[:1]
    return base if base.isascii() and base.isalpha() else char
