"""Who each diarized speaker of a session is: the device owner, a known person, or nobody known.

One ``SpeakerIdentifier`` per session (reference/omi-listen-behaviour.md §5, done locally):

- The session appends every decoded chunk to an ``AudioRing`` (60 s), so positions on the audio
  clock address recent audio.
- As segments grow, the session calls ``observe(speaker_id, start, end, segment_id)`` with times
  on the audio clock. While a speaker has no mapping, a segment of at least 2 s queues a job (one
  per speaker at a time, 3 tries per speaker, 100 jobs at most): at most 10 s from the middle of
  that segment is embedded off the event loop and compared by cosine similarity with the
  owner's embedding and the known people's.
- ``async for match in identifier.matches()`` yields each speaker that matched, so the session
  can relabel its segments and send a ``speaker_label_suggestion``.
- A client's ``speaker_assigned`` goes through ``assign``; it wins over automatic matches, before
  or after them, for the rest of the session.

``diarize_words`` labels words from their voice with a ``ConversationDiarizer``: the embedded
engine's (it has no diarization) and, when the speaker model is installed, a cloud engine's too
(its own speaker changes only split utterances, so labels stay the same across a failover to a
provider whose numbering restarts, and the owner is found per stretch of speech): each
utterance's audio is embedded once as windows of the speaker model, so a speaker change inside an utterance
splits its words; the conversation is re-clustered as it grows, and ``speaker_changes`` then says
which earlier segments now belong to another speaker (the session re-sends them by id). The
owner's and known people's voices anchor that clustering per stretch of speech: a stretch is
theirs only when its own audio matches (``labels`` answers for the words).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace
from typing import AsyncIterator, Collection, Mapping, Sequence

import numpy as np

from ..audio.diarization import ConversationDiarizer
from ..audio.speaker_models import SpeakerModel, model_named
from ..audio.ring import AudioRing
from ..audio.vad import speech_spans
from ..stt.base import EMBEDDED_PROVIDER, Word
from .segments import Split

log = logging.getLogger("harken.speakers")

USER_PERSON_ID = "user"           # the person_id that names the device owner on the wire
MIN_SPEECH_SECONDS = 2.0          # shorter segments identify a voice too unreliably (Omi: ≥ 2 s)
MAX_CLIP_SECONDS = 10.0           # longer clips cost more and hardly score better (Omi: ≤ 10 s)
MAX_QUEUED_JOBS = 100             # Omi's queue size; extras are dropped and counted
MAX_ATTEMPTS_PER_SPEAKER = 3      # an unknown voice stays unknown: stop re-embedding it
# Word runs separated by at least this pause are embedded as separate utterances; the embedded
# engine ends an utterance after 500 ms of silence, so its utterances are at least this far apart.
UTTERANCE_GAP_SECONDS = 0.5
# Runs shorter than this are too short to place a voice: they keep the previous run's speaker.
MIN_DIARIZE_SECONDS = 0.5
# Pauses at least this long split the speech found under an utterance's words, for moving the
# words' edges out of the pauses (``_inside_speech``). 300 and 500 ms gave the same DER on the
# development calls (bench_diarization.py through the gateway's path).
SPEECH_PAUSE_MS = 300
# Audio taken on each side of an utterance's words: word times from the engine are a little
# tight, and a window needs the voice's onset.
UTTERANCE_PAD_SECONDS = 0.1
# A clip speaker's voice (``clip_voices``) is embedded from at most this much of its audio: more
# hardly moves a mean of hundreds of windows, and costs CPU per clip.
MAX_VOICE_SECONDS = 60.0


@dataclass(frozen=True)
class SpeakerMatch:
    """A diarized speaker identified as the owner or as a person."""

    speaker_id: int
    is_user: bool
    person_id: str | None         # USER_PERSON_ID for the owner, as in speaker_label_suggestion
    person_name: str | None
    segment_id: str | None        # the segment whose audio matched (None for a client assignment)
    similarity: float | None      # cosine similarity of the match (None for a client assignment)

    @property
    def assigned(self) -> bool:
        """True if the client assigned this speaker (rather than the voice matching)."""
        return self.similarity is None

    @property
    def segment_labels(self) -> tuple[bool, str | None]:
        """``(is_user, person_id)`` as segments carry them: the owner's segments have no person_id."""
        return self.is_user, None if self.is_user else self.person_id


