"""xAI Grok voice agent on a whole call: xAI's session shape, pcmu passthrough, truncation."""

from __future__ import annotations

import asyncio

import pytest

from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.errors import MissingCredentialError
from voice_runtime.realtime import (
    AgentError,
    AgentOptions,
    ToolRegistry,
    XaiRealtimeAgent,
    create_agent,
)
from voice_runtime.testing.fake_realtime import (
    FakeResponse,
    FakeScript,
    FakeXaiRealtime,
    bridged_call,
    pattern_audio,
    tone_response,
)

KEY = "test-key"
LOUD = tone_ulaw(300.0, 240.0, -10.0)


def xai_agent(fake: FakeXaiRealtime, **changes: object) -> XaiRealtimeAgent:
    fields: dict[str, object] = {"base_url": fake.base_url, "greeting": "Hello", **changes}
    return XaiRealtimeAgent(AgentOptions(**fields), api_key=KEY)  # type: ignore[arg-type]


async def test_session_uses_the_xai_shape_and_greeting_passes_through() -> None:
    greeting = pattern_audio(400)
    tools = ToolRegistry()
    tools.register("lookup", lambda: {"ok": True}, description="Look up")
    async with FakeXaiRealtime(FakeScript(greeting=FakeResponse(audio=greeting))) as fake:
        agent = xai_agent(fake, voice="eve", instructions="Phone agent.", tools=tools.specs())
        async with bridged_call(agent) as call:
            assert await call.simulator.wait_for_heard(400, timeout=5)
            assert bytes(call.simulator.heard[: len(greeting)]) == greeting
        session = fake.messages("session.update")[0]["session"]
        assert "type" not in session
        assert session["voice"] == "eve" and session["instructions"] == "Phone agent."
        assert session["turn_detection"] == {"type": "server_vad"}
        assert session["audio"] == {
            "input": {"format": {"type": "audio/pcmu"}},
            "output": {"format": {"type": "audio/pcmu"}},
        }
        assert session["tools"][0]["name"] == "lookup"
        assert fake.request_headers[0]["authorization"] == f"Bearer {KEY}"
        # The server's ping events are not errors.
        assert not call.of(AgentError)


async def test_barge_in_truncates_like_openai() -> None:
    fake = FakeXaiRealtime(FakeScript(greeting=tone_response(3000)))
    async with fake, bridged_call(xai_agent(fake)) as call:
        sim = call.simulator
        assert await sim.wait_for_heard(500, timeout=5)
        await sim.send_audio(LOUD)
        assert await fake.wait_for(lambda: bool(fake.truncated), 5)
        assert await fake.wait_for(lambda: sim.clears >= 1, 2)
        await asyncio.sleep(0.1)
        assert abs(fake.truncated[0][1] - sim.heard_ms) <= 20.0


async def test_partial_and_final_user_transcripts() -> None:
    script = FakeScript(replies=[tone_response(100)], user_transcript="cancel my order")
    async with FakeXaiRealtime(script) as fake:
        async with bridged_call(xai_agent(fake, greeting=None)) as call:
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await fake.wait_for(lambda: any(t.final for t in call.transcripts), 5)
        user = [(t.text, t.final) for t in call.transcripts if t.role == "user"]
        assert user == [("cancel my order", False), ("cancel my order", True)]


async def test_update_instructions_uses_the_xai_shape() -> None:
    async with FakeXaiRealtime() as fake:
        agent = xai_agent(fake, greeting=None)
        await agent.start()
        await agent.update_instructions("Speak Finnish.")
        assert await fake.wait_for(lambda: len(fake.messages("session.update")) == 2, 2)
        assert fake.messages("session.update")[1]["session"] == {"instructions": "Speak Finnish."}
        await agent.close()


def test_registry_knows_grok_as_xai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAI_API_KEY", "k")
    agent = create_agent("grok")
    assert isinstance(agent, XaiRealtimeAgent) and agent.provider == "xai"
    assert agent._url() == "wss://api.x.ai/v1/realtime"
    monkeypatch.delenv("XAI_API_KEY")
    with pytest.raises(MissingCredentialError, match="XAI_API_KEY"):
        create_agent("xai")
