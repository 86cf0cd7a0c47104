"""The local demo call: a real server, a real Media Streams websocket, a simulated caller.

``voice-runtime demo`` starts the example app on a free 127.0.0.1 port, places a call to it
with the caller simulator, prints a timeline of the call and writes a stereo recording
(caller left, agent right). With the ``offline`` engines both sides really speak: the agent
with eSpeak NG, the caller with the piper voice, and the agent's STT (Whisper tiny.en behind
a Silero VAD) really listens. With ``--engine mock`` the agent speaks a tone and the demo
hands the caller's words to the mock STT.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from fastapi import FastAPI

from voice_runtime.conversation import Conversation, Turn
from voice_runtime.errors import CallHangupError
from voice_runtime.session import VoiceSession
from voice_runtime.testing.clock import ManualClock
from voice_runtime.testing.server import ServerThread
from voice_runtime.testing.simulator import CallerSimulator, SimEvent
from voice_runtime.transports.twilio_ws import StreamOptions, register_voice_websocket

logger = logging.getLogger(__name__)

DEFAULT_LINES = ("My name is Alex.", "I would like to book a table for two tonight.")

# With virtual time the server sends agent audio as soon as it has it (the caller's clock,
# not the server's pacing, decides when it plays); a ``clear`` then drops more, which the
# demo's turn-taking never asks for.
VIRTUAL_LEAD_MS = 600_000.0

__all__ = ["DEFAULT_LINES", "DemoResult", "agent_script", "run_demo"]


@dataclass
class DemoResult:
    """What happened in the demo call."""

    turns: list[Turn]
    events: list[tuple[float, str, str]]
    latencies_ms: list[float]
    stt_latencies_ms: list[float]
    recording: Path | None
    engine: str
    seconds: float
    sim_events: list[SimEvent] = field(default_factory=list)
    #: Per caller turn, ms after the caller stopped speaking: transcript committed, first agent
    #: audio sent to the stream, first agent audio the caller heard.
    turn_timings: list[dict[str, float | None]] = field(default_factory=list)


def agent_script(conv: Conversation, listen_timeout: float = 20.0) -> None:
    """The example app: greet, ask, answer from what was heard, say goodbye, hang up."""
    try:
        conv.say("Hello! Thanks for calling the demo restaurant. What is your name?")
        name_line = conv.listen(listen_timeout) or ""
        name = _name_from(name_line)
        conv.say(
            f"Nice to meet you, {name}. How can I help you today?"
            if name
            else "Nice to meet you. How can I help you today?"
        )
        request = conv.listen(listen_timeout) or ""
        if "table" in request.lower() or "book" in request.lower():
            conv.say("Your table is booked. We look forward to seeing you. Goodbye!")
        elif request:
            conv.say("Thank you, I have noted that. Goodbye!")
        else:
            conv.say("I did not hear anything. Goodbye!")
        conv.hangup()
    except CallHangupError:
        logger.info("caller hung up during the demo script")


def _name_from(line: str) -> str:
    words = [w.strip(".,!?") for w in line.split()]
    lowered = [w.lower() for w in words]
    for marker in ("is", "am", "i'm"):
        if marker in lowered:
            i = lowered.index(marker) + 1
            if i < len(words) and words[i]:
                return words[i].capitalize()
    return words[-1].capitalize() if words and words[-1] else ""


def _providers(engine: str) -> tuple[Callable[[], Any], Any, Callable[[str], bytes] | str]:
    """Return (stt_factory, agent_tts, caller_voice) for an engine name."""
    if engine == "offline":
        from voice_runtime.providers.offline_stt import OfflineStt
        from voice_runtime.providers.offline_tts import OfflineTts

        return OfflineStt, OfflineTts(voice="espeak"), "piper"
    if engine == "mock":
        from voice_runtime.mock.stt import MockStt
        from voice_runtime.mock.tts import MockTts

        caller_tts = MockTts(freq=220.0)
        return MockStt, MockTts(), caller_tts.audio_for
    raise ValueError(f"unknown demo engine: {engine!r} (use 'offline' or 'mock')")


def preload(engine: str) -> None:
    """Load the engine's models before the call, so the first turn is not slowed by it."""
    if engine == "offline":
        from voice_runtime.offline import preload_all

        preload_all()


