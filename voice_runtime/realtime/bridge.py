"""The bridge that puts a realtime agent on a call.

:func:`attach_agent` (and :func:`attach_agent_sync` for worker threads) runs until the call
or the agent ends:

* caller audio: ``session.inbound`` → ``agent.push_audio`` (μ-law, unchanged);
* agent audio: ``AssistantAudio`` → ``session.put_outbound``; the playback position
  (``session.played_ms``) comes from the transport's position marks, whose granularity the
  bridge asks for (``mark_every_ms``) from the session's playback ledger: one owner of
  position marks, which follow the transport's messages instead of splitting them;
* barge-in: on ``UserSpeechStarted`` the bridge clears Twilio and the local queue
  (``session.request_clear_buffer()``) and drops the rest of the audio of every item not yet
  heard to its end. A model that speaks, calls a tool and speaks again can have several items
  queued at once, so the bridge keeps each unfinished item's start on the playback axis
  (``session.queued_ms`` when its first audio was queued) and, for vendors that can (OpenAI,
  xAI), truncates each one at what the caller heard of it: ``played_ms`` (from mark echoes)
  minus its start, between 0 (not reached yet) and the audio queued for it;
* tools: each ``ToolCall`` runs in its own task through a :class:`ToolRegistry`; the result
  (or the error) goes back to the model;
* everything else goes to the callbacks and lifecycle hooks.

Every task the bridge starts ends when the call ends. The bridge consumes
``session.inbound``: do not run an STT on the same session at the same time.

This module holds the entry points; the bridge class is in
:mod:`voice_runtime.realtime.agent_bridge` and its values in
:mod:`voice_runtime.realtime.bridge_types` (all importable from here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from voice_runtime._sync import forbid_on_loop
from voice_runtime.errors import ConfigurationError, NoEventLoopError, ProviderError
from voice_runtime.realtime.agent import AgentOptions, RealtimeAgent
from voice_runtime.realtime.agent_bridge import MARK_NAME, MARK_TIMEOUT_S, AgentBridge, Callback
from voice_runtime.realtime.bridge_types import (
    BridgeOptions,
    BridgeResult,
    TranscriptLine,
    Truncation,
)
from voice_runtime.realtime.events import AgentError, Usage
from voice_runtime.realtime.hooks import (
    AgentPlan,
    CallRejectedError,
    LifecycleHooks,
    SessionResolver,
    SessionStopped,
    resolve_plan,
)
from voice_runtime.realtime.tools import ToolRegistry

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = [
    "MARK_NAME",
    "MARK_TIMEOUT_S",
    "AgentBridge",
    "BridgeOptions",
    "BridgeResult",
    "TranscriptLine",
    "Truncation",
    "attach_agent",
    "attach_agent_sync",
    "run_agent_call",
]


async def attach_agent(
    session: VoiceSession,
    agent: RealtimeAgent,
    *,
    tools: ToolRegistry | None = None,
    hooks: LifecycleHooks | None = None,
    on_event: Callback | None = None,
    on_transcript: Callback | None = None,
    options: BridgeOptions | None = None,
) -> BridgeResult:
    """Bridge ``agent`` onto the call of ``session`` until either ends (session's loop only).

    Starts the agent unless ``options.start_agent`` is False, and closes it at the end
    unless ``options.close_agent`` is False. Callbacks may be sync or async; keep them fast,
    they run in line with the agent's audio.
    """
    bridge = AgentBridge(
        session,
        agent,
        tools=tools,
        hooks=hooks,
        on_event=on_event,
        on_transcript=on_transcript,
        options=options or BridgeOptions(),
    )
    return await bridge.run()


def attach_agent_sync(
    session: VoiceSession,
    agent: RealtimeAgent | Callable[[], RealtimeAgent],
    *,
    timeout: float | None = None,
    **kwargs: Any,
) -> BridgeResult:
    """Blocking twin of :func:`attach_agent` for worker threads: runs it on the session's loop.

    ``agent`` may be a zero-argument factory, called on the loop (agents bind to the loop
    they start on). Raises NoEventLoopError before the stream connected, LoopThreadError on
    the loop thread, TimeoutError after ``timeout`` seconds (the bridge is then stopped).
    """
    loop = session.loop
    if loop is None:
        raise NoEventLoopError(
            "attach_agent_sync() needs the session's event loop: call wait_for_ws_connect() first"
        )
    forbid_on_loop(loop, "attach_agent_sync", "attach_agent")

    async def _run() -> BridgeResult:
        real = agent() if callable(agent) and not hasattr(agent, "push_audio") else agent
        return await attach_agent(session, real, **kwargs)  # type: ignore[arg-type]

    future = asyncio.run_coroutine_threadsafe(_run(), loop)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


async def run_agent_call(
    session: VoiceSession,
    plan: AgentPlan | SessionResolver | None = None,
    *,
    providers: str | Sequence[str] = ("openai",),
    options: AgentOptions | None = None,
    tools: ToolRegistry | None = None,
    hooks: LifecycleHooks | None = None,
    on_event: Callback | None = None,
    on_transcript: Callback | None = None,
    bridge_options: BridgeOptions | None = None,
    connect_timeout: float = 30.0,
) -> BridgeResult:
    """The host entry point for one call: resolve the plan, build the agent, bridge it.

    ``plan`` is an :class:`AgentPlan`, a resolver (called with the session once the stream
    started) or None (then ``providers``/``options``/``tools`` make the plan). A resolver
    that raises :class:`CallRejectedError` ends the call at once.
    """
    from voice_runtime.realtime.registry import create_agent

    await session.wait_for_ws_connect_async(connect_timeout)
    try:
        if plan is None:
            opts = options or AgentOptions()
            if tools is not None:
                opts = opts.replace(tools=tools.specs())
            names = (providers,) if isinstance(providers, str) else tuple(providers)
            resolved = AgentPlan(names, opts, tools)
        elif isinstance(plan, AgentPlan):
            resolved = plan
        else:
            resolved = await resolve_plan(plan, session)
    except CallRejectedError:
        logger.warning(
            "call rejected by the session resolver", extra={"call_sid": session.call_sid}
        )
        session.request_disconnect()
        result = BridgeResult(provider="", reason="rejected", duration_s=0.0, usage=Usage())
        if hooks is not None:
            await hooks.emit(
                "on_session_stopped",
                SessionStopped(session.call_sid, "", 0.0, Usage(), "rejected"),
            )
        return result
    agent_options = resolved.options
    if resolved.tools is not None and not agent_options.tools:
        agent_options = agent_options.replace(tools=resolved.tools.specs())
    try:
        agent = create_agent(
            list(resolved.providers), agent_options, provider_kwargs=resolved.provider_kwargs
        )
    except (ConfigurationError, ProviderError) as exc:
        # e.g. a missing credential: the call cannot have an agent.
        error = AgentError(str(exc), fatal=True, provider=",".join(resolved.providers))
        logger.warning("realtime agent could not be created", extra={"call_sid": session.call_sid})
        if bridge_options is None or bridge_options.hangup_on_fatal:
            session.request_disconnect()
        if hooks is not None:
            await hooks.emit(
                "on_session_stopped",
                SessionStopped(session.call_sid, "", 0.0, Usage(), "agent_failed", error),
            )
        return BridgeResult("", "agent_failed", 0.0, Usage(), error)
    return await attach_agent(
        session,
        agent,
        tools=resolved.tools,
        hooks=hooks,
        on_event=on_event,
        on_transcript=on_transcript,
        options=bridge_options,
    )
