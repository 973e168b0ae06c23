"""Segment merging as an Omi client sees it: upsert by id, `segments_deleted`, stable ids."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harken.gateway.segments import Batch, Segment, SegmentBuilder, Split
from harken.stt.base import Word

pytestmark = pytest.mark.timeout(60)

ENDERS = ".?!。！？؟۔।॥"


def counter_ids():
    numbers = itertools.count()
    return lambda: f"seg-{next(numbers)}"


def words(*specs, speaker=0):
    """("text", start, end) triples → Words of one speaker."""
    return [Word(text, start, end, speaker) for text, start, end in specs]


def flush_texts(builder: SegmentBuilder) -> list[str]:
    builder.flush()
    return [s.text for s in builder.segments]


def add(builder, ws, provider="local", labels=None, **kwargs):
    builder.add_words(ws, provider=provider, speaker_labels=labels, **kwargs)


# ---------------------------------------------------------------- raw segments and text


def test_consecutive_words_of_one_speaker_form_one_segment_and_speaker_changes_split():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hello", 0.0, 0.4), ("there.", 0.5, 0.9), speaker=0)
        + words(("Good", 1.0, 1.3), ("morning.", 1.4, 1.9), speaker=1))
    batch = builder.flush()
    assert [(s.text, s.speaker, s.start, s.end) for s in batch.changed] == [
        ("Hello there.", "SPEAKER_00", 0.0, 0.9),
        ("Good morning.", "SPEAKER_01", 1.0, 1.9),
    ]
    assert [s.id for s in batch.changed] == ["seg-0", "seg-1"]
    assert batch.deleted_ids == []


def test_spacing_before_punctuation_is_normalised_and_double_spaces_collapse():
    builder = SegmentBuilder()
    tokens = ["Well", ",", "is", "it", "?", "Yes", "!", "Note", ":", "a", ";", "b", " spaced  out ", "."]
    add(builder, [Word(t, i * 0.1, i * 0.1 + 0.05) for i, t in enumerate(tokens)])
    assert flush_texts(builder) == ["Well, is it? Yes! Note: a; b spaced out."]


def test_punctuation_arriving_in_a_later_batch_attaches_without_a_space():
    builder = SegmentBuilder()
    add(builder, words(("Hello", 0.0, 0.4)))
    first = builder.flush().changed[0]
    add(builder, words((",", 0.4, 0.45), ("world", 0.5, 0.9)))
    batch = builder.flush()
    assert [(s.id, s.text) for s in batch.changed] == [(first.id, "Hello, world")]


def test_words_are_sorted_by_start_and_offset_into_conversation_time():
    builder = SegmentBuilder()
    add(builder, words(("world.", 1.0, 1.5), ("Hello", 0.2, 0.6)), time_offset=100.0)
    (segment,) = builder.flush().changed
    assert (segment.text, segment.start, segment.end) == ("Hello world.", 100.2, 101.5)


def test_empty_flush_sends_nothing():
    builder = SegmentBuilder()
    assert not builder.flush()
    add(builder, words(("   ", 0.0, 0.1)))
    assert not builder.flush()
    assert builder.segments == []


# ---------------------------------------------------------------- combine rules


@pytest.mark.parametrize("one_flush", [False, True], ids=["two flushes", "one flush"])
@pytest.mark.parametrize("gap, merged", [(2.9, True), (3.1, False)])
def test_same_speaker_merges_only_when_the_pause_is_under_three_seconds(gap, merged, one_flush):
    # However the words arrive: a client streaming faster than real time gets several utterances'
    # words in one flush, and they are cut the same as at real-time pace.
    builder = SegmentBuilder()
    add(builder, words(("Hello.", 0.0, 1.0)))
    if not one_flush:
        builder.flush()
    add(builder, words(("Again.", 1.0 + gap, 2.0 + gap)))
    texts = flush_texts(builder)
    assert texts == (["Hello. Again."] if merged else ["Hello.", "Again."])


@pytest.mark.parametrize(
    "first, merged",
    [
        ("a" * 123 + ".", True),   # 124 chars, finished sentence: still short enough
        ("a" * 124 + ".", False),  # 125 chars and finished: stays alone
        ("a" * 140, True),         # long but unfinished: keeps growing
    ],
)
def test_a_long_finished_segment_stops_growing(first, merged):
    builder = SegmentBuilder()
    add(builder, words((first, 0.0, 5.0)))
    builder.flush()
    add(builder, words(("Next.", 5.5, 6.0)))
    texts = flush_texts(builder)
    assert texts == ([f"{first} Next."] if merged else [first, "Next."])


def test_lowercase_continuation_joins_across_speakers_at_a_short_pause():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("I", 0.0, 0.2), ("went", 0.3, 0.5), ("to", 0.6, 0.7), ("the", 0.8, 0.9), speaker=0)
        + words(("store", 1.5, 1.9), ("yesterday.", 2.0, 2.5), speaker=1))
    batch = builder.flush()
    assert [(s.id, s.text, s.speaker_id, s.end) for s in batch.changed] == [
        ("seg-0", "I went to the store yesterday.", 0, 2.5)
    ]


@pytest.mark.parametrize("pause, joined", [(2.9, True), (3.0, False), (9.1, False)])
def test_lowercase_continuation_joins_one_speaker_only_across_a_pause_under_3_s(pause, joined):
    """Upstream joins a lowercase continuation at any pause. The embedded engine decodes each
    utterance alone and leaves one a pause cut unpunctuated, so every later lowercase start
    joined it and the segment claimed the silence between as its speaker's speech: rule (b)
    within one voice keeps rule (a)'s 3 s bound."""
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("I", 0.0, 0.2), ("went", 0.3, 0.5), ("to", 0.6, 0.7), ("the", 0.8, 0.9), speaker=0))
    builder.flush()
    later = 0.9 + pause
    add(builder, words(("store", later, later + 0.4), ("yesterday.", later + 0.5, later + 1.0), speaker=0))
    builder.flush()
    texts = [s.text for s in builder.segments]
    assert texts == (["I went to the store yesterday."] if joined else ["I went to the", "store yesterday."])


