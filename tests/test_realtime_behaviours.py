"""Realtime agents on whole calls: uninterruptible greeting/responses and idle callers.

The fake OpenAI Realtime server (its energy VAD starts a caller turn and cancels the response
in progress, as the vendor does), the real bridge and transport, the caller simulator.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import wait_for

from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.idle import IdlePolicy
from voice_runtime.realtime import (
    AgentBridge,
    AgentOptions,
    BridgeOptions,
    OpenAIRealtimeAgent,
    ToolRegistry,
    attach_agent,
    attach_agent_sync,
)
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_realtime import (
    FakeOpenAIRealtime,
    FakeResponse,
    FakeScript,
    bridged_call,
    serve_call,
    tone_response,
)
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator

LOUD = tone_ulaw(300.0, 240.0, -10.0)  # caller speech as the fake's energy VAD sees it


def agent_for(fake: FakeOpenAIRealtime, **changes: Any) -> OpenAIRealtimeAgent:
    fields: dict[str, Any] = {"base_url": fake.base_url, "greeting": "Hello", **changes}
    return OpenAIRealtimeAgent(AgentOptions(**fields), api_key="test-key")


async def speak(sim: CallerSimulator) -> None:
    """The caller talks, then is quiet long enough for the fake's VAD to end the turn."""
    await sim.send_audio(LOUD)
    await sim.send_audio(silence_ulaw(400))


def texts(fake: FakeOpenAIRealtime) -> list[str]:
    """The user text turns the bridge sent (idle prompts)."""
    return [
        part["text"]
        for m in fake.messages("conversation.item.create")
        if m["item"].get("type") == "message"
        for part in m["item"]["content"]
    ]


async def test_an_uninterruptible_greeting_plays_whole_and_the_caller_is_answered_after() -> None:
    script = FakeScript(greeting=tone_response(2000, freq=500.0), replies=[tone_response(300)])
    async with FakeOpenAIRealtime(script) as fake:
        options = BridgeOptions(greeting_interruptible=False)
        async with bridged_call(agent_for(fake), options=options) as call:
            sim = call.simulator
            assert await sim.wait_for_heard(500, 5)
            await speak(sim)  # over the greeting: the vendor hears it, nothing is cut
            assert await sim.wait_for_heard(2300, 8)  # the whole greeting, then the answer
            assert sim.clears == 0 and not fake.truncated
        result = await call.result()
        assert not result.truncations


async def test_protect_next_response_keeps_a_later_answer_whole() -> None:
    script = FakeScript(greeting=tone_response(200), replies=[tone_response(2000, freq=600.0)])
    bridges: list[AgentBridge] = []

    def on_connect(session: VoiceSession, call: Any) -> Any:
        bridges.append(AgentBridge(session, agent_for(fake)))
        return bridges[0].run()

    async with FakeOpenAIRealtime(script) as fake, serve_call(on_connect) as call:
        sim = call.simulator
        assert await sim.wait_for_heard(200, 5)
        await sim.wait_idle(0.2, 5)
        bridges[0].protect_next_response()  # e.g. the answer reads out a disclosure
        await speak(sim)
        assert await sim.wait_for_heard(200 + 600, 5)
        await speak(sim)  # over the protected answer
        assert await sim.wait_for_heard(200 + 2000, 8)
        assert sim.clears == 0 and not fake.truncated


@pytest.mark.parametrize("sync", [False, True])
async def test_realtime_idle_caller_is_prompted_then_hung_up_after_the_goodbye(sync: bool) -> None:
    script = FakeScript(
        greeting=tone_response(300),
        replies=[tone_response(300, transcript="still there?"), tone_response(400)],
    )
    policy = IdlePolicy(timeout_s=0.5, max_prompts=1, prompt="Still there?", goodbye="Bye!")
    options = BridgeOptions(idle=policy, hangup_quiet_s=0.3)
    sent_at: list[float] = []

    async with FakeOpenAIRealtime(script) as fake:

        async def on_call(session: VoiceSession) -> None:
            await attach_agent(session, agent_for(fake), options=options)

        def on_call_sync(session: VoiceSession) -> None:
            attach_agent_sync(session, lambda: agent_for(fake), options=options)

        voice = VoiceServer(on_call=on_call_sync if sync else on_call)
        async with serve_in_loop(voice.app) as srv, CallerSimulator(srv.ws_url + "/voice") as sim:
            assert await sim.wait_for_heard(300, 5)
            heard_at = time.monotonic()
            assert await fake.wait_for(lambda: len(texts(fake)) >= 1, 5)
            sent_at.append(time.monotonic())
            assert await sim.wait_closed(10)
    prompt, goodbye = texts(fake)
    assert '"Still there?"' in prompt and '"Bye!"' in goodbye
    assert sent_at[0] - heard_at >= 0.5 - 0.1  # counted after the greeting was heard
    assert sim.heard_ms >= 300 + 300 + 400 - 1  # hung up after the goodbye was heard


async def test_a_running_tool_pauses_the_idle_clock() -> None:
    tools = ToolRegistry()
    finished: list[int] = []

    @tools.tool(parameters={"type": "object", "properties": {}})
    async def slow_lookup() -> dict[str, str]:
        """A lookup that takes a while."""
        await asyncio.sleep(1.2)
        finished.append(len(texts(fake)))  # no idle prompt went out while it ran
        return {"status": "ok"}

    script = FakeScript(
        replies=[FakeResponse(tool_call=("slow_lookup", {})), tone_response(200)],
        after_tool=tone_response(200),
    )
    policy = IdlePolicy(timeout_s=0.4, max_prompts=3)
    async with FakeOpenAIRealtime(script) as fake:
        agent = agent_for(fake, greeting=None, tools=tools.specs())
        async with bridged_call(agent, tools=tools, options=BridgeOptions(idle=policy)) as call:
            await speak(call.simulator)
            assert await wait_for(lambda: bool(finished), 5)
            assert await fake.wait_for(lambda: len(texts(fake)) >= 1, 5)  # afterwards it counts
    assert finished == [0]


async def test_audio_behind_an_uninterruptible_greeting_plays_and_is_cut_at_its_end() -> None:
    # The greeting calls a tool; the answer after it (another response) is queued behind it.
    tools = ToolRegistry()
    tools.register("lookup_order", lambda order_id: {"status": "shipped"})
    script = FakeScript(
        greeting=FakeResponse(audio=tone_ulaw(500.0, 1500, -12.0), tool_call=("lookup_order", {})),
        after_tool=FakeResponse(audio=tone_ulaw(700.0, 1000, -12.0)),
    )
    options = BridgeOptions(greeting_interruptible=False)
    async with FakeOpenAIRealtime(script) as fake:
        agent = agent_for(fake, tools=tools.specs())
        async with bridged_call(agent, tools=tools, options=options) as call:
            sim, session = call.simulator, call.session
            assert await wait_for(lambda: session.queued_ms >= 2500, 5)
            assert await sim.wait_for_heard(500, 5)
            await sim.send_audio(LOUD, realtime=False)  # the caller barges in
            assert await fake.wait_for(lambda: len(fake.truncated) == 1, 5)
            assert await sim.wait_for_heard(2500, 8)
            assert sim.clears == 0
    ((item, end),) = fake.truncated
    assert item == list(fake.item_audio_ms)[1]  # the answer, not the greeting
    assert abs(end - 1000) <= 20  # it all played: it is cut at its end
