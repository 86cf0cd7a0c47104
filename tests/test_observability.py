"""Prometheus metrics and OpenTelemetry traces of real calls, read from the event stream."""

from __future__ import annotations

import asyncio
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import wait_for
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from voice_runtime import events as ev
from voice_runtime.audio import silence_ulaw, tone_ulaw
from voice_runtime.events import CallEvent, CallEvents, EventBus, attach, emit_from
from voice_runtime.mock.stt import MockStt
from voice_runtime.observability.metrics import CallMetrics
from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
from voice_runtime.realtime import AgentOptions, OpenAIRealtimeAgent, ToolRegistry, attach_agent
from voice_runtime.server import VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_elevenlabs import FakeScribeServer, ScribePlan, ScribeUtterance
from voice_runtime.testing.fake_realtime import (
    FakeOpenAIRealtime,
    FakeResponse,
    FakeScript,
    tone_response,
)
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator

ROOT = Path(__file__).resolve().parent.parent
CALLER = "+15557654321"
GREETING = b"\x7f" * 2400  # 300 ms
ANSWER = b"\x7f" * 3200  # 400 ms


class SpeakingStt(MockStt):
    """A scripted STT that reports the caller's speech like a VAD-based provider does."""

    def inject(self, text: str) -> None:
        """The caller said ``text``: speech starts, ends 50 ms later, then it is committed."""
        loop = self._loop
        assert loop is not None

        def speak() -> None:
            emit_from(self, ev.CALLER_SPEECH_STARTED, source="stt")
            loop.call_later(0.05, ended)

        def ended() -> None:
            emit_from(self, ev.CALLER_SPEECH_ENDED, source="stt", speech_ms=50.0)
            loop.call_later(0.03, self._commit, text)

        loop.call_soon_threadsafe(speak)


async def _answering(session: VoiceSession) -> None:
    """Greets, then answers every transcript with 400 ms of audio until the call ends."""
    session.put_outbound_sync(GREETING)
    assert await wait_for(lambda: session.stt is not None)
    session.stt.on_committed = lambda _text: session.put_outbound_sync(ANSWER)  # type: ignore[union-attr]
    await session.wait_until_disconnected_async(30)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def _one_turn(server: VoiceServer, sim: CallerSimulator, seen: Callable[[str], int]) -> None:
    session = await asyncio.to_thread(server.session_for_call, sim.call_sid, 5)
    assert session is not None
    assert await wait_for(lambda: seen(ev.AGENT_AUDIO_HEARD) >= 1, 5)  # the greeting
    assert await wait_for(lambda: session.stt is not None and session.stt.on_committed, 5)
    turns = seen(ev.TURN_LATENCY)
    session.stt.inject("where is my order")  # type: ignore[union-attr]
    assert await wait_for(lambda: seen(ev.TURN_LATENCY) > turns, 5)


async def test_metrics_count_calls_turns_and_frames_with_no_call_sids_or_numbers() -> None:
    server = VoiceServer(on_call=_answering, stt=lambda: SpeakingStt(), metrics=True)
    kinds: list[str] = []
    server.events.subscribe(lambda e: kinds.append(e.kind))
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        sims = [
            CallerSimulator(srv.ws_url + "/voice", parameters={"caller_number": CALLER})
            for _ in range(2)
        ]
        async with sims[0], sims[1]:
            for sim in sims:
                await _one_turn(server, sim, kinds.count)
            await sims[0].send_raw("{not json")
            await sims[0].send_dtmf("5")
            assert await wait_for(lambda: ev.DTMF in kinds, 5)
            live = _samples((await http.get("/metrics")).text)
            assert _value(live, "voice_runtime_live_calls") == 2
        assert await wait_for(lambda: kinds.count(ev.CALL_ENDED) == 2, 5)
        answer = await http.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    m = _samples(text)
    assert _value(m, "voice_runtime_live_calls") == 0
    assert _value(m, "voice_runtime_calls_started_total") == 2
    assert _value(m, "voice_runtime_calls_ended_total", reason="caller_hangup") == 2
    assert _value(m, "voice_runtime_turn_latency_seconds_count") == 2
    assert 0 < _value(m, "voice_runtime_turn_latency_seconds_sum") < 10
    for part in ("to_commit", "to_queued", "queued_to_heard"):
        assert _value(m, "voice_runtime_turn_latency_part_seconds_count", part=part) == 2
    assert _value(m, "voice_runtime_first_audio_heard_seconds_count") == 2
    assert _value(m, "voice_runtime_mark_round_trip_seconds_count") == 4
    assert _value(m, "voice_runtime_frames_in_total") > 0
    assert _value(m, "voice_runtime_frames_out_total") > 0
    assert _value(m, "voice_runtime_bad_frames_total", reason="not_json") == 1
    assert _value(m, "voice_runtime_dtmf_digits_total") == 1
    assert _value(m, "voice_runtime_transcripts_total", vendor="mock") == 2
    for sim in sims:
        assert sim.call_sid not in text and sim.stream_sid not in text
    assert CALLER not in text and "where is my order" not in text


