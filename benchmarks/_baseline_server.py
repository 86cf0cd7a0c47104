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


def main() -> None:
    """Serve the old package's single-session websocket with the benchmark probe."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--uvicorn", choices=["default", "ours"], default="default")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    from voice_runtime.session import VoiceSession
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    probe = kit.Probe()
    put_times: collections.deque[float] = collections.deque()
    session = VoiceSession()
    live = {"n": 0}
    chunk = kit.tone_chunk()

    original_send_text = WebSocket.send_text

    async def timed_send_text(self: WebSocket, data: str) -> None:
        await original_send_text(self, data)
        if data.startswith('{"event": "media"') and put_times:
            t_put = put_times.popleft()
            if probe.measuring:
                probe.out_lat_ms.append((time.monotonic() - t_put) * 1e3)

    WebSocket.send_text = timed_send_text  # type: ignore[method-assign]

    def agent() -> None:
        # The old package's usage: a sync script in its own thread.
        session.wait_for_ws_connect(timeout=3600)
        rec = probe.new_call(session.call_sid or "?")
        live["n"] = 1
        loop = session.loop
        assert loop is not None
        consumer = asyncio.run_coroutine_threadsafe(probe.consume(session.inbound, rec), loop)
        while not probe.finishing and not session.is_disconnected:
            for _ in range(kit.UTTERANCE_CHUNKS):
                put_times.append(time.monotonic())
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
        live["n"] = 0

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        probe.lag.start()
        threading.Thread(target=agent, name="baseline-agent", daemon=True).start()
        yield

    app = FastAPI(lifespan=lifespan)
    register_voice_websocket(app, session)
    probe.install(app, lambda: live["n"])
    uv: dict[str, Any] = {}
    if args.uvicorn == "ours":
        uv = {"ws_max_size": 1 << 20, "ws_per_message_deflate": False}
    kit.serve(app, uv, lambda: None)


if __name__ == "__main__":
    main()
