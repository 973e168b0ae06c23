"""The offline summariser: a structured summary built only from the transcript's own words.

Used when no language model is configured, when the model fails, and for discarded (very short)
conversations. It never invents: the title is the start of the most representative sentence,
the overview is the most representative sentences in their spoken order, and action items are
the clauses that follow commitment phrases ("remind me to", "I will", "we need to", "let's",
"schedule …"). It does not guess calendar events (that needs date understanding it lacks), so
``events`` stays empty. Sentences are ranked by the classic word-frequency score (Luhn): the
sum of their content words' frequencies over the square root of their length.
"""

from __future__ import annotations

import math
import re
from collections import Counter

from .model import DEFAULT_CATEGORY, DEFAULT_EMOJI

PROCESSOR = "offline-extractive"

TITLE_WORDS = 8
OVERVIEW_SENTENCES = 3
MAX_SENTENCE_WORDS = 30          # unpunctuated speech is cut into pieces of this many words
MAX_ACTION_ITEMS = 10

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")

STOPWORDS = frozenset("""
a about above after again against all am an and any are aren't as at be because been before being below
between both but by can can't cannot could couldn't did didn't do does doesn't doing don't down during each
few for from further had hadn't has hasn't have haven't having he he'd he'll he's her here here's hers
herself him himself his how how's i i'd i'll i'm i've if in into is isn't it it's its itself just let's me
more most mustn't my myself no nor not now of off on once only or other ought our ours ourselves out over
own same shan't she she'd she'll she's should shouldn't so some such than that that's the their theirs them
themselves then there there's these they they'd they'll they're they've this those through to too under
until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which
while who who's whom why why's will with won't would wouldn't you you'd you'll you're you've your yours
yourself yourselves yeah yes okay ok oh uh um like really well also get got gonna going go know think
""".split())

# Commitment phrases → the task that follows them. Order matters: the first match wins.
_ACTION_PATTERNS = [re.compile(p, re.IGNORECASE) for p in (
    r"\bremind me to\s+(?P<task>.+)",
    r"\b(?:don't|do not) forget to\s+(?P<task>.+)",
    r"\bmake sure (?:to|that)\s+(?P<task>.+)",
    r"\b(?:i|we) (?:need|have|must|should|ought) to\s+(?P<task>.+)",
    r"\b(?:i|we)(?:\s+will|'ll|\s+am going to|'m going to|\s+are going to|'re going to)\s+(?P<task>.+)",
    r"\blet(?:'s|\s+us)\s+(?P<task>.+)",
    r"\b(?P<task>(?:schedule|book|set up|arrange|organi[sz]e)\s+.+)",
    r"^\s*please\s+(?P<task>.+)",
    r"\bto-?do\b[:\s]+(?P<task>.+)",
)]

# Category → (emoji, keywords). At least two keyword hits are needed (one word, like "bank"
# in "river bank", says little); ties go to the earlier entry; otherwise "other".
MIN_CATEGORY_HITS = 2
_CATEGORIES = [
    ("work", "💼", {"meeting", "meetings", "team", "project", "deadline", "client", "clients", "report",
                    "office", "manager", "schedule", "colleague", "colleagues", "presentation", "work"}),
    ("technology", "💻", {"artificial", "intelligence", "ai", "software", "computer", "app", "code", "data",
                          "internet", "technology", "robot", "phone", "digital"}),
    ("family", "👨‍👩‍👧", {"sister", "brother", "mother", "father", "mom", "dad", "family", "kids", "children",
                         "son", "daughter", "wife", "husband", "home", "parents"}),
    ("health", "🏥", {"doctor", "health", "exercise", "sleep", "medicine", "hospital", "pain", "diet", "workout"}),
    ("finance", "💰", {"money", "bank", "budget", "price", "pay", "invoice", "tax", "taxes", "savings", "cost"}),
    ("travel", "✈️", {"flight", "trip", "travel", "hotel", "airport", "vacation", "train", "passport"}),
    ("entertainment", "🎲", {"game", "games", "cards", "movie", "film", "music", "concert", "play", "show"}),
    ("literature", "📚", {"book", "books", "novel", "story", "chapter", "author", "poem", "reading"}),
]


