"""The bridge between one realtime agent and one call: :class:`AgentBridge`.

How it moves audio, handles barge-in and runs tools is described in
:mod:`voice_runtime.realtime.bridge`, whose entry points (``attach_agent``,
``run_agent_call``) build and run it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from voice_runtime._compat import clear_for_barge_in
from voice_runtime.errors import ConfigurationError, ProviderError, SessionError
from voice_runtime.idle import IdleClock, watch_realtime_idle
from voice_runtime.logutil import LogLimiter, describe_error
from voice_runtime.playback import PlaybackLedger
from voice_runtime.realtime.agent import RealtimeAgent
from voice_runtime.realtime.bridge_types import (
    AgentItem,
    BridgeOptions,
    BridgeResult,
    TranscriptLine,
    Truncation,
)
from voice_runtime.realtime.call_events import call_events_of, connected, publish, tool_ran
from voice_runtime.realtime.events import (
    AgentError,
    AgentEvent,
    AgentFailover,
    AssistantAudio,
    AssistantText,
    AssistantTurnEnd,
    SessionOpened,
    ToolCall,
    ToolCallCancelled,
    Usage,
    UserSpeechStarted,
    UserTranscript,
)
from voice_runtime.realtime.hooks import (
    LifecycleHooks,
    SessionStarted,
    SessionStopped,
    ToolExecution,
    UsageReport,
)
from voice_runtime.realtime.tools import ToolContext, ToolRegistry, ToolResult

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

# The name these logs had before the bridge class moved out of realtime/bridge.py.
logger = logging.getLogger("voice_runtime.realtime.bridge")

# The piece length a session without a playback ledger gets a position mark after.
DUCK_MARK_EVERY_MS = 20.0

MARK_NAME = "vr-rt"
MARK_TIMEOUT_S = 3600.0
_MAX_INTERRUPTED = 64
# Unfinished items tracked at once; vendors queue one or two, so this only bounds a runaway.
_MAX_ITEMS = 64

__all__ = ["MARK_NAME", "MARK_TIMEOUT_S", "AgentBridge", "Callback"]


Callback = Callable[[Any], Any]


@dataclass(eq=False)
class AgentBridge:
    """One agent bridged onto one call; :meth:`run` until either ends."""

    session: VoiceSession
    agent: RealtimeAgent
    tools: ToolRegistry | None = None
    hooks: LifecycleHooks | None = None
    on_event: Callback | None = None
    on_transcript: Callback | None = None
    options: BridgeOptions = field(default_factory=BridgeOptions)

    def __post_init__(self) -> None:
        self.usage = Usage()
        self.error: AgentError | None = None
        self.barge_ins = 0
        self.truncations: list[Truncation] = []
        self.tool_calls = 0
        self.dropped_audio_ms = 0.0
        self._failures = LogLimiter(first=1, every=1000)
        # Items whose audio may still be unheard, in queue order.
        self._items: collections.OrderedDict[str, AgentItem] = collections.OrderedDict()
        self._interrupted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._mark_tasks: set[asyncio.Task[Any]] = set()
        self._tool_tasks: dict[str, asyncio.Task[Any]] = {}
        self._hangup_task: asyncio.Task[None] | None = None
        self._hangup_after: str | None = None
        self._turn_end = asyncio.Event()
        self._last_audio_at = 0.0
        self._provider = ""
        self._events = call_events_of(self.session)
        every = self.options.mark_every_ms
        # Duck-typed sessions have no ledger: the bridge marks pieces of this length itself.
        self._step = int((DUCK_MARK_EVERY_MS if every is None else every) * 8)
        self._protect_next = not self.options.greeting_interruptible
        self._protected_response: str | None = None
        idle = self.options.idle
        self.idle_clock = None if idle is None else IdleClock(self.session, idle)

    @property
    def provider(self) -> str:
        """The provider of the agent (the active one, behind a fallback)."""
        return str(getattr(self.agent, "provider", "")) or self._provider

    # ------------------------------------------------------------------ run

    async def run(self) -> BridgeResult:
        """Bridge until the call ends or the agent closes; return what happened."""
        session = self.session
        loop = asyncio.get_running_loop()
        if session.loop is not None and session.loop is not loop:
            raise SessionError("attach_agent must run on the session's event loop")
        started = time.monotonic()
        stream = self.agent.events()
        reason = "agent_closed"
        try:
            if self.options.start_agent:
                try:
                    if not await self._start_unless_call_ends():
                        return await self._finish("call_ended", started)
                except (ProviderError, ConfigurationError) as exc:
                    self.error = AgentError(
                        str(exc),
                        fatal=True,
                        code=getattr(exc, "code", None),
                        retryable=bool(getattr(exc, "retryable", False)),
                        provider=self.provider,
                    )
                    logger.warning(
                        "realtime agent %s could not start: %s",
                        self.provider,
                        describe_error(exc),
                        extra={"call_sid": session.call_sid, "provider": self.provider},
                    )
                    await self._deliver(self.error)
                    if self.options.hangup_on_fatal:
                        session.request_disconnect(after_playback=True)
                    return await self._finish("agent_failed", started)
            self._provider = self.provider
            if self.hooks is not None:
                await self.hooks.emit(
                    "on_session_started",
                    SessionStarted(session.call_sid, self.provider, time.time()),
                )
            ledger = getattr(session, "playback", None)
            if isinstance(ledger, PlaybackLedger):
                if self.options.mark_every_ms:
                    ledger.request_granularity(self.options.mark_every_ms)
                self._step = 0  # the transport marks; audio goes out whole
            uplink = self._spawn(self._uplink(), "vr-rt-uplink")
            downlink = self._spawn(self._downlink(stream), "vr-rt-downlink")
            watch = self._spawn(session.wait_until_disconnected_async(), "vr-rt-watch")
            if self.options.idle is not None:
                self._spawn(watch_realtime_idle(self, self.options.idle), "vr-rt-idle")
            await asyncio.wait({uplink, downlink, watch}, return_when=asyncio.FIRST_COMPLETED)
            if session.is_disconnected:
                reason = "call_ended"
            elif downlink.done():
                reason = "agent_failed" if self.error is not None else "agent_closed"
            else:
                reason = "call_ended"
            return await self._finish(reason, started)
        finally:
            await self._cleanup(stream)

    async def _start_unless_call_ends(self) -> bool:
        """Start the agent; False (and no agent) when the caller hangs up first."""
        t0 = time.monotonic()
        start = asyncio.ensure_future(self.agent.start())
        ended = asyncio.ensure_future(self.session.wait_until_disconnected_async())
        try:
            await asyncio.wait({start, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if start.done():
            connected(self._events, self.provider, start, t0)
            start.result()  # raises the start error, if any
            return True
        start.cancel()
        with contextlib.suppress(BaseException):
            await start
        return False

    async def _finish(self, reason: str, started: float) -> BridgeResult:
        duration = time.monotonic() - started
        result = BridgeResult(
            provider=self._provider or self.provider,
            reason=reason,
            duration_s=duration,
            usage=self.usage,
            error=self.error,
            barge_ins=self.barge_ins,
            truncations=tuple(self.truncations),
            tool_calls=self.tool_calls,
            bad_messages=dict(getattr(self.agent, "bad_messages", None) or {}),
        )
        logger.info(
            "realtime bridge finished",
            extra={
                "call_sid": self.session.call_sid,
                "provider": result.provider,
                "reason": reason,
                "duration_s": round(duration, 3),
                "bad_vendor_messages": sum(result.bad_messages.values()),
            },
        )
        if self.hooks is not None:
            await self.hooks.emit(
                "on_session_stopped",
                SessionStopped(
                    self.session.call_sid, result.provider, duration, self.usage, reason, self.error
                ),
            )
        return result

    async def _cleanup(self, stream: Any) -> None:
        current = asyncio.current_task()
        tasks = [t for t in (*self._tasks, *self._tool_tasks.values()) if t is not current]
        if self._hangup_task is not None and not self.session.is_disconnected:
            # An end_call in progress must still end the call.
            tasks = [t for t in tasks if t is not self._hangup_task]
        elif self._hangup_task is not None:
            tasks.append(self._hangup_task)
        if self.session.is_disconnected:
            tasks.extend(self._mark_tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.options.close_agent:
            with contextlib.suppress(Exception):
                await self.agent.close()
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ caller → agent

    async def _uplink(self) -> None:
        inbound = self.session.inbound
        agent = self.agent
        while True:
            frame = await inbound.get()
            if frame is None:
                with contextlib.suppress(asyncio.QueueFull):
                    inbound.put_nowait(None)  # others may wait for the end too
                return
            await agent.push_audio(frame)

    # ------------------------------------------------------------------ agent → call

    async def _downlink(self, stream: Any) -> None:
        async for event in stream:
            try:
                await self._dispatch(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Once per call is enough to see the traceback; a fault per event would flood.
                if self._failures.allow("dispatch"):
                    logger.exception(
                        "realtime event handling failed", extra={"call_sid": self.session.call_sid}
                    )

    async def _dispatch(self, event: AgentEvent) -> None:
        kind = type(event)
        if self.idle_clock is not None and kind in (UserSpeechStarted, UserTranscript):
            self.idle_clock.activity()
        if kind is AssistantAudio:
            await self._play(event)  # type: ignore[arg-type]
        elif kind is UserSpeechStarted:
            await self._barge_in(event)  # type: ignore[arg-type]
        elif kind is AssistantTurnEnd:
            self._on_turn_end(event)  # type: ignore[arg-type]
        elif kind is ToolCall:
            self._on_tool_call(event)  # type: ignore[arg-type]
        elif kind is ToolCallCancelled:
            for call_id in event.call_ids:  # type: ignore[union-attr]
                task = self._tool_tasks.pop(call_id, None)
                if task is not None:
                    task.cancel()
        elif kind is Usage:
            await self._on_usage(event)  # type: ignore[arg-type]
        elif kind is AgentError:
            err: AgentError = event  # type: ignore[assignment]
            if err.fatal:
                self.error = err
                if self.options.hangup_on_fatal:
                    self.session.request_disconnect(after_playback=True)
        elif kind is AgentFailover or kind is SessionOpened:
            # A new vendor session: item ids of the old one mean nothing now.
            self._items.clear()
        elif kind is UserTranscript:
            ut: UserTranscript = event  # type: ignore[assignment]
            await self._transcript(TranscriptLine("user", ut.text, ut.final, ut.item_id))
        elif kind is AssistantText:
            at: AssistantText = event  # type: ignore[assignment]
            await self._transcript(TranscriptLine("assistant", at.text, at.final, at.item_id))
        publish(self._events, event, self.provider)
        await self._deliver(event)

    async def _play(self, event: AssistantAudio) -> None:
        session = self.session
        key = event.item_id or event.response_id or "_"
        if (
            key in self._interrupted
            or (event.response_id is not None and event.response_id in self._interrupted)
            or session.is_disconnected
        ):
            self.dropped_audio_ms += event.duration_ms
            return
        item = self._items.get(key)
        if item is None:
            item = self._track(key, event)
        self._last_audio_at = asyncio.get_running_loop().time()
        audio = event.audio
        step = self._step
        if not step:
            await session.put_outbound(audio)
            item.queued_ms += len(audio) / 8.0
            if item.protected and item.generation == session.clear_generation:
                session.playback.protect_through(item.start_ms + item.queued_ms)
            return
        # Only sessions without a playback ledger get here (duck types): marks of their own.
        position_mark = getattr(session, "queue_position_mark", None)
        for i in range(0, len(audio), step):
            chunk = audio[i : i + step]
            await session.put_outbound(chunk)
            item.queued_ms += len(chunk) / 8.0
            if position_mark is not None:
                position_mark()  # no waiter: its echo only moves played_ms
                continue
            task = asyncio.create_task(self._await_mark(), name="vr-rt-mark")
            self._mark_tasks.add(task)
            task.add_done_callback(self._mark_tasks.discard)
            # Let the mark task queue its mark now, right behind this chunk.
            await asyncio.sleep(0)

    async def _await_mark(self) -> None:
        with contextlib.suppress(TimeoutError):
            await self.session.send_mark_and_wait_async(MARK_NAME, MARK_TIMEOUT_S)

    async def _barge_in(self, event: UserSpeechStarted) -> None:
        named = (event.interrupted_item_id, event.interrupted_response_id)
        await self._interrupt([key for key in named if key], cancel=False)

    async def interrupt(self) -> None:
        """Barge in by hand: clear the call's audio, truncate, and cancel the response."""
        await self._interrupt([], cancel=True)

    def protect_next_response(self) -> None:
        """Make the next response the agent starts uninterruptible (a disclosure, say)."""
        self._protect_next = True

    def _track(self, key: str, event: AssistantAudio) -> AgentItem:
        """Start tracking a new item whose first audio is about to be queued."""
        session = self.session
        played = session.played_ms
        generation = session.clear_generation
        for old in list(self._items.values()):
            old.done = True  # items play one after another: a later one began, this one ended
            # Heard whole: nothing left to cut. From before a clear the bridge did not make:
            # the axis restarted, so its position no longer says what was heard.
            if old.fully_heard(played) or old.generation != generation:
                del self._items[old.key]
        while len(self._items) >= _MAX_ITEMS:
            self._items.popitem(last=False)
        item = AgentItem(key, event.item_id, event.response_id, session.queued_ms, generation)
        rid = event.response_id
        if self._protect_next or (rid is not None and rid == self._protected_response):
            item.protected, self._protect_next, self._protected_response = True, False, rid
        self._items[key] = item
        return item

    async def _interrupt(self, vendor_keys: list[str], *, cancel: bool) -> None:
        """Cut every unfinished item; ``vendor_keys`` name items/responses the vendor cut."""
        session = self.session
        played = session.played_ms
        generation = session.clear_generation
        truncations: list[Truncation] = []
        # Unheard uninterruptible items stay; while they play nothing can be cleared, so what
        # is queued behind them plays too and is truncated at its end, not at what was heard.
        kept = {
            k: i
            for k, i in self._items.items()
            if i.protected
            and i.generation == generation
            and not cancel
            and not i.fully_heard(played)
        }
        for item in self._items.values():
            current = item.generation == generation
            if item.key in kept or (current and item.fully_heard(played)):
                continue
            # The rest of this item must not play, whether it was reached or not.
            self._remember_interrupted(item.key)
            # An item cut by someone else's clear has no known position: left uncut.
            if current and self.agent.supports_truncate and item.item_id:
                end = item.queued_ms if kept else item.heard_ms(played)
                truncations.append(Truncation(item.item_id, int(end), played))
        self._items.clear()
        self._items.update(kept)
        protected_ids = {i.item_id for i in kept.values()} | {i.response_id for i in kept.values()}
        for key in vendor_keys:  # last, so the bound on remembered keys keeps them
            if key not in protected_ids:
                self._remember_interrupted(key)
        pending = session.agent_audio_pending
        if pending:
            if cancel:  # interrupt() by hand clears everything
                session.request_clear_buffer()
            else:  # a barge-in keeps uninterruptible audio
                clear_for_barge_in(session)
        for truncation in truncations:
            await self.agent.truncate(truncation.item_id, truncation.audio_end_ms)
            self.truncations.append(truncation)
        if cancel:
            await self.agent.cancel()
        if pending or truncations:
            self.barge_ins += 1
            publish(self._events, "barge_in", self.provider, played_ms=played)
            logger.info(
                "caller barged in",
                extra={
                    "call_sid": session.call_sid,
                    "audio_end_ms": truncations[0].audio_end_ms if truncations else None,
                    "items_truncated": len(truncations),
                },
            )

    def _remember_interrupted(self, key: str) -> None:
        self._interrupted[key] = None
        while len(self._interrupted) > _MAX_INTERRUPTED:
            self._interrupted.popitem(last=False)

    def _on_turn_end(self, event: AssistantTurnEnd) -> None:
        items = self._items
        if event.item_id is None and event.response_id is None:
            if items:
                next(reversed(items.values())).done = True  # the latest item
        else:
            for item in items.values():
                if (event.item_id is not None and event.item_id == item.item_id) or (
                    event.response_id is not None and event.response_id == item.response_id
                ):
                    item.done = True
        after = self._hangup_after
        if after is not None and after not in (event.response_id, event.item_id):
            self._turn_end.set()

    # ------------------------------------------------------------------ tools

    def _on_tool_call(self, call: ToolCall) -> None:
        previous = self._tool_tasks.get(call.call_id)
        if previous is not None and not previous.done():
            return  # the same call announced twice
        task = asyncio.create_task(self._run_tool(call), name=f"vr-rt-tool-{call.name}")
        self._tool_tasks[call.call_id] = task
        task.add_done_callback(functools.partial(self._forget_tool, call.call_id))

    def _forget_tool(self, call_id: str, task: asyncio.Task[Any]) -> None:
        if self._tool_tasks.get(call_id) is task:
            del self._tool_tasks[call_id]

    async def _run_tool(self, call: ToolCall) -> None:
        context = ToolContext(self.session, call, end_call=lambda: self._request_end_call(call))
        if self.tools is None:
            result = ToolResult(
                call.call_id, call.name, '{"error": "no tools are available"}', True, 0.0
            )
        else:
            result = await self.tools.execute(call, context)
        self.tool_calls += 1
        tool_ran(self._events, self.provider, call.name, result)
        await self.agent.send_tool_result(
            call.call_id, result.output, name=call.name, is_error=result.is_error
        )
        if self.hooks is not None:
            await self.hooks.emit(
                "on_tool_executed",
                ToolExecution(
                    self.session.call_sid,
                    self.provider,
                    call.name,
                    call.call_id,
                    call.arguments,
                    result.output,
                    result.is_error,
                    result.duration_ms,
                ),
            )

    def _request_end_call(self, call: ToolCall) -> None:
        """Called from the end_call tool (possibly on a worker thread)."""
        loop = self.session.loop
        if loop is None:
            self.session.request_disconnect(after_playback=True)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._start_hangup, call)

    def _start_hangup(self, call: ToolCall) -> None:
        if self._hangup_task is not None or self.session.is_disconnected:
            return
        self._hangup_after = call.response_id or f"tool:{call.call_id}"
        self._turn_end.clear()
        self._hangup_task = asyncio.create_task(self._hang_up_after_goodbye(), name="vr-rt-hangup")

    async def _hang_up_after_goodbye(self) -> None:
        loop = asyncio.get_running_loop()
        opts = self.options
        requested = loop.time()
        deadline = requested + opts.hangup_max_wait_s
        while loop.time() < deadline and not self.session.is_disconnected:
            if self._turn_end.is_set():
                break
            quiet_since = max(self._last_audio_at, requested)
            if loop.time() - quiet_since >= opts.hangup_quiet_s:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._turn_end.wait(), 0.05)
        logger.info("ending the call for the agent", extra={"call_sid": self.session.call_sid})
        self.session.request_disconnect(after_playback=True)

    # ------------------------------------------------------------------ callbacks

    async def _on_usage(self, usage: Usage) -> None:
        self.usage = self.usage + usage
        if self.hooks is not None:
            await self.hooks.emit(
                "on_usage", UsageReport(self.session.call_sid, self.provider, usage, self.usage)
            )

    async def _transcript(self, line: TranscriptLine) -> None:
        if self.on_transcript is not None and line.text:
            await self._call(self.on_transcript, line)

    async def _deliver(self, event: AgentEvent) -> None:
        if self.on_event is not None:
            await self._call(self.on_event, event)

    async def _call(self, callback: Callback, value: Any) -> None:
        try:
            result = callback(value)
            if inspect.isawaitable(result):
                await result
        except Exception:
            if self._failures.allow("callback"):
                logger.exception(
                    "realtime callback failed", extra={"call_sid": self.session.call_sid}
                )
