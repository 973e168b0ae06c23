"""The speaker models: Resemblyzer's encoder read and run without torch, both models told apart on
read speech, and stored voices that name the model that made them.

Audio: LibriSpeech test-other utterances in tests/data/speakers (CC BY 4.0, tests/data/audio/SOURCES.md).
"""

from __future__ import annotations

import collections
import pickle
import sys

import numpy as np
import pytest

from harken.audio.embedding import equal_error_rate
from harken.audio.resemblyzer_model import (ResemblyzerEmbedder, _check_weights, _weights_path, partial_starts,
                                            read_torch_legacy)
from harken.audio.speaker_models import MODELS, model_named
from harken.gateway.profiles import from_bytes, to_bytes, voice_model

from .test_embedding import speakers

pytestmark = pytest.mark.timeout(300)


def test_resemblyzer_runs_from_its_wheels_weights_without_torch():
    model = ResemblyzerEmbedder.shared()
    assert "torch" not in sys.modules and "librosa" not in sys.modules
    clip = speakers()["1998"][0]
    windows = model.embed_windows(clip)
    # One 1.6 s partial every 0.8 s over the clip, each a non-negative unit vector (ReLU, L2).
    assert len(windows) == len(partial_starts(len(clip) // 160 + 1))
    assert np.allclose(np.linalg.norm(windows, axis=1), 1.0, atol=1e-5) and windows.min() >= 0
    assert np.array_equal(model.embed(clip), model.embed(clip))


def test_a_weights_file_that_would_build_other_objects_is_refused(tmp_path):
    # The legacy torch format is a pickle: only dicts, lists and tensors may come out of it.
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(header, f)
        pickle.dump(collections.Counter(a=1), f)        # any class outside the whitelist
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        read_torch_legacy(str(path))


def test_a_weights_file_that_is_not_the_wheels_is_refused(tmp_path):
    # The shipped file matches the sha256 its pinned wheel recorded; one changed byte does not.
    _check_weights(_weights_path())
    forged = tmp_path / "pretrained.pt"
    data = bytearray(open(_weights_path(), "rb").read())
    data[-1] ^= 0xFF
    forged.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="not resemblyzer 0.1.4's weights file"):
        _check_weights(str(forged))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_each_model_tells_read_voices_apart_on_two_second_clips(name):
    # Every 2 s piece of each speaker's utterances 3–5 against each speaker's enrolment (the
    # mean of utterances 0–2): same-speaker scores must stand clearly apart from the others.
    model = model_named(name)
    embedder = model.load()
    voices = speakers()
    enrolled = {s: embedder.embed(np.concatenate(clips[:3])) for s, clips in voices.items()}
    genuine, impostor = [], []
    for speaker, clips in voices.items():
        for clip in clips[3:]:
            for k in range(0, clip.size - 32000 + 1, 32000):
                vector = embedder.embed(clip[k:k + 32000])
                for other, enrolment in enrolled.items():
                    (genuine if other == speaker else impostor).append(float(vector @ enrolment))
    eer, threshold = equal_error_rate(np.array(genuine), np.array(impostor))
    print(f"\n{name}: EER {eer:.2%} at {threshold:.2f} on {len(genuine)} genuine / {len(impostor)} impostor trials")
    assert eer <= 0.05, eer


def test_stored_voices_name_their_model_and_are_never_compared_across_models():
    vector = np.linspace(-1, 1, 256).astype(np.float32)
    dvector, resemblyzer = model_named("dvector").model_id, model_named("resemblyzer").model_id
    blob = to_bytes(vector, resemblyzer)
    assert voice_model(blob) == resemblyzer
    assert np.array_equal(from_bytes(blob, resemblyzer), vector)
    assert from_bytes(blob, dvector) is None
    # A voice stored before voices named their model: the bare floats of the d-vector model.
    legacy = vector.astype("<f4").tobytes()
    assert voice_model(legacy) == dvector
    assert np.array_equal(from_bytes(legacy, dvector), vector)
    assert from_bytes(legacy, resemblyzer) is None
    assert voice_model(b"junk") is None and from_bytes(b"junk", dvector) is None
