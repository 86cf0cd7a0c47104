"""Shared pieces of the call benchmark's server processes (stdlib and FastAPI only).

Both the server of this package (``bench_calls.py serve``) and the baseline server
(``_baseline_server.py``, run by the old package's own venv) import this module, so it may
not import ``voice_runtime`` or numpy: the baseline venv has neither of ours.

The probe measures in the server process:

* inbound latency: the caller simulator writes ``(sequence, CLOCK_MONOTONIC ns)`` into the
  first 12 bytes of every 20 ms payload just before it sends the frame; the STT-side consumer
  of ``session.inbound`` reads them back. CLOCK_MONOTONIC is one clock for every process of a
  Linux machine, so the difference is socket → STT queue consumer, loop lag included.
* outbound latency: from the moment a frame could first go out (queued, and allowed by the
  transport's pacing) until ``websocket.send_text`` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

STAMP = struct.Struct("<IQ")  # frame sequence number, CLOCK_MONOTONIC ns at send
UTTERANCE_CHUNKS = 20  # 20 x 100 ms = 2 s per utterance
CHUNK_BYTES = 800  # 100 ms of 8 kHz mu-law, like MockTts chunks


def tone_chunk() -> bytes:
    """100 ms of a soft mu-law pattern (content does not matter, only the size does)."""
    return bytes((0x7A + (i % 8)) for i in range(CHUNK_BYTES))


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[k]


def proc_snapshot(collect: bool = False) -> dict[str, Any]:
    """CPU seconds, RSS, threads and open descriptors of this process (from /proc)."""
    if collect:
        gc.collect()
    rss_kb = threads = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    times = os.times()
    return {
        "cpu_s": time.process_time(),
        "user_s": times.user,
        "sys_s": times.system,
        "wall_s": time.monotonic(),
        "rss_mb": rss_kb / 1024.0,
        "threads": threads,
        "py_threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
    }


@dataclass
class CallRecord:
    """What the server saw of one call."""

    call_sid: str
    frames_in: int = 0
    seq_gaps: int = 0
    agent_bytes_queued: int = 0
    agent_bytes_sent: int = 0
    inbound_dropped: int = 0
    outbound_dropped: int = 0
    done_mark: bool = False
    ended: bool = False


class LagMonitor:
    """Samples event-loop lag: how late a 10 ms sleep wakes up."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling on the running loop (unless VR_BENCH_LAG=0)."""
        if os.environ.get("VR_BENCH_LAG", "1") == "0":
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(0.01)
            self.samples.append(max(0.0, time.monotonic() - t0 - 0.01))


