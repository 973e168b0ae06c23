"""Transcript segments: final words in, Omi-style merged segments out.

Pure logic (no I/O, no clock, no asyncio) so every rule can be tested exhaustively. The session
feeds final words (or ``custom_stt`` suggested segments) as they arrive and calls
:meth:`SegmentBuilder.flush` every 600 ms; the returned :class:`Batch` is what goes to the client
(a bare array of ``changed`` segments, then ``segments_deleted`` with ``deleted_ids``).

The rules follow Omi's ``combine_segments`` (reference/omi-listen-behaviour.md §4, §5, §9):

* Raw segments: in one flush, consecutive words of one speaker (and one provider, one set of
  labels) become one segment.
* Every new segment is folded onto the conversation's tail: the stored last segment is "merged
  forward" and re-sent with the *same id* as it grows; clients upsert by id.
* Ids are stable: an id names one segment whose text only grows by appending, until the id is
  reported deleted (absorbed into its left neighbour after a relabel, or split into parts under
  new ids when local diarization hears several voices in it, ``respeak``); it never comes back.
* Provisional words (``set_partial``: the embedded engine's words of an utterance still being
  spoken) are folded onto the tail for the client only (``Batch.shown``); the final words replace
  them under the same id, and only final text reaches ``Batch.changed`` (the store, webhooks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence
from uuid import uuid4

from harken.conversations.model import MAX_TIME_SECONDS, time_within   # client times past it are refused
from harken.stt.base import SENTENCE_ENDERS, Word


# Rule (a) limits: same-speaker segments further apart than this stay separate (rule (b) too),
# and a segment that already holds a whole long sentence does not grow further.
MAX_SAME_SPEAKER_GAP = 3.0
LONG_SEGMENT_CHARS = 125
# Rule (b) limit: a lowercase continuation joins an unfinished sentence (another speaker's or the
# same one's) only across a pause shorter than this.
MAX_CONTINUATION_GAP = 1.0

# Engines (Speechmatics, Whisper) emit punctuation as separate tokens; joining tokens with spaces
# would give "Hello , world ." — the space before these marks is removed.
_PUNCTUATION_NEEDING_NO_SPACE = ",.?!;:"

# Bounds on what a client may send (custom_stt suggestions, speaker_assigned). A segment stops
# growing at MAX_SEGMENT_CHARS: rule (b) would otherwise merge unpunctuated lowercase text into
# one segment forever, and each append copies the whole text (quadratic in the conversation).
MAX_SEGMENT_CHARS = 4000
MAX_SUGGESTED_PER_MESSAGE = 64
MAX_SPEAKER_ID = 1000
MAX_ID_CHARS = 128
MAX_PROVIDER_CHARS = 64
MAX_ASSIGNED_IDS = 10000
_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.?!;:])")
_WHITESPACE_RUN = re.compile(r"\s+")
_TRAILING_NUMBER = re.compile(r"(\d+)\s*$")

Labels = tuple[bool, "str | None"]
Voice = tuple[int, bool, "str | None"]          # (speaker_id, is_user, person_id)


@dataclass(frozen=True)
class Split:
    """A change for ``SegmentBuilder.respeak``: the voice now hears several speakers in one
    segment. ``parts`` are its words' runs in order, each ``(words, speaker_id, is_user,
    person_id)``, their word counts adding up to the segment's words."""

    parts: tuple[tuple[int, int, bool, "str | None"], ...]


def clean_seconds(value: float) -> float:
    """A time as clients and the store get it: a float rounded to the millisecond, never
    negative (float arithmetic on the clocks left a first segment at -2e-08 s; the app's Dart
    model wants a double, so an int is never sent)."""
    return max(0.0, round(float(value), 3))


def normalise_text(text: str) -> str:
    """Collapse whitespace runs to one space and drop the space before ``, . ? ! ; :``."""
    return _SPACE_BEFORE_PUNCTUATION.sub(r"\1", _WHITESPACE_RUN.sub(" ", text).strip())


def ends_sentence(text: str) -> bool:
    return text[-1:] in SENTENCE_ENDERS


def starts_lowercase(text: str) -> bool:
    """True if the first letter is lowercase (leading quotes, digits and marks are skipped).

    Scripts without case (CJK, Arabic) never count as lowercase, so they never use rule (b).
    """
    for char in text:
        if char.isalpha():
            return char.islower()
    return False


