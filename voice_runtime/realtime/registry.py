"""Realtime agents by provider slug, and a client that falls back to the next provider.

Built-in slugs: ``openai``, ``xai`` (alias ``grok``), ``gemini`` (alias ``google``) and
``elevenlabs``. Vendor modules are imported only when their slug is first used.
:func:`register` adds your own (any callable ``factory(options, **kwargs)`` returning a
:class:`~voice_runtime.realtime.agent.RealtimeAgent`).

:class:`FallbackAgent` tries its candidates in order until one starts. With
``failover_mid_call`` it also replaces a session that dies during the call by the next
provider's, so the caller keeps talking to someone (the conversation context is lost; the
new session says ``failover_greeting`` if set, otherwise waits for the caller).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, cast

from voice_runtime.errors import ConfigurationError, ProviderConnectionError, ProviderError
from voice_runtime.logutil import clip, describe_error
from voice_runtime.realtime.agent import AgentOptions, RealtimeAgent
from voice_runtime.realtime.events import AgentError, AgentEvent, AgentFailover, SessionClosed

logger = logging.getLogger(__name__)

AgentFactory = Callable[..., RealtimeAgent]

__all__ = [
    "AgentFactory",
    "FallbackAgent",
    "create_agent",
    "lookup",
    "register",
    "registered_providers",
]

_BUILTIN: dict[str, str] = {
    "openai": "voice_runtime.realtime.openai:OpenAIRealtimeAgent",
    "xai": "voice_runtime.realtime.xai:XaiRealtimeAgent",
    "gemini": "voice_runtime.realtime.gemini:GeminiLiveAgent",
    "elevenlabs": "voice_runtime.realtime.elevenlabs_agent:ElevenLabsAgent",
}
_ALIASES: dict[str, str] = {"grok": "xai", "google": "gemini", "elevenlabs_agents": "elevenlabs"}
_REGISTRY: dict[str, AgentFactory | str] = dict(_BUILTIN)


def _slug(provider: str) -> str:
    slug = provider.strip().lower().replace("-", "_")
    return _ALIASES.get(slug, slug)


def register(provider: str, factory: AgentFactory, *, replace: bool = False) -> None:
    """Register ``factory(options, **kwargs) -> RealtimeAgent`` under a provider slug."""
    slug = _slug(provider)
    if not slug:
        raise ValueError("provider slug must not be empty")
    if slug in _REGISTRY and not replace:
        raise ValueError(f"realtime provider {slug!r} is already registered")
    _REGISTRY[slug] = factory


def unregister(provider: str) -> None:
    """Remove a slug; built-ins come back with their default factory."""
    slug = _slug(provider)
    if slug in _BUILTIN:
        _REGISTRY[slug] = _BUILTIN[slug]
    else:
        _REGISTRY.pop(slug, None)


def registered_providers() -> tuple[str, ...]:
    """The registered provider slugs, sorted."""
    return tuple(sorted(_REGISTRY))


def lookup(provider: str) -> AgentFactory:
    """The factory of a provider slug; ConfigurationError naming the known slugs otherwise."""
    slug = _slug(provider)
    entry = _REGISTRY.get(slug)
    if entry is None:
        known = ", ".join(registered_providers())
        raise ConfigurationError(f"unknown realtime provider {provider!r} (known: {known})")
    if isinstance(entry, str):
        module_name, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), attr)
        _REGISTRY[slug] = entry
    return entry


def create_agent(
    provider: str | Sequence[str],
    options: AgentOptions | None = None,
    *,
    provider_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    failover_mid_call: bool = True,
    failover_greeting: str | None = None,
    **kwargs: Any,
) -> RealtimeAgent:
    """Create an agent for one provider, or a :class:`FallbackAgent` over several.

    ``kwargs`` go to every provider's factory; ``provider_kwargs[slug]`` to one (and may hold
    its own ``options``, e.g. a different ``base_url`` or voice). With several providers each
    agent is built only when its turn comes, so a missing credential just skips it.
    """
    per = {_slug(k): dict(v) for k, v in (provider_kwargs or {}).items()}

    def factory_for(name: str) -> Callable[[], RealtimeAgent]:
        slug = _slug(name)
        kw = {**kwargs, **per.get(slug, {})}
        opts = kw.pop("options", options)

        def make() -> RealtimeAgent:
            return lookup(slug)(opts, **kw)

        make.__name__ = f"make_{slug}"
        return make

    if isinstance(provider, str):
        return factory_for(provider)()
    names = list(provider)
    if not names:
        raise ValueError("create_agent needs at least one provider")
    for name in names:
        lookup(name)  # unknown slugs fail now, not mid-call
    if len(names) == 1:
        return factory_for(names[0])()
    return FallbackAgent(
        [factory_for(n) for n in names],
        names=[_slug(n) for n in names],
        failover_mid_call=failover_mid_call,
        failover_greeting=failover_greeting,
    )


Candidate = RealtimeAgent | Callable[[], RealtimeAgent]


class FallbackAgent:
    """An agent that uses the first of several candidates that starts (see module docs)."""

    def __init__(
        self,
        candidates: Sequence[Candidate],
        *,
        names: Sequence[str] | None = None,
        failover_mid_call: bool = True,
        failover_greeting: str | None = None,
    ) -> None:
        if not candidates:
            raise ValueError("FallbackAgent needs at least one candidate")
        self._candidates = list(candidates)
        self._names = list(names) if names is not None else [_name_of(c) for c in candidates]
        self._next = 0
        self._active: RealtimeAgent | None = None
        self._used: list[RealtimeAgent] = []  # every agent that started, in order
        self.failover_mid_call = failover_mid_call
        self.failover_greeting = failover_greeting
        self.failures: list[tuple[str, str]] = []  # (provider, reason) of candidates that failed
        self._events: asyncio.Queue[AgentEvent | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._finished = False
        self._start_lock = asyncio.Lock()

    # ------------------------------------------------------------------ delegated state

    @property
    def active(self) -> RealtimeAgent | None:
        """The agent in use, or None before start / after all failed."""
        return self._active

    @property
    def provider(self) -> str:
        """The active agent's provider slug (``fallback`` before start)."""
        return self._active.provider if self._active is not None else "fallback"

    @property
    def supports_truncate(self) -> bool:
        """Whether the active agent can truncate."""
        return bool(self._active is not None and self._active.supports_truncate)

    @property
    def options(self) -> AgentOptions:
        """The active agent's options."""
        return self._active.options if self._active is not None else AgentOptions()

    @property
    def closed(self) -> bool:
        """True once closed, or once every candidate failed."""
        return self._closed

    @property
    def bad_messages(self) -> dict[str, int]:
        """Unusable vendor messages dropped by every agent used so far, by reason."""
        total: dict[str, int] = {}
        for agent in self._used:
            for reason, n in getattr(agent, "bad_messages", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the first candidate that can; ProviderError when none can."""
        async with self._start_lock:
            if self._active is not None or self._closed:
                return
            agent = await self._start_next(greeting_override=False)
            if agent is None:
                self._closed = True
                self._finish(None)
                retryable = any("retryable" in why for _, why in self.failures)
                summary = "; ".join(f"{p}: {why}" for p, why in self.failures)
                err = ProviderConnectionError if retryable else ProviderError
                raise err(f"no realtime provider could start ({summary})", provider="fallback")
            self._active = agent
            self._pump = asyncio.create_task(self._run_pump(), name="vr-rt-fallback")

    async def _start_next(self, *, greeting_override: bool) -> RealtimeAgent | None:
        while self._next < len(self._candidates):
            index = self._next
            self._next += 1
            name = self._names[index]
            candidate = self._candidates[index]
            try:
                agent = (
                    cast(RealtimeAgent, candidate)
                    if _is_agent(candidate) or not callable(candidate)
                    else candidate()
                )
            except (ConfigurationError, ProviderError) as exc:
                self._record(name, exc)
                continue
            if greeting_override:
                with contextlib.suppress(AttributeError, TypeError):
                    # Vendor agents keep options in a plain attribute (the protocol only
                    # promises to read it); read-only ones are skipped.
                    options = agent.options.replace(greeting=self.failover_greeting)
                    setattr(agent, "options", options)  # noqa: B010
            try:
                await agent.start()
            except (ConfigurationError, ProviderError, OSError) as exc:
                self._record(name, exc)
                with contextlib.suppress(Exception):
                    await agent.close()
                continue
            logger.info("realtime provider started", extra={"provider": agent.provider})
            self._used.append(agent)
            return agent
        return None

    def _record(self, name: str, exc: BaseException) -> None:
        retry = " (retryable)" if getattr(exc, "retryable", False) else ""
        self.failures.append((name, f"{type(exc).__name__}{retry}: {exc}"))
        logger.warning(
            "realtime provider %s could not start: %s; trying the next",
            clip(name),
            describe_error(exc),
            extra={"provider": name, "error": type(exc).__name__},
        )

    async def _run_pump(self) -> None:
        last: AgentEvent | None = None
        try:
            while self._active is not None:
                agent = self._active
                failover: AgentError | None = None
                stream = agent.events()
                try:
                    async for event in stream:
                        if (
                            isinstance(event, AgentError)
                            and event.fatal
                            and self.failover_mid_call
                            and not self._closed
                            and self._next < len(self._candidates)
                        ):
                            failover = event
                            break
                        last = event
                        self._events.put_nowait(event)
                finally:
                    aclose = getattr(stream, "aclose", None)
                    if aclose is not None:
                        await aclose()
                if failover is None or self._closed:
                    return
                with contextlib.suppress(Exception):
                    await agent.close()
                self._events.put_nowait(
                    AgentError(
                        failover.message, False, failover.code, failover.retryable, agent.provider
                    )
                )
                replacement = await self._start_next(greeting_override=True)
                if replacement is None:
                    self._events.put_nowait(failover)
                    last = SessionClosed(agent.provider, "failover failed")
                    self._events.put_nowait(last)
                    self._active = None
                    return
                self._active = replacement
                self._events.put_nowait(
                    AgentFailover(agent.provider, replacement.provider, failover.message)
                )
        finally:
            self._finish(last)

    def _finish(self, last: AgentEvent | None) -> None:
        if self._finished:
            return
        self._finished = True
        if self._active is not None and not isinstance(last, SessionClosed):
            self._events.put_nowait(SessionClosed(self._active.provider, "closed"))
        self._events.put_nowait(None)

    async def close(self) -> None:
        """Close the active agent and end the event stream (idempotent)."""
        if self._closed and self._pump is None:
            self._finish(None)
            return
        self._closed = True
        agent = self._active
        if agent is not None:
            with contextlib.suppress(Exception):
                await agent.close()
        pump, self._pump = self._pump, None
        if pump is not None and pump is not asyncio.current_task():
            try:
                await asyncio.wait_for(asyncio.shield(pump), 2.0)
            except (TimeoutError, Exception):
                pump.cancel()
                with contextlib.suppress(BaseException):
                    await pump
        self._finish(None)

    async def events(self) -> AsyncIterator[AgentEvent]:
        """Events of whichever agent is active, until the last one closes."""
        queue = self._events
        while True:
            event = await queue.get()
            if event is None:
                queue.put_nowait(None)
                return
            yield event

    # ------------------------------------------------------------------ delegated calls

    async def push_audio(self, ulaw: bytes) -> None:
        """Send caller audio to the active agent."""
        if self._active is not None and not self._closed:
            await self._active.push_audio(ulaw)

    async def commit(self) -> None:
        """Commit on the active agent."""
        if self._active is not None and not self._closed:
            await self._active.commit()

    async def cancel(self) -> None:
        """Cancel on the active agent."""
        if self._active is not None and not self._closed:
            await self._active.cancel()

    async def update_instructions(self, instructions: str) -> None:
        """Update instructions on the active agent."""
        if self._active is not None and not self._closed:
            await self._active.update_instructions(instructions)

    async def send_text(self, text: str) -> None:
        """Send text to the active agent."""
        if self._active is not None and not self._closed:
            await self._active.send_text(text)

    async def send_tool_result(
        self, call_id: str, output: str, *, name: str | None = None, is_error: bool = False
    ) -> None:
        """Answer a tool call on the active agent."""
        if self._active is not None and not self._closed:
            await self._active.send_tool_result(call_id, output, name=name, is_error=is_error)

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Truncate on the active agent."""
        if self._active is not None and not self._closed:
            await self._active.truncate(item_id, audio_end_ms)


def _is_agent(obj: object) -> bool:
    return hasattr(obj, "start") and hasattr(obj, "events") and hasattr(obj, "push_audio")


def _name_of(candidate: Candidate) -> str:
    if _is_agent(candidate):
        return str(getattr(candidate, "provider", type(candidate).__name__))
    return getattr(candidate, "__name__", "candidate")
