"""Host hooks: choose the agent per call, and hear about each call's lifecycle.

A **session resolver** runs once per call, after the stream's ``start`` message, and returns
an :class:`AgentPlan` (providers in fallback order, options, tools) or raises
:class:`CallRejectedError` to refuse the call. :class:`ParameterResolver` is a ready-made
one that reads the ``<Parameter>`` values of the TwiML (``session.call_info.custom_parameters``):
an optional shared-secret check, then optional overrides of provider, instructions, tools,
voice, greeting and language, each allowed only if you allow it.

**Lifecycle callbacks** (:class:`LifecycleHooks`) get small frozen records: the session
started, usage (normalised across vendors, per response and running total), a tool was
executed, the session stopped (with its duration). Callbacks may be plain functions or
coroutines; an exception in one is logged and never breaks the call.
"""

from __future__ import annotations

import hmac
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from voice_runtime.errors import SessionError
from voice_runtime.realtime.agent import AgentOptions
from voice_runtime.realtime.events import AgentError, Usage
from voice_runtime.realtime.tools import ToolRegistry

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

_EMPTY: Mapping[str, Any] = MappingProxyType({})

__all__ = [
    "AgentPlan",
    "CallRejectedError",
    "LifecycleHooks",
    "ParameterResolver",
    "SessionResolver",
    "SessionStarted",
    "SessionStopped",
    "ToolExecution",
    "UsageReport",
    "resolve_plan",
]


class CallRejectedError(SessionError):
    """A session resolver refused the call (bad token, unknown tenant, …)."""


@dataclass(frozen=True)
class AgentPlan:
    """What agent a call gets: providers in fallback order, options and tools."""

    providers: tuple[str, ...] = ("openai",)
    options: AgentOptions = field(default_factory=AgentOptions)
    tools: ToolRegistry | None = None
    provider_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _EMPTY)
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY)

    def __post_init__(self) -> None:
        providers = (self.providers,) if isinstance(self.providers, str) else tuple(self.providers)
        if not providers:
            raise ValueError("AgentPlan needs at least one provider")
        object.__setattr__(self, "providers", providers)


SessionResolver = Callable[["VoiceSession"], "AgentPlan | Awaitable[AgentPlan]"]


async def resolve_plan(resolver: SessionResolver, session: VoiceSession) -> AgentPlan:
    """Run a sync or async resolver."""
    plan = resolver(session)
    if inspect.isawaitable(plan):
        plan = await plan
    if not isinstance(plan, AgentPlan):
        raise TypeError(f"session resolver returned {type(plan).__name__}, not AgentPlan")
    return plan


class ParameterResolver:
    """Builds each call's plan from defaults and the stream's custom parameters.

    Parameters read (names configurable through ``parameter_names``): ``auth_token``,
    ``provider``, ``instructions``, ``tools`` (comma-separated names, a subset of
    ``tools``), ``voice``, ``greeting``, ``language``. A parameter is honoured only when
    its ``allow_*`` switch is on; ``provider`` must be in ``allowed_providers``. With
    ``secret`` set, a call whose ``auth_token`` does not match is rejected.
    """

    def __init__(
        self,
        *,
        providers: str | Iterable[str] = ("openai",),
        options: AgentOptions | None = None,
        tools: ToolRegistry | None = None,
        secret: str | None = None,
        allowed_providers: Iterable[str] | None = None,
        allow_instructions: bool = False,
        allow_tools: bool = False,
        allow_voice: bool = True,
        allow_greeting: bool = False,
        allow_language: bool = True,
        provider_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        parameter_names: Mapping[str, str] | None = None,
    ) -> None:
        self.providers = (providers,) if isinstance(providers, str) else tuple(providers)
        self.options = options or AgentOptions()
        self.tools = tools
        self.secret = secret
        self.allowed_providers = frozenset(allowed_providers or ())
        self.allow_instructions = allow_instructions
        self.allow_tools = allow_tools
        self.allow_voice = allow_voice
        self.allow_greeting = allow_greeting
        self.allow_language = allow_language
        self.provider_kwargs = dict(provider_kwargs or {})
        names = {
            "auth_token": "auth_token",
            "provider": "provider",
            "instructions": "instructions",
            "tools": "tools",
            "voice": "voice",
            "greeting": "greeting",
            "language": "language",
        }
        names.update(parameter_names or {})
        self.names = names

    def __call__(self, session: VoiceSession) -> AgentPlan:
        """The plan for this call, or CallRejectedError."""
        info = session.call_info
        params: Mapping[str, str] = info.custom_parameters if info is not None else _EMPTY
        n = self.names
        if self.secret is not None:
            token = params.get(n["auth_token"], "")
            if not hmac.compare_digest(token.encode(), self.secret.encode()):
                raise CallRejectedError("call rejected: missing or wrong auth token")
        providers = self.providers
        wanted = params.get(n["provider"])
        if wanted:
            if wanted not in self.allowed_providers:
                raise CallRejectedError("call rejected: provider not allowed")
            providers = (wanted, *(p for p in self.providers if p != wanted))
        changes: dict[str, Any] = {}
        if self.allow_instructions and params.get(n["instructions"]):
            changes["instructions"] = params[n["instructions"]]
        if self.allow_voice and params.get(n["voice"]):
            changes["voice"] = params[n["voice"]]
        if self.allow_greeting and params.get(n["greeting"]):
            changes["greeting"] = params[n["greeting"]]
        if self.allow_language and params.get(n["language"]):
            changes["language"] = params[n["language"]]
        tools = self.tools
        requested = params.get(n["tools"])
        if self.allow_tools and requested is not None and tools is not None:
            tools = tools.subset(t.strip() for t in requested.split(",") if t.strip())
        if tools is not None:
            changes["tools"] = tools.specs()
        options = self.options.replace(**changes) if changes else self.options
        return AgentPlan(providers, options, tools, self.provider_kwargs, dict(params))


# ---------------------------------------------------------------------------- lifecycle


@dataclass(frozen=True)
class SessionStarted:
    """An agent session began on a call."""

    call_sid: str | None
    provider: str
    started_at: float  # Unix time


@dataclass(frozen=True)
class UsageReport:
    """Usage of one response (``usage``) and of the whole call so far (``total``)."""

    call_sid: str | None
    provider: str
    usage: Usage
    total: Usage


@dataclass(frozen=True)
class ToolExecution:
    """A tool ran for the model."""

    call_sid: str | None
    provider: str
    name: str
    call_id: str
    arguments: Mapping[str, Any]
    output: str
    is_error: bool
    duration_ms: float


@dataclass(frozen=True)
class SessionStopped:
    """An agent session ended; ``reason`` is call_ended, agent_closed, agent_failed or rejected."""

    call_sid: str | None
    provider: str
    duration_s: float
    usage: Usage
    reason: str
    error: AgentError | None = None


Callback = Callable[[Any], Any]


@dataclass
class LifecycleHooks:
    """Callbacks for a call's agent lifecycle; each may be sync or async."""

    on_session_started: Callable[[SessionStarted], Any] | None = None
    on_usage: Callable[[UsageReport], Any] | None = None
    on_tool_executed: Callable[[ToolExecution], Any] | None = None
    on_session_stopped: Callable[[SessionStopped], Any] | None = None

    async def emit(self, name: str, record: Any) -> None:
        """Deliver ``record`` to the callback ``name``; failures are logged, not raised."""
        callback: Callback | None = getattr(self, name, None)
        if callback is None:
            return
        try:
            result = callback(record)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("lifecycle callback failed", extra={"callback": name})
