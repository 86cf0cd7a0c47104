"""Credentials of the realtime vendors (kept importable; the resolver is shared).

See :mod:`voice_runtime.credentials`, which every provider uses.
"""

from __future__ import annotations

from voice_runtime.credentials import CREDENTIAL_VARIABLES, resolve_credential

__all__ = ["CREDENTIAL_VARIABLES", "resolve_credential"]