def test_another_voice_after_a_pause_is_a_turn_even_in_lowercase():
    """Two voices 1.7 s apart: the second is a reply (or a fragment decoded without its context),
    and joining would put the first speaker's words under the second's label."""
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("the", 0.0, 0.2), ("medical", 0.3, 0.6), ("man", 0.7, 1.0), speaker=0)
        + words(("reply", 2.7, 3.0), ("sheet", 3.1, 3.5), speaker=1))
    batch = builder.flush()
    assert [(s.text, s.speaker_id) for s in batch.changed] == [("the medical man", 0), ("reply sheet", 1)]


def test_respeak_moves_sent_segments_and_merges_neighbours():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hello.", 0.0, 0.5), speaker=0) + words(("Hi.", 1.0, 1.4), speaker=1)
        + words(("How are you?", 2.0, 2.8), speaker=0))
    assert [s.speaker_id for s in builder.flush().changed] == [0, 1, 0]
    # Re-clustering found that the middle segment was speaker 0 too: re-sent by id, and the three
    # are one speaker's talk now, merged into the first (the others' ids deleted).
    batch = builder.respeak({"seg-1": (0, False, None)})
    assert [(s.id, s.text, s.speaker_id) for s in batch.changed] == [("seg-0", "Hello. Hi. How are you?", 0)]
    assert batch.deleted_ids == ["seg-1", "seg-2"]


def test_respeak_splits_a_segment_whose_words_the_voice_gives_to_two_speakers():
    builder = SegmentBuilder(id_factory=counter_ids())
    # Labelled as one voice when it came: one segment (and a lowercase reply would join another
    # speaker's unfinished sentence anyway, rule (b)).
    add(builder, words(("So I went to the", 0.0, 1.5), ("garage", 1.6, 2.0), ("and", 2.1, 2.3),
                       ("oh", 2.9, 3.1), ("really", 3.2, 3.6), speaker=0))
    assert [s.id for s in builder.flush().changed] == ["seg-0"]
    # Re-clustering hears the last two words as another voice: the segment is reported deleted
    # (an id's text only grows) and each part goes out under a new id, the reply not merged back.
    batch = builder.respeak({"seg-0": Split(((3, 0, False, None), (2, 1, False, None)))})
    assert batch.deleted_ids == ["seg-0"]
    assert [(s.id, s.text, s.speaker_id, s.start, s.end) for s in batch.changed] == [
        ("seg-1", "So I went to the garage and", 0, 0.0, 2.3), ("seg-2", "oh really", 1, 2.9, 3.6)]
    assert [s.id for s in builder.segments] == ["seg-1", "seg-2"]
    # The parts are segments like any other: the first voice's next words go on a new segment
    # (another voice's is the tail), and a later re-clustering can join the parts again.
    add(builder, words(("Yes.", 4.0, 4.4), speaker=1))
    assert [(s.id, s.text) for s in builder.flush().changed] == [("seg-2", "oh really Yes.")]
    batch = builder.respeak({"seg-2": (0, False, None)})
    assert [(s.id, s.text, s.speaker_id) for s in batch.changed] == [
        ("seg-1", "So I went to the garage and oh really Yes.", 0)]
    assert batch.deleted_ids == ["seg-2"]


def test_a_split_part_does_not_fold_into_another_voices_unfinished_sentence():
    """radio_phonein through the gateway: Whisper wrote three speakers' 23 s without punctuation.
    A re-clustering split the segment along its voices, and rule (b) (an unfinished sentence, a
    lowercase continuation, under 1 s apart) folded each new part back into the segment before
    it, under that segment's label: the voices' words never showed under their own labels."""
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("they", 18.0, 18.3), ("get", 18.4, 18.6), ("cold", 18.7, 19.0), ("weather", 19.1, 19.6),
                       ("and", 19.8, 20.0), ("you", 20.1, 20.3), ("said", 20.4, 20.7), ("here", 20.8, 21.2),
                       ("i", 21.5, 21.7), ("mean", 21.8, 22.1), ("so", 22.2, 22.4), ("this", 22.5, 22.8),
                       speaker=2))
    assert [s.id for s in builder.flush().changed] == ["seg-0"]
    # The first re-clustering hears a second voice from "and" on: two parts, kept apart.
    builder.respeak({"seg-0": Split(((4, 2, False, None), (8, 1, False, None)))})
    assert [(s.id, s.speaker_id) for s in builder.segments] == [("seg-1", 2), ("seg-2", 1)]
    # The next one hears a third voice from "i" on: the second part is split again, and neither
    # of its parts joins the first voice's unfinished sentence.
    batch = builder.respeak({"seg-2": Split(((4, 1, False, None), (4, 3, False, None)))})
    assert batch.deleted_ids == ["seg-2"]
    assert [(s.text, s.speaker_id) for s in builder.segments] == [
        ("they get cold weather", 2), ("and you said here", 1), ("i mean so this", 3)]
    # A relabel that makes one voice of two neighbours still merges them (rule (a)).
    batch = builder.respeak({builder.segments[2].id: (1, False, None)})
    assert [(s.text, s.speaker_id) for s in builder.segments] == [
        ("they get cold weather", 2), ("and you said here i mean so this", 1)]


