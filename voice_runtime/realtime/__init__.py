"""Realtime speech-to-speech agents on phone calls.

One protocol (:class:`RealtimeAgent`) and one event model (:mod:`.events`) for OpenAI
Realtime, Gemini Live, xAI Grok and ElevenLabs Agents; a registry by provider slug with a
fallback client; a bridge that puts an agent on a call with barge-in and truncation;
server-side tools; and host hooks (per-call resolver, lifecycle callbacks).

Quick start::

    from voice_runtime.realtime import (
        AgentOptions, ToolRegistry, attach_agent, create_agent, end_call_tool,
    )

    tools = ToolRegistry([end_call_tool()])
    agent = create_agent(["openai", "xai"], AgentOptions(instructions="…", tools=tools.specs()))
    result = await attach_agent(session, agent, tools=tools)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from voice_runtime.credentials import CREDENTIAL_VARIABLES
from voice_runtime.realtime.agent import AgentOptions, RealtimeAgent
from voice_runtime.realtime.bridge import (
    AgentBridge,
    BridgeOptions,
    BridgeResult,
    TranscriptLine,
    Truncation,
    attach_agent,
    attach_agent_sync,
    run_agent_call,
)
from voice_runtime.realtime.events import (
    AgentError,
    AgentEvent,
    AgentFailover,
    AssistantAudio,
    AssistantText,
    AssistantTurnEnd,
    SessionClosed,
    SessionOpened,
    ToolCall,
    ToolCallCancelled,
    Usage,
    UserSpeechStarted,
    UserSpeechStopped,
    UserTranscript,
)
from voice_runtime.realtime.hooks import (
    AgentPlan,
    CallRejectedError,
    LifecycleHooks,
    ParameterResolver,
    SessionResolver,
    SessionStarted,
    SessionStopped,
    ToolExecution,
    UsageReport,
)
from voice_runtime.realtime.registry import (
    FallbackAgent,
    create_agent,
    lookup,
    register,
    registered_providers,
)
from voice_runtime.realtime.tools import (
    Tool,
    ToolContext,
    ToolRegistry,
    ToolResult,
    ToolSpec,
    end_call_tool,
    transfer_call_tool,
)

if TYPE_CHECKING:
    from voice_runtime.realtime.elevenlabs_agent import ElevenLabsAgent
    from voice_runtime.realtime.gemini import GeminiLiveAgent
    from voice_runtime.realtime.openai import OpenAIRealtimeAgent
    from voice_runtime.realtime.xai import XaiRealtimeAgent

_VENDOR_CLASSES = {
    "OpenAIRealtimeAgent": "voice_runtime.realtime.openai",
    "XaiRealtimeAgent": "voice_runtime.realtime.xai",
    "GeminiLiveAgent": "voice_runtime.realtime.gemini",
    "ElevenLabsAgent": "voice_runtime.realtime.elevenlabs_agent",
}


def __getattr__(name: str) -> Any:
    module = _VENDOR_CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "CREDENTIAL_VARIABLES",
    "AgentBridge",
    "AgentError",
    "AgentEvent",
    "AgentFailover",
    "AgentOptions",
    "AgentPlan",
    "AssistantAudio",
    "AssistantText",
    "AssistantTurnEnd",
    "BridgeOptions",
    "BridgeResult",
    "CallRejectedError",
    "ElevenLabsAgent",
    "FallbackAgent",
    "GeminiLiveAgent",
    "LifecycleHooks",
    "OpenAIRealtimeAgent",
    "ParameterResolver",
    "RealtimeAgent",
    "SessionClosed",
    "SessionOpened",
    "SessionResolver",
    "SessionStarted",
    "SessionStopped",
    "Tool",
    "ToolCall",
    "ToolCallCancelled",
    "ToolContext",
    "ToolExecution",
    "ToolRegistry",
    "ToolResult",
    "ToolSpec",
    "TranscriptLine",
    "Truncation",
    "Usage",
    "UsageReport",
    "UserSpeechStarted",
    "UserSpeechStopped",
    "UserTranscript",
    "XaiRealtimeAgent",
    "attach_agent",
    "attach_agent_sync",
    "create_agent",
    "end_call_tool",
    "lookup",
    "register",
    "registered_providers",
    "run_agent_call",
    "transfer_call_tool",
]
