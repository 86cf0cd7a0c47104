"""Idle callers: re-prompt after a silence, then hang up politely.

The clock (:class:`IdleClock`) counts seconds of caller silence only once the agent's audio
has been heard: while agent audio is queued or sent and not yet confirmed by a mark echo
(``session.agent_audio_pending``, from the playback ledger) or while the owner says it is
busy (a tool runs), it stands still. Caller activity restarts it: a caller frame louder than
``IdlePolicy.speech_dbfs``, a DTMF key, or whatever the owner reports (a transcript, a vendor's
speech event).

:class:`~voice_runtime.conversation.Conversation` runs the policy inside ``listen()``; the
realtime bridge runs :func:`watch_realtime_idle` as one of its tasks
(``BridgeOptions(idle=IdlePolicy(...))``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime.audio.codec import ulaw_decode
from voice_runtime.audio.pcm import rms_dbfs

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = ["IdleClock", "IdlePolicy", "watch_realtime_idle"]

POLL_S = 0.05  # how often the idle clock is read while waiting for the caller


@dataclass(frozen=True)
class IdlePolicy:
    """What to do when the caller stays silent.

    After ``timeout_s`` of caller silence (counted from when the agent's audio was heard)
    the agent says ``prompt``; after ``max_prompts`` prompts without an answer it says
    ``goodbye`` and hangs up once the goodbye was heard. A realtime agent is asked to say
    them (a text turn with an instruction), so its words may differ slightly.
    """

    timeout_s: float = 8.0
    prompt: str = "Are you still there?"
    max_prompts: int = 2
    goodbye: str = "I have not heard from you, so I will end the call now. Goodbye."
    speech_dbfs: float = -40.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, got {self.max_prompts!r}")

    @classmethod
    def of(cls, value: float | IdlePolicy | None) -> IdlePolicy | None:
        """A policy from ``idle_timeout=`` (seconds, a policy, or None for off)."""
        if value is None or isinstance(value, IdlePolicy):
            return value
        return cls(timeout_s=float(value))


class IdleClock:
    """Seconds of caller silence on one call, counted only after the agent was heard."""

    def __init__(self, session: VoiceSession, policy: IdlePolicy) -> None:
        self.session = session
        self.policy = policy
        #: Incremented on every caller activity (owners compare it to see an answer).
        self.activity_count = 0
        self._since = time.monotonic()
        self._dtmf = self._dtmf_count()
        self._attached = False

    def _dtmf_count(self) -> int:
        stats = getattr(self.session, "stats", None)
        return int(getattr(stats, "dtmf_digits", 0))

    def attach(self) -> None:
        """Start watching caller audio (idempotent); the clock restarts."""
        self.restart()
        taps = getattr(self.session, "inbound_taps", None)
        if not self._attached and taps is not None:
            taps.append(self._tap)
            self._attached = True

    def detach(self) -> None:
        """Stop watching caller audio (idempotent)."""
        if self._attached:
            self._attached = False
            try:
                self.session.inbound_taps.remove(self._tap)
            except ValueError:
                pass

    def restart(self) -> None:
        """Start counting again from now (the agent just finished, or waiting begins)."""
        self._since = time.monotonic()

    def activity(self) -> None:
        """The caller did something: the silence starts again (any thread)."""
        self.activity_count += 1
        self._since = time.monotonic()

    def _tap(self, frame: bytes) -> None:
        # Loop thread, every caller frame: a cheap level check, no VAD.
        if rms_dbfs(ulaw_decode(frame)) > self.policy.speech_dbfs:
            self.activity()

    def idle_for(self, *, busy: bool = False) -> float:
        """Seconds of caller silence since the agent's audio was last heard (0 while busy)."""
        now = time.monotonic()
        dtmf = self._dtmf_count()
        if dtmf != self._dtmf:
            self._dtmf = dtmf
            self.activity()
        if busy or getattr(self.session, "agent_audio_pending", False):
            self._since = now
            return 0.0
        return now - self._since

    def expired(self, *, busy: bool = False) -> bool:
        """True once the caller has been silent for the policy's timeout."""
        return self.idle_for(busy=busy) >= self.policy.timeout_s


def _instruction(what: str, text: str, silent_s: float) -> str:
    return f'[The caller has been silent for {silent_s:g} seconds. {what}: "{text}"]'


async def watch_realtime_idle(bridge: Any, policy: IdlePolicy) -> None:
    """Re-prompt an idle caller of a realtime agent, then hang up (a task of the bridge).

    ``bridge`` is the :class:`~voice_runtime.realtime.agent_bridge.AgentBridge` (its running
    tools and the time of its last agent audio are read here); a running tool pauses the
    clock, and so does a prompt until the agent's answer to it was heard.
    """
    session = bridge.session
    clock: IdleClock = bridge.idle_clock
    clock.attach()
    prompts = 0
    answered = clock.activity_count
    try:
        while not session.is_disconnected:
            await asyncio.sleep(POLL_S)
            if clock.activity_count != answered:
                answered, prompts = clock.activity_count, 0
            if not clock.expired(busy=bool(bridge._tool_tasks)):  # a running tool pauses it
                continue
            last = prompts >= policy.max_prompts
            what, text = ("Say goodbye", policy.goodbye) if last else ("Ask", policy.prompt)
            logger.info(
                "caller idle: hanging up" if last else "caller idle: prompting",
                extra={"call_sid": session.call_sid, "prompts": prompts},
            )
            asked = asyncio.get_running_loop().time()
            await bridge.agent.send_text(_instruction(what, text, policy.timeout_s))
            await _await_answer(bridge, asked, policy.timeout_s)
            if last:
                await _await_heard(bridge, policy)
                session.request_disconnect(after_playback=True)
                return
            prompts += 1
            answered = clock.activity_count
            clock.restart()
    finally:
        clock.detach()


async def _await_answer(bridge: Any, asked: float, limit_s: float) -> None:
    """Wait (at most ``limit_s``) until the agent's audio after ``asked`` starts arriving."""
    loop = asyncio.get_running_loop()
    while bridge._last_audio_at <= asked and loop.time() - asked < limit_s:
        if bridge.session.is_disconnected:
            return
        await asyncio.sleep(POLL_S)


async def _await_heard(bridge: Any, policy: IdlePolicy) -> None:
    """Wait until the goodbye stopped arriving (a short quiet) or the bridge's max wait."""
    loop = asyncio.get_running_loop()
    opts = bridge.options
    deadline = loop.time() + opts.hangup_max_wait_s
    quiet = min(opts.hangup_quiet_s, policy.timeout_s)
    while loop.time() < deadline and not bridge.session.is_disconnected:
        if loop.time() - bridge._last_audio_at >= quiet:
            return
        await asyncio.sleep(POLL_S)
