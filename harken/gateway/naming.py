"""Speakers who say their name become people, and those people's voices are learnt.

Omi's backend does this per final segment (its ``create_speakers`` and ``speaker_auto_assign``
query parameters, both sent by the app): a segment of a speaker not yet known in which the
speaker introduces themselves (``introductions.find_introduction``) gives that speaker's
``speaker_label_suggestion`` with the name; a person of that name is looked up (case-blind) and,
with ``create_speakers`` and an explicit introduction, created if the user has none; the
suggestion carries the person's id only with ``speaker_auto_assign`` (else ``""``, as upstream).

With ``speaker_auto_assign`` the speaker's segments are also labelled with the person (the
session relabels them), and when the session ends the voice of every speaker named so is stored
as that person's voice if the person has none of the configured model yet (at least
``MIN_LEARNT_SECONDS`` of their speech, the mean of their stretches' embeddings from the local
diarization): the next conversation recognises them by voice, per stretch of speech.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Sequence

from ..conversations.store import PersonRow, Store
from .introductions import find_introduction
from .profiles import MAX_PEOPLE, MIN_SAMPLE_SPEECH_SECONDS, Voice, current_voice, to_bytes
from .speakers import SpeakerIdentifier

log = logging.getLogger("harken.naming")

# A voice learnt from a conversation needs as much speech as a person's uploaded sample.
MIN_LEARNT_SECONDS = MIN_SAMPLE_SPEECH_SECONDS
MAX_NAMED_PER_SESSION = 32          # a transcript full of "I'm …" cannot create people without end


@dataclass(frozen=True)
class Named:
    speaker_id: int
    person_id: str | None           # None: nobody of that name, and none was created
    name: str
    segment_id: str


class SpeakerNaming:
    """One session's introductions. Use from the session's event loop."""

    def __init__(self, uid: str, store: Store | None, speakers: SpeakerIdentifier, *, create: bool,
                 auto_assign: bool, language: str):
        self.uid, self.store, self.speakers = uid, store, speakers
        self.create, self.auto_assign, self.language = create, auto_assign, language
        self._named: dict[int, tuple[str, str]] = {}      # speaker → (person id, name)
        self._seen: set[str] = set()                      # segment ids that introduced someone

    async def on_segments(self, segments: Sequence) -> list[Named]:
        """The introductions in these final segments (of speakers not named yet, not the owner's)."""
        found: list[Named] = []
        for segment in segments:
            if (segment.is_user or segment.person_id or segment.id in self._seen
                    or segment.speaker_id in self._named or len(self._named) >= MAX_NAMED_PER_SESSION):
                continue
            introduction = find_introduction(segment.text, self.language)
            if introduction is None:
                continue
            self._seen.add(segment.id)
            person_id = await self._person(introduction.name, may_create=self.create and introduction.explicit)
            if person_id is not None:
                self._named[segment.speaker_id] = (person_id, introduction.name)
            found.append(Named(segment.speaker_id, person_id, introduction.name, segment.id))
        return found

    async def _person(self, name: str, *, may_create: bool) -> str | None:
        if self.store is None:
            return None
        try:
            people = await self.store.list_people(self.uid)
            same = next((p for p in people if p.name.casefold() == name.casefold()), None)
            if same is not None:
                return same.id
            if not may_create or len(people) >= MAX_PEOPLE:
                return None
            person = PersonRow(id=uuid.uuid4().hex, uid=self.uid, name=name, embedding=None, samples=0,
                               speech_seconds=0.0, created_at=time.time())
            await self.store.add_person(person)
            log.info("uid=%s: created person %s from a self-introduction", self.uid, person.id)
            return person.id
        except Exception:                 # the transcript goes on without the name
            log.exception("could not look up or create a person for uid=%s", self.uid)
            return None

    async def learn_voices(self) -> int:
        """At the session's end: store the voice of each speaker named (with auto-assign) as their
        person's, where the person has no voice of the configured model. Returns how many."""
        if self.store is None or not self.auto_assign:
            return 0
        learnt = 0
        for speaker_id, (person_id, _) in self._named.items():
            voice = self.speakers.voice_of(speaker_id)
            if voice is None or voice[1] < MIN_LEARNT_SECONDS:
                continue
            try:
                learnt += await self._store_voice(person_id, Voice(*voice))
            except Exception:
                log.exception("could not store a learnt voice for uid=%s", self.uid)
        return learnt

    async def _store_voice(self, person_id: str, voice: Voice) -> bool:
        current = await self.store.get_person(self.uid, person_id)
        model_id = self.speakers.model.model_id
        if current is None or current_voice(current.embedding, model_id):
            return False              # gone, or already has a voice: an upload or an earlier session's
        # No voice, or one of another speaker model (never averaged with this one's): replaced.
        return await self.store.set_person_voice(self.uid, person_id, to_bytes(voice.embedding, model_id),
                                                 samples=current.samples + 1, speech_seconds=voice.speech_seconds,
                                                 expected_samples=current.samples)
