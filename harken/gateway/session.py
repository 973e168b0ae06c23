"""One live connection: audio in, segments out (DESIGN.md "The way audio flows").

``Session.run`` wires decoder → audio clock → STT stream → segment builder, and runs the receive
loop, the 600 ms flush, the 10 s ping, the idle check and the STT consumer as tasks of one
``asyncio.TaskGroup``. A task ends the session by raising ``EndSession`` with the close code;
teardown then finalises the STT stream, flushes and sends the last segments (if the client is
still there), closes the socket and logs the connection's usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

import numpy as np
import orjson
from starlette.websockets import WebSocket

from .. import codecs
from ..audio import AudioRing
from ..conversations import LeaseLost, UnknownSegments
from ..stt.base import EMBEDDED_PROVIDER, Partial, STTError, STTStream, StreamConfig, Word, speech_seconds
from ..stt.channel_streams import ChannelStreams
from ..stt.fallback import FallbackPolicy, FallbackStream
from ..stt.gating import gated
from ..stt.selection import NoProviderError, choose_chain
from . import events
from .clock import AudioClock
from .context import Gateway
from .pacing import SUGGESTED_BURST_CHARS, SUGGESTED_CHARS_PER_SECOND, Pacer
from .params import ListenParams
from .segments import (MAX_PROVIDER_CHARS, Batch, Segment, SegmentBuilder, speaker_assignment,
                       suggested_segments)
from .session_photos import SessionPhotos
from .profiles import load_voices, voices_from_stored
from .naming import SpeakerNaming
from .speakers import SpeakerIdentifier, continues
from .vocabulary import load_vocabulary
from .ws_protocol import binary_sink

log = logging.getLogger("harken.session")

# What newer apps send that Harken has nothing to do with (no onboarding questions, the app's
# screen state): accepted silently, like unknown types, but named so that a log reader knows.
APP_MESSAGES_NOT_ACTED_ON = frozenset(("client_state", "start_onboarding", "skip_question"))
STREAM_CLOSE_TIMEOUT = 15.0       # seconds teardown waits with no progress for the engine's last words
MAX_CLOSE_REASON_BYTES = 123      # RFC 6455 limit for a close frame's reason
RING_SECONDS = 60                 # recent audio kept for speaker identification (as Omi)
# A cloud engine's utterance still being spoken waits until this much audio followed its last
# word, or this long went by without a new word, or it is this long, before it is labelled by
# voice (``Session._take_undiarized``), so that it is embedded whole. Its words are shown at once
# meanwhile (provisional, under the voice their engine's speaker had last), and the store and
# webhooks get them when the voice has decided. When the client saw nothing before the voice
# decided, with 8 s words of someone talking without a pause waited up to 8 s (the null
# provider's 5-stream load test: word → client p50 3.4 s; held at most 1.6 s: 1.16 s). Shown at
# once (_show_undiarized), the same test gives p50 0.29-0.33 s against 0.94-1.03 s held, p95
# 0.54-0.58 s against 1.74-1.80 s, for about three times the segment versions sent (the store's
# batches are unchanged); how long a run is held no longer delays what the client sees.
# The longest run held is two diarizer stretches (3.2 s). Held at most one (1.6 s), a turn's
# first 1.6 s were embedded alone, and when they did not sound like the speaker's earlier
# speech the re-clustering gave them a label of their own (a newest voice keeps its label):
# the client saw a label the conversation does not keep, moved by id seconds later
# (test_cloud_speakers, a known voice's next turn shown under a label of its own first: 12 of
# 21 turns; held 3.2 s: 0 of 16). An utterance of several stretches lets the diarizer take a
# lone odd stretch into its neighbours. The store and webhooks get a long turn's words up to
# 1.6 s later.
OPEN_RUN_HOLD_SECONDS = 1.0
OPEN_RUN_IDLE_SECONDS = 0.8
OPEN_RUN_MAX_SECONDS = 3.2
# After this long with no new word labelled by voice, the conversation is taken to have paused
# and the speaker path runs the re-clustering the close would (``SpeakerIdentifier.settle``):
# the client sees the labels the stored conversation will have, rather than only the store
# getting them when the session ends. The embedded engine sends an utterance's words at once,
# 0.7 s after its speech ends, so 2 s without a word is a pause (or a long utterance still
# being spoken, whose speech is not yet placed: nothing to re-cluster then). A cloud engine's
# words come while they are spoken, so 2 s without one is a pause there too; by then its last
# run was labelled (OPEN_RUN_IDLE_SECONDS) and nothing is shown provisionally.
SETTLE_AFTER_SECONDS = 2.0
# Decoded audio goes on to the clock, ring, webhook chunker and speech stream in pieces of this
# size rather than per message: a device's 10 ms packets would otherwise cost four trips through
# that path per piece. It delays the audio by less than one piece (30 ms at 10 ms packets).
AUDIO_PIECE_SAMPLES = codecs.TARGET_RATE * 40 // 1000
# A consumer this far behind pauses reading the socket (the sink itself never blocks).
MAX_PENDING_SAMPLES = codecs.TARGET_RATE * 10
# The embedded engine's words (an utterance's at once, or its provisional ones) go out as soon as
# they are ready rather than at the next flush_interval, at most one batch per this many seconds.
# Other providers keep the phased flush, whose batches are stored in one group commit per phase.
EAGER_FLUSH_GAP = 0.1


class EndSession(Exception):
    """Raised by any session task to end the connection with ``code``."""

    def __init__(self, code: int, reason: str = "", *, client_gone: bool = False):
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.client_gone = client_gone


@dataclass
class SessionStats:
    messages: int = 0
    audio_bytes: int = 0
    keepalives: int = 0
    decode_errors: int = 0      # messages dropped: undecodable, or held back and then refuted
    held_back: int = 0          # messages held until the next confirmed them (or not: then a decode error too)
    words: int = 0
    segments_sent: int = 0


class Session:
    def __init__(self, ws: WebSocket, gateway: Gateway, uid: str, params: ListenParams, session_id: str):
        self.ws = ws
        self.gateway = gateway
        self.settings = gateway.settings
        self.uid = uid
        self.params = params
        self.id = session_id
        self.clock = AudioClock()
        self.metrics = gateway.metrics.session(params.codec)
        self.builder = SegmentBuilder()
        self.stats = SessionStats()
        self.decoder: codecs.Decoder | None = None
        self.stream: STTStream | None = None
        self.ring = AudioRing(RING_SECONDS)
        self.speakers = SpeakerIdentifier(self.ring, model=gateway.speaker_model)
        self.naming: SpeakerNaming | None = None     # self-introductions (create_speakers), set by _open
        # Words waiting for a speaker label by voice, with their provider: every engine's words
        # when the speaker model is there (a cloud engine's own labels only mark where its turns
        # change), else the embedded engine's alone.
        self._undiarized: list[tuple[Word, str]] = []
        self._voice_labelled: set[str] = set()      # providers whose words were labelled by voice
        self._last_word_at = 0.0                    # monotonic time the newest of them arrived
        # A cloud engine's words are shown before the voice decides (_show_undiarized): the voice
        # label each (provider, engine speaker) was given last is the best guess for its next words.
        self._voice_of: dict[tuple[str, int], int] = {}
        self._unshown = False                       # cloud words came since they were last shown
        self._showing = False                       # some are shown provisionally now
        self.provider_name: str | None = None
        self.stt_reason: str | None = None   # which language and engine serve it (ready's reason)
        self.time_offset = 0.0            # conversation time of this session's audio-clock zero
        self._offset_known = False        # fixed by the conversation at the first word (see _anchor)
        self.clock_origin = time.time()   # wall time at which the audio clock read 0
        self.live = None                  # the conversation this session writes (conversations.LiveConversation)
        # id → (text, end) of each segment as the store holds it: what moves on if a newer
        # connection takes the conversation over (_continue_alone).
        self._stored: dict[str, tuple[str, float]] = {}
        # The same of the batches being saved right now (_persist): they land in whichever
        # conversation is current when their save runs, so a rollover does not move them.
        self._saving: dict[str, tuple[str, float]] = {}
        # Words a rollover carried into the new conversation, stored and sent by the next flush.
        self._carried = Batch()
        self._handing_over = False     # _continue_alone moves the words itself
        # What take_unsaved gave a REST call to store, and what ``_stored`` said of it before.
        self._taken: tuple[Batch, dict[str, tuple[str, float] | None]] | None = None
        # Held by a store step from taking the words waiting for their voice to storing them,
        # and by a REST call that ends the conversation (settled): so that words being labelled
        # when the call comes land in the conversation it ends, not in the next one.
        self._storing = asyncio.Lock()
        self.last_activity = time.monotonic()
        self._client_gone = False
        self._first_bad_frame_at: float | None = None
        self._held_dropped = 0         # the decoder's held_dropped() already counted as decode errors
        self._decode_warning_sent = False
        self._end_requested: EndSession | None = None   # set by request_end (e.g. a draining node)
        self._end_wake = asyncio.Event()
        # Decoded audio waiting for the pump (see AUDIO_PIECE_SAMPLES), and what the pump must act on.
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._audio_wake = asyncio.Event()
        self._accepting_audio = True
        self._oversized: int | None = None        # size of a message over the limit
        self._decode_warning_due = False
        self._sink = None                          # the server's binary sink, when it offers one
        self._reader = None                        # the decoder's native reader on that sink, if any
        self._send_nowait = None                   # the stream's synchronous send, when it has one
        # Flushes and relabels under way (see _uninterrupted): the teardown lets them finish.
        self._in_flight: set[asyncio.Task] = set()
        self.photos = SessionPhotos(self.send_json)     # OpenGlass image_chunk pieces
        self._notices: set[asyncio.Task] = set()        # events sent from synchronous callbacks
        self._words_ready = asyncio.Event()          # embedded-engine words wait for a flush
        # Real-time pacing (pacing.py): audio samples, and characters of suggested transcripts.
        started = time.monotonic()
        self._audio_pacer = Pacer(self.settings.audio_realtime_factor * codecs.TARGET_RATE,
                                  self.settings.audio_burst_seconds * codecs.TARGET_RATE, started)
        self._text_pacer = Pacer(SUGGESTED_CHARS_PER_SECOND, SUGGESTED_BURST_CHARS, started)
        self._pace_resume: asyncio.TimerHandle | None = None   # the sink's reading resumes then
        self._pace_wait = 0.0                                   # without a sink: the receive loop sleeps

    # -- public -------------------------------------------------------------------------
    async def run(self) -> None:
        end = EndSession(1001, "session ended")
        try:
            await self._open()
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._receive_loop(), name=f"receive-{self.id}")
                tasks.create_task(self._audio_pump(), name=f"audio-{self.id}")
                tasks.create_task(self._flush_loop(), name=f"flush-{self.id}")
                tasks.create_task(self._ping_loop(), name=f"ping-{self.id}")
                tasks.create_task(self._idle_watch(), name=f"idle-{self.id}")
                tasks.create_task(self._speaker_loop(), name=f"speakers-{self.id}")
                tasks.create_task(self._end_watch(), name=f"end-{self.id}")
                if self.stream is not None:
                    tasks.create_task(self._transcribe_loop(), name=f"stt-{self.id}")
        except EndSession as raised:          # from _open, before the task group started
            end = raised
        except BaseExceptionGroup as group:
            end = self._end_from(group)
        finally:
            # Shielded so that a server shutdown (cancellation) still releases the engine stream.
            await asyncio.shield(self._teardown(end))

    def request_end(self, code: int, reason: str) -> None:
        """Ask the session to end with ``code`` (e.g. 1012 when the node drains). Its teardown
        still collects the engine's last words and stores and sends them before closing."""
        if self._end_requested is None:
            self._end_requested = EndSession(code, reason)
            self._end_wake.set()

    # -- opening -------------------------------------------------------------------------
    async def _open(self) -> None:
        await self.send_json(events.service_status("initiating"))
        try:
            self.decoder = await codecs.open_decoder(self.params.codec, self.params.sample_rate, self.params.channels,
                                                     source=self.params.source)
        except codecs.UnsupportedFormat as exc:
            await self.send_json(events.error(1008, str(exc), "sample_rate"))
            raise EndSession(1008, f"sample_rate: {exc}") from None
        await self._join_conversation()
        if self.params.include_speech_profile and self.channels is None:   # a call's channels say who speaks
            # The owner's and named people's voices, before any audio flows: read with the
            # conversation if there is a conversation service.
            if self.live is not None and self.live.voices is not None:
                owner, people = voices_from_stored(self.uid, self.live.voices, self.gateway.speaker_model.model_id)
            else:
                owner, people = await load_voices(self.gateway.store, self.uid, self.gateway.speaker_model.model_id)
            self.speakers = SpeakerIdentifier(self.ring, owner=owner, people=people, model=self.gateway.speaker_model)
        self.naming = SpeakerNaming(self.uid, self.gateway.store, self.speakers, create=self.params.create_speakers,
                                    auto_assign=self.params.speaker_auto_assign, language=self.params.language)
        if self.params.custom_stt:
            self.provider_name = "custom"
        else:
            await self.send_json(events.service_status("stt_initiating"))
            self.stream = await self._open_stt()
        # From here on binary messages reach _on_binary straight from the socket's read callback
        # (ws_protocol.py), without a trip through the ASGI queue each.
        # A stream whose send never waits (FallbackStream buffers) gets pieces from _on_binary
        # directly; one that may wait (the VAD gate around it) is fed by the pump task.
        if self.stream is None:
            self._send_nowait = lambda pcm: None
        elif self.stream.immediate_send:
            self._send_nowait = self.stream.send_nowait
        self._sink = binary_sink(self.ws.scope)
        if self._sink is not None:
            # The socket's read callback runs in the connection's context, not this task's: give
            # it the session's, so that what it logs names the session (logs.bind_session).
            if self.settings.native_audio:
                self._reader = self.decoder.native_reader(
                    AUDIO_PIECE_SAMPLES, self.settings.max_message_bytes, _in_this_context(self._take_native))
            self._sink.attach(_in_this_context(self._on_binary), self._reader)
        await self.send_json(events.service_status(
            "ready", provider=self.provider_name or "", reason=self._ready_reason()))

    def _ready_reason(self) -> str:
        """What serves the session, for ``ready``'s ``reason`` (the app shows status details)."""
        if self.params.custom_stt:
            return "custom_stt: the app transcribes; segments it suggests are stored"
        if self.stt_reason:            # which language and engine (stt.selection.Choice.reason)
            return self.stt_reason
        return f"{self.provider_name} transcribes language {self.params.language}"

    async def _join_conversation(self) -> None:
        """Resume the user's in-progress conversation (or start one) and announce the last memory."""
        service = self.gateway.conversations
        if service is None:
            return
        self.live = await service.connect(
            self.uid, language=self.params.language, source=self.params.source,
            conversation_timeout=self.params.conversation_timeout, session_id=self.id,
            events=self.send_json, on_new_conversation=self._on_new_conversation,
            with_voices=self.params.include_speech_profile, hooks=self)
        existing = [Segment.from_stored(d) for d in self.live.existing_segments]
        self.builder = SegmentBuilder(existing)
        self._stored = {s.id: (s.text, s.end) for s in existing}
        # Upstream's order: last_memory (only if there is one: the app's parser needs a string),
        # then in_progress_conversations_processing, then stt_initiating.
        if self.live.last_memory_id:
            await self.send_json(events.last_memory(self.live.last_memory_id))
        await self.send_json(events.service_status("in_progress_conversations_processing"))
        await self.send_json(events.conversation_session(
            self.live.conversation_id, resumed=bool(self.live.existing_segments), source=self.params.source))

    def _on_new_conversation(self, live) -> None:
        """The conversation timed out or was ended on request (``POST /v1/conversations``) and is
        processed while the client stays, or a newer connection took it over (``_continue_alone``,
        which moves the words itself): go on in the new one.

        The builder may still hold words the store does not have: words that came after the
        last flush (the first words after the silence that timed the conversation out, or those
        that came while a REST call stored the rest). They move to the new conversation (a fresh
        builder would drop them: they would be in no conversation), with times rebased to its
        start, and are stored and sent by the next flush. Segments being saved right now are not
        moved: their save lands in the new conversation."""
        if self._handing_over:
            carried, shift = Batch(), None
        else:
            carried, shift = self.builder.hand_over({**self._stored, **self._saving})
        if shift is None:
            self.builder = SegmentBuilder()
            self._offset_known = False
        else:
            # The new conversation's time 0 is the wall time of its earliest carried word.
            live.anchor_at(self.clock_origin - self.time_offset + shift)
            self.time_offset -= shift
        self._carried = carried
        self._unshown = True        # words whose voice is undecided are shown again, in the new one
        self._stored = {}
        # Newer apps follow which conversation the socket writes (sent from here without waiting).
        event = events.conversation_session(live.conversation_id, resumed=False, source=self.params.source)
        task = asyncio.get_running_loop().create_task(self._send_quietly(event))
        self._notices.add(task)                 # a reference, so the task is not collected mid-way
        task.add_done_callback(self._notices.discard)

    async def _send_quietly(self, payload: dict) -> None:
        try:
            await self.send_json(payload)
        except EndSession:
            pass                       # the client left; nothing to tell

    # -- hooks for REST calls (conversations.lifecycle.SessionHooks) ------------------------
    @contextlib.asynccontextmanager
    async def settled(self, timeout: float) -> AsyncIterator[None]:
        """The conversation is processed on request: its words still waiting for their voice
        label (the store step labelling them now, those that came since) are labelled and in
        the builder for ``take_unsaved``, and no store step starts until the caller is done.
        Within ``timeout`` seconds (the embedding thread may be busy): past it the caller goes
        on without them, and they land in the next conversation, as before."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._storing.acquire()           # the store step under way finishes first
        except TimeoutError:
            log.warning("sid=%s: words being voice-labelled go to the next conversation (a store step "
                        "outlasted %.1f s)", self.id, timeout)
            yield
            return
        try:
            pending = self._take_undiarized(final=True)
            if pending:
                # Its own task, so that the wait may end without cutting it in half (the words
                # would be in no conversation); the teardown waits for it.
                labelling = self._spawn_in_flight(self._label_words(pending))
                await asyncio.wait([labelling], timeout=max(0.0, deadline - loop.time()))
                if not labelling.done():
                    log.warning("sid=%s: %d words still being voice-labelled after %.1f s go to the next "
                                "conversation", self.id, len(pending), timeout)
            yield
        finally:
            self._storing.release()

    def take_unsaved(self) -> tuple[list[dict], list[str]]:
        """The conversation is processed on request: flush the builder now (synchronously, so
        the words go to the conversation that ends) and send the batch after."""
        batch = self._with_carried(self.builder.flush())
        self._taken = None
        if batch:
            self._spawn_in_flight(self._send_batch(batch))
            ids = [s.id for s in batch.changed] + list(batch.deleted_ids)
            self._taken = (batch, {segment_id: self._stored.get(segment_id) for segment_id in ids})
            self._remember_stored(batch)     # the caller stores it, under the lock of our saves
        return [s.to_stored() for s in batch.changed], list(batch.deleted_ids)

    def _with_carried(self, batch: Batch) -> Batch:
        """``batch`` after the words a rollover carried over (if any): those first."""
        if not self._carried:
            return batch
        carried, self._carried = self._carried, Batch()
        return carried.then(batch)           # what either shows the client (provisional words) too

    def unsaved_refused(self) -> None:
        """The store refused what ``take_unsaved`` gave: a newer connection of the user and source
        took the conversation over. Those words are not stored: forget that they were, and go on
        in a new conversation of our own with them (``_continue_alone``), now rather than at the
        next save, which may never come (no more words)."""
        if self._taken is not None:
            _, before = self._taken
            for segment_id, kept in before.items():
                if kept is None:
                    self._stored.pop(segment_id, None)
                else:
                    self._stored[segment_id] = kept
            self._taken = None
        lost = self.live.conversation_id

        async def go_on_alone() -> None:
            if self.live.fenced and self.live.conversation_id == lost:   # no other step moved on yet
                batch = await self._uninterrupted(self._continue_alone())
                try:
                    await self._send_batch(batch)
                except EndSession:
                    pass                  # the client left; what it had is stored

        self._spawn_in_flight(go_on_alone())

    async def assign(self, segment_ids, *, is_user: bool, person_id: str | None) -> list[dict]:
        """``PATCH …/segments/assign-bulk`` on the live conversation: relabel those segments in
        the builder (its next flush would otherwise undo the change), store, send."""
        by_speaker: dict[int, list[str]] = {}
        known = {s.id: s.speaker_id for s in self.builder.segments}
        missing = [sid for sid in segment_ids if sid not in known]
        if missing:
            raise UnknownSegments(missing)
        for sid in segment_ids:
            by_speaker.setdefault(known[sid], []).append(sid)
        changed: list[dict] = []
        for speaker_id, ids in by_speaker.items():
            batch = self.builder.relabel(speaker_id, is_user=is_user, person_id=person_id, segment_ids=ids,
                                         by_user=True)
            conversation_id = self.live.conversation_id
            batch = await self._persist(batch)
            await self._send_batch(batch)
            if self.live.conversation_id != conversation_id:
                # A newer connection writes that conversation now: the caller writes the store.
                raise LeaseLost(conversation_id)
            changed += [s.to_stored() for s in batch.changed]
        return changed

    def _spawn_in_flight(self, step: Awaitable) -> asyncio.Future:
        """Run ``step`` as a task the teardown waits for (see ``_uninterrupted``)."""
        task = asyncio.ensure_future(step)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return task

    def _anchor(self, first_time: float) -> None:
        """Fix the conversation-time offset when the first words arrive (times then continue
        from the conversation's start, across reconnects)."""
        if not self._offset_known:
            if self.live is not None:
                self.time_offset = self.live.time_offset(self.clock_origin, first_time)
            self._offset_known = True

    @property
    def channels(self) -> tuple[codecs.channels.Channel, ...] | None:
        """The channels of a channel-prefixed stream (a phone call), each its own speaker; else None."""
        return getattr(self.decoder, "layout", None)

    async def _open_stt(self) -> STTStream:
        """The provider chain for the language (PROTOCOL §2), wrapped for retry and failover; for a
        phone call one per channel (codecs/channels.py), merged into one stream."""
        if self.channels is None:
            return await self._open_one_stt()
        streams = []
        try:
            for _ in self.channels:
                streams.append(await self._open_one_stt())
        except BaseException:
            await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)
            raise
        self.decoder.keep_channels = True
        return ChannelStreams(streams, [channel.speaker for channel in self.channels], self.decoder.take_channels)

    async def _open_one_stt(self) -> STTStream:
        try:
            choice = choose_chain(self.params.language, self.params.stt_service, self.gateway.providers,
                                  self.settings)
        except NoProviderError as exc:
            await self.send_json(events.error(1008, str(exc), "language"))
            raise EndSession(1008, str(exc)) from None
        chain, self.stt_reason = choice.chain, choice.reason
        # Read with the conversation (one shared transaction on the loop): a read of its own here
        # made every connect wait on the store's driver threads (conversations.store_conversations).
        vocabulary = (self.live.vocabulary if self.live is not None
                      else await load_vocabulary(self.gateway.store, self.uid))
        config = StreamConfig(language=choice.language, session_id=self.id, vocabulary=vocabulary)
        stream = FallbackStream(chain, config,
                                on_status=self._send_stt_status, policy=FallbackPolicy.from_settings(self.settings),
                                on_failure=self.metrics.stt_failure)
        try:
            self.provider_name = await stream.start()
        except STTError:
            # FallbackStream already told the client `stt_failed` (with reason and retry_after).
            await stream.close()
            raise EndSession(1011, "transcription_service_unavailable") from None
        # Cloud chains may skip the pauses (vad_gate); word times come back on the audio clock.
        return await gated(stream, self.params.vad_gate, self.settings.vad_gate, chain, label=f"sid={self.id}")

    async def _send_stt_status(self, status: dict) -> None:
        """Provider switches and failures from the FallbackStream's own tasks."""
        if status.get("status") == "stt_switched":
            self.provider_name = status.get("provider") or self.provider_name
            self.metrics.stt_switch(status)
        try:
            await self.send_json(status)
        except EndSession:
            pass

    # -- tasks ---------------------------------------------------------------------------
    async def _receive_loop(self) -> None:
        """Text messages and the disconnect; binary messages too when the server has no sink."""
        limit = self.settings.max_message_bytes
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise EndSession(message.get("code") or 1000, "client closed", client_gone=True)
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                self._on_binary(data)
                if self._pace_wait:
                    wait, self._pace_wait = self._pace_wait, 0.0
                    await asyncio.sleep(wait)
            elif text is not None:
                self.last_activity = time.monotonic()
                self.stats.messages += 1
                size = len(text.encode())
                if size > limit:
                    self._oversized = size
                    self._audio_wake.set()
                    continue
                await self._on_text(text)

    def _on_binary(self, data: bytes) -> None:
        """One binary message: count it, decode it, and queue the audio for the pump. Runs in the
        socket's read callback (ws_protocol.py), so it never awaits and never raises."""
        if not self._accepting_audio or self._oversized is not None:
            return
        if self._reader is not None:
            self._take_native()               # what the reader decoded came first
        now = time.monotonic()
        self.last_activity = now
        stats = self.stats
        stats.messages += 1
        size = len(data)
        if size > self.settings.max_message_bytes:
            self._oversized = size            # the pump sends the error and ends the session
            self._audio_wake.set()
            return
        if size <= 2:                          # the app's [0x8A, 0x00] heartbeat: activity, not audio
            stats.keepalives += 1
            return
        stats.audio_bytes += size
        decoder = self.decoder
        try:
            pcm = decoder.decode(data)
        except codecs.HeldBack:
            # Not a bad frame (yet): its audio comes with the next message's if that confirms it.
            stats.held_back += 1
            self.metrics.held_back()
            self._count_refuted(now)
            return
        except codecs.DecodeError as exc:
            self._count_refuted(now)
            self._on_decode_error(exc, now)
            return
        except Exception:
            log.exception("decoder failed sid=%s codec=%s", self.id, self.params.codec)
            self._on_decode_error(codecs.DecodeError("decoder failed"), now)
            return
        if decoder.held_dropped() != self._held_dropped:
            self._count_refuted(now)
        self._first_bad_frame_at = None
        if len(pcm) == 0:
            return
        self._queue_audio(pcm, now)

    def _take_native(self) -> None:
        """Collect what the native reader decoded: its messages count as if _on_binary had seen
        each. Called by the reader once a piece is ready, and by the session before it looks at
        the pending audio (the pump, the flush loop, a message the reader left, the teardown)."""
        pcm, messages, size, arrived = self._reader.take()
        if not messages:
            return
        self.last_activity = arrived
        self.stats.messages += messages
        self.stats.audio_bytes += size
        self._first_bad_frame_at = None
        if self._accepting_audio and self._oversized is None:
            self._queue_audio(np.frombuffer(pcm, dtype=np.int16), arrived)

    def _queue_audio(self, pcm: np.ndarray, now: float) -> None:
        """Decoded audio that arrived at ``now``: pending until a piece is ready, then on its way."""
        self._pending.append(pcm)
        self._pending_samples += len(pcm)
        self.metrics.audio_arrived(self.clock.samples + self._pending_samples, now)
        ahead = self._audio_pacer.take(len(pcm), now)
        if ahead:
            self._hold_reading(ahead)
        if self._pending_samples >= AUDIO_PIECE_SAMPLES:
            if self._send_nowait is not None:
                try:
                    self._pass_on(self._take_pending())
                except Exception:
                    log.exception("passing audio on failed sid=%s", self.id)
                    self.request_end(1011, "internal error")
                return
            self._audio_wake.set()
            if self._pending_samples > MAX_PENDING_SAMPLES and self._sink is not None:
                self._sink.pause_reading()

    def _hold_reading(self, seconds: float) -> None:
        """The client is ahead of real time past its burst: read nothing more for ``seconds``."""
        if self._sink is None:
            self._pace_wait = max(self._pace_wait, seconds)
        elif self._pace_resume is None:
            self._sink.pause_reading()
            self._pace_resume = asyncio.get_running_loop().call_later(seconds, self._end_hold)

    def _end_hold(self) -> None:
        self._pace_resume = None
        if self._pending_samples <= MAX_PENDING_SAMPLES:    # else the pump resumes once it catches up
            self._sink.resume_reading()

    async def _audio_pump(self) -> None:
        """Move pending audio on, piece by piece; act on what the sink could not (it cannot await)."""
        while True:
            await self._audio_wake.wait()
            self._audio_wake.clear()
            if self._oversized is not None:
                limit = self.settings.max_message_bytes
                await self.send_json(events.error(
                    1009, f"message of {self._oversized} bytes exceeds the {limit}-byte limit"))
                raise EndSession(1009, "message too large")
            if self._decode_warning_due:
                self._decode_warning_due = False
                await self.send_json(events.service_status("decode_errors", dropped_frames=self.stats.decode_errors))
            await self._push_pending()

    async def _push_pending(self) -> None:
        if self._reader is not None:
            self._take_native()
        if not self._pending:
            return
        pcm = self._take_pending()
        if self._sink is not None and self._pace_resume is None:
            self._sink.resume_reading()
        if self._send_nowait is not None:
            self._pass_on(pcm)
            return
        self._pass_on(pcm, to_stream=False)
        if self.stream is not None:
            await self.stream.send(pcm)

    def _take_pending(self) -> np.ndarray:
        pending = self._pending
        self._pending = []
        self._pending_samples = 0
        return pending[0] if len(pending) == 1 else np.concatenate(pending)

    def _pass_on(self, pcm: np.ndarray, to_stream: bool = True) -> None:
        """A piece of decoded audio to the clock, the ring, the audio webhook and the stream."""
        self.clock.advance(len(pcm))
        self.ring.append(pcm)
        if self.live is not None:
            self.live.add_audio(pcm)
        if to_stream:
            self._send_nowait(pcm)

    async def _transcribe_loop(self) -> None:
        assert self.stream is not None
        try:
            async for word in self.stream:
                self._on_word(word)
        except STTError as exc:
            # Every provider of the chain failed; FallbackStream has sent `stt_failed`. What was
            # transcribed so far is flushed and stored by the teardown.
            log.warning("stt failed sid=%s provider=%s: %s", self.id, self.provider_name, exc)
            raise EndSession(1011, "transcription_service_unavailable") from None

    async def _flush_loop(self) -> None:
        interval, phase = self.settings.flush_interval, self.gateway.flush_phase()
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            # To the next multiple of the interval past this session's phase (Gateway.flush_phase),
            # or sooner when the embedded engine has words ready (EAGER_FLUSH_GAP after the last).
            try:
                async with asyncio.timeout(interval - (loop.time() - phase) % interval):
                    await self._words_ready.wait()
                await asyncio.sleep(max(0.0, last + EAGER_FLUSH_GAP - loop.time()))
            except TimeoutError:
                pass
            self._words_ready.clear()
            last = loop.time()
            # A client that stopped mid-piece: its last audio waits at most one interval.
            await self._push_pending()
            await self._flush()

    async def _flush(self, final: bool = False) -> None:
        """The 600 ms step: label words by voice, merge, store, send, observe (``final``: the
        session's last, which holds nothing back)."""
        self.metrics.audio_through(self.clock.samples)
        if not final and self._unshown:
            # A cloud engine's new words go out now, before the voice decides their speaker
            # (which waits for the embedding thread): re-sent by id below if the voice disagrees.
            self._show_undiarized()
            await self._send_batch(self.builder.shown())
        batch = await self._uninterrupted(self._store_next_batch(final))
        await self._send_batch(batch)
        if not self._client_gone:
            self.metrics.batch_sent(batch.changed, self.time_offset)
        for match in self.speakers.take_suggestions():
            segment_id = next((s.id for s in batch.changed if s.speaker_id == match.speaker_id), None)
            await self.send_json(events.speaker_label_suggestion(
                match.speaker_id, match.person_id, match.person_name, segment_id))
        if self.naming is not None:
            await self._introductions(batch.changed)
        for segment in batch.changed:
            if segment.stt_provider in self._voice_labelled:
                continue      # identified per stretch of speech by the local diarization
            # Speaker identification works on the audio clock, segments are on conversation time.
            self.speakers.observe(segment.speaker_id, segment.start - self.time_offset,
                                  segment.end - self.time_offset, segment.id)

    async def _introductions(self, segments: list[Segment]) -> None:
        """Speakers who said their name: suggested as that person (created if need be, see
        naming.py); with speaker_auto_assign their segments are labelled with the person too."""
        for named in await self.naming.on_segments(segments):
            auto = self.params.speaker_auto_assign and named.person_id is not None
            await self.send_json(events.speaker_label_suggestion(
                named.speaker_id, named.person_id if auto else "", named.name, named.segment_id))
            if auto:
                self.speakers.name(named.speaker_id, named.person_id, named.name)
                await self._send_batch(await self._uninterrupted(self._store_relabel(
                    self.speakers.mapping(named.speaker_id))))

    async def _speaker_loop(self) -> None:
        """Apply voice matches as they come: relabel the speaker's segments, suggest the label."""
        async for match in self.speakers.matches():
            await self._apply_match(match)

    def _take_undiarized(self, final: bool) -> list[tuple[Word, str]]:
        """The words to label by voice now. A cloud engine's words come while their utterance
        goes on: its newest run (no pause, the engine's speaker unchanged) is kept back until
        ``OPEN_RUN_HOLD_SECONDS`` of audio passed its last word, or ``OPEN_RUN_IDLE_SECONDS`` went
        by with no new word (a client that stopped sending), or it is ``OPEN_RUN_MAX_SECONDS``
        long, so that an utterance is embedded whole, as the embedded engine's are."""
        pending, self._undiarized = self._undiarized, []
        if final or not pending:
            return pending
        order = sorted(range(len(pending)), key=lambda i: pending[i][0].start)
        first = len(order) - 1
        while first > 0 and continues(pending[order[first - 1]][0], pending[order[first]][0]):
            first -= 1
        run = order[first:]
        start, end = pending[run[0]][0].start, max(pending[i][0].end for i in run)
        if (pending[run[0]][1] == EMBEDDED_PROVIDER or self.clock.seconds - end >= OPEN_RUN_HOLD_SECONDS
                or time.monotonic() - self._last_word_at >= OPEN_RUN_IDLE_SECONDS
                or end - start >= OPEN_RUN_MAX_SECONDS):
            return pending
        held = set(run)
        self._undiarized = [p for i, p in enumerate(pending) if i in held]
        return [p for i, p in enumerate(pending) if i not in held]

    def _show_undiarized(self) -> None:
        """Show the cloud engine's words that wait for their voice (provisional: the client sees
        them, the store does not), each under the voice label its engine's speaker was given
        last; when the voice decides, the segments it changes are re-sent by id."""
        self._unshown = False
        waiting = [(word, provider) for word, provider in self._undiarized if provider != EMBEDDED_PROVIDER]
        if not waiting and not self._showing:
            return
        self._showing = bool(waiting)
        if waiting:
            self._anchor(min(word.start for word, _ in waiting))
            if self.live is not None:
                self.live.words_shown()
        guessed = [(replace(word, speaker=self._guessed_label(provider, word.speaker)), provider)
                   for word, provider in waiting]
        self.builder.set_provisional(guessed, time_offset=self.time_offset, speaker_labels=self.speakers.labels)

    def _guessed_label(self, provider: str, speaker: int) -> int:
        """The voice label most likely for ``provider``'s ``speaker``: the one its words got
        last; for a speaker that engine has not numbered before, a new label if the engine has
        numbered others (a new voice), else the last label (an engine just switched to, whose
        numbering says nothing yet)."""
        label = self._voice_of.get((provider, speaker))
        if label is not None:
            return label
        if any(known == provider for known, _ in self._voice_of):
            # The label the voice will give a new voice. Not one past the labels in use: a label
            # the voice gave briefly and dropped since is not given again, so that guess was a
            # label the voice never gives, and the words moved by id when it decided.
            return self.speakers.diarizer.next_label
        return self.speakers.last_label

    async def _store_next_batch(self, final: bool = False) -> Batch:
        async with self._storing:
            pending = self._take_undiarized(final)
            await self._label_words(pending)
            # Any engine whose words the voice labels: a cloud engine's words wait for their
            # voice (shown meanwhile), so a pause is when none waits or is shown provisionally.
            if (not pending and not self._showing and not self._undiarized and self._voice_labelled
                    and time.monotonic() - self._last_word_at >= SETTLE_AFTER_SECONDS):
                await self.speakers.settle()   # a pause: the close's re-clustering, shown now
            batch = self._with_carried(self.builder.flush())
            # Re-clustering may have moved earlier segments to another speaker: re-sent by id.
            changes = self.speakers.reclustered and await self.speakers.speaker_changes(
                self.builder.segments, self.time_offset, providers=self._voice_labelled)
            if changes:
                batch = batch.then(self.builder.respeak(changes))
            return await self._persist(batch)          # stored before sent: nothing the client saw is lost

    async def _label_words(self, pending: list[tuple[Word, str]]) -> None:
        """Label ``pending`` words by voice and add them to the builder."""
        if pending:
            # All at once: an utterance is embedded whole, even across a change of provider.
            # Only Whisper stretches word edges over pauses; a cloud engine's times are kept.
            labelled = await self.speakers.diarize_words(
                [word for word, _ in pending],
                keep_times=any(provider != EMBEDDED_PROVIDER for _, provider in pending))
            for (word, provider), voiced in zip(pending, labelled):
                self._voice_of[(provider, word.speaker)] = voiced.speaker
            start = 0
            for end in range(1, len(pending) + 1):      # runs of one provider, in arrival order
                if end == len(pending) or pending[end][1] != pending[start][1]:
                    self._add_words(labelled[start:end], pending[start][1])
                    start = end
        if self._showing:
            self._show_undiarized()        # those still held; the ones labelled now are final

    async def _store_relabel(self, match) -> Batch:
        is_user, person_id = match.segment_labels
        batch = self.builder.relabel(match.speaker_id, is_user=is_user, person_id=person_id)
        return await self._persist(batch)

    async def _apply_match(self, match) -> None:
        batch = await self._uninterrupted(self._store_relabel(match))
        await self._send_batch(batch)
        await self.send_json(events.speaker_label_suggestion(
            match.speaker_id, match.person_id, match.person_name, match.segment_id))

    async def _uninterrupted(self, step: Awaitable[Batch]) -> Batch:
        """Run ``step`` (take words out of the builder, store them) so that the session ending
        cannot cut it in half.

        Cancelled while awaiting the store (the client closed, so the task group cancels its
        tasks), the store withdraws the batch, and the teardown's last flush would find the
        builder already emptied: the words would be in no stored conversation. So the step runs
        as its own task, shielded, and the teardown waits for it before its own last flush. The
        sending that follows is not shielded: it may wait on a client that is gone."""
        return await asyncio.shield(self._spawn_in_flight(step))

    async def _ping_loop(self) -> None:
        while True:
            await self.send_text("ping")
            await asyncio.sleep(self.settings.ping_interval)

    async def _end_watch(self) -> None:
        await self._end_wake.wait()
        assert self._end_requested is not None
        raise self._end_requested

    async def _idle_watch(self) -> None:
        timeout = self.settings.idle_timeout
        while True:
            idle = time.monotonic() - self.last_activity
            if idle >= timeout:
                raise EndSession(1001, "idle timeout")
            await asyncio.sleep(timeout - idle)

    # -- inbound -------------------------------------------------------------------------
    def _count_refuted(self, now: float) -> None:
        """Messages the decoder held back and has since dropped, unconfirmed: decode errors now."""
        dropped = self.decoder.held_dropped()
        for _ in range(dropped - self._held_dropped):
            self._on_decode_error(codecs.DecodeError("a held-back message the next one did not confirm"), now)
        self._held_dropped = dropped

    def _on_decode_error(self, exc: Exception, now: float) -> None:
        self.stats.decode_errors += 1
        self.metrics.decode_error()
        if self._first_bad_frame_at is None:
            self._first_bad_frame_at = now
            log.debug("decode error sid=%s codec=%s: %s", self.id, self.params.codec, exc)
        elif not self._decode_warning_sent and now - self._first_bad_frame_at >= self.settings.decode_error_report_after:
            self._decode_warning_sent = True
            self._decode_warning_due = True    # sent by the pump
            self._audio_wake.set()

    async def _on_text(self, text: str) -> None:
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            log.debug("ignoring non-JSON text sid=%s", self.id)
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        if kind == "suggested_transcript" and self.params.custom_stt:
            segments = suggested_segments(message.get("segments"))
            if segments:
                provider = str(message.get("stt_provider") or "custom")[:MAX_PROVIDER_CHARS]
                self._anchor(min(s["start"] for s in segments))
                self.builder.add_suggested(segments, provider=provider, time_offset=self.time_offset)
            # A client flooding suggestions is read more slowly (this loop waits), not cut off.
            wait = self._text_pacer.take(len(text), time.monotonic())
            if wait:
                await asyncio.sleep(wait)
        elif kind == "speaker_assigned":
            await self._on_speaker_assigned(message)
        elif kind == "image_chunk":
            await self._on_image_chunk(message)
        elif kind in APP_MESSAGES_NOT_ACTED_ON:
            pass
        else:
            log.debug("ignoring text message type=%r sid=%s", kind, self.id)

    async def _on_image_chunk(self, message: dict) -> None:
        await self.photos.on_chunk(message, self.live, self.gateway.conversations)

    async def _on_speaker_assigned(self, message: dict) -> None:
        assignment = speaker_assignment(message)
        if assignment is None:
            log.debug("ignoring a malformed speaker_assigned sid=%s", self.id)
            return
        speaker_id, person_id, person_name, ids = assignment
        is_user = person_id == "user"
        self.speakers.assign(speaker_id, person_id, person_name)
        batch = self.builder.relabel(speaker_id, is_user=is_user, person_id=None if is_user else person_id,
                                     segment_ids=ids if isinstance(ids, list) else None, by_user=True)
        await self._send_batch(await self._persist(batch))

    def _on_word(self, word: Word | Partial) -> None:
        provider = getattr(self.stream, "provider_name", None) or self.provider_name or "?"
        if isinstance(word, Partial):          # shown to the client only (Batch.shown), never stored
            if word.words:
                self._anchor(word.words[0].start)
            self.builder.set_partial(word.words, provider=provider, time_offset=self.time_offset,
                                     speaker_labels=self.speakers.labels)
            self._words_ready.set()
            return
        self.stats.words += 1
        self.metrics.word(provider, word.end)
        if self._labels_by_voice(provider):
            self._undiarized.append((word, provider))      # labelled by voice at a flush
            self._last_word_at = time.monotonic()
            self._voice_labelled.add(provider)
            if provider == EMBEDDED_PROVIDER:
                self._words_ready.set()        # a whole utterance at once: out without waiting
            else:
                self._unshown = True           # shown at the next flush, before the voice decides
        else:
            self._add_words([word], provider)

    def _labels_by_voice(self, provider: str) -> bool:
        """Whether ``provider``'s words get their speaker from the local diarization: the embedded
        engine's always (it has no diarization), a cloud engine's when the speaker model is
        there, so that owner and people are found per stretch of speech and the labels stay the
        same when the session fails over to another provider (whose numbering starts afresh).
        A phone call's channels say who speaks; a custom_stt client labels its own segments."""
        if self.channels is not None:
            return False
        return provider == EMBEDDED_PROVIDER or self.speakers.model.problem() is None

    def _add_words(self, words: list[Word], provider: str) -> None:
        if not words:
            return
        self._anchor(min(w.start for w in words))
        self.builder.add_words(words, provider=provider, time_offset=self.time_offset,
                               speaker_labels=self.speakers.labels if self.channels is None else self._channel_labels)

    def _channel_labels(self, speaker: int) -> tuple[bool, str | None]:
        """``(is_user, person_id)`` of a phone call's channel speaker: the owner's channel is the user."""
        return next(((c.is_user, None) for c in self.channels if c.speaker == speaker), (False, None))

    async def _persist(self, batch: Batch) -> Batch:
        """Store ``batch`` in the conversation. Returns what to send: ``batch``, or, when a newer
        connection of the user and source took the conversation over, what this session stored
        in a new conversation of its own instead (``_continue_alone``)."""
        if self.live is None or not batch:
            return batch
        conversation_id = self.live.conversation_id
        saving = {segment.id: (segment.text, segment.end) for segment in batch.changed}
        self._saving.update(saving)
        try:
            await self.live.save_batch([s.to_stored() for s in batch.changed], batch.deleted_ids)
        except LeaseLost:
            if self.live.conversation_id != conversation_id:
                return Batch()      # another step of this session moved on already, with these words
            return await self._continue_alone()
        except Exception:
            # The client still gets its words; the store's own retries/alerts are its business.
            log.exception("could not store a segment batch sid=%s", self.id)
            return batch
        finally:
            for segment_id, kept in saving.items():
                if self._saving.get(segment_id) == kept:
                    del self._saving[segment_id]
        self._remember_stored(batch)     # where it went: a rollover meanwhile stores it in the new conversation
        return batch

    def _remember_stored(self, batch: Batch) -> None:
        for segment in batch.changed:
            self._stored[segment.id] = (segment.text, segment.end)
        for segment_id in batch.deleted_ids:
            self._stored.pop(segment_id, None)

    async def _continue_alone(self) -> Batch:
        """A newer connection of this user and source took the conversation over (maybe through
        another node): it writes that conversation now, and this session's saves there are
        refused (the lease fencing). This session is not closed, because both may be live (the
        Android background streamer beside the foreground app): the app and the streamer
        reconnect after any close, and each reconnect would take the conversation back, a loop.
        It goes on in a new conversation of its own, which gets what the store did not have of
        its words, with their times; the client is told with ``conversation_session``."""
        batch, shift = self.builder.hand_over(self._stored)
        self._carried = Batch()       # words a rollover carried are still the builder's: moved with the rest
        self._unshown = True          # words whose voice is undecided are shown again, in the new one
        builder = self.builder
        started_at = None if shift is None else self.live.started_at + shift
        self._handing_over = True
        try:
            self.live.continue_alone(started_at)     # → _on_new_conversation: announced, a fresh builder
        finally:
            self._handing_over = False
        self.builder = builder                   # this one carries the words over
        if shift is not None:
            self.time_offset -= shift
            self._offset_known = True
        return await self._persist(batch)

    # -- outbound ------------------------------------------------------------------------
    async def _send_batch(self, batch: Batch) -> None:
        if not batch:
            return
        if batch.client_deleted_ids:
            await self.send_json(events.segments_deleted(batch.client_deleted_ids))
        if batch.client_segments:
            self.stats.segments_sent += len(batch.client_segments)
            await self.send_bytes_as_text(orjson.dumps([s.to_wire() for s in batch.client_segments]))

    async def send_json(self, payload: dict) -> None:
        await self.send_bytes_as_text(orjson.dumps(payload))

    async def send_bytes_as_text(self, payload: bytes) -> None:
        await self.send_text(payload.decode())

    async def send_text(self, text: str) -> None:
        if self._client_gone:
            return
        try:
            await self.ws.send_text(text)
        except Exception as exc:          # the peer vanished between our check and the write
            self._client_gone = True
            raise EndSession(1006, "client gone", client_gone=True) from exc

    # -- closing -------------------------------------------------------------------------
    def _end_from(self, group: BaseExceptionGroup) -> EndSession:
        ends = [e for e in _leaves(group) if isinstance(e, EndSession)]
        if ends:
            return ends[0]
        others = [e for e in _leaves(group) if not isinstance(e, asyncio.CancelledError)]
        if others:
            log.error("session %s failed", self.id, exc_info=others[0])
            return EndSession(1011, "internal error")
        raise group  # only cancellations: the server is shutting down

    def _take_decoder_tail(self) -> None:
        """The few milliseconds a resampling decoder still holds (8 kHz PCM, AAC at 44.1 kHz, ...)
        join the pending audio, so the stream, the audio webhook and the usage get every sample."""
        if self.decoder is None:
            return
        try:
            tail = self.decoder.flush()
        except Exception:
            log.exception("flushing the decoder of sid=%s failed", self.id)
            return
        if len(tail):
            self._pending.append(tail)
            self._pending_samples += len(tail)

    async def _teardown(self, end: EndSession) -> None:
        self._client_gone = self._client_gone or end.client_gone
        if self._reader is not None:
            self._take_native()                # what it decoded before the end still counts
            self._reader.close()               # later frames reach _on_binary, which drops them
        self._accepting_audio = False          # later messages are dropped, as once the receive loop ended
        if self._pace_resume is not None:      # a paced client: read again, its close frame must get through
            self._pace_resume.cancel()
            self._pace_resume = None
            self._sink.resume_reading()
        if self._in_flight:
            # Their failures (a lease lost) were the task group's business already.
            await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._take_decoder_tail()
        try:
            await self._push_pending()
        except Exception:
            log.exception("passing on the last audio of sid=%s failed", self.id)
        if self.stream is not None:
            await self._finish_stream()
        if self.decoder is not None:
            self.decoder.close()
        self.speakers.close()
        try:
            await self._flush(final=True)
        except EndSession:
            pass
        if self.naming is not None:
            try:
                await self.naming.learn_voices()
            except Exception:
                log.exception("learning the voices of named speakers failed sid=%s", self.id)
        await self.photos.close()
        if self.live is not None:
            try:
                await self.live.close(usage=self.usage())
            except Exception:
                log.exception("closing the conversation of sid=%s failed", self.id)
        if not self._client_gone:
            try:
                await self.ws.close(end.code, _truncate(end.reason))
            except Exception:
                pass
        self._log_usage(end)
        self.metrics.audio_through(self.clock.samples)
        self.metrics.closed(end.code)

    async def _finish_stream(self) -> None:
        """Close the engine stream and collect the words it still had (the last utterance)."""
        stream = self.stream
        received = 0

        async def drain() -> None:
            nonlocal received
            try:
                async for word in stream:
                    received += 1
                    self._on_word(word)
            except STTError as exc:
                log.warning("stt failed while closing sid=%s: %s", self.id, exc)

        def progress() -> tuple[int, int | None]:
            # Words that came, and decodes still queued (an embedded engine far behind real time
            # may owe many utterances): either changing means the engine is still delivering.
            return received, getattr(stream, "pending_decodes", None)

        closing = asyncio.ensure_future(asyncio.gather(stream.close(), drain()))
        try:
            # A client that hung up is still owed every word of what it sent: wait while the
            # engine makes progress, give up only after STREAM_CLOSE_TIMEOUT s with none.
            seen = progress()
            while True:
                done, _ = await asyncio.wait({closing}, timeout=STREAM_CLOSE_TIMEOUT)
                if done:
                    closing.result()
                    break
                if progress() == seen:
                    closing.cancel()
                    await asyncio.gather(closing, return_exceptions=True)
                    log.warning("stt stream of sid=%s made no progress for %ss while closing", self.id,
                                STREAM_CLOSE_TIMEOUT)
                    break
                seen = progress()
        except asyncio.CancelledError:
            closing.cancel()
            raise
        except Exception:
            log.exception("closing stt stream of sid=%s failed", self.id)

    def _log_usage(self, end: EndSession) -> None:
        usage = self.usage()
        log.info(
            "session closed sid=%s uid=%s code=%s audio_s=%.2f speech_s=%.2f words=%d provider=%s "
            "segments_sent=%d decode_errors=%d held_back=%d keepalives=%d",
            self.id, self.uid, end.code, usage["audio_seconds"], usage["speech_seconds"], usage["words"],
            usage["provider"], self.stats.segments_sent, self.stats.decode_errors, self.stats.held_back,
            self.stats.keepalives,
        )

    def usage(self) -> dict:
        """What this connection used: audio seconds, speech seconds (engine VAD), words, provider."""
        speech = speech_seconds(self.stream)
        return {"audio_seconds": self.clock.seconds, "speech_seconds": speech,
                "words": self.stats.words, "provider": self.provider_name}


def _in_this_context(callback: Callable) -> Callable:
    """``callback`` run in (a copy of) the calling task's context, whoever calls it."""
    return functools.partial(contextvars.copy_context().run, callback)


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _truncate(reason: str) -> str:
    encoded = reason.encode()[:MAX_CLOSE_REASON_BYTES]
    return encoded.decode(errors="ignore")
