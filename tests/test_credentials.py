"""One credential resolver for every vendor: explicit first, then the environment, then an error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import voice_runtime
from voice_runtime.credentials import require_credential, resolve_credential
from voice_runtime.errors import MissingCredentialError

VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")


def test_explicit_wins_then_variables_in_order() -> None:
    env = {"GEMINI_API_KEY": "", "GOOGLE_API_KEY": "g"}
    assert resolve_credential("x", VARS, what="Gemini API key", environ=env) == "x"
    assert resolve_credential(None, VARS, what="Gemini API key", environ=env) == "g"


def test_missing_required_names_the_first_variable() -> None:
    with pytest.raises(MissingCredentialError, match="GEMINI_API_KEY") as info:
        resolve_credential(None, VARS, what="Gemini API key", environ={})
    assert info.value.variable == "GEMINI_API_KEY"
    with pytest.raises(MissingCredentialError, match="AZURE_SPEECH_KEY"):
        require_credential(None, ("AZURE_SPEECH_KEY",), what="Azure Speech key")
    assert require_credential("k", ("AZURE_SPEECH_KEY",), what="Azure Speech key") == "k"


def test_missing_optional_warns_once_without_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="voice_runtime"):
        got = resolve_credential(
            None, ("AZURE_SPEECH_KEY",), what="Azure Speech key", required=False, environ={}
        )
        quiet = resolve_credential(
            None, VARS, what="Gemini API key", required=False, environ={}, warn=False
        )
    assert got is None and quiet is None
    assert [r.variable for r in caplog.records] == ["AZURE_SPEECH_KEY"]  # type: ignore[attr-defined]


def test_a_lookup_replaces_the_environment() -> None:
    seen: list[str] = []

    def lookup(name: str) -> str | None:
        seen.append(name)
        return {"GOOGLE_API_KEY": "from-lookup"}.get(name)

    got = resolve_credential(None, VARS, what="Gemini API key", lookup=lookup)
    assert got == "from-lookup" and seen == list(VARS)


def test_no_provider_builds_its_own_missing_credential_error() -> None:
    root = Path(voice_runtime.__file__).parent
    offenders = [
        str(path.relative_to(root))
        for folder in ("providers", "realtime")
        for path in sorted((root / folder).glob("*.py"))
        if "MissingCredentialError(" in path.read_text()
    ]
    assert offenders == []
