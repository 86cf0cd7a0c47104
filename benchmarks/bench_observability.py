"""Benchmark the cost of metrics and traces: server CPU per call-minute with and without them.

Run ``python benchmarks/bench_observability.py`` (levels 50 and 350, ``--quick`` for 50 only)
or ``python benchmarks/bench_observability.py level 50 [120 ...] --window 20 --rounds 2``.
Each level holds that many paced calls with the workload of ``bench_calls.py`` (whose server,
callers and CPU accounting this reuses) in two server modes, interleaved round by round:

* ``off``: ``VoiceServer(metrics=False, tracing=False)``: nobody listens to the call event
  stream (the publishers' cost is one attribute test);
* ``on``: Prometheus metrics with ``/metrics`` scraped every 5 s by the orchestrator, and an
  OpenTelemetry SDK tracer provider exporting every span to memory.

The figure is the server's CPU seconds per call-minute (idle CPU subtracted); the ratio
on/off is the overhead. The target is under 5 %. Each call's agent speaks 2 s utterances,
each confirmed by a mark, so every call publishes a response (queued, heard) every ~2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_calls  # noqa: E402

MODE_ENV = "VR_BENCH_OBS"
SCRAPE_EVERY_S = 5.0
TARGET_PCT = 5.0


# =========================================================================== server role


def _serve(args: argparse.Namespace) -> None:
    """bench_calls' server, with metrics and traces on or off (``VR_BENCH_OBS``)."""
    # The server measures the package of the tree this benchmark belongs to.
    sys.path.insert(0, str(HERE.parent))
    import voice_runtime.server as vserver

    on = os.environ.get(MODE_ENV) == "on"
    base = vserver.VoiceServer
    kwargs: dict[str, Any] = {"metrics": False, "tracing": False}
    if on:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        kwargs = {"metrics": True, "tracing": provider}

    class ObservedServer(base):  # type: ignore[misc,valid-type]
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw, **kwargs)

    vserver.VoiceServer = ObservedServer  # type: ignore[misc]
    bench_calls._serve_ours(args)


# =========================================================================== orchestration