def _tree(spans: list[ReadableSpan]) -> dict[str, list[str]]:
    names = {s.context.span_id: s.name for s in spans}
    children: dict[str, list[str]] = {}
    for s in spans:
        parent = names.get(s.parent.span_id) if s.parent is not None else "<root>"
        children.setdefault(parent or "<orphan>", []).append(s.name)
    return {k: sorted(v) for k, v in children.items()}


def _tracer() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_a_call_is_one_trace_with_a_span_per_turn_and_its_parts() -> None:
    provider, exporter = _tracer()
    server = VoiceServer(
        on_call=_answering, stt=lambda: SpeakingStt(), metrics=False, tracing=provider
    )
    kinds: list[str] = []
    server.events.subscribe(lambda e: kinds.append(e.kind))
    async with serve_in_loop(server.app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice", parameters={"caller_number": CALLER})
        async with sim:
            await _one_turn(server, sim, kinds.count)
        assert await wait_for(lambda: ev.CALL_ENDED in kinds, 5)
    spans = exporter.get_finished_spans()
    assert _tree(list(spans)) == {
        "<root>": ["call"],
        "call": ["greeting", "turn"],
        "turn": ["heard", "listen", "response", "stt"],
    }
    by = {s.name: s for s in spans}
    call, turn = by["call"], by["turn"]
    assert {s.context.trace_id for s in spans} == {call.context.trace_id}
    assert call.start_time <= turn.start_time <= turn.end_time <= call.end_time
    # The parts follow each other: listen, stt, response, heard.
    order = [by[n] for n in ("listen", "stt", "response", "heard")]
    for a, b in zip(order, order[1:], strict=False):
        assert a.end_time <= b.start_time + 1000, (a.name, b.name)
    assert order[0].start_time == turn.start_time and order[-1].end_time == turn.end_time
    latency_ms = turn.attributes["voice_runtime.turn_latency_ms"]
    assert abs((by["heard"].end_time - by["stt"].start_time) / 1e6 - latency_ms) < 5
    for span in spans:
        flat = repr(dict(span.attributes or {})) + repr([e.attributes for e in span.events])
        assert CALLER not in flat and "where is my order" not in flat


async def test_realtime_agent_calls_trace_the_connect_the_tool_and_the_turn() -> None:
    provider, exporter = _tracer()
    tools = ToolRegistry()

    @tools.tool(parameters={"type": "object", "properties": {}})
    async def lookup_order() -> dict[str, str]:
        """Find an order."""
        return {"status": "shipped"}

    script = FakeScript(
        greeting=tone_response(200),
        replies=[FakeResponse(tool_call=("lookup_order", {}))],
        after_tool=tone_response(300, transcript="It shipped."),
    )
    async with FakeOpenAIRealtime(script) as fake:

        async def on_call(session: VoiceSession) -> None:
            options = AgentOptions(base_url=fake.base_url, greeting="Hi", tools=tools.specs())
            await attach_agent(
                session, OpenAIRealtimeAgent(options, api_key="test-key"), tools=tools
            )

        server = VoiceServer(on_call=on_call, metrics=True, tracing=provider)
        kinds: list[str] = []
        server.events.subscribe(lambda e: kinds.append(e.kind))
        async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
            async with CallerSimulator(srv.ws_url + "/voice") as sim:
                assert await wait_for(lambda: ev.AGENT_AUDIO_HEARD in kinds, 5)
                await sim.send_audio(tone_ulaw(300.0, 240.0, -10.0))
                await sim.send_audio(silence_ulaw(400.0))
                assert await wait_for(lambda: ev.TURN_LATENCY in kinds, 5)
            assert await wait_for(lambda: ev.CALL_ENDED in kinds, 5)
            m = _samples((await http.get("/metrics")).text)
    tree = _tree(list(exporter.get_finished_spans()))
    assert tree["<root>"] == ["call"]
    assert {"provider.connect", "greeting", "tool_call", "turn"} <= set(tree["call"])
    assert {"listen", "response", "heard"} <= set(tree["turn"])
    assert _value(m, "voice_runtime_tool_calls_total", outcome="ok") == 1
    assert (
        _value(
            m, "voice_runtime_provider_connects_total", vendor="openai", role="agent", outcome="ok"
        )
        == 1
    )
    assert _value(m, "voice_runtime_realtime_tokens_total", vendor="openai", kind="input") >= 0
    assert _value(m, "voice_runtime_turn_latency_seconds_count") == 1


_MP_SCRIPT = """
import sys
from voice_runtime import events as ev
from voice_runtime.events import CallEvent
from voice_runtime.observability.metrics import CallMetrics

metrics = CallMetrics()
if sys.argv[1] == "render":
    sys.stdout.write(metrics.render().decode())
else:
    for i in range(int(sys.argv[1])):
        metrics.on_event(CallEvent(ev.CALL_STARTED, f"CA{i}"))
        metrics.on_event(CallEvent(ev.TURN_LATENCY, f"CA{i}", data={"total_ms": 500.0}))
"""


def test_metrics_of_several_worker_processes_add_up(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}

    def run(arg: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _MP_SCRIPT, arg],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return done.stdout

    run("2")
    run("3")
    m = _samples(run("render"))
    assert _value(m, "voice_runtime_calls_started_total") == 5
    assert _value(m, "voice_runtime_live_calls") == 5
    assert _value(m, "voice_runtime_turn_latency_seconds_count") == 5


def test_the_python_examples_of_the_observability_docs_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "docs" / "observability.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        path = tmp_path / f"block{i}.py"
        path.write_text(block)
        runpy.run_path(str(path), run_name="__docs__")
    out = capsys.readouterr().out
    assert "turn_latency" in out and "voice_runtime_live_calls 0.0" in out and "True" in out


async def test_a_vendor_stt_reports_its_connects_reconnects_and_transcripts() -> None:
    speech = bytes((i * 7 + (i // 256) * 13) % 256 for i in range(8000))
    utterance = ScribeUtterance("cancel my order", audio=speech, partial_at=None)
    bus = EventBus()
    metrics = CallMetrics()
    metrics.attach(bus)
    seen: list[CallEvent] = []
    bus.subscribe(seen.append)
    async with FakeScribeServer([utterance], plans=[ScribePlan(drop_after_bytes=4000)]) as fake:
        stt = PersistentSttSession(api_key="test-key", base_url=fake.base_url)
        stt.reconnect_base_delay = 0.05
        attach(stt, CallEvents(VoiceSession(call_sid="CA1"), bus))
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(queue)
        for i in range(0, len(speech) + 1600, 160):
            queue.put_nowait((speech + b"\xff" * 1600)[i : i + 160])
            await asyncio.sleep(0.02)
        assert await wait_for(lambda: ev.TRANSCRIPT_COMMITTED in [e.kind for e in seen], 5)
        await stt.stop()
    connects = [e.data for e in seen if e.kind == ev.PROVIDER_CONNECT]
    assert [(c["vendor"], c["role"], c["attempt"], c["ok"]) for c in connects] == [
        ("elevenlabs", "stt", 0, True),
        ("elevenlabs", "stt", 1, True),
    ]
    m = _samples(metrics.render().decode())
    assert (
        _value(m, "voice_runtime_provider_reconnects_total", vendor="elevenlabs", role="stt") == 1
    )
    assert _value(m, "voice_runtime_transcripts_total", vendor="elevenlabs") == 1


def test_metrics_are_served_on_an_app_of_yours_only_when_asked() -> None:
    def paths(app: FastAPI) -> list[str]:
        return [getattr(r, "path", "") for r in app.routes]

    assert "/metrics" in paths(VoiceServer().app)
    assert "/metrics" not in paths(VoiceServer(metrics=False).app)
    assert "/metrics" not in paths(VoiceServer(app=FastAPI()).app)
    mine = VoiceServer(app=FastAPI(), metrics=True).app
    assert paths(mine).index("/metrics") < paths(mine).index("/voice")
