"""Faults and abuse against a live server: what one call does must not hurt the others."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import websockets
from abuse_kit import PacedCaller, media_frame, sids, start_frame
from conftest import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from voice_runtime.mock.tts import MockTts
from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
from voice_runtime.server import VoiceServer
from voice_runtime.session import INBOUND_MAXSIZE, VoiceSession
from voice_runtime.testing.fake_elevenlabs import FakeScribeServer, ScribePlan, ScribeUtterance
from voice_runtime.testing.server import ServerThread, serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.watchdog import LoopWatchdog

FRAME = 160


class _Recorder:
    """An on_call handler that plays a keeping-up STT: every caller byte, per call."""

    def __init__(self) -> None:
        self.audio: dict[str, bytearray] = {}
        self.ended: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def ended_event(self, call_sid: str) -> threading.Event:
        with self._lock:
            return self.ended.setdefault(call_sid, threading.Event())

    async def handle(self, session: VoiceSession) -> None:
        sid = session.call_sid or ""
        buf = self.audio.setdefault(sid, bytearray())
        try:
            while (frame := await session.inbound.get()) is not None:
                buf.extend(frame)
        finally:
            self.ended_event(sid).set()


# ------------------------------------------------------------------ malformed traffic

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and Infinity too: json.dumps writes them, json.loads reads them
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
_payload = (
    st.text(max_size=40)
    | st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode("ascii"))
    | st.integers(40_000, 200_000).map(lambda n: "A" * n)  # over max_message_bytes
    | _json
)
_media_body = st.fixed_dictionaries(
    {},
    optional={"payload": _payload, "track": _json, "chunk": _json, "timestamp": _json},
)
_start_body = st.fixed_dictionaries(
    {},
    optional={
        "callSid": _json | st.just("CA" + "9" * 32),
        "streamSid": _json,
        "tracks": _json,
        "customParameters": _json,
        "mediaFormat": _json,
        "accountSid": _json,
    },
)
_envelope = st.fixed_dictionaries(
    {
        "event": st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "clear"])
        | st.text(max_size=8)
        | _json
    },
    optional={
        "streamSid": _json,
        "sequenceNumber": _json,
        "media": _media_body | _json,
        "start": _start_body | _json,
        "mark": st.fixed_dictionaries({}, optional={"name": _json | st.text(max_size=30)}) | _json,
        "dtmf": st.fixed_dictionaries({}, optional={"digit": _json, "track": _json}) | _json,
        "stop": _json,
    },
).map(json.dumps)
# Valid frames of a started stream with one or two fields replaced: these reach deep into
# the parser and the session, where a purely random frame rarely gets.
_PATHS = {
    "media": [
        "sequenceNumber",
        "streamSid",
        "media",
        "media.payload",
        "media.track",
        "media.chunk",
        "media.timestamp",
    ],
    "mark": ["sequenceNumber", "streamSid", "mark", "mark.name"],
    "dtmf": ["sequenceNumber", "streamSid", "dtmf", "dtmf.digit", "dtmf.track"],
    "stop": ["sequenceNumber", "streamSid", "stop"],
}
_near_valid = st.sampled_from(sorted(_PATHS)).flatmap(
    lambda kind: st.tuples(
        st.just(kind),
        st.dictionaries(
            st.sampled_from(_PATHS[kind]),
            _json
            | st.sampled_from(
                [float("inf"), float("nan"), -(10**400), "1e309", "vr~pos~0~1e309", "vr~pos~x"]
            ),
            min_size=1,
            max_size=2,
        ),
    )
)


def _near_valid_text(kind: str, changes: dict[str, Any], stream_sid: str) -> str:
    bodies: dict[str, Any] = {
        "media": {"track": "inbound", "chunk": "3", "timestamp": "60", "payload": "//8="},
        "mark": {"name": "vr~pos~0~20.000"},
        "dtmf": {"track": "inbound_track", "digit": "5"},
        "stop": {"accountSid": "AC" + "0" * 32, "callSid": "CA" + "0" * 32},
    }
    frame: dict[str, Any] = {
        "event": kind,
        "sequenceNumber": "3",
        "streamSid": stream_sid,
        kind: bodies[kind],
    }
    for path, value in changes.items():
        top, _, sub = path.partition(".")
        if sub and isinstance(frame.get(top), dict):
            frame[top][sub] = value
        else:
            frame[top] = value
    return json.dumps(frame)


_message = st.one_of(
    _envelope,
    _json.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.integers(50, 5_000).map(lambda n: "[" * n + "]" * n),  # deeply nested
    st.integers(50, 5_000).map(lambda n: '{"a":' * n),  # nested and unterminated
)


def _attack(url: str) -> Callable[[], None]:
    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        batch=st.lists(_message | _near_valid, min_size=1, max_size=6),
        start_first=st.sampled_from([True, True, True, False]),
    )
    def attack(batch: list[Any], start_first: bool) -> None:
        call_sid, stream_sid = sids()
        with ws_connect(url, compression=None, max_size=None) as ws:
            try:
                if start_first:
                    ws.send(start_frame(call_sid, stream_sid))
                    ws.send(media_frame(stream_sid, bytes(FRAME), 2))
                for message in batch:
                    if isinstance(message, tuple):
                        message = _near_valid_text(*message, stream_sid)
                    ws.send(message)
            except websockets.ConnectionClosed:
                pass  # the server may close a connection that broke the websocket rules

    return attack


def test_malformed_traffic_leaves_the_server_and_the_other_call_whole(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="voice_runtime")
    recorder = _Recorder()
    voice = VoiceServer(on_call=recorder.handle, max_calls=1000)
    with ServerThread(voice.app) as srv:
        url = srv.ws_url + "/voice"
        good = PacedCaller(url)
        good.start()
        _attack(url)()
        good.stop()
        assert good.error is None
        assert recorder.ended_event(good.call_sid).wait(5), (
            good.call_sid,
            {k: len(v) for k, v in recorder.audio.items()},
            len(good.sent),
        )
        assert len(good.sent) >= 10 * FRAME
        # Every frame of the well-behaved call reached its STT, byte-exact and in order.
        assert bytes(recorder.audio[good.call_sid]) == bytes(good.sent)
        # The server still serves: health answers and a new call gets its audio through.
        with urllib.request.urlopen(srv.url + "/health", timeout=5) as resp:
            assert resp.status == 200
        call_sid, stream_sid = sids()
        frames = [os.urandom(FRAME) for _ in range(5)]
        with ws_connect(url, compression=None) as ws:
            ws.send(start_frame(call_sid, stream_sid))
            for i, frame in enumerate(frames):
                ws.send(media_frame(stream_sid, frame, i + 2))
        assert recorder.ended_event(call_sid).wait(5)
        assert bytes(recorder.audio[call_sid]) == b"".join(frames)
    # Malformed input is counted and logged as a warning, never raised out of a stream.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert any(r.getMessage() == "unusable media stream frame dropped" for r in caplog.records)


# ------------------------------------------------------------------ caller drops mid-speak


def test_caller_dropped_mid_speak_ends_speak_and_releases_the_call() -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    sessions: list[VoiceSession] = []

    def factory() -> VoiceSession:
        sessions.append(VoiceSession())
        return sessions[-1]

    voice = VoiceServer(session_factory=factory)
    with ServerThread(voice.app) as srv:
        dropped = threading.Event()

        async def caller() -> None:
            sim = CallerSimulator(srv.ws_url + "/voice")
            await sim.connect()
            assert await sim.wait_for_heard(300, timeout=10)
            # The line drops: no stop message, no close handshake.
            sim._ws.transport.abort()
            dropped.set()
            await sim.wait_closed(5)
            await sim.hangup()

        t = threading.Thread(target=lambda: asyncio.run(caller()), name="dropping-caller")
        t.start()
        deadline = time.monotonic() + 5
        while not sessions:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        session = sessions[0]
        session.wait_for_ws_connect(5)
        started = time.monotonic()
        result = MockTts().speak("This sentence is far too long to finish playing. " * 4, session)
        assert dropped.is_set()
        assert time.monotonic() - started < 5  # returned at the drop, not after the tone
        assert result["call_disconnected"] is True
        assert result["interrupted"] is False
        t.join(10)
        assert not t.is_alive()
        assert session.is_disconnected
        deadline = time.monotonic() + 5
        while [n for n in srv.tasks() if n.startswith(("vr-", "mock-"))]:
            assert time.monotonic() < deadline, srv.tasks()
            time.sleep(0.02)
        assert voice.registry.live_count == 0
    leftover = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    assert leftover == []


# ------------------------------------------------------------------ a consumer that never reads


async def test_stt_that_never_reads_drops_counted_frames_and_spares_other_calls(
    caplog: Any,
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_runtime.session")
    recorder = _Recorder()
    slow: list[VoiceSession] = []

    async def on_call(session: VoiceSession) -> None:
        if session.call_sid and session.call_sid.startswith("CAslow"):
            slow.append(session)  # this call's STT never reads its queue
            await session.wait_until_disconnected_async()
            return
        await recorder.handle(session)

    voice = VoiceServer(on_call=on_call)
    extra = 300
    async with serve_in_loop(voice.app) as srv:
        url = srv.ws_url + "/voice"
        slow_sim = CallerSimulator(url, call_sid="CAslow" + "0" * 28, silence_when_idle=False)
        fast_sim = CallerSimulator(url, silence_when_idle=False)
        async with slow_sim, fast_sim:
            assert await wait_for(lambda: bool(slow), 5)
            frames = [os.urandom(FRAME) for _ in range(INBOUND_MAXSIZE + extra)]
            fast_audio = os.urandom(FRAME * 200)
            await asyncio.gather(
                slow_sim.send_audio(b"".join(frames), realtime=False),
                fast_sim.send_audio(fast_audio, realtime=False),
            )
            session = slow[0]
            assert await wait_for(lambda: session.stats.inbound_frames == len(frames), 10)
            # Bounded: the queue holds its maximum, the overflow was dropped and counted,
            # and what is kept is the newest audio.
            assert session.inbound.qsize() == INBOUND_MAXSIZE
            assert session.stats.inbound_dropped == extra
            kept = [session.inbound.get_nowait() for _ in range(INBOUND_MAXSIZE)]
            assert kept == frames[extra:]
            assert await wait_for(
                lambda: len(recorder.audio.get(fast_sim.call_sid, b"")) == len(fast_audio), 5
            )
        assert recorder.ended_event(fast_sim.call_sid).wait(5)
    # The other call got every byte, in order.
    assert bytes(recorder.audio[fast_sim.call_sid]) == fast_audio
    assert any(
        r.getMessage() == "caller audio dropped: STT is not keeping up" for r in caplog.records
    )


# ------------------------------------------------------------------ a handler that blocks the loop


def test_handler_that_blocks_the_event_loop_is_detected_and_logged(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="voice_runtime.watchdog")

    async def on_call(session: VoiceSession) -> None:
        time.sleep(0.6)  # noqa: ASYNC251 - the mistake this test is about

    lags: list[float] = []
    voice = VoiceServer(on_call=on_call, watchdog=LoopWatchdog(threshold=0.2, on_lag=lags.append))
    with ServerThread(voice.app) as srv:
        call_sid, stream_sid = sids()
        with ws_connect(srv.ws_url + "/voice", compression=None) as ws:
            ws.send(start_frame(call_sid, stream_sid))
            deadline = time.monotonic() + 5
            while not lags:
                assert time.monotonic() < deadline, "the blocked loop was not noticed"
                ws.send(media_frame(stream_sid, bytes(FRAME), 2))
                time.sleep(0.05)
    # The watchdog's timer fell due somewhere inside the 0.6 s block: it saw at least the
    # part of the block after its interval.
    seen = 0.6 - voice.watchdog.interval - 0.01
    assert voice.watchdog.lag_events >= 1
    assert voice.watchdog.max_lag >= seen
    warnings = [r for r in caplog.records if r.getMessage().startswith("event loop blocked")]
    assert warnings and warnings[0].lag_ms >= seen * 1000  # type: ignore[attr-defined]
    # The lag is in the text too, where a default format shows it.
    shown = re.search(r"blocked for (\d+) ms", warnings[0].getMessage())
    assert shown and abs(int(shown[1]) - warnings[0].lag_ms) <= 1  # type: ignore[attr-defined]
    # It stops with the last stream.
    assert not voice.watchdog.running


# -------------------------------------------------------------- a vendor socket killed repeatedly


async def test_stt_vendor_socket_killed_again_and_again_keeps_transcribing() -> None:
    kills = 6
    words = [f"sentence number {i}" for i in range(kills + 2)]
    # Each of the first connections commits one sentence, then its TCP connection is cut.
    utterances = [ScribeUtterance(w, after_bytes=1600, partial_at=None) for w in words]
    plans = [ScribePlan(drop_after_bytes=2400) for _ in range(kills)]
    recorder = _Recorder()
    committed: list[str] = []
    errors: list[str] = []
    stts: list[PersistentSttSession] = []

    async with FakeScribeServer(utterances, plans=plans) as scribe:

        def factory() -> VoiceSession:
            if stts:
                return VoiceSession()
            stt = PersistentSttSession(
                api_key="key", base_url=scribe.base_url, reconnect_base_delay=0.01
            )
            stt.on_committed = committed.append
            stt.on_error = errors.append
            stts.append(stt)
            return VoiceSession(stt=stt)

        async def on_call(session: VoiceSession) -> None:
            if session.stt is not None:
                await session.wait_until_disconnected_async()
            else:
                await recorder.handle(session)

        voice = VoiceServer(on_call=on_call, session_factory=factory)
        async with serve_in_loop(voice.app) as srv:
            url = srv.ws_url + "/voice"
            flaky = CallerSimulator(url, silence_when_idle=False)
            other = CallerSimulator(url, silence_when_idle=False)
            other_audio = os.urandom(FRAME * 150)
            async with flaky:
                assert await wait_for(lambda: bool(stts), 5)
                async with other:
                    await asyncio.gather(
                        # In real time, as Twilio sends it: a commit confirms what was sent
                        # before it, so only real-time pacing keeps in-flight audio small.
                        flaky.send_audio(os.urandom(1600 * len(words) + 800), realtime=True),
                        other.send_audio(other_audio, realtime=True),
                    )
                    assert await wait_for(lambda: committed == words, 10), committed
                    assert await wait_for(
                        lambda: len(recorder.audio.get(other.call_sid, b"")) == len(other_audio)
                    )
            stt = stts[0]
            assert errors == []
            assert stt.reconnects == kills
            assert len(scribe.connections) == kills + 1
            # The call's end closed the last vendor socket and ended the STT's tasks.
            assert await scribe.wait_until(lambda: all(c.closed for c in scribe.connections))
            assert await wait_for(
                lambda: not [t for t in asyncio.all_tasks() if "elevenlabs" in t.get_name()]
            )
            assert await wait_for(lambda: voice.registry.live_count == 0)
    # The other call heard nothing of it: every byte, in order.
    assert bytes(recorder.audio[other.call_sid]) == other_audio
