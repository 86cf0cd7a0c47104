"""Baseline server for the call benchmark: the voice-runtime 0.1.15 package, one session.

Run by the baseline venv's own python (``bench_calls.py`` starts it), so ``voice_runtime``
here is the old package. It serves ``register_voice_websocket(app, session)`` and plays the
same workload as the benchmark server of this package: an STT-like consumer reads every
caller frame from ``session.inbound``; an agent thread, the old package's usage pattern,
queues 2 s utterances in 100 ms chunks with ``put_outbound_sync`` and waits for each with
``send_mark_and_wait``. Outbound latency is from ``put_outbound_sync`` (the old transport
sends as soon as it can) to the end of ``websocket.send_text``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import _callkit as kit  # benchmarks/ is sys.path[0] when this file runs as a script
from fastapi import FastAPI
from starlette.websockets import WebSocket

for _name in ("TWILIO_AUTH_TOKEN", "TWILIO_ACCOUNT_SID", "VOICE_STREAM_URL"):
    os.environ.pop(_name, None)


def _tagged(app: Any, index: int) -> Any:
    """An ASGI wrapper that records which mounted session a websocket belongs to."""

    async def wrapper(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["vr_index"] = index
        await app(scope, receive, send)

    return wrapper


def main() -> None:
    """Serve the old package's single-session websocket with the benchmark probe."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--uvicorn", choices=["default", "ours"], default="default")
    parser.add_argument("--sessions", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from voice_runtime.session import VoiceSession
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    probe = kit.Probe()
    # The old package serves one session per app; with --sessions N, N apps are mounted at
    # /c{i} (their streams at /c{i}/voice), which is how it can hold N calls at once.
    sessions = [VoiceSession() for _ in range(args.sessions)]
    put_times = [collections.deque[float]() for _ in sessions]
    live = {"n": 0}
    chunk = kit.tone_chunk()

    original_send_text = WebSocket.send_text

    async def timed_send_text(self: WebSocket, data: str) -> None:
        await original_send_text(self, data)
        times = put_times[self.scope.get("vr_index", 0)]
        if data.startswith('{"event": "media"') and times:
            t_put = times.popleft()
            if probe.measuring:
                probe.out_lat_ms.append((time.monotonic() - t_put) * 1e3)

    WebSocket.send_text = timed_send_text  # type: ignore[method-assign]

    def agent(index: int) -> None:
        # The old package's usage: a sync script in its own thread.
        session, times = sessions[index], put_times[index]
        session.wait_for_ws_connect(timeout=3600)
        rec = probe.new_call(session.call_sid or "?")
        live["n"] += 1
        loop = session.loop
        assert loop is not None
        consumer = asyncio.run_coroutine_threadsafe(probe.consume(session.inbound, rec), loop)
        while not probe.finishing and not session.is_disconnected:
            for _ in range(kit.UTTERANCE_CHUNKS):
                times.append(time.monotonic())
                session.put_outbound_sync(chunk)
                rec.agent_bytes_queued += len(chunk)
            with contextlib.suppress(TimeoutError):
                session.send_mark_and_wait("utt", timeout=30)
        if not session.is_disconnected:
            with contextlib.suppress(TimeoutError):
                session.send_mark_and_wait("bench-done", timeout=30)
                rec.done_mark = True
        while not session.is_disconnected:
            time.sleep(0.05)
        with contextlib.suppress(Exception):
            consumer.result(timeout=5)
        probe.end_call(rec)
        live["n"] -= 1

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        probe.lag.start()
        for i in range(len(sessions)):
            threading.Thread(target=agent, args=(i,), name="baseline-agent", daemon=True).start()
        yield

    app = FastAPI(lifespan=lifespan)
    if len(sessions) == 1:
        register_voice_websocket(app, sessions[0])
    else:
        for i, session in enumerate(sessions):
            sub = FastAPI()
            register_voice_websocket(sub, session)
            app.mount(f"/c{i}", _tagged(sub, i))
    probe.install(app, lambda: live["n"])
    uv: dict[str, Any] = {}
    if args.uvicorn == "ours":
        uv = {"ws_max_size": 1 << 20, "ws_per_message_deflate": False}
    kit.serve(app, uv, lambda: None)


if __name__ == "__main__":
    main()