def test_a_split_that_does_not_match_the_words_relabels_the_whole_segment():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("One", 0.0, 0.4), ("two", 0.5, 0.9), ("three.", 1.0, 1.4), speaker=0))
    builder.flush()
    # Counts that do not add up to the segment's words (a stored segment has none): the part
    # with the most words decides, as for a segment read back from the store.
    batch = builder.respeak({"seg-0": Split(((1, 0, False, None), (3, 1, False, None)))})
    assert [(s.id, s.speaker_id) for s in batch.changed] == [("seg-0", 1)]
    assert not batch.deleted_ids


def test_a_speaker_a_person_named_survives_voice_matching_and_reclustering():
    """assign-bulk / speaker_assigned pin the segments: later automatic labels leave them alone."""
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hello.", 0.0, 0.5), speaker=0) + words(("Hi.", 1.0, 1.4), speaker=1))
    builder.flush()
    named = builder.relabel(1, is_user=True, person_id=None, segment_ids=["seg-1"], by_user=True)
    assert [(s.id, s.is_user) for s in named.changed] == [("seg-1", True)]
    assert not builder.relabel(1, is_user=False, person_id="p-7").changed         # a voice match
    assert not builder.respeak({"seg-1": (0, False, None)}).changed                # a re-clustering
    assert [(s.id, s.speaker_id, s.is_user) for s in builder.segments] == [("seg-0", 0, False), ("seg-1", 1, True)]


@pytest.mark.parametrize(
    "first, second",
    [
        ("I went to the", "Store yesterday."),   # capitalised: a new sentence
        ("I went there.", "and then left."),     # the first sentence was finished
        ("我去了商店。", "and then left."),        # a CJK full stop ends a sentence too
        ("I went to the", "商店。"),               # scripts without case never continue in lowercase
    ],
)
def test_other_speakers_stay_apart_without_a_lowercase_continuation(first, second):
    builder = SegmentBuilder()
    add(builder, words((first, 0.0, 1.0), speaker=0) + words((second, 1.2, 2.0), speaker=1))
    assert flush_texts(builder) == [first, second]


def test_the_first_letter_decides_a_continuation_not_leading_digits_or_quotes():
    builder = SegmentBuilder()
    add(builder, words(("Was it", 0.0, 1.0), speaker=0) + words(("42 apples?", 1.2, 2.0), speaker=1)
        + words(('"Yes', 9.0, 9.5), speaker=0) + words(('"really"', 9.6, 10.0), speaker=1))
    assert flush_texts(builder) == ["Was it 42 apples?", '"Yes "really"']


def test_segments_from_different_providers_never_merge():
    builder = SegmentBuilder()
    add(builder, words(("hello", 0.0, 0.5)), provider="deepgram")
    add(builder, words(("there", 0.6, 1.0)), provider="local")
    assert flush_texts(builder) == ["hello", "there"]
    assert [s.stt_provider for s in builder.segments] == ["deepgram", "local"]


@pytest.mark.parametrize("second_is_user, merged", [(True, True), (False, False)])
def test_the_owner_under_two_diarized_speakers_is_one_voice(second_is_user, merged):
    labels = {0: (True, None), 1: (second_is_user, None)}
    builder = SegmentBuilder()
    add(builder, words(("Hi.", 0.0, 0.5), speaker=0) + words(("Bye.", 0.7, 1.0), speaker=1),
        labels=labels.__getitem__)
    builder.flush()
    segments = builder.segments
    assert [s.text for s in segments] == (["Hi. Bye."] if merged else ["Hi.", "Bye."])
    assert segments[0].is_user is True and segments[0].speaker_id == 0


def test_segments_before_the_speech_profile_never_merge_with_later_ones():
    builder = SegmentBuilder()
    add(builder, words(("hello", 0.0, 0.5)), speech_profile_processed=False)
    builder.flush()
    add(builder, words(("there", 0.6, 1.0)), speech_profile_processed=True)
    builder.flush()
    assert [(s.text, s.speech_profile_processed) for s in builder.segments] == [
        ("hello", False), ("there", True)
    ]


# ---------------------------------------------------------------- ids, merge forward, deletions


def test_the_growing_tail_is_re_sent_with_the_same_id():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("So", 0.0, 0.2), ("I", 0.3, 0.4)))
    first = builder.flush()
    add(builder, words(("think", 0.5, 0.8), ("so.", 0.9, 1.2)))
    second = builder.flush()
    add(builder, words(("Right.", 9.0, 9.5)))
    third = builder.flush()
    assert [(s.id, s.text) for s in first.changed] == [("seg-0", "So I")]
    assert [(s.id, s.text, s.end) for s in second.changed] == [("seg-0", "So I think so.", 1.2)]
    assert [(s.id, s.text) for s in third.changed] == [("seg-1", "Right.")]
    assert not (first.deleted_ids or second.deleted_ids or third.deleted_ids)