def sentences_of(segments: list[dict]) -> list[str]:
    """The transcript as sentences: split at sentence ends, and long unpunctuated runs cut."""
    out: list[str] = []
    for segment in segments:
        text = str(segment.get("text") or "").strip()
        for piece in _SENTENCE_END.split(text):
            words = piece.split()
            for i in range(0, len(words), MAX_SENTENCE_WORDS):
                chunk = " ".join(words[i:i + MAX_SENTENCE_WORDS])
                if _WORD.search(chunk):
                    out.append(chunk)
    return out


def _content_words(sentence: str) -> list[str]:
    return [w for w in (m.group(0).lower() for m in _WORD.finditer(sentence))
            if w not in STOPWORDS and len(w) > 1]


def rank_sentences(sentences: list[str]) -> list[int]:
    """Indices of ``sentences``, most representative first (ties: earlier first)."""
    frequency = Counter(w for s in sentences for w in _content_words(s))

    def score(i: int) -> float:
        words = _content_words(sentences[i])
        return sum(frequency[w] for w in words) / math.sqrt(len(words)) if words else 0.0

    return sorted(range(len(sentences)), key=lambda i: (-score(i), i))


def _tidy(text: str) -> str:
    text = text.strip().rstrip(".,;:!?。！？ ")
    return text[:1].upper() + text[1:] if text else text


_LEADING_FILLERS = frozenset({"and", "so", "but", "well", "um", "uh", "oh", "okay", "ok", "yeah", "like"})


def title_from(sentence: str) -> str:
    words = sentence.split()
    while len(words) > 1 and words[0].lower().strip(",") in _LEADING_FILLERS:
        words.pop(0)
    if len(words) > TITLE_WORDS:
        words = words[:TITLE_WORDS]
        while len(words) > 1 and words[-1].lower().strip(",;:") in STOPWORDS:
            words.pop()
    return _tidy(" ".join(words))


def action_items_of(sentences: list[str]) -> list[dict]:
    items: list[dict] = []
    seen: set[str] = set()
    for sentence in sentences:
        for pattern in _ACTION_PATTERNS:
            match = pattern.search(sentence)
            if match:
                task = _tidy(match.group("task"))
                if len(task.split()) >= 2 and task.lower() not in seen:
                    seen.add(task.lower())
                    items.append({"description": task, "completed": False})
                break
        if len(items) >= MAX_ACTION_ITEMS:
            break
    return items


def category_of(sentences: list[str]) -> tuple[str, str]:
    words = Counter(w for s in sentences for w in _content_words(s))
    best, best_hits = (DEFAULT_CATEGORY, DEFAULT_EMOJI), MIN_CATEGORY_HITS - 1
    for name, emoji, keywords in _CATEGORIES:
        hits = sum(words[k] for k in keywords)
        if hits > best_hits:
            best, best_hits = (name, emoji), hits
    return best


def summarise(segments: list[dict]) -> dict:
    """The structured summary of PROTOCOL §7, plus ``processor``."""
    sentences = sentences_of(segments)
    if not sentences:
        return {"title": "", "overview": "", "emoji": DEFAULT_EMOJI, "category": DEFAULT_CATEGORY,
                "action_items": [], "events": [], "processor": PROCESSOR}
    ranked = rank_sentences(sentences)
    chosen = sorted(ranked[:OVERVIEW_SENTENCES])
    category, emoji = category_of(sentences)
    return {
        "title": title_from(sentences[ranked[0]]),
        "overview": " ".join(_tidy(sentences[i]) + "." for i in chosen),
        "emoji": emoji,
        "category": category,
        "action_items": action_items_of(sentences),
        "events": [],
        "processor": PROCESSOR,
    }
