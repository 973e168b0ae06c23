"""Which providers transcribe which language, in which order (Omi's tables, Harken's rules)."""

from __future__ import annotations

import pytest

from harken.config import Settings
from harken.stt import FallbackPolicy, NoProviderError, Provider, StreamConfig, build_providers, select_chain
from harken.stt.speechmatics import SpeechmaticsProvider

# Omi's tables (backend/utils/stt/streaming.py), written out again here as the specification the
# selection is checked against.
EN = ["en", "en-US", "en-AU", "en-GB", "en-IN", "en-NZ"]
OMI_N3M = {"multi", *EN, "es", "es-419", "fr", "fr-CA", "de", "hi", "ru", "pt", "pt-BR", "pt-PT", "ja", "it", "nl"}
OMI_N3 = {"bg", "ca", "cs", "da", "da-DK", "nl", *EN, "et", "fi", "nl-BE", "fr", "fr-CA", "de", "de-CH", "el",
          "hi", "hu", "id", "it", "ja", "ko", "ko-KR", "lv", "lt", "ms", "no", "pl", "pt", "pt-BR", "pt-PT", "ro",
          "ru", "sk", "es", "es-419", "sv", "sv-SE", "tr", "uk", "vi"}
OMI_N2 = {"zh", "zh-CN", "zh-Hans", "zh-TW", "zh-Hant", "zh-HK", "th", "th-TH"}
OMI_N2M = {"multi", *EN, "es", "es-419"}
OMI_SONIOX = {"multi", "en", "af", "sq", "ar", "az", "eu", "be", "bn", "bs", "bg", "ca", "zh", "hr", "cs", "da",
              "nl", "et", "fi", "fr", "gl", "de", "el", "gu", "he", "hi", "hu", "id", "it", "ja", "kn", "kk", "ko",
              "lv", "lt", "mk", "ms", "ml", "mr", "no", "fa", "pl", "pt", "pa", "ro", "ru", "sr", "sk", "sl", "es",
              "sw", "sv", "tl", "ta", "te", "th", "tr", "uk", "ur", "vi", "cy"}
ALL_LANGUAGES = sorted(OMI_N3M | OMI_N3 | OMI_N2 | OMI_N2M | OMI_SONIOX | {"auto"})

KEYS = dict(deepgram_api_key="dg", soniox_api_key="sx", speechmatics_api_key="sm")


class EnglishOnlyEngine(Provider):
    """Stands in for the embedded engine's language support (tiny.en: English only)."""

    name = "local"

    def supports(self, language: str) -> bool:
        return language.split("-")[0] == "en"

    async def open(self, config: StreamConfig):
        raise NotImplementedError


_BUILT: dict[tuple, dict[str, Provider]] = {}


def providers_for(settings: Settings, local: bool = True) -> dict[str, Provider]:
    # Built once per key set: a Soniox client sets up an HTTPS client (and its certificates).
    keys = (settings.deepgram_api_key, settings.soniox_api_key, settings.speechmatics_api_key)
    if keys not in _BUILT:
        _BUILT[keys] = build_providers(settings)
    providers = dict(_BUILT[keys])
    if local:
        providers["local"] = EnglishOnlyEngine()
    return providers


def chain(language, settings, stt_service=None, local=True) -> list[tuple[str, str, str | None]]:
    links = select_chain(language, stt_service, providers_for(settings, local), settings)
    return [(link.name, link.overrides["language"], link.overrides.get("extra", {}).get("model")) for link in links]


def expected_chain(language: str, keys: set[str], local: bool = True) -> list[tuple[str, str, str | None]]:
    """Omi's tables read the Harken way: every matching provider in stt_chain order, one link each."""
    language = "multi" if language == "auto" else language
    out = []
    if "soniox" in keys and (language == "multi" or language.split("-")[0] in OMI_SONIOX):
        out.append(("soniox", language, None))
    if "deepgram" in keys:
        if language in OMI_N3M or language in OMI_N3:
            out.append(("deepgram", language, "nova-3"))
        elif language in OMI_N2 or language in OMI_N2M:
            out.append(("deepgram", language, "nova-2-general"))
    if "speechmatics" in keys and SpeechmaticsProvider(Settings()).supports(language):
        out.append(("speechmatics", language, None))
    if local and language.split("-")[0] == "en":
        out.append(("local", language, None))
    return out


