"""Resemblyzer's voice encoder, run in numpy: a 256-d voice fingerprint without torch.

The PyPI package ``resemblyzer`` (0.1.4, Apache-2.0) ships its trained weights as
``resemblyzer/pretrained.pt``: a GE2E speaker encoder (3-layer LSTM of 256 units over 40 mel
bands, a linear layer, ReLU, L2 norm) trained on LibriSpeech, VoxCeleb 1 and 2. The package's own
code needs torch, librosa and webrtcvad, so only the weights file is used (install the wheel with
``--no-deps``): it is read here without torch (``read_torch_legacy``: the pre-1.6 pickle format,
with a whitelist of the classes a state dict needs, nothing else is ever constructed), and the
network and its front end are reimplemented in numpy.

The recipe the weights were trained with, which ``embed_windows`` follows:

1. the clip's loudness raised (never lowered) to -30 dBFS RMS;
2. a 40-band Slaney mel *power* spectrogram (no log): 400-point FFT of 25 ms periodic-Hann frames
   every 10 ms, centred (reflect-padded), as ``librosa.feature.melspectrogram`` computes it;
3. 160-frame (1.6 s) partials, each run through the LSTM from a zero state; the last layer's
   final hidden state → linear → ReLU → L2 norm is the partial's embedding.

Resemblyzer slides its partials 77 frames apart; here they are 80 frames (0.8 s) apart, so that a
conversation's stretches fall on the same 0.8 s grid as the d-vector model's. A partial cut short
by the end of the clip runs on its real frames only (zero padding would feed the LSTM silence it
never saw in training). Cost: about 1.3 × 10^8 multiply-adds per partial, run as one batched
matrix product per LSTM step for all of an utterance's partials.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import pickle
import struct

import numpy as np

from ..wheel_record import NotRecorded, recorded_sha256
from .embedding import SAMPLE_RATE, ExecutorModel, file_problem, mel_filterbank, packaged_file

EMBEDDING_DIM = 256
MIN_SECONDS = 0.5
_N_FFT = 400
_HOP = 160
_N_MELS = 40
_HIDDEN = 256
_LAYERS = 3
_PARTIAL_FRAMES = 160
_PARTIAL_STRIDE = 80
# A partial cut short at the end of a clip is kept if it has at least this many frames (0.8 s):
# shorter ones would be embedded from too little voice (the first partial is always kept).
_MIN_TAIL_FRAMES = 80
_TARGET_DBFS = -30.0
WINDOW_SECONDS = _PARTIAL_FRAMES * _HOP / SAMPLE_RATE
WINDOW_HOP_SECONDS = _PARTIAL_STRIDE * _HOP / SAMPLE_RATE
# The weights must be resemblyzer 0.1.4's (the wheel is pinned by hash in requirements-models.txt):
# checked at load against the sha256 that the installed wheel's RECORD gives for the file, which
# catches a different file put in its place without a digest copied into the source.
WEIGHTS_VERSION = "0.1.4"


def _weights_path() -> str:
    # Located without importing resemblyzer: its __init__ imports torch.
    return packaged_file("resemblyzer", "resemblyzer", "pretrained.pt")


def _check_weights(path: str) -> None:
    """Raise unless ``path`` is the weights file the installed resemblyzer 0.1.4 wheel recorded."""
    try:
        expected = recorded_sha256("resemblyzer", WEIGHTS_VERSION, "pretrained.pt")
    except NotRecorded as exc:
        raise RuntimeError(str(exc)) from None
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != expected:
            raise RuntimeError(f"{path} is not resemblyzer {WEIGHTS_VERSION}'s weights file")


@functools.lru_cache(maxsize=1)
def resemblyzer_problem() -> str | None:
    """Why the Resemblyzer weights cannot be used (not installed), or None."""
    return file_problem(_weights_path)


# --- reading the weights without torch ------------------------------------------------------

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _Storage:
    def __init__(self, dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _TensorRef:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        itemsize = data.itemsize
        if not self.size:
            return data[self.offset:self.offset + 1].reshape(())
        return np.lib.stride_tricks.as_strided(data[self.offset:], self.size,
                                               [s * itemsize for s in self.stride]).copy()


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _TensorRef(storage, offset, size, stride)


class _StateDictUnpickler(pickle.Unpickler):
    """Builds only dicts, lists and tensor references: any other class in the file is refused."""

    def __init__(self, file, storages: dict):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in _DTYPES:
            return name
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel, view = pid
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported storage reference {pid[:2]!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(_DTYPES[storage_type], int(numel))
        return self._storages[key]


def read_torch_legacy(path: str) -> dict:
    """The object saved by ``torch.save`` in the legacy (pre-1.6, non-zip) format, with every
    tensor as a numpy array. Raises ``ValueError`` for another format."""
    with open(path, "rb") as f:
        if pickle.load(f) != 0x1950A86A20F9469CFC6C:       # torch's legacy magic number
            raise ValueError(f"{path} is not a legacy torch file")
        pickle.load(f)                                       # protocol version
        pickle.load(f)                                       # sys info
        storages: dict[str, _Storage] = {}
        result = _StateDictUnpickler(f, storages).load()
        keys = pickle.load(f)
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise ValueError(f"storage {key} has {numel} elements, {storage.numel} expected")
            raw = f.read(numel * np.dtype(storage.dtype).itemsize)
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    return _materialise(result)


def _materialise(value):
    if isinstance(value, _TensorRef):
        return value.array()
    if isinstance(value, dict):
        return type(value)((k, _materialise(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_materialise(v) for v in value)
    return value


# --- front end ------------------------------------------------------------------------------

_MEL_BASIS = mel_filterbank(_N_FFT, _N_MELS)
_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_N_FFT) / _N_FFT)).astype(np.float32)


def mel_power(pcm: np.ndarray) -> np.ndarray:
    """(frames, 40) mel power spectrogram of int16 16 kHz ``pcm`` as the encoder expects it
    (loudness raised to -30 dBFS first; one frame per 10 ms, centred)."""
    audio = np.asarray(pcm, dtype=np.int16).reshape(-1).astype(np.float32) / 32768.0
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0
    if rms > 0:
        gain = 10 ** ((_TARGET_DBFS - 20 * np.log10(rms)) / 20)
        if gain > 1:                                   # raised only, as trained
            audio = audio * np.float32(gain)
    pad = _N_FFT // 2
    mode = "reflect" if audio.size > pad else "constant"
    audio = np.pad(audio, pad, mode=mode)
    frames = np.lib.stride_tricks.sliding_window_view(audio, _N_FFT)[::_HOP] * _HANN
    spectrum = np.fft.rfft(frames, axis=1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return power @ _MEL_BASIS


def partial_starts(frames: int) -> list[tuple[int, int]]:
    """``(first frame, frame count)`` of each partial: every ``_PARTIAL_STRIDE`` frames, full
    length where the clip allows, the last one cut at the clip's end if it keeps enough frames."""
    out = [(0, min(frames, _PARTIAL_FRAMES))]
    start = _PARTIAL_STRIDE
    while start + _PARTIAL_FRAMES <= frames:
        out.append((start, _PARTIAL_FRAMES))
        start += _PARTIAL_STRIDE
    last_start, last_count = out[-1]
    if start < frames and last_start + last_count < frames and frames - start >= _MIN_TAIL_FRAMES:
        out.append((start, frames - start))
    return out


