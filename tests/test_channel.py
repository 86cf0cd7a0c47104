"""MediaStreamCall over the in-memory FrameChannel, the server-side call wiring, the layers.

No socket: a MemoryChannel plays Twilio's side (feed messages in, read what was sent), the way
httpx's MockTransport stands in for the network.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

from conftest import wait_for

from voice_runtime.call_wiring import CallWiring
from voice_runtime.mock.stt import MockStt
from voice_runtime.session import VoiceSession
from voice_runtime.transports.channel import (
    FrameChannel,
    LeanChannel,
    MemoryChannel,
    StarletteChannel,
    channel_for,
)
from voice_runtime.transports.twilio_ws import MediaStreamCall, StreamOptions

PACKAGE = Path(__file__).resolve().parent.parent / "voice_runtime"


def _start(call_sid: str = "CA1", stream_sid: str = "MZ1") -> str:
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": stream_sid,
            "start": {
                "streamSid": stream_sid,
                "callSid": call_sid,
                "accountSid": "AC1",
                "tracks": ["inbound"],
                "customParameters": {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )


def _media(audio: bytes, seq: int = 2) -> str:
    payload = base64.b64encode(audio).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "streamSid": "MZ1",
            "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": payload},
        }
    )


def _sent(channel: MemoryChannel, event: str) -> list[dict[str, Any]]:
    return [m for m in map(json.loads, channel.sent) if m["event"] == event]


def test_every_channel_is_a_frame_channel() -> None:
    assert isinstance(MemoryChannel(), FrameChannel)
    assert isinstance(StarletteChannel(object()), FrameChannel)
    assert all(
        callable(getattr(LeanChannel, name, None))
        for name in ("attach", "send_texts", "wait_writable", "close")
    )
    memory = MemoryChannel()
    assert channel_for(memory) is memory
    assert isinstance(channel_for(object()), StarletteChannel)


async def test_a_call_over_the_memory_channel_moves_audio_both_ways() -> None:
    session = VoiceSession()
    channel = MemoryChannel()
    call = MediaStreamCall(channel, session, options=StreamOptions(lead_ms=1e6))
    runner = asyncio.create_task(call.run())
    channel.feed(_start())
    await session.wait_for_ws_connect_async(5)
    assert session.call_sid == "CA1" and session.stream_sid == "MZ1"
    channel.feed(_media(b"\x11" * 160))
    assert await asyncio.wait_for(session.inbound.get(), 5) == b"\x11" * 160

    await session.put_outbound(b"\x22" * 800)
    assert await wait_for(lambda: session.stats.audio_sent_bytes == 800)
    assert await wait_for(lambda: _sent(channel, "mark"))
    media = _sent(channel, "media")
    assert b"".join(base64.b64decode(m["media"]["payload"]) for m in media) == b"\x22" * 800
    assert {m["streamSid"] for m in media} == {"MZ1"}
    # Messages leave in batches, not one write each.
    assert channel.writes < len(channel.sent)

    channel.feed(json.dumps({"event": "stop", "streamSid": "MZ1"}))
    await asyncio.wait_for(runner, 5)
    assert session.is_disconnected and channel.closed == 1000


async def test_a_send_that_fails_ends_the_call() -> None:
    session = VoiceSession()
    channel = MemoryChannel()
    channel.fail_sends = True
    runner = asyncio.create_task(MediaStreamCall(channel, session).run())
    channel.feed(_start())
    await session.put_outbound(b"\x00" * 160)
    assert await wait_for(lambda: session.is_disconnected)
    channel.feed_close(1006)
    await asyncio.wait_for(runner, 5)


async def test_a_refused_start_closes_with_1008_and_leaves_the_session_alone() -> None:
    session = VoiceSession()
    channel = MemoryChannel()
    call = MediaStreamCall(channel, session, check_start=lambda start: "not yours")
    runner = asyncio.create_task(call.run())
    channel.feed(_start())
    await asyncio.wait_for(runner, 5)
    assert call.refused == "not yours" and channel.closed == 1008
    assert session.call_sid is None and session.stats.bad_frames["start_refused"] == 1


async def test_backpressure_holds_the_sender_until_the_channel_is_writable() -> None:
    session = VoiceSession()
    channel = MemoryChannel()
    channel.writable = False
    runner = asyncio.create_task(
        MediaStreamCall(channel, session, options=StreamOptions(lead_ms=1e6)).run()
    )
    channel.feed(_start())
    await session.put_outbound(b"\x01" * 1600)
    assert await wait_for(lambda: session.stats.audio_sent_bytes == 1600)
    assert channel.sent == []  # written into the batch, held back
    channel.writable = True
    assert await wait_for(lambda: len(_sent(channel, "media")) == 5)
    channel.feed_close(1000)
    await asyncio.wait_for(runner, 5)


async def test_call_wiring_builds_starts_and_drops_the_stt_of_each_call() -> None:
    session = VoiceSession()
    made: list[MockStt] = []
    session.stt_factory = lambda: made.append(MockStt()) or made[-1]
    ready: list[Any] = []
    session.on_stt_ready = ready.append
    for n, call_sid in enumerate(("CA1", "CA2"), 1):
        channel = MemoryChannel()
        wiring = CallWiring(session)
        assert session.control is not None  # call control installed by the server layer
        call = MediaStreamCall(channel, session, on_start=wiring.on_start(), on_end=wiring.finish)
        runner = asyncio.create_task(call.run())
        channel.feed(_start(call_sid=call_sid))
        assert await wait_for(lambda: len(made) == n and made[-1].started)  # noqa: B023
        assert ready == made
        channel.feed_close(1000)
        await asyncio.wait_for(runner, 5)
        assert made[-1].stopped and session.stt is None
        assert [t for t in asyncio.all_tasks() if t.get_name().startswith("vr-")] == []
    assert len(made) == 2
