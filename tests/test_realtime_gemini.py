"""Gemini Live on a whole call: setup handshake, 16 kHz in / 24 kHz out through the resampler,
binary JSON frames, interruption (clear without truncation), tool calls, usage."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voice_runtime.audio import rms_dbfs, silence_ulaw, tone_ulaw, ulaw_decode
from voice_runtime.errors import ProviderError
from voice_runtime.realtime import (
    AgentOptions,
    AssistantAudio,
    GeminiLiveAgent,
    ToolRegistry,
    Usage,
    UserSpeechStarted,
)
from voice_runtime.realtime.gemini import gemini_schema
from voice_runtime.testing.fake_realtime import (
    FakeGeminiLive,
    FakeResponse,
    FakeScript,
    bridged_call,
    tone_response,
)

KEY = "test-key"
LOUD = tone_ulaw(300.0, 240.0, -10.0)


def gemini_agent(fake: FakeGeminiLive, **changes: object) -> GeminiLiveAgent:
    fields: dict[str, object] = {"base_url": fake.base_url, "greeting": "Hello", **changes}
    return GeminiLiveAgent(AgentOptions(**fields), api_key=KEY)  # type: ignore[arg-type]


def dominant_hz(ulaw: bytes) -> float:
    pcm = ulaw_decode(ulaw).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size)))
    return float(np.argmax(spectrum) * 8000 / pcm.size)


async def test_setup_then_greeting_resampled_to_the_call_rate() -> None:
    script = FakeScript(greeting=tone_response(600, freq=440.0, transcript="Hi!"))
    async with FakeGeminiLive(script) as fake:
        agent = gemini_agent(fake, voice="Kore", instructions="Be kind.", temperature=0.4)
        async with bridged_call(agent) as call:
            sim = call.simulator
            assert await sim.wait_for_heard(560, timeout=5)
            await sim.wait_idle(0.2, timeout=3)
            heard = bytes(sim.heard)
        setup = fake.setup
        assert setup["model"].startswith("models/")
        assert setup["generationConfig"]["responseModalities"] == ["AUDIO"]
        assert setup["generationConfig"]["temperature"] == 0.4
        voice = setup["generationConfig"]["speechConfig"]["voiceConfig"]
        assert voice["prebuiltVoiceConfig"]["voiceName"] == "Kore"
        assert setup["systemInstruction"] == {"parts": [{"text": "Be kind."}]}
        assert fake.request_headers[0]["x-goog-api-key"] == KEY
        # 600 ms of 24 kHz audio becomes 600 ms at 8 kHz: same length, same pitch, audible.
        assert abs(len(heard) / 8 - 600) <= 20
        assert abs(dominant_hz(heard[800:4000]) - 440.0) < 15.0
        assert rms_dbfs(ulaw_decode(heard[800:4000])) > -20.0
        assert any(t.text == "Hi!" and t.final for t in call.transcripts)


async def test_caller_audio_reaches_gemini_as_pcm16_at_16k() -> None:
    async with FakeGeminiLive(FakeScript(replies=[tone_response(100)])) as fake:
        async with bridged_call(gemini_agent(fake, greeting=None)) as call:
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await fake.wait_for(lambda: len(fake.caller_audio) >= 4 * len(LOUD) * 0.9, 5)
            final = lambda: any(t.role == "user" and t.final for t in call.transcripts)  # noqa: E731
            assert await fake.wait_for(final, 5)
        pcm16k = np.frombuffer(bytes(fake.caller_audio), dtype="<i2")
        # 16 kHz: two samples per μ-law byte sent; the tone is at the front and loud.
        assert rms_dbfs(pcm16k[: 16 * 200]) > -16.0
        assert abs(dominant_hz_pcm(pcm16k[: 16 * 200], 16000) - 300.0) < 20.0


def dominant_hz_pcm(pcm: np.ndarray, rate: int) -> float:
    x = pcm.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


async def test_interruption_clears_the_call_without_truncation() -> None:
    async with FakeGeminiLive(FakeScript(greeting=tone_response(3000))) as fake:
        async with bridged_call(gemini_agent(fake)) as call:
            sim = call.simulator
            assert await sim.wait_for_heard(400, timeout=5)
            await sim.send_audio(LOUD)
            assert await fake.wait_for(lambda: sim.clears >= 1, 5)
            await asyncio.sleep(0.15)
            assert sim.heard_ms < 1500
        assert call.of(UserSpeechStarted)[0].interrupted_item_id is not None
        result = await call.result()
        assert result.barge_ins == 1 and result.truncations == ()


async def test_tool_call_round_trip_and_usage() -> None:
    usage = {"input_audio": 30, "input_text": 12, "output_audio": 50, "output_text": 4}
    script = FakeScript(
        replies=[FakeResponse(tool_call=("get_weather", {"city": "Oulu"}))],
        after_tool=tone_response(200, usage=usage),
    )
    tools = ToolRegistry()
    tools.register(
        "get_weather",
        lambda city: {"city": city, "sky": "snow"},
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    )
    async with FakeGeminiLive(script) as fake:
        agent = gemini_agent(fake, greeting=None, tools=tools.specs())
        async with bridged_call(agent, tools=tools) as call:
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await call.simulator.wait_for_heard(180, timeout=5)
            assert await fake.wait_for(lambda: bool(call.of(Usage)), 2)
        declared = fake.setup["tools"][0]["functionDeclarations"][0]
        assert declared["parameters"] == {
            "type": "OBJECT",
            "properties": {"city": {"type": "STRING"}},
            "required": ["city"],
        }
        response = fake.tool_responses[0]
        assert response["name"] == "get_weather"
        assert response["response"] == {"result": {"city": "Oulu", "sky": "snow"}}
        total = (await call.result()).usage
        assert (total.input_tokens, total.output_tokens) == (42, 54)
        assert (total.input_audio_tokens, total.output_text_tokens) == (30, 4)
        assert total.provider == "gemini"


async def test_text_frames_are_read_too() -> None:
    script = FakeScript(greeting=tone_response(200))
    async with FakeGeminiLive(script, binary_frames=False) as fake:
        agent = gemini_agent(fake)
        await agent.start()
        got = []
        async for event in agent.events():
            if isinstance(event, AssistantAudio):
                got.append(event)
                break
        await agent.close()
        assert got and got[0].audio


async def test_bad_setup_closes_with_a_non_retryable_error() -> None:
    async with FakeGeminiLive() as fake:
        agent = gemini_agent(fake, extra={"model": None})
        with pytest.raises(ProviderError) as info:
            await agent.start()
        assert not info.value.retryable
        assert "setup" in str(info.value)


def test_schema_conversion_keeps_only_what_gemini_takes() -> None:
    schema = {
        "type": "object",
        "$schema": "x",
        "properties": {
            "n": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
    }
    assert gemini_schema(schema) == {
        "type": "OBJECT",
        "properties": {
            "n": {"type": "INTEGER", "minimum": 1},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
        },
    }
