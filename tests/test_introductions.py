"""Self-introductions in transcript text (``harken.gateway.introductions``): pure logic."""

from __future__ import annotations

import pytest

from harken.gateway.introductions import Introduction, find_introduction


@pytest.mark.parametrize("text, language, expected", [
    ("Hi everyone, my name is Robert and I run the shop.", "en", Introduction("Robert", True)),
    ("Robert is my name.", "en", Introduction("Robert", True)),
    ("my name's O'Brien", "en", Introduction("O'Brien", True)),
    ("Hola, me llamo Lucía.", "es", Introduction("Lucía", True)),
    ("Bonjour, je m'appelle Jean-Luc.", "fr", Introduction("Jean-Luc", True)),
    ("Hallo, ich heiße Anna.", "de-AT", Introduction("Anna", True)),
    ("Hello, my name is Anna.", "fr", Introduction("Anna", True)),     # English in another session language
    # A bare copula may name someone the user has, never make a new person.
    ("I'm Anna, by the way.", "en", Introduction("Anna", False)),
    ("I am Chinese.", "en", Introduction("Chinese", False)),
    # An explicit introduction anywhere wins over a copula before it.
    ("I'm Sam. Well, my name is Samuel.", "en", Introduction("Samuel", True)),
])
def test_introductions_are_found_with_their_strength(text, language, expected):
    assert find_introduction(text, language) == expected


@pytest.mark.parametrize("text", [
    "I'm sorry, I'm not sure.",            # lower case: not a name
    "I'm Sorry about that.",               # a capitalised filler
    "My name is It was a long day.",       # a run-on transcript
    "What is my name again?",
    "The name is on the door.",
    "",
])
def test_what_is_no_introduction(text):
    assert find_introduction(text, "en") is None
