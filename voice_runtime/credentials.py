"""Vendor credentials: explicit argument first, then the environment, then a clear error.

The one resolver every provider uses (speech providers and realtime agents). Read at
construction time, never at import. The variable names, first one found wins:

=====================  ==========================================
credential             variables
=====================  ==========================================
ElevenLabs API key     ``ELEVENLABS_API_KEY`` (optional for public agents)
ElevenLabs agent id    ``ELEVENLABS_AGENT_ID``
Azure Speech key       ``AZURE_SPEECH_KEY``
OpenAI API key         ``OPENAI_API_KEY``
Gemini API key         ``GEMINI_API_KEY``, then ``GOOGLE_API_KEY``
xAI API key            ``XAI_API_KEY``
=====================  ==========================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from voice_runtime.config import env_value
from voice_runtime.errors import MissingCredentialError

__all__ = ["CREDENTIAL_VARIABLES", "require_credential", "resolve_credential"]

logger = logging.getLogger(__name__)

#: Environment variables each vendor credential is read from, in lookup order.
CREDENTIAL_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "xai": ("XAI_API_KEY",),
    "elevenlabs": ("ELEVENLABS_API_KEY",),
    "elevenlabs_agent_id": ("ELEVENLABS_AGENT_ID",),
    "azure": ("AZURE_SPEECH_KEY",),
}


def resolve_credential(
    explicit: str | None,
    variables: Sequence[str],
    *,
    what: str,
    required: bool = True,
    environ: Mapping[str, str] | None = None,
    lookup: Callable[[str], str | None] | None = None,
    warn: bool = True,
) -> str | None:
    """Return ``explicit`` if given, else the first non-empty variable; raise when required.

    ``lookup`` reads one variable (default: the environment, or ``environ``); speech
    providers pass their patchable 0.1.x module constants. A missing optional credential is
    logged here (unless ``warn`` is False: some vendors work without one) and
    :func:`require_credential` raises when it is needed. The error names the first variable,
    so the message tells the user what to set.
    """
    if explicit:
        return explicit
    blank: str | None = None
    for name in variables:
        value = lookup(name) if lookup is not None else env_value(name, environ)
        if value:
            return value
        if value is not None and blank is None:
            blank = value  # a constant patched to "" means "no key", and stays "" (as in 0.1.x)
    if required:
        raise MissingCredentialError(variables[0], what)
    if warn:
        logger.warning(
            "vendor key not configured: pass it explicitly or set the variable in the log extras",
            extra={"credential": what, "variable": variables[0]},
        )
    return blank


def require_credential(value: str | None, variables: Sequence[str], *, what: str) -> str:
    """Return ``value``, or raise :class:`MissingCredentialError` naming the first variable."""
    if not value:
        raise MissingCredentialError(variables[0], what)
    return value