async def _caller(
    sim: CallerSimulator,
    lines: tuple[str, ...],
    voice: Callable[[str], bytes] | str,
    inject: Callable[[str], None] | None,
    timeout: float,
) -> None:
    """The caller's side: wait for the agent to finish, say the next line, repeat."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for line in lines:
        # Speak once the agent has said something and gone quiet.
        await sim.wait_for_heard(1, timeout=max(0.1, deadline - loop.time()))
        await sim.wait_idle(quiet_s=0.6, timeout=max(0.1, deadline - loop.time()))
        if sim.closed:
            return
        await sim.say(line, voice)
        if inject is not None:
            inject(line)
        # The agent's answer starts playing before the next line is said.
        await sim.wait_for_heard(sim.heard_ms + 1, timeout=max(0.1, deadline - loop.time()))
    await sim.wait_closed(max(0.1, deadline - loop.time()))


def run_demo(
    *,
    engine: str = "offline",
    lines: tuple[str, ...] = DEFAULT_LINES,
    record: Path | None = Path("demo_call.wav"),
    out: TextIO | None = sys.stdout,
    timeout: float = 60.0,
    virtual_time: bool = False,
) -> DemoResult:
    """Run the whole demo call and return what happened.

    With ``virtual_time`` the caller runs on a :class:`ManualClock` that skips through the
    stretches where only audio plays (the agent's speech, the caller's line), so the call
    takes a fraction of its length; waits on the agent and its engines stay real. Times in
    the result are then on that clock.
    """
    started = time.monotonic()
    # The demo server listens on 127.0.0.1 only: the no-auth-token warning is not for it.
    security_log = logging.getLogger("voice_runtime.transports.security")
    level = security_log.level
    security_log.setLevel(logging.ERROR)
    try:
        return _run_demo(engine, lines, record, out, timeout, started, virtual_time)
    finally:
        security_log.setLevel(level)


def _run_demo(
    engine: str,
    lines: tuple[str, ...],
    record: Path | None,
    out: TextIO | None,
    timeout: float,
    started: float,
    virtual_time: bool = False,
) -> DemoResult:
    stt_factory, agent_tts, caller_voice = _providers(engine)
    preload(engine)
    clock = ManualClock() if virtual_time else None
    # Every time in the result is on the caller's clock: the loop's (monotonic) or virtual.
    now: Callable[[], float] = clock.now if clock is not None else time.monotonic
    session = VoiceSession(stt_factory=stt_factory)
    sends = _SendClock(now)
    session.set_mixer(sends)  # the session's agent tap sees each frame as it is sent
    app = FastAPI(title="voice_runtime demo")
    options = StreamOptions(lead_ms=VIRTUAL_LEAD_MS) if virtual_time else None
    register_voice_websocket(app, session, options=options)
    timeline: list[tuple[float, str, str]] = []
    lock = threading.Lock()
    turn_times: dict[int, float] = {}

    def note(who: str, what: str) -> None:
        t_now = now()
        with lock:
            timeline.append((t_now, who, what))
        if out is not None:
            t = t_now - call_t0[0] if call_t0[0] is not None else 0.0
            print(f"  {t:6.2f}s  {who:<7} {what}", file=out, flush=True)

    def on_turn(turn: Turn) -> None:
        turn_times[id(turn)] = now()
        note(
            "agent" if turn.speaker == "agent" else "stt",
            f"said: {turn.text}" if turn.speaker == "agent" else f"heard: {turn.text}",
        )

    call_t0: list[float | None] = [None]  # a virtual clock starts at 0
    conv = Conversation(session, agent_tts, on_turn=on_turn)
    stt_made: list[Any] = []
    inject: Callable[[str], None] | None = None
    if engine == "mock":

        def inject(text: str) -> None:  # noqa: F811 - the mock STT needs the words handed to it
            if session.stt is not None:
                session.stt.inject(text)  # type: ignore[attr-defined]

    if out is not None:
        print(f"voice_runtime demo: engine={engine}", file=out, flush=True)
    with ServerThread(app) as server:
        if out is not None:
            print(
                f"  server listening on {server.url} (Media Streams at /voice)",
                file=out,
                flush=True,
            )

        def agent() -> None:
            session.wait_for_ws_connect(15)
            agent_script(conv)

        agent_thread = threading.Thread(target=agent, name="demo-agent", daemon=True)
        agent_thread.start()

        async def place_call() -> CallerSimulator:
            sim = CallerSimulator(
                server.ws_url + "/voice", parameters={"caller_number": "+15550100"}, clock=clock
            )
            shown = {
                "agent_audio_start",
                "agent_audio_stop",
                "caller_says",
                "caller_done",
                "clear",
                "closed",
                "start",
                "dtmf",
            }

            def on_event(ev: SimEvent) -> None:
                if ev.kind in shown:
                    label = {
                        "agent_audio_start": "caller hears agent audio start",
                        "agent_audio_stop": "agent audio stops",
                        "caller_says": f"caller says: {ev.detail}",
                        "caller_done": "caller stops speaking",
                        "closed": f"call ended (close code {ev.detail})",
                        "start": "stream started",
                    }.get(ev.kind, f"{ev.kind} {ev.detail}".strip())
                    note("caller" if ev.kind.startswith("caller") else "twilio", label)

            sim.on_event = on_event
            follower = None
            if clock is not None:
                follower = asyncio.create_task(
                    clock.follow(skip_while=lambda: sim.buffered_ms > 0 or sim.unsent_ms > 0),
                    name="demo-clock",
                )
            try:
                await sim.connect()
                call_t0[0] = sim.started_at
                # --timeout bounds the whole run: model loading and connecting count too.
                left = max(0.1, timeout - (time.monotonic() - started))
                try:
                    await asyncio.wait_for(_caller(sim, lines, caller_voice, inject, left), left)
                except TimeoutError:
                    note("caller", f"hangs up: --timeout of {timeout:g} s reached")
            finally:
                await sim.hangup()
                if follower is not None:
                    follower.cancel()
                    await asyncio.gather(follower, return_exceptions=True)
            return sim

        sim = asyncio.run(place_call())
        agent_thread.join(max(0.5, min(10.0, timeout - (time.monotonic() - started))))
        stt_made.append(session.stt)
    turns = conv.turns
    if clock is not None:  # a turn's time on the call's (virtual) clock
        turns = [replace(t, t=turn_times.get(id(t), t.t)) for t in conv.turns]
    latencies = _turn_latencies(sim.events)
    stt_latencies = _stt_latencies(sim, turns)
    timings = _turn_timings(sim, turns, sends.starts)
    path = None
    if record is not None:
        path = sim.write_recording(record)
    result = DemoResult(
        turns=turns,
        events=timeline,
        latencies_ms=latencies,
        stt_latencies_ms=stt_latencies,
        turn_timings=timings,
        recording=path,
        engine=engine,
        seconds=time.monotonic() - started,
        sim_events=list(sim.events),
    )
    if out is not None:
        _summary(result, sim, session, out)
    return result


class _SendClock:
    """Mixer-shaped tap: notes when each burst of agent audio starts going out."""

    def __init__(self, now: Callable[[], float] = time.monotonic, gap_s: float = 0.3) -> None:
        self.starts: list[float] = []
        self._last = float("-inf")
        self._gap = gap_s
        self._now = now

    def write_agent(self, chunk: bytes) -> None:
        now = self._now()
        if now - self._last > self._gap:
            self.starts.append(now)
        self._last = now

    def write_caller(self, chunk: bytes) -> None:
        return None


def _turn_timings(
    sim: CallerSimulator, turns: list[Turn], sent_starts: list[float]
) -> list[dict[str, float | None]]:
    """Per caller turn: end of speech -> committed, -> first agent audio sent, -> heard (ms)."""
    base = sim.started_at
    ends = [base + ev.t for ev in sim.events if ev.kind == "caller_done"]
    heard_starts = [base + ev.t for ev in sim.events if ev.kind == "agent_audio_start"]
    commits = [t.t for t in turns if t.speaker == "caller"]

    def first_after(times: list[float], t: float) -> float | None:
        later = [x for x in times if x >= t]
        return round((later[0] - t) * 1000.0, 1) if later else None

    return [
        {
            "committed_ms": first_after(commits, end),
            "first_sent_ms": first_after(sent_starts, end),
            "first_heard_ms": first_after(heard_starts, end),
        }
        for end in ends
    ]


def _turn_latencies(events: list[SimEvent]) -> list[float]:
    """End of caller speech -> first agent audio the caller heard, per turn (ms)."""
    out: list[float] = []
    pending: float | None = None
    for ev in events:
        if ev.kind == "caller_done":
            pending = ev.t
        elif ev.kind == "agent_audio_start" and pending is not None:
            out.append(round((ev.t - pending) * 1000.0, 1))
            pending = None
    return out


def _stt_latencies(sim: CallerSimulator, turns: list[Turn]) -> list[float]:
    """End of caller speech -> committed transcript, per turn (ms)."""
    ends = [sim.started_at + ev.t for ev in sim.events if ev.kind == "caller_done"]
    heard = [t.t for t in turns if t.speaker == "caller"]
    return [round((h - e) * 1000.0, 1) for e, h in zip(ends, heard, strict=False) if h >= e]


def _summary(result: DemoResult, sim: CallerSimulator, session: VoiceSession, out: TextIO) -> None:
    print("", file=out)
    print("Transcript:", file=out)
    for turn in result.turns:
        who = "Agent " if turn.speaker == "agent" else "Caller"
        print(f"  {who}: {turn.text}", file=out)
    # Mock engines answer instantly: their numbers measure the runtime, not speech engines.
    mock = " (mock engines, not speech)" if result.engine == "mock" else ""
    if result.latencies_ms:
        shown = ", ".join(f"{ms:.0f} ms" for ms in result.latencies_ms)
        print(f"Latency{mock}, end of caller speech -> first agent audio heard: {shown}", file=out)
    if result.stt_latencies_ms:
        shown = ", ".join(f"{ms:.0f} ms" for ms in result.stt_latencies_ms)
        print(f"Latency{mock}, end of caller speech -> transcript committed: {shown}", file=out)
    print(
        f"Agent audio heard: {sim.heard_ms / 1000:.1f} s; playback position from marks: "
        f"{session.played_ms / 1000:.1f} s; marks echoed: {len(sim.marks_echoed)}",
        file=out,
    )
    if result.recording is not None:
        print(f"Recording (caller left, agent right): {result.recording}", file=out)
    print(f"Demo finished in {result.seconds:.1f} s", file=out, flush=True)
