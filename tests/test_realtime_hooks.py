"""Host hooks, tools, the registry and the sync bridge: per-call resolver, lifecycle
callbacks, tool execution rules, transfer, provider slugs."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.errors import ConfigurationError, LoopThreadError, MissingCredentialError
from voice_runtime.realtime import (
    AgentOptions,
    AgentPlan,
    FallbackAgent,
    LifecycleHooks,
    ParameterResolver,
    ToolCall,
    ToolContext,
    ToolRegistry,
    Usage,
    attach_agent_sync,
    create_agent,
    end_call_tool,
    lookup,
    register,
    registered_providers,
    run_agent_call,
    transfer_call_tool,
)
from voice_runtime.realtime.openai import OpenAIRealtimeAgent
from voice_runtime.realtime.registry import unregister
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_realtime import (
    FakeOpenAIRealtime,
    FakeResponse,
    FakeScript,
    FakeXaiRealtime,
    pattern_audio,
    serve_call,
)

KEY = "test-key"
LOUD = tone_ulaw(300.0, 240.0, -10.0)


# ---------------------------------------------------------------------------- resolver + hooks


def resolver_for(
    openai: FakeOpenAIRealtime, xai: FakeXaiRealtime, tools: ToolRegistry
) -> ParameterResolver:
    return ParameterResolver(
        providers=("openai",),
        options=AgentOptions(instructions="Default.", greeting="Hi"),
        tools=tools,
        secret="s3cret",
        allowed_providers={"xai"},
        allow_instructions=True,
        allow_tools=True,
        provider_kwargs={
            "openai": {"options": AgentOptions(base_url=openai.base_url), "api_key": KEY},
            "xai": {"api_key": KEY},
        },
    )


async def test_resolver_rejects_a_call_with_a_wrong_token() -> None:
    stopped = []
    hooks = LifecycleHooks(on_session_stopped=stopped.append)
    async with FakeOpenAIRealtime() as openai, FakeXaiRealtime() as xai:
        resolver = resolver_for(openai, xai, ToolRegistry())
        params = {"auth_token": "wrong"}

        def on_connect(session, call):
            return run_agent_call(session, resolver, hooks=hooks)

        async with serve_call(on_connect, parameters=params) as call:
            assert await call.simulator.wait_closed(timeout=5)
        assert (await call.result()).reason == "rejected"
        assert openai.connections == 0 and xai.connections == 0
        assert stopped and stopped[0].reason == "rejected"


async def test_resolver_overrides_provider_instructions_and_tools_per_call() -> None:
    tools = ToolRegistry([end_call_tool()])
    tools.register("lookup", lambda: {}, description="Look up")
    started, stopped = [], []
    hooks = LifecycleHooks(on_session_started=started.append, on_session_stopped=stopped.append)
    greeting = pattern_audio(200)
    async with (
        FakeOpenAIRealtime() as openai,
        FakeXaiRealtime(FakeScript(greeting=FakeResponse(audio=greeting))) as xai,
    ):
        resolver = resolver_for(openai, xai, tools)
        params = {
            "auth_token": "s3cret",
            "provider": "xai",
            "instructions": "Speak like a pirate.",
            "tools": "lookup,not_a_tool",
        }

        def plan_with_xai_url(session):
            # The fake's port is only known now; everything else comes from the resolver.
            plan = resolver(session)
            options = plan.options.replace(base_url=xai.base_url)
            return AgentPlan(plan.providers, options, plan.tools, {"xai": {"api_key": KEY}})

        def on_connect(session, call):
            return run_agent_call(session, plan_with_xai_url, hooks=hooks)

        async with serve_call(on_connect, parameters=params) as call:
            assert await call.simulator.wait_for_heard(200, timeout=5)
        session = xai.messages("session.update")[0]["session"]
        assert session["instructions"] == "Speak like a pirate."
        assert [t["name"] for t in session["tools"]] == ["lookup"]
        assert openai.connections == 0
        result = await call.result()
        assert result.provider == "xai" and result.reason == "call_ended"
        assert started[0].provider == "xai" and started[0].call_sid == call.simulator.call_sid
        assert stopped[0].duration_s == pytest.approx(result.duration_s)
        assert stopped[0].duration_s > 0.1


def test_resolver_refuses_providers_that_are_not_allowed() -> None:
    from voice_runtime.realtime import CallRejectedError
    from voice_runtime.types import CallInfo

    resolver = ParameterResolver(providers="openai", allowed_providers={"xai"})
    session = VoiceSession()
    session.apply_call_info(CallInfo("CA1", "MZ1", custom_parameters={"provider": "gemini"}))
    with pytest.raises(CallRejectedError):
        resolver(session)
    session.apply_call_info(CallInfo("CA1", "MZ1", custom_parameters={"instructions": "evil"}))
    plan = resolver(session)
    assert plan.providers == ("openai",) and plan.options.instructions is None


# ---------------------------------------------------------------------------- sync bridge


async def test_attach_agent_sync_runs_from_a_worker_thread() -> None:
    greeting = pattern_audio(300)
    async with FakeOpenAIRealtime(FakeScript(greeting=FakeResponse(audio=greeting))) as fake:

        def make() -> OpenAIRealtimeAgent:
            return OpenAIRealtimeAgent(
                AgentOptions(base_url=fake.base_url, greeting="Hi"), api_key=KEY
            )

        def on_connect(session, call):
            return asyncio.to_thread(attach_agent_sync, session, make, timeout=30)

        async with serve_call(on_connect) as call:
            assert await call.simulator.wait_for_heard(300, timeout=5)
            assert bytes(call.simulator.heard[:2400]) == greeting
        assert (await call.result()).reason == "call_ended"


async def test_attach_agent_sync_refuses_the_loop_thread() -> None:
    session = VoiceSession()
    session.set_loop(asyncio.get_running_loop())
    with pytest.raises(LoopThreadError):
        attach_agent_sync(session, object())  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- tools


def call_of(name: str, **args: object) -> ToolCall:
    return ToolCall("call_1", name, args, json.dumps(args))


async def test_tool_errors_timeouts_and_unknown_tools_become_error_results() -> None:
    tools = ToolRegistry()

    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    tools.register("slow", slow, timeout=0.05)
    tools.register("add", lambda a, b: a + b)
    assert (await tools.execute(call_of("add", a=2, b=3))).output == "5"
    timed_out = await tools.execute(call_of("slow"))
    assert timed_out.is_error and "timed out" in json.loads(timed_out.output)["error"]
    unknown = await tools.execute(call_of("nope"))
    assert unknown.is_error and "unknown tool" in unknown.output
    bad_args = await tools.execute(call_of("add", a=1))
    assert bad_args.is_error and "bad arguments" in bad_args.output


async def test_sync_tools_run_off_the_loop_and_may_take_the_context() -> None:
    tools = ToolRegistry()
    threads = []

    @tools.tool()
    def whoami(context: ToolContext) -> dict[str, object]:
        """Say which call this is."""
        time.sleep(0.01)  # blocking is fine: it runs in a worker thread
        threads.append(threading.get_ident())
        return {"call_sid": context.call_sid}

    assert tools.get("whoami").description == "Say which call this is."  # type: ignore[union-attr]
    session = VoiceSession(call_sid="CA9")
    result = await tools.execute(call_of("whoami"), ToolContext(session, call_of("whoami")))
    assert json.loads(result.output) == {"call_sid": "CA9"} and not result.is_error
    assert threads and threads[0] != threading.get_ident()
    assert "context" not in tools.specs()[0].parameters["properties"]


async def test_transfer_tool_without_twilio_credentials_answers_with_an_error() -> None:
    from voice_runtime.transports.call_control import CallControl

    tool = transfer_call_tool("+15550100")
    tools = ToolRegistry([tool])
    session = VoiceSession(call_sid="CA" + "0" * 32)
    session.control = CallControl(session)  # what the server installs when the stream starts
    result = await tools.execute(
        call_of("transfer_call"), ToolContext(session, call_of("transfer_call"))
    )
    assert result.is_error or "error" in json.loads(result.output)
    assert "TWILIO_ACCOUNT_SID" in result.output


class _RecordingControl:
    """A call control that records transfers (the contract the tool must go through)."""

    def __init__(self, *, sync_only: bool = False) -> None:
        self.transfers: list[tuple[str, str | None]] = []
        if not sync_only:
            self.transfer_async = self._transfer_async

    def transfer(self, target: str, *, caller_id: str | None = None) -> str:
        self.transfers.append((target, caller_id))
        return "in-progress"

    async def _transfer_async(self, target: str, *, caller_id: str | None = None) -> str:
        return self.transfer(target, caller_id=caller_id)


async def test_transfer_tool_only_dials_configured_destinations() -> None:
    control = _RecordingControl()
    tool = transfer_call_tool({"sales": "+15550101", "support": "sip:help@example.com"})
    assert tool.parameters["properties"]["destination"]["enum"] == ["sales", "support"]
    tools = ToolRegistry([tool])
    session = VoiceSession(call_sid="CA" + "1" * 32)
    session.control = control
    ok = await tools.execute(
        call_of("transfer_call", destination="support"),
        ToolContext(session, call_of("transfer_call")),
    )
    assert json.loads(ok.output) == {"status": "transferring"}
    bad = await tools.execute(
        call_of("transfer_call", destination="+19005550000"),
        ToolContext(session, call_of("transfer_call")),
    )
    assert "unknown destination" in bad.output
    assert control.transfers == [("sip:help@example.com", None)]


async def test_transfer_tool_goes_through_session_control_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voice_runtime.transports import twilio_call

    async def no_rest(*args: object, **kwargs: object) -> str:
        raise AssertionError("the tool must not call the Twilio REST module itself")

    monkeypatch.setattr(twilio_call, "transfer_call_async", no_rest)
    monkeypatch.setattr(twilio_call, "transfer_call", no_rest)
    tool = transfer_call_tool("+15550100", caller_id="+15550199")
    tools = ToolRegistry([tool])
    session = VoiceSession(call_sid="CA" + "2" * 32)
    without = await tools.execute(
        call_of("transfer_call"), ToolContext(session, call_of("transfer_call"))
    )
    assert "no call control" in without.output
    control = _RecordingControl(sync_only=True)
    session.control = control
    ok = await tools.execute(
        call_of("transfer_call"), ToolContext(session, call_of("transfer_call"))
    )
    assert json.loads(ok.output) == {"status": "transferring"}
    assert control.transfers == [("+15550100", "+15550199")]


def test_tool_names_and_schemas_are_checked() -> None:
    tools = ToolRegistry()
    tools.register("ok_name", lambda: None)
    with pytest.raises(ValueError):
        tools.register("ok_name", lambda: None)
    with pytest.raises(ValueError):
        tools.register("bad name!", lambda: None)
    with pytest.raises(ValueError):
        tools.register("arr", lambda: None, parameters={"type": "array"})


# ---------------------------------------------------------------------------- registry


def test_registry_slugs_lookup_and_custom_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"openai", "xai", "gemini", "elevenlabs"} <= set(registered_providers())
    with pytest.raises(ConfigurationError, match="known: .*openai"):
        lookup("nope")
    made = []

    def factory(options: AgentOptions | None, **kwargs: object) -> OpenAIRealtimeAgent:
        made.append(kwargs)
        return OpenAIRealtimeAgent(options, api_key="k")

    register("my-vendor", factory)
    try:
        with pytest.raises(ValueError):
            register("my_vendor", factory)
        agent = create_agent("my_vendor", AgentOptions(voice="cedar"), connect_timeout=3.0)
        assert agent.options.voice == "cedar" and made == [{"connect_timeout": 3.0}]
    finally:
        unregister("my_vendor")
    assert "my_vendor" not in registered_providers()


async def test_fallback_skips_a_provider_without_credentials(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    async with FakeOpenAIRealtime() as fake:
        agent = create_agent(
            ["gemini", "openai"],
            AgentOptions(base_url=fake.base_url),
            provider_kwargs={"openai": {"api_key": KEY}},
        )
        assert isinstance(agent, FallbackAgent)
        await agent.start()
        assert agent.provider == "openai" and fake.connections == 1
        assert agent.failures[0][0] == "gemini"
        assert "GEMINI_API_KEY" in agent.failures[0][1]
        # The reason is in the line's text, where a default log format shows it.
        (line,) = [r.getMessage() for r in caplog.records if "could not start" in r.getMessage()]
        assert line.startswith("realtime provider gemini could not start: MissingCredentialError")
        assert "GEMINI_API_KEY" in line
        await agent.close()
        await agent.close()
        assert agent.closed


async def test_fallback_with_every_candidate_down_raises() -> None:
    async with FakeOpenAIRealtime() as fake:
        fake.refuse_connections = True
        agent = create_agent(["openai", "xai"], AgentOptions(base_url=fake.base_url), api_key=KEY)
        with pytest.raises(Exception, match="no realtime provider could start") as info:
            await agent.start()
        assert getattr(info.value, "retryable", False)
        assert [e async for e in agent.events()] == []


def test_missing_credential_error_names_the_first_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(MissingCredentialError) as info:
        create_agent("gemini")
    assert info.value.variable == "GEMINI_API_KEY"
    monkeypatch.setenv("GOOGLE_API_KEY", "g")
    assert create_agent("google").provider == "gemini"


def test_usage_adds_and_keeps_the_provider() -> None:
    a = Usage(
        input_tokens=3,
        output_tokens=4,
        input_audio_tokens=3,
        output_audio_tokens=4,
        provider="openai",
    )
    b = Usage(
        input_tokens=1,
        output_tokens=1,
        input_text_tokens=1,
        output_text_tokens=1,
        provider="openai",
    )
    total = Usage() + a + b
    assert total.total_tokens == 9 and total.provider == "openai"
    assert (a + Usage(provider="xai")).provider == ""
    assert total.as_dict()["input_tokens"] == 4


async def test_caller_speech_reaches_a_resolved_agent_end_to_end() -> None:
    """run_agent_call with a plain plan: caller audio in, reply out."""
    reply = pattern_audio(200)
    async with FakeOpenAIRealtime(FakeScript(replies=[FakeResponse(audio=reply)])) as fake:
        plan = AgentPlan(
            ("openai",),
            AgentOptions(base_url=fake.base_url),
            None,
            {"openai": {"api_key": KEY}},
        )

        def on_connect(session, call):
            return run_agent_call(session, plan)

        async with serve_call(on_connect) as call:
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await call.simulator.wait_for_heard(200, timeout=5)
            assert bytes(call.simulator.heard[-1600:]) == reply
        assert LOUD in bytes(fake.caller_audio)
