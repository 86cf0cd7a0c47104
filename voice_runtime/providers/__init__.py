"""Speech providers: :class:`SttProvider` and :class:`TtsProvider` (from ``contracts``).

The contracts themselves, and the behaviour every provider follows, live in
:mod:`voice_runtime.contracts`; they are re-exported here, their 0.1.x home.
"""

from __future__ import annotations

from dataclasses import dataclass

from voice_runtime.contracts import SttProvider, TtsProvider

__all__ = ["Capabilities", "SttProvider", "TtsProvider"]


@dataclass(frozen=True)
class Capabilities:
    """What a provider can do, declared as data."""

    native_ulaw: bool = False
    interim_results: bool = False
    streaming: bool = True
    needs_network: bool = True
