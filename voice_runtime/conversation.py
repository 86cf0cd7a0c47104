"""Conversation: the say/listen/hang-up loop most call scripts need, on one session.

It wires the session's STT (whenever the transport builds it) to a transcript queue and
keeps the STT's echo discard in step with the agent's speech. Sync methods run in the
consumer's thread; ``say_async`` / ``listen_async`` / ``hangup_async`` /
``gather_digits_async`` are their twins for an ``async def`` handler. They raise
:class:`~voice_runtime.errors.CallHangupError` when the call ends while they wait.

* ``say(text, interruptible=False)``: barge-in does not cut the line (a legal disclosure);
  what the caller says over it is kept for the next ``listen()``.
* ``idle_timeout=``: ``listen()`` re-prompts a silent caller and, after the last prompt, says
  goodbye, hangs up once it was heard and raises :class:`~voice_runtime.errors.IdleHangupError`
  (see :mod:`voice_runtime.idle`).
* ``gather_digits(...)``: DTMF input with a prompt the first key stops (see
  :mod:`voice_runtime.digits`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from voice_runtime._compat import is_voice_session
from voice_runtime._sync import forbid_on_loop
from voice_runtime.digits import Digits, PromptSpeaker, gather
from voice_runtime.errors import CallHangupError, ConfigurationError, IdleHangupError
from voice_runtime.idle import POLL_S, IdleClock, IdlePolicy
from voice_runtime.providers import SttProvider, TtsProvider
from voice_runtime.providers.base import speak_async
from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

LISTEN_POLL_S = 0.02  # how often listen_async looks for a transcript (no thread is held)
SYNC_POLL_S = 0.25  # how often listen() looks at the call's state while no text arrives
LISTEN_TIMEOUT_S = 15.0  # listen()'s default limit when no idle policy is set

__all__ = ["Conversation", "Turn"]


@dataclass(frozen=True)
class Turn:
    """One thing said on the call; ``t`` is ``time.monotonic()`` when it was final."""

    speaker: str
    text: str
    t: float


class Conversation:
    """Say and listen on a call with any TTS and STT provider."""

    def __init__(
        self,
        session: VoiceSession,
        tts: TtsProvider,
        *,
        on_turn: Callable[[Turn], None] | None = None,
        barge_in: bool | Any = False,
        idle_timeout: float | IdlePolicy | None = None,
    ) -> None:
        self.session = session
        self.tts = tts
        self.on_turn = on_turn
        self.turns: list[Turn] = []
        self.stop_event = threading.Event()
        # barge_in=True watches the caller with a Silero VAD (offline extra) and stops the
        # agent when the caller talks over it; a configured BargeIn object may be passed too.
        self.barge_in: Any = None
        if barge_in is True:
            from voice_runtime.providers.bargein import BargeIn

            self.barge_in = BargeIn(session)
        elif barge_in:
            self.barge_in = barge_in
        self._heard: queue.Queue[str | None] = queue.Queue()
        self._stt: SttProvider | None = None
        #: The idle policy (``idle_timeout=`` seconds or an IdlePolicy); None: off.
        self.idle = IdlePolicy.of(idle_timeout)
        self.idle_prompts = 0  # prompts said since the caller last answered
        self._clock = None if self.idle is None else IdleClock(session, self.idle)
        previous_ready = session.on_stt_ready
        previous_disc = session.on_disconnected

        def on_stt_ready(stt: SttProvider) -> None:
            self._attach(stt)
            if previous_ready is not None:
                previous_ready(stt)

        def on_disconnected() -> None:
            self._heard.put(None)
            if previous_disc is not None:
                previous_disc()

        session.on_stt_ready = on_stt_ready
        session.on_disconnected = on_disconnected
        if session.stt is not None:
            self._attach(session.stt)

    def _attach(self, stt: SttProvider) -> None:
        self._stt = stt
        stt.on_committed = self._committed
        if hasattr(self.barge_in, "note_transcript"):
            # Word-aware barge-in and false-interruption checks read the caller's interim words.
            previous = stt.on_recognizing

            def on_recognizing(text: str) -> None:
                self.barge_in.note_transcript(text, final=False)
                if previous is not None:
                    previous(text)

            stt.on_recognizing = on_recognizing

    def _committed(self, text: str) -> None:
        text = text.strip()
        if text:
            if hasattr(self.barge_in, "note_transcript"):
                self.barge_in.note_transcript(text, final=True)
            self._heard.put(text)

    def _record(self, speaker: str, text: str) -> None:
        turn = Turn(speaker, text, time.monotonic())
        self.turns.append(turn)
        if self.on_turn is not None:
            try:
                self.on_turn(turn)
            except Exception:
                logger.exception("on_turn callback failed")

    def _before_say(self, interruptible: bool) -> tuple[SttProvider | None, threading.Event]:
        if self.session.is_disconnected:
            raise CallHangupError()
        if self.barge_in is not None:
            self.stop_event = self.barge_in.arm()
        else:
            self.stop_event.clear()
        # An uninterruptible line gets a stop event barge-in never sets; barge-in still runs,
        # so it releases the STT and what the caller says is kept for the next listen().
        stop = self.stop_event if interruptible else threading.Event()
        stt = self._stt
        if stt is not None:
            stt.set_speaking(True)
        return stt, stop

    def _protect(self, interruptible: bool) -> contextlib.AbstractContextManager[Any]:
        if interruptible or not is_voice_session(self.session):
            return contextlib.nullcontext()
        return self.session.uninterruptible()

    def _forbid_on_loop(self, method: str) -> None:
        """LoopThreadError when a blocking method runs on the call's event loop thread."""
        forbid_on_loop(
            getattr(self.session, "loop", None),
            f"Conversation.{method}",
            f"Conversation.{method}_async",
        )

    def say(self, text: str, *, interruptible: bool = True) -> dict[str, Any]:
        """Speak and return when the caller heard it, or was interrupted (the TTS result dict).

        With ``interruptible=False`` barge-in does not cut it off. Blocking: raises
        LoopThreadError on the event loop thread (await :meth:`say_async` there).
        """
        self._forbid_on_loop("say")
        stt, stop = self._before_say(interruptible)
        try:
            with self._protect(interruptible):
                result = self.tts.speak(text, self.session, stop)
        finally:
            if stt is not None:
                stt.set_speaking(False)
        self._record("agent", result.get("last_spoken", text))
        return result

    async def say_async(self, text: str, *, interruptible: bool = True) -> dict[str, Any]:
        """Awaitable twin of :meth:`say` for ``async def`` handlers (the loop keeps running)."""
        stt, stop = self._before_say(interruptible)
        try:
            with self._protect(interruptible):
                result = await speak_async(self.tts, text, self.session, stop)
        finally:
            if stt is not None:
                stt.set_speaking(False)
        self._record("agent", result.get("last_spoken", text))
        return result

    def _require_stt(self) -> None:
        """Fail at once when nothing can ever be heard (instead of after the timeout)."""
        session = self.session
        if (
            self._stt is None
            and getattr(session, "stt", None) is None
            and getattr(session, "stt_factory", None) is None
        ):
            raise ConfigurationError(
                "listen() needs speech recognition, and this call has none: pass stt= to "
                "VoiceServer (for example VoiceServer(stt='offline')) or set "
                "session.stt_factory"
            )

    def _start_listening(self, timeout: float | None) -> float:
        """Checks, the idle clock, and the deadline of one listen."""
        self._require_stt()
        if timeout is None:
            timeout = LISTEN_TIMEOUT_S if self.idle is None else float("inf")
        if self._clock is not None:
            self._clock.attach()  # the silence counts from here, not from an earlier turn
        return time.monotonic() + timeout

    def _idle_line(self) -> str | None:
        """The line to say when the caller has been silent too long (None: not yet)."""
        clock, policy = self._clock, self.idle
        if clock is None or policy is None or not clock.expired():
            return None
        last = self.idle_prompts >= policy.max_prompts
        logger.info(
            "caller idle: hanging up" if last else "caller idle: prompting",
            extra={"call_sid": self.session.call_sid, "prompts": self.idle_prompts},
        )
        self.idle_prompts += 1
        return policy.goodbye if last else policy.prompt

    def _after_idle_line(self) -> None:
        assert self.idle is not None and self._clock is not None
        if self.idle_prompts > self.idle.max_prompts:
            self.hangup()  # after the goodbye was heard: say() returned when it was
            raise IdleHangupError()
        self._clock.restart()

    def _heard_text(self, text: str | None) -> str:
        if text is None:
            raise CallHangupError()
        self.idle_prompts = 0
        self._record("caller", text)
        return text

    def listen(self, timeout: float | None = None) -> str | None:
        """Return the caller's next utterance, or None when nothing was said in time.

        ``timeout`` defaults to 15 s, or to no limit with an idle policy (which re-prompts
        and finally hangs up, raising IdleHangupError). Raises
        :class:`~voice_runtime.errors.ConfigurationError` at once when the call has no STT.
        Blocking: raises LoopThreadError on the event loop thread (await :meth:`listen_async`).
        """
        self._forbid_on_loop("listen")
        deadline = self._start_listening(timeout)
        try:
            while True:
                if self.session.is_disconnected and self._heard.empty():
                    raise CallHangupError()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                try:
                    # Short waits only while an idle clock needs reading.
                    wait = POLL_S if self._clock is not None else SYNC_POLL_S
                    text = self._heard.get(timeout=min(remaining, wait))
                except queue.Empty:
                    line = self._idle_line()
                    if line is not None:
                        self.say(line)
                        self._after_idle_line()
                    continue
                return self._heard_text(text)
        finally:
            if self._clock is not None:
                self._clock.detach()

    async def listen_async(self, timeout: float | None = None) -> str | None:
        """Awaitable twin of :meth:`listen` for ``async def`` handlers."""
        deadline = self._start_listening(timeout)
        try:
            while True:
                try:
                    text = self._heard.get_nowait()
                except queue.Empty:
                    if self.session.is_disconnected:
                        raise CallHangupError() from None
                    if time.monotonic() >= deadline:
                        return None
                    line = self._idle_line()
                    if line is not None:
                        await self.say_async(line)
                        self._after_idle_line()
                    await asyncio.sleep(LISTEN_POLL_S)
                    continue
                return self._heard_text(text)
        finally:
            if self._clock is not None:
                self._clock.detach()

    def hangup(self) -> None:
        """End the call once everything said has been heard."""
        if is_voice_session(self.session):
            self.session.request_disconnect(after_playback=True)
        else:
            self.session.request_disconnect()  # the 0.1.x call, for other session objects

    async def hangup_async(self) -> None:
        """Awaitable twin of :meth:`hangup` (it never blocks; this keeps handlers uniform)."""
        self.hangup()

    async def gather_digits_async(
        self,
        max_digits: int | None = None,
        *,
        finish_on_key: str = "#",
        timeout: float = 5.0,
        inter_digit_timeout: float | None = None,
        prompt: str | None = None,
        interruptible: bool = True,
    ) -> Digits:
        """Collect DTMF keys (see :mod:`voice_runtime.digits`); ``prompt`` stops at the first key.

        With ``interruptible=False`` the prompt plays to its end (keys pressed meanwhile
        count). Raises CallHangupError when the call ends first.
        """
        speak: PromptSpeaker | None = None
        if prompt:

            async def speak_prompt(stop: threading.Event) -> Any:
                # As say() does (echo discard, barge-in armed); the first key stops it too.
                stt, _ = self._before_say(interruptible)
                try:
                    with self._protect(interruptible):
                        result = await speak_async(
                            self.tts, prompt, self.session, stop if interruptible else None
                        )
                finally:
                    if stt is not None:
                        stt.set_speaking(False)
                self._record("agent", result.get("last_spoken", prompt))
                return result

            speak = speak_prompt
        if self.session.is_disconnected:
            raise CallHangupError()
        result = await gather(
            self.session, max_digits, finish_on_key, timeout, inter_digit_timeout, speak
        )
        if result.reason == "hangup":
            raise CallHangupError()
        self.idle_prompts = 0
        return result

    def gather_digits(
        self,
        max_digits: int | None = None,
        *,
        finish_on_key: str = "#",
        timeout: float = 5.0,
        inter_digit_timeout: float | None = None,
        prompt: str | None = None,
        interruptible: bool = True,
    ) -> Digits:
        """Blocking twin of :meth:`gather_digits_async` for sync handlers."""
        self._forbid_on_loop("gather_digits")
        coro = self.gather_digits_async(
            max_digits,
            finish_on_key=finish_on_key,
            timeout=timeout,
            inter_digit_timeout=inter_digit_timeout,
            prompt=prompt,
            interruptible=interruptible,
        )
        result = self.session._blocking("gather_digits", coro, None, Digits("", "hangup"))
        if result.reason == "hangup":
            raise CallHangupError()
        return result

    # ------------------------------------------------------------------ telephony

    def leave_voicemail(self, text: str, **options: Any) -> Any:
        """Leave ``text`` on an answering machine after its beep, then hang up (blocking).

        See :func:`voice_runtime.voicemail.leave_voicemail` for ``options`` and the result;
        a human answer returns outcome "human" without speaking.
        """
        from voice_runtime.voicemail import leave_voicemail

        self._forbid_on_loop("leave_voicemail")
        result = leave_voicemail(self.session, text, self.tts, **options)
        self._record_voicemail(text, result)
        return result

    async def leave_voicemail_async(self, text: str, **options: Any) -> Any:
        """Awaitable twin of :meth:`leave_voicemail`."""
        from voice_runtime.voicemail import leave_voicemail_async

        result = await leave_voicemail_async(self.session, text, self.tts, **options)
        self._record_voicemail(text, result)
        return result

    def warm_transfer(self, server: Any, agent: str, **options: Any) -> Any:
        """Hand the caller to ``agent`` through a conference (blocking); a TransferResult.

        See :func:`voice_runtime.transfer.warm_transfer` for ``options`` (``summary``,
        ``hold_music_url``, ``timeout``, ...). The bot's stream ends when the caller moves.
        """
        from voice_runtime.transfer import warm_transfer

        self._forbid_on_loop("warm_transfer")
        return warm_transfer(server, self.session, agent, **options)

    async def warm_transfer_async(self, server: Any, agent: str, **options: Any) -> Any:
        """Awaitable twin of :meth:`warm_transfer`."""
        from voice_runtime.transfer import warm_transfer_async

        return await warm_transfer_async(server, self.session, agent, **options)

    def _record_voicemail(self, text: str, result: Any) -> None:
        if result.tts_result is not None:
            self._record("agent", result.tts_result.get("last_spoken", text))
