"""The speaking-stream load test's measurements (harken.loadspeech), on scripted arrivals."""

from __future__ import annotations

import numpy as np
import pytest

from harken.loadspeech import Clip, SpeakerOutcome, Utterance


def outcome(views, utterances) -> SpeakerOutcome:
    """Frames of 0.1 s sent exactly on time from t=100 (so audio second a was sent at 100 + a)."""
    sent = 100 + 0.1 * np.arange(1, 401)
    result = SpeakerOutcome(0, utterances, [(100 + t, text.split()) for t, text in views], sent, 0.1)
    result.analyse()
    return result


def utterance(start, reference, words_at, speech=(0.2, 2.0)):
    clip = Clip("x.wav", np.zeros(0, np.int16), reference, speech, words_at)
    return Utterance(clip, start, start + speech[0], start + speech[1])


def test_final_latency_first_shown_and_wer_per_utterance():
    first = utterance(1.0, "one two three", [0.8, 1.4, 2.0])       # speech ends at 3.0 s
    second = utterance(8.0, "four five", [0.6, 1.5], speech=(0.2, 1.5))  # speech 8.2-9.5 s
    views = [
        (2.5, "one"),                    # provisional, while speaking
        (3.6, "one two three"),          # final 0.6 s after the speech ended
        (10.2, "one two three four fife"),
    ]
    result = outcome(views, [first, second])
    assert result.late == 0
    assert result.final_latencies == pytest.approx([0.6, 0.7])
    # "one" spoken at 1.8 s, shown at 2.5; "two" (2.4) and "three" (3.0) at 3.6; "four" (8.6) and "five" (9.5) at 10.2.
    assert result.first_shown == pytest.approx([0.7, 1.2, 0.6, 1.6, 0.7])
    assert (result.errors, result.words) == (1, 5)


def test_words_shown_before_the_speech_ended_count_zero_and_a_final_after_the_next_start_is_late():
    first = utterance(1.0, "one two", [0.8, 1.4])
    second = utterance(5.0, "three", [0.5])
    views = [
        (2.9, "one two"),               # the final text was already complete before the end (3.0)
        (9.0, "one two three"),
    ]
    result = outcome(views, [first, second])
    assert result.final_latencies[0] == 0.0
    third = utterance(5.0, "three", [0.5])
    late = outcome([(5.5, "one two")], [utterance(1.0, "one two", [0.8, 1.4]), third])
    assert late.late == 2 and late.final_latencies == []          # back only after the next began; the next never


@pytest.mark.timeout(180)
def test_loadtest_speech_dir_drives_real_speech_through_the_engine_and_searches_capacity(gateway, tmp_path, capsys):
    """`harken loadtest --speech-dir` against a running server: real recordings through the
    embedded engine, a line per level, and the capacity verdict (an impossible target holds 0)."""
    import shutil

    from harken import cli

    from .conftest import AUDIO

    rows = ["file\tset\treference", "goforward.wav\treal\tgo forward ten meters",
            "ss_0930.wav\treal\the might even have been made amiable himself"]
    (tmp_path / "transcripts.tsv").write_text("\n".join(rows) + "\n")
    for name in ("goforward.wav", "ss_0930.wav"):
        shutil.copy(AUDIO / name, tmp_path / name)
    code = cli.main(["loadtest", "--url", gateway.base, "--speech-dir", str(tmp_path), "--utterances", "2",
                     "--pause", "3", "--target-p95", "-1", "--data-dir", str(gateway.settings.data_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    level = next(line for line in out.splitlines() if line.strip().startswith("1 streams"))
    assert "late" in level and "failed 0" in level, out
    wer = float(level.split("WER")[1].split("%")[0]) / 100
    assert wer <= 0.25, out                     # 11 words read through the engine
    assert "holds 0 speaking streams" in out