def test_a_stored_conversation_is_merged_forward_across_reconnects():
    stored = [
        Segment("old-1", "Earlier.", 0, False, None, 0.0, 1.0, stt_provider="local"),
        Segment("old-2", "and so", 1, False, None, 50.0, 51.0, stt_provider="local"),
    ]
    builder = SegmentBuilder(stored, id_factory=counter_ids())
    add(builder, words(("on", 51.5, 52.3)))
    batch = builder.flush()
    assert [(s.id, s.text, s.end) for s in batch.changed] == [("old-2", "and so on", 52.3)]
    assert stored[1].text == "and so"  # the caller's objects are not mutated


def test_relabel_merges_owner_segments_and_reports_the_absorbed_id():
    owner = {0: (True, None)}
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hi.", 0.0, 0.5), speaker=0) + words(("Bye.", 1.0, 1.5), speaker=1)
        + words(("Later.", 3.0, 4.0), speaker=1), labels=lambda s: owner.get(s, (False, None)))
    builder.flush()
    assert [(s.id, s.text) for s in builder.segments] == [("seg-0", "Hi."), ("seg-1", "Bye. Later.")]

    batch = builder.relabel(1, is_user=True, person_id=None)
    assert [(s.id, s.text, s.is_user) for s in batch.changed] == [("seg-0", "Hi. Bye. Later.", True)]
    assert batch.deleted_ids == ["seg-1"]


def test_relabel_of_the_earlier_segment_also_merges_with_an_owner_segment_after_it():
    owner = {1: (True, None)}
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hi.", 0.0, 0.5), speaker=0) + words(("Bye.", 1.0, 1.5), speaker=1),
        labels=lambda s: owner.get(s, (False, None)))
    builder.flush()
    batch = builder.relabel(0, is_user=True, person_id=None, segment_ids=["seg-0"])
    assert [(s.id, s.text, s.speaker_id) for s in batch.changed] == [("seg-0", "Hi. Bye.", 0)]
    assert batch.deleted_ids == ["seg-1"]


def test_relabel_to_a_person_changes_only_that_speakers_segments():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hi.", 0.0, 0.5), speaker=0) + words(("Bye.", 1.0, 1.5), speaker=1))
    builder.flush()
    batch = builder.relabel(1, is_user=False, person_id="p-7")
    assert [(s.id, s.person_id) for s in batch.changed] == [("seg-1", "p-7")]
    assert batch.deleted_ids == []
    assert not builder.relabel(1, is_user=False, person_id="p-7")  # nothing new to send
    assert not builder.relabel(1, is_user=True, person_id=None, segment_ids=["seg-0"])  # not speaker 1


def test_a_batch_lists_its_segments_in_conversation_order_however_far_back_they_are():
    # Batches are gathered from the newest end of the conversation; a relabel touches old ones too.
    builder = SegmentBuilder(id_factory=counter_ids())
    for i in range(6):
        add(builder, words((f"Turn {i}.", 2.0 * i, 2.0 * i + 1.0), speaker=i % 2))
        builder.flush()
    batch = builder.relabel(0, is_user=False, person_id="p-1")
    assert [s.id for s in batch.changed] == ["seg-0", "seg-2", "seg-4"]
    add(builder, words(("Late.", 20.0, 20.5), speaker=0) + words(("Later.", 21.0, 21.5), speaker=1))
    assert [s.text for s in builder.flush().changed] == ["Late.", "Later."]


def test_relabel_also_labels_words_still_waiting_for_the_flush():
    builder = SegmentBuilder()
    add(builder, words(("Bye.", 1.0, 1.5), speaker=1))
    assert not builder.relabel(1, is_user=True, person_id=None)
    (segment,) = builder.flush().changed
    assert segment.is_user is True


def test_batches_hold_snapshots_not_live_segments():
    builder = SegmentBuilder()
    add(builder, words(("Hello", 0.0, 0.5)))
    (sent,) = builder.flush().changed
    add(builder, words(("there", 0.6, 1.0)))
    builder.flush()
    assert sent.text == "Hello"
    builder.segments[0].text = "tampered"
    assert builder.segments[0].text == "Hello there"


# ---------------------------------------------------------------- time monotonicity


def test_a_late_overlapping_word_is_clamped_after_the_stored_segment():
    builder = SegmentBuilder()
    add(builder, words(("Finished.", 0.0, 2.0)))
    builder.flush()
    add(builder, words(("Other.", 1.5, 1.8), speaker=1))
    builder.flush()
    assert [(s.text, s.start, s.end) for s in builder.segments] == [
        ("Finished.", 0.0, 2.0), ("Other.", 2.0, 2.0)
    ]


# ---------------------------------------------------------------- custom_stt suggested segments


def test_suggested_segments_accept_every_speaker_spelling_and_skip_junk():
    builder = SegmentBuilder()
    builder.add_suggested(
        [
            {"text": "One.", "start": 0.0, "end": 1.0, "speaker": "SPEAKER_01"},
            {"text": "Two.", "start": 1.0, "end": 2.0, "speaker": 2, "is_user": True},
            {"text": "Three.", "start": 2.0, "end": 3.0},
            {"text": "no times"},
            {"text": "Bad.", "start": float("nan"), "end": 1.0},
            {"text": 5, "start": 0.0, "end": 1.0},
            "not an object",
            {"text": "Four.", "start": 6.0, "end": 5.0, "speaker": "junk"},
        ],
        provider="on-device-whisper",
        time_offset=10.0,
    )
    batch = builder.flush()
    assert [(s.text, s.speaker_id, s.is_user, s.start, s.end, s.stt_provider) for s in batch.changed] == [
        ("One.", 1, False, 10.0, 11.0, "on-device-whisper"),
        ("Two.", 2, True, 11.0, 12.0, "on-device-whisper"),
        ("Three.", 0, False, 12.0, 13.0, "on-device-whisper"),
        ("Four.", 0, False, 16.0, 16.0, "on-device-whisper"),
    ]


