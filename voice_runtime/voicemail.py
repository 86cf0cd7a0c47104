"""Voicemail drop: leave a message on an answering machine after its beep, then hang up.

For an outbound call placed with async answering machine detection (AMD)::

    session = server.place_call(number, machine_detection="DetectMessageEnd", async_amd=True)
    session.wait_for_ws_connect()
    result = leave_voicemail(session, "Hi, this is Acme. Call us back at ...", tts)
    if result.outcome == "human":
        ...  # talk to the person instead

:func:`leave_voicemail` waits until the machine's greeting is over, speaks ``text``, waits
until it has been heard (its mark came back) and hangs up. What decides "greeting over":

* Twilio's AMD result (``AnsweredBy``, posted to the server's status webhook, recorded per
  call by :func:`note_answered_by`): ``machine_end_beep``, ``machine_end_silence`` or
  ``machine_end_other``. ``human`` returns at once without speaking (outcome "human"),
  ``fax`` likewise.
* A local :class:`~voice_runtime.audio.beep.BeepDetector` on the caller's audio, the
  fallback when AMD is off, undecided (``machine_start``, ``unknown``) or, with
  ``amd_timeout`` set, when AMD has not answered within that many seconds.

Nothing is spoken when neither happens within ``timeout`` (outcome "timeout").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voice_runtime._sync import call_on_loop
from voice_runtime.audio.beep import Beep, BeepDetector
from voice_runtime.providers.base import speak_async
from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

MACHINE_END = frozenset({"machine_end_beep", "machine_end_silence", "machine_end_other"})
"""AnsweredBy values that mean the machine's greeting is over (DetectMessageEnd mode)."""
UNDECIDED = frozenset({"machine_start", "unknown"})
"""AnsweredBy values after which the local beep detector decides."""
ANSWERED_BY_VALUES = MACHINE_END | UNDECIDED | {"human", "fax"}

__all__ = [
    "ANSWERED_BY_VALUES",
    "MACHINE_END",
    "UNDECIDED",
    "VoicemailResult",
    "answered_by",
    "leave_voicemail",
    "leave_voicemail_async",
    "note_answered_by",
]


@dataclass(frozen=True)
class VoicemailResult:
    """What :func:`leave_voicemail` did.

    ``outcome``: "left" (spoken and heard, then hung up), "human" or "fax" (AMD said so;
    nothing spoken), "timeout" (no end of greeting found; nothing spoken) or "hangup" (the
    call ended first, possibly mid-message). ``detected_by``: "amd" or "beep".
    """

    outcome: str
    answered_by: str | None = None
    detected_by: str | None = None
    beep: Beep | None = None
    tts_result: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def left(self) -> bool:
        """Whether the message was spoken and heard."""
        return self.outcome == "left"


class _AmdState:
    """The AMD result of one call and who waits for it (any thread)."""

    def __init__(self, call_sid: str | None) -> None:
        self.call_sid = call_sid
        self.answered_by: str | None = None
        self.listeners: list[Callable[[], None]] = []
        self.lock = threading.Lock()

    def set(self, value: str) -> None:
        with self.lock:
            self.answered_by = value
            listeners = list(self.listeners)
        for listener in listeners:
            listener()


_STATE_ATTR = "_voicemail_amd"
_STATE_LOCK = threading.Lock()


def _state(session: VoiceSession) -> _AmdState:
    # Kept on the session object, so it lives and dies with the call; a session reused for
    # another call (reset(), a new call SID) starts with no result.
    with _STATE_LOCK:
        state = vars(session).get(_STATE_ATTR)
        if state is None or state.call_sid != session.call_sid:
            state = _AmdState(session.call_sid)
            setattr(session, _STATE_ATTR, state)
        return state


def note_answered_by(session: VoiceSession, value: str) -> None:
    """Record an ``AnsweredBy`` result for the call (the status webhook calls this)."""
    _state(session).set(value)


def answered_by(session: VoiceSession) -> str | None:
    """The call's AMD result so far (``AnsweredBy``), or None."""
    return _state(session).answered_by