@pytest.mark.parametrize("language", ALL_LANGUAGES)
def test_every_language_of_omis_tables_gets_its_chain_with_all_keys(language):
    assert chain(language, Settings(**KEYS)) == expected_chain(language, {"deepgram", "soniox", "speechmatics"})


@pytest.mark.parametrize("language", ALL_LANGUAGES)
@pytest.mark.parametrize("keys", [{"deepgram"}, {"soniox"}, {"speechmatics"}, {"deepgram", "speechmatics"}])
def test_providers_without_keys_are_left_out(language, keys):
    settings = Settings(**{k: v for k, v in KEYS.items() if k.split("_")[0] in keys})
    expected = expected_chain(language, keys)
    if expected:
        assert chain(language, settings) == expected
    else:
        with pytest.raises(NoProviderError, match=language if language != "auto" else "multi"):
            chain(language, settings)


@pytest.mark.parametrize("language, expected", [
    ("en", [("soniox", "en", None), ("deepgram", "en", "nova-3"), ("speechmatics", "en", None), ("local", "en", None)]),
    ("multi", [("soniox", "multi", None), ("deepgram", "multi", "nova-3")]),
    ("auto", [("soniox", "multi", None), ("deepgram", "multi", "nova-3")]),
    ("zh", [("soniox", "zh", None), ("deepgram", "zh", "nova-2-general"), ("speechmatics", "zh", None)]),
    ("zh-hant", [("soniox", "zh-Hant", None), ("deepgram", "zh-Hant", "nova-2-general"),
                 ("speechmatics", "zh-Hant", None)]),
    ("th-TH", [("soniox", "th-TH", None), ("deepgram", "th-TH", "nova-2-general"), ("speechmatics", "th-TH", None)]),
    ("af", [("soniox", "af", None)]),
    ("yue", [("speechmatics", "yue", None)]),
    ("en-gb", [("soniox", "en-GB", None), ("deepgram", "en-GB", "nova-3"), ("speechmatics", "en-GB", None),
               ("local", "en-GB", None)]),
    ("de-CH", [("soniox", "de-CH", None), ("deepgram", "de-CH", "nova-3"), ("speechmatics", "de-CH", None)]),
])
def test_hand_checked_chains(language, expected):
    assert chain(language, Settings(**KEYS)) == expected


def test_a_language_nobody_speaks_names_itself_in_the_error():
    with pytest.raises(NoProviderError, match="The language is not supported: xx-YY") as caught:
        chain("xx-YY", Settings(**KEYS))
    assert caught.value.language == "xx-YY"


@pytest.mark.parametrize("language, expected", [
    ("en", [("local", "en", None)]),
    ("en-US", [("local", "en-US", None)]),
])
def test_only_the_embedded_engine(language, expected):
    assert chain(language, Settings()) == expected


@pytest.mark.parametrize("language", ["fr", "multi", "zh", "auto"])
def test_only_the_embedded_engine_refuses_other_languages(language):
    with pytest.raises(NoProviderError):
        chain(language, Settings())


def test_without_any_provider_nothing_is_supported():
    with pytest.raises(NoProviderError):
        chain("en", Settings(), local=False)


# --- stt_service pins -----------------------------------------------------------------------------

@pytest.mark.parametrize("service, language, first", [
    ("speechmatics", "en", "speechmatics"),
    ("deepgram", "en", "deepgram"),
    ("local", "en", "local"),
    ("soniox", "en", "soniox"),
    ("deepgram", "zh", "deepgram"),
])
def test_stt_service_pins_the_first_provider_and_keeps_the_rest(service, language, first):
    pinned = chain(language, Settings(**KEYS), stt_service=service)
    unpinned = chain(language, Settings(**KEYS))
    assert pinned[0][0] == first
    assert sorted(pinned) == sorted(unpinned)
    assert [link for link in pinned if link[0] != service] == [link for link in unpinned if link[0] != service]