@dataclass
class IdentifierStats:
    queued: int = 0       # jobs accepted
    dropped: int = 0      # jobs refused because the queue was full
    expired: int = 0      # jobs whose audio had left the ring before their turn
    embedded: int = 0     # clips embedded (identification and diarization)
    matched: int = 0      # speakers matched automatically
    errors: int = 0       # embeddings that failed


@dataclass(frozen=True)
class _Job:
    speaker_id: int
    start: float
    end: float
    segment_id: str | None


_CLOSE = object()


class SpeakerIdentifier:
    """Speaker identification and local diarization for one session. Use from one event loop.

    ``owner`` is the owner's enrolled embedding (or None), ``people`` maps person ids to
    ``(name, embedding)``. Embeddings must come from ``model`` (default: the configured speaker
    model by default), which also sets the similarity bars.
    """

    def __init__(
        self,
        ring: AudioRing,
        *,
        owner: np.ndarray | None = None,
        people: Mapping[str, tuple[str, np.ndarray]] | None = None,
        embedder=None,
        model: SpeakerModel | None = None,
        threshold: float | None = None,
        min_speech_s: float = MIN_SPEECH_SECONDS,
        max_clip_s: float = MAX_CLIP_SECONDS,
        max_queued: int = MAX_QUEUED_JOBS,
        max_attempts: int = MAX_ATTEMPTS_PER_SPEAKER,
        diarizer: ConversationDiarizer | None = None,
    ):
        self.ring = ring
        self.model = model or model_named()
        self.threshold = self.model.known_similarity if threshold is None else threshold
        self.min_speech_s = min_speech_s
        self.max_clip_s = max_clip_s
        self.max_attempts = max_attempts
        self.stats = IdentifierStats()
        self._embedder = embedder
        # Candidates as one matrix, so a match is one matrix-vector product.
        ids: list[tuple[str, str | None]] = []
        vectors: list[np.ndarray] = []
        if owner is not None:
            ids.append((USER_PERSON_ID, None))
            vectors.append(owner)
        for person_id, (name, embedding) in (people or {}).items():
            ids.append((person_id, name))
            vectors.append(embedding)
        self._candidates = ids
        self._matrix = _unit_rows(vectors) if vectors else None
        self.diarizer = diarizer or ConversationDiarizer.for_model(self.model, known=self._matrix,
                                                                   known_threshold=self.threshold)
        self._reclustered = False
        self._finished = False
        self._unsettled = False        # speech placed since the last settle()
        self._suggested: list[SpeakerMatch] = []     # known voices found by local diarization
        self._mappings: dict[int, SpeakerMatch] = {}
        self._attempts: dict[int, int] = {}
        self._pending: set[int] = set()
        # Bounded by observe() rather than by the queue itself, so close() can always enqueue
        # its end marker.
        self._jobs: asyncio.Queue = asyncio.Queue()
        self._max_queued = max_queued
        self._closed = False
        self._last_speaker = 0

    # -- what is known -------------------------------------------------------------------
    def mapping(self, speaker_id: int) -> SpeakerMatch | None:
        """The speaker's current identification, if any."""
        return self._mappings.get(speaker_id)

    def labels(self, speaker_id: int) -> tuple[bool, str | None]:
        """``(is_user, person_id)`` for new words of this speaker (``SegmentBuilder.add_words``)."""
        match = self._mappings.get(speaker_id)
        if match is None:
            match = self._known_match(speaker_id)
        return match.segment_labels if match else (False, None)

    def _known_match(self, speaker_id: int) -> SpeakerMatch | None:
        """The enrolled voice local diarization gave ``speaker_id`` to, as a match."""
        row = self.diarizer.known_label(speaker_id)
        if row is None:
            return None
        person_id, name = self._candidates[row]
        return SpeakerMatch(speaker_id, person_id == USER_PERSON_ID, person_id, name, None, None)

    # -- inputs --------------------------------------------------------------------------
    def observe(self, speaker_id: int, start: float, end: float, segment_id: str | None = None) -> bool:
        """A segment of ``speaker_id`` spans ``[start, end]`` seconds of the audio clock.

        Queues an identification if the speaker is still unknown, has no job waiting, has tries
        left and the segment is long enough. Returns True if a job was queued. Never blocks.
        """
        if (
            self._closed
            or self._matrix is None
            or end - start < self.min_speech_s
            or speaker_id in self._mappings
            or speaker_id in self._pending
            or self._attempts.get(speaker_id, 0) >= self.max_attempts
        ):
            return False
        if self._jobs.qsize() >= self._max_queued:
            self.stats.dropped += 1
            return False
        self._jobs.put_nowait(_Job(speaker_id, start, end, segment_id))
        self._pending.add(speaker_id)
        self.stats.queued += 1
        return True

    def assign(self, speaker_id: int, person_id: str | None, person_name: str | None = None) -> SpeakerMatch:
        """The client said who ``speaker_id`` is (``person_id`` ``"user"`` = the owner).

        Remembered for the session and never overridden by an automatic match.
        """
        match = SpeakerMatch(speaker_id, person_id == USER_PERSON_ID, person_id or None, person_name,
                             segment_id=None, similarity=None)
        self._mappings[speaker_id] = match
        return match

    def name(self, speaker_id: int, person_id: str, person_name: str) -> SpeakerMatch:
        """The speaker said who they are (a self-introduction, ``naming.py``): like ``assign``, it
        holds for the rest of the session over voice matching."""
        return self.assign(speaker_id, person_id, person_name)

    @property
    def last_label(self) -> int:
        """The label the newest words labelled by voice got (0 before any)."""
        return self._last_speaker

    def voice_of(self, speaker_id: int) -> tuple[np.ndarray, float] | None:
        """``(embedding, seconds of speech)`` of a locally diarized speaker, or None."""
        return self.diarizer.voice(speaker_id)

    def close(self) -> None:
        """No more jobs; ``matches()`` ends once the queued ones are done."""
        if not self._closed:
            self._closed = True
            self._jobs.put_nowait(_CLOSE)

    async def wait_idle(self) -> None:
        """Wait until every queued job has been run (by a running ``matches()`` loop)."""
        await self._jobs.join()

    # -- identification ------------------------------------------------------------------
    async def matches(self) -> AsyncIterator[SpeakerMatch]:
        """Run the queued jobs one at a time; yield each automatic match. Ends after ``close``."""
        while True:
            job = await self._jobs.get()
            if job is _CLOSE:
                self._jobs.task_done()
                return
            try:
                match = await self._identify(job)
            finally:
                self._pending.discard(job.speaker_id)
                self._jobs.task_done()
            if match is not None:
                yield match

    async def _identify(self, job: _Job) -> SpeakerMatch | None:
        if job.speaker_id in self._mappings:          # assigned while the job waited
            return None
        clip = self._centred_clip(job.start, job.end)
        wanted = min(job.end - job.start, self.max_clip_s) * self.ring.sample_rate
        if clip.size < 0.9 * wanted:                  # most of it has left the ring already
            self.stats.expired += 1
            return None
        self._attempts[job.speaker_id] = self._attempts.get(job.speaker_id, 0) + 1
        embedding = await self._embed(clip)
        if embedding is None or job.speaker_id in self._mappings:
            return None
        best, similarity = self.best_candidate(embedding)
        if best is None:
            return None
        person_id, name = best
        match = SpeakerMatch(job.speaker_id, person_id == USER_PERSON_ID, person_id, name,
                             segment_id=job.segment_id, similarity=similarity)
        self._mappings[job.speaker_id] = match
        self.stats.matched += 1
        return match

    def best_candidate(self, embedding: np.ndarray) -> tuple[tuple[str, str | None] | None, float]:
        """The enrolled ``(person_id, name)`` most similar to ``embedding`` if at or above the
        threshold (else None), and that similarity."""
        if self._matrix is None:
            return None, 0.0
        similarities = self._matrix @ _unit_rows([embedding])[0]
        best = int(np.argmax(similarities))
        similarity = float(similarities[best])
        return (self._candidates[best] if similarity >= self.threshold else None), similarity

    # -- local diarization ---------------------------------------------------------------
    async def diarize_words(self, words: Sequence[Word], *, clock_offset: float = 0.0,
                            keep_times: bool = False) -> list[Word]:
        """``words`` with ``speaker`` set from their voice.

        ``clock_offset`` is the audio-clock time of the words' time zero (0.0 when the engine's
        stream was opened at the start of the session). Words are grouped into utterances at
        pauses of ``UTTERANCE_GAP_SECONDS``; pass all the words at hand at once (for example
        those of one 600 ms flush) so each utterance is embedded once, whole. A word takes the
        label of the stretch around its middle, so an utterance with a speaker change inside is
        split there. An utterance too short (or no longer in the ring) to embed keeps the last
        speaker. The words come back in the order given. Word edges that lie in a pause move
        to the speech under them (Whisper stretches them over pauses), unless ``keep_times``
        (a cloud engine's times are its own and stay as they came).
        """
        labelled: dict[int, Word] = {}
        for run in _utterances(words):
            start = run[0].start + clock_offset - UTTERANCE_PAD_SECONDS
            end = max(w.end for w in run) + clock_offset + UTTERANCE_PAD_SECONDS
            clip = self.ring.slice(start, end)
            speech: list[tuple[float, float]] = []
            if clip.size >= MIN_DIARIZE_SECONDS * self.ring.sample_rate:
                known_before = self._known_labels()
                start = end - clip.size / self.ring.sample_rate   # the ring may have cut its head
                speech = await self._in_worker(self._place, clip, start, end, not keep_times) or []
                for label in self._known_labels() - known_before:
                    self._suggested.append(self._known_match(label))
            for w in run:
                a, b = w.start + clock_offset, w.end + clock_offset
                if not keep_times:
                    a, b = _inside_speech(a, b, speech)
                label = self.diarizer.label_at((a + b) / 2)
                if label is not None:
                    self._last_speaker = label
                labelled[id(w)] = Word(w.text, a - clock_offset, b - clock_offset, self._last_speaker,
                                       w.confidence, w.language)
        return [labelled[id(w)] for w in words]

    async def clip_voices(self, words: Sequence[Word], max_seconds: float = MAX_VOICE_SECONDS,
                          ) -> dict[int, tuple[np.ndarray | None, float]]:
        """Each speaker of ``words`` (one clip's, a cloud provider's numbering): ``(voice,
        seconds)``, the unit mean of the speaker model's windows over its words' audio (from the
        ring) and how many seconds that audio holds; ``(None, 0.0)`` when none of it is in the
        ring or the model is missing. The voices of ``audio.clip_speakers.ClipSpeakerLinker``.
        At most ``max_seconds`` of a speaker is embedded, its longest stretches first."""
        pieces: dict[int, list[np.ndarray]] = {}
        for run in sorted(_utterances(words), key=lambda run: run[0].start - max(w.end for w in run)):
            have = pieces.setdefault(run[0].speaker, [])
            if sum(p.size for p in have) >= max_seconds * self.ring.sample_rate:
                continue
            clip = self.ring.slice(run[0].start - UTTERANCE_PAD_SECONDS, max(w.end for w in run) + UTTERANCE_PAD_SECONDS)
            if clip.size:
                have.append(clip)
        voices = await self._in_worker(self._voices, pieces) if any(pieces.values()) else None
        rate = self.ring.sample_rate
        return {speaker: ((voices or {}).get(speaker), sum(p.size for p in clips) / rate if voices else 0.0)
                for speaker, clips in pieces.items()}

    def _voices(self, pieces: dict[int, list[np.ndarray]]) -> dict[int, np.ndarray]:
        """On the embedder's thread: each speaker's windows over its stretches, averaged. Stretches
        too short to embed alone are embedded joined (a speaker who only said "yes" and "right"
        still gets a voice, a faint one: ``ClipSpeakerLinker`` trusts it less)."""
        out = {}
        shortest = int(MIN_DIARIZE_SECONDS * self.ring.sample_rate)
        for speaker, clips in pieces.items():
            short = [c for c in clips if c.size < shortest]
            clips = [c for c in clips if c.size >= shortest] + ([np.concatenate(short)] if short else [])
            windows = [self._embedder.embed_windows(c) for c in clips if c.size >= shortest // 2]
            if windows:
                out[speaker] = _unit_rows([np.concatenate(windows).mean(axis=0)])[0]
        return out

    def _place(self, clip: np.ndarray, start: float, end: float, find_speech: bool) -> list[tuple[float, float]]:
        """Embed an utterance's windows and label it, and with ``find_speech`` find the speech in
        it (on the embedder's thread: the VAD and re-clustering cost milliseconds that the event
        loop should not wait for). Returns the speech spans, on the audio clock (none without
        ``find_speech``: words whose times are kept need no VAD pass)."""
        self._unsettled = True
        self._reclustered |= self.diarizer.add_utterance(start, end, self._embedder.embed_windows(clip))
        if not find_speech:
            return []
        rate = self.ring.sample_rate
        return [(start + a / rate, start + b / rate) for a, b in speech_spans(clip, min_silence_ms=SPEECH_PAUSE_MS)]

    def _known_labels(self) -> set[int]:
        return {label for label in set(self.diarizer.labels) if self.diarizer.known_label(label) is not None}

    @property
    def reclustered(self) -> bool:
        """True if a re-clustering ran that ``speaker_changes`` has not looked at yet (or the
        session is closing and the final one has not run)."""
        return self._reclustered or (self._closed and not self._finished and self.diarizer.labels != [])

    async def finish(self) -> None:
        """The session is closing: the last re-clustering, whose changes apply at once."""
        if not self._finished and self.diarizer.labels:
            self._finished = True
            await self._recluster_all()

    async def settle(self) -> None:
        """The conversation paused: the re-clustering the close would run, now, with its changes
        applied at once (``speaker_changes`` then says which segments to re-send). A client that
        hangs up after the pause has already seen the labels the store keeps; the close's own
        re-clustering finds nothing new to change. Runs once per pause: only after new speech was
        placed since the last one."""
        if self._unsettled and not self._finished and self.diarizer.labels:
            await self._recluster_all()

    async def _recluster_all(self) -> None:
        """The diarizer's whole-conversation re-clustering, its changes applied at once."""
        self._unsettled = False
        self._reclustered |= bool(await self._in_worker(self.diarizer.finish))

    def take_suggestions(self) -> list[SpeakerMatch]:
        """Known voices that local diarization found since the last call (for
        ``speaker_label_suggestion``)."""
        out, self._suggested = self._suggested, []
        return out

    async def speaker_changes(self, segments: Sequence, time_offset: float = 0.0,
                              providers: Collection[str] = (EMBEDDED_PROVIDER,)) -> dict[str, object]:
        """After a re-clustering: ``{segment id: change}`` for the locally diarized ``segments``
        (those of ``providers``; conversation time = audio clock + ``time_offset``) whose speech
        now belongs to another label, in the form ``SegmentBuilder.respeak`` takes. A segment
        whose words (``Segment.words``) now fall to several labels is to be split along them
        (a ``Split`` of its words' runs); else the change is the one ``(speaker_id, is_user,
        person_id)``. Each word's label is the one a new word
        there would get (``diarize_words``). Empty if nothing was re-clustered since the last
        call. Once ``close`` was called, the final re-clustering runs first (see ``finish``)."""
        if self._closed:
            await self.finish()
        if not self._reclustered:
            return {}
        self._reclustered = False
        changes: dict[str, object] = {}
        horizon = self.diarizer.recluster_start + time_offset
        for segment in segments:
            if segment.end < horizon:
                continue
            mapping = self._mappings.get(segment.speaker_id)
            if segment.stt_provider not in providers or (mapping is not None and mapping.assigned):
                continue          # another engine's labels, or the client said who this is
            now = (segment.speaker_id, segment.is_user, segment.person_id)
            parts = self._word_parts(segment.words, time_offset)
            if len(parts) > 1:
                changes[segment.id] = Split(tuple(parts))
                continue
            label = parts[0][1] if parts else self.diarizer.label_between(segment.start - time_offset,
                                                                           segment.end - time_offset)
            if label is None:
                continue
            is_user, person_id = self.labels(label)
            if (label, is_user, person_id) != now:
                changes[segment.id] = (label, is_user, person_id)
        return changes

    def _word_parts(self, words: Sequence[tuple[str, float, float]], time_offset: float,
                    ) -> list[tuple[int, int, bool, str | None]]:
        """Runs of ``words`` (``(text, start, end)`` in conversation time) under one label, as
        ``(words, label, is_user, person_id)``; [] when no label is known."""
        parts: list[list] = []
        for _, start, end in words:
            label = self.diarizer.label_at((start + end) / 2 - time_offset)
            if label is None:
                return []
            if parts and parts[-1][1] == label:
                parts[-1][0] += 1
            else:
                parts.append([1, label])
        return [(n, label, *self.labels(label)) for n, label in parts]

    # -- shared helpers ------------------------------------------------------------------
    def _centred_clip(self, start: float, end: float) -> np.ndarray:
        middle = (start + end) / 2
        half = min(end - start, self.max_clip_s) / 2
        return self.ring.slice(middle - half, middle + half)

    async def _embed(self, clip: np.ndarray) -> np.ndarray | None:
        return await self._run_model("embed_async", clip)


    async def _in_worker(self, function, *args):
        """``function(*args)`` on the embedder's thread; None (counted, logged) if it failed."""
        return await self._run_model("run_async", function, *args)

    async def _run_model(self, method: str, *args):
        if self._embedder is None:
            if self.model.problem():     # optional model not installed: no labels, no crash
                return None
            # The first use in the process loads the model (~0.2 s): not on the event loop.
            self._embedder = await asyncio.to_thread(self.model.load)
        try:
            embedding = await getattr(self._embedder, method)(*args)
        except Exception:
            self.stats.errors += 1
            log.exception("speaker embedding failed")
            return None
        self.stats.embedded += 1
        return embedding


def continues(before: Word, word: Word) -> bool:
    """Whether ``word`` goes on the utterance that ``before`` is in: no pause of
    ``UTTERANCE_GAP_SECONDS`` and, for an engine with diarization of its own, the same speaker
    (its turn boundaries are kept)."""
    return word.start - before.end < UTTERANCE_GAP_SECONDS and word.speaker == before.speaker


def _utterances(words: Sequence[Word]) -> list[list[Word]]:
    runs: list[list[Word]] = []
    run_end = 0.0
    for word in sorted(words, key=lambda w: w.start):
        if runs and continues(replace(runs[-1][-1], end=run_end), word):
            runs[-1].append(word)
            run_end = max(run_end, word.end)
        else:
            runs.append([word])
            run_end = word.end
    return runs


def _inside_speech(start: float, end: float, speech: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """A word's ``[start, end]`` with the edges that lie in a pause moved to the speech they
    belong to. Whisper stretches a turn's first word back over the pre-roll and its last word
    over the silence after it (by 0.3-1.0 s on the development calls), so segments claimed
    pauses that nobody spoke in. A word with no speech under it keeps its times."""
    inside = [(a, b) for a, b in speech if a < end and b > start]
    if not inside:
        return start, end
    return max(start, inside[0][0]), min(end, inside[-1][1])


def _unit_rows(vectors: Sequence[np.ndarray]) -> np.ndarray:
    matrix = np.asarray([np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors], dtype=np.float32)
    return matrix / (np.linalg.norm(matrix, axis=1, keepdims=True) + 1e-12)