def test_suggested_segments_go_through_the_same_merge():
    builder = SegmentBuilder()
    builder.add_suggested([{"text": "so we", "start": 0, "end": 1}], provider="app")
    builder.flush()
    builder.add_suggested([{"text": "agreed .", "start": 1.5, "end": 2, "speaker": 1}], provider="app")
    batch = builder.flush()
    assert [s.text for s in batch.changed] == ["so we agreed."]


# ---------------------------------------------------------------- wire and storage forms


def test_hand_over_moves_what_the_store_lacks_to_a_new_conversation_and_rebases_times():
    """A newer connection took the conversation over: what this writer had not stored moves on
    (a segment never saved whole, a saved one's growth since), under new ids, times from 0; the
    words still buffered come along; nothing the store holds is moved twice."""
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Saved", 10.0, 10.4), ("before.", 10.5, 10.9)))
    saved = builder.flush().changed
    stored = {s.id: (s.text, s.end) for s in saved}
    add(builder, words(("And", 11.0, 11.2), ("more", 11.3, 11.6)))           # grows the saved tail
    add(builder, words(("Another", 12.0, 12.5), ("voice.", 12.6, 13.0), speaker=1))
    builder.flush()                                                        # this batch was refused
    add(builder, words(("still", 13.5, 13.9), ("buffered", 14.0, 14.4), speaker=1))

    batch, shift = builder.hand_over(stored)
    assert shift == 10.9
    assert [(s.text, s.speaker, round(s.start, 3), round(s.end, 3)) for s in batch.changed] == [
        ("And more", "SPEAKER_00", 0.0, 0.7), ("Another voice.", "SPEAKER_01", 1.1, 2.1)]
    assert {s.id for s in batch.changed}.isdisjoint(stored)
    assert [s.text for s in builder.segments] == ["And more", "Another voice."]
    later = builder.flush()                      # the buffered words join, in the new time
    assert [(s.text, round(s.start, 3)) for s in later.changed] == [("Another voice. still buffered", 1.1)]


def test_hand_over_strips_a_stored_segment_that_was_merged_into_its_neighbour():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("I", 0.0, 0.2), ("agree.", 0.3, 0.6)))
    add(builder, words(("So", 0.8, 0.9), ("do", 1.0, 1.1), ("we.", 1.2, 1.4), speaker=1))
    stored = {s.id: (s.text, s.end) for s in builder.flush().changed}
    builder.relabel(0, is_user=True, person_id=None)
    relabel = builder.relabel(1, is_user=True, person_id=None)        # both the owner: one segment
    assert relabel.deleted_ids == ["seg-1"]
    add(builder, words(("Then", 2.0, 2.3), speaker=1))
    builder.flush()
    batch, shift = builder.hand_over(stored)
    assert [s.text for s in batch.changed] == ["Then"] and shift == 2.0


def test_hand_over_with_everything_stored_moves_nothing():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("All", 0.0, 0.3), ("saved.", 0.4, 0.8)))
    stored = {s.id: (s.text, s.end) for s in builder.flush().changed}
    batch, shift = builder.hand_over(stored)
    assert not batch and shift is None and builder.segments == []


def test_wire_form_is_exactly_the_protocol_element():
    segment = Segment("id-1", "Hello there.", 0, True, None, 0.0, 1.5, stt_provider="local")
    assert segment.to_wire() == {
        "id": "id-1", "text": "Hello there.", "speaker": "SPEAKER_00", "speaker_id": 0,
        "is_user": True, "person_id": None, "start": 0.0, "end": 1.5,
        "speech_profile_processed": True, "stt_provider": "local", "translations": [],
    }
    assert Segment("x", "", 12, False, None, 0, 0).speaker == "SPEAKER_12"
    assert Segment("x", "", 123, False, None, 0, 0).speaker == "SPEAKER_123"


def test_stored_form_has_protocol_keys_and_round_trips():
    segment = Segment("id-2", "Hola.", 3, False, "p-1", 4.25, 5.5, speech_profile_processed=False,
                      stt_provider="soniox", translations=[{"lang": "en", "text": "Hello."}])
    stored = segment.to_stored()
    assert {"id", "text", "speaker", "speakerId", "speaker_id", "is_user", "person_id", "start", "end"} <= set(stored)
    assert (stored["speaker"], stored["speakerId"], stored["speaker_id"]) == ("SPEAKER_03", 3, 3)
    assert Segment.from_stored(stored) == segment
    assert Segment.from_stored(segment.to_wire()) == segment


def test_omi_era_stored_rows_without_newer_keys_still_load():
    segment = Segment.from_stored({"id": "a", "text": "Hi", "speaker": "SPEAKER_02", "is_user": False,
                                   "start": 1, "end": 2})
    assert (segment.speaker_id, segment.stt_provider, segment.speech_profile_processed) == (2, None, True)


# ---------------------------------------------------------------- properties over random streams

TOKEN = re.compile(r"[wW]\d+")

def word_specs(gaps):
    return st.tuples(
        st.integers(0, 2),                                      # speaker
        st.sampled_from(gaps),                                  # gap before the word (may overlap)
        st.sampled_from([0.0, 0.2, 0.5]),                       # duration
        st.booleans(),                                          # capitalised
        st.sampled_from(["", "", ",", ".", "?", "!", "。", " ,"]),  # trailing punctuation
        st.sampled_from([0, 0, 0, 40, 130]),                    # padding (for the 125-char rule)
    )