# --- the network ----------------------------------------------------------------------------


class ResemblyzerEmbedder(ExecutorModel):
    """Resemblyzer's encoder in numpy; the same interface as ``embedding.SpeakerEmbedder``."""

    def __init__(self, weights_path: str | None = None):
        if weights_path is None:
            weights_path = _weights_path()
            _check_weights(weights_path)
        state = read_torch_legacy(weights_path)
        weights = state.get("model_state", state)
        self._layers = []
        for layer in range(_LAYERS):
            w_ih = weights[f"lstm.weight_ih_l{layer}"].astype(np.float32)
            w_hh = weights[f"lstm.weight_hh_l{layer}"].astype(np.float32)
            bias = (weights[f"lstm.bias_ih_l{layer}"] + weights[f"lstm.bias_hh_l{layer}"]).astype(np.float32)
            # The input, forget and output gates are sigmoids; sigmoid(x) = (1 + tanh(x / 2)) / 2,
            # so their rows are halved once here and all four gates take one tanh per step.
            scale = np.ones(4 * _HIDDEN, dtype=np.float32)
            scale[: 2 * _HIDDEN] = 0.5
            scale[3 * _HIDDEN:] = 0.5
            self._layers.append((np.ascontiguousarray((w_ih * scale[:, None]).T),
                                 np.ascontiguousarray((w_hh * scale[:, None]).T), bias * scale))
        self._linear_w = np.ascontiguousarray(weights["linear.weight"].astype(np.float32).T)
        self._linear_b = weights["linear.bias"].astype(np.float32)
        if self._linear_w.shape != (_HIDDEN, EMBEDDING_DIM):
            raise RuntimeError(f"unexpected Resemblyzer weights: linear layer {self._linear_w.shape}")

    def _encode(self, mels: np.ndarray) -> np.ndarray:
        """(batch, 256) unit embeddings of (batch, frames, 40) partials of one length."""
        batch, steps, _ = mels.shape
        inputs = mels
        h = np.zeros((batch, _HIDDEN), dtype=np.float32)
        for w_ih, w_hh, bias in self._layers:
            projected = inputs @ w_ih + bias                    # (batch, steps, 4H), all steps at once
            h = np.zeros((batch, _HIDDEN), dtype=np.float32)
            c = np.zeros((batch, _HIDDEN), dtype=np.float32)
            outputs = np.empty((batch, steps, _HIDDEN), dtype=np.float32)
            for t in range(steps):
                gates = np.tanh(projected[:, t] + h @ w_hh)
                i = gates[:, :_HIDDEN] * 0.5 + 0.5
                f = gates[:, _HIDDEN : 2 * _HIDDEN] * 0.5 + 0.5
                g = gates[:, 2 * _HIDDEN : 3 * _HIDDEN]
                o = gates[:, 3 * _HIDDEN:] * 0.5 + 0.5
                c = f * c + i * g
                h = o * np.tanh(c)
                outputs[:, t] = h
            inputs = outputs
        raw = np.maximum(h @ self._linear_w + self._linear_b, 0.0)
        return raw / (np.linalg.norm(raw, axis=1, keepdims=True) + 1e-12)

    def embed_windows(self, pcm: np.ndarray) -> np.ndarray:
        """(n, 256) unit embeddings of the partials over ``pcm``: partial ``k`` covers
        ``[k * WINDOW_HOP_SECONDS, k * WINDOW_HOP_SECONDS + WINDOW_SECONDS)`` (the last may be
        shorter; a clip shorter than one partial gives one)."""
        mels = mel_power(pcm)
        spans = partial_starts(len(mels))
        out = np.zeros((len(spans), EMBEDDING_DIM), dtype=np.float32)
        for count in sorted({n for _, n in spans}):          # one batch per partial length
            rows = [k for k, (_, n) in enumerate(spans) if n == count]
            batch = np.stack([mels[spans[k][0] : spans[k][0] + count] for k in rows])
            out[rows] = self._encode(batch)
        return out

    def embed(self, pcm: np.ndarray) -> np.ndarray:
        """The L2-normalised mean of the partials' embeddings (Resemblyzer's ``embed_utterance``).
        Raises ``ValueError`` for a clip shorter than ``MIN_SECONDS``."""
        pcm = np.asarray(pcm, dtype=np.int16).reshape(-1)
        if pcm.size < MIN_SECONDS * SAMPLE_RATE:
            raise ValueError(f"clip of {pcm.size / SAMPLE_RATE:.2f} s is shorter than {MIN_SECONDS} s")
        mean = self.embed_windows(pcm).mean(axis=0)
        return (mean / (np.linalg.norm(mean) + 1e-12)).astype(np.float32)
