"""Conversation processing: the model path against a fake OpenAI-compatible server on loopback,
and the offline summariser on the development transcripts."""

from __future__ import annotations

import csv
import re
import time
from pathlib import Path

import orjson
import pytest

from harken.config import Settings
from harken.conversations.llm import STRUCTURED_SCHEMA, ChatSummariser
from harken.conversations.processing import ConversationProcessor
from harken.conversations.summarise import PROCESSOR as OFFLINE
from harken.conversations.summarise import summarise
from tests.fakes.llm import HANG, FakeChatServer
from tests.test_store import segment

TRANSCRIPTS = Path(__file__).parent / "data" / "audio" / "transcripts.tsv"

VALID = {
    "title": "Planning the design review",
    "overview": "The team agreed to meet with design next Tuesday.",
    "emoji": "📅",
    "category": "work",
    "action_items": [{"description": "Schedule the design review", "completed": False}],
    "events": [{"title": "Design review", "description": "With the design team",
                "start": "2025-01-07T15:00:00Z", "duration": 60}],
}
SPEECH = [segment("s1", "Please schedule a meeting with the design team for next Tuesday.", 0.0, 4.0),
          segment("s2", "Sure, I will send the invite today.", 4.5, 7.0)]


def references() -> dict[str, str]:
    with open(TRANSCRIPTS, newline="") as f:
        return {row["file"]: row["reference"] for row in csv.DictReader(f, delimiter="\t")}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


async def summarise_with(script: list, *, timeout: float = 5.0, segments=SPEECH):
    server = await FakeChatServer(script).start()
    processor = ConversationProcessor(ChatSummariser(server.api_base, "fake-model", api_key="sk-test",
                                                     timeout=timeout))
    try:
        structured, discarded = await processor.structure(segments, language="en",
                                                          started_at_iso="2025-01-02T10:00:00+00:00")
    finally:
        await processor.aclose()
        await server.stop()
    return structured, discarded, server


# --- with a language model -------------------------------------------------------------------------

@pytest.mark.timeout(20)
async def test_a_valid_model_answer_becomes_the_summary():
    structured, discarded, server = await summarise_with([orjson.dumps(VALID).decode()])
    assert not discarded
    expected = {**VALID, "events": [{**VALID["events"][0], "created": False}], "processor": "llm:fake-model"}
    assert structured == expected
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = orjson.loads(request.body)
    assert body["model"] == "fake-model"
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == STRUCTURED_SCHEMA
    asked = "\n".join(m["content"] for m in body["messages"])
    assert "Please schedule a meeting with the design team" in asked and "2025-01-02T10:00:00" in asked


@pytest.mark.timeout(20)
async def test_an_invalid_answer_is_retried_with_the_error_shown():
    structured, _, server = await summarise_with(["Sure! Here is your summary: {title: oops",
                                                  orjson.dumps(VALID).decode()])
    assert structured["processor"] == "llm:fake-model" and structured["title"] == VALID["title"]
    first, second = server.json_bodies()
    assert len(second["messages"]) == len(first["messages"]) + 2
    assert "invalid" in second["messages"][-1]["content"] and "not JSON" in second["messages"][-1]["content"]


@pytest.mark.timeout(20)
async def test_an_overloaded_endpoint_is_retried():
    structured, _, server = await summarise_with([503, orjson.dumps(VALID).decode()])
    assert structured["processor"] == "llm:fake-model" and len(server.requests) == 2


@pytest.mark.timeout(20)
async def test_answers_that_break_the_schema_twice_fall_back_to_the_offline_summary():
    wrong = {**VALID, "category": "astrology"}
    missing = {k: v for k, v in VALID.items() if k != "title"}
    structured, _, server = await summarise_with([orjson.dumps(wrong).decode(), orjson.dumps(missing).decode()])
    assert len(server.requests) == 2
    assert structured["processor"] == OFFLINE
    assert "no valid answer" in structured["fallback_reason"] and "title" in structured["fallback_reason"]
    assert structured["title"] == "Please schedule a meeting with the design team"


@pytest.mark.timeout(20)
async def test_a_model_that_does_not_answer_in_time_falls_back_and_says_so():
    t0 = time.monotonic()
    structured, _, _ = await summarise_with([HANG], timeout=0.5)
    assert time.monotonic() - t0 < 3
    assert structured["processor"] == OFFLINE
    assert structured["fallback_reason"] == "llm:fake-model: no answer within 0.5s"
    assert structured["action_items"][0]["description"].startswith("Schedule a meeting with the design team")


@pytest.mark.timeout(20)
async def test_a_very_short_conversation_is_discarded_without_asking_the_model():
    structured, discarded, server = await summarise_with([orjson.dumps(VALID).decode()],
                                                         segments=[segment("s1", "see you tomorrow", 0.0, 1.0)])
    assert discarded and server.requests == []
    assert structured["processor"] == OFFLINE and structured["title"] == "See you tomorrow"
    long_but_brief = [segment("s1", "one two three four five six", 0.0, 2.0)]   # 6 words in 2 s
    assert ConversationProcessor.is_too_short(long_but_brief)


def test_the_model_is_used_only_when_configured(tmp_path):
    assert ConversationProcessor.from_settings(Settings(data_dir=tmp_path)).llm is None
    configured = ConversationProcessor.from_settings(Settings(data_dir=tmp_path, llm_base_url="http://127.0.0.1:9/v1",
                                                              llm_model="m", llm_api_key="k"))
    assert configured.llm is not None and configured.llm.url == "http://127.0.0.1:9/v1/chat/completions"


# --- offline -----------------------------------------------------------------------------------------

def test_offline_titles_and_overviews_come_from_each_transcript():
    for name, text in references().items():
        structured = summarise([segment("s", text, 0.0, 5.0)])
        title_words = words(structured["title"])
        assert title_words and " ".join(title_words) in " ".join(words(text)), name
        assert words(structured["overview"]) == words(text), name
        assert structured["processor"] == OFFLINE and structured["events"] == []


def test_offline_action_items_are_the_commitments_and_only_those():
    refs = references()
    found = {name: summarise([segment("s", text, 0.0, 5.0)])["action_items"] for name, text in refs.items()}
    assert found.pop("espeak_01.wav") == [{"description": "Schedule a meeting with the design team for next "
                                                          "Tuesday at three in the afternoon", "completed": False}]
    assert found.pop("espeak_05.wav") == [{"description": "Call my sister when I get home tonight",
                                           "completed": False}]
    assert all(items == [] for items in found.values()), found


def test_offline_summary_of_a_whole_session_picks_its_own_sentences():
    refs = references()
    segments = [segment(f"s{i}", text, 5.0 * i, 5.0 * i + 4) for i, text in enumerate(refs.values())]
    structured = summarise(segments)
    spoken = [" ".join(words(t)) for t in refs.values()]
    picked = [" ".join(words(s)) for s in structured["overview"].split(". ") if s]
    assert 1 <= len(picked) <= 3 and all(p in spoken for p in picked)
    assert [i["description"].split()[0] for i in structured["action_items"]] == ["Schedule", "Call"]
    assert " ".join(words(structured["title"])) in " ".join(spoken)