@dataclass
class Segment:
    """One transcript segment, as the client and the store see it."""

    id: str
    text: str
    speaker_id: int
    is_user: bool
    person_id: str | None
    start: float  # seconds since the conversation started
    end: float
    speech_profile_processed: bool = True
    stt_provider: str | None = None
    translations: list = field(default_factory=list)  # [{"lang": ..., "text": ...}]
    # The language the engine identified (language=multi sessions); None when it was not asked to.
    language: str | None = None
    # The words (or suggested pieces) the text was joined from, as ``(text, start, end)`` in
    # conversation time: what a split by voice (``SegmentBuilder.respeak``) cuts along. Never
    # sent nor stored; empty for a segment read back from the store, which is not split.
    words: list = field(default_factory=list, repr=False, compare=False)

    @property
    def speaker(self) -> str:
        return f"SPEAKER_{self.speaker_id:02d}"

    def to_wire(self) -> dict:
        """The element of the bare array sent to the client (PROTOCOL §4)."""
        return {
            "id": self.id,
            "text": self.text,
            "speaker": self.speaker,
            "speaker_id": self.speaker_id,
            "is_user": self.is_user,
            "person_id": self.person_id,
            "start": clean_seconds(self.start),
            "end": clean_seconds(self.end),
            "speech_profile_processed": self.speech_profile_processed,
            "stt_provider": self.stt_provider,
            "translations": [dict(t) for t in self.translations],
            **({"language": self.language} if self.language else {}),
        }

    def to_stored(self) -> dict:
        """The ``transcript_segments`` element of a conversation (PROTOCOL §7).

        ``speakerId`` is the camel-case spelling older Omi clients read. ``stt_provider``,
        ``speech_profile_processed`` and ``translations`` are kept too so that a resumed
        conversation merges exactly as if the connection had never dropped.
        """
        return {
            "id": self.id,
            "text": self.text,
            "speaker": self.speaker,
            "speakerId": self.speaker_id,
            "speaker_id": self.speaker_id,
            "is_user": self.is_user,
            "person_id": self.person_id,
            "start": clean_seconds(self.start),
            "end": clean_seconds(self.end),
            "stt_provider": self.stt_provider,
            "speech_profile_processed": self.speech_profile_processed,
            "translations": [dict(t) for t in self.translations],
            **({"language": self.language} if self.language else {}),
        }

    @classmethod
    def from_stored(cls, d: dict) -> "Segment":
        """Read a stored element back; tolerant of Omi-era rows that lack the newer keys."""
        speaker_id = d.get("speaker_id", d.get("speakerId"))
        if speaker_id is None:
            speaker_id = parse_speaker(d.get("speaker"))
        return cls(
            id=d.get("id") or str(uuid4()),
            text=d.get("text", ""),
            speaker_id=int(speaker_id),
            is_user=bool(d.get("is_user", False)),
            person_id=d.get("person_id"),
            start=float(d.get("start", 0.0)),
            end=float(d.get("end", d.get("start", 0.0))),
            speech_profile_processed=bool(d.get("speech_profile_processed", True)),
            stt_provider=d.get("stt_provider"),
            translations=[dict(t) for t in d.get("translations") or []],
            language=d.get("language"),
        )

    def _copy(self) -> "Segment":
        return replace(self, translations=[dict(t) for t in self.translations], words=list(self.words))


def parse_speaker(value: Any) -> int:
    """``"SPEAKER_01"`` / ``"1"`` / ``1`` → 1; anything else (missing, junk, negative) → 0."""
    if isinstance(value, bool):
        return 0
    number = 0
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        match = _TRAILING_NUMBER.search(value[-16:])
        if match:
            number = int(match.group(1))
    return number if 0 <= number <= MAX_SPEAKER_ID else 0


def suggested_segments(value: Any) -> list[dict]:
    """The usable elements of a ``suggested_transcript``'s ``segments`` (at most
    MAX_SUGGESTED_PER_MESSAGE): objects with text and times within bounds, text cut at
    MAX_SEGMENT_CHARS."""
    if not isinstance(value, list):
        return []
    usable = []
    for item in value[:MAX_SUGGESTED_PER_MESSAGE]:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            continue
        start, end = _finite(item.get("start")), _finite(item.get("end"))
        if start is None or end is None:
            continue
        usable.append({**item, "start": start, "end": end, "text": item["text"][:MAX_SEGMENT_CHARS]})
    return usable


def speaker_assignment(message: dict) -> tuple[int, str | None, str | None, list[str] | None] | None:
    """``(speaker_id, person_id, person_name, segment_ids)`` of a ``speaker_assigned`` message,
    or None when any of them is malformed (a wrong type, out of range, too long)."""
    raw = message.get("speaker_id")
    if isinstance(raw, str) and raw.strip().isdigit() and len(raw) < 8:
        raw = int(raw)
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_SPEAKER_ID:
        return None
    person_id = message.get("person_id") or None
    person_name = message.get("person_name") or None
    if not _short_text_or_none(person_id) or not _short_text_or_none(person_name, 256):
        return None
    ids = message.get("segment_ids")
    if ids is not None and not (isinstance(ids, list) and len(ids) <= MAX_ASSIGNED_IDS
                                and all(isinstance(i, str) and len(i) <= MAX_ID_CHARS for i in ids)):
        return None
    return raw, person_id, person_name, ids