def test_a_pinned_provider_that_cannot_transcribe_the_language_is_skipped():
    assert chain("multi", Settings(**KEYS), stt_service="speechmatics") == chain("multi", Settings(**KEYS))
    assert chain("en", Settings(deepgram_api_key="dg"), stt_service="soniox") == \
        [("deepgram", "en", "nova-3"), ("local", "en", None)]


def test_a_pinned_provider_missing_from_stt_chain_still_comes_first():
    settings = Settings(**KEYS, stt_chain="soniox,local")
    assert chain("en", settings) == [("soniox", "en", None), ("local", "en", None)]
    assert chain("en", settings, stt_service="deepgram") == \
        [("deepgram", "en", "nova-3"), ("soniox", "en", None), ("local", "en", None)]


def test_unknown_stt_service_is_rejected():
    with pytest.raises(ValueError, match="stt_service"):
        chain("en", Settings(**KEYS), stt_service="whisperx")


# --- stt_chain ---------------------------------------------------------------------------------------

def test_stt_chain_sets_the_order_and_takes_omis_spelling():
    settings = Settings(**KEYS, stt_chain="dg-nova-2,speechmatics,soniox-stt-rt")
    assert chain("en", settings) == [("deepgram", "en", "nova-2-general"), ("speechmatics", "en", None),
                                     ("soniox", "en", None), ("local", "en", None)]
    # nova-2 does not do Dutch: Deepgram drops out rather than getting a language it cannot do
    assert chain("nl", settings) == [("speechmatics", "nl", None), ("soniox", "nl", None)]


def test_the_embedded_engine_is_last_unless_stt_chain_places_it():
    assert chain("en", Settings(**KEYS, stt_chain="local,dg-nova-3"))[:2] == \
        [("local", "en", None), ("deepgram", "en", "nova-3")]
    assert chain("en", Settings(**KEYS, stt_chain="dg-nova-3"))[-1] == ("local", "en", None)


def test_a_misspelt_chain_fails_at_startup():
    with pytest.raises(ValueError, match="dg-nova-9"):
        build_providers(Settings(**KEYS, stt_chain="soniox,dg-nova-9"))


def test_deepgram_model_setting_overrides_the_table_choice():
    assert chain("zh", Settings(deepgram_api_key="dg", deepgram_model="my-self-hosted")) == \
        [("deepgram", "zh", "my-self-hosted")]


def test_a_link_fills_in_the_stream_config():
    settings = Settings(**KEYS)
    link = select_chain("zh", "deepgram", providers_for(settings), settings)[0]
    config = link.stream_config(StreamConfig(language="zh", session_id="s", extra={"keyterms": ["Omi"]}))
    assert (config.language, config.session_id, config.extra) == \
        ("zh", "s", {"keyterms": ["Omi"], "model": "nova-2-general"})


# --- settings --------------------------------------------------------------------------------

def test_build_providers_constructs_only_providers_with_keys():
    assert set(build_providers(Settings())) == set()
    assert set(build_providers(Settings(soniox_api_key="x"))) == {"soniox"}
    assert set(build_providers(Settings(**KEYS))) == {"deepgram", "soniox", "speechmatics"}


def test_cloud_settings_come_from_the_environment_with_keys_masked():
    env = {"HARKEN_DEEPGRAM_API_KEY": "secret-dg", "HARKEN_SONIOX_URL": "ws://127.0.0.1:9/x",
           "HARKEN_STT_CHAIN": "dg-nova-3,local", "HARKEN_STT_RETRY_ATTEMPTS": "5",
           "HARKEN_STT_RESULT_TIMEOUT": "2.5"}
    settings = Settings.from_env(env)
    assert (settings.deepgram_api_key, settings.soniox_url, settings.stt_chain) == \
        ("secret-dg", "ws://127.0.0.1:9/x", "dg-nova-3,local")
    view = settings.public_view()
    assert view["deepgram_api_key"] == "***" and view["soniox_api_key"] == ""
    policy = FallbackPolicy.from_settings(settings)
    assert (policy.retry_attempts, policy.result_timeout, policy.retry_base, policy.retry_cap) == (5, 2.5, 1.0, 32.0)
