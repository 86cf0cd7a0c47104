"""Credentials of the realtime vendors: explicit argument first, then the environment.

Read at construction time of an agent, never at import. The variable names:

=================  ==========================================
provider           variables (first one found wins)
=================  ==========================================
openai             ``OPENAI_API_KEY``
gemini             ``GEMINI_API_KEY``, then ``GOOGLE_API_KEY``
xai                ``XAI_API_KEY``
elevenlabs         ``ELEVENLABS_API_KEY`` (optional for public agents),
                   ``ELEVENLABS_AGENT_ID`` (required)
=================  ==========================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from voice_runtime.config import env_value
from voice_runtime.errors import MissingCredentialError

__all__ = ["CREDENTIAL_VARIABLES", "resolve_credential"]

#: Environment variables each provider reads, in lookup order.
CREDENTIAL_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "xai": ("XAI_API_KEY",),
    "elevenlabs": ("ELEVENLABS_API_KEY",),
    "elevenlabs_agent_id": ("ELEVENLABS_AGENT_ID",),
}


def resolve_credential(
    explicit: str | None,
    variables: Sequence[str],
    *,
    what: str,
    required: bool = True,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """Return ``explicit`` if given, else the first non-empty variable; raise when required.

    The error names the first variable, so the message tells the user what to set.
    """
    if explicit:
        return explicit
    for name in variables:
        value = env_value(name, environ)
        if value:
            return value
    if required:
        raise MissingCredentialError(variables[0], what)
    return None
