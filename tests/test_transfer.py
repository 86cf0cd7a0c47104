"""Warm transfer through a Twilio Conference, against the fake Twilio REST API."""

from __future__ import annotations

import asyncio
import json
import logging
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from conftest import wait_for

from voice_runtime.conversation import Conversation
from voice_runtime.mock.tts import MockTts
from voice_runtime.realtime.events import ToolCall
from voice_runtime.realtime.tools import ToolContext, ToolRegistry
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_twilio_rest import FakeParticipant, FakePhone, FakeTwilioRest
from voice_runtime.testing.fake_twilio_rest.callbacks import sign
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.transfer import (
    TransferResult,
    _book,
    conference_twiml,
    warm_transfer,
    warm_transfer_async,
    warm_transfer_tool,
)
from voice_runtime.transports.twilio_ws import StreamOptions

OUR_NUMBER = "+15550001111"
AGENT = "+15550009999"
CALLEE = "+15550002222"
HOLD_MUSIC = "https://cdn.example.com/hold.mp3"
SUMMARY = "Caller wants to move her delivery to Friday."
SORRY = "Nobody is free right now, I am back."


@dataclass
class Bot:
    """An on_call handler that transfers, and greets callers who come back."""

    kind: str
    options: dict[str, Any]
    server: VoiceServer | None = None
    results: list[TransferResult] = field(default_factory=list)
    back: list[VoiceSession] = field(default_factory=list)
    tts: MockTts = field(default_factory=lambda: MockTts(ms_per_char=8.0))

    def sync_handler(self, session: VoiceSession) -> None:
        assert self.server is not None and session.call_info is not None
        if session.call_info.custom_parameters.get("transfer") == "no_answer":
            self.back.append(session)
            self.tts.speak(SORRY, session)
            return
        conversation = Conversation(session, self.tts)
        self.results.append(conversation.warm_transfer(self.server, AGENT, **self.options))

    async def async_handler(self, session: VoiceSession) -> None:
        assert self.server is not None and session.call_info is not None
        if session.call_info.custom_parameters.get("transfer") == "no_answer":
            self.back.append(session)
            await self.tts.speak_async(SORRY, session)
            return
        result = await warm_transfer_async(self.server, session, AGENT, **self.options)
        self.results.append(result)


@pytest.fixture(params=["sync", "async"])
async def bot(
    request: pytest.FixtureRequest, fake_env: FakeTwilioRest
) -> AsyncIterator[tuple[Bot, FakePhone]]:
    bot = Bot(request.param, {"poll_interval": 0.05})
    handler = bot.sync_handler if bot.kind == "sync" else bot.async_handler
    server = VoiceServer(on_call=handler, stream_options=StreamOptions(lead_ms=60))
    bot.server = server
    async with serve_in_loop(server.app) as srv:
        server.public_url = srv.url
        phone = FakePhone(fake_env).start()
        try:
            yield bot, phone
        finally:
            await asyncio.to_thread(phone.close)
    assert not fake_env.callback_errors


async def _agent_dialled(fake: FakeTwilioRest) -> FakeParticipant:
    def agent() -> FakeParticipant | None:
        for conference in fake.conferences.values():
            for participant in conference.participants.values():
                if participant.label == "agent":
                    return participant
        return None

    assert await wait_for(lambda: agent() is not None, 5)
    found = agent()
    assert found is not None
    return found