class Probe:
    """Collects the benchmark's numbers inside a server process."""

    def __init__(self, keep_records: bool = True) -> None:
        self.measuring = False
        self.finishing = False
        self.keep_records = keep_records
        self.in_lat_ms: list[float] = []
        self.out_lat_ms: list[float] = []
        self.records: dict[str, CallRecord] = {}
        self.calls_started = 0
        self.calls_ended = 0
        self.totals = CallRecord("total")
        self.lag = LagMonitor()
        self._window: dict[str, Any] = {}
        self.gc_pauses_ms: list[float] = []
        self._gc_t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif info.get("generation", 0) >= 1:
            self.gc_pauses_ms.append((time.perf_counter() - self._gc_t0) * 1e3)

    def new_call(self, call_sid: str) -> CallRecord:
        """Start the record of one call."""
        self.calls_started += 1
        rec = CallRecord(call_sid)
        if self.keep_records:
            self.records[call_sid] = rec
        return rec

    def end_call(self, rec: CallRecord) -> None:
        """Add a finished call to the totals."""
        rec.ended = True
        self.calls_ended += 1
        t = self.totals
        t.frames_in += rec.frames_in
        t.seq_gaps += rec.seq_gaps
        t.agent_bytes_queued += rec.agent_bytes_queued
        t.agent_bytes_sent += rec.agent_bytes_sent
        t.inbound_dropped += rec.inbound_dropped
        t.outbound_dropped += rec.outbound_dropped

    async def consume(self, queue: asyncio.Queue[bytes | None], rec: CallRecord) -> None:
        """Play an STT that keeps up: read every caller frame, check order, time it."""
        unpack = STAMP.unpack_from
        lat = self.in_lat_ms
        expect = 0
        while True:
            frame = await queue.get()
            if frame is None:
                return
            now = time.monotonic_ns()
            rec.frames_in += 1
            if len(frame) < STAMP.size:
                continue
            seq, sent_ns = unpack(frame)
            if seq != expect:
                rec.seq_gaps += 1
            expect = seq + 1
            if self.measuring:
                lat.append((now - sent_ns) / 1e6)

    # ------------------------------------------------------------------ control routes

    def install(self, app: Any, live_calls: Callable[[], int]) -> None:
        """Add the /bench/* control routes to a FastAPI app."""

        async def reset() -> dict[str, Any]:
            self.in_lat_ms.clear()
            self.out_lat_ms.clear()
            self.lag.samples.clear()
            self.gc_pauses_ms.clear()
            self._window = proc_snapshot()
            self.measuring = True
            return {"live": live_calls()}

        async def stats() -> dict[str, Any]:
            self.measuring = False
            end = proc_snapshot()
            start = self._window or end
            lag_ms = [s * 1e3 for s in self.lag.samples]
            return {
                "live": live_calls(),
                "window_s": end["wall_s"] - start["wall_s"],
                "cpu_s": end["cpu_s"] - start["cpu_s"],
                "user_s": end["user_s"] - start["user_s"],
                "sys_s": end["sys_s"] - start["sys_s"],
                "rss_mb": end["rss_mb"],
                "in_n": len(self.in_lat_ms),
                "in_p50_ms": percentile(self.in_lat_ms, 50),
                "in_p99_ms": percentile(self.in_lat_ms, 99),
                "in_max_ms": max(self.in_lat_ms, default=None),
                "out_n": len(self.out_lat_ms),
                "out_p50_ms": percentile(self.out_lat_ms, 50),
                "out_p99_ms": percentile(self.out_lat_ms, 99),
                "out_max_ms": max(self.out_lat_ms, default=None),
                "lag_p99_ms": percentile(lag_ms, 99),
                "lag_max_ms": max(lag_ms, default=None),
                "gc_collections": len(self.gc_pauses_ms),
                "gc_max_ms": max(self.gc_pauses_ms, default=None),
            }

        async def finish() -> dict[str, Any]:
            self.finishing = True
            return {"live": live_calls()}

        async def calls() -> dict[str, Any]:
            return {
                "live": live_calls(),
                "started": self.calls_started,
                "ended": self.calls_ended,
                "totals": asdict(self.totals),
                "records": [asdict(r) for r in self.records.values()],
            }

        async def snapshot() -> dict[str, Any]:
            # Let finished calls' last callbacks run before counting what is left.
            for _ in range(3):
                await asyncio.sleep(0.05)
            snap = proc_snapshot(collect=True)
            me = asyncio.current_task()
            snap["tasks"] = sum(1 for t in asyncio.all_tasks() if t is not me)
            snap["live"] = live_calls()
            snap["started"] = self.calls_started
            snap["ended"] = self.calls_ended
            return snap

        app.add_api_route("/bench/reset", reset, methods=["POST"])
        app.add_api_route("/bench/stats", stats, methods=["GET"])
        app.add_api_route("/bench/finish", finish, methods=["POST"])
        app.add_api_route("/bench/calls", calls, methods=["GET"])
        app.add_api_route("/bench/snapshot", snapshot, methods=["GET"])


def speaking_handler(probe: Probe, chunk: bytes) -> Callable[[Any], Any]:
    """The benchmark's ``on_call``: 2 s utterances until the run finishes, caller audio consumed."""

    async def on_call(session: Any) -> None:
        rec = probe.new_call(session.call_sid or "?")
        consumer = asyncio.create_task(probe.consume(session.inbound, rec))
        try:
            with contextlib.suppress(TimeoutError):
                while not probe.finishing and not session.is_disconnected:
                    for _ in range(UTTERANCE_CHUNKS):
                        await session.put_outbound(chunk)
                        rec.agent_bytes_queued += len(chunk)
                    await session.send_mark_and_wait_async("utt", timeout=30)
                if not session.is_disconnected:
                    rec.done_mark = await session.send_mark_and_wait_async("bench-done", 30)
            await session.wait_until_disconnected_async()
        finally:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(consumer, 5)
            rec.agent_bytes_sent = session.stats.audio_sent_bytes
            rec.inbound_dropped = session.stats.inbound_dropped
            rec.outbound_dropped = session.stats.outbound_dropped
            probe.end_call(rec)

    return on_call


def serve(app: Any, uvicorn_kwargs: dict[str, Any], on_loop: Callable[[], None]) -> None:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port; print ``PORT n`` on stdout."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="error", lifespan="on", **uvicorn_kwargs)
    server = uvicorn.Server(config)

    async def main() -> None:
        on_loop()
        print(f"PORT {port}", flush=True)
        await server.serve(sockets=[sock])

    factory = config.get_loop_factory()  # uvloop when installed, as uvicorn.run would pick
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