def _short_text_or_none(value: Any, limit: int = MAX_ID_CHARS) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= limit)


@dataclass
class Batch:
    """What one flush (or relabel) changed: ``changed``/``deleted_ids`` are the final segments (to
    store, and for webhooks); ``shown``/``withdrawn_ids`` what the client must be sent, which
    differs from them only while provisional words are shown (``SegmentBuilder.set_partial``)."""

    changed: list[Segment] = field(default_factory=list)  # new or changed, in time order
    deleted_ids: list[str] = field(default_factory=list)  # for a `segments_deleted` event
    shown: list[Segment] | None = None                     # None: the same as ``changed``
    withdrawn_ids: list[str] = field(default_factory=list)  # provisional-only ids, for the client

    def __bool__(self) -> bool:
        return bool(self.changed or self.deleted_ids or self.shown or self.withdrawn_ids)

    @property
    def client_segments(self) -> list[Segment]:
        return self.changed if self.shown is None else self.shown

    @property
    def client_deleted_ids(self) -> list[str]:
        return self.deleted_ids + self.withdrawn_ids

    def then(self, later: "Batch") -> "Batch":
        """This batch followed by ``later`` as one: a segment in both is sent once, as ``later``
        left it; one that ``later`` deleted is not sent."""
        gone = set(later.deleted_ids)
        newer = {s.id for s in later.changed}
        changed = [s for s in self.changed if s.id not in newer and s.id not in gone] + later.changed
        changed.sort(key=lambda s: (s.start, s.end))
        both = Batch(changed=changed, deleted_ids=self.deleted_ids + later.deleted_ids)
        if self.shown is not None or later.shown is not None or self.withdrawn_ids or later.withdrawn_ids:
            # The client's view differs (provisional words): its part is combined the same way.
            gone = set(later.client_deleted_ids)
            newer = {s.id for s in later.client_segments}
            both.shown = [s for s in self.client_segments if s.id not in newer and s.id not in gone]
            both.shown += later.client_segments
            both.shown.sort(key=lambda s: (s.start, s.end))
            both.withdrawn_ids = self.withdrawn_ids + later.withdrawn_ids
        return both


@dataclass
class _Piece:
    """A buffered word or suggested segment, already in conversation time, waiting for a flush."""

    text: str
    start: float
    end: float
    speaker_id: int
    is_user: bool
    person_id: str | None
    provider: str
    speech_profile_processed: bool
    is_word: bool  # words of one speaker join into a raw segment; suggested segments stay whole
    language: str | None = None

    def joins(self, other: "_Piece") -> bool:
        return (
            self.is_word
            and other.is_word
            and self.speaker_id == other.speaker_id
            and self.provider == other.provider
            and self.speech_profile_processed == other.speech_profile_processed
            and self.is_user == other.is_user
            and self.person_id == other.person_id
            and self.language == other.language
        )


def _word_pieces(words: Iterable[tuple[Word, str]], time_offset: float,
                 speaker_labels: Callable[[int], Labels] | None, speech_profile_processed: bool) -> list[_Piece]:
    """``(word, provider)`` pairs as pieces in conversation time, each speaker's labels asked once;
    words with no text are skipped."""
    labels: dict[int, Labels] = {}
    pieces = []
    for word, provider in words:
        text = normalise_text(word.text)
        if not text:
            continue
        if word.speaker not in labels:
            labels[word.speaker] = speaker_labels(word.speaker) if speaker_labels else (False, None)
        is_user, person_id = labels[word.speaker]
        pieces.append(_Piece(text, word.start + time_offset, word.end + time_offset, word.speaker, is_user,
                             person_id, provider, speech_profile_processed, True, word.language))
    return pieces


def _same_voice(first: Segment, second: Segment) -> bool:
    return first.speaker_id == second.speaker_id or (first.is_user and second.is_user)


