"""Recordings of people in other languages (``tests/data/multilingual/real``), read in the formats
their packages ship them (G.722, Opus, MP3, WAV: kept byte for byte, so each file's SHA-256 in
SOURCES.md can be checked against its package) and decoded to 16 kHz mono PCM16 for streaming.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from harken.client import TARGET_RATE, read_wav_16k
from harken.codecs.resample import resample_int16

REAL_SPEECH = Path(__file__).parent / "data" / "multilingual" / "real"


@dataclass(frozen=True)
class Clip:
    file: str
    language: str
    reference: str

    def pcm(self, folder: Path = REAL_SPEECH) -> np.ndarray:
        return read_clip_16k(folder / self.file)


def clips(folder: Path = REAL_SPEECH) -> list[Clip]:
    """The clips listed in ``folder``'s ``transcripts.tsv`` (file, language, reference), in order."""
    with open(folder / "transcripts.tsv", newline="", encoding="utf-8") as f:
        return [Clip(row["file"], row["language"], row["reference"]) for row in csv.DictReader(f, delimiter="\t")]


def read_clip_16k(path: Path) -> np.ndarray:
    """Any audio file ffmpeg decodes (raw G.722 by its ``.g722`` suffix) as 16 kHz mono int16."""
    if path.suffix == ".wav":
        return read_wav_16k(path)
    chunks: list[np.ndarray] = []
    with av.open(str(path), format="g722" if path.suffix == ".g722" else None) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        to_mono_s16 = av.AudioResampler(format="s16", layout="mono", rate=rate)
        for frame in container.decode(stream):
            chunks.extend(out.to_ndarray().reshape(-1) for out in to_mono_s16.resample(frame))
        chunks.extend(out.to_ndarray().reshape(-1) for out in to_mono_s16.resample(None))
    pcm = np.concatenate(chunks).astype(np.int16)
    return pcm if rate == TARGET_RATE else resample_int16(pcm, rate, TARGET_RATE)