def operations(word_spec, providers, offsets, profile_flags):
    relabel = st.tuples(st.just("relabel"), st.integers(0, 2), st.sampled_from([True, True, False]),
                        st.sampled_from([None, "p-1", "p-2"]), st.booleans())
    return st.one_of(
        st.tuples(st.just("words"), st.lists(word_spec, max_size=6), st.sampled_from(providers),
                  st.sampled_from(offsets), st.sampled_from(profile_flags)),
        st.tuples(st.just("suggested"), st.lists(word_spec, min_size=1, max_size=3)),
        st.tuples(st.just("flush")),
        relabel,
        relabel,  # twice as likely: owner identification is what makes sent segments merge
    )


# Everything varies: overlaps, long pauses, provider switches, offsets, profile switch.
any_stream = operations(word_specs([-0.5, 0.0, 0.1, 0.3, 1.0, 2.9, 3.1, 6.0]),
                        ["local", "local", "deepgram"], [0.0, 0.0, 5.0], [True, True, False])
# One provider, short pauses, several speakers: the streams where relabels merge sent segments.
relabel_stream = operations(word_specs([0.0, 0.1, 0.5]), ["local"], [0.0], [True])


def spec_mergeable(a: dict, b: dict) -> bool:
    """The merge rule restated from the brief, independently of the implementation."""
    if a["stt_provider"] != b["stt_provider"] or a["speech_profile_processed"] != b["speech_profile_processed"]:
        return False
    ended = a["text"][-1:] in ENDERS
    same = a["speaker_id"] == b["speaker_id"] or (a["is_user"] and b["is_user"])
    if same and b["start"] - a["end"] < 3 and (len(a["text"]) < 125 or not ended):
        return True
    letters = [c for c in b["text"] if c.isalpha()]
    continues = not ended and bool(letters) and letters[0].islower()
    return continues and b["start"] - a["end"] < 1.0     # one voice past 3 s, or another voice: no


class Driver:
    """Runs operations on a builder while keeping a client's view (upsert by id) beside it."""

    def __init__(self) -> None:
        self.builder = SegmentBuilder(id_factory=counter_ids())
        self.client: dict[str, dict] = {}
        self.deleted: set[str] = set()
        self.identity: dict[int, tuple[bool, str | None]] = {}
        self.pending: list[tuple[float, str]] = []
        self.expected: list[str] = []  # piece texts in the order they must appear
        self.clock = 0.0
        self.tokens = itertools.count()

    def piece(self, spec) -> tuple[str, float, float, int]:
        speaker, gap, duration, capital, punct, pad = spec
        token = f"{'W' if capital else 'w'}{next(self.tokens)}{'z' * pad}{punct}"
        start = max(self.clock + gap, 0.0)
        self.clock = start + duration
        return token, start, start + duration, speaker

    def run(self, op) -> None:
        kind = op[0]
        if kind == "words":
            _, specs, provider, offset, spp = op
            ws = [Word(t, s, e, spk) for t, s, e, spk in map(self.piece, specs)]
            self.builder.add_words(ws, provider=provider, time_offset=offset, speech_profile_processed=spp,
                                   speaker_labels=lambda spk: self.identity.get(spk, (False, None)))
            self.pending += [(w.start + offset, w.text) for w in ws]
        elif kind == "suggested":
            pieces = [self.piece(spec) for spec in op[1]]
            text = " ".join(p[0] for p in pieces)
            self.builder.add_suggested([{"text": text, "start": pieces[0][1], "end": pieces[-1][2],
                                         "speaker": f"SPEAKER_{pieces[0][3]:02d}"}], provider="app")
            self.pending.append((pieces[0][1], text))
        elif kind == "flush":
            self.expected += [text for _, text in sorted(self.pending, key=lambda p: p[0])]
            self.pending = []
            self.check(self.builder.flush())
        else:
            _, speaker, is_user, person_id, by_ids = op
            ids = [s.id for s in self.builder.segments if s.speaker_id == speaker] if by_ids else None
            if not by_ids:
                self.identity[speaker] = (is_user, person_id)
            self.check(self.builder.relabel(speaker, is_user=is_user, person_id=person_id, segment_ids=ids))
            for s in self.builder.segments:
                if s.speaker_id == speaker:
                    assert (s.is_user, s.person_id) == (is_user, person_id)

    def check(self, batch: Batch) -> None:
        before = self.client
        now = {s.id: s.to_wire() for s in self.builder.segments}
        changed_ids = [s.id for s in batch.changed]
        order = list(now)
        # `changed` is exactly what differs from the client's view, in time order, once each.
        assert changed_ids == [i for i in order if before.get(i) != now[i]]
        assert all(before.get(s.id) != s.to_wire() for s in batch.changed)
        assert sorted(batch.deleted_ids) == sorted(set(before) - set(now))
        # Deleted ids never come back; surviving ids keep naming the same, only-growing segment.
        assert not self.deleted & set(now)
        self.deleted |= set(batch.deleted_ids)
        for i in set(before) & set(now):
            assert now[i]["text"].startswith(before[i]["text"])
            assert (now[i]["start"], now[i]["speaker_id"]) == (before[i]["start"], before[i]["speaker_id"])
        # Applying the batch the way a client does reproduces the conversation exactly.
        client = {**before, **{s.id: s.to_wire() for s in batch.changed}}
        for i in batch.deleted_ids:
            del client[i]
        assert client == now
        self.client = client
        self.check_conversation(list(now.values()))

    def check_conversation(self, segments: list[dict]) -> None:
        for a, b in zip(segments, segments[1:]):
            assert b["start"] >= a["end"] - 1e-9, "times go backwards"
            assert not spec_mergeable(a, b), f"left unmerged: {a['text']!r} | {b['text']!r}"
        assert all(s["start"] <= s["end"] for s in segments)
        text = " ".join(s["text"] for s in segments)
        expected = " ".join(self.expected)
        assert TOKEN.findall(text) == TOKEN.findall(expected), "a word was lost, doubled or moved"
        assert re.sub(r"\s", "", text) == re.sub(r"\s", "", expected)


