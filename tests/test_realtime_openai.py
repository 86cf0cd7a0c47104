"""OpenAI Realtime on a whole call: fake OpenAI server, real bridge, real Twilio transport,
caller simulator. Greeting, caller audio, barge-in truncation, tools, failures, usage."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import wait_for

from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.errors import MissingCredentialError, ProviderError
from voice_runtime.realtime import (
    AgentError,
    AgentFailover,
    AgentOptions,
    BridgeOptions,
    BridgeResult,
    LifecycleHooks,
    OpenAIRealtimeAgent,
    SessionClosed,
    SessionOpened,
    ToolRegistry,
    UserTranscript,
    attach_agent,
    create_agent,
    end_call_tool,
)
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.clock import ManualClock
from voice_runtime.testing.fake_realtime import (
    FakeOpenAIRealtime,
    FakeResponse,
    FakeScript,
    FakeXaiRealtime,
    bridged_call,
    pattern_audio,
    tone_response,
)
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import StreamOptions

KEY = "test-key"
FRAME_MS = 20.0
LOUD = tone_ulaw(300.0, 240.0, -10.0)  # caller speech as the fake's energy VAD sees it


def openai_agent(fake: FakeOpenAIRealtime, **changes: object) -> OpenAIRealtimeAgent:
    fields: dict[str, object] = {"base_url": fake.base_url, "greeting": "Hello", **changes}
    options = AgentOptions(**fields)  # type: ignore[arg-type]
    return OpenAIRealtimeAgent(options, api_key=KEY)


async def say(sim, audio: bytes = LOUD, quiet_ms: float = 400.0) -> None:
    """Caller speaks, then is quiet long enough for the fake's VAD to end the turn."""
    await sim.send_audio(audio)
    await sim.send_audio(silence_ulaw(quiet_ms))


