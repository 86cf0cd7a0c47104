"""The common part of the realtime fakes: scripts, sockets, recording, VAD, failure injection."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from voice_runtime.audio import rms_dbfs
from voice_runtime.testing._serve import FakeService, bind_free_socket, close_server, port_of
from voice_runtime.testing._wait import wait_on_change


@dataclass(frozen=True)
class FakeResponse:
    """One scripted assistant response: audio (μ-law 8 kHz), its transcript, a tool call.

    With both audio and a tool call, the OpenAI-style fakes speak first and then call the
    tool in the same response (the other fakes send only the tool call).

    ``usage`` holds ``input_audio``, ``input_text``, ``output_audio``, ``output_text`` and
    ``cached`` token counts for the response.
    """

    audio: bytes = b""
    transcript: str = ""
    tool_call: tuple[str, Mapping[str, Any]] | None = None
    usage: Mapping[str, int] | None = None


@dataclass
class FakeScript:
    """How a fake behaves.

    * ``greeting``: played when the client asks for the first response (OpenAI/xAI
      ``response.create``, Gemini ``clientContent``, ElevenLabs ``first_message``), or at
      once on connect with ``greet_on_connect``.
    * ``replies``: one per caller turn, in order; the last one repeats.
    * ``after_tool``: the response after a tool result arrives.
    * ``chunk_ms``/``pace_s``: audio deltas' size and the pause between them.
    * VAD: a 20 ms frame louder than ``speech_threshold_dbfs`` starts speech;
      ``silence_ms`` of quieter audio ends it.
    """

    greeting: FakeResponse | None = None
    greet_on_connect: bool = False
    replies: Sequence[FakeResponse] = ()
    after_tool: FakeResponse | None = None
    user_transcript: str = "hello"
    chunk_ms: int = 100
    pace_s: float = 0.0
    speech_threshold_dbfs: float = -40.0
    silence_ms: int = 300
    input_audio_format: str = "ulaw_8000"
    output_audio_format: str = "ulaw_8000"
    ping_on_start: bool = True


class _Vad:
    """Energy VAD over PCM16 in 20 ms frames."""

    def __init__(self, rate: int, threshold_dbfs: float, silence_ms: int) -> None:
        self.frame = rate // 50
        self.threshold = threshold_dbfs
        self.silence_frames = max(1, silence_ms // 20)
        self.in_speech = False
        self._quiet = 0
        self._buf = np.empty(0, dtype=np.int16)
        self.position_ms = 0.0

    def feed(self, pcm: np.ndarray) -> list[str]:
        self._buf = np.concatenate([self._buf, pcm])
        out: list[str] = []
        n = self.frame
        while self._buf.size >= n:
            frame, self._buf = self._buf[:n], self._buf[n:]
            self.position_ms += 20.0
            loud = rms_dbfs(frame) > self.threshold
            if loud and not self.in_speech:
                self.in_speech = True
                self._quiet = 0
                out.append("start")
            elif self.in_speech:
                self._quiet = 0 if loud else self._quiet + 1
                if self._quiet >= self.silence_frames:
                    self.in_speech = False
                    out.append("stop")
        return out


class _Conn:
    """State of one client connection."""

    def __init__(self, ws: ServerConnection, index: int, script: FakeScript, rate: int) -> None:
        self.ws = ws
        self.index = index
        self.vad = _Vad(rate, script.speech_threshold_dbfs, script.silence_ms)
        self.response: asyncio.Task[None] | None = None
        self.greeted = False
        self.turns = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.state: dict[str, Any] = {}


class FakeRealtimeServer(FakeService):
    """Base of the fakes: socket handling, recording, VAD, scripting, failure injection.

    Served in the running loop (``async with``) or on its own thread (``with``), as every
    fake in :mod:`voice_runtime.testing`.
    """

    vendor = "fake"
    input_rate = 8000

    def __init__(
        self,
        script: FakeScript | None = None,
        *,
        api_key: str | None = "test-key",
        host: str = "127.0.0.1",
        binary_frames: bool = False,
    ) -> None:
        super().__init__()
        self.script = script or FakeScript()
        self.api_key = api_key
        self.host = host
        self.port = 0
        self.binary_frames = binary_frames
        self.refuse_connections = False
        self.received: list[dict[str, Any]] = []
        self.sent: list[dict[str, Any]] = []
        self.caller_audio = bytearray()  # what the client sent, in the vendor's input format
        self.connections = 0
        self.rejected = 0
        self.usage_sent: list[Mapping[str, int]] = []
        self.request_headers: list[dict[str, str]] = []  # of every handshake, in order
        self._conns: dict[int, _Conn] = {}
        self._server: Server | None = None
        self._changed = asyncio.Event()
        self._ids = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle

    async def _start(self) -> None:
        """Listen on a free port of ``host``."""
        sock = bind_free_socket(self.host)
        self.port = port_of(sock)
        self._server = await serve(
            self._handler,
            sock=sock,
            process_request=self._process_request,
            compression=None,
            max_size=16 * 1024 * 1024,
        )

    async def _stop(self) -> None:
        """Close every connection and stop listening."""
        for conn in list(self._conns.values()):
            self._stop_response(conn)
            for task in list(conn.tasks):
                task.cancel()
        server = self._server
        self._server = None
        if server is not None:
            await close_server(server)

    @property
    def url(self) -> str:
        """``ws://host:port``."""
        return f"ws://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What to pass as ``AgentOptions.base_url``."""
        return self.url

    @property
    def active_connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    # ------------------------------------------------------------------ recording and waiting

    def messages(self, kind: str) -> list[dict[str, Any]]:
        """Recorded client messages of one type (``type`` field, or top-level key)."""
        return [m for m in self.received if m.get("type") == kind or kind in m]

    def _record(self, msg: dict[str, Any]) -> None:
        self.received.append(msg)
        self._changed.set()

    # Same shape as the simulator's wait_* helpers, hence a timeout argument.
    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> bool:
        """Wait until ``predicate()`` is true (checked on every recorded change)."""
        return await wait_on_change(self._changed, predicate, timeout)

    async def wait_for_message(
        self,
        kind: str,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> dict[str, Any] | None:
        """Wait for a client message of ``kind``; return the first such message."""
        if await self.wait_for(lambda: bool(self.messages(kind)), timeout):
            return self.messages(kind)[0]
        return None

    # ------------------------------------------------------------------ failure injection

    async def drop(self) -> None:
        """Kill every connection without a close frame (the vendor vanished)."""
        for conn in list(self._conns.values()):
            self._stop_response(conn)
            transport = getattr(conn.ws, "transport", None)
            if transport is not None:
                transport.abort()

    async def close_all(self, code: int = 1011, reason: str = "server error") -> None:
        """Close every connection with a close frame."""
        for conn in list(self._conns.values()):
            self._stop_response(conn)
            with contextlib.suppress(Exception):
                await conn.ws.close(code, reason)

    async def send_error(self, message: str = "fake failure", code: str = "server_error") -> None:
        """Send the vendor's error message on every connection."""
        for conn in list(self._conns.values()):
            await self._send_error(conn, message, code)

    async def send_raw(self, message: Mapping[str, Any] | str) -> None:
        """Send one message as is on every connection (for malformed-input tests).

        An object goes out as JSON, whatever its field types; a string goes out verbatim.
        Neither is recorded in :attr:`sent`.
        """
        text = message if isinstance(message, str) else json.dumps(message)
        for conn in list(self._conns.values()):
            await self._send_text(conn, text)

    async def trigger_speech_started(self) -> None:
        """Act as if the caller started speaking on every connection."""
        for conn in list(self._conns.values()):
            await self._on_speech_start(conn)

    async def emit_tool_call(self, name: str, arguments: Mapping[str, Any]) -> None:
        """Ask every client to run a tool now."""
        for conn in list(self._conns.values()):
            self._start_response(conn, FakeResponse(tool_call=(name, dict(arguments))))

    # ------------------------------------------------------------------ plumbing

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        self.request_headers.append({k.lower(): v for k, v in request.headers.raw_items()})
        if self.refuse_connections:
            self.rejected += 1
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable\n")
        return self._check_request(conn, request)

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        return None

    def _unauthorized(self, conn: ServerConnection) -> Response:
        self.rejected += 1
        return conn.respond(HTTPStatus.UNAUTHORIZED, "bad key\n")

    async def _handler(self, ws: ServerConnection) -> None:
        index = next(self._ids)
        conn = _Conn(ws, index, self.script, self.input_rate)
        self._conns[index] = conn
        self.connections += 1
        self._changed.set()
        try:
            await self._on_open(conn)
            async for raw in ws:
                try:
                    msg = json.loads(raw)
                except ValueError:
                    await self._send_error(conn, "invalid JSON", "invalid_json")
                    continue
                if not isinstance(msg, dict):
                    continue
                self._record(msg)
                await self._on_message(conn, msg)
        except ConnectionClosed:
            pass
        finally:
            self._stop_response(conn)
            for task in list(conn.tasks):
                task.cancel()
            self._conns.pop(index, None)
            self._changed.set()

    async def _send(self, conn: _Conn, obj: dict[str, Any]) -> None:
        self.sent.append(obj)
        await self._send_text(conn, json.dumps(obj))

    async def _send_text(self, conn: _Conn, text: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await conn.ws.send(text.encode() if self.binary_frames else text)

    def _spawn(self, conn: _Conn, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        conn.tasks.add(task)
        task.add_done_callback(conn.tasks.discard)
        return task

    def _start_response(self, conn: _Conn, response: FakeResponse) -> None:
        self._stop_response(conn)
        # The vendor considers the agent speaking until its audio would have played.
        loop = asyncio.get_running_loop()
        conn.state["speaking_until"] = loop.time() + len(response.audio) / 8000.0
        conn.response = self._spawn(conn, self._respond(conn, response))

    def _interrupt_speaking(self, conn: _Conn) -> bool:
        """Stop the response; True when the agent was generating or still speaking."""
        generating = self._stop_response(conn)
        speaking = asyncio.get_running_loop().time() < conn.state.get("speaking_until", 0.0)
        conn.state["speaking_until"] = 0.0
        return generating or speaking

    def _stop_response(self, conn: _Conn) -> bool:
        task = conn.response
        conn.response = None
        if task is not None and not task.done():
            task.cancel()
            return True
        return False

    @property
    def responding(self) -> bool:
        """True while some connection is sending a response."""
        return any(c.response is not None and not c.response.done() for c in self._conns.values())

    def _next_reply(self, conn: _Conn) -> FakeResponse | None:
        replies = self.script.replies
        if not replies:
            return None
        reply = replies[min(conn.turns, len(replies) - 1)]
        conn.turns += 1
        return reply

    async def _feed_vad(self, conn: _Conn, pcm: np.ndarray) -> None:
        for edge in conn.vad.feed(pcm):
            if edge == "start":
                await self._on_speech_start(conn)
            else:
                await self._on_speech_stop(conn)

    def _chunks(self, audio: bytes) -> list[bytes]:
        step = max(8, self.script.chunk_ms * 8)
        return [audio[i : i + step] for i in range(0, len(audio), step)]

    async def _pace(self) -> None:
        await asyncio.sleep(self.script.pace_s)

    # ------------------------------------------------------------------ vendor hooks

    async def _on_open(self, conn: _Conn) -> None:
        return

    async def _on_message(self, conn: _Conn, msg: dict[str, Any]) -> None:
        return

    async def _on_speech_start(self, conn: _Conn) -> None:
        return

    async def _on_speech_stop(self, conn: _Conn) -> None:
        return

    async def _respond(self, conn: _Conn, response: FakeResponse) -> None:
        return

    async def _send_error(self, conn: _Conn, message: str, code: str) -> None:
        return


def _uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