@pytest.mark.parametrize("stream", [any_stream, relabel_stream], ids=["any", "relabels"])
def test_random_streams_keep_every_word_and_every_id_promise(stream):
    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(stream, max_size=25))
    def run(ops):
        driver = Driver()
        for op in ops:
            driver.run(op)
        driver.run(("flush",))
        assert not driver.builder.flush()

    run()


# ---------------------------------------------------------------- provisional words


def partial(builder, ws, provider="local"):
    builder.set_partial(ws, provider=provider)


def client_view(batches, view=None):
    """Apply batches as the app does (upsert by id, delete by id): id → text."""
    view = {} if view is None else view
    for batch in batches:
        for segment_id in batch.client_deleted_ids:
            view.pop(segment_id, None)
        for segment in batch.client_segments:
            view[segment.id] = segment.text
    return view


def test_provisional_words_grow_the_tail_for_the_client_but_are_never_stored():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hello", 0.0, 0.4), ("there.", 0.5, 0.9)))
    first = builder.flush()
    partial(builder, words(("How", 1.5, 1.7), ("are", 1.8, 2.0)))
    second = builder.flush()
    # The client sees the tail grow in place; the store is told nothing.
    assert [(s.id, s.text) for s in second.client_segments] == [("seg-0", "Hello there. How are")]
    assert second.changed == [] and second.deleted_ids == []
    assert [s.text for s in builder.segments] == ["Hello there."]
    # The final words replace the provisional ones (here differing from them).
    add(builder, words(("How", 1.5, 1.7), ("are", 1.8, 2.0), ("you?", 2.1, 2.4)))
    partial(builder, [])
    third = builder.flush()
    assert [(s.id, s.text) for s in third.changed] == [("seg-0", "Hello there. How are you?")]
    assert [(s.id, s.text) for s in third.client_segments] == [("seg-0", "Hello there. How are you?")]
    assert client_view([first, second, third]) == {"seg-0": "Hello there. How are you?"}
    assert not builder.flush()


def test_a_provisional_segment_keeps_its_id_when_its_final_words_come():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hello.", 0.0, 0.4)))
    first = builder.flush()
    partial(builder, words(("Next", 10.0, 10.3)))            # 3 s past the tail: a segment of its own
    second = builder.flush()
    provisional_id = second.client_segments[0].id
    assert provisional_id != "seg-0" and second.changed == []
    partial(builder, words(("Next", 10.0, 10.3), ("one", 10.4, 10.6)))
    third = builder.flush()
    assert [(s.id, s.text) for s in third.client_segments] == [(provisional_id, "Next one")]
    add(builder, words(("Next", 10.0, 10.3), ("one.", 10.4, 10.6)))
    partial(builder, [])
    fourth = builder.flush()
    assert [(s.id, s.text) for s in fourth.changed] == [(provisional_id, "Next one.")]
    assert fourth.client_deleted_ids == []
    assert client_view([first, second, third, fourth]) == {"seg-0": "Hello.", provisional_id: "Next one."}


def test_withdrawn_provisional_words_disappear_from_the_client():
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hello.", 0.0, 0.4)))
    batches = [builder.flush()]
    partial(builder, words(("Um", 10.0, 10.3)))
    batches.append(builder.flush())
    partial(builder, [])                                       # the utterance was dropped
    batches.append(builder.flush())
    assert batches[-1].withdrawn_ids and batches[-1].changed == [] and batches[-1].deleted_ids == []
    partial(builder, words(("Yes", 1.0, 1.3)))                 # onto the tail this time
    batches.append(builder.flush())
    partial(builder, [])
    batches.append(builder.flush())
    assert client_view(batches) == {"seg-0": "Hello."}
    assert [s.text for s in batches[-1].client_segments] == ["Hello."] and batches[-1].changed == []


def test_final_words_of_another_engine_drop_the_provisional_ones():
    builder = SegmentBuilder(id_factory=counter_ids())
    partial(builder, words(("Maybe", 0.0, 0.3)), provider="local")
    batches = [builder.flush()]
    add(builder, words(("Hello.", 0.0, 0.4)), provider="deepgram")
    batches.append(builder.flush())
    assert client_view(batches) == {batches[-1].changed[0].id: "Hello."}


# ---------------------------------------------------------------- a cloud engine's words before their voice


def shown_first(builder, ws, provider="deepgram"):
    builder.set_provisional([(w, provider) for w in ws], speaker_labels=lambda s: (s == 0, None))


def wire_view(batches, view=None):
    """Apply batches as the app does: id → (text, speaker_id, is_user)."""
    view = {} if view is None else view
    for batch in batches:
        for segment_id in batch.client_deleted_ids:
            view.pop(segment_id, None)
        for segment in batch.client_segments:
            view[segment.id] = (segment.text, segment.speaker_id, segment.is_user)
    return view


