"""Which providers, in which order, transcribe a given language.

The language tables are Omi's (``backend/utils/stt/streaming.py``), copied unchanged, so a
language that Omi sends to a provider goes to the same provider and model here. The order comes
from ``stt_chain`` (Omi's ``STT_SERVICE_MODELS``), but where Omi stops at the first match, Harken
keeps every match as a fallback chain, one link per provider (a provider outage takes all of its
models down, so trying Deepgram twice would only add delay). The differences from Omi:

- a specific language is transcribed as that language; only ``multi`` (or ``auto``) asks for
  code-switching. Omi turns ``en`` into ``multi`` by default (issue #3663);
- a language no configured provider supports raises ``NoProviderError`` (the gateway closes
  1008), instead of Omi's silent fall back to English;
- Soniox is matched on the primary language subtag (``en-US`` → ``en``), since its language
  hints are two-letter codes anyway;
- ``stt_service`` pins a provider to the front of the chain (Omi ignores it);
- the embedded engine (``local``) is the safety net: last unless ``stt_chain`` places it, and
  kept only where it supports the language.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Mapping

from .base import Link, Provider
from .languages import (DEEPGRAM_NOVA2, DEEPGRAM_NOVA3, N2, N2M, N3, N3M, SONIOX, SPEECHMATICS,  # noqa: F401
                        normalize_language, primary_language)

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

# stt_chain entries → the provider they name. "soniox-stt-rt" is Omi's spelling.
CHAIN_ENTRIES = {
    "soniox": "soniox", "soniox-stt-rt": "soniox",
    "dg-nova-3": "deepgram", "dg-nova-2": "deepgram",
    "speechmatics": "speechmatics",
    "local": "local",
}
PROVIDER_NAMES = ("deepgram", "soniox", "speechmatics", "local")
NULL_SERVICE = "null"     # scripted words for load tests (stt/null.py): only with settings.null_provider
# The entries a pinned provider is tried with when stt_chain does not list it.
_DEFAULT_ENTRIES = {"deepgram": ("dg-nova-3", "dg-nova-2"), "soniox": ("soniox",),
                    "speechmatics": ("speechmatics",), "local": ("local",)}


class NoProviderError(LookupError):
    """No configured provider transcribes the requested language (the gateway closes 1008)."""

    def __init__(self, language: str):
        super().__init__(f"The language is not supported: {language}")
        self.language = language


def parse_chain(text: str) -> list[str]:
    """``"soniox,dg-nova-3,local"`` → entries, or ValueError naming the ones that make no sense."""
    entries = [e.strip().lower() for e in text.split(",") if e.strip()]
    unknown = [e for e in entries if e not in CHAIN_ENTRIES]
    if unknown:
        raise ValueError(f"stt_chain: unknown entries {', '.join(unknown)}; use {', '.join(sorted(CHAIN_ENTRIES))}")
    return entries


def entry_options(entry: str, language: str, settings: "Settings | None" = None) -> dict[str, Any] | None:
    """StreamConfig overrides for one chain entry and a (normalised) language, or None if the
    entry does not transcribe that language (Omi's tables)."""
    deepgram_model = settings.deepgram_model if settings is not None else ""
    if entry in ("soniox", "soniox-stt-rt"):
        if language == "multi" or primary_language(language) in SONIOX:
            return {"language": language}
    elif entry == "dg-nova-3":
        if language in N3M or language in N3:
            return {"language": language, "extra": {"model": deepgram_model or DEEPGRAM_NOVA3}}
    elif entry == "dg-nova-2":
        if language in N2M or language in N2:
            return {"language": language, "extra": {"model": deepgram_model or DEEPGRAM_NOVA2}}
    elif entry in ("speechmatics", "local"):
        return {"language": language}   # the provider's own supports() decides
    return None


def select_chain(language: str, stt_service: str | None, providers: Mapping[str, Provider],
                 settings: "Settings") -> list[Link]:
    """The ordered fallback chain for ``language``; raises ``NoProviderError`` if it is empty.

    ``providers`` maps provider names to the configured providers (cloud ones only when they have
    a key; the gateway adds ``local``). ``stt_service`` (deepgram | soniox | speechmatics | local)
    moves that provider to the front when it is configured and supports the language.
    """
    language = normalize_language(language)
    if stt_service == NULL_SERVICE and NULL_SERVICE in providers:
        # The measuring provider stands alone: a fallback would mix real words into its script.
        return [Link(providers[NULL_SERVICE], {"language": language})]
    if stt_service and stt_service not in PROVIDER_NAMES:
        raise ValueError(f"stt_service must be one of {', '.join(PROVIDER_NAMES)}, not {stt_service!r}")
    entries = parse_chain(settings.stt_chain)
    if "local" not in entries:
        entries.append("local")
    if stt_service:
        pinned = [e for e in entries if CHAIN_ENTRIES[e] == stt_service] or list(_DEFAULT_ENTRIES[stt_service])
        entries = pinned + [e for e in entries if CHAIN_ENTRIES[e] != stt_service]

    chain: list[Link] = []
    for entry in entries:
        name = CHAIN_ENTRIES[entry]
        provider = providers.get(name)
        if provider is None or any(link.name == name for link in chain):
            continue
        options = entry_options(entry, language, settings)
        if options is not None and provider.supports(language):
            chain.append(Link(provider, options))
    if stt_service and (not chain or chain[0].name != stt_service):
        log.info("stt_service=%s cannot transcribe %s here; using %s", stt_service, language,
                 chain[0].name if chain else "nothing")
    if not chain:
        raise NoProviderError(language)
    return chain


# Where a language has no engine, what is tried instead: code-switching recognition (which may
# still catch the language, e.g. a multilingual engine's detection), then English. The Omi app
# reconnects forever on a 1008, so a session is always served while any engine is configured.
FALLBACK_LANGUAGES = ("multi", "en")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The chain that serves a session, and in which language it transcribes."""

    chain: list[Link]
    asked: str          # normalised language the client asked for
    language: str       # the language the chain was opened for (``asked`` unless none served it)

    @property
    def reason(self) -> str:
        """For ``ready``'s ``reason``: which language, and which engine serves it."""
        served_by = self.chain[0].provider.describe(self.language)
        if self.language == self.asked:
            return f"language {self.asked}: {served_by}"
        return f"language {self.asked} has no engine here; transcribing as {self.language}: {served_by}"


def choose_chain(language: str, stt_service: str | None, providers: Mapping[str, Provider],
                 settings: "Settings") -> Choice:
    """``select_chain`` for ``language``, else for the first of ``FALLBACK_LANGUAGES`` that has
    one. Raises ``NoProviderError`` only when no engine serves any of them."""
    asked = normalize_language(language)
    for candidate in dict.fromkeys((asked, *FALLBACK_LANGUAGES)):
        try:
            chain = select_chain(candidate, stt_service, providers, settings)
        except NoProviderError:
            continue
        if candidate != asked:
            log.info("language %s has no engine here; serving it as %s with %s", asked, candidate, chain[0].name)
        return Choice(chain, asked, candidate)
    raise NoProviderError(asked)


def build_providers(settings: "Settings") -> dict[str, Provider]:
    """The cloud providers that have an API key, by name. The gateway adds the embedded engine.

    Provider modules are imported only when configured: each SDK costs import time and memory.
    """
    parse_chain(settings.stt_chain)          # a misspelt chain fails at startup, not on a connection
    providers: dict[str, Provider] = {}
    if settings.deepgram_api_key:
        from .deepgram import DeepgramProvider
        providers["deepgram"] = DeepgramProvider(settings)
    if settings.soniox_api_key:
        from .soniox import SonioxProvider
        providers["soniox"] = SonioxProvider(settings)
    if settings.speechmatics_api_key:
        from .speechmatics import SpeechmaticsProvider
        providers["speechmatics"] = SpeechmaticsProvider(settings)
    if settings.null_provider:
        from .null import NullProvider
        providers[NULL_SERVICE] = NullProvider(settings)
    return providers
