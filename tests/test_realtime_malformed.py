"""Vendor messages with wrong field types, on a whole call for every vendor: each is dropped,
counted and logged as one warning line per kind (no ERROR, no traceback), and the call's
audio goes on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.realtime import (
    AgentOptions,
    ElevenLabsAgent,
    GeminiLiveAgent,
    OpenAIRealtimeAgent,
    SessionOpened,
    create_agent,
)
from voice_runtime.testing.fake_realtime import (
    FakeElevenLabsAgent,
    FakeGeminiLive,
    FakeOpenAIRealtime,
    FakeRealtimeServer,
    FakeResponse,
    FakeScript,
    FakeXaiRealtime,
    bridged_call,
    pattern_audio,
)

KEY = "test-key"
LOUD = tone_ulaw(300.0, 240.0, -10.0)
REPLY_MS = 300
DROPPED = "unusable vendor message dropped"
REPEAT = 3

_AUDIO_IDS = {"response_id": "resp_x", "item_id": "item_x", "output_index": 0, "content_index": 0}


def oa_audio(**fields: Any) -> dict[str, Any]:
    """An OpenAI audio delta with the given fields replaced."""
    return {"type": "response.output_audio.delta", **_AUDIO_IDS, "delta": "AAAA", **fields}


def gemini_audio(**inline: Any) -> dict[str, Any]:
    """A Gemini model turn with one inline audio part."""
    data = {"mimeType": "audio/pcm;rate=24000", "data": "AAAA", **inline}
    return {"serverContent": {"modelTurn": {"parts": [{"inlineData": data}]}}}


def el_audio(**event: Any) -> dict[str, Any]:
    """An ElevenLabs audio event with the given fields replaced."""
    return {"type": "audio", "audio_event": {"audio_base_64": "AAAA", "event_id": 99, **event}}


# (message, the reason it is counted under)
OPENAI_BAD: list[tuple[Any, str]] = [
    (oa_audio(delta=12345), "wrong_type:response.output_audio.delta.delta"),
    (oa_audio(delta="@@not base64@@"), "bad_base64:response.output_audio.delta.delta"),
    (oa_audio(item_id={"x": 1}), "wrong_type:response.output_audio.delta.item_id"),
    ({"type": "response.created", "response": [1, 2]}, "wrong_type:response.created.response"),
    ({"type": "response.done", "response": "oops"}, "wrong_type:response.done.response"),
    ({"type": "response.done", "response": {"output": 7}}, "wrong_type:response.done.output"),
    (
        {"type": "response.done", "response": {"usage": {"input_tokens": "many"}}},
        "wrong_type:response.done.usage",
    ),
    (
        {"type": "response.output_audio_transcript.delta", "delta": ["a"]},
        "wrong_type:response.output_audio_transcript.delta.delta",
    ),
    ({"type": "error", "error": "boom"}, "wrong_type:error"),
    ({"type": "session.updated", "session": 5}, "wrong_type:session.updated.session"),
    ("this is not json", "not_json"),
    ("[1, 2, 3]", "not_an_object"),
]
GEMINI_BAD: list[tuple[Any, str]] = [
    (gemini_audio(data=123), "wrong_type:serverContent.data"),
    (gemini_audio(data="@@"), "bad_base64:serverContent.inlineData.data"),
    (gemini_audio(mimeType="audio/pcm;rate=1"), "bad_value:serverContent.inlineData.mimeType"),
    ({"serverContent": {"modelTurn": {"parts": "nope"}}}, "wrong_type:serverContent.parts"),
    ({"serverContent": "interrupted"}, "wrong_type:serverContent"),
    ({"serverContent": {"outputTranscription": {"text": 5}}}, "wrong_type:serverContent.text"),
    (
        {"toolCall": {"functionCalls": [{"id": "fc", "name": "x", "args": "no"}]}},
        "wrong_type:toolCall.args",
    ),
    ({"toolCallCancellation": {"ids": [1, 2]}}, "wrong_type:toolCallCancellation.ids"),
    ({"usageMetadata": {"promptTokenCount": "lots"}}, "wrong_type:usageMetadata"),
    ("{not json", "not_json"),
]
ELEVENLABS_BAD: list[tuple[Any, str]] = [
    (el_audio(audio_base_64=42), "wrong_type:audio.audio_base_64"),
    (el_audio(audio_base_64="@@"), "bad_base64:audio.audio_base_64"),
    (el_audio(event_id="9"), "wrong_type:audio.event_id"),
    ({"type": "audio", "audio_event": "x"}, "wrong_type:audio.audio_event"),
    (
        {
            "type": "client_tool_call",
            "client_tool_call": {"tool_name": "x", "tool_call_id": "t", "parameters": "no"},
        },
        "wrong_type:client_tool_call.parameters",
    ),
    (
        {"type": "agent_response", "agent_response_event": {"agent_response": 7}},
        "wrong_type:agent_response",
    ),
    ({"type": "ping", "ping_event": [1]}, "wrong_type:ping.ping_event"),
    ({"type": "error", "error_event": 42}, "wrong_type:error"),
]


def _openai(fake: FakeRealtimeServer) -> Any:
    return OpenAIRealtimeAgent(AgentOptions(base_url=fake.base_url), api_key=KEY)


def _xai(fake: FakeRealtimeServer) -> Any:
    # Behind a fallback wrapper: its counter adds up the agents it used.
    unused = AgentOptions(base_url="ws://127.0.0.1:9/v1")  # nothing listens: skipped
    return create_agent(
        ["openai", "xai"],
        provider_kwargs={
            "openai": {"options": unused},
            "xai": {"options": AgentOptions(base_url=fake.base_url)},
        },
        api_key=KEY,
    )


def _gemini(fake: FakeRealtimeServer) -> Any:
    return GeminiLiveAgent(AgentOptions(base_url=fake.base_url), api_key=KEY)


def _elevenlabs(fake: FakeRealtimeServer) -> Any:
    return ElevenLabsAgent(AgentOptions(base_url=fake.base_url), agent_id="agent_test", api_key=KEY)


VENDORS: dict[str, tuple[type[FakeRealtimeServer], Callable[[Any], Any], list[tuple[Any, str]]]] = {
    "openai": (FakeOpenAIRealtime, _openai, OPENAI_BAD),
    "xai": (FakeXaiRealtime, _xai, OPENAI_BAD),
    "gemini": (FakeGeminiLive, _gemini, GEMINI_BAD),
    "elevenlabs": (FakeElevenLabsAgent, _elevenlabs, ELEVENLABS_BAD),
}


def _problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


@pytest.mark.parametrize("vendor", sorted(VENDORS))
async def test_wrong_field_types_are_counted_and_warned_once_and_the_call_goes_on(
    vendor: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_runtime")
    fake_cls, make_agent, bad = VENDORS[vendor]
    reply = pattern_audio(REPLY_MS)
    script = FakeScript(replies=[FakeResponse(audio=reply)], ping_on_start=False)
    async with fake_cls(script) as fake:
        agent = make_agent(fake)
        async with bridged_call(agent) as call:
            assert await fake.wait_for(lambda: bool(call.of(SessionOpened)), 5)
            for _ in range(REPEAT):
                for message, _reason in bad:
                    await fake.send_raw(message)
            expected = {reason: REPEAT for _, reason in bad}
            assert await fake.wait_for(lambda: agent.bad_messages == expected, 5), sorted(
                set(agent.bad_messages.items()) ^ set(expected.items())
            )
            # The call goes on: the caller speaks and hears the agent's whole reply.
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await call.simulator.wait_for_heard(REPLY_MS - 20, timeout=5)
            if vendor in ("openai", "xai", "elevenlabs"):
                assert await call.simulator.wait_for_heard(REPLY_MS, timeout=2)
                assert bytes(call.simulator.heard) == reply
            assert not call.simulator.closed
        result = await call.result()
    assert result.reason == "call_ended" and result.bad_messages == expected
    if vendor == "xai":
        assert [name for name, _ in agent.failures] == ["openai"]  # the fallback path
    warned = [r for r in caplog.records if r.getMessage() == DROPPED]
    assert sorted(r.reason for r in warned) == sorted(expected)  # type: ignore[attr-defined]
    assert all(r.levelno == logging.WARNING and r.provider == vendor for r in warned)  # type: ignore[attr-defined]
    assert not _problems(caplog), [r.getMessage() for r in _problems(caplog)]


async def test_a_flood_of_bad_messages_is_counted_in_full_but_logged_rarely(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_runtime")
    bad = oa_audio(delta=1)
    flood = 2500
    async with FakeOpenAIRealtime(
        FakeScript(replies=[FakeResponse(audio=pattern_audio(200))])
    ) as fake:
        agent = _openai(fake)
        async with bridged_call(agent) as call:
            assert await fake.wait_for(lambda: bool(call.of(SessionOpened)), 5)
            for _ in range(flood):
                await fake.send_raw(bad)
            reason = "wrong_type:response.output_audio.delta.delta"
            assert await fake.wait_for(lambda: agent.bad_messages.get(reason) == flood, 10)
            await call.simulator.send_audio(LOUD)
            await call.simulator.send_audio(silence_ulaw(400))
            assert await call.simulator.wait_for_heard(200, timeout=5)
    warned = [r for r in caplog.records if r.getMessage() == DROPPED]
    # The first, then one in a thousand: 1, 1001, 2001.
    assert [r.count for r in warned] == [1, 1001, 2001]  # type: ignore[attr-defined]
    assert not _problems(caplog)
