"""Who spoke when, on real multi-speaker recordings streamed through the gateway.

    .venv/bin/python bench/bench_diarization.py [--speed N] RECORDING.wav|FOLDER ...
    .venv/bin/python bench/bench_diarization.py --speed 2 tests/data/conversations   # the repo's copies

Every ``NAME.wav`` needs a ``NAME.rttm`` beside it (a ``NAME.uem`` limits scoring). Each recording
is streamed as 100 ms PCM16 messages to ``/v4/listen`` of a ``harken serve`` subprocess on a free
loopback port with the embedded engine, at real-time pace (``--speed N``: N times faster; the
engine and the speaker path see the same audio on the same audio clock either way, so DER does
not depend on the pace as long as the engine keeps up: the speaker path embeds from a 60 s ring
of recent audio, and an engine far behind the socket would find its utterances gone. Unpaced
sending does change the results for that reason). The final version of every segment is the
hypothesis (the client waits until nothing more comes: the pause after the recording runs the
session's last re-clustering, ``SpeakerIdentifier.settle``, whose relabels it sees), placed on
the recording by the server's own clock (``server_offset``: the conversation's ``started_at`` is
the session's audio clock at the first word shown). Prints per recording and on average:

- DER (``harken.audio.der``: pyannote.metrics' rules, ±0.25 s collar, overlap scored), with
  missed speech, false alarm and confusion; speakers found vs true;
- ``is_user`` accuracy per word with an enrolled owner (``--owner``): the speaker with the most
  reference speech in each recording is the owner, enrolled through ``PUT
  /v1/users/speech-profile`` with their turns from the last quarter of the recording (at most
  30 s of it); the first three quarters are streamed. A word (segment text split evenly over the
  segment's time) is right if ``is_user`` says whether the reference speaker at its middle is the
  owner (``--owner-each``: every speaker with 10 s of solo speech to enrol after a split, as
  ``--offline`` picks them, in turn);
- the server's CPU seconds per audio second for the whole session.

``--offline`` runs the speaker path alone, in this process, with no engine: Silero VAD utterances
(ended by 0.5 s of silence, as the embedded engine ends them) labelled by the conversation
diarizer (``harken.audio.diarization.ConversationDiarizer``, what the gateway uses) and, for
comparison in the same run, by the utterance-level ``OnlineDiarizer`` the gateway used before.
Deterministic and independent of how busy the machine is, so it is the one to tune with
(``--model``, ``--cluster``, ``--known``). Its ``is_user`` figure takes every speaker with 10 s of
solo speech to enrol after a split (three quarters, else 0.6 or half of the recording) as the
owner in turn, and compares the utterance-level path, the stretch-level path before the enrolled
voice was decided against the conversation's voices, and the current one. It also
prints the speaker path's CPU per audio second (model windows + clustering, thread CPU time) at 1
stream and at 12 streams sharing the one embedding thread, as the gateway does, beside the
embedded engine's own CPU per audio second on the same recordings.

``--replica`` is the gateway's path offline and deterministic, to find where its error comes from
and to try changes in seconds: each recording is decoded once as a stream of the gateway gets it
(``engine_replica.py``: the embedded stream's own cuts and decode scheduling on a simulated clock,
each decode taking ``--decode-seconds`` of wall time, ``place_words``), cached under the
temporary folder (``harken-replica/``, keyed by the settings, the pace and the code), and the words are fed at the times they
would arrive to the session's own parts (``AudioRing``, ``SpeakerIdentifier.diarize_words``,
``SegmentBuilder``, the pause's ``settle`` after 2 s of wall time without a word at ``--speed``
(default 2), ``speaker_changes`` and ``respeak``, the close's ``finish``), in the order
``Session._store_next_batch`` calls them. The segments the client saw last are scored on the
audio clock (where the gateway bench's ``server_offset`` places them), with missed speech, false
alarm and confusion, beside the speaker path's CPU per audio second.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harken.audio.der import diarization_error, read_rttm, read_uem  # noqa: E402
from harken.client import listen_url, read_wav_16k, stream_messages  # noqa: E402
from harken.config import Settings  # noqa: E402
from harken.gateway.auth import mint_local_token  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import free_port, start_server  # noqa: E402  (a harken serve subprocess on loopback)
from engine_replica import EngineUtterance, engine_utterances  # noqa: E402  (the engine's words, offline)

RATE = 16000
MESSAGE_SECONDS = 0.1
ENROL_MAX_SECONDS = 30.0
OWNER_SPLITS = (0.75, 0.6, 0.5)


def recordings(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        candidates = sorted(path.glob("*.wav")) if path.is_dir() else [path]
        out += [p for p in candidates if p.with_suffix(".rttm").exists()]
    return out


def wav_bytes(pcm: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.astype("<i2").tobytes())
    return out.getvalue()


def owner_of(reference) -> str:
    totals: dict[str, float] = {}
    for start, end, speaker in reference:
        totals[speaker] = totals.get(speaker, 0.0) + end - start
    return max(totals, key=totals.get)


def solo_turns(reference, speaker, start: float, end: float) -> list[tuple[float, float]]:
    """``speaker``'s turns inside ``[start, end]`` minus anybody else's speech."""
    grid = np.zeros(int(end * 100) + 1, dtype=np.int8)
    for a, b, who in reference:
        a, b = int(max(a, start) * 100), int(min(b, end) * 100)
        if b > a:
            grid[a:b] = np.where(who == speaker, np.where(grid[a:b] == 0, 1, 2), 2)
    spans, run = [], None
    for i, v in enumerate(grid):
        if v == 1 and run is None:
            run = i
        elif v != 1 and run is not None:
            spans.append((run / 100, i / 100))
            run = None
    if run is not None:
        spans.append((run / 100, len(grid) / 100))
    return spans


def hypothesis_turns(segments, offset: float) -> list[tuple[float, float, int]]:
    return [(s["start"] + offset, s["end"] + offset, s["speaker_id"]) for s in segments if s["end"] > s["start"]]


def clock_offset(reference) -> float:
    """The alignment the figures before session 19 used: conversation time 0 at the first
    reference turn's onset (as tests/test_speech_profile.py does). Conversation time 0 is where
    the first words shown began, and the embedded engine's provisional first word is often
    stretched back over the pre-roll (0.3-1.0 s early), so every segment then lands that much
    late and is scored as false alarm and missed speech it is not."""
    return min(start for start, _, _ in reference)


def server_offset(conversation: dict, result) -> float:
    """Where the server put conversation time 0 on the recording: the stored conversation's
    ``started_at`` is the session's clock origin (the wall time its audio clock read 0, as the
    socket opened) plus the first word's audio time, so ``started_at`` minus the wall time the
    client's socket opened is that audio time, to within the handshake's few milliseconds, at
    any pace."""
    return result.audio_time_at(conversation["started_at"])


def speaker_at(reference, t: float) -> set:
    return {who for a, b, who in reference if a <= t < b}


def is_user_accuracy(segments, reference, owner: str, until: float, offset: float) -> tuple[int, int]:
    right = total = 0
    for s in segments:
        words = s["text"].split()
        if not words or s["start"] + offset >= until:
            continue
        step = (s["end"] - s["start"]) / len(words)
        for k in range(len(words)):
            who = speaker_at(reference, offset + s["start"] + (k + 0.5) * step)
            if len(who) != 1:
                continue          # a word in a pause or in overlap has no single true speaker
            total += 1
            right += s["is_user"] == (owner in who)
    return right, total


@dataclass
class Outcome:
    name: str
    seconds: float
    der: object
    cpu: float
    owner: tuple[int, int] | None = None
    owners: list = dataclasses.field(default_factory=list)   # --owner-each: (speaker, right, words)
    offset: float = 0.0          # conversation time 0 on the recording, by the server's clock
    stored: object = None        # DER of the stored conversation
    reference_aligned: object = None  # DER with time 0 at the first reference turn (before session 19)
    # DER with the reference's overlap left out: Omi's segments hold one speaker at a time, so a
    # second voice in overlap is always missed (call_autorepair_b: 12.5 s of overlap, 8.6 %).
    no_overlap: object = None


# Silence streamed after a recording: interview_3spk and radio_phonein end mid-speech, and the
# engine ends that last utterance only when the stream closes, after the client has stopped
# listening, so what the client saw last lacked up to 15 s of words (radio_phonein: 30 % missed
# live, the stored conversation had them). A device would go on sending room sound.
TAIL_SECONDS = 1.5


async def stream(port: int, token: str, pcm: np.ndarray, speed: float, **params):
    url = listen_url(f"ws://127.0.0.1:{port}", codec="pcm16", sample_rate=RATE, **params)
    pcm = np.concatenate((pcm, np.zeros(int(TAIL_SECONDS * RATE), pcm.dtype)))
    step = int(MESSAGE_SECONDS * RATE)
    messages = [pcm[i:i + step].tobytes() for i in range(0, len(pcm), step)]
    result = await stream_messages(url, messages, MESSAGE_SECONDS / speed, token=token, realtime=True,
                                   settle_seconds=30.0, max_wait=300.0)
    if result.close_code not in (None, 1000):
        # Not a figure to trust: the session ended before the whole recording was heard.
        print(f"  (the stream closed {result.close_code} {result.close_reason!r}, not 1000)", flush=True)
    return result


def stored_conversation(port: int, token: str, result) -> dict:
    """The stored conversation: what the app reads once the session has ended (the session's
    last re-clustering, which the client closing first never sees, included)."""
    conversation = next((e["conversation_id"] for e in result.events if e.get("type") == "conversation_session"), None)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/conversations/{conversation}",
                                     headers={"Authorization": f"Bearer {token}"})
    for _ in range(100):
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"conversation {conversation} was not stored")


def put_profile(port: int, token: str, pcm: np.ndarray) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/users/speech-profile", data=wav_bytes(pcm),
                                     method="PUT", headers={"Authorization": f"Bearer {token}",
                                                            "Content-Type": "audio/wav"})
    with urllib.request.urlopen(request, timeout=60) as r:
        r.read()


async def run(files: list[Path], speed: float, owner_test: bool, owner_each: bool = False) -> None:
    print(f"load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}", flush=True)
    outcomes: list[Outcome] = []
    for index, path in enumerate(files):
        # A fresh server per recording: a session that ended may still have audio in the engine's
        # queue, which would slow the next recording's decoding.
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            # The server reads each session at real-time pace (audio_realtime_factor, #26); at
            # --speed N it must read N times faster, else the client gets tens of seconds ahead,
            # its keepalive pings go unanswered and it closes 1011 with the rest of the
            # recording unheard (how the 2x runs before lost 30-50 % of the long calls' speech).
            server = start_server(Path(tmp), port, audio_realtime_factor=speed)
            process = psutil.Process(server.pid)
            settings = Settings(data_dir=Path(tmp))
            try:
                pcm = read_wav_16k(path)
                reference = read_rttm(path.with_suffix(".rttm"))
                uem_path = path.with_suffix(".uem")
                uem = read_uem(uem_path) if uem_path.exists() else None
                token = mint_local_token(settings, f"diar{index}", 3600)
                before = sum(process.cpu_times()[:2])
                result = await stream(port, token, pcm, speed, include_speech_profile="false")
                cpu = sum(process.cpu_times()[:2]) - before
                await asyncio.sleep(1.0)        # the session's teardown stores its last flush
                conversation = stored_conversation(port, token, result)
                offset = server_offset(conversation, result)
                turns = hypothesis_turns(result.segments.values(), offset)
                score = diarization_error(reference, turns, uem=uem)
                outcome = Outcome(path.stem, len(pcm) / RATE, score, cpu, offset=offset)
                dump(path.stem, result.ordered())
                outcome.reference_aligned = diarization_error(
                    reference, hypothesis_turns(result.segments.values(), clock_offset(reference)), uem=uem)
                outcome.no_overlap = diarization_error(reference, turns, uem=uem, skip_overlap=True)
                outcome.stored = diarization_error(
                    reference, hypothesis_turns(conversation["transcript_segments"], offset), uem=uem)
                if owner_test and score.reference_speakers >= 2:
                    owner = owner_of(reference)
                    split = 0.75 * len(pcm) / RATE
                    spans = solo_turns(reference, owner, split, len(pcm) / RATE)
                    enrol = np.concatenate([pcm[int(a * RATE):int(b * RATE)] for a, b in spans] or [pcm[:0]])
                    enrol = enrol[: int(ENROL_MAX_SECONDS * RATE)]
                    if enrol.size >= 5 * RATE:
                        outcome.owner = await owner_accuracy(port, settings, f"owner{index}", pcm, reference, owner,
                                                             enrol, split, speed)
                if owner_each:
                    for number, speaker in enumerate(sorted({who for *_, who in reference})):
                        chosen = owner_split(pcm, reference, speaker)
                        if chosen is not None:
                            _, enrol, split = chosen
                            accuracy = await owner_accuracy(port, settings, f"owner{index}-{number}", pcm, reference,
                                                            speaker, enrol, split, speed)
                            if accuracy is not None:
                                outcome.owners.append((speaker, *accuracy))
                outcomes.append(outcome)
                report(outcome)
            finally:
                server.terminate()
                server.wait(30)
    summary(outcomes, speed)


async def owner_accuracy(port: int, settings, user: str, pcm: np.ndarray, reference, owner: str,
                         enrol: np.ndarray, split: float, speed: float) -> tuple[int, int] | None:
    """``owner`` enrolled as a new user's speech profile from ``enrol``, then the recording up to
    ``split`` streamed by that user: words whose ``is_user`` is right, and all words."""
    token = mint_local_token(settings, user, 3600)
    try:
        put_profile(port, token, enrol)
    except urllib.error.HTTPError as exc:
        print(f"{user}: enrolment refused: {exc.code} {exc.read()[:200]!r}")
        return None
    owned = await stream(port, token, pcm[: int(split * RATE)], speed)
    await asyncio.sleep(1.0)
    offset = server_offset(stored_conversation(port, token, owned), owned)
    return is_user_accuracy(owned.segments.values(), reference, owner, split, offset)


DUMP: Path | None = None      # --dump: the segments the client saw last, one JSON file per recording


def dump(name: str, segments) -> None:
    if DUMP is not None:
        DUMP.mkdir(parents=True, exist_ok=True)
        (DUMP / f"{name}.json").write_text(json.dumps(list(segments), indent=0))


def report(o: Outcome) -> None:
    d = o.der
    owner = (f"  is_user {o.owner[0] / max(o.owner[1], 1):6.1%} of {o.owner[1]} words" if o.owner else "")
    owner += "".join(f"  {who} as owner: is_user {r / max(t, 1):6.1%} of {t} words" for who, r, t in o.owners)
    print(f"{o.name:22s} {o.seconds:6.1f} s  DER {d.der:6.1%} (miss {d.missed / d.reference:5.1%} "
          f"fa {d.false_alarm / d.reference:5.1%} conf {d.confusion / d.reference:5.1%})  speakers "
          f"{d.hypothesis_speakers}/{d.reference_speakers}  stored: DER {o.stored.der:6.1%} "
          f"{o.stored.hypothesis_speakers}/{o.stored.reference_speakers}  overlap not scored: DER "
          f"{o.no_overlap.der:6.1%}  time 0 at {o.offset:.2f} s; at the first "
          f"reference turn: DER {o.reference_aligned.der:6.1%} (miss {o.reference_aligned.missed / d.reference:5.1%} fa "
          f"{o.reference_aligned.false_alarm / d.reference:5.1%} conf {o.reference_aligned.confusion / d.reference:5.1%})  cpu {o.cpu / o.seconds:.3f} s/s{owner}  "
          f"load {psutil.getloadavg()[0]:.1f}",
          flush=True)


def summary(outcomes: list[Outcome], speed: float) -> None:
    if not outcomes:
        print("no recording with an RTTM beside it")
        return
    ders = [o.der.der for o in outcomes]
    two = [o.der.der for o in outcomes if o.der.reference_speakers == 2]
    within = sum(abs(o.der.hypothesis_speakers - o.der.reference_speakers) <= 1 for o in outcomes)
    print(f"\npace: {speed:g}x real time; {len(outcomes)} recordings, "
          f"{sum(o.seconds for o in outcomes):.0f} s; load average now "
          f"{' '.join(f'{x:.1f}' for x in psutil.getloadavg())}")
    print(f"mean DER {np.mean(ders):.1%}; two-party mean {np.mean(two) if two else float('nan'):.1%}; "
          f"speaker count within one: {within}/{len(outcomes)} (what the client saw last)")
    apart = [o.no_overlap for o in outcomes]
    print(f"overlap not scored: mean DER {np.mean([x.der for x in apart]):.1%}; two-party mean "
          f"{np.mean([x.der for x in apart if x.reference_speakers == 2]) if two else float('nan'):.1%}")
    aligned = [o.reference_aligned for o in outcomes]
    print(f"time 0 at the first reference turn (figures before session 19): mean DER {np.mean([x.der for x in aligned]):.1%}; two-party mean "
          f"{np.mean([x.der for x in aligned if x.reference_speakers == 2]) if two else float('nan'):.1%}")
    stored = [o.stored for o in outcomes]
    print(f"stored: mean DER {np.mean([x.der for x in stored]):.1%}; two-party mean "
          f"{np.mean([x.der for x in stored if x.reference_speakers == 2]) if two else float('nan'):.1%}; "
          f"speaker count within one: {sum(abs(x.hypothesis_speakers - x.reference_speakers) <= 1 for x in stored)}"
          f"/{len(stored)}, exact {sum(x.hypothesis_speakers == x.reference_speakers for x in stored)}/{len(stored)}")
    owned = [o.owner for o in outcomes if o.owner]
    if owned:
        right, total = sum(r for r, _ in owned), sum(t for _, t in owned)
        print(f"is_user right on {right / max(total, 1):.1%} of {total} words "
              f"(worst recording {min(r / max(t, 1) for r, t in owned):.1%})")
    each = [(o.name, *x) for o in outcomes for x in o.owners]
    if each:
        right, total = sum(x[2] for x in each), sum(x[3] for x in each)
        print(f"--owner-each: is_user right on {right / max(total, 1):.1%} of {total} words with each of "
              f"{len(each)} speakers as the owner (worst: {min(x[2] / max(x[3], 1) for x in each):.1%}); "
              + ", ".join(f"{name}/{who} {r / max(t, 1):.1%} of {t}" for name, who, r, t in each))


# --- offline: the speaker path alone ----------------------------------------------------------
CUTS = "vad"           # --cuts: how --offline cuts a recording into utterances


def vad_utterances(pcm: np.ndarray) -> list[tuple[float, float, np.ndarray]]:
    """``--cuts vad``: Silero speech spans ended by 0.5 s of silence, padded 0.1 s, ≥ 0.5 s.
    ``--cuts engine``: the embedded engine's own endpointer with the server's settings (0.7 s of
    silence, 0.3 s preroll, 15 s at most; the cuts it makes at a sentence-ending 0.3 s pause
    depend on decode timing and are left out), whose utterances keep softer speech and short
    replies that the spans drop (call_autorepair_b: 18.9 s of one-speaker reference speech outside
    every span, with words the engine hears in most of it)."""
    if CUTS == "engine":
        from harken.audio.vad import StreamingVAD
        from harken.stt.whisper import endpointer_for

        endpointer = endpointer_for(Settings(), StreamingVAD(), None)      # tiny.en's pre-roll
        cut = [u for i in range(0, pcm.size, 1600) for u in endpointer.feed(pcm[i:i + 1600])]
        cut += [u for u in [endpointer.flush()] if u is not None]
        return [(u.start_seconds, u.start_seconds + u.duration, u.pcm) for u in cut if u.duration >= 0.5]
    from harken.audio.vad import speech_spans

    return [(a / RATE, b / RATE, pcm[a:b]) for a, b in speech_spans(pcm, min_silence_ms=500, pad_ms=100)
            if b - a >= 0.5 * RATE]


def old_labels(embedder, utterances) -> list[tuple[float, float, int]]:
    """The gateway's previous path: one embedding per utterance (its centred ≤ 10 s), placed by
    the online clusterer; an utterance under 1 s keeps the previous label."""
    from harken.audio.diarization import OnlineDiarizer

    diarizer, turns, last = OnlineDiarizer(), [], 0
    for a, b, clip in utterances:
        if b - a >= 1.0:
            middle, half = clip.size // 2, min(clip.size, 10 * RATE) // 2
            centred = clip[middle - half : middle + half]
            last = diarizer.assign(embedder.embed(centred), weight=centred.size / RATE)
        turns.append((a, b, last))
    return turns


MODEL = None           # the speaker model under test (--model), a harken.audio.speaker_models.SpeakerModel
OVERRIDES: dict = {}   # --cluster / --known: the model's similarity bars replaced, for tuning


def new_labels(embedder, utterances, known=None):
    from harken.audio.diarization import ConversationDiarizer

    diarizer = ConversationDiarizer.for_model(MODEL, known=known, **OVERRIDES)
    for a, b, clip in utterances:
        diarizer.add_utterance(a, b, embedder.embed_windows(clip))
    diarizer.finish()          # as the gateway does when the session closes
    return diarizer


def owner_split(pcm: np.ndarray, reference, owner: str | None = None):
    """The owner (default: most reference speech), their enrolment (solo turns after the split,
    at most 30 s, VAD-trimmed as the profile route trims) and the split: the recording before it is
    streamed. The split is at three quarters, else at 0.6 or half of the recording if the owner
    speaks too little after it; None if no split leaves 10 s to enrol."""
    from harken.audio.vad import speech_spans

    owner = owner or owner_of(reference)
    for fraction in OWNER_SPLITS:
        split = fraction * len(pcm) / RATE
        spans = solo_turns(reference, owner, split, len(pcm) / RATE)
        enrol = np.concatenate([pcm[int(a * RATE):int(b * RATE)] for a, b in spans] or [pcm[:0]])
        enrol = enrol[: int(ENROL_MAX_SECONDS * RATE)]
        speech = speech_spans(enrol) if enrol.size else []
        enrol = np.concatenate([enrol[a:b] for a, b in speech]) if speech else enrol[:0]
        if enrol.size >= 10 * RATE:
            return owner, enrol, split
    return None


def is_user_time(turns, is_user, reference, owner: str, until: float) -> tuple[float, float]:
    """Seconds of single-speaker reference speech inside hypothesis turns where ``is_user(label)``
    says rightly whether the owner speaks, and all such seconds (10 ms grid)."""
    right = total = 0.0
    for a, b, label in turns:
        for t in np.arange(a, min(b, until), 0.01):
            who = speaker_at(reference, t + 0.005)
            if len(who) == 1:
                total += 0.01
                right += 0.01 * (is_user(label) == (owner in who))
    return right, total


def old_owner_labels(embedder, utterances, owner_vector) -> set[int]:
    """The labels the previous path gave the owner: a speaker is the owner if the centred ≤ 10 s of
    one of its first 3 utterances of ≥ 2 s matches the enrolment (OWNER_SIMILARITY_THRESHOLD)."""
    from harken.audio.diarization import OnlineDiarizer
    from harken.audio.embedding import OWNER_SIMILARITY_THRESHOLD

    diarizer, owners, tries, last = OnlineDiarizer(), set(), {}, 0
    for a, b, clip in utterances:
        if b - a >= 1.0:
            middle, half = clip.size // 2, min(clip.size, 10 * RATE) // 2
            vector = embedder.embed(clip[middle - half : middle + half])
            last = diarizer.assign(vector, weight=2 * half / RATE)
            if b - a >= 2.0 and last not in owners and tries.get(last, 0) < 3:
                tries[last] = tries.get(last, 0) + 1
                if float(vector @ owner_vector) >= OWNER_SIMILARITY_THRESHOLD:
                    owners.add(last)
    return owners


def owner_offline(baseline, embedder, pcm, reference, utterances) -> list:
    """Every speaker of the recording with 10 s to enrol after a split (``owner_split``) as the
    owner in turn: ``(speaker, old, previous, new)`` right/total seconds of ``is_user``, where old
    is the utterance-level path, previous the stretch-level path as it was before the enrolled
    voice was decided again against the conversation's voices (d-vector, ``adapt_known=False``)
    and new the model under test with the current rules."""
    from harken.audio.diarization import ConversationDiarizer
    from harken.audio.speaker_models import model_named

    out = []
    for owner in sorted({who for *_, who in reference}):
        split_at = owner_split(pcm, reference, owner)
        if split_at is None:
            continue
        _, enrol, split = split_at
        streamed = [u for u in utterances if u[1] <= split]
        old_vector = baseline.embed(enrol)
        owners = old_owner_labels(baseline, streamed, old_vector)
        old = is_user_time(old_labels(baseline, streamed), lambda label: label in owners, reference, owner, split)
        previous = ConversationDiarizer.for_model(model_named("dvector"), known=old_vector[None, :],
                                                  adapt_known=False, known_mean_threshold=0.0)
        for a, b, clip in streamed:
            previous.add_utterance(a, b, baseline.embed_windows(clip))
        previous.finish()
        before = is_user_time(previous.turns(), lambda label: previous.known_label(label) == 0, reference, owner,
                              split)
        diarizer = new_labels(embedder, streamed, known=embedder.embed(enrol)[None, :])
        after = is_user_time(diarizer.turns(), lambda label: diarizer.known_label(label) == 0, reference, owner,
                             split)
        out.append((owner, old, before, after))
    return out


def speaker_path(embedder, utterances):
    """What the gateway's speaker path does with each utterance: its windows placed by the
    conversation diarizer, and the speech in it found by the VAD (``SpeakerIdentifier._place``:
    word edges in a pause move to the speech)."""
    from harken.audio.vad import speech_spans
    from harken.gateway.speakers import SPEECH_PAUSE_MS

    for _, _, clip in utterances:
        speech_spans(clip, min_silence_ms=SPEECH_PAUSE_MS)
    return new_labels(embedder, utterances)


def speaker_path_cpu(embedder, utterances, streams: int) -> float:
    """Process CPU seconds of the speaker path for ``streams`` conversations sharing one
    embedding thread (as the gateway's sessions share ``SpeakerEmbedder``'s worker)."""
    import concurrent.futures

    started = time.process_time()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for future in [pool.submit(speaker_path, embedder, utterances) for _ in range(streams)]:
            future.result()
    return time.process_time() - started


def engine_cpu(utterances) -> float:
    """Process CPU seconds of the embedded engine (the gateway's faster-whisper model and
    options) decoding the same utterances."""
    from harken.config import Settings
    from harken.stt.whisper import WhisperProvider

    provider = WhisperProvider(Settings())
    asyncio.run(provider.load())
    started = time.process_time()
    for _, _, clip in utterances:
        provider.transcribe_clip(clip)
    return time.process_time() - started


def offline(files: list[Path], streams: list[int], with_engine: bool, owner_test: bool) -> None:
    from harken.audio.embedding import SpeakerEmbedder

    # The baseline ("old") is always the utterance-level path on the d-vector model, as before.
    baseline = SpeakerEmbedder.shared()
    embedder = MODEL.load()
    print(f"speaker model: {MODEL.name} ({MODEL.model_id}); bars {OVERRIDES or 'as configured'}; "
          f"load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}", flush=True)
    rows = []
    for path in files:
        pcm = read_wav_16k(path)
        reference = read_rttm(path.with_suffix(".rttm"))
        uem_path = path.with_suffix(".uem")
        uem = read_uem(uem_path) if uem_path.exists() else None
        utterances = vad_utterances(pcm)
        before = diarization_error(reference, old_labels(baseline, utterances), uem=uem)
        diarizer = new_labels(embedder, utterances)
        after = diarization_error(reference, diarizer.turns(), uem=uem)
        owned = owner_offline(baseline, embedder, pcm, reference, utterances) if owner_test else []
        for owner, (ro, to), (rb, tb), (ra, ta) in owned:
            print(f"{path.stem:22s} owner {owner}: is_user right on {ro / to:6.1%} (old) {rb / tb:6.1%} "
                  f"(previous) -> {ra / ta:6.1%} (new) of {ta:.0f} s of single-speaker speech", flush=True)
        seconds = len(pcm) / RATE
        cpu = {n: speaker_path_cpu(embedder, utterances, n) / (n * seconds) for n in streams}
        cpu["engine"] = engine_cpu(utterances) / seconds if with_engine else float("nan")
        rows.append((path.stem, seconds, before, after, cpu, owned))
        print(f"{path.stem:22s} {seconds:6.1f} s  DER old {before.der:6.1%} ({before.hypothesis_speakers}/"
              f"{before.reference_speakers} spk)  new {after.der:6.1%} (miss {after.missed / after.reference:5.1%} "
              f"fa {after.false_alarm / after.reference:5.1%} conf {after.confusion / after.reference:5.1%}; "
              f"{after.hypothesis_speakers}/{after.reference_speakers} spk)  speaker path "
              + "  ".join(f"{n} stream(s) {c * 1000:.1f}" for n, c in cpu.items() if n != "engine")
              + f" ms CPU per audio s; engine {cpu['engine'] * 1000:.0f} ms/s", flush=True)
    if not rows:
        return
    total = sum(r[1] for r in rows)
    for n in streams:
        path_cpu = sum(r[4][n] * r[1] for r in rows) / total
        engine = sum(r[4]["engine"] * r[1] for r in rows) / total
        print(f"speaker path at {n} stream(s): {path_cpu * 1000:.1f} ms CPU per audio second per stream "
              f"({path_cpu / engine:.1%} of the engine's {engine * 1000:.0f} ms)")
    owned = [o for r in rows for o in r[5]]
    if owned:
        for label, k in (("old", 1), ("previous", 2), ("new", 3)):
            right, total = sum(o[k][0] for o in owned), sum(o[k][1] for o in owned)
            print(f"{label}: is_user right on {right / total:.1%} of {total:.0f} s of single-speaker speech, "
                  f"{len(owned)} owners (worst {min(o[k][0] / o[k][1] for o in owned):.1%})")
    for label, index in (("old", 2), ("new", 3)):
        scores = [r[index] for r in rows]
        two = [x.der for x in scores if x.reference_speakers == 2]
        many = [x.der for x in scores if x.reference_speakers > 2]
        within = sum(abs(x.hypothesis_speakers - x.reference_speakers) <= 1 for x in scores)
        exact = sum(x.hypothesis_speakers == x.reference_speakers for x in scores)
        print(f"{label}: mean DER {np.mean([x.der for x in scores]):.1%}; two-party {np.mean(two) if two else float('nan'):.1%}; "
              f"3+ speakers {np.mean(many) if many else float('nan'):.1%}; speaker count exact {exact}/{len(scores)}, "
              f"within one {within}/{len(scores)}")


# --- replica: the gateway's path, offline and deterministic ----------------------------------
# Wall seconds a decode takes in the replica (--decode-seconds), times the pace: the audio that
# goes by meanwhile. A pause decode that ends a sentence ends its utterance only if no speech came
# back meanwhile (``UtteranceCutter.pause_decode_back``), so at 2x the engine cuts at fewer
# sentence ends than at real time, and its utterances hold more turns. At 1x a decode longer than
# endpoint_silence_ms - endpoint_pause_ms (0.4 s) comes back after the silence ended the utterance:
# no sentence cuts at all (call_autorepair_a at 1x: 0.1 s 35 cuts, 0.3 s 22, 0.5 s none; a
# Whisper decode of these utterances took 0.2-1.0 s on the shared 2-core machine).
REPLICA_DECODE_SECONDS = 0.3


async def replica_session(pcm: np.ndarray, utterances: list[EngineUtterance], speed: float):
    """The speaker path of a session with the embedded engine, fed ``utterances`` at their
    arrival times: the session's own parts (``AudioRing``, ``SpeakerIdentifier``,
    ``SegmentBuilder``) called in the order ``Session._store_next_batch`` calls them: the words
    labelled by voice (``diarize_words``) and added, the pause's re-clustering (``settle``, after
    ``SETTLE_AFTER_SECONDS`` of wall time without a word: ``speed`` times that of audio), the
    flush, and the segments the re-clustering moved re-sent by id (``speaker_changes``,
    ``respeak``). Returns the segments the client saw last (after the pause that follows the
    recording) and the stored ones (after the close's last re-clustering), as wire dicts, and
    the audio-clock time of conversation time 0."""
    from harken.audio.ring import AudioRing
    from harken.gateway.segments import SegmentBuilder
    from harken.gateway.session import RING_SECONDS, SETTLE_AFTER_SECONDS
    from harken.gateway.speakers import SpeakerIdentifier
    from harken.stt.base import EMBEDDED_PROVIDER

    ring = AudioRing(RING_SECONDS)
    speakers = SpeakerIdentifier(ring, model=MODEL)
    builder = SegmentBuilder()
    offset: float | None = None
    fed = 0
    providers = {EMBEDDED_PROVIDER}
    # Flicker: every label each word had in the client's view, in order (a word is known by its
    # start; splits and merges keep word times).
    history: dict[float, list[int]] = {}

    def watch() -> None:
        for segment in builder.segments:
            for _, start, _ in segment.words:
                labels = history.setdefault(round(start, 3), [])
                if not labels or labels[-1] != segment.speaker_id:
                    labels.append(segment.speaker_id)

    async def step(words, *, settle: bool = False, final: bool = False) -> None:
        nonlocal offset
        if words:
            labelled = await speakers.diarize_words(words)
            if offset is None:
                offset = -min(w.start for w in labelled)       # Session._anchor: the first word is 0.0
            builder.add_words(labelled, provider=EMBEDDED_PROVIDER, time_offset=offset,
                              speaker_labels=speakers.labels)
        elif settle:
            await speakers.settle()
        builder.flush()
        if final:
            speakers.close()
        changes = speakers.reclustered and await speakers.speaker_changes(builder.segments, offset or 0.0,
                                                                          providers=providers)
        if changes:
            builder.respeak(changes)
        watch()

    last_word = None
    for utterance in utterances:
        if last_word is not None and utterance.arrival - last_word >= SETTLE_AFTER_SECONDS * speed:
            await step([], settle=True)
        upto = min(pcm.size, int(utterance.arrival * RATE))
        if upto > fed:
            ring.append(pcm[fed:upto])
            fed = upto
        await step(utterance.words)
        last_word = utterance.arrival
    if fed < pcm.size:
        ring.append(pcm[fed:])
    await step([], settle=True)
    shown = [s.to_wire() for s in builder.segments]
    await step([], final=True)
    stored = [s.to_wire() for s in builder.segments]
    return shown, stored, -(offset or 0.0), Flicker.of(history.values())


@dataclass
class Flicker:
    """How often the words the client was shown changed speaker."""

    words: int
    relabelled: int       # words whose label changed at least once
    changes: int          # label changes, all words
    back: int             # words that went back to a label they had left

    @classmethod
    def of(cls, histories) -> "Flicker":
        histories = list(histories)
        return cls(len(histories), sum(len(h) > 1 for h in histories), sum(len(h) - 1 for h in histories),
                   sum(len(h) > len(set(h)) for h in histories))

    def __str__(self) -> str:
        return (f"relabels: {self.relabelled}/{self.words} words changed speaker ({self.changes} changes), "
                f"{self.back} went back")


def replica(files: list[Path], speed: float) -> None:
    """``--replica``: each recording through the gateway's path offline (see the module doc)."""
    print(f"replica of the gateway's path: speaker model {MODEL.name}; {speed:g}x pace, decodes back after "
          f"{REPLICA_DECODE_SECONDS:g} s; "
          f"load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}", flush=True)
    rows = []
    cpu_total = seconds_total = 0.0
    for path in files:
        pcm = read_wav_16k(path)
        pcm = np.concatenate((pcm, np.zeros(int(TAIL_SECONDS * RATE), pcm.dtype)))
        reference = read_rttm(path.with_suffix(".rttm"))
        uem_path = path.with_suffix(".uem")
        uem = read_uem(uem_path) if uem_path.exists() else None
        utterances = engine_utterances(path, pcm, REPLICA_DECODE_SECONDS, speed, MESSAGE_SECONDS)
        started = time.process_time()
        shown, stored, zero, flicker = asyncio.run(replica_session(pcm, utterances, speed))
        cpu = time.process_time() - started
        seconds = len(pcm) / RATE
        cpu_total += cpu
        seconds_total += seconds
        # On the session's audio clock, as the gateway bench places them (``server_offset``), and
        # with time 0 at the first reference turn, as the figures before session 19 did.
        clock = diarization_error(reference, hypothesis_turns(shown, zero), uem=uem)
        kept = diarization_error(reference, hypothesis_turns(stored, zero), uem=uem)
        at_reference = diarization_error(reference, hypothesis_turns(shown, clock_offset(reference)), uem=uem)
        rows.append((path.stem, clock, kept, at_reference))
        dump(path.stem, shown)
        print(f"{path.stem:22s} {seconds:6.1f} s  DER {clock.der:6.1%} (miss {clock.missed / clock.reference:5.1%} "
              f"fa {clock.false_alarm / clock.reference:5.1%} conf {clock.confusion / clock.reference:5.1%}) "
              f"speakers {clock.hypothesis_speakers}/{clock.reference_speakers}  stored {kept.der:6.1%} "
              f"{kept.hypothesis_speakers}/{kept.reference_speakers}  time 0 at the first reference turn "
              f"{at_reference.der:6.1%}  {len(shown)} segments  "
              f"speaker path {cpu / seconds * 1000:.1f} ms CPU per audio s; {flicker}", flush=True)
    if not rows:
        return
    for label, index in (("shown", 1), ("stored", 2), ("time 0 at the first reference turn", 3)):
        scores = [r[index] for r in rows]
        two = [x.der for x in scores if x.reference_speakers == 2]
        many = [x.der for x in scores if x.reference_speakers > 2]
        exact = sum(x.hypothesis_speakers == x.reference_speakers for x in scores)
        print(f"{label}: mean DER {np.mean([x.der for x in scores]):.1%}; two-party {np.mean(two) if two else float('nan'):.1%}; "
              f"3+ speakers {np.mean(many) if many else float('nan'):.1%}; speaker count exact {exact}/{len(scores)}")
    print(f"speaker path (labels, re-clustering, segments; decodes cached): {cpu_total / seconds_total * 1000:.1f} ms "
          f"CPU per audio second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="WAV files or folders, each WAV with an RTTM beside it")
    parser.add_argument("--speed", type=float, default=None,
                        help="pace: N times real time (default 1; --replica: 2)")
    parser.add_argument("--no-owner", action="store_true", help="skip the enrolled-owner run")
    parser.add_argument("--owner-each", action="store_true",
                        help="also each speaker with 10 s of solo speech after a split (three quarters, else 0.6 "
                             "or half) as the owner in turn, the recording before the split streamed")
    parser.add_argument("--offline", action="store_true", help="the speaker path alone, in process (see above)")
    parser.add_argument("--replica", action="store_true",
                        help="the gateway's path offline: the engine's cuts and words, then the session's speaker "
                             "path and segments (see above)")
    parser.add_argument("--streams", default="1,12", help="--offline: stream counts for the CPU figure")
    parser.add_argument("--no-engine", action="store_true", help="--offline: skip the engine's CPU figure")
    parser.add_argument("--model", default=None,
                        help="--offline: speaker model (harken.audio.speaker_models; default: the gateway's)")
    parser.add_argument("--cuts", choices=("vad", "engine"), default="vad",
                        help="--offline: utterances from Silero spans (default) or the engine's endpointer")
    parser.add_argument("--decode-seconds", type=float, default=0.3,
                        help="--replica: wall seconds a decode takes (times --speed: the audio that goes by)")
    parser.add_argument("--dump", type=Path, help="write the segments the client saw last to DIR/NAME.json")
    parser.add_argument("--cluster", type=float, help="--offline: clustering similarity instead of the model's")
    parser.add_argument("--known", type=float, help="--offline: enrolled-voice similarity instead of the model's")
    args = parser.parse_args()
    global MODEL, CUTS, DUMP, REPLICA_DECODE_SECONDS
    CUTS = args.cuts
    DUMP = args.dump
    REPLICA_DECODE_SECONDS = args.decode_seconds
    from harken.audio.speaker_models import model_named

    MODEL = model_named(args.model) if args.model else model_named()
    if args.cluster is not None:
        OVERRIDES["threshold"] = args.cluster
    if args.known is not None:
        OVERRIDES["known_threshold"] = args.known
    if args.replica:
        replica(recordings(args.paths), 2.0 if args.speed is None else args.speed)
    elif args.offline:
        offline(recordings(args.paths), [int(n) for n in args.streams.split(",")], not args.no_engine,
                not args.no_owner)
    else:
        asyncio.run(run(recordings(args.paths), 1.0 if args.speed is None else args.speed, not args.no_owner,
                        args.owner_each))


if __name__ == "__main__":
    main()