async def test_the_agent_answers_hears_the_whisper_alone_and_the_bot_leaves(
    fake_env: FakeTwilioRest,
    bot: tuple[Bot, FakePhone],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    handler, phone = bot
    handler.options.update(summary=SUMMARY, hold_music_url=HOLD_MUSIC, timeout=10)
    assert handler.server is not None
    session = await handler.server.place_call_async(CALLEE)
    agent = await _agent_dialled(fake_env)

    # The caller is in the conference, waiting with hold music; the bot's stream has ended.
    caller_call = fake_env.calls[session.call_sid or ""]
    node = ET.fromstring(caller_call.twiml or "").find("Dial/Conference")
    assert node is not None and node.get("waitUrl") == HOLD_MUSIC
    assert (node.get("startConferenceOnEnter"), node.get("endConferenceOnExit")) == (
        "false",
        "true",
    )
    conference = fake_env.conferences[agent.conference_sid]
    assert conference.friendly_name == node.text
    assert conference.participants[caller_call.sid].status == "connected"
    first = phone.streams[caller_call.sid][0]
    assert await asyncio.to_thread(phone.run, first.wait_closed(5))
    assert await wait_for(lambda: session.is_disconnected, 5)
    # The agent's leg: dialled through the participants API, from our number.
    assert (agent.param("To"), agent.param("From"), agent.param("Label")) == (
        AGENT,
        OUR_NUMBER,
        "agent",
    )
    assert agent.start_conference_on_enter and agent.end_conference_on_exit

    await asyncio.to_thread(fake_env.set_participant_status, agent.call_sid, "ringing")
    await asyncio.to_thread(fake_env.set_participant_status, agent.call_sid, "connected")
    assert await wait_for(lambda: bool(handler.results), 10)
    (result,) = handler.results
    assert (result.outcome, result.whispered, result.connected) == ("connected", True, True)
    assert result.agent_call_sid == agent.call_sid
    # The whisper went to the agent only, while the caller was on hold.
    caller = fake_env.participant(caller_call.sid)
    assert caller is not None and not caller.hold
    holds = [dict(update) for update in caller.updates]
    assert [u.get("Hold") for u in holds] == ["true", "false"]
    assert holds[0].get("HoldUrl") == HOLD_MUSIC
    say = ET.fromstring(agent.announcements[0])
    assert say.findtext("Say") == SUMMARY and say.find("Redirect") is not None
    assert "AnnounceUrl" not in str(caller.updates)
    assert fake_env.conferences[agent.conference_sid].status == "in-progress"
    # Phone numbers never reach the logs.
    for record in caplog.records:
        assert AGENT not in record.getMessage() and AGENT not in str(vars(record))
        assert CALLEE not in str(vars(record))


@pytest.mark.parametrize("agent_does", ["nothing", "declines"])
async def test_no_answer_brings_the_caller_back_to_the_bot(
    fake_env: FakeTwilioRest, bot: tuple[Bot, FakePhone], agent_does: str
) -> None:
    handler, phone = bot
    handler.options.update(timeout=0.6 if agent_does == "nothing" else 10)
    assert handler.server is not None
    session = await handler.server.place_call_async(CALLEE, parameters={"campaign": "june"})
    agent = await _agent_dialled(fake_env)
    if agent_does == "declines":
        await asyncio.to_thread(fake_env.set_participant_status, agent.call_sid, "failed")
    assert await wait_for(lambda: bool(handler.results), 10)
    (result,) = handler.results
    assert (result.outcome, result.connected) == ("no_answer", False)
    # The agent's leg is gone; the caller's call runs a fresh stream back to this server.
    assert fake_env.participant(agent.call_sid) is None
    call_sid = session.call_sid or ""
    assert await wait_for(lambda: bool(handler.back), 5)
    back = handler.back[0]
    assert back is not session and back.call_sid == call_sid
    assert back.call_info is not None
    params = dict(back.call_info.custom_parameters)
    assert params["transfer"] == "no_answer" and params["campaign"] == "june"
    first, sim = phone.streams[call_sid]  # the bot's stream ended, a new one came back
    assert first.closed and sim.call_sid == call_sid
    heard = sim.wait_for_heard(len(handler.tts.audio_for(SORRY)) / 8, 5)
    assert await asyncio.to_thread(phone.run, heard)
    assert fake_env.participant(call_sid) is None  # it left the conference


async def test_the_caller_hanging_up_while_the_agent_rings_is_caller_gone(
    fake_env: FakeTwilioRest, bot: tuple[Bot, FakePhone]
) -> None:
    handler, _ = bot
    handler.options.update(timeout=10)
    assert handler.server is not None
    session = await handler.server.place_call_async(CALLEE)
    agent = await _agent_dialled(fake_env)
    # The caller hangs up: their leg ends the conference, and with it the agent's leg.
    await asyncio.to_thread(fake_env.set_participant_status, session.call_sid or "", "complete")
    assert await wait_for(lambda: bool(handler.results), 10)
    assert handler.results[0].outcome == "caller_gone"
    assert fake_env.participant(agent.call_sid) is None
    assert handler.back == []


def test_bad_arguments_fail_before_any_request(fake_env: FakeTwilioRest) -> None:
    server = VoiceServer(public_url="https://bot.example.com")
    session = VoiceSession(call_sid="CA" + "1" * 32)
    with pytest.raises(ValueError, match="agent"):
        warm_transfer(server, session, " ")
    with pytest.raises(ValueError, match="summary"):
        warm_transfer(server, session, AGENT, summary="  ")
    with pytest.raises(ValueError, match="timeout"):
        warm_transfer(server, session, AGENT, timeout=0)
    assert fake_env.requests == []
    assert "waitUrl" not in conference_twiml("room")  # Twilio's own hold music by default


async def test_the_whisper_webhook_is_signed_and_unknown_tokens_are_404(
    fake_env: FakeTwilioRest,
) -> None:
    server = VoiceServer()
    async with serve_in_loop(server.app) as srv:
        server.public_url = srv.url
        token, played = _book(server).add(SUMMARY, "alice")
        say = f"{srv.url}/twilio/whisper/{token}/say"
        form = {"AccountSid": fake_env.account_sid, "CallSid": "CA" + "1" * 32}
        async with httpx.AsyncClient() as http:
            assert (await http.post(say, data=form)).status_code == 403  # unsigned
            forged = await http.post(say, data=form, headers={"X-Twilio-Signature": "x"})
            assert forged.status_code == 403
            ok = await http.post(say, data=form, headers=_signed(fake_env, say, form))
            assert ok.status_code == 200 and not played.is_set()
            root = ET.fromstring(ok.text)
            assert root.findtext("Say") == SUMMARY and root.find("Say").get("voice") == "alice"
            done = (root.findtext("Redirect") or "").strip()
            assert done == f"{srv.url}/twilio/whisper/{token}/done"
            finished = await http.post(done, data=form, headers=_signed(fake_env, done, form))
            assert finished.status_code == 200 and played.is_set()
            for bad in (
                f"{srv.url}/twilio/whisper/nope/say",
                f"{srv.url}/twilio/whisper/{token}/x",
            ):
                missing = await http.post(bad, data=form, headers=_signed(fake_env, bad, form))
                assert missing.status_code == 404


def _signed(fake: FakeTwilioRest, url: str, form: dict[str, str]) -> dict[str, str]:
    return {"X-Twilio-Signature": sign(fake.auth_token, url, form)}


async def test_a_realtime_agent_tool_transfers_with_the_models_summary(
    fake_env: FakeTwilioRest,
) -> None:
    server = VoiceServer(stream_options=StreamOptions(lead_ms=60))
    results: list[TransferResult] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_result(result: TransferResult) -> None:
        results.append(result)
        loop.call_soon_threadsafe(done.set)

    tool = warm_transfer_tool(server, AGENT, on_result=on_result, poll_interval=0.05, timeout=10)
    registry = ToolRegistry([tool])
    assert registry.specs()[0].parameters["properties"]["summary"]["type"] == "string"
    async with serve_in_loop(server.app) as srv:
        server.public_url = srv.url
        phone = FakePhone(fake_env, agents_answer=True).start()
        try:
            session = await server.place_call_async(CALLEE)
            await session.wait_for_ws_connect_async(5)
            call = ToolCall("call-1", "transfer_to_human", {"summary": SUMMARY})
            answer = await registry.execute(call, ToolContext(session, call))
            assert not answer.is_error and json.loads(answer.output) == {"status": "transferring"}
            await asyncio.wait_for(done.wait(), 10)
        finally:
            await asyncio.to_thread(phone.close)
    (result,) = results
    assert result.connected and result.whispered
    agent = fake_env.participant(result.agent_call_sid or "")
    assert agent is not None and SUMMARY in agent.announcements[0]
    with pytest.raises(ValueError, match="agent"):
        warm_transfer_tool(server, "")
