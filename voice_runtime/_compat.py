"""Duck-typed sessions: what providers and transports may assume about a session object.

Users of the 0.1.x package pass their own objects as the session (``MagicMock()``,
``create_autospec(VoiceSession)``, hand-written fakes). Those get the calls 0.1.x made and
nothing more; only a real :class:`~voice_runtime.session.VoiceSession` (or a subclass) gets
the fast paths that read its internals.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["clear_for_barge_in", "is_voice_session", "maybe_await", "number"]


def is_voice_session(session: object) -> bool:
    """True for a real VoiceSession or subclass; False for mocks and other duck types.

    ``isinstance`` is not enough: a mock made with ``spec=VoiceSession`` passes it.
    """
    from voice_runtime.session import VoiceSession

    return issubclass(type(session), VoiceSession)


def number(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a mock's attribute), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


async def maybe_await(value: Any) -> Any:
    """Await ``value`` when it is awaitable (a coroutine, an AsyncMock call), else return it."""
    if inspect.isawaitable(value):
        return await value
    return value


def clear_for_barge_in(session: Any) -> None:
    """A barge-in's clear: uninterruptible audio is kept by sessions that know of it.

    Duck types and subclasses whose ``request_clear_buffer`` takes no keyword get the 0.1.x
    call (they clear everything).
    """
    method = session.request_clear_buffer
    if is_voice_session(session) and "keep_uninterruptible" in _parameters(method):
        method(keep_uninterruptible=True)
    else:
        method()


def _parameters(fn: Any) -> Any:
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
