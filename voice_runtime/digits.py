"""Digit gathering over DTMF: :func:`gather_digits` and :func:`gather_digits_async`.

Like TwiML ``<Gather input="dtmf">``: collect keys until ``max_digits`` were pressed, the
``finish_on_key`` was pressed (it is not part of the digits), ``timeout`` seconds passed
without a first key or ``inter_digit_timeout`` seconds without the next one. Keys pressed
before the gather started and not read by anyone (type-ahead) count. A ``prompt`` is spoken
first and stops at the first key; the first-key timeout starts once the prompt was heard.

Digits are never logged (only how many, and why the gather ended).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from voice_runtime.errors import ConfigurationError

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = ["Digits", "gather_digits", "gather_digits_async"]

DTMF_KEYS = frozenset("0123456789*#")

EndReason = Literal["max_digits", "finish_key", "timeout", "hangup"]

#: ``speak(stop_event)``: speak the prompt, returning when it was heard or stopped.
PromptSpeaker = Callable[[threading.Event], Awaitable[Any]]


@dataclass(frozen=True)
class Digits:
    """The keys gathered and why the gather ended (the digits are left out of the repr)."""

    digits: str = field(repr=False)
    reason: EndReason

    @property
    def timed_out(self) -> bool:
        """True when the gather ended for lack of a key."""
        return self.reason == "timeout"


def _check(
    max_digits: int | None, finish_on_key: str, timeout: float, inter_digit_timeout: float
) -> None:
    if max_digits is not None and (isinstance(max_digits, bool) or max_digits < 1):
        raise ValueError(f"max_digits must be >= 1 or None, got {max_digits!r}")
    if not set(finish_on_key) <= DTMF_KEYS:
        raise ValueError("finish_on_key must be made of the keys 0-9, * and # (or be empty)")
    for name, value in (("timeout", timeout), ("inter_digit_timeout", inter_digit_timeout)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


async def gather(
    session: VoiceSession,
    max_digits: int | None,
    finish_on_key: str,
    timeout: float,
    inter_digit_timeout: float | None,
    speak: PromptSpeaker | None,
) -> Digits:
    """The gather itself (loop only); ``speak`` plays the prompt, stopped by the first key."""
    between = timeout if inter_digit_timeout is None else inter_digit_timeout
    _check(max_digits, finish_on_key, timeout, between)
    port = getattr(session, "port", None)
    if port is None:
        raise ConfigurationError("gather_digits needs a VoiceSession (it reads session.port)")
    reader: asyncio.Future[str | None] = asyncio.ensure_future(port.next_dtmf())
    keys: list[str] = []
    try:
        if speak is not None:
            stop = threading.Event()
            speaking = asyncio.ensure_future(speak(stop))
            try:
                await asyncio.wait({reader, speaking}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if reader.done() or not speaking.done():
                    stop.set()  # the first key stops the prompt (its audio is cleared)
                await speaking
        wait = timeout
        while True:
            try:
                # shield: a timeout must not cancel a read that may just have got a key.
                digit = await asyncio.wait_for(asyncio.shield(reader), wait)
            except TimeoutError:
                return _done(session, keys, "timeout")
            if digit is None:
                return _done(session, keys, "hangup")
            if digit in finish_on_key:
                return _done(session, keys, "finish_key")
            keys.append(digit)
            if max_digits is not None and len(keys) >= max_digits:
                return _done(session, keys, "max_digits")
            wait = between
            reader = asyncio.ensure_future(port.next_dtmf())
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


def _done(session: VoiceSession, keys: list[str], reason: EndReason) -> Digits:
    logger.info(
        "digits gathered",
        extra={"call_sid": session.call_sid, "count": len(keys), "reason": reason},
    )
    return Digits("".join(keys), reason)


def _prompt_speaker(session: VoiceSession, prompt: str | None, tts: Any) -> PromptSpeaker | None:
    if not prompt:
        return None
    if tts is None:
        raise ValueError("a prompt needs a tts= provider to speak it")
    from voice_runtime.providers.base import speak_async

    async def speak(stop: threading.Event) -> Any:
        return await speak_async(tts, prompt, session, stop)

    return speak


async def gather_digits_async(
    session: VoiceSession,
    max_digits: int | None = None,
    *,
    finish_on_key: str = "#",
    timeout: float = 5.0,
    inter_digit_timeout: float | None = None,
    prompt: str | None = None,
    tts: Any = None,
) -> Digits:
    """Collect DTMF keys from the caller (loop only); see the module docstring.

    ``inter_digit_timeout`` defaults to ``timeout``; ``prompt`` is spoken with ``tts`` and
    stops at the first key. A call that ends returns what was gathered, reason ``hangup``.
    """
    speak = _prompt_speaker(session, prompt, tts)
    return await gather(session, max_digits, finish_on_key, timeout, inter_digit_timeout, speak)


def gather_digits(
    session: VoiceSession,
    max_digits: int | None = None,
    *,
    finish_on_key: str = "#",
    timeout: float = 5.0,
    inter_digit_timeout: float | None = None,
    prompt: str | None = None,
    tts: Any = None,
) -> Digits:
    """Blocking twin of :func:`gather_digits_async` for worker threads."""
    coro = gather_digits_async(
        session,
        max_digits,
        finish_on_key=finish_on_key,
        timeout=timeout,
        inter_digit_timeout=inter_digit_timeout,
        prompt=prompt,
        tts=tts,
    )
    # The gather ends by itself (its timeouts, or the end of the call): no outer deadline.
    return session._blocking("gather_digits", coro, None, Digits("", "hangup"))