def _can_merge(first: Segment, second: Segment) -> bool:
    """Omi's combine rule for two neighbouring segments (``first`` directly before ``second``)."""
    # Text from different engines never merges: each keeps its own stt_provider label.
    if first.stt_provider != second.stt_provider:
        return False
    # Nor do two languages (multi sessions): each segment says which language it is in.
    if first.language != second.language:
        return False
    # Segments produced before the speech profile was applied (is_user not yet known) never
    # merge with those after it (reference §5); this holds for both rules.
    if first.speech_profile_processed != second.speech_profile_processed:
        return False
    if len(first.text) + 1 + len(second.text) > MAX_SEGMENT_CHARS:    # full: a new segment starts
        return False
    # (a) One speaker keeps talking: same diarized speaker, or both are the owner; a pause under
    # 3 s; and the first segment is not already a long (125+ chars) finished sentence.
    if (
        _same_voice(first, second)
        and second.start - first.end < MAX_SAME_SPEAKER_GAP
        and (len(first.text) < LONG_SEGMENT_CHARS or not ends_sentence(first.text))
    ):
        return True
    # (b) A sentence cut in the middle: the first has no sentence ender and the second goes on in
    # lowercase. Upstream joins at any pause, across speakers too (a provider's diarization often
    # switches mid-sentence). Harken asks for a pause under 1 s:
    # - across two voices: after a second of silence a different voice starting in lowercase is
    #   a reply (or a fragment the engine decoded without its context), and joining showed one
    #   speaker's words under the other's label (two LibriSpeech readers 1.7 s apart);
    # - within one voice rule (a) already joins an unfinished sentence across any pause under
    #   3 s, and past that no longer: the embedded engine decodes each utterance alone and leaves
    #   one a pause cut unpunctuated ("…a 2018"), so every later lowercase start joined it, and
    #   the segment's times claimed the silence between as speech (call_autorepair_a: a 3.8 s
    #   pause inside one segment, 2.5 % of the call's DER).
    if not ends_sentence(first.text) and starts_lowercase(second.text):
        return second.start - first.end < MAX_CONTINUATION_GAP
    return False


def _absorb(first: Segment, second: Segment) -> None:
    """Append ``second`` to ``first``: the earlier segment keeps its id and its labels."""
    if not first.text:
        first.text = second.text
    elif second.text[:1] in _PUNCTUATION_NEEDING_NO_SPACE:
        first.text += second.text  # "Hello" + ", there" → "Hello, there"
    else:
        first.text += " " + second.text
    first.end = max(first.end, second.end)
    first.words = first.words + second.words
    # A translation of only one side would describe part of the text: keep languages both have.
    theirs = {t.get("lang"): t.get("text", "") for t in second.translations}
    first.translations = [
        {**t, "text": f"{t.get('text', '')} {theirs[t.get('lang')]}"}
        for t in first.translations
        if t.get("lang") in theirs
    ]


def _clamp_after(segment: Segment, previous: Segment) -> None:
    """Times are monotonic: a segment never starts before its predecessor ends.

    Engines report overlapping words (crosstalk, failover seams); the later segment is moved, the
    stored one is never touched, so nothing already sent is reordered.
    """
    if segment.start < previous.end:
        segment.start = previous.end
    if segment.end < segment.start:
        segment.end = segment.start