async def test_greeting_plays_byte_exact_and_session_is_ga_shaped() -> None:
    greeting = pattern_audio(600)
    async with FakeOpenAIRealtime(FakeScript(greeting=FakeResponse(audio=greeting))) as fake:
        async with bridged_call(openai_agent(fake, voice="marin")) as call:
            assert await call.simulator.wait_for_heard(600, timeout=5)
            assert bytes(call.simulator.heard[: len(greeting)]) == greeting
        update = fake.messages("session.update")[0]["session"]
        assert update["type"] == "realtime"
        assert update["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert update["audio"]["output"]["format"] == {"type": "audio/pcmu"}
        assert update["audio"]["output"]["voice"] == "marin"
        assert update["output_modalities"] == ["audio"]
        assert update["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        headers = fake.request_headers[0]
        assert headers["authorization"] == f"Bearer {KEY}"
        assert "openai-beta" not in headers
        assert fake.messages("response.create"), "the greeting is asked for"


async def test_caller_audio_passes_through_unchanged_and_transcripts_arrive() -> None:
    script = FakeScript(replies=[tone_response(200, transcript="sure")], user_transcript="hi there")
    async with FakeOpenAIRealtime(script) as fake:
        async with bridged_call(openai_agent(fake, greeting=None)) as call:
            sim = call.simulator
            await say(sim)
            assert await fake.wait_for(lambda: LOUD in bytes(fake.caller_audio), 5)
            assert await sim.wait_for_heard(200, timeout=5)
            assert await fake.wait_for(lambda: any(t.final for t in call.transcripts), 2)
        finals = [(t.role, t.text) for t in call.transcripts if t.final]
        assert ("user", "hi there") in finals
        assert ("assistant", "sure") in finals
        assert call.of(UserTranscript)


async def test_barge_in_clears_twilio_and_truncates_at_the_heard_audio() -> None:
    greeting = tone_response(3000, freq=500.0)
    async with FakeOpenAIRealtime(FakeScript(greeting=greeting)) as fake:
        async with bridged_call(openai_agent(fake)) as call:
            sim = call.simulator
            assert await sim.wait_for_heard(700, timeout=5)
            await sim.send_audio(LOUD)
            assert await fake.wait_for(lambda: bool(fake.truncated), 5)
            assert await fake.wait_for(lambda: sim.clears >= 1, 2)
            await asyncio.sleep(0.1)  # anything still playing would show up now
            heard_ms = sim.heard_ms
            item_id, audio_end_ms = fake.truncated[0]
            # The truncation point is what the caller heard of that item, to one frame.
            assert abs(audio_end_ms - heard_ms) <= FRAME_MS, (audio_end_ms, heard_ms)
            assert heard_ms < 1500, "the rest of the greeting was cleared"
            result_truncs = None
        result = await call.result()
        result_truncs = result.truncations
        assert result.barge_ins == 1
        assert [(t.item_id, t.audio_end_ms) for t in result_truncs] == [(item_id, audio_end_ms)]
        assert not [m for m in fake.sent if m.get("type") == "error"]


@pytest.mark.parametrize("vendor", ["openai", "xai"])
@pytest.mark.parametrize(
    ("first_ms", "expected_ms"),
    [
        (3000, (1200, 0)),  # barge-in inside the first item: the second was never reached
        (600, (None, 600)),  # the first was heard whole: only the second is cut
    ],
)
async def test_barge_in_truncates_every_queued_item_at_what_was_heard_of_it(
    vendor: str, first_ms: int, expected_ms: tuple[int | None, int]
) -> None:
    # The model speaks, calls a tool and speaks again; both replies are queued (faster than
    # real time) before the caller barges in 1.2 s into the call's agent audio.
    first, second = pattern_audio(first_ms), tone_ulaw(500.0, 2000, -12.0)
    script = FakeScript(
        greeting=FakeResponse(audio=first, tool_call=("lookup_order", {"order_id": "42"})),
        after_tool=FakeResponse(audio=second),
    )
    tools = ToolRegistry()
    tools.register("lookup_order", lambda order_id: {"status": "shipped"})
    sessions: list[VoiceSession] = []
    results: list[BridgeResult] = []
    clock = ManualClock()
    fake_cls = FakeOpenAIRealtime if vendor == "openai" else FakeXaiRealtime
    async with fake_cls(script) as fake:

        async def on_call(session: VoiceSession) -> None:
            sessions.append(session)
            options = AgentOptions(base_url=fake.base_url, greeting="Hello", tools=tools.specs())
            agent = create_agent(vendor, options, api_key=KEY)
            results.append(await attach_agent(session, agent, tools=tools))

        # A long lead sends all agent audio to the caller at once; the virtual clock then
        # decides exactly how much of it has played.
        voice = VoiceServer(on_call=on_call, stream_options=StreamOptions(lead_ms=60_000))
        async with serve_in_loop(voice.app) as srv:
            async with CallerSimulator(srv.ws_url + "/voice", clock=clock) as sim:
                total = len(first) + len(second)
                assert await wait_for(lambda: len(sim.received) >= total, 5)
                await clock.advance(1.2)
                assert await wait_for(lambda: sim.heard_ms >= 1200, 2)
                assert sim.heard_ms == 1200  # time stands still until the test moves it
                session = sessions[0]
                assert await wait_for(lambda: session.played_ms >= 1200, 5)

                await sim.send_audio(LOUD, realtime=False)  # the caller barges in
                cuts = sum(e is not None for e in expected_ms)
                assert await fake.wait_for(lambda: len(fake.truncated) == cuts, 5)
                assert await wait_for(lambda: sim.clears >= 1, 5)
                await clock.advance(0.5)
                assert sim.heard_ms == 1200, "the rest of both replies was cleared"
            assert await wait_for(lambda: bool(results), 5)
    first_id, second_id = list(fake.item_audio_ms)
    ids = (first_id, second_id)
    wanted = [(i, ms) for i, ms in zip(ids, expected_ms, strict=True) if ms is not None]
    got = fake.truncated
    assert [item for item, _ in got] == [item for item, _ in wanted]
    for (_, end), (_, want) in zip(got, wanted, strict=True):
        # Marks every 20 ms: the position is known to one frame.
        assert abs(end - want) <= FRAME_MS, (got, wanted)
    result = results[0]
    assert [(t.item_id, t.audio_end_ms) for t in result.truncations] == got
    assert result.barge_ins == 1 and result.tool_calls == 1
    assert not [m for m in fake.sent if m.get("type") == "error"]


async def test_tool_call_round_trips_and_the_reply_plays() -> None:
    script = FakeScript(
        replies=[FakeResponse(tool_call=("lookup_order", {"order_id": "42"}))],
        after_tool=FakeResponse(audio=pattern_audio(300), transcript="It shipped."),
    )
    tools = ToolRegistry()
    seen: list[str] = []

    @tools.tool(
        parameters={"type": "object", "properties": {"order_id": {"type": "string"}}},
    )
    async def lookup_order(order_id: str) -> dict[str, str]:
        """Find an order."""
        seen.append(order_id)
        return {"status": "shipped"}

    executed = []
    hooks = LifecycleHooks(on_tool_executed=executed.append)
    async with FakeOpenAIRealtime(script) as fake:
        agent = openai_agent(fake, greeting=None, tools=tools.specs())
        async with bridged_call(agent, tools=tools, hooks=hooks) as call:
            await say(call.simulator)
            assert await call.simulator.wait_for_heard(300, timeout=5)
            assert bytes(call.simulator.heard[-2400:]) == script.after_tool.audio
        outputs = [
            m["item"]
            for m in fake.messages("conversation.item.create")
            if m["item"]["type"] == "function_call_output"
        ]
        assert seen == ["42"]
        assert json.loads(outputs[0]["output"]) == {"status": "shipped"}
        declared = fake.messages("session.update")[0]["session"]["tools"][0]
        assert declared["type"] == "function" and declared["name"] == "lookup_order"
        assert executed and executed[0].name == "lookup_order" and not executed[0].is_error
        assert (await call.result()).tool_calls == 1


async def test_a_failing_tool_returns_an_error_result_to_the_model() -> None:
    script = FakeScript(
        replies=[FakeResponse(tool_call=("explode", {}))], after_tool=tone_response(100)
    )
    tools = ToolRegistry()
    tools.register("explode", lambda: 1 / 0)
    async with FakeOpenAIRealtime(script) as fake:
        agent = openai_agent(fake, greeting=None, tools=tools.specs())
        async with bridged_call(agent, tools=tools) as call:
            await say(call.simulator)
            assert await fake.wait_for(lambda: len(fake.messages("response.create")) >= 1, 5)
        output = next(
            m["item"]["output"]
            for m in fake.messages("conversation.item.create")
            if m["item"]["type"] == "function_call_output"
        )
        assert "ZeroDivisionError" in json.loads(output)["error"]


async def test_end_call_tool_hangs_up_after_the_goodbye_played() -> None:
    goodbye = pattern_audio(400)
    script = FakeScript(
        replies=[FakeResponse(tool_call=("end_call", {"reason": "done"}))],
        after_tool=FakeResponse(audio=goodbye, transcript="Bye!"),
    )
    tools = ToolRegistry([end_call_tool()])
    async with FakeOpenAIRealtime(script) as fake:
        agent = openai_agent(fake, greeting=None, tools=tools.specs())
        async with bridged_call(agent, tools=tools) as call:
            await say(call.simulator)
            assert await call.simulator.wait_closed(timeout=8)
            assert bytes(call.simulator.heard).endswith(goodbye)
        assert (await call.result()).reason == "call_ended"


async def test_usage_is_normalised_and_adds_up() -> None:
    u1 = {"input_audio": 0, "input_text": 40, "output_audio": 120, "output_text": 10, "cached": 8}
    u2 = {"input_audio": 75, "input_text": 5, "output_audio": 60, "output_text": 6}
    script = FakeScript(
        greeting=tone_response(100, usage=u1), replies=[tone_response(100, usage=u2)]
    )
    reports = []
    hooks = LifecycleHooks(on_usage=reports.append)
    async with FakeOpenAIRealtime(script) as fake:
        async with bridged_call(openai_agent(fake), hooks=hooks) as call:
            assert await call.simulator.wait_for_heard(100, timeout=5)
            await say(call.simulator)
            assert await fake.wait_for(lambda: len(reports) == 2, 5)
        total = (await call.result()).usage
    assert total.input_tokens == 40 + 80 and total.output_tokens == 130 + 66
    assert total.input_audio_tokens == 75 and total.input_text_tokens == 45
    assert total.output_audio_tokens == 180 and total.output_text_tokens == 16
    assert total.cached_input_tokens == 8
    assert total.total_tokens == sum(sum(u.get(k, 0) for k in u if k != "cached") for u in (u1, u2))
    assert reports[-1].total == total and reports[0].usage.provider == "openai"


async def test_vendor_dropping_the_socket_fails_over_to_the_next_provider() -> None:
    first = FakeOpenAIRealtime(FakeScript(greeting=tone_response(400)))
    second = FakeXaiRealtime(FakeScript(greeting=FakeResponse(audio=pattern_audio(300))))
    async with first, second:
        agent = create_agent(
            ["openai", "xai"],
            AgentOptions(greeting="Hello"),
            provider_kwargs={
                "openai": {"options": AgentOptions(base_url=first.base_url, greeting="Hello")},
                "xai": {"options": AgentOptions(base_url=second.base_url, greeting="Hello")},
            },
            api_key=KEY,
            failover_greeting="Sorry, where were we?",
        )
        async with bridged_call(agent) as call:
            assert await call.simulator.wait_for_heard(200, timeout=5)
            await first.drop()
            assert await second.wait_for(lambda: second.connections == 1, 5)
            # What was already queued from the first vendor still plays, then the second's.
            assert await call.simulator.wait_for_heard(400 + 300, timeout=5)
            assert bytes(call.simulator.heard).endswith(pattern_audio(300))
        failovers = call.of(AgentFailover)
        assert [(f.from_provider, f.to_provider) for f in failovers] == [("openai", "xai")]
        greeting = second.messages("response.create")[0]["response"]["instructions"]
        assert "Sorry, where were we?" in greeting
        assert not [e for e in call.of(AgentError) if e.fatal]


async def test_vendor_dropping_the_socket_without_fallback_is_a_clean_fatal_error() -> None:
    async with FakeOpenAIRealtime(FakeScript(greeting=tone_response(300))) as fake:
        async with bridged_call(openai_agent(fake)) as call:
            assert await call.simulator.wait_for_heard(100, timeout=5)
            await fake.drop()
            # The call ends once the audio already queued has played.
            assert await call.simulator.wait_closed(timeout=5)
        result = await call.result()
    assert result.reason == "agent_failed"
    assert result.error is not None and result.error.fatal and result.error.retryable
    assert isinstance(call.events[-1], SessionClosed)


async def test_a_provider_that_cannot_connect_is_skipped() -> None:
    down = FakeOpenAIRealtime()
    down.refuse_connections = True
    up = FakeXaiRealtime(FakeScript(greeting=FakeResponse(audio=pattern_audio(200))))
    async with down, up:
        agent = create_agent(
            ["openai", "xai"],
            provider_kwargs={
                "openai": {"options": AgentOptions(base_url=down.base_url, greeting="Hi")},
                "xai": {"options": AgentOptions(base_url=up.base_url, greeting="Hi")},
            },
            api_key=KEY,
        )
        async with bridged_call(agent) as call:
            assert await call.simulator.wait_for_heard(200, timeout=5)
            assert bytes(call.simulator.heard[:1600]) == pattern_audio(200)
        assert down.rejected == 1 and up.connections == 1
        assert agent.failures[0][0] == "openai" and "503" in agent.failures[0][1]


async def test_when_no_provider_connects_the_call_ends_with_an_error() -> None:
    down = FakeOpenAIRealtime()
    down.refuse_connections = True
    async with down:
        async with bridged_call(openai_agent(down)) as call:
            assert await call.simulator.wait_closed(timeout=5)
        result = await call.result()
    assert result.reason == "agent_failed" and result.error is not None
    assert result.error.retryable  # 503 is worth retrying later


async def test_bad_key_is_a_non_retryable_start_error() -> None:
    async with FakeOpenAIRealtime() as fake:
        agent = OpenAIRealtimeAgent(AgentOptions(base_url=fake.base_url), api_key="wrong")
        with pytest.raises(ProviderError) as info:
            await agent.start()
        assert info.value.status == 401 and not info.value.retryable
        assert agent.closed


async def test_agent_calls_are_idempotent_and_harmless_after_close() -> None:
    async with FakeOpenAIRealtime() as fake:
        agent = openai_agent(fake, greeting=None)
        await agent.start()
        await agent.start()
        assert fake.connections == 1
        await agent.update_instructions("Be brief.")
        assert await fake.wait_for(lambda: len(fake.messages("session.update")) == 2, 2)
        assert fake.messages("session.update")[1]["session"] == {
            "type": "realtime",
            "instructions": "Be brief.",
        }
        await agent.cancel()  # nothing to cancel: no message, no error
        await agent.close()
        await agent.close()
        for call in (
            agent.push_audio(b"\xff" * 160),
            agent.commit(),
            agent.cancel(),
            agent.update_instructions("x"),
            agent.send_text("x"),
            agent.send_tool_result("c", "{}"),
            agent.truncate("i", 10),
            agent.start(),
        ):
            await call
        events = [e async for e in agent.events()]
        assert isinstance(events[-1], SessionClosed)
        assert not fake.messages("response.cancel")


async def test_client_side_turns_commit_and_request_a_response() -> None:
    async with FakeOpenAIRealtime(FakeScript(replies=[tone_response(100)])) as fake:
        agent = openai_agent(fake, greeting=None, server_vad=False)
        await agent.start()
        assert (
            fake.messages("session.update")[0]["session"]["audio"]["input"]["turn_detection"]
            is None
        )
        await agent.push_audio(LOUD)
        await agent.commit()
        assert await fake.wait_for(lambda: bool(fake.messages("response.create")), 2)
        assert fake.messages("input_audio_buffer.commit")
        await agent.close()


def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingCredentialError) as info:
        OpenAIRealtimeAgent()
    assert info.value.variable == "OPENAI_API_KEY"
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    assert OpenAIRealtimeAgent()._api_key == "from-env"


async def test_plain_ws_to_a_remote_host_is_refused() -> None:
    agent = OpenAIRealtimeAgent(AgentOptions(base_url="ws://example.com/v1"), api_key=KEY)
    with pytest.raises(Exception, match="refusing to send credentials"):
        await agent.start()


async def test_bridge_hangup_on_fatal_can_be_disabled() -> None:
    async with FakeOpenAIRealtime(FakeScript(greeting=tone_response(100))) as fake:
        opts = BridgeOptions(hangup_on_fatal=False)
        async with bridged_call(openai_agent(fake), options=opts) as call:
            assert await call.simulator.wait_for_heard(100, timeout=5)
            await fake.drop()
            result = await call.result()
            assert result.reason == "agent_failed"
            assert not call.simulator.closed


async def test_vendor_errors_are_reported_and_the_call_goes_on() -> None:
    reply = pattern_audio(200)
    script = FakeScript(replies=[FakeResponse(audio=reply)])
    async with FakeOpenAIRealtime(script) as fake:
        async with bridged_call(openai_agent(fake, greeting=None)) as call:
            assert await fake.wait_for(lambda: bool(call.of(SessionOpened)), 5)
            await fake.send_error("rate limited for a moment", "rate_limit_exceeded")
            assert await fake.wait_for(lambda: bool(call.of(AgentError)), 5)
            await say(call.simulator)
            assert await call.simulator.wait_for_heard(200, timeout=5)
            assert bytes(call.simulator.heard) == reply
        error = call.of(AgentError)[0]
        assert not error.fatal and error.code == "rate_limit_exceeded"
        assert (await call.result()).reason == "call_ended"


class _SlowToConfirm(FakeOpenAIRealtime):
    """A vendor that takes seconds to answer session.update."""

    async def _on_message(self, conn, msg):  # type: ignore[no-untyped-def]
        if msg.get("type") == "session.update":
            await asyncio.sleep(1.5)
        await super()._on_message(conn, msg)


async def test_caller_hanging_up_during_agent_start_ends_everything_promptly() -> None:
    async with _SlowToConfirm() as fake:
        async with bridged_call(openai_agent(fake)) as call:
            assert await fake.wait_for(lambda: bool(fake.messages("session.update")), 5)
            await call.simulator.hangup()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            result = await call.result(timeout=2)
            assert loop.time() - t0 < 1.0
        assert result.reason == "call_ended" and result.error is None
        assert await fake.wait_for(lambda: fake.active_connections == 0, 3)


async def test_agent_audio_rides_whole_transport_messages_with_one_position_mark_each() -> None:
    # Issue 14: the bridge no longer cuts agent audio into 20 ms chunk+mark pairs (about 100
    # messages a second); the transport's 40 ms messages carry it, with its position marks.
    greeting = pattern_audio(1000)
    script = FakeScript(greeting=FakeResponse(audio=greeting))
    async with FakeOpenAIRealtime(script) as fake, bridged_call(openai_agent(fake)) as call:
        assert await call.simulator.wait_for_heard(1000, timeout=5)
        assert bytes(call.simulator.heard[: len(greeting)]) == greeting
        stats = call.session.stats
        # Each vendor delta leaves in 40 ms messages (its last one shorter), not in 20 ms ones.
        assert stats.outbound_chunks < 1000 // 20 * 2 // 3, stats
        assert stats.marks_sent <= stats.outbound_chunks + 2, stats
        # One granularity: the transport's 100 ms position marks, about 35 messages a second.
        assert stats.outbound_chunks + stats.marks_sent <= 40, stats
