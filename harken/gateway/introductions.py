"""Who says their own name: "My name is Anna" in a transcript segment (pure text logic).

Omi's backend names speakers this way (``create_speakers``): when a diarized speaker introduces
themselves, the speaker is suggested as that person, and a person of that name is created if the
user has none yet. Only an *explicit* introduction ("my name is …", "… is my name", "je
m'appelle …") may create a person; a bare copula ("I'm Anna") matches a person the user already
has, since it says "I'm Sorry", "I'm Chinese" or "I'm Googling it" just as readily.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A name: one capitalised word of letters (apostrophes and hyphens inside: O'Brien, Jean-Luc).
_NAME = r"([^\W\d_][^\W\d_'’-]*(?:['’-][^\W\d_]+)*)"

# (pattern, explicit) per language; the lead-in is matched case-insensitively, the name must
# start with a capital. English is tried for every language (people switch to it for names).
_PATTERNS: dict[str, list[tuple[str, bool]]] = {
    "en": [(r"\bmy name(?: is|['’]s)\s+" + _NAME, True), (_NAME + r"\s+is my name\b", True),
           (r"\b(?:i am|i['’]m)\s+" + _NAME, False)],
    "es": [(r"\b(?:me llamo|mi nombre es)\s+" + _NAME, True), (_NAME + r"\s+es mi nombre\b", True),
           (r"\bsoy\s+" + _NAME, False)],
    "fr": [(r"\b(?:je m['’]appelle|mon nom est)\s+" + _NAME, True), (r"\bje suis\s+" + _NAME, False)],
    "de": [(r"\b(?:ich heiße|ich heisse|mein name ist)\s+" + _NAME, True), (r"\bich bin\s+" + _NAME, False)],
    "it": [(r"\b(?:mi chiamo|il mio nome è)\s+" + _NAME, True), (r"\bsono\s+" + _NAME, False)],
    "pt": [(r"\b(?:chamo-me|me chamo|(?:o )?meu nome é)\s+" + _NAME, True), (r"\beu sou\s+" + _NAME, False)],
    "nl": [(r"\b(?:ik heet|mijn naam is)\s+" + _NAME, True), (r"\bik ben\s+" + _NAME, False)],
}
_COMPILED = {lang: [(re.compile(p, re.IGNORECASE), explicit) for p, explicit in rules]
             for lang, rules in _PATTERNS.items()}

# Words a transcript puts after "I'm"/"my name is" that are never a name ("I'm Sorry", a
# run-on "my name is It was…"). Compared in lower case.
_NOT_NAMES = frozenset("""
a an the it you they them he she we us me him her his hers its my mine your yours our ours their
this that these those here there what who when where why how which and but not so just also too
yes no yeah okay ok sure sorry fine good great well right really very like going gonna back done
glad happy sorry afraid tired busy ready late here home now still always never already about from
everyone everybody someone somebody nobody anyone anybody something nothing one all some
""".split())
MAX_NAME_CHARS = 40


@dataclass(frozen=True)
class Introduction:
    name: str
    explicit: bool        # "my name is …": may create a person; "I'm …": may only match one


def find_introduction(text: str, language: str = "en") -> Introduction | None:
    """The first self-introduction in ``text`` (patterns of ``language``'s primary subtag, then
    English); an explicit one wins over a copula anywhere in the text."""
    primary = language.split("-")[0].lower()
    rules = _COMPILED.get(primary, []) + (_COMPILED["en"] if primary != "en" else [])
    found: Introduction | None = None
    for pattern, explicit in rules:
        for match in pattern.finditer(text):
            name = match.group(1)
            if not name[:1].isupper() or name.lower() in _NOT_NAMES or len(name) > MAX_NAME_CHARS:
                continue
            if explicit:
                return Introduction(name, True)
            found = found or Introduction(name, False)
    return found