class SegmentBuilder:
    """The segments of one conversation, grown by final words, flushed in batches.

    ``existing`` are the conversation's stored segments (a resumed conversation): they count as
    already sent, and the last one is merged forward. Not thread-safe; one session owns it.
    """

    def __init__(
        self,
        existing: Sequence[Segment] = (),
        *,
        id_factory: Callable[[], str] = lambda: str(uuid4()),
    ) -> None:
        self._segments: list[Segment] = [s._copy() for s in existing]
        self._new_id = id_factory
        self._pending: list[_Piece] = []
        # Wire form of every final segment as last reported, to report exactly what changed.
        self._sent: dict[str, dict] = {s.id: s.to_wire() for s in self._segments}
        # Segments whose speaker a person named (speaker_assigned, assign-bulk): what the person
        # said wins over the voice matching and re-clustering that run after it.
        self._pinned: set[str] = set()
        # Provisional words (set_partial, set_provisional), and what the client was shown where
        # that differs from _sent: the tail with provisional words appended, or segments made of
        # them alone, whose ids (_partial_ids, in time order) the next new final segments take,
        # so the client's text changes in place.
        self._partial: list[_Piece] = []
        self._partial_changed = False
        self._partial_ids: list[str] = []
        self._partial_managed = False      # set_provisional's: the caller replaces them itself
        self._client_overrides: dict[str, dict] = {}

    @property
    def segments(self) -> list[Segment]:
        """The whole conversation so far, in time order (copies: mutating them changes nothing)."""
        return [s._copy() for s in self._segments]

    def add_words(
        self,
        words: Iterable[Word],
        *,
        provider: str,
        time_offset: float = 0.0,
        speaker_labels: Callable[[int], Labels] | None = None,
        speech_profile_processed: bool = True,
    ) -> None:
        """Buffer final words until the next flush.

        ``time_offset`` maps the stream's time onto conversation time. ``speaker_labels(speaker)``
        gives ``(is_user, person_id)`` as known now: a later identification is applied with
        :meth:`relabel`, not retroactively by this call. Words with no text are skipped.
        """
        self._pending.extend(_word_pieces(((word, provider) for word in words), time_offset, speaker_labels,
                                          speech_profile_processed))

    def set_partial(
        self,
        words: Iterable[Word],
        *,
        provider: str,
        time_offset: float = 0.0,
        speaker_labels: Callable[[int], Labels] | None = None,
    ) -> None:
        """Show ``words`` (an engine's provisional words for what is still being said) after the
        final ones, until the next call replaces them (an empty one withdraws them).

        They reach the client at the next flush, folded onto the tail as a final segment would
        be (same rules, so the app sees the text grow in place), but never ``Batch.changed``: the
        store and the webhooks get final text only. Provisional words carry the tail's speaker
        (they are not diarized); the final words decide.
        """
        pieces: list[_Piece] = []
        tail = self._segments[-1] if self._segments else None
        speaker = tail.speaker_id if tail is not None and tail.stt_provider == provider else 0
        is_user, person_id = speaker_labels(speaker) if speaker_labels else (False, None)
        for word in words:
            text = normalise_text(word.text)
            if text:
                pieces.append(_Piece(text, word.start + time_offset, word.end + time_offset, speaker, is_user,
                                     person_id, provider, True, True))
        if pieces or self._partial:
            self._partial = pieces
            self._partial_changed = True
            self._partial_managed = False

    def set_provisional(
        self,
        words: Iterable[tuple[Word, str]],
        *,
        time_offset: float = 0.0,
        speaker_labels: Callable[[int], Labels] | None = None,
    ) -> None:
        """Show ``(word, provider)`` pairs, final words of a cloud engine whose speaker the voice
        has not decided yet, each under the speaker it carries (the caller's best guess), until
        the next call replaces them (an empty one withdraws them).

        As with :meth:`set_partial` they reach the client only, folded onto the tail by the same
        rules; when the voice has decided, the caller adds them with :meth:`add_words` and calls
        this again without them: the final segments take the ids the client saw them under, and
        whatever the voice changed (a speaker, a segment split off) is re-sent by id. Unlike
        provisional words of the embedded engine, these are not dropped when final words of
        another provider come (at a failover seam both can be waiting at once)."""
        pieces = _word_pieces(words, time_offset, speaker_labels, True)
        pieces.sort(key=lambda p: p.start)
        if pieces or self._partial:
            self._partial = pieces
            self._partial_changed = True
            self._partial_managed = True

    def shown(self) -> Batch:
        """What the client must be sent for the provisional words as they are now, with no final
        word taken in (those wait for :meth:`flush`): nothing to store."""
        return self._batch(set(), absorbed=[]) if self._partial_changed else Batch()

    def add_suggested(self, segments: Iterable[dict], *, provider: str, time_offset: float = 0.0) -> None:
        """Buffer ``custom_stt`` segments ``{text, start, end, speaker?, is_user?, person_id?}``.

        They come from the client, so they are checked rather than trusted: an element that is
        not an object, has no text, or lacks finite numeric times is skipped (the rest still go
        through); ``end`` before ``start`` is raised to ``start``; a missing or unreadable speaker
        is speaker 0.
        """
        for item in segments:
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                continue
            start, end = _finite(item.get("start")), _finite(item.get("end"))
            text = normalise_text(item["text"][:MAX_SEGMENT_CHARS])
            if start is None or end is None or not text:
                continue
            person_id = item.get("person_id")
            if isinstance(person_id, str) and len(person_id) > MAX_ID_CHARS:
                person_id = None
            self._pending.append(
                _Piece(
                    text=text,
                    start=start + time_offset,
                    end=max(end, start) + time_offset,
                    speaker_id=parse_speaker(item.get("speaker")),
                    is_user=item.get("is_user") is True,
                    person_id=person_id if isinstance(person_id, str) else None,
                    provider=provider,
                    speech_profile_processed=True,
                    is_word=False,
                )
            )

    def flush(self) -> Batch:
        """The 600 ms step: buffered words → raw segments → folded onto the conversation's tail."""
        if not self._pending:
            if not self._partial_changed:
                return Batch()
            return self._batch(set(), absorbed=[])
        # Engines and failover seams can deliver words slightly out of order; a stable sort by
        # start restores speech order (ties keep arrival order).
        pieces = sorted(self._pending, key=lambda p: p.start)
        self._pending = []
        if (self._partial and not self._partial_managed
                and any(p.provider != self._partial[0].provider for p in pieces)):
            self._partial, self._partial_changed = [], True      # another engine took over
        touched: set[str] = set()
        for raw in _raw_segments(pieces):
            # One left-to-right fold starting at the stored tail (as Omi's combine_segments does):
            # the batch combines with itself and the stored last segment is merged forward.
            tail = self._segments[-1] if self._segments else None
            if tail is not None:
                _clamp_after(raw, tail)
                if _can_merge(tail, raw):
                    # A raw segment absorbed here never had an id, so the client never sees it.
                    _absorb(tail, raw)
                    touched.add(tail.id)
                    continue
            # New segments take the ids the client saw provisional words under, in time order.
            raw.id = self._partial_ids.pop(0) if self._partial_ids else self._new_id()
            self._segments.append(raw)
            touched.add(raw.id)
        return self._batch(touched, absorbed=[])

    def relabel(
        self,
        speaker_id: int,
        *,
        is_user: bool,
        person_id: str | None,
        segment_ids: Iterable[str] | None = None,
        by_user: bool = False,
    ) -> Batch:
        """A speaker was identified: set ``(is_user, person_id)`` on that speaker's segments.

        ``by_user``: a person said so (the app's ``speaker_assigned``, ``assign-bulk``); those
        segments are pinned, and an automatic relabel or re-clustering leaves them as they are.

        ``segment_ids`` limits the change to those segments (of that speaker); without it the
        speaker's buffered words are relabelled too. New labels can make neighbours mergeable
        (two owner segments of different diarized speakers are one voice, rule (a)); such a pair
        is merged and the absorbed segment's id is returned in ``deleted_ids``.
        """
        only = None if segment_ids is None else set(segment_ids)
        relabelled: set[str] = set()
        for segment in self._segments:
            if segment.speaker_id != speaker_id or (only is not None and segment.id not in only):
                continue
            if by_user:
                self._pinned.add(segment.id)
            elif segment.id in self._pinned:
                continue
            if (segment.is_user, segment.person_id) != (is_user, person_id):
                segment.is_user, segment.person_id = is_user, person_id
                relabelled.add(segment.id)
        if only is None:
            for piece in self._pending:
                if piece.speaker_id == speaker_id:
                    piece.is_user, piece.person_id = is_user, person_id
        return self._merge_relabelled(relabelled)

    def respeak(self, changes: Mapping[str, "Voice | Split"]) -> Batch:
        """Local diarization changed its mind: give the segments ``changes`` names (by id) a new
        ``(speaker_id, is_user, person_id)``. Neighbours that the change makes mergeable are
        merged, as in :meth:`relabel`.

        A change may instead be a ``Split``: the voice now hears several speakers in the segment.
        Such a segment is split along its words: it is reported deleted and each
        part goes out under a new id (an id's text only grows, so no id is cut short). Parts are
        not merged back together (rule (b) would join a lowercase reply onto the sentence it
        answers); a part may merge with the neighbour outside the segment that shares its voice.
        A segment whose words are not known (read back from the store) takes the part with the
        most words.

        Only segments of one voice merge here: the voice has just decided who spoke, and rule
        (b)'s join across speakers (an unfinished sentence, a lowercase continuation) would give
        the other voice's words the first one's label again. On radio_phonein, where Whisper
        writes long stretches without punctuation, each re-clustering split a segment along its
        three voices and rule (b) folded the parts back into the segment before them: 23 s of
        three speakers under one label (DER 38 %)."""
        relabelled: set[str] = set()
        split_ids: list[str] = []
        apart: set[tuple[str, str]] = set()
        kept: list[Segment] = []
        for segment in self._segments:
            change = changes.get(segment.id)
            if change is None or segment.id in self._pinned:
                kept.append(segment)
                continue
            if isinstance(change, Split):
                parts = _split(segment, change.parts)
                if parts is not None:
                    for part in parts:
                        part.id = self._new_id()
                        relabelled.add(part.id)
                    apart.update((left.id, right.id) for left, right in zip(parts, parts[1:]))
                    split_ids.append(segment.id)
                    kept.extend(parts)
                    continue
                change = max(change.parts, key=lambda part: part[0])[1:]
            if (segment.speaker_id, segment.is_user, segment.person_id) != change:
                segment.speaker_id, segment.is_user, segment.person_id = change
                relabelled.add(segment.id)
            kept.append(segment)
        self._segments = kept
        return self._merge_relabelled(relabelled, split_ids, apart, same_voice_only=True)

    def _merge_relabelled(self, relabelled: set[str], absorbed: Sequence[str] = (),
                          apart: Collection[tuple[str, str]] = (), *, same_voice_only: bool = False) -> Batch:
        # Only pairs with a relabelled side can have become mergeable: every other pair was
        # decided on the same labels, start and first letters when its right side was appended.
        # ``apart``: pairs (left id, right id) that stay two segments (the parts of a split).
        kept: list[Segment] = []
        absorbed = list(absorbed)
        for segment in self._segments:
            left = kept[-1] if kept else None
            if (
                left is not None
                and (left.id in relabelled or segment.id in relabelled)
                and (left.id, segment.id) not in apart
                and (not same_voice_only or _same_voice(left, segment))
                and _can_merge(left, segment)
            ):
                _absorb(left, segment)
                relabelled.add(left.id)  # its end moved: its next pair must be decided again
                absorbed.append(segment.id)
            else:
                kept.append(segment)
        self._segments = kept
        return self._batch(relabelled, absorbed)

    def hand_over(self, stored: Mapping[str, tuple[str, float]]) -> tuple[Batch, float | None]:
        """The conversation got another writer (a newer connection took it over): go on as the
        builder of a new conversation that holds what the store does not have of this one.

        ``stored`` maps each segment id the store holds to its ``(text, end)`` there (what this
        builder's writer last saved, or found on resuming). What is left moves, under new ids:
        a segment never stored, and the text a stored one grew by since it was saved (text only
        grows by appending; a stored neighbour it absorbed since is stripped from that growth,
        its own row still holds it). Relabels of stored segments stay behind (the conversation is
        the other writer's now). Buffered words come along; provisional words are dropped (the
        engine's next decode, or the session's next showing of words whose voice is undecided,
        shows them again): the client sees a segment made only of them withdrawn, and one they
        were shown on the end of as the store holds it.

        Times are rebased so that the new conversation starts at its earliest word. Returns the
        batch to store and send (the moved segments) and the shift in seconds (new time = old
        time − shift), None when nothing came along.
        """
        current = {segment.id for segment in self._segments}
        merged_away = [text for segment_id, (text, _) in stored.items() if segment_id not in current and text]
        moved: list[Segment] = []
        for segment in self._segments:
            kept = stored.get(segment.id)
            part = segment._copy()
            if kept is not None:
                text, end = kept
                if len(segment.text) <= len(text) or not segment.text.startswith(text):
                    continue                              # nothing new (at most its labels changed)
                rest = segment.text[len(text):].lstrip()
                for gone in merged_away:
                    if rest.startswith(gone):
                        rest = rest[len(gone):].lstrip()
                rest = normalise_text(rest)
                if not rest:
                    continue
                part.text, part.translations = rest, []     # a translation described the whole text
                part.words = []                             # its words no longer match its text
                part.start = min(max(segment.start, end), segment.end)
            part.id = self._new_id()
            moved.append(part)
        starts = [segment.start for segment in moved] + [piece.start for piece in self._pending]
        shift = min(starts) if starts else None
        if shift is not None:
            for item in (*moved, *self._pending):
                item.start -= shift
                item.end -= shift
        # What the client was shown that the other writer's conversation does not hold as shown:
        # an id it never stored is withdrawn (its words, if final, move under a new id; the
        # client saw it if it was shown provisionally before the refused batch took it over), a
        # stored one is shown as stored.
        withdrawn = [segment_id for segment_id in dict.fromkeys((*self._sent, *self._client_overrides))
                     if segment_id not in stored]
        restored = []
        for segment_id in self._client_overrides:
            if segment_id in stored and segment_id in self._sent:
                segment = Segment.from_stored(self._sent[segment_id])
                segment.text, segment.end = stored[segment_id]
                restored.append(segment)
        self._segments = moved
        self._sent = {segment.id: segment.to_wire() for segment in moved}
        self._pinned = set()
        self._partial, self._partial_changed, self._partial_ids = [], False, []
        self._client_overrides = {}
        batch = Batch(changed=[segment._copy() for segment in moved])
        if withdrawn or restored:
            batch.shown = restored + [segment._copy() for segment in moved]
            batch.withdrawn_ids = withdrawn
        return batch, shift

    def _batch(self, touched: set[str], absorbed: list[str]) -> Batch:
        """Report the touched segments whose wire form differs from what the client last saw,
        in conversation order. Searched from the newest end, where a batch's segments are: a
        conversation can run for hours, and a scan of all of its segments every 600 ms grew
        with its length (171 us per flush at 3,000 segments, 2.6x a short one; bench_segments.py)."""
        changed = []
        client_saw: dict[str, dict | None] = {}        # before this batch, of the segments it changes
        left = len(touched)
        for segment in reversed(self._segments):
            if not left:
                break
            if segment.id not in touched:
                continue
            left -= 1
            wire = segment.to_wire()
            if self._sent.get(segment.id) != wire:
                client_saw[segment.id] = self._sent.get(segment.id)
                self._sent[segment.id] = wire
                changed.append(segment._copy())
        changed.reverse()
        deleted = [segment_id for segment_id in absorbed if self._sent.pop(segment_id, None) is not None]
        for segment_id in absorbed:
            self._client_overrides.pop(segment_id, None)
        if not self._partial and not self._client_overrides and not self._partial_changed:
            return Batch(changed=changed, deleted_ids=deleted)      # nothing provisional: the common case
        return self._with_provisional(Batch(changed=changed, deleted_ids=deleted), client_saw)

    def _with_provisional(self, batch: Batch, client_saw: dict[str, dict | None]) -> Batch:
        """Fill ``batch.shown``/``withdrawn_ids``: the client's view is the final segments with the
        provisional words folded onto the tail; send what differs from what it last saw."""
        self._partial_changed = False
        view = {segment.id: segment for segment in self._provisional_view()}
        candidates = {segment.id: segment for segment in batch.changed}
        for segment_id in list(view) + list(self._client_overrides):
            if segment_id not in candidates:
                candidates[segment_id] = view.get(segment_id) or self._final_segment(segment_id)
        shown: list[Segment] = []
        for segment_id, segment in candidates.items():
            segment = view.get(segment_id, segment)
            before = self._client_overrides.get(segment_id, client_saw.get(segment_id, self._sent.get(segment_id)))
            if segment is None:                           # a provisional-only segment, withdrawn
                self._client_overrides.pop(segment_id, None)
                batch.withdrawn_ids.append(segment_id)
                if segment_id in self._partial_ids:
                    self._partial_ids.remove(segment_id)
                continue
            wire = segment.to_wire()
            if wire == self._sent.get(segment_id):
                self._client_overrides.pop(segment_id, None)
            else:
                self._client_overrides[segment_id] = wire
            if wire != before:
                shown.append(segment._copy())
        shown.sort(key=lambda segment: segment.start)
        batch.shown = shown
        return batch

    def _provisional_view(self) -> list[Segment]:
        """The provisional words as the client should see them: folded onto a copy of the tail
        and onto each other as final words would be, the rest as segments of their own (under
        ``_partial_ids``, in order). The embedded engine's words (``set_partial``) all carry one
        speaker and labels: one run, one piece."""
        if not self._partial:
            return []
        tail = self._segments[-1]._copy() if self._segments else None
        grew_tail = False
        view: list[Segment] = []
        for run in _raw_segments(self._partial):
            left = view[-1] if view else tail
            if left is not None:
                _clamp_after(run, left)
                if _can_merge(left, run):
                    _absorb(left, run)
                    grew_tail |= left is tail
                    continue
            view.append(run)
        while len(self._partial_ids) < len(view):
            self._partial_ids.append(self._new_id())
        for segment, segment_id in zip(view, self._partial_ids):
            segment.id = segment_id
        return ([tail] if grew_tail else []) + view

    def _final_segment(self, segment_id: str) -> Segment | None:
        for segment in reversed(self._segments):
            if segment.id == segment_id:
                return segment
        return None


