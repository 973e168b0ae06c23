"""Build a folder of real English speech with transcripts for the benches' ``--audio-dir``.

    .venv/bin/python bench/asterisk_prompts.py /tmp/prompts            # ≥ 8 words: 93 prompts
    .venv/bin/python bench/asterisk_prompts.py /tmp/short --min-words 4 --max-words 7
    .venv/bin/python bench/bench_stream.py --audio-dir /tmp/prompts --levels 1 16

The 16 dev recordings of ``tests/data/audio`` hold 159 words, so one word is 0.6 points of WER:
too few to see a 1-point difference between the gateway and a whole-file decode. This takes the
Asterisk PBX's English prompts (Allison Smith, CC BY-SA 3.0), read by a person with published
transcripts, from Debian's ``asterisk-core-sounds-en-wav`` (8 kHz WAV) and
``asterisk-core-sounds-en`` (the transcript file) with ``apt-get download``, and writes the
prompts with no digit, bracket, parenthesis or star in their text and ``--min-words`` to
``--max-words`` words as ``folder/<name>.wav`` plus ``folder/transcripts.tsv`` (file, reference).
The files are not kept in the repository; the selection is deterministic.
"""

from __future__ import annotations

import argparse
import gzip
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGES = ("asterisk-core-sounds-en-wav", "asterisk-core-sounds-en")
SOUNDS = Path("usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
UNSCORABLE = re.compile(r"[\[\]()<>*#0-9]")     # sound effects, stage directions, digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--min-words", type=int, default=8)
    parser.add_argument("--max-words", type=int, default=1000)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True, capture_output=True)
        for deb in Path(tmp).glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        root = Path(tmp) / "x"
        rows = []
        for line in gzip.open(root / TRANSCRIPTS, "rt", errors="replace"):
            if ":" not in line or line.startswith(";"):
                continue
            name, text = (part.strip() for part in line.split(":", 1))
            source = root / SOUNDS / f"{name}.wav"
            if "/" in name or not source.exists() or UNSCORABLE.search(text):
                continue
            if args.min_words <= len(text.split()) <= args.max_words:
                shutil.copy(source, args.folder / source.name)
                rows.append((source.name, text))
    with open(args.folder / "transcripts.tsv", "w") as f:
        f.write("file\treference\n")
        f.writelines(f"{name}\t{text}\n" for name, text in rows)
    print(f"{len(rows)} prompts in {args.folder}")


if __name__ == "__main__":
    main()
