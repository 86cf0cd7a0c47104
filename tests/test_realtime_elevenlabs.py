"""ElevenLabs Agents on a whole call: signed URL, initiation, ulaw_8000 passthrough, ping/pong,
interruption event ids, client tools, and a loud failure on a wrong audio format."""

from __future__ import annotations

import asyncio

import pytest

from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.errors import MissingCredentialError, ProviderError
from voice_runtime.realtime import AgentOptions, ElevenLabsAgent, ToolRegistry, UserSpeechStarted
from voice_runtime.testing.fake_realtime import (
    FakeElevenLabsAgent,
    FakeResponse,
    FakeScript,
    bridged_call,
    pattern_audio,
    tone_response,
)

KEY = "test-key"
AGENT = "agent_test"
LOUD = tone_ulaw(300.0, 240.0, -10.0)


def el_agent(
    fake: FakeElevenLabsAgent, *, api_key: str | None = KEY, **changes: object
) -> ElevenLabsAgent:
    fields: dict[str, object] = {"base_url": fake.base_url, "greeting": "Hello!", **changes}
    return ElevenLabsAgent(AgentOptions(**fields), agent_id=AGENT, api_key=api_key)  # type: ignore[arg-type]


async def test_signed_url_initiation_pong_and_byte_exact_greeting() -> None:
    greeting = pattern_audio(500)
    async with FakeElevenLabsAgent(FakeScript(greeting=FakeResponse(audio=greeting))) as fake:
        agent = el_agent(fake, instructions="Be brief.", voice="voice_1", language="fi")
        async with bridged_call(agent) as call:
            assert await call.simulator.wait_for_heard(500, timeout=5)
            assert bytes(call.simulator.heard[: len(greeting)]) == greeting
            assert await fake.wait_for(lambda: fake.pongs == fake.pings_sent, 2)
        # The key went to the signed-URL request only; the socket used the signature.
        assert fake.request_headers[0]["xi-api-key"] == KEY
        assert "xi-api-key" not in fake.request_headers[1]
        init = fake.initiation
        override = init["conversation_config_override"]
        assert override["agent"] == {
            "prompt": {"prompt": "Be brief."},
            "first_message": "Hello!",
            "language": "fi",
        }
        assert override["tts"] == {"voice_id": "voice_1"}
        assert agent.conversation_id is not None


async def test_public_agent_without_key_connects_directly() -> None:
    async with FakeElevenLabsAgent(FakeScript(greeting=tone_response(100)), api_key=None) as fake:
        agent = el_agent(fake, api_key=None)
        await agent.start()
        assert len(fake.request_headers) == 1 and fake.connections == 1
        await agent.close()


async def test_caller_audio_goes_as_user_audio_chunks_without_type() -> None:
    async with FakeElevenLabsAgent(FakeScript(replies=[tone_response(100)])) as fake:
        async with bridged_call(el_agent(fake, greeting=None)) as call:
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await fake.wait_for(lambda: LOUD in bytes(fake.caller_audio), 5)
            assert await call.simulator.wait_for_heard(100, timeout=5)
        chunks = fake.messages("user_audio_chunk")
        assert chunks and all(set(m) == {"user_audio_chunk"} for m in chunks)
        assert any(t.role == "user" and t.text == "hello" for t in call.transcripts)


async def test_interruption_clears_and_drops_audio_of_the_interrupted_turn() -> None:
    async with FakeElevenLabsAgent(FakeScript(greeting=tone_response(3000))) as fake:
        async with bridged_call(el_agent(fake)) as call:
            sim = call.simulator
            assert await sim.wait_for_heard(400, timeout=5)
            await sim.send_audio(LOUD)
            assert await fake.wait_for(lambda: sim.clears >= 1, 5)
            assert await fake.wait_for(lambda: bool(fake.stale_audio_ids), 2)
            await asyncio.sleep(0.15)
            received = len(sim.received)
        # The stale audio event (id <= interruption id) never reached the caller.
        assert b"\x00" * 160 not in bytes(sim.received[:received])
        assert call.of(UserSpeechStarted)
        result = await call.result()
        assert result.barge_ins == 1 and result.truncations == ()


async def test_client_tool_round_trip() -> None:
    script = FakeScript(
        replies=[FakeResponse(tool_call=("book", {"slot": "9:00"}))],
        after_tool=tone_response(150),
    )
    tools = ToolRegistry()
    tools.register("book", lambda slot: f"booked {slot}")
    async with FakeElevenLabsAgent(script) as fake:
        async with bridged_call(el_agent(fake, greeting=None), tools=tools) as call:
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await call.simulator.wait_for_heard(150, timeout=5)
        result = fake.tool_results[0]
        assert result["result"] == "booked 9:00" and result["is_error"] is False
        assert result["tool_call_id"].startswith("tc_")


async def test_audio_format_mismatch_fails_loudly() -> None:
    script = FakeScript(output_audio_format="pcm_16000")
    async with FakeElevenLabsAgent(script) as fake:
        agent = el_agent(fake)
        with pytest.raises(ProviderError) as info:
            await agent.start()
        assert info.value.code == "audio_format_mismatch" and not info.value.retryable
        assert "tts.agent_output_audio_format" in str(info.value)
        assert "ulaw_8000" in str(info.value)


async def test_contextual_update_and_text() -> None:
    async with FakeElevenLabsAgent() as fake:
        agent = el_agent(fake, greeting=None)
        await agent.start()
        await agent.update_instructions("Caller is a VIP.")
        await agent.send_text("I want to cancel")
        assert await fake.wait_for(lambda: bool(fake.messages("user_message")), 2)
        assert fake.messages("contextual_update")[0]["text"] == "Caller is a VIP."
        await agent.close()


def test_agent_id_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELEVENLABS_AGENT_ID", raising=False)
    with pytest.raises(MissingCredentialError, match="ELEVENLABS_AGENT_ID"):
        ElevenLabsAgent()
    monkeypatch.setenv("ELEVENLABS_AGENT_ID", "agent_env")
    monkeypatch.delenv("ELEVENLABS_API_KEY", raising=False)
    agent = ElevenLabsAgent()
    assert agent.agent_id == "agent_env" and not agent.use_signed_url
    assert agent._url() == "wss://api.elevenlabs.io/v1/convai/conversation?agent_id=agent_env"