def _split(segment: Segment, parts: Sequence[tuple[int, int, bool, str | None]]) -> list[Segment] | None:
    """``segment`` cut along its words into ``parts`` (``(words, speaker_id, is_user,
    person_id)`` in order), ids left empty; None when its words do not add up to it (a stored
    segment, or counts that do not match) or the parts are all one voice."""
    words = segment.words
    if (len(parts) < 2 or sum(n for n, *_ in parts) != len(words) or any(n <= 0 for n, *_ in parts)
            or normalise_text(" ".join(text for text, _, _ in words)) != segment.text
            or len({tuple(voice) for _, *voice in parts}) < 2):
        return None
    out: list[Segment] = []
    first = 0
    for n, speaker_id, is_user, person_id in parts:
        run = words[first:first + n]
        first += n
        start = segment.start if not out else max(run[0][1], out[-1].end)
        out.append(replace(segment, id="", text=normalise_text(" ".join(text for text, _, _ in run)),
                           speaker_id=speaker_id, is_user=is_user, person_id=person_id,
                           start=start, end=max(start, max(end for _, _, end in run)),
                           translations=[], words=list(run)))
    return out


def _raw_segments(pieces: list[_Piece]) -> list[Segment]:
    """Join runs of consecutive words that share speaker, provider and labels (ids come later).

    A pause of MAX_SAME_SPEAKER_GAP or more also ends a run, and the fold then applies the
    combine rules across it, as it does between flushes: otherwise how a transcript is cut would
    depend on how fast its words arrived (a client streaming faster than real time got 50 s of
    speech with 8 s pauses as one segment, at real-time pace one segment per utterance)."""
    runs: list[list[_Piece]] = []
    for piece in pieces:
        if runs and runs[-1][-1].joins(piece) and piece.start - runs[-1][-1].end < MAX_SAME_SPEAKER_GAP:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    segments = []
    for run in runs:
        first = run[0]
        segments.append(
            Segment(
                id="",
                text=normalise_text(" ".join(p.text for p in run)),
                speaker_id=first.speaker_id,
                is_user=first.is_user,
                person_id=first.person_id,
                start=first.start,
                # The last word's end, or an earlier word's if that one lasted longer (overlaps).
                end=max(p.end for p in run),
                speech_profile_processed=first.speech_profile_processed,
                stt_provider=first.provider,
                language=first.language,
                words=[(p.text, p.start, p.end) for p in run],
            )
        )
    return segments


def _finite(value: Any) -> float | None:
    """A client's time in seconds: a finite number within ±MAX_TIME_SECONDS, else None."""
    return time_within(value, -MAX_TIME_SECONDS, MAX_TIME_SECONDS)
