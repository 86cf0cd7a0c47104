"""Cluster benchmark: paced calls held by ``voice-runtime serve --workers N`` on one Redis.

Run ``python benchmarks/bench_cluster.py`` (``--quick`` for a shorter run, ``--levels
1:100,200 2:200,400`` to choose workers and call counts). Per level:

* a private ``redis-server`` and ``voice-runtime serve bench_cluster:voice --workers N`` (each
  worker a VoiceServer instance of one cluster, on its own port, with the probe of
  ``_callkit.py``: caller frames are stamped, so inbound latency is socket → STT consumer);
* the load generator in its own process: the lean caller farm of ``_leancaller.py``, its
  calls spread round-robin over the workers' ports (as a proxy spreads routed streams);
* this process, with only Redis, sends ``cluster.control(call_sid).publish_event(...)`` to
  random live calls through the window: the added latency of a control command through Redis
  (owner lookup, publish, execution by the owner, answer), p50/p99.

A level passes when every call connected, no caller frame and no agent audio was lost, and
the inbound p99 and the loop-lag p99 of every worker are under 20 ms. :func:`run` returns the
rows as dicts (``benchmarks/run.py`` collects them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import _callkit as kit  # noqa: E402

P99_LIMIT_MS = 20.0
_voice: Any = None


# =========================================================================== the worker's app


def _build_voice() -> Any:
    """The VoiceServer each worker serves (its cluster comes from VOICE_REDIS_URL)."""
    from voice_runtime.server import VoiceServer

    probe = kit.Probe()
    chunk = kit.tone_chunk()

    on_call = kit.speaking_handler(probe, chunk)

    voice = VoiceServer(on_call=on_call, max_calls=100_000)
    probe.install(voice.app, lambda: voice.registry.live_count)

    async def lag() -> dict[str, bool]:
        if probe.lag._task is None:
            probe.lag.start()
        return {"sampling": True}

    voice.app.add_api_route("/bench/lag", lag, methods=["POST"])
    return voice


def __getattr__(name: str) -> Any:
    # ``voice-runtime serve bench_cluster:voice`` builds the server in each worker on import.
    global _voice
    if name != "voice":
        raise AttributeError(name)
    if _voice is None:
        _voice = _build_voice()
    return _voice


# =========================================================================== the load generator


async def _client_main(args: argparse.Namespace) -> None:
    import uuid

    import _leancaller as lc

    ports = [int(p) for p in args.ports.split(",")]
    callers = [
        lc.LeanCaller(f"CA{i:08d}".ljust(34, "0"), "MZ" + uuid.uuid4().hex)
        for i in range(args.calls)
    ]
    out = await lc.hold_farm(callers, lambda i: (ports[i % len(ports)], "/voice"))
    sys.stdout.write("RESULT " + json.dumps(out) + "\n")
    sys.stdout.flush()


# =========================================================================== orchestration


def _free_port(span: int = 1) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + span < 65000 and all(_port_free(port + i) for i in range(1, span)):
            return port
    raise RuntimeError("no free port range")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _get(port: int, path: str, method: str = "GET") -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


class _Redis:
    def __init__(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="vr-bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self._dir.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._dir.cleanup()


async def _control_latency(redis_url: str, window_s: float) -> list[float]:
    """Control commands to random live calls through Redis for ``window_s``; ms each."""
    from voice_runtime.cluster import Cluster

    out: list[float] = []
    async with Cluster(redis_url) as cluster:
        sids = [c.call_sid for c in await cluster.calls()]
        if not sids:
            return out
        loop = asyncio.get_running_loop()
        end = loop.time() + window_s
        rng = random.Random(17)
        while loop.time() < end:
            sid = rng.choice(sids)
            t0 = time.perf_counter()
            await cluster.control(sid).publish_event_async("bench", {"n": len(out)})
            out.append((time.perf_counter() - t0) * 1e3)
            await asyncio.sleep(0.02)
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(workers: int, calls: int, window_s: float) -> dict[str, Any]:
    """Hold ``calls`` paced calls on ``workers`` instances for ``window_s``; one row.

    ``workers`` 0 is the baseline: one process with no Redis (no cluster at all).
    """
    solo = workers == 0
    workers = max(1, workers)
    redis = _Redis()
    port = _free_port(workers)
    ports = [port + i for i in range(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "VOICE_"))}
    env.update({
        "VOICE_REDIS_URL": redis.url,
        "VOICE_CLUSTER_SECRET": "bench",
        "VOICE_INSTANCE_ID": "bench",
        "PYTHONPATH": str(ROOT),
    })  # fmt: skip
    if solo:
        env.pop("VOICE_REDIS_URL")
    server = subprocess.Popen(
        [sys.executable, "-m", "voice_runtime.cli", "serve", "bench_cluster:voice",
         "--app-dir", str(HERE), "--workers", str(workers), "--port", str(port),
         "--max-calls", "100000", "--log-level", "error"],
        env=env, cwd=ROOT,
    )  # fmt: skip
    client: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 30
        for p in ports:
            while True:
                try:
                    _get(p, "/health")
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("workers did not start") from None
                    time.sleep(0.1)
            _get(p, "/bench/lag", "POST")
        client = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "client",
             "--ports", ",".join(map(str, ports)), "--calls", str(calls)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE, env=env,
        )  # fmt: skip
        assert client.stdout is not None and client.stdin is not None
        line = client.stdout.readline()
        if not line.startswith("CONNECTED"):
            raise RuntimeError(f"the load generator failed: {line!r}")
        connected = int(line.split()[1])
        time.sleep(1.5)  # first utterances, marks and heartbeats settle
        for p in ports:
            _get(p, "/bench/reset", "POST")
        client_cpu0, t0 = _cpu_s(client.pid), time.monotonic()
        if solo:
            time.sleep(window_s)
            control_ms: list[float] = []
        else:
            control_ms = asyncio.run(_control_latency(redis.url, window_s))
        stats = [_get(p, "/bench/stats") for p in ports]
        callers_pct = 100.0 * (_cpu_s(client.pid) - client_cpu0) / (time.monotonic() - t0)
        for p in ports:
            _get(p, "/bench/finish", "POST")
        client.stdin.write("stop\n")
        client.stdin.flush()
        out, _ = client.communicate(timeout=120)
        result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
        finals: list[dict[str, Any]] = []
        for p in ports:
            end = time.monotonic() + 30
            while True:
                final = _get(p, "/bench/calls")
                if (final["live"] == 0 and final["ended"] >= final["started"]) or (
                    time.monotonic() > end
                ):
                    break
                time.sleep(0.2)
            finals.append(final)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(40)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        redis.stop()
    records = {r["call_sid"]: r for f in finals for r in f["records"]}
    lost_in = lost_out = sent = 0
    for call in result["calls"]:
        rec = records.get(call["call_sid"])
        sent += call["frames_sent"]
        if rec is None:
            lost_in += call["frames_sent"]
            continue
        lost_in += max(0, call["frames_sent"] - rec["frames_in"])
        lost_out += max(0, rec["agent_bytes_queued"] - call["heard_bytes"])
    window = max(s["window_s"] for s in stats)
    row = {
        "workers": "1, no Redis" if solo else workers,
        "calls": calls,
        "connected": connected,
        "connect_errors": result["connect_errors"] + calls - connected,
        "window_s": round(window, 2),
        "in_p50_ms": max(s["in_p50_ms"] or 0.0 for s in stats),
        "in_p99_ms": max(s["in_p99_ms"] or 0.0 for s in stats),
        "lag_p99_ms": max(s["lag_p99_ms"] or 0.0 for s in stats),
        "caller_frames_sent": sent,
        "caller_frames_lost": lost_in,
        "agent_frames_lost": -(-lost_out // 160),
        "servers_core_pct": 100.0 * sum(s["cpu_s"] for s in stats) / window,
        "callers_core_pct": callers_pct,
        "load_avg_1m": os.getloadavg()[0],
        "control_n": len(control_ms),
        "control_p50_ms": kit.percentile(control_ms, 50),
        "control_p99_ms": kit.percentile(control_ms, 99),
    }
    row["passed"] = bool(
        row["connect_errors"] == 0
        and lost_in == 0
        and lost_out == 0
        and row["in_p99_ms"] < P99_LIMIT_MS
        and row["lag_p99_ms"] < P99_LIMIT_MS
    )
    return row


def run(quick: bool = False, levels: dict[int, list[int]] | None = None) -> list[dict[str, Any]]:
    """Every level of ``levels`` (workers -> call counts); rows for ``benchmarks/run.py``."""
    if shutil.which("redis-server") is None and not Path("/usr/bin/redis-server").exists():
        raise RuntimeError("bench_cluster needs redis-server (apt-get install redis-server)")
    window = 5.0 if quick else 15.0
    chosen = levels or (
        {0: [50], 1: [50], 2: [100]} if quick else {0: [200], 1: [100, 200], 2: [200, 400]}
    )
    rows = []
    for workers, counts in chosen.items():
        for calls in counts:
            row = run_level(workers, calls, window)
            print(format_table([row]).splitlines()[-1], flush=True)
            rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    cols = ["workers", "calls", "connected", "in_p99_ms", "lag_p99_ms", "caller_frames_lost",
            "agent_frames_lost", "servers_core_pct", "callers_core_pct", "control_p50_ms",
            "control_p99_ms", "load_avg_1m", "passed"]  # fmt: skip

    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _levels(specs: list[str]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for spec in specs:
        workers, _, counts = spec.partition(":")
        out[int(workers)] = [int(c) for c in counts.split(",")]
    return out


def main() -> None:
    """``bench_cluster.py [--quick] [--levels W:N,N ...]`` or the ``client`` role."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="role")
    client = sub.add_parser("client")
    client.add_argument("--ports", required=True)
    client.add_argument("--calls", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--levels", nargs="*", help="WORKERS:CALLS[,CALLS] ... (WORKERS 0: one process, no Redis)"
    )
    args = parser.parse_args()
    if args.role == "client":
        asyncio.run(_client_main(args))
        return
    rows = run(args.quick, _levels(args.levels) if args.levels else None)
    print(format_table(rows))


if __name__ == "__main__":
    main()
