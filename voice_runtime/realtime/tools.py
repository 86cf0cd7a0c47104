"""Server-side tools for realtime agents: a registry, execution rules and two built-ins.

A :class:`Tool` is a JSON schema plus a sync or async callback. The model's arguments are
passed as keyword arguments; a callback that declares a ``context`` parameter also gets a
:class:`ToolContext` (the call's session and a way to end the call). Whatever happens, the
model gets an answer: results are JSON text, and an exception, a timeout or an unknown tool
becomes an error result instead of a silent hang.

Built-ins: :func:`end_call_tool` ends the call once the agent's last words have played;
:func:`transfer_call_tool` moves the caller to a number or SIP URI you configure (never one
the model makes up) through the call's control (``session.control``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from voice_runtime.realtime.events import ToolCall

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

DEFAULT_TOOL_TIMEOUT_S = 10.0
_EMPTY_SCHEMA: Mapping[str, Any] = MappingProxyType({"type": "object", "properties": {}})

__all__ = [
    "DEFAULT_TOOL_TIMEOUT_S",
    "Tool",
    "ToolContext",
    "ToolRegistry",
    "ToolResult",
    "ToolSpec",
    "end_call_tool",
    "transfer_call_tool",
]


@dataclass(frozen=True)
class ToolSpec:
    """What the model is told about a tool: name, description and JSON schema of its arguments."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: _EMPTY_SCHEMA)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"tool name must be letters, digits, _ or -, got {self.name!r}")
        if self.parameters.get("type", "object") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be an object schema")

    def as_function(self) -> dict[str, Any]:
        """The flat function declaration OpenAI-style realtime APIs take."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": _plain(self.parameters),
        }


@dataclass
class ToolContext:
    """What a tool callback may use besides its arguments."""

    session: VoiceSession | None
    call: ToolCall
    end_call: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def call_sid(self) -> str | None:
        """The Twilio call this tool runs for."""
        return None if self.session is None else self.session.call_sid


@dataclass(frozen=True)
class ToolResult:
    """The answer sent back to the model; ``output`` is JSON text."""

    call_id: str
    name: str
    output: str
    is_error: bool = False
    duration_ms: float = 0.0


ToolHandler = Callable[..., Any]


@dataclass(frozen=True)
class Tool(ToolSpec):
    """A tool the runtime executes: a spec, a callback and a timeout in seconds."""

    handler: ToolHandler = field(default=lambda: None, repr=False, compare=False)
    timeout: float = DEFAULT_TOOL_TIMEOUT_S

    @property
    def spec(self) -> ToolSpec:
        """The declaration alone, as the model sees it."""
        return ToolSpec(self.name, self.description, self.parameters)

    def _wants_context(self) -> bool:
        try:
            params = inspect.signature(self.handler).parameters
        except (TypeError, ValueError):
            return False
        return "context" in params


class ToolRegistry:
    """Tools by name, executed for the model with timeouts and error results."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            self.add(tool)

    def add(self, tool: Tool, *, replace: bool = False) -> Tool:
        """Add a tool; a duplicate name is an error unless ``replace``."""
        if tool.name in self._tools and not replace:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def register(
        self,
        name: str,
        handler: ToolHandler,
        *,
        description: str = "",
        parameters: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TOOL_TIMEOUT_S,
        replace: bool = False,
    ) -> Tool:
        """Register ``handler`` (sync or async) as tool ``name`` with its JSON schema."""
        return self.add(
            Tool(
                name=name,
                description=description,
                parameters=parameters or _EMPTY_SCHEMA,
                handler=handler,
                timeout=timeout,
            ),
            replace=replace,
        )

    def tool(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        timeout: float = DEFAULT_TOOL_TIMEOUT_S,
    ) -> Callable[[ToolHandler], ToolHandler]:
        """Decorator form of :meth:`register`; the description defaults to the docstring."""

        def decorate(fn: ToolHandler) -> ToolHandler:
            doc = (inspect.getdoc(fn) or "").strip()
            self.register(
                name or fn.__name__,
                fn,
                description=description if description is not None else doc,
                parameters=parameters,
                timeout=timeout,
            )
            return fn

        return decorate

    def remove(self, name: str) -> None:
        """Forget a tool (no error when it is not there)."""
        self._tools.pop(name, None)

    def get(self, name: str) -> Tool | None:
        """The tool called ``name``, or None."""
        return self._tools.get(name)

    def subset(self, names: Iterable[str]) -> ToolRegistry:
        """A registry holding only the named tools that exist here."""
        return ToolRegistry(self._tools[n] for n in names if n in self._tools)

    def specs(self) -> tuple[ToolSpec, ...]:
        """The declarations to give the model."""
        return tuple(t.spec for t in self._tools.values())

    def names(self) -> tuple[str, ...]:
        """Registered tool names, in registration order."""
        return tuple(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(tuple(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)

    async def execute(self, call: ToolCall, context: ToolContext | None = None) -> ToolResult:
        """Run the tool the model asked for; never raises for tool failures.

        Sync callbacks run in a worker thread, so a slow one does not stall the call.
        """
        started = time.perf_counter()
        tool = self._tools.get(call.name)
        if tool is None:
            return _error(call, f"unknown tool {call.name!r}", started)
        if context is None:
            context = ToolContext(None, call)
        kwargs = dict(call.arguments)
        if tool._wants_context():
            kwargs["context"] = context
        try:
            if inspect.iscoroutinefunction(tool.handler):
                value = await asyncio.wait_for(tool.handler(**kwargs), tool.timeout)
            else:
                value = await asyncio.wait_for(
                    asyncio.to_thread(_call_sync, tool.handler, kwargs), tool.timeout
                )
                if inspect.isawaitable(value):
                    value = await asyncio.wait_for(_await(value), tool.timeout)
        except TimeoutError:
            logger.warning("tool timed out", extra={"tool": call.name, "timeout": tool.timeout})
            return _error(call, f"tool {call.name!r} timed out after {tool.timeout:g}s", started)
        except asyncio.CancelledError:
            raise
        except TypeError as exc:
            # Usually arguments that do not match the callback's signature.
            logger.warning("tool rejected its arguments", extra={"tool": call.name})
            return _error(call, f"bad arguments for {call.name!r}: {exc}", started)
        except Exception as exc:
            logger.warning("tool failed", exc_info=True, extra={"tool": call.name})
            return _error(call, f"{type(exc).__name__}: {exc}", started)
        return ToolResult(call.call_id, call.name, _encode(value), False, _ms_since(started))


def _call_sync(fn: ToolHandler, kwargs: dict[str, Any]) -> Any:
    return fn(**kwargs)


async def _await(value: Awaitable[Any]) -> Any:
    return await value


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def _error(call: ToolCall, message: str, started: float) -> ToolResult:
    return ToolResult(
        call.call_id, call.name, json.dumps({"error": message}), True, _ms_since(started)
    )


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return json.dumps({"result": str(value)})


def _plain(value: Any) -> Any:
    """Mappings (possibly read-only proxies) to plain dicts, for JSON encoding."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------- built-ins


def end_call_tool(
    *,
    name: str = "end_call",
    description: str = (
        "End the phone call. Say goodbye first; the call ends after your last words are heard."
    ),
) -> Tool:
    """A tool that hangs up once the agent's final words have played."""

    def end_call(context: ToolContext, reason: str = "") -> dict[str, str]:
        context.end_call()
        return {"status": "ending"}

    return Tool(
        name=name,
        description=description,
        parameters={
            "type": "object",
            "properties": {"reason": {"type": "string", "description": "why the call ends"}},
        },
        handler=end_call,
        timeout=5.0,
    )


def transfer_call_tool(
    targets: str | Mapping[str, str],
    *,
    name: str = "transfer_call",
    description: str | None = None,
    caller_id: str | None = None,
    wait_for_playback_s: float = 5.0,
    timeout: float = 20.0,
) -> Tool:
    """A tool that transfers the caller to a configured destination through ``session.control``.

    ``targets`` is one number/SIP URI, or a mapping of destination names (shown to the model)
    to numbers/URIs. The model can only pick a name, never dial a number of its own. The
    transfer waits up to ``wait_for_playback_s`` for the agent's queued words to be heard.
    """
    destinations: dict[str, str] = (
        {"default": targets} if isinstance(targets, str) else dict(targets)
    )
    if not destinations or not all(v.strip() for v in destinations.values()):
        raise ValueError("transfer_call_tool needs at least one non-blank destination")
    properties: dict[str, Any] = {}
    required: list[str] = []
    if len(destinations) > 1:
        properties["destination"] = {"type": "string", "enum": sorted(destinations)}
        required.append("destination")
    desc = description or (
        "Transfer the caller to a human. Tell the caller first; the transfer starts after."
    )

    async def transfer_call(context: ToolContext, destination: str = "default") -> dict[str, str]:
        target = destinations.get(destination)
        if target is None and len(destinations) == 1:
            target = next(iter(destinations.values()))
        if target is None:
            return {"error": f"unknown destination {destination!r}"}
        session = context.session
        call_sid = context.call_sid
        if session is None or not call_sid:
            return {"error": "transfer is not available: no live call"}
        # The call-control contract the server layer installs when the stream starts: the
        # realtime side never talks to the Twilio REST API itself.
        control = getattr(session, "control", None)
        if control is None:
            return {"error": "transfer is not available: the call has no call control"}
        if session.agent_audio_pending and not session.is_disconnected:
            # Let the caller hear "transferring you now" before the line changes.
            try:
                await session.send_mark_and_wait_async("vr-transfer", wait_for_playback_s)
            except TimeoutError:
                pass
        transfer_async = getattr(control, "transfer_async", None)
        if transfer_async is not None:
            await transfer_async(target, caller_id=caller_id)
        else:
            await asyncio.to_thread(control.transfer, target, caller_id=caller_id)
        logger.info("call transferred by tool", extra={"call_sid": call_sid})
        return {"status": "transferring"}

    return Tool(
        name=name,
        description=desc,
        parameters={"type": "object", "properties": properties, "required": required},
        handler=transfer_call,
        timeout=timeout,
    )


def as_specs(tools: ToolRegistry | Sequence[ToolSpec] | None) -> tuple[ToolSpec, ...]:
    """Tool declarations from a registry or a sequence of specs/tools."""
    if tools is None:
        return ()
    if isinstance(tools, ToolRegistry):
        return tools.specs()
    return tuple(t.spec if isinstance(t, Tool) else t for t in tools)
