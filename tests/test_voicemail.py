"""Voicemail drop on outbound calls: AMD results from the fake Twilio REST, a local beep."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conftest import wait_for

from voice_runtime.audio import pcm16_to_ulaw, tone_pcm16, ulaw_decode
from voice_runtime.conversation import Conversation
from voice_runtime.mock.tts import MockTts
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_twilio_rest import FakePhone, FakeTwilioRest
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import StreamOptions
from voice_runtime.voicemail import (
    answered_by,
    leave_voicemail,
    leave_voicemail_async,
    note_answered_by,
)

OUR_NUMBER = "+15550001111"
MESSAGE = "Hi, this is Acme. Your order is ready. Call us back any time."


@pytest.fixture
async def outbound(fake_env: FakeTwilioRest) -> AsyncIterator[tuple[VoiceServer, FakePhone]]:
    server = VoiceServer(stream_options=StreamOptions(lead_ms=60))
    async with serve_in_loop(server.app) as srv:
        server.public_url = srv.url
        phone = FakePhone(fake_env).start()
        try:
            yield server, phone
        finally:
            await asyncio.to_thread(phone.close)
    assert not fake_env.callback_errors


@dataclass
class Line:
    """The far end of one call: its simulator, driven on the phone's own loop."""

    phone: FakePhone
    sim: CallerSimulator

    async def run(self, coro: Any) -> Any:
        return await asyncio.to_thread(self.phone.run, coro)

    async def send(self, ulaw: bytes) -> None:
        await self.run(self.sim.send_audio(ulaw))

    async def closed(self) -> bool:
        return bool(await self.run(self.sim.wait_closed(5)))


async def _call(server: VoiceServer, phone: FakePhone, **options: Any) -> tuple[VoiceSession, Line]:
    session = await server.place_call_async("+15550002222", **options)
    await session.wait_for_ws_connect_async(5)
    sim = phone.latest(session.call_sid or "")
    assert sim is not None
    return session, Line(phone, sim)


def _greeting_and_beep(beep_hz: float = 1000.0) -> tuple[bytes, int]:
    """A machine greeting (noise bursts like speech), a beep, then line noise; beep end byte."""
    rng = np.random.default_rng(5)
    greeting = rng.normal(0, 2500, 8 * 400) * np.repeat(rng.random(20) > 0.4, 160)
    beep = tone_pcm16(beep_hz, 250.0, -18.0).astype(np.float64) + rng.normal(0, 300, 2000)
    tail = rng.normal(0, 100, 8 * 200)
    pcm = np.concatenate([greeting, beep, tail]).clip(-32768, 32767).astype(np.int16)
    return pcm16_to_ulaw(pcm.tobytes()), len(greeting) + len(beep)


def _first_loud(ulaw: bytes, start: int = 0) -> int:
    level = np.abs(ulaw_decode(ulaw[start:]).astype(np.int32))
    return start + int(np.argmax(level > 1000))


async def test_amd_machine_end_beep_speaks_after_it_and_hangs_up_once_heard(
    fake_env: FakeTwilioRest, outbound: tuple[VoiceServer, FakePhone]
) -> None:
    server, phone = outbound
    session, sim = await _call(server, phone, machine_detection="DetectMessageEnd", async_amd=True)
    tts = MockTts(ms_per_char=8.0)
    leave = lambda: leave_voicemail(session, MESSAGE, tts, amd_timeout=30)  # noqa: E731
    task = asyncio.ensure_future(asyncio.to_thread(leave))
    greeting, _ = _greeting_and_beep()
    await sim.send(greeting)  # the greeting and its beep: AMD decides, not the tap
    assert not task.done() and not sim.sim.received and tts.spoken == []

    sent = await asyncio.to_thread(
        fake_env.send_amd_result, session.call_sid or "", "machine_end_beep"
    )
    assert sent.status == 204 and sent.field("AnsweredBy") == "machine_end_beep"
    result = await asyncio.wait_for(task, 10)
    assert result.outcome == "left" and result.left
    assert (result.answered_by, result.detected_by) == ("machine_end_beep", "amd")
    assert answered_by(session) == "machine_end_beep"
    assert tts.spoken == [MESSAGE]
    # Heard in full (the mark came back), then hung up over REST.
    assert sim.sim.heard_ms >= len(tts.audio_for(MESSAGE)) / 8
    assert await sim.closed()
    assert fake_env.calls[session.call_sid or ""].status == "completed"