class _Scraper:
    """Fetches ``/metrics`` of the newest benchmark server every 5 s while it runs."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.scrapes = 0
        self.errors = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> _Scraper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY_S):
            port = self.port
            if port is None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    self.bytes = len(r.read())
                self.scrapes += 1
            except OSError:
                self.errors += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _level(calls: int, window: float, mode: str) -> dict[str, Any]:
    """One bench_calls level with the server in ``mode`` (on: scraped every 5 s)."""
    os.environ[MODE_ENV] = mode
    scraper = _Scraper() if mode == "on" else None
    original_init = bench_calls._Server.__init__
    original_cmd = bench_calls._server_cmd

    def server_cmd(impl: str, opts: dict[str, Any]) -> list[str]:
        cmd = original_cmd(impl, opts)
        # Our serve role (bench_calls' server with the mode applied), same knobs.
        return [sys.executable, str(Path(__file__).resolve()), *cmd[2:]]

    def init(self: Any, cmd: list[str], sample_lag: bool = True) -> None:
        original_init(self, cmd, sample_lag)
        if scraper is not None:
            scraper.port = self.port

    bench_calls._server_cmd = server_cmd
    bench_calls._Server.__init__ = init  # type: ignore[method-assign]
    if scraper is not None:
        scraper.start()
    try:
        row = bench_calls.run_level(calls, window)
    finally:
        bench_calls._server_cmd = original_cmd
        bench_calls._Server.__init__ = original_init  # type: ignore[method-assign]
        if scraper is not None:
            scraper.stop()
    row["mode"] = mode
    if scraper is not None:
        row["scrapes"] = scraper.scrapes
        row["scrape_errors"] = scraper.errors
        row["metrics_bytes"] = scraper.bytes
    return row


def run_levels(levels: list[int], window: float, rounds: int) -> list[dict[str, Any]]:
    """Off and on, interleaved ``rounds`` times per level; one summary row per level."""
    out = []
    for calls in levels:
        rows: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for i in range(rounds):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            for mode in order:
                rows[mode].append(_level(calls, window, mode))
        off = [r["cpu_s_per_call_min"] for r in rows["off"]]
        on = [r["cpu_s_per_call_min"] for r in rows["on"]]
        ratio = statistics.median(on) / statistics.median(off)
        out.append(
            {
                "table": "observability",
                "calls": calls,
                "window_s": window,
                "rounds": rounds,
                "off_cpu_s_per_call_min": off,
                "on_cpu_s_per_call_min": on,
                "ratio": ratio,
                "overhead_pct": 100.0 * (ratio - 1.0),
                "passed_levels": [r["passed"] for r in rows["off"] + rows["on"]],
                "scrapes": [r.get("scrapes") for r in rows["on"]],
                # Why a level did not pass: a saturated caller farm or server says nothing
                # about the overhead.
                "callers_saturated": [r["callers_saturated"] for r in rows["off"] + rows["on"]],
                "server_core_pct": [
                    round(r["server_core_pct"], 1) for r in rows["off"] + rows["on"]
                ],
                "lost_frames": [
                    r["caller_frames_lost"] + r["agent_frames_lost"]
                    for r in rows["off"] + rows["on"]
                ],
                "others_core_pct": [
                    round(r["others_core_pct"], 1) for r in rows["off"] + rows["on"]
                ],
                "under_target": 100.0 * (ratio - 1.0) < TARGET_PCT,
            }
        )
    return out


def _call_minute(sid: str, t0: float, turns: int) -> list[Any]:
    """The events of one call-minute: a greeting, ``turns`` turns, a DTMF key, the end."""
    from voice_runtime import events as ev

    out: list[Any] = []

    def add(kind: str, at: float, **data: Any) -> None:
        out.append((kind, at, data))

    add(ev.CALL_STARTED, t0, tracks=["inbound"])
    add(ev.PROVIDER_CONNECT, t0 + 0.1, vendor="mock", role="stt", ok=True, duration_ms=80.0)
    add(ev.AGENT_AUDIO_QUEUED, t0 + 0.2, response=1, position_ms=0.0)
    add(ev.AGENT_AUDIO_HEARD, t0 + 0.5, response=1, queued_to_heard_ms=300.0, since_start_ms=500.0)
    for i in range(turns):
        t = t0 + 2.0 + i * 5.5
        add(ev.CALLER_SPEECH_STARTED, t, source="stt")
        add(ev.CALLER_SPEECH_ENDED, t + 1.5, source="stt", speech_ms=1500.0)
        add(ev.TRANSCRIPT_COMMITTED, t + 1.8, vendor="mock", text="a few words")
        add(ev.AGENT_AUDIO_QUEUED, t + 2.3, response=i + 2, position_ms=1000.0 * i)
        add(
            ev.AGENT_AUDIO_HEARD,
            t + 2.6,
            response=i + 2,
            queued_to_heard_ms=300.0,
            mark_rtt_ms=250.0,
        )
        parts = {"to_commit_ms": 300.0, "to_queued_ms": 800.0, "queued_to_heard_ms": 300.0}
        add(ev.TURN_LATENCY, t + 2.6, total_ms=1100.0, **parts)
    add(ev.DTMF, t0 + 59.0, digit="1")
    add(
        ev.CALL_ENDED,
        t0 + 60.0,
        reason="caller_hangup",
        duration_s=60.0,
        frames_in=3000,
        frames_out=1500,
        inbound_dropped=0,
        outbound_dropped=0,
        bad_frames={},
        marks_sent=600,
        marks_echoed=600,
        clears=0,
    )
    return out


def event_cost(calls: int, turns: int = 10) -> dict[str, Any]:
    """In-process CPU of the listeners and of one scrape, per call-minute (no sockets, no noise
    from other processes): ``calls`` call-minutes of events through a server's bus with metrics
    and traces on, and ``/metrics`` rendered with ``calls`` calls live."""
    sys.path.insert(0, str(HERE.parent))
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from voice_runtime.events import CallEvents
    from voice_runtime.server import VoiceServer
    from voice_runtime.session import VoiceSession

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = VoiceServer(metrics=True, tracing=provider)
    t0 = time.monotonic()
    # Each call's publisher, as its stream port holds it: events are built, stamped and
    # tracked there, then the bus runs the metrics and the tracer.
    publishers = []
    for i in range(calls):
        sid = f"CA{i:032d}"
        publishers.append(CallEvents(VoiceSession(call_sid=sid, stream_sid="MZ" + sid[2:])))
        publishers[-1].bus = server.events
    minutes = [_call_minute(p._session.call_sid, t0, turns) for p in publishers]
    n_events = sum(len(m) for m in minutes)
    start = time.process_time()
    for p, m in zip(publishers, minutes, strict=True):
        for kind, t, data in m[:-1]:
            p.emit(kind, t=t, **data)
    render_start = time.process_time()
    renders = 5
    for _ in range(renders):
        body = server.observability.metrics.render()
    render_s = (time.process_time() - render_start) / renders
    ended_start = time.process_time()
    for p, m in zip(publishers, minutes, strict=True):
        kind, t, data = m[-1]
        p.emit(kind, t=t, **data)
    listeners_s = (render_start - start) + (time.process_time() - ended_start)
    return {
        "table": "observability_cost",
        "calls": calls,
        "events_per_call_minute": n_events / calls,
        "listener_us_per_event": 1e6 * listeners_s / n_events,
        "listener_ms_per_call_minute": 1e3 * listeners_s / calls,
        "render_ms": 1e3 * render_s,
        "metrics_bytes": len(body),
        # Scraped every 5 s: 12 renders a minute, shared by the live calls.
        "scrape_ms_per_call_minute": 1e3 * render_s * (60.0 / SCRAPE_EVERY_S) / calls,
        "spans": len(exporter.get_finished_spans()),
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    """The benchmark runner's entry point."""
    levels = [50] if quick else [50, 350]
    rows = run_levels(levels, 10.0 if quick else 20.0, 2 if quick else 3)
    return rows + [event_cost(n) for n in levels]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A text table of the summary rows."""
    cost = [r for r in rows if r["table"] == "observability_cost"]
    rows = [r for r in rows if r["table"] == "observability"]
    out = []
    if cost:
        out += [
            "| calls | events/call-min | µs/event | listeners ms/call-min | render ms "
            "| scrape ms/call-min |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        out += [
            f"| {r['calls']} | {r['events_per_call_minute']:.0f} "
            f"| {r['listener_us_per_event']:.1f} | {r['listener_ms_per_call_minute']:.2f} "
            f"| {r['render_ms']:.1f} | {r['scrape_ms_per_call_minute']:.3f} |"
            for r in cost
        ]
    if not rows:
        return "\n".join(out)
    head = "| calls | off CPU s/call-min (median) | on (median) | on/off | overhead | rounds |"
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['calls']} | {statistics.median(r['off_cpu_s_per_call_min']):.4f} "
            f"| {statistics.median(r['on_cpu_s_per_call_min']):.4f} | {r['ratio']:.3f} "
            f"| {r['overhead_pct']:+.1f} % | {r['rounds']} |"
        )
    return "\n".join(out + ([""] if out else []) + lines)


def main() -> None:
    """Command line: the benchmark, a level list, or the server role."""
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        # The server role takes bench_calls' serve arguments.
        parser = argparse.ArgumentParser()
        parser.add_argument("role")
        parser.add_argument("--ws", default="auto")
        parser.add_argument("--frame-bytes", type=int, default=0)
        parser.add_argument("--lead-ms", type=float, default=0)
        parser.add_argument("--mark-every-ms", type=float, default=0)
        parser.add_argument("--deflate", default="prod")
        parser.add_argument("--soak", action="store_true")
        _serve(parser.parse_args())
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    p_run = sub.add_parser("run")
    p_run.add_argument("--quick", action="store_true")
    p_level = sub.add_parser("level", help="some levels, off and on interleaved")
    p_level.add_argument("calls", type=int, nargs="+")
    p_level.add_argument("--window", type=float, default=20.0)
    p_level.add_argument("--rounds", type=int, default=2)
    p_cost = sub.add_parser("cost", help="in-process cost of the listeners and of a scrape")
    p_cost.add_argument("calls", type=int, nargs="+")
    args = parser.parse_args(sys.argv[1:] or ["run"])
    if args.cmd == "level":
        rows = run_levels(args.calls, args.window, args.rounds)
    elif args.cmd == "cost":
        rows = [event_cost(n) for n in args.calls]
    else:
        rows = run(quick=args.quick)
    for row in rows:
        print(json.dumps(row))
    print(format_table(rows))


if __name__ == "__main__":
    main()
