"""The background worker that turns uploaded offline recordings into conversations.

One per process. It claims a job (``conversations.sync_jobs``: the outbox's claim pattern, so two
nodes never take one job), renews the claim while it works, and for each file, in recording order:

1. reads the length-prefixed frames (``codecs.wal``) and decodes them with the codec plugin live
   audio uses; a frame that fails to decode is skipped and counted, a truncated tail ends the file;
2. cuts speech regions with the same VAD endpointing as live audio and transcribes them by the
   configured chain, with the user's custom vocabulary as a live session has it: a cloud
   provider's pre-recorded API where one is configured for the language (``stt.prerecorded``:
   retries, failover, and the embedded engine when every one failed), else the embedded engine,
   after live decodes and at low CPU priority (``stt.batch``);
3. labels speakers as live audio from the same engine is: the embedded engine's words by voice
   (``SpeakerIdentifier.diarize_words``, owner and known people per stretch of speech), a cloud
   provider's by its own diarization, each clip's speakers linked to the recording's by voice
   (``audio.clip_speakers``: the provider numbers every request afresh) and each speaker matched
   to the owner and known people by voice (``observe`` / ``matches``); then merges words into
   segments with the live ``SegmentBuilder``;
4. stores the segments into conversations by wall-clock time and marks the file done, in one
   transaction (``SyncJobs.commit_file``); only then is the uploaded file deleted.

When every file is done, the new and reopened conversations are processed (summary,
``memory_created`` webhook), and the job is done. A job whose node died resumes, at its first
unfinished file, once its claim expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from .. import codecs
from ..audio.clip_speakers import ClipSpeakerLinker
from ..audio.embedding import ExecutorModel
from ..audio.speaker_models import model_named
from ..audio.ring import AudioRing
from ..codecs.wal import FrameStats, parse_sync_filename, read_frames
from ..conversations.sync_jobs import ClaimedJob, ClaimLost, FileCommit, PendingFile, SyncJobs
from ..stt.base import EMBEDDED_PROVIDER, Word
from ..stt.batch import BatchTranscriber
from ..stt.prerecorded import CloudUnavailable, RecordedChain, SplicedClip
from ..stt.recorded_providers import build_recorded_chain
from ..stt.priority import LiveFirstGate
from ..stt.whisper import MIN_SPEECH_SECONDS
from .profiles import load_voices
from .segments import SegmentBuilder
from .speakers import SpeakerIdentifier
from .vocabulary import load_vocabulary

if TYPE_CHECKING:
    from ..config import Settings
    from ..conversations import ConversationService, Store

log = logging.getLogger("harken.sync")

CHUNK_FRAMES = 1500            # frames decoded per trip to the pool (15 s of 10 ms Opus frames)
RING_SECONDS = 120.0           # recent audio kept for speaker embeddings (a chunk + the longest utterance)
IDLE_POLL_SECONDS = 5.0        # how often an idle worker looks for jobs (and for expired claims)
CONVERSATION_TIMEOUT = 120.0   # Omi's default conversation_timeout, for conversations a sync makes
LEFTOVER_AGE_SECONDS = 3600.0  # an upload file untouched this long with no job waiting for it is removed


@dataclass(frozen=True)
class JobUser:
    """What a job's transcription needs of its user, read once per job: the enrolled voices (owner,
    known people) and the custom vocabulary (every engine gets it, as a live session's do)."""

    uid: str
    owner: np.ndarray | None
    people: dict
    vocabulary: tuple[str, ...] = ()


@dataclass
class FileStats:
    frames: int = 0
    bad_frames: int = 0
    truncated: bool = False
    audio_seconds: float = 0.0
    speech_seconds: float = 0.0
    decode_seconds: float = 0.0
    words: int = 0
    segments: int = 0
    engine: str = ""               # who transcribed it: local, or the cloud provider
    error: str | None = None


def folder_identity(folder: Path) -> str:
    """A random id kept in ``folder/.origin``: the same for every process using the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / ".origin"
    try:
        with open(marker, "x") as f:             # the first process to get here writes it
            f.write(uuid.uuid4().hex)
    except FileExistsError:
        pass
    for _ in range(50):                          # another process may be writing it this instant
        text = marker.read_text().strip()
        if text:
            return text
        time.sleep(0.01)
    raise RuntimeError(f"{marker} is empty: delete it and restart")


class _Decoding:
    """One file's frames → 16 kHz PCM and speech regions, a chunk at a time (runs in the pool)."""

    def __init__(self, path: str, codec: str, sample_rate: int, channels: int, endpointer):
        self.file = open(path, "rb")
        self.frame_stats = FrameStats()
        self.frames = read_frames(self.file, self.frame_stats)
        self.decoder = codecs.decoder_for(codec, sample_rate, channels)
        self.endpointer = endpointer
        self.bad_frames = 0
        self.samples = 0
        self.done = False

    def next_chunk(self) -> tuple[np.ndarray, list]:
        pieces: list[np.ndarray] = []
        for _ in range(CHUNK_FRAMES):
            frame = next(self.frames, None)
            if frame is None:
                self.done = True
                pieces.append(self.decoder.flush())
                break
            try:
                pcm = self.decoder.decode(frame)
            except codecs.HeldBack:       # its audio comes with the next frame's, if that confirms it
                continue
            except Exception:             # DecodeError, or a codec library's own: drop and count
                self.bad_frames += 1
                continue
            if len(pcm):
                pieces.append(pcm)
        pcm = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
        self.samples += len(pcm)
        utterances = self.endpointer.feed(pcm) if len(pcm) else []
        if self.done:
            tail = self.endpointer.flush()
            if tail is not None:
                utterances.append(tail)
        return pcm, utterances

    def close(self) -> None:
        self.file.close()
        self.decoder.close()


class SyncWorker:
    """Claims and processes sync jobs in the background; ``wake()`` after an upload."""

    def __init__(self, settings: "Settings", store: "Store", conversations: "ConversationService | None",
                 transcriber: BatchTranscriber, *, recorded: RecordedChain | None = None, node_id: str | None = None):
        self.settings = settings
        self.recorded = recorded or RecordedChain(settings, {})
        self._pool_embedder: ExecutorModel | None = None
        self.speaker_model = model_named(settings.speaker_model)
        self.upload_dir = Path(settings.data_dir) / "sync"
        self.jobs = SyncJobs(store, origin=folder_identity(self.upload_dir))
        self.store = store
        self.conversations = conversations
        self.transcriber = transcriber
        self.node_id = node_id or f"sync:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = settings.sync_job_lease
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.files_done = 0
        self.audio_seconds_done = 0.0
        self.decode_seconds = 0.0

    # --- life ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        await self._remove_leftovers()
        self._task = asyncio.create_task(self._run(), name="harken-sync-worker")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            try:
                await self.jobs.release(self.node_id)      # another node (or our restart) resumes at once
            except Exception:
                log.warning("could not release sync claims; they expire in %.0fs", self.lease)
        await self.transcriber.aclose()
        await self.recorded.aclose()

    def register_metrics(self, metrics) -> None:
        """Backlog gauges on the gateway's registry, read from the store at each scrape (every
        node's uploads: the families are shared across ``--workers``)."""
        from prometheus_client import Gauge

        jobs = Gauge("harken_sync_backlog_jobs", "sync-local-files jobs not done yet (all nodes)",
                     registry=metrics.registry)
        files = Gauge("harken_sync_backlog_files", "uploaded recording files waiting for transcription (all nodes)",
                      registry=metrics.registry)
        seconds = Gauge("harken_sync_audio_waiting_seconds",
                        "seconds of uploaded audio waiting for transcription (estimated from frame counts)",
                        registry=metrics.registry)

        async def refresh() -> None:
            counts = await self.jobs.backlog()
            for gauge, value in zip((jobs, files, seconds), counts):
                gauge.set(value)

        metrics.add_store_reader(refresh, ("harken_sync_backlog_jobs", "harken_sync_backlog_files",
                                           "harken_sync_audio_waiting_seconds"))
        gate = self.transcriber.pool.live_gate
        if gate is not None:
            waits = Gauge("harken_sync_live_waits", "times batch transcription (this process) waited for live "
                          "decodes to finish before starting work", registry=metrics.registry)
            waits.set_function(lambda: gate.batch_waits)

    def wake(self) -> None:
        self._wake.set()

    async def _remove_leftovers(self) -> None:
        """Delete upload files no job waits for (an upload cut off mid-way, a crash after a
        file's commit but before its deletion). Only old ones: another process sharing the
        folder (``--workers``) may be receiving an upload right now."""
        try:
            keep = await self.jobs.paths_to_keep()
        except Exception:
            log.exception("sync: could not list waiting uploads; leaving the upload folder as it is")
            return
        old = time.time() - LEFTOVER_AGE_SECONDS
        for path in self.upload_dir.rglob("*.bin"):
            if str(path) not in keep and path.stat().st_mtime < old:
                path.unlink(missing_ok=True)
        for folder in sorted((p for p in self.upload_dir.rglob("*") if p.is_dir()), reverse=True):
            if folder.stat().st_mtime < old:
                with contextlib.suppress(OSError):
                    folder.rmdir()               # only if empty

    async def _run(self) -> None:
        while True:
            try:
                job = await self.jobs.claim(node=self.node_id, now=time.time(), lease=self.lease)
            except Exception:
                log.exception("sync: claiming a job failed; retrying")
                job = None
            if job is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(IDLE_POLL_SECONDS):
                        await self._wake.wait()
                continue
            try:
                await self.process_job(job)
            except ClaimLost:
                log.warning("sync job %s: claim lost to another worker; leaving it", job.id)
            except Exception:
                log.exception("sync job %s failed; it is retried when its claim expires", job.id)
                await asyncio.sleep(1.0)

    # --- one job ------------------------------------------------------------------------------------
    async def process_job(self, job: ClaimedJob) -> None:
        await self.transcriber.load()
        log.info("sync job %s: %d file(s) for uid=%s", job.id, len(job.files), job.uid)
        renewer = asyncio.create_task(self._renew(job.id))
        try:
            owner, people = await load_voices(self.store, job.uid, self.speaker_model.model_id)
            user = JobUser(job.uid, owner, people, await load_vocabulary(self.store, job.uid))
            for file in job.files:
                await self._process_file(job, file, user)
                self._check(renewer)
            # From every file's stats, so a job resumed after a crash processes what its earlier
            # files stored too (processing is at most once per conversation anyway).
            result = job_result(await self.jobs.get(job.id))
            await self._process_conversations(result.pop("to_process"))
            await self.jobs.finish(job.id, node=self.node_id, result=result, now=time.time())
            with contextlib.suppress(OSError):
                (self.upload_dir / job.id).rmdir()      # its files are gone: each once stored
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        log.info("sync job %s done", job.id)

    async def _renew(self, job_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            await self.jobs.renew(job_id, node=self.node_id, until=time.time() + self.lease)

    @staticmethod
    def _check(renewer: asyncio.Task) -> None:
        """Raise ``ClaimLost`` if renewing found another worker holds the job."""
        if renewer.done() and not renewer.cancelled() and renewer.exception() is not None:
            raise renewer.exception()

    async def _process_file(self, job: ClaimedJob, file: PendingFile, user: JobUser) -> None:
        stats = FileStats()
        try:
            segments = await self._transcribe(file, stats, user)
        except (OSError, codecs.UnsupportedFormat, ValueError) as exc:
            stats.error = f"{type(exc).__name__}: {exc}"
            log.warning("sync job %s: file %s cannot be read: %s", job.id, file.name, stats.error)
            await self.jobs.fail_file(job.id, file.idx, node=self.node_id, stats=asdict(stats))
            Path(file.path).unlink(missing_ok=True)
            return
        stats.segments = len(segments)
        commit = FileCommit(segments=segments, stats=asdict(stats), timeout_s=CONVERSATION_TIMEOUT)
        result = await self.jobs.commit_file(job.id, file.idx, node=self.node_id, uid=job.uid,
                                             recorded_at=file.recorded_at, commit=commit, now=time.time())
        Path(file.path).unlink(missing_ok=True)       # only now: its conversations are stored
        self.files_done += 1
        self.audio_seconds_done += stats.audio_seconds
        self.decode_seconds += stats.decode_seconds
        log.info("sync job %s: %s: %.1f s of audio, %d frame(s) skipped%s, %d segment(s) into %d new and %d "
                 "existing conversation(s)", job.id, file.name, stats.audio_seconds, stats.bad_frames,
                 ", truncated" if stats.truncated else "", len(segments), len(result.new_ids),
                 len(result.updated_ids))

    async def _transcribe(self, file: PendingFile, stats: FileStats, user: JobUser) -> list[dict]:
        """The file's segments: through the chain's cloud providers where one is configured for
        the language (their pre-recorded APIs), else, or when every one of them failed, with the
        embedded engine."""
        language = self.transcriber.settings.sync_language
        if self.recorded.links(language):
            try:
                return await self._transcribe_in_cloud(file, stats, user, language)
            except CloudUnavailable as exc:
                log.warning("sync: %s: no cloud provider transcribed it (%s); decoding it with the embedded engine",
                            file.name, exc)
                stats.__dict__.update(asdict(FileStats()))
        if not self.transcriber.supports(language):
            language = "en"
        return await self._transcribe_locally(file, stats, user, language)

    async def _embedder(self) -> ExecutorModel | None:
        """The speaker model run by the batch pool (after live decodes, at low priority), not by
        the embedder's own thread that live sessions share; None when it is not installed."""
        if self.speaker_model.problem():
            return None
        if self._pool_embedder is None:
            pool = self.transcriber.pool
            self._pool_embedder = (await pool.run(self.speaker_model.load)).on(pool.executor)
        return self._pool_embedder

    @contextlib.asynccontextmanager
    async def _decoded(self, file: PendingFile, stats: FileStats, model=None):
        """The file's frames decoded in the pool: yields a ``_Decoding`` whose ``next_chunk``
        gives (pcm, utterances), cut as a live stream decoded by ``model`` is (the embedded
        engine's model; None for a cloud provider's speech regions); its counts go into
        ``stats`` at the end."""
        info = parse_sync_filename(file.name, now=math.inf)
        pool = self.transcriber.pool
        decoding = await pool.run(_Decoding, file.path, info.codec, info.sample_rate, info.channels,
                                  self.transcriber.endpointer(model))
        try:
            yield decoding
        finally:
            await pool.run(decoding.close)
        stats.frames = decoding.frame_stats.frames
        stats.truncated = decoding.frame_stats.truncated or decoding.frame_stats.corrupt_length
        stats.bad_frames = decoding.bad_frames + decoding.decoder.held_dropped()   # held, then refuted: bad too
        stats.audio_seconds = round(decoding.samples / codecs.TARGET_RATE, 3)

    @staticmethod
    def _builder(uid: str, file: PendingFile) -> SegmentBuilder:
        """Segment ids that are the same each time this user's file is transcribed (a resumed job
        skips those stored), and another user's for the same bytes: ids are unique across users,
        so ids from the file alone made a second user's upload of it store nothing."""
        counter = iter(range(1, 10**9))
        key = hashlib.sha256(f"{uid}\n{file.sha256}".encode()).hexdigest()[:24]
        return SegmentBuilder(id_factory=lambda: f"sync-{key}-{next(counter)}")

    async def _transcribe_locally(self, file: PendingFile, stats: FileStats, user: JobUser,
                                  language: str) -> list[dict]:
        pool = self.transcriber.pool
        ring = AudioRing(RING_SECONDS)
        identifier = SpeakerIdentifier(ring, owner=user.owner, people=user.people, model=self.speaker_model,
                                       embedder=await self._embedder())
        builder = self._builder(user.uid, file)
        decoding_options, model = await self.transcriber.decoding_for(language, user.vocabulary)
        last_end = 0.0
        try:
            async with self._decoded(file, stats, model) as decoding:
                while not decoding.done:
                    pcm, utterances = await pool.run(decoding.next_chunk)
                    ring.append(pcm)
                    if not utterances:
                        continue
                    words, last_end, spent = await pool.run(self.transcriber.decode, utterances, decoding_options,
                                                            model, last_end)
                    stats.decode_seconds += spent
                    stats.speech_seconds += sum(u.speech_seconds for u in utterances)
                    if not words:
                        continue
                    stats.words += len(words)
                    words = await identifier.diarize_words(words)
                    builder.add_words(words, provider=EMBEDDED_PROVIDER, speaker_labels=identifier.labels)
                    # As a live session with the embedded engine: the owner and known people are found
                    # per stretch of speech by the local diarization (diarize_words), not per speaker,
                    # and re-clustering moves earlier segments.
                    builder.flush()
                    if identifier.reclustered:
                        builder.respeak(await identifier.speaker_changes(builder.segments))
                await identifier.finish()
                builder.respeak(await identifier.speaker_changes(builder.segments))
        finally:
            identifier.close()
        stats.engine = EMBEDDED_PROVIDER
        return [segment.to_stored() for segment in builder.segments]

    async def _transcribe_in_cloud(self, file: PendingFile, stats: FileStats, user: JobUser,
                                   language: str) -> list[dict]:
        """Speech regions sent as clips of at most ``sync_cloud_clip_seconds`` of the recording to
        the chain's cloud providers, with the user's vocabulary. Speakers are the provider's
        diarization within a clip; providers number each request's speakers from scratch, so each
        clip's speakers are given the recording's numbers by voice (``ClipSpeakerLinker``, while
        the clip's audio is still in the ring), and matched to the owner and known people by
        voice as a live session on a cloud provider does (``observe``/``matches``). Without the
        speaker model, each clip's speakers get numbers of their own. Raises ``CloudUnavailable``."""
        pool = self.transcriber.pool
        clip_seconds = self.settings.sync_cloud_clip_seconds
        ring = AudioRing(clip_seconds + RING_SECONDS)
        identifier = SpeakerIdentifier(ring, owner=user.owner, people=user.people, model=self.speaker_model,
                                       embedder=await self._embedder())
        linker = ClipSpeakerLinker(self.speaker_model.clip_link_similarity, self.speaker_model.min_speaker_seconds)
        by_voice = self.speaker_model.problem() is None
        builder = self._builder(user.uid, file)
        matches: list = []

        async def collect() -> None:
            async for match in identifier.matches():
                matches.append(match)

        collector = asyncio.create_task(collect(), name="harken-sync-speakers")
        clip: list = []

        async def send(clip: list) -> None:
            spliced = SplicedClip(clip)
            result = await self.recorded.transcribe(spliced, language, reference=file.sha256[:12],
                                                    vocabulary=user.vocabulary)
            stats.engine = result.provider
            stats.speech_seconds += sum(u.speech_seconds for u in clip)
            voices = (await identifier.clip_voices(result.words) if by_voice
                      else dict.fromkeys({w.speaker for w in result.words}, (None, 0.0)))
            numbers = linker.link(voices)
            words = [Word(w.text, w.start, w.end, numbers[w.speaker], w.confidence, w.language)
                     for w in result.words]
            stats.words += len(words)
            builder.add_words(words, provider=result.provider, speaker_labels=identifier.labels)
            for segment in builder.flush().changed:
                identifier.observe(segment.speaker_id, segment.start, segment.end, segment.id)
            await identifier.wait_idle()
            for match in matches:
                is_user, person_id = match.segment_labels
                builder.relabel(match.speaker_id, is_user=is_user, person_id=person_id)
            matches.clear()

        try:
            async with self._decoded(file, stats) as decoding:
                while not decoding.done:
                    pcm, utterances = await pool.run(decoding.next_chunk)
                    ring.append(pcm)
                    clip += [u for u in utterances if u.speech_seconds >= MIN_SPEECH_SECONDS]
                    if clip and ring.end_seconds - clip[0].start_seconds >= clip_seconds:
                        await send(clip)
                        clip = []
                if clip:
                    await send(clip)
        finally:
            identifier.close()
            await asyncio.gather(collector, return_exceptions=True)
        return [segment.to_stored() for segment in builder.segments]

    async def _process_conversations(self, conversation_ids: list[str]) -> None:
        """Process the new and reopened conversations (each at most once, across nodes); their
        ``memory_created`` webhooks go out through the outbox."""
        if self.conversations is None or not conversation_ids:
            return
        ids = list(dict.fromkeys(conversation_ids))
        results = await asyncio.gather(*(self.conversations.process(cid) for cid in ids), return_exceptions=True)
        for cid, outcome in zip(ids, results):
            if isinstance(outcome, Exception):
                log.warning("sync: processing conversation %s failed (%r); the sweep retries it", cid, outcome)


def job_result(job: dict | None) -> dict:
    """What a job's files stored: conversations made (``new_memories``) and joined
    (``updated_memories``), as upstream's result names them, plus those to process."""
    new: dict[str, None] = {}
    updated: dict[str, None] = {}
    to_process: dict[str, None] = {}
    for file in (job or {}).get("files", []):
        stats = orjson.loads(file["stats"]) if file.get("stats") else {}
        new.update(dict.fromkeys(stats.get("new_memories", ())))
        updated.update(dict.fromkeys(stats.get("updated_memories", ())))
        to_process.update(dict.fromkeys(stats.get("to_process", ())))
    return {"new_memories": list(new), "updated_memories": [cid for cid in updated if cid not in new],
            "to_process": list(to_process)}


async def start_sync_worker(settings: "Settings", store: "Store", conversations: "ConversationService | None",
                            metrics=None, live_gate: LiveFirstGate | None = None) -> SyncWorker:
    """The app's worker, started; its backlog joins ``metrics`` (``GatewayMetrics``) if given, and
    its decodes wait for the live engine's (``live_gate``: ``WhisperProvider.live_gate``).
    The batch engine loads with the first job it decodes, so a node that never gets an upload
    (or sends uploads to a cloud provider) does not hold a second copy of the model."""
    transcriber = BatchTranscriber(settings, nice=settings.sync_nice, threads=settings.sync_threads,
                                   live_gate=live_gate)
    worker = SyncWorker(settings, store, conversations, transcriber, recorded=build_recorded_chain(settings))
    await worker.start()
    if metrics is not None:
        worker.register_metrics(metrics)
    return worker