async def leave_voicemail_async(
    session: VoiceSession,
    text: str,
    tts: Any,
    *,
    timeout: float = 60.0,  # noqa: ASYNC109 - a budget for the greeting, not one await
    amd_timeout: float | None = None,
    detector: BeepDetector | None = None,
    detect_beep: bool = True,
    hangup: bool = True,
) -> VoicemailResult:
    """Async twin of :func:`leave_voicemail` (run it on the session's event loop)."""
    if not text.strip():
        raise ValueError("text must not be blank")
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    state = _state(session)
    beep_box: list[Beep] = []
    detector = detector if detector is not None else BeepDetector()

    def poke() -> None:
        call_on_loop(loop, wake.set)

    def tap(frame: bytes) -> None:
        if not beep_box and (beep := detector.feed_ulaw(frame)) is not None:
            beep_box.append(beep)
            poke()

    with state.lock:
        state.listeners.append(poke)
    if detect_beep:
        session.inbound_taps.append(tap)
    start = time.monotonic()
    try:
        decided = await _wait_for_greeting_end(
            session, state, beep_box, wake, start + timeout, amd_timeout, start
        )
    finally:
        with state.lock:
            state.listeners.remove(poke)
        if tap in session.inbound_taps:
            session.inbound_taps.remove(tap)
    if decided.outcome != "speak":
        _log(session, decided)
        return decided
    result = await speak_async(tts, text, session)
    heard = not result.get("call_disconnected") and "error" not in result
    if hangup and not session.is_disconnected:
        session.request_disconnect(after_playback=True)
    done = VoicemailResult(
        "left" if heard else "hangup",
        decided.answered_by,
        decided.detected_by,
        decided.beep,
        result,
    )
    _log(session, done)
    return done


async def _wait_for_greeting_end(
    session: VoiceSession,
    state: _AmdState,
    beep_box: list[Beep],
    wake: asyncio.Event,
    deadline: float,
    amd_timeout: float | None,
    start: float,
) -> VoicemailResult:
    """Wait until AMD or the beep says the greeting is over: outcome "speak", or why not."""
    while True:
        wake.clear()
        value = state.answered_by
        if value in ("human", "fax"):
            return VoicemailResult(str(value), value)
        if value in MACHINE_END:
            return VoicemailResult("speak", value, "amd", beep_box[0] if beep_box else None)
        now = time.monotonic()
        # A local beep counts unless AMD may still give the answer (amd_timeout not over).
        amd_pending = value is None and amd_timeout is not None and now < start + amd_timeout
        if beep_box and not amd_pending:
            return VoicemailResult("speak", value, "beep", beep_box[0])
        if session.is_disconnected:
            return VoicemailResult("hangup", value)
        if now >= deadline:
            return VoicemailResult("timeout", value)
        until = deadline
        if amd_pending and amd_timeout is not None:
            until = min(until, start + amd_timeout)
        ended = asyncio.ensure_future(session.wait_until_disconnected_async())
        woke = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait(
                {ended, woke},
                timeout=max(0.0, until - now),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ended.cancel()
            woke.cancel()


def _log(session: VoiceSession, result: VoicemailResult) -> None:
    logger.info(
        "voicemail drop finished",
        extra={
            "call_sid": session.call_sid,
            "outcome": result.outcome,
            "answered_by": result.answered_by,
            "detected_by": result.detected_by,
        },
    )


def leave_voicemail(
    session: VoiceSession,
    text: str,
    tts: Any,
    *,
    timeout: float = 60.0,
    amd_timeout: float | None = None,
    detector: BeepDetector | None = None,
    detect_beep: bool = True,
    hangup: bool = True,
) -> VoicemailResult:
    """Speak ``text`` after the answering machine's beep, wait until heard, hang up (blocking).

    Waits up to ``timeout`` seconds for the end of the greeting (see the module docstring).
    ``amd_timeout``: set it when the call was placed with async AMD, so a local beep is only
    trusted once AMD has had that long to answer. ``detector``: a tuned
    :class:`~voice_runtime.audio.beep.BeepDetector`; ``detect_beep=False`` relies on AMD
    alone. ``hangup=False`` keeps the call up after the message. Returns a
    :class:`VoicemailResult`; a human answer returns outcome "human" without speaking.
    """
    coro = leave_voicemail_async(
        session,
        text,
        tts,
        timeout=timeout,
        amd_timeout=amd_timeout,
        detector=detector,
        detect_beep=detect_beep,
        hangup=hangup,
    )
    # No outer deadline: the wait is bounded by ``timeout``, the speech by its own mark wait.
    return session._blocking("leave_voicemail", coro, None, VoicemailResult("hangup"))