async def test_a_human_answer_returns_human_without_speaking(
    fake_env: FakeTwilioRest, outbound: tuple[VoiceServer, FakePhone]
) -> None:
    server, phone = outbound
    session, sim = await _call(server, phone, machine_detection="DetectMessageEnd", async_amd=True)
    tts = MockTts(ms_per_char=8.0)
    task = asyncio.ensure_future(leave_voicemail_async(session, MESSAGE, tts, timeout=10))
    await asyncio.to_thread(fake_env.send_amd_result, session.call_sid or "", "human")
    result = await asyncio.wait_for(task, 5)
    assert (result.outcome, result.answered_by, result.left) == ("human", "human", False)
    assert tts.spoken == [] and not sim.sim.received
    assert not session.is_disconnected  # the call is the bot's to continue


async def test_without_amd_the_local_beep_detector_starts_the_message_after_the_beep(
    outbound: tuple[VoiceServer, FakePhone],
) -> None:
    server, phone = outbound
    session, sim = await _call(server, phone)
    tts = MockTts(ms_per_char=8.0)
    conversation = Conversation(session, tts)
    task = asyncio.ensure_future(asyncio.to_thread(conversation.leave_voicemail, MESSAGE))
    greeting, beep_end = _greeting_and_beep(beep_hz=1400.0)
    await sim.send(greeting)
    result = await asyncio.wait_for(task, 10)
    assert (result.outcome, result.detected_by, result.answered_by) == ("left", "beep", None)
    assert result.beep is not None and abs(result.beep.freq_hz - 1400.0) <= 20
    assert [t.text for t in conversation.turns] == [MESSAGE]
    # On the call's timeline the agent's first sound comes after the beep ended.
    caller, agent = sim.sim.tracks_ulaw()
    assert _first_loud(agent) >= beep_end
    assert await sim.closed()


async def test_machine_start_amd_defers_to_the_beep_detector(
    fake_env: FakeTwilioRest, outbound: tuple[VoiceServer, FakePhone]
) -> None:
    server, phone = outbound
    session, sim = await _call(server, phone, machine_detection="Enable", async_amd=True)
    await asyncio.to_thread(fake_env.send_amd_result, session.call_sid or "", "machine_start")
    tts = MockTts(ms_per_char=8.0)
    conversation = Conversation(session, tts)
    task = asyncio.ensure_future(conversation.leave_voicemail_async(MESSAGE, amd_timeout=30))
    greeting, _ = _greeting_and_beep()
    await sim.send(greeting)
    result = await asyncio.wait_for(task, 10)
    assert (result.outcome, result.answered_by, result.detected_by) == (
        "left",
        "machine_start",
        "beep",
    )


async def test_with_amd_pending_a_beep_waits_for_amd_then_times_out_cleanly(
    outbound: tuple[VoiceServer, FakePhone],
) -> None:
    server, phone = outbound
    session, sim = await _call(server, phone)
    tts = MockTts(ms_per_char=8.0)
    # AMD gets 1.5 s to answer; the beep comes first but only counts once AMD is overdue.
    task = asyncio.ensure_future(
        leave_voicemail_async(session, MESSAGE, tts, amd_timeout=1.5, timeout=8)
    )
    greeting, _ = _greeting_and_beep()
    await sim.send(greeting)  # greeting and beep: 0.85 s
    assert not task.done() and not sim.sim.received
    result = await asyncio.wait_for(task, 8)
    assert (result.outcome, result.detected_by) == ("left", "beep")
    # Nothing found at all: "timeout", nothing spoken, the tap is gone.
    session2, sim2 = await _call(server, phone)
    quiet = await leave_voicemail_async(session2, MESSAGE, tts, timeout=0.3)
    assert quiet.outcome == "timeout" and not sim2.sim.received
    assert session2.inbound_taps == []


async def test_a_hangup_before_the_beep_ends_the_wait(
    outbound: tuple[VoiceServer, FakePhone],
) -> None:
    server, phone = outbound
    session, sim = await _call(server, phone)
    task = asyncio.ensure_future(
        leave_voicemail_async(session, MESSAGE, MockTts(ms_per_char=8.0), timeout=10)
    )
    await sim.run(sim.sim.send_silence(100))
    await sim.run(sim.sim.hangup())
    result = await asyncio.wait_for(task, 5)
    assert result.outcome == "hangup"
    assert await wait_for(lambda: session.inbound_taps == [], 2)
    with pytest.raises(ValueError, match="blank"):
        await leave_voicemail_async(session, "  ", MockTts(ms_per_char=8.0))


def test_the_amd_result_belongs_to_one_call() -> None:
    session = VoiceSession(call_sid="CA" + "1" * 32)
    assert answered_by(session) is None
    note_answered_by(session, "human")
    assert answered_by(session) == "human"
    session.call_sid = "CA" + "2" * 32  # the session object serves the next call
    assert answered_by(session) is None
