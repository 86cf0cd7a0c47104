"""Benchmark live calls: frame latency, frames lost, capacity, CPU, memory and leaks.

Run ``python benchmarks/bench_calls.py`` (``--quick`` for a shorter run). Three kinds of
process take part, so simulated callers never share the server's event loop:

* a server: ``VoiceServer`` under uvicorn, with an ``on_call`` coroutine that plays agent
  audio back (2 s utterances in 100 ms chunks, each followed by a mark it waits for) and an
  STT-like consumer of ``session.inbound``. The numbers are taken inside this process (see
  ``_callkit.py``): inbound latency is socket → STT consumer, outbound latency is "frame may
  go out" → ``websocket.send_text`` returned.
* one or two client processes of :class:`~voice_runtime.testing.simulator.CallerSimulator`
  callers: a 20 ms caller frame every 20 ms, agent audio played at real time, marks echoed.
* the baseline: the ``voice-runtime`` 0.1.15 package in its own venv
  (``VR_BASELINE_PYTHON``, default ``/work/baseline-venv/bin/python``), one session, same
  workload and same clients, for the single-call figures.

Lost frames: caller frames the simulators sent that the STT consumer did not get, and agent
audio the server queued that the simulators did not hear. A level passes when nothing was
lost and both p99 latencies are under 20 ms; capacity is the largest passing level.

:func:`run` returns the rows as dicts so a benchmark runner can collect them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import contextvars
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _callkit as kit  # noqa: E402

BASELINE_PYTHON = os.environ.get("VR_BASELINE_PYTHON", "/work/baseline-venv/bin/python")
P99_LIMIT_MS = 20.0
PAIR_ROUNDS = 3  # interleaved rounds behind each figure of the baseline table
PIN = os.environ.get("VR_BENCH_PIN", "1") != "0"
CALLS_PER_CLIENT = 250
PROFILE_HZ = int(os.environ.get("VR_BENCH_PROFILE_HZ", "250"))
# The callers: the lean farm (_leancaller.py) by default; VR_BENCH_LEAN=0 for CallerSimulator
# processes, which need about twice the CPU and fill their core from ~300 calls on.
LEAN_CALLERS = os.environ.get("VR_BENCH_LEAN", "1") == "1"


# =========================================================================== server (ours)


def _serve_ours(args: argparse.Namespace) -> None:
    """Run VoiceServer with the benchmark probe (the ``serve`` role)."""
    logging.basicConfig(level=logging.ERROR)
    for name in ("TWILIO_AUTH_TOKEN", "TWILIO_ACCOUNT_SID", "VOICE_STREAM_URL"):
        os.environ.pop(name, None)

    import voice_runtime.server as vserver
    from voice_runtime.session import VoiceSession
    from voice_runtime.transports import twilio_ws
    from voice_runtime.transports.twilio_ws import StreamOptions

    probe = kit.Probe(keep_records=not args.soak)
    chunk = kit.tone_chunk()
    pacer_var: contextvars.ContextVar[Any] = contextvars.ContextVar("pacer", default=None)

    class BenchSession(VoiceSession):
        """Remembers when each outbound chunk was queued."""

        def __post_init__(self) -> None:
            super().__post_init__()
            self.bench_puts: collections.deque[float] = collections.deque()
            self.bench_put_t = 0.0
            # The transport queues and takes agent audio through session.port: time it there.
            port = self.port
            on_put, take = port._on_outbound_put, port.next_outbound

            def timed_put(item: bytes) -> None:
                on_put(item)
                self.bench_puts.append(time.monotonic())

            async def timed_take() -> Any:
                item = await take()
                if isinstance(item, bytes) and self.bench_puts:
                    self.bench_put_t = self.bench_puts.popleft()
                return item

            port._on_outbound_put = timed_put  # type: ignore[method-assign]
            port.next_outbound = timed_take  # type: ignore[method-assign]
            port.bind_outbound()  # the session bound the untimed hook at construction

    base_pacer = twilio_ws._Pacer

    class BenchPacer(base_pacer):  # type: ignore[misc,valid-type]
        """Lets the send loop's frames find their pacer (its ``release`` is when each may go)."""

        def __init__(self, lead_s: float) -> None:
            super().__init__(lead_s)
            pacer_var.set(self)

    class BenchCall(twilio_ws.MediaStreamCall):
        """Times each media frame from 'may go out' to the end of the write that carries it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.bench_due: list[float] = []  # of the media frames in the batch

        async def _send(self, text: str) -> bool:
            ok = await super()._send(text)
            if ok and probe.measuring and text.startswith('{"event":"media"'):
                pacer = pacer_var.get()
                release = pacer.release if pacer is not None else 0.0
                due = max(self.session.bench_put_t, release)  # type: ignore[attr-defined]
                self.bench_due.append(due)  # batched: timed at the flush
            return ok

        async def _flush(self) -> bool:
            ok = await super()._flush()
            dues, self.bench_due = self.bench_due, []
            if ok and dues:
                now = time.monotonic()
                probe.out_lat_ms.extend((now - due) * 1e3 for due in dues)
            return ok

    twilio_ws._Pacer = BenchPacer  # type: ignore[misc]
    vserver.MediaStreamCall = BenchCall  # type: ignore[misc]

    on_call = kit.speaking_handler(probe, chunk)

    overrides: dict[str, Any] = {}
    if args.frame_bytes:
        overrides["frame_bytes"] = args.frame_bytes
    if args.lead_ms:
        overrides["lead_ms"] = args.lead_ms
    if args.mark_every_ms:
        overrides["position_mark_every_ms"] = args.mark_every_ms
    options = StreamOptions(**overrides) if overrides else None
    voice = vserver.VoiceServer(
        on_call=on_call,
        session_factory=BenchSession,
        max_calls=100_000,
        stream_options=options,
    )
    probe.install(voice.app, lambda: voice.registry.live_count)
    uv = _production_uvicorn_settings(voice.app)
    if args.ws != "auto":
        uv["ws"] = args.ws
    if args.deflate != "prod":
        uv["ws_per_message_deflate"] = args.deflate == "on"
    kit.serve(voice.app, uv, probe.lag.start)


def _serve_floor(args: argparse.Namespace) -> None:
    """The ``serve-floor`` role: websocket frames read and counted, nothing else.

    What any Python server on this machine pays for a call before doing anything with it:
    the wakeup for each caller frame, the socket read and the websocket framing (through
    this package's lean protocol). Its CPU per call-minute bounds what a library can reach.

    With ``--duplex`` it also plays agent audio as a call does, with the least code that can:
    ready-made 40 ms media messages kept 120 ms ahead and a mark every 100 ms, written in one
    write on the wakeups of the caller's frames (no timers), the mark echoes read and dropped.
    """
    logging.basicConfig(level=logging.ERROR)
    from fastapi import FastAPI
    from starlette.routing import WebSocketRoute

    from voice_runtime.transports.fastws import EXTENSION
    from voice_runtime.transports.twilio_protocol import encode_mark, encode_media

    probe = kit.Probe()
    duplex = args.duplex
    message = kit.tone_chunk()[:320]  # 40 ms
    app = FastAPI()
    live: dict[Any, str] = {}

    async def finish() -> dict[str, Any]:
        probe.finishing = True
        for stream, sid in list(live.items()):
            stream.send_text(encode_mark(sid, "bench-done"))
        return {"live": len(live)}

    app.add_api_route("/bench/finish", finish, methods=["POST"])

    async def floor(websocket: Any) -> None:
        await websocket.accept()
        stream = websocket.scope["extensions"][EXTENSION]["stream"]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rec: Any = None
        loop = asyncio.get_running_loop()
        media = mark = ""
        until = played = marked = 0.0

        def play() -> None:
            nonlocal until, played, marked
            now = loop.time()
            until = max(until, now)
            out = []
            while until - now < 0.12:
                out.append(media)
                until += 0.04
                played += 40.0
                if played - marked >= 100.0:
                    out.append(mark)
                    marked = played
            if out:
                stream.send_texts(out)

        def on_text(text: str) -> None:
            nonlocal rec, media, mark
            if rec is not None:
                if text.startswith('{"event":"media"'):
                    rec.frames_in += 1
                    if duplex:
                        play()
                return
            data = json.loads(text)
            if data.get("event") == "start":
                rec = probe.new_call(data["start"]["callSid"])
                live[stream] = sid = data["streamSid"]
                media, mark = encode_media(sid, message), encode_mark(sid, "p")

        def on_close(_code: int) -> None:
            if not done.done():
                done.set_result(None)

        stream.attach(on_text, on_close)
        await done
        live.pop(stream, None)
        if rec is not None:
            probe.end_call(rec)

    app.router.routes.append(WebSocketRoute("/voice", floor))
    probe.install(app, lambda: len(live))
    kit.serve(app, _production_uvicorn_settings(app), probe.lag.start)


def _production_uvicorn_settings(app: Any) -> dict[str, Any]:
    """The websocket settings ``voice_runtime.serving`` runs uvicorn with, for ``app``."""
    keys = ("ws", "ws_max_size", "ws_per_message_deflate", "ws_ping_interval", "ws_ping_timeout")
    from voice_runtime.serving import uvicorn_config

    config = uvicorn_config(app, log_level="error")
    return {k: getattr(config, k) for k in keys}


# =========================================================================== clients


_MEDIA = (
    '{"event":"media","sequenceNumber":"%d","streamSid":"%s","media":'
    '{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}'
)


def _stamped_caller_class() -> type:
    import websockets

    from voice_runtime.testing.simulator import FRAME, FRAME_S, SILENCE, CallerSimulator, _Mark

    class StampedCaller(CallerSimulator):
        """Writes (sequence, CLOCK_MONOTONIC ns) into each caller frame as it is sent.

        The frames on the wire are the simulator's, built by string formatting rather than
        json.dumps, and the stereo recording is off: with hundreds of callers on a 2-core
        machine the simulator's own bookkeeping would take the CPU the server needs.
        """

        frames_sent = 0

        async def _send_media(self, frame: bytes) -> None:
            stamped = (
                kit.STAMP.pack(self.frames_sent, time.monotonic_ns()) + frame[kit.STAMP.size :]
            )
            text = _MEDIA % (
                next(self._seq),
                self.stream_sid,
                next(self._chunk),
                int(self._elapsed() * 1000),
                base64.b64encode(stamped).decode("ascii"),
            )
            await self._ws.send(text)
            self.frames_sent += 1

        def _place(self, track: bytearray, frame: bytes) -> None:
            return None

        async def _player(self) -> None:
            return None  # playback runs on the microphone's tick, below

        async def _microphone(self) -> None:
            # One 20 ms tick drives both legs, as a phone's audio clock would: send the
            # caller's frame, and finish playing the agent frame started a tick ago (then
            # echo the marks behind it). Half the timers of a mic task plus a player task.
            silence = bytes([SILENCE]) * FRAME
            fifo = self._fifo
            clock = self.clock
            playing: bytearray | None = None
            clears = 0
            next_t = clock.now()
            while not self._closed.is_set():
                await clock.sleep_until(next_t)
                next_t += FRAME_S
                if playing is not None and self.clears == clears:
                    self._play(bytes(playing))
                playing = None
                while fifo and isinstance(fifo[0], _Mark):
                    await self._echo(fifo.popleft().name)  # type: ignore[union-attr]
                if fifo:
                    playing, clears = bytearray(), self.clears
                    while len(playing) < FRAME and fifo and not isinstance(fifo[0], _Mark):
                        head = fifo[0]
                        take = head[: FRAME - len(playing)]  # type: ignore[index]
                        playing.extend(take)
                        self._fifo_bytes -= len(take)
                        if len(take) == len(head):
                            fifo.popleft()
                        else:
                            fifo[0] = head[len(take) :]  # type: ignore[index]
                self._set_playing(playing is not None)
                try:
                    await self._send_media(self._mic.popleft() if self._mic else silence)
                except websockets.ConnectionClosed:
                    return

    return StampedCaller


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _client_main(args: argparse.Namespace) -> None:
    """Hold ``args.calls`` paced calls until told to stop on stdin; print results as JSON."""
    caller_cls = _stamped_caller_class()
    base = f"ws://127.0.0.1:{args.port}"
    gate = asyncio.Semaphore(32)
    sims: list[Any] = []
    errors = 0

    async def open_one(i: int) -> None:
        nonlocal errors
        # --mounted: the baseline's one-session apps, each at its own /c{i}/voice.
        url = f"{base}/c{args.first + i}/voice" if args.mounted else f"{base}/voice"
        sim = caller_cls(url, call_sid=f"CA{args.tag}{i:07d}".ljust(34, "0"))
        async with gate:
            try:
                await sim.connect(timeout=30)
            except Exception:
                errors += 1
                return
        sims.append(sim)

    await asyncio.gather(*(open_one(i) for i in range(args.calls)))
    cpu0 = _cpu_self()
    print(f"CONNECTED {len(sims)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    cpu1 = _cpu_self()
    await asyncio.gather(*(s.wait_for_mark("bench-done", timeout=20) for s in sims))
    await asyncio.gather(*(s.hangup() for s in sims), return_exceptions=True)
    calls = [
        {
            "call_sid": s.call_sid,
            "frames_sent": s.frames_sent,
            "heard_bytes": len(s.heard),
            "received_bytes": len(s.received),
            "done_mark": any(m.startswith("bench-done") for m in s.marks_echoed),
        }
        for s in sims
    ]
    out = {"connect_errors": errors, "cpu_hold_s": cpu1 - cpu0, "calls": calls}
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


async def _lean_client_main(args: argparse.Namespace) -> None:
    """``client --lean``: the same calls from the lean caller farm (``_leancaller.py``)."""
    import uuid

    import _leancaller as lc

    base = "/c{}/voice" if args.mounted else "/voice"
    callers = [
        lc.LeanCaller(f"CA{args.tag}{i:07d}".ljust(34, "0"), "MZ" + uuid.uuid4().hex)
        for i in range(args.calls)
    ]
    out = await lc.hold_farm(
        callers, lambda i: (args.port, base.format(args.first + i)), cpu=_cpu_self
    )
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


async def _soak_main(args: argparse.Namespace) -> None:
    """Place ``args.calls`` short calls, ``args.lanes`` at a time; print a summary."""
    from voice_runtime.testing.simulator import CallerSimulator

    url = f"ws://127.0.0.1:{args.port}/voice"
    counter = iter(range(args.calls))
    failures = 0
    heard_ok = 0

    async def lane() -> None:
        nonlocal failures, heard_ok
        for _ in counter:
            sim = CallerSimulator(url, playback="instant", silence_when_idle=False)
            try:
                await sim.connect(timeout=10)
                await sim.send_silence(100, realtime=False)
                if await sim.wait_for_heard(40, timeout=5):
                    heard_ok += 1
            except Exception:
                failures += 1
            finally:
                await sim.hangup()

    t0 = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(args.lanes)))
    out = {
        "calls": args.calls,
        "failures": failures,
        "heard_ok": heard_ok,
        "seconds": time.monotonic() - t0,
    }
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


def _run_async(coro: Any) -> None:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(coro)


# =========================================================================== orchestration


class _Server:
    """A benchmark server subprocess and its control routes."""

    def __init__(self, cmd: list[str], sample_lag: bool = True) -> None:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env["VR_BENCH_LAG"] = "1" if sample_lag else "0"
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=HERE
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"benchmark server did not start: {line!r} {self._stderr[-5:]}")
        self.port = int(line.split()[1])

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-50]

    def get(self, path: str, method: str = "GET", timeout: float = 60.0) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def wait_idle(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            calls = self.get("/bench/calls")
            if calls["live"] == 0 and calls["ended"] >= calls["started"]:
                return calls
            if time.monotonic() > deadline:
                return calls
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _server_cmd(impl: str, opts: dict[str, Any]) -> list[str]:
    if impl == "baseline":
        return [
            BASELINE_PYTHON,
            str(HERE / "_baseline_server.py"),
            "--uvicorn",
            opts.get("uvicorn", "default"),
            "--sessions",
            str(opts.get("sessions", 1)),
        ]
    if impl in ("floor", "floor-duplex"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve-floor"]
        return cmd + ["--duplex"] if impl == "floor-duplex" else cmd
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", "--ws", opts.get("ws", "auto")]
    for key in ("frame_bytes", "lead_ms", "mark_every_ms"):
        if opts.get(key):
            cmd += ["--" + key.replace("_", "-"), str(opts[key])]
    if opts.get("deflate", "prod") != "prod":
        cmd += ["--deflate", opts["deflate"]]
    if opts.get("soak"):
        cmd.append("--soak")
    return cmd


def _machine_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def _proc_cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _pin(pid: int, cpus: set[int]) -> None:
    # Server on one core, callers on the others: the load generator must not take the CPU
    # of the system under test (on a 2-core machine both would otherwise share both cores).
    if PIN and cpus and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


def _cpu_sets() -> tuple[set[int], set[int]]:
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return set(), set()
    return {cpus[0]}, set(cpus[1:])


def _split(n: int) -> list[int]:
    procs = max(1, -(-n // CALLS_PER_CLIENT))
    return [n // procs + (1 if i < n % procs else 0) for i in range(procs)]


def run_level(
    calls: int,
    window_s: float,
    impl: str = "ours",
    *,
    profile: str | None = None,
    profile_target: str = "server",
    **opts: Any,
) -> dict[str, Any]:
    """Hold ``calls`` paced calls for ``window_s`` seconds; return one row of numbers."""
    # At one call the lag sampler's 100 wakeups a second would cost more CPU than the call
    # (an idle wakeup costs ~100 µs here), so the one-call figures are taken without it.
    server = _Server(_server_cmd(impl, opts), sample_lag=calls > 1)
    server_cpus, client_cpus = _cpu_sets()
    _pin(server.proc.pid, server_cpus)
    clients: list[subprocess.Popen[str]] = []
    try:
        idle = server.get("/bench/snapshot")
        server.get("/bench/reset", "POST")
        # The idle rate is subtracted from the calls' CPU: measure it long enough to be exact.
        time.sleep(min(10.0, window_s / 2) if calls == 1 else 2.0 if window_s >= 5 else 1.0)
        idle_cpu = server.get("/bench/stats")
        idle_rate = idle_cpu["cpu_s"] / idle_cpu["window_s"]
        for i, n in enumerate(_split(calls)):
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "client",
                "--port",
                str(server.port),
                "--calls",
                str(n),
                "--tag",
                f"{i:02d}",
                "--first",
                str(sum(_split(calls)[:i])),
            ]
            if impl == "baseline" and calls > 1:
                cmd.append("--mounted")
            if LEAN_CALLERS:
                cmd.append("--lean")
            clients.append(
                subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE
                )
            )
            _pin(clients[-1].pid, client_cpus)
        connected = 0
        for c in clients:
            assert c.stdout is not None
            line = c.stdout.readline()
            if not line.startswith("CONNECTED"):
                raise RuntimeError(f"client failed to connect its calls: {line!r}")
            connected += int(line.split()[1])
        time.sleep(1.0)  # let the first utterances and marks settle
        pids = [c.pid for c in clients]
        spy = None
        if profile:
            # py-spy samples the server from outside; --nonblocking keeps it from pausing it.
            target = server.proc.pid if profile_target == "server" else clients[0].pid
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--pid",
                    str(target),
                    "--duration",
                    str(int(window_s)),
                    "--rate",
                    str(PROFILE_HZ),
                    "--nonblocking",
                    "--format",
                    "raw",
                    "-o",
                    profile,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        server.get("/bench/reset", "POST")
        busy0, total0 = _machine_jiffies()
        clients0 = _proc_cpu_s(pids)
        time.sleep(window_s)
        stats = server.get("/bench/stats")
        busy1, total1 = _machine_jiffies()
        clients_cpu = _proc_cpu_s(pids) - clients0
        if spy is not None:
            spy.wait(60)
        server.get("/bench/finish", "POST")
        results = []
        for c in clients:
            assert c.stdin is not None and c.stdout is not None
            c.stdin.write("stop\n")
            c.stdin.flush()
        for c in clients:
            assert c.stdout is not None
            out, _ = c.communicate(timeout=120)
            line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError("client printed no result")
            results.append(json.loads(line[7:]))
        final = server.wait_idle(30)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        server.stop()
    by_sid = {r["call_sid"]: r for r in final["records"]}
    sent = recv = lost_in = lost_out = queued = heard = done = 0
    for res in results:
        for call in res["calls"]:
            rec = by_sid.get(call["call_sid"])
            sent += call["frames_sent"]
            heard += call["heard_bytes"]
            done += call["done_mark"]
            if rec is None:
                lost_in += call["frames_sent"]
                continue
            recv += rec["frames_in"]
            queued += rec["agent_bytes_queued"]
            lost_in += max(0, call["frames_sent"] - rec["frames_in"])
            lost_out += max(0, rec["agent_bytes_queued"] - call["heard_bytes"])
    errors = sum(r["connect_errors"] for r in results) + (calls - connected)
    minutes = calls * stats["window_s"] / 60.0
    call_cpu = stats["cpu_s"] - idle_rate * stats["window_s"]
    cores = os.cpu_count() or 1
    box_pct = 100.0 * (busy1 - busy0) / max(1, total1 - total0)
    row = {
        "impl": impl,
        "calls": calls,
        "connected": connected,
        "connect_errors": errors,
        "window_s": round(stats["window_s"], 2),
        "in_p50_ms": stats["in_p50_ms"],
        "in_p99_ms": stats["in_p99_ms"],
        "in_max_ms": stats["in_max_ms"],
        "out_p50_ms": stats["out_p50_ms"],
        "out_p99_ms": stats["out_p99_ms"],
        "out_max_ms": stats["out_max_ms"],
        "lag_p99_ms": stats["lag_p99_ms"],
        "lag_max_ms": stats["lag_max_ms"],
        "gc_collections": stats["gc_collections"],
        "gc_max_ms": stats["gc_max_ms"],
        "caller_frames_sent": sent,
        "caller_frames_lost": lost_in,
        "agent_frames_queued": queued // 160,
        "agent_frames_lost": -(-lost_out // 160),
        "done_marks": done,
        "cpu_s": stats["cpu_s"],
        "user_s": stats["user_s"],
        "sys_s": stats["sys_s"],
        "idle_cpu_s_per_s": idle_rate,
        "cpu_s_per_call_min": call_cpu / minutes,
        "cpu_s_per_call_min_raw": stats["cpu_s"] / minutes,
        "server_idle_core_pct": 100.0 * idle_rate,
        "server_core_pct": 100.0 * stats["cpu_s"] / stats["window_s"],
        "clients_core_pct": 100.0 * clients_cpu / stats["window_s"],
        "machine_busy_pct": box_pct,
        # Whatever else ran on the machine meanwhile, in % of one core: noise to watch.
        "others_core_pct": box_pct * cores
        - 100.0 * (stats["cpu_s"] + clients_cpu) / stats["window_s"],
        "pinned": bool(PIN and server_cpus),
        # Callers with a full core fall behind real time and send fewer frames than the level
        # claims: such a level says nothing about the server.
        "callers_saturated": bool(
            PIN and client_cpus and clients_cpu / stats["window_s"] >= 0.95 * len(client_cpus)
        ),
        "lean_callers": LEAN_CALLERS,
        "rss_idle_mb": idle["rss_mb"],
        "rss_mb": stats["rss_mb"],
        "mem_per_call_kb": (stats["rss_mb"] - idle["rss_mb"]) * 1024.0 / max(1, calls),
        **{k: v for k, v in opts.items() if k != "soak"},
    }
    row["passed"] = bool(
        errors == 0
        and not row["callers_saturated"]
        and lost_in == 0
        and lost_out == 0
        and row["in_p99_ms"] is not None
        and row["in_p99_ms"] < P99_LIMIT_MS
        and (row["out_p99_ms"] or 0.0) < P99_LIMIT_MS
    )
    return row


def run_soak(
    calls: int, warmup: int = 200, lanes: int = 4, steps: int = 1, **opts: Any
) -> dict[str, Any]:
    """Place ``calls`` short calls after ``warmup`` ones; report what the server kept.

    The calls go in ``steps`` batches with a snapshot (RSS, tasks, threads, descriptors)
    after each, so growth shows as a curve rather than two points.
    """
    server = _Server(_server_cmd("ours", {**opts, "soak": True}))

    def client(n: int) -> dict[str, Any]:
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "soak",
            "--port",
            str(server.port),
            "--calls",
            str(n),
            "--lanes",
            str(lanes),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=7200, cwd=HERE).stdout
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError("soak client printed no result")
        return json.loads(line[7:])

    curve: list[dict[str, Any]] = []
    failures = heard_ok = 0
    seconds = 0.0
    try:
        client(warmup)
        server.wait_idle(30)
        before = server.get("/bench/snapshot")
        done = 0
        for i in range(steps):
            n = calls // steps + (1 if i < calls % steps else 0)
            res = client(n)
            done += n
            failures += res["failures"]
            heard_ok += res["heard_ok"]
            seconds += res["seconds"]
            server.wait_idle(30)
            snap = server.get("/bench/snapshot")
            curve.append(
                {"calls": done, **{k: snap[k] for k in ("rss_mb", "tasks", "threads", "fds")}}
            )
        after = snap
    finally:
        server.stop()
    return {
        "calls": calls,
        "lanes": lanes,
        "seconds": round(seconds, 1),
        "calls_per_s": calls / seconds,
        "failures": failures,
        "heard_ok": heard_ok,
        "curve": curve,
        "rss_before_mb": before["rss_mb"],
        "rss_after_mb": after["rss_mb"],
        "rss_growth_mb": after["rss_mb"] - before["rss_mb"],
        "tasks_left": after["tasks"] - before["tasks"],
        "threads_left": after["threads"] - before["threads"],
        "fds_left": after["fds"] - before["fds"],
        "live_after": after["live"],
        "ended_all": after["started"] == after["ended"],
    }


# =========================================================================== the benchmark


def _compare(ours: dict[str, Any], base: dict[str, Any], name: str) -> dict[str, Any]:
    base["table"] = "baseline"
    base["name"] = name
    base["ours_cpu_s_per_call_min"] = ours["cpu_s_per_call_min"]
    base["cpu_ratio"] = ours["cpu_s_per_call_min"] / base["cpu_s_per_call_min"]
    if base["in_p50_ms"]:
        base["in_p50_ratio"] = ours["in_p50_ms"] / base["in_p50_ms"]
        base["in_p99_ratio"] = ours["in_p99_ms"] / base["in_p99_ms"]
    if base["out_p99_ms"]:
        base["out_p99_ratio"] = (ours["out_p99_ms"] or 0.0) / base["out_p99_ms"]
    return base


def paired_rows(
    calls: int, window: float, rounds: int, others: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    """This package and each other server at the same load, interleaved round by round.

    One call's CPU moves by +-20 % from run to run here, so each figure is the median of
    ``rounds`` runs, and the ratio the median of the ratios within each round (a slow spell
    of the machine hits both sides of a round).
    """
    runs: dict[str, list[dict[str, Any]]] = {"ours": []}
    for impl, _ in others:
        runs[impl] = []
    for _ in range(rounds):
        runs["ours"].append(run_level(calls, window))
        for impl, _ in others:
            extra = {"sessions": calls} if impl == "baseline" else {}
            runs[impl].append(run_level(calls, window, impl=impl, **extra))
    ours = [r["cpu_s_per_call_min"] for r in runs["ours"]]
    out = []
    for impl, name in others:
        theirs = runs[impl]
        row = _compare(runs["ours"][-1], dict(theirs[-1]), name)
        cpu = [r["cpu_s_per_call_min"] for r in theirs]
        ratios = [o / t for o, t in zip(ours, cpu, strict=True)]
        row.update(
            impl=impl,
            rounds=rounds,
            cpu_s_per_call_min=statistics.median(cpu),
            cpu_runs=cpu,
            ours_cpu_s_per_call_min=statistics.median(ours),
            ours_cpu_runs=ours,
            cpu_ratio=statistics.median(ratios),
            cpu_ratio_min=min(ratios),
            cpu_ratio_max=max(ratios),
        )
        if impl != "baseline" and "baseline" in runs:
            base = [r["cpu_s_per_call_min"] for r in runs["baseline"]]
            row["floor_vs_baseline"] = statistics.median(
                [f / b for f, b in zip(cpu, base, strict=True)]
            )
        out.append(row)
    return out


def baseline_rows(window: float, quick: bool) -> list[dict[str, Any]]:
    """The 0.1.15 package on the same workload, and the floors, against this package."""
    rounds = 1 if quick else PAIR_ROUNDS
    # The floors: what a call costs a server that only reads and counts its frames, and one
    # that also plays agent audio with the least code that can. No library goes below them.
    one = [
        ("baseline", "voice-runtime 0.1.15, 1 call"),
        ("floor", "floor: frames read and counted, nothing else, 1 call"),
        ("floor-duplex", "duplex floor: frames counted, stock audio played, 1 call"),
    ]
    # The old package holds one call per app: for 50 calls, 50 apps mounted at /c{i}.
    fifty = [
        ("baseline", "voice-runtime 0.1.15, 50 calls (50 apps)"),
        ("floor-duplex", "duplex floor: frames counted, stock audio played, 50 calls"),
    ]
    return paired_rows(1, window, rounds, one) + paired_rows(50, window, rounds, fifty)


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Run every measurement; each row has a ``table`` key naming its table."""
    window = 5.0 if quick else 30.0
    rows: list[dict[str, Any]] = []
    levels = [1, 50, 250, 500] if quick else [1, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500]
    for n in levels:
        row = run_level(n, window)
        row["table"] = "calls"
        rows.append(row)
        print(
            f"  calls={n}: in p99 {row['in_p99_ms']:.2f} ms, out p99 "
            f"{(row['out_p99_ms'] or 0):.2f} ms, lost {row['caller_frames_lost']}/"
            f"{row['agent_frames_lost']}, passed={row['passed']}",
            file=sys.stderr,
            flush=True,
        )
    # Capacity: the highest level with every level up to it passed (one lucky run above a
    # failed level does not count).
    held = 0
    for r in rows:
        if not r["passed"]:
            break
        held = r["calls"]
    rows.append(
        {
            "table": "capacity",
            "name": "every level up to it: 0 lost, p99 < 20 ms",
            "calls": held,
            "levels_tried": levels,
        }
    )
    if Path(BASELINE_PYTHON).exists():
        rows += baseline_rows(window, quick)
    soak = run_soak(300 if quick else 10_000, warmup=50 if quick else 300, steps=2 if quick else 10)
    soak["table"] = "soak"
    rows.append(soak)
    return rows


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as plain-text tables."""
    out: list[str] = []
    calls = [r for r in rows if r.get("table") == "calls"]
    if calls:
        out.append("Concurrent paced calls (latency in ms, measured in the server process)")
        head = (
            f"{'calls':>5} {'in p50':>7} {'in p99':>7} {'out p50':>7} {'out p99':>7} "
            f"{'lag p99':>7} {'lost in':>7} {'lost out':>8} {'CPU s/call-min':>14} "
            f"{'srv %':>5} {'cli %':>5} {'oth %':>5} {'KB/call':>8} {'pass':>4}"
        )
        out.append(head)
        for r in calls:
            out.append(
                f"{r['calls']:>5} {_fmt(r['in_p50_ms']):>7} {_fmt(r['in_p99_ms']):>7} "
                f"{_fmt(r['out_p50_ms']):>7} {_fmt(r['out_p99_ms']):>7} "
                f"{_fmt(r['lag_p99_ms']):>7} {r['caller_frames_lost']:>7} "
                f"{r['agent_frames_lost']:>8} {_fmt(r['cpu_s_per_call_min'], 3):>14} "
                f"{_fmt(r['server_core_pct'], 0):>5} {_fmt(r['clients_core_pct'], 0):>5} "
                f"{_fmt(r['others_core_pct'], 0):>5} "
                f"{_fmt(r['mem_per_call_kb'], 0):>8} {_fmt(r['passed']):>4}"
                + ("  (callers saturated)" if r.get("callers_saturated") else "")
            )
    for r in rows:
        if r.get("table") == "capacity":
            out.append(f"\nCapacity: {r['calls']} concurrent paced calls ({r['name']})")
    base = [r for r in rows if r.get("table") == "baseline"]
    if base:
        out.append(
            "\nAgainst the baseline and the floors (ratio = ours / this row at the same load, "
            "median of the rounds' ratios; below 1 is better)"
        )
        out.append(
            f"{'row':<60} {'CPU s/call-min':>14} {'ours':>6} {'ratio':>6} {'range':>11} "
            f"{'rounds':>6}"
        )
        for r in base:
            spread = f"{_fmt(r.get('cpu_ratio_min'))}-{_fmt(r.get('cpu_ratio_max'))}"
            out.append(
                f"{r['name']:<60} {_fmt(r['cpu_s_per_call_min'], 3):>14} "
                f"{_fmt(r.get('ours_cpu_s_per_call_min'), 3):>6} {_fmt(r['cpu_ratio']):>6} "
                f"{spread:>11} {r.get('rounds', 1):>6}"
            )
            if "floor_vs_baseline" in r:
                out.append(
                    f"  this floor is {r['floor_vs_baseline']:.2f}x the baseline at the same "
                    "load: no library can go lower on this machine"
                )
    for r in rows:
        if r.get("table") == "soak":
            out.append(
                f"\nSequential calls: {r['calls']} calls ({r['lanes']} at a time, "
                f"{r['calls_per_s']:.0f}/s), RSS growth {r['rss_growth_mb']:.1f} MB, "
                f"tasks left {r['tasks_left']}, threads left {r['threads_left']}, "
                f"fds left {r['fds_left']}, failures {r['failures']}"
            )
    return "\n".join(out)


def main() -> None:
    """Command line: the benchmark, or one of its processes (serve/client/soak)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    p_run = sub.add_parser("run", help="the benchmark (default)")
    p_run.add_argument("--quick", action="store_true")
    # The server knobs, for a level (passed on to its server) and for the server itself.
    knobs = argparse.ArgumentParser(add_help=False)
    knobs.add_argument("--ws", default="auto")
    knobs.add_argument("--frame-bytes", type=int, default=0)
    knobs.add_argument("--lead-ms", type=float, default=0)
    knobs.add_argument("--mark-every-ms", type=float, default=0)
    knobs.add_argument("--deflate", default="prod", choices=["prod", "on", "off"])
    p_level = sub.add_parser("level", help="one concurrency level", parents=[knobs])
    p_level.add_argument("calls", type=int)
    p_level.add_argument("--window", type=float, default=10.0)
    p_level.add_argument(
        "--impl", default="ours", choices=["ours", "baseline", "floor", "floor-duplex"]
    )
    p_level.add_argument("--uvicorn", default="default")
    p_level.add_argument("--profile", help="py-spy raw (collapsed) output path")
    p_level.add_argument("--profile-target", default="server", choices=["server", "client"])
    p_pairs = sub.add_parser("pairs", help="ours, the baseline and the floors, interleaved")
    p_pairs.add_argument("calls", type=int)
    p_pairs.add_argument("--rounds", type=int, default=PAIR_ROUNDS)
    p_pairs.add_argument("--window", type=float, default=20.0)
    p_soak_run = sub.add_parser("soakrun", help="sequential calls only")
    p_soak_run.add_argument("calls", type=int)
    p_serve = sub.add_parser("serve", parents=[knobs])
    p_serve.add_argument("--soak", action="store_true")
    p_floor = sub.add_parser("serve-floor")
    p_floor.add_argument("--duplex", action="store_true")
    p_client = sub.add_parser("client")
    p_client.add_argument("--port", type=int, required=True)
    p_client.add_argument("--first", type=int, default=0)
    p_client.add_argument("--mounted", action="store_true")
    p_client.add_argument("--lean", action="store_true", help="the lean caller farm")
    p_client.add_argument("--calls", type=int, required=True)
    p_client.add_argument("--tag", default="00")
    p_soak = sub.add_parser("soak")
    p_soak.add_argument("--port", type=int, required=True)
    p_soak.add_argument("--calls", type=int, required=True)
    p_soak.add_argument("--lanes", type=int, default=4)
    args = parser.parse_args(sys.argv[1:] or ["run"])
    if args.role == "serve":
        _serve_ours(args)
    elif args.role == "serve-floor":
        _serve_floor(args)
    elif args.role == "client":
        logging.basicConfig(level=logging.ERROR)
        _run_async(_lean_client_main(args) if args.lean else _client_main(args))
    elif args.role == "soak":
        logging.basicConfig(level=logging.ERROR)
        _run_async(_soak_main(args))
    elif args.role == "level":
        opts: dict[str, Any] = {}
        if args.impl == "baseline":
            opts["uvicorn"] = args.uvicorn
            opts["sessions"] = args.calls
        else:
            opts = {
                "ws": args.ws,
                "frame_bytes": args.frame_bytes,
                "lead_ms": args.lead_ms,
                "mark_every_ms": args.mark_every_ms,
                "deflate": args.deflate,
            }
        row = run_level(
            args.calls,
            args.window,
            impl=args.impl,
            profile=args.profile,
            profile_target=args.profile_target,
            **opts,
        )
        row["table"] = "calls"
        print(json.dumps(row, indent=1))
        print(format_table([row]))
    elif args.role == "pairs":
        others = [("baseline", "voice-runtime 0.1.15")] if Path(BASELINE_PYTHON).exists() else []
        others += [("floor", "floor: frames only"), ("floor-duplex", "duplex floor")]
        rows = paired_rows(args.calls, args.window, args.rounds, others)
        print(format_table([dict(r, table="baseline") for r in rows]))
    elif args.role == "soakrun":
        print(json.dumps(run_soak(args.calls), indent=1))
    else:
        print(format_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
