"""Benchmark the realtime bridge's own latency: vendor audio delta received -> media frame sent.

Run ``python benchmarks/bench_realtime.py`` (``--quick`` for a shorter run). Each call is a
real websocket chain on 127.0.0.1: a fake OpenAI Realtime server sends 20 ms μ-law deltas at
real-time pace, the OpenAI agent receives them (its receive time is stamped on each
``AssistantAudio``), the bridge queues them with marks, the Twilio transport sends them as
``media`` frames to caller simulators that echo the marks. The measured span starts when the
agent's websocket read returns the delta and ends when the transport's send of the matching
``media`` frame returns, so it is the runtime's own work plus event-loop scheduling — the
vendor's and Twilio's network legs are not in it.

The fake vendor and the callers run in a second process, so the measured process does only
the runtime's work (all calls share its one event loop, as in production). The two
configurations in the same run are the comparison: the bridge asking the transport for
position marks every 20 ms of audio (finer truncation) against the default, the transport's
own 100 ms position marks.

:func:`run` returns the rows as dicts so a benchmark runner can collect them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import statistics
from typing import Any

from _cli import bench_main  # benchmarks/ is sys.path[0] for scripts and run.py
from fastapi import FastAPI

from voice_runtime.realtime import AgentOptions, AssistantAudio, BridgeOptions, attach_agent
from voice_runtime.realtime.openai import OpenAIRealtimeAgent
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_realtime import (
    FakeOpenAIRealtime,
    FakeResponse,
    FakeScript,
    pattern_audio,
)
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import register_voice_websocket

CHUNK_MS = 20


class _TimedSession(VoiceSession):
    """A session that stamps every agent audio frame the transport has sent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sent_at: list[float] = []
        # The transport reports what it sent to session.port: stamp it there.
        sent = self.port.sent

        def timed_sent(chunk: bytes) -> str | None:
            self.sent_at.append(asyncio.get_running_loop().time())
            return sent(chunk)

        self.port.sent = timed_sent  # type: ignore[method-assign]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


async def _far_end(calls: int, seconds: float, to_far: Any, from_far: Any) -> None:
    """The vendor fake and the callers, in their own process (see :func:`_far_end_main`)."""
    logging.getLogger("voice_runtime").setLevel(logging.ERROR)
    greeting = FakeResponse(audio=pattern_audio(seconds * 1000))
    script = FakeScript(greeting=greeting, chunk_ms=CHUNK_MS, pace_s=CHUNK_MS / 1000.0)
    async with FakeOpenAIRealtime(script) as fake:
        from_far.put((fake.base_url, fake.api_key))
        ws_url = await asyncio.to_thread(to_far.get, True, 60)
        sims = [CallerSimulator(f"{ws_url}/voice{i}") for i in range(calls)]
        await asyncio.gather(*(s.connect() for s in sims))
        await asyncio.gather(
            *(s.wait_for_heard(seconds * 1000 - CHUNK_MS, timeout=seconds + 30) for s in sims)
        )
        for sim in sims:
            await sim.hangup()
    from_far.put("done")


def _far_end_main(calls: int, seconds: float, to_far: Any, from_far: Any) -> None:
    """Process entry point of the far end."""
    asyncio.run(_far_end(calls, seconds, to_far, from_far))


async def _measure(calls: int, seconds: float, mark_every_ms: float) -> dict[str, Any]:
    # The fake vendor and the callers run in another process, so this process's event
    # loop does only the runtime's work (agent, bridge, transport), as in production.
    ctx = multiprocessing.get_context("spawn")
    to_far, from_far = ctx.Queue(), ctx.Queue()
    far = ctx.Process(target=_far_end_main, args=(calls, seconds, to_far, from_far), daemon=True)
    far.start()
    try:
        base_url, api_key = await asyncio.to_thread(from_far.get, True, 60)
        app = FastAPI()
        sessions = [_TimedSession() for _ in range(calls)]
        for i, session in enumerate(sessions):
            register_voice_websocket(app, session, path=f"/voice{i}")
        received: list[list[float]] = [[] for _ in range(calls)]

        async def bridge(i: int) -> Any:
            session = sessions[i]
            await session.wait_for_ws_connect_async(60.0)
            agent = OpenAIRealtimeAgent(
                AgentOptions(base_url=base_url, greeting="Hi"), api_key=api_key
            )

            def on_event(event: object) -> None:
                if isinstance(event, AssistantAudio):
                    received[i].append(event.received_at)

            return await attach_agent(
                session,
                agent,
                on_event=on_event,
                options=BridgeOptions(mark_every_ms=mark_every_ms),
            )

        async with serve_in_loop(app) as srv:
            bridges = [asyncio.create_task(bridge(i)) for i in range(calls)]
            to_far.put(srv.ws_url)
            assert await asyncio.to_thread(from_far.get, True, seconds + 120) == "done"
            for task in bridges:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(task, 10)
    finally:
        far.join(10)
        if far.is_alive():
            far.terminate()
    latencies: list[float] = []
    for i, session in enumerate(sessions):
        for got, sent in zip(received[i], session.sent_at, strict=False):
            latencies.append((sent - got) * 1000.0)
    return {
        "calls": calls,
        "mark_every_ms": mark_every_ms,
        "chunks": len(latencies),
        "p50_ms": round(_percentile(latencies, 50), 3),
        "p99_ms": round(_percentile(latencies, 99), 3),
        "max_ms": round(max(latencies), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Measure every configuration and return one row per (calls, marks) pair."""
    logging.getLogger("voice_runtime").setLevel(logging.ERROR)
    seconds = 1.0 if quick else 3.0
    levels = (1, 10) if quick else (1, 10, 50)

    async def main() -> list[dict[str, Any]]:
        rows = []
        for calls in levels:
            for mark_every_ms in (20.0, 0.0):
                rows.append(await _measure(calls, seconds, mark_every_ms))
        return rows

    return asyncio.run(main())


def _print(rows: list[dict[str, Any]]) -> None:
    header = f"{'calls':>5} {'marks':>8} {'chunks':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
    print("bridge latency: vendor delta received -> media frame sent")
    print(header)
    print("-" * len(header))
    for r in rows:
        marks = f"{r['mark_every_ms']:g} ms" if r["mark_every_ms"] else "100 ms (default)"
        print(
            f"{r['calls']:>5} {marks:>8} {r['chunks']:>7} {r['p50_ms']:>8.3f}"
            f" {r['p99_ms']:>8.3f} {r['max_ms']:>8.3f}"
        )


def main() -> None:
    """Command-line entry: run the benchmark and print the table."""
    bench_main(__doc__, run, _print, "fewer calls, shorter audio")


if __name__ == "__main__":
    main()