def test_words_shown_before_the_voice_decides_are_moved_by_id_when_it_does():
    builder = SegmentBuilder(id_factory=counter_ids())
    builder.add_words(words(("Hello", 0.0, 0.4), ("there.", 0.5, 0.9)), provider="deepgram",
                      speaker_labels=lambda s: (s == 0, None))
    batches = [builder.flush()]
    # The engine heard the same speaker go on: shown on the owner's segment, stored nowhere.
    shown_first(builder, words(("How", 1.5, 1.7), ("are", 1.8, 2.0), ("you?", 2.1, 2.4)))
    batches.append(builder.shown())
    assert wire_view(batches) == {"seg-0": ("Hello there. How are you?", 0, True)}
    assert batches[-1].changed == [] and [s.text for s in builder.segments] == ["Hello there."]
    # The voice says it was someone else: the owner's segment goes back to what it was, the
    # words get a segment and a speaker of their own, and only that reaches the store.
    builder.add_words(words(("How", 1.5, 1.7), ("are", 1.8, 2.0), ("you?", 2.1, 2.4), speaker=1),
                      provider="deepgram", speaker_labels=lambda s: (s == 0, None))
    shown_first(builder, [])
    batches.append(builder.flush())
    assert [(s.text, s.speaker_id, s.is_user) for s in batches[-1].changed] == [("How are you?", 1, False)]
    assert wire_view(batches) == {"seg-0": ("Hello there.", 0, True), "seg-1": ("How are you?", 1, False)}
    assert not builder.flush()


def test_words_of_several_speakers_shown_at_once_keep_their_ids_when_final():
    builder = SegmentBuilder(id_factory=counter_ids())
    first, second = words(("Yes.", 0.0, 0.4)), words(("No", 0.6, 0.9), ("way.", 1.0, 1.3), speaker=1)
    shown_first(builder, first + second)
    batches = [builder.shown()]
    shown_ids = [s.id for s in batches[0].client_segments]
    assert [(s.text, s.speaker_id) for s in batches[0].client_segments] == [("Yes.", 0), ("No way.", 1)]
    # The voice agrees about the first, the second is still undecided.
    builder.add_words(first, provider="deepgram")
    shown_first(builder, second)
    batches.append(builder.flush())
    assert [s.id for s in batches[-1].changed] == shown_ids[:1]
    builder.add_words(second, provider="deepgram")
    shown_first(builder, [])
    batches.append(builder.flush())
    assert [s.id for s in batches[-1].changed] == shown_ids[1:] and not batches[-1].client_deleted_ids
    assert wire_view(batches) == {shown_ids[0]: ("Yes.", 0, False), shown_ids[1]: ("No way.", 1, False)}


def test_a_takeover_withdraws_what_was_shown_before_the_voice_decided():
    builder = SegmentBuilder(id_factory=counter_ids())
    builder.add_words(words(("Hello.", 0.0, 0.4)), provider="deepgram")
    batches = [builder.flush()]
    stored = {"seg-0": ("Hello.", 0.4)}
    shown_first(builder, words(("Next", 10.0, 10.3)))              # a segment of its own
    batches.append(builder.shown())
    assert len(wire_view(batches)) == 2
    moved, _ = builder.hand_over(stored)
    batches.append(moved)
    assert wire_view(batches) == {"seg-0": ("Hello.", 0, False)}


def test_a_flush_followed_by_a_relabel_still_shows_the_provisional_words():
    # The session sends a flush and the re-clustering's relabel after it as one batch (Batch.then):
    # what the flush had for the client only (provisional words, a withdrawal) must not be lost.
    builder = SegmentBuilder(id_factory=counter_ids())
    add(builder, words(("Hello.", 0.0, 0.4)))
    batches = [builder.flush()]
    partial(builder, words(("Next", 10.0, 10.3)))            # 3 s past the tail: a segment of its own
    flushed = builder.flush()
    relabel = builder.respeak({"seg-0": (2, False, None)})
    batches.append(flushed.then(relabel))
    assert wire_view(batches) == {"seg-0": ("Hello.", 2, False), "seg-1": ("Next", 0, False)}
    partial(builder, [])
    batches.append(builder.flush().then(builder.respeak({"seg-0": (3, False, None)})))
    assert wire_view(batches) == {"seg-0": ("Hello.", 3, False)}


def test_a_takeover_withdraws_a_shown_segment_whose_final_words_were_not_stored():
    # The voice decided and the final words took the id the client saw them under, but the store
    # refused that batch (another connection took the conversation over): in the new
    # conversation they are under a new id, and the one the client saw, stored nowhere, is gone.
    builder = SegmentBuilder(id_factory=counter_ids())
    builder.add_words(words(("Hello.", 0.0, 0.4)), provider="deepgram")
    batches = [builder.flush()]
    shown_first(builder, words(("Next", 10.0, 10.3)))
    batches.append(builder.shown())
    builder.add_words(words(("Next", 10.0, 10.3)), provider="deepgram")
    shown_first(builder, [])
    assert [s.id for s in builder.flush().changed] == ["seg-1"]            # refused by the store: not sent
    moved, _ = builder.hand_over({"seg-0": ("Hello.", 0.4)})
    batches.append(moved)
    assert [(s.id, s.text) for s in moved.changed] == [("seg-2", "Next")]
    assert wire_view(batches) == {"seg-0": ("Hello.", 0, False), "seg-2": ("Next", 0, False)}
