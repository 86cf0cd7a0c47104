"""Local fake servers for the realtime vendors, over real websockets on 127.0.0.1.

Each fake speaks one vendor's wire protocol closely enough for the real client code to run
against it unchanged (pass the fake's :attr:`~FakeRealtimeServer.base_url` as
``AgentOptions.base_url``):

* :class:`FakeOpenAIRealtime` — OpenAI Realtime GA events; refuses beta-shaped sessions;
  validates ``conversation.item.truncate`` against the audio it sent;
* :class:`FakeXaiRealtime` — the same events with xAI's session shape and server pings;
* :class:`FakeGeminiLive` — ``setup``/``setupComplete``, PCM16 16 kHz in, 24 kHz out, JSON
  in binary frames;
* :class:`FakeElevenLabsAgent` — ``conversation_initiation_*``, ``ulaw_8000``, ping/pong,
  interruption event ids, client tools, and the signed-URL HTTP endpoint.

They are scriptable with a :class:`FakeScript`: a greeting, replies per caller turn, a tool
call and the reply after its result, usage figures. Caller speech is detected by energy
(or forced with :meth:`~FakeRealtimeServer.trigger_speech_started`). Every client message is
recorded (:attr:`~FakeRealtimeServer.received`), so tests can assert on, say, the
``audio_end_ms`` of a truncate (the valid ones are in ``truncated`` as ``(item_id,
audio_end_ms)``). :meth:`~FakeRealtimeServer.send_raw` sends any message as is, wrong field
types included. :meth:`~FakeRealtimeServer.drop` kills the sockets without a
close frame; ``refuse_connections`` makes the handshake fail with HTTP 503.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from voice_runtime.audio import resample, rms_dbfs, ulaw_decode
from voice_runtime.testing._wait import wait_on_change

logger = logging.getLogger(__name__)

__all__ = [
    "FakeCall",
    "FakeElevenLabsAgent",
    "FakeGeminiLive",
    "FakeOpenAIRealtime",
    "FakeRealtimeServer",
    "FakeResponse",
    "FakeScript",
    "FakeXaiRealtime",
    "bridged_call",
    "pattern_audio",
    "serve_call",
    "tone_response",
]


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


def _usage_openai(usage: Mapping[str, int] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    ia, it = usage.get("input_audio", 0), usage.get("input_text", 0)
    oa, ot = usage.get("output_audio", 0), usage.get("output_text", 0)
    return {
        "total_tokens": ia + it + oa + ot,
        "input_tokens": ia + it,
        "output_tokens": oa + ot,
        "input_token_details": {
            "text_tokens": it,
            "audio_tokens": ia,
            "cached_tokens": usage.get("cached", 0),
        },
        "output_token_details": {"text_tokens": ot, "audio_tokens": oa},
    }


def _usage_gemini(usage: Mapping[str, int] | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    ia, it = usage.get("input_audio", 0), usage.get("input_text", 0)
    oa, ot = usage.get("output_audio", 0), usage.get("output_text", 0)
    return {
        "promptTokenCount": ia + it,
        "responseTokenCount": oa + ot,
        "totalTokenCount": ia + it + oa + ot,
        "cachedContentTokenCount": usage.get("cached", 0),
        "promptTokensDetails": [
            {"modality": "AUDIO", "tokenCount": ia},
            {"modality": "TEXT", "tokenCount": it},
        ],
        "responseTokensDetails": [
            {"modality": "AUDIO", "tokenCount": oa},
            {"modality": "TEXT", "tokenCount": ot},
        ],
    }


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


class FakeRealtimeServer:
    """Base of the fakes: socket handling, recording, VAD, scripting, failure injection."""

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

    async def start(self) -> FakeRealtimeServer:
        """Listen on a free port of ``host``."""
        self._server = await serve(
            self._handler,
            self.host,
            0,
            process_request=self._process_request,
            compression=None,
            max_size=16 * 1024 * 1024,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        return self

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        for conn in list(self._conns.values()):
            self._stop_response(conn)
            for task in list(conn.tasks):
                task.cancel()
        server = self._server
        self._server = None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> FakeRealtimeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

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


# ---------------------------------------------------------------------------- OpenAI


class FakeOpenAIRealtime(FakeRealtimeServer):
    """OpenAI Realtime (GA) at ``ws://host:port/v1/realtime?model=…``."""

    vendor = "openai"

    def __init__(self, script: FakeScript | None = None, **kwargs: Any) -> None:
        super().__init__(script, **kwargs)
        self.item_audio_ms: dict[str, float] = {}  # assistant item id -> audio ms sent
        self.truncated: list[tuple[str, int]] = []
        self.session_config: dict[str, Any] = {}

    @property
    def base_url(self) -> str:
        """``ws://host:port/v1`` (the client appends ``/realtime``)."""
        return f"{self.url}/v1"

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if not urlsplit(request.path).path.endswith("/realtime"):
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        expected = f"Bearer {self.api_key}"
        if self.api_key is not None and request.headers.get("Authorization") != expected:
            return self._unauthorized(conn)
        return None

    async def _on_open(self, conn: _Conn) -> None:
        conn.state["session_id"] = _uid("sess")
        await self._send(
            conn,
            {
                "type": "session.created",
                "event_id": _uid("event"),
                "session": {"id": conn.state["session_id"], "type": "realtime"},
            },
        )
        if self.script.greet_on_connect and self.script.greeting is not None:
            conn.greeted = True
            self._start_response(conn, self.script.greeting)

    def _validate_session(self, session: Mapping[str, Any]) -> str | None:
        """An error message when the session shape is not the GA one."""
        if session.get("type") != "realtime":
            return "session.type is required ('realtime')"
        for beta in ("input_audio_format", "output_audio_format", "modalities", "voice"):
            if beta in session:
                return f"unknown parameter: session.{beta}"
        return None

    def _session_settings(self, session: Mapping[str, Any]) -> tuple[Any, Any]:
        audio = session.get("audio") or {}
        td = (audio.get("input") or {}).get("turn_detection", "unset")
        transcription = (audio.get("input") or {}).get("transcription")
        return td, transcription

    async def _on_message(self, conn: _Conn, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "session.update":
            session = msg.get("session") or {}
            problem = self._validate_session(session)
            if problem is not None:
                await self._send_error(conn, problem, "invalid_request_error")
                return
            _merge(self.session_config, session)
            td, transcription = self._session_settings(self.session_config)
            if td != "unset":
                conn.state["turn_detection"] = td
            conn.state["transcription"] = transcription
            await self._send(
                conn,
                {
                    "type": "session.updated",
                    "event_id": _uid("event"),
                    "session": {"id": conn.state["session_id"], **self.session_config},
                },
            )
            await self._after_session_updated(conn)
        elif kind == "input_audio_buffer.append":
            audio = base64.b64decode(msg.get("audio") or "")
            self.caller_audio.extend(audio)
            conn.state["buffer_ms"] = conn.state.get("buffer_ms", 0.0) + len(audio) / 8.0
            if conn.state.get("turn_detection") is not None:
                await self._feed_vad(conn, ulaw_decode(audio))
        elif kind == "input_audio_buffer.commit":
            if conn.state.get("buffer_ms", 0.0) < 100.0:
                await self._send_error(conn, "buffer too small", "input_audio_buffer_commit_empty")
                return
            conn.state["buffer_ms"] = 0.0
            await self._send(
                conn,
                {"type": "input_audio_buffer.committed", "item_id": _uid("item")},
            )
        elif kind == "response.create":
            self._start_response(conn, self._pick_response(conn))
        elif kind == "response.cancel":
            if not await self._cancel(conn, "client_cancelled"):
                await self._send_error(conn, "no active response", "response_cancel_not_active")
        elif kind == "conversation.item.truncate":
            await self._truncate(conn, msg)
        elif kind == "conversation.item.create":
            item = msg.get("item") or {}
            if item.get("type") == "function_call_output":
                conn.state["tool_output"] = item
            item_id = item.get("id") or _uid("item")
            await self._send(
                conn, {"type": "conversation.item.added", "item": {**item, "id": item_id}}
            )
            await self._send(
                conn, {"type": "conversation.item.done", "item": {**item, "id": item_id}}
            )

    async def _after_session_updated(self, conn: _Conn) -> None:
        return

    def _pick_response(self, conn: _Conn) -> FakeResponse:
        if conn.state.pop("tool_output", None) is not None and self.script.after_tool:
            return self.script.after_tool
        if not conn.greeted and self.script.greeting is not None:
            conn.greeted = True
            return self.script.greeting
        return self._next_reply(conn) or FakeResponse(transcript="")

    async def _truncate(self, conn: _Conn, msg: dict[str, Any]) -> None:
        item_id = str(msg.get("item_id") or "")
        end = msg.get("audio_end_ms")
        if item_id not in self.item_audio_ms:
            await self._send_error(conn, f"item {item_id} not found", "item_not_found")
            return
        if not isinstance(end, int) or end < 0 or end > self.item_audio_ms[item_id] + 0.5:
            await self._send_error(
                conn, "audio_end_ms is greater than the audio duration", "invalid_value"
            )
            return
        self.truncated.append((item_id, end))
        await self._send(
            conn,
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": end,
            },
        )

    async def _on_speech_start(self, conn: _Conn) -> None:
        conn.state["user_item"] = _uid("item")
        await self._send(
            conn,
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": int(conn.vad.position_ms),
                "item_id": conn.state["user_item"],
            },
        )
        td = conn.state.get("turn_detection") or {}
        if td.get("interrupt_response", True):
            await self._cancel(conn, "turn_detected")

    async def _on_speech_stop(self, conn: _Conn) -> None:
        item_id = conn.state.get("user_item") or _uid("item")
        await self._send(
            conn,
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": int(conn.vad.position_ms),
                "item_id": item_id,
            },
        )
        await self._send(conn, {"type": "input_audio_buffer.committed", "item_id": item_id})
        conn.state["buffer_ms"] = 0.0
        user_item = {"id": item_id, "type": "message", "role": "user", "content": []}
        await self._send(conn, {"type": "conversation.item.added", "item": user_item})
        await self._user_transcript(conn, item_id)
        td = conn.state.get("turn_detection") or {}
        if td.get("create_response", True):
            reply = self._next_reply(conn)
            if reply is not None:
                self._start_response(conn, reply)

    async def _user_transcript(self, conn: _Conn, item_id: str) -> None:
        if conn.state.get("transcription") is None:
            return
        text = self.script.user_transcript
        await self._send(
            conn,
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": item_id,
                "content_index": 0,
                "delta": text,
            },
        )
        await self._send(
            conn,
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": text,
            },
        )

    async def _cancel(self, conn: _Conn, reason: str) -> bool:
        if not self._stop_response(conn):
            return False
        response_id = conn.state.get("response_id")
        await self._send(
            conn,
            {
                "type": "response.done",
                "response": {
                    "id": response_id,
                    "status": "cancelled",
                    "status_details": {"type": "cancelled", "reason": reason},
                    "output": [],
                },
            },
        )
        return True

    async def _respond(self, conn: _Conn, response: FakeResponse) -> None:
        response_id = _uid("resp")
        conn.state["response_id"] = response_id
        await self._send(
            conn,
            {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}},
        )
        output: list[dict[str, Any]] = []
        # A response may speak and then call a tool: a message item, then a function call.
        if response.audio or response.tool_call is None:
            item_id = _uid("item")
            self.item_audio_ms[item_id] = 0.0
            # The ids of the message's one audio part.
            part = {"response_id": response_id, "item_id": item_id, "output_index": 0}
            part["content_index"] = 0
            message = {"id": item_id, "type": "message", "role": "assistant", "content": []}
            await self._send(
                conn,
                {"type": "response.output_item.added", "response_id": response_id, "item": message},
            )
            await self._send(conn, {"type": "conversation.item.added", "item": message})
            for chunk in self._chunks(response.audio):
                audio = {"type": "response.output_audio.delta", **part}
                await self._send(conn, {**audio, "delta": base64.b64encode(chunk).decode("ascii")})
                self.item_audio_ms[item_id] += len(chunk) / 8.0
                await self._pace()
            if response.transcript:
                transcript = {"type": "response.output_audio_transcript.delta", **part}
                await self._send(conn, {**transcript, "delta": response.transcript})
            await self._send(conn, {"type": "response.output_audio.done", **part})
            done_text = {"type": "response.output_audio_transcript.done", **part}
            await self._send(conn, {**done_text, "transcript": response.transcript})
            await self._send(
                conn,
                {"type": "response.output_item.done", "response_id": response_id, "item": message},
            )
            output.append(message)
        if response.tool_call is not None:
            name, args = response.tool_call
            call_id = _uid("call")
            index = len(output)
            item = {
                "id": _uid("item"),
                "type": "function_call",
                "name": name,
                "call_id": call_id,
                "arguments": json.dumps(dict(args)),
            }
            await self._send(
                conn,
                {
                    "type": "response.output_item.added",
                    "response_id": response_id,
                    "output_index": index,
                    "item": {**item, "arguments": ""},
                },
            )
            await self._send(
                conn,
                {
                    "type": "response.function_call_arguments.done",
                    "response_id": response_id,
                    "item_id": item["id"],
                    "output_index": index,
                    "call_id": call_id,
                    "name": name,
                    "arguments": item["arguments"],
                },
            )
            output.append(item)
        done: dict[str, Any] = {"id": response_id, "status": "completed", "output": output}
        usage = _usage_openai(response.usage)
        if usage is not None:
            done["usage"] = usage
            self.usage_sent.append(dict(response.usage or {}))
        conn.response = None  # finished: nothing left to cancel
        await self._send(conn, {"type": "response.done", "response": done})

    async def _send_error(self, conn: _Conn, message: str, code: str) -> None:
        await self._send(
            conn,
            {
                "type": "error",
                "event_id": _uid("event"),
                "error": {"type": "invalid_request_error", "code": code, "message": message},
            },
        )


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


# ---------------------------------------------------------------------------- xAI


class FakeXaiRealtime(FakeOpenAIRealtime):
    """xAI Grok voice agent at ``ws://host:port/v1/realtime`` (xAI session shape, pings)."""

    vendor = "xai"

    def _validate_session(self, session: Mapping[str, Any]) -> str | None:
        audio = session.get("audio") or {}
        for leg in ("input", "output"):
            if "voice" in (audio.get(leg) or {}) or "turn_detection" in (audio.get(leg) or {}):
                return f"unknown parameter: session.audio.{leg} takes format only"
        return None

    def _session_settings(self, session: Mapping[str, Any]) -> tuple[Any, Any]:
        td = session.get("turn_detection", "unset")
        return td, {"model": "grok-transcribe"}

    async def _after_session_updated(self, conn: _Conn) -> None:
        await self._send(conn, {"type": "ping", "event_id": _uid("event")})

    async def _user_transcript(self, conn: _Conn, item_id: str) -> None:
        text = self.script.user_transcript
        await self._send(
            conn,
            {
                "type": "conversation.item.input_audio_transcription.updated",
                "item_id": item_id,
                "transcript": text,
            },
        )
        await self._send(
            conn,
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "transcript": text,
            },
        )


# ---------------------------------------------------------------------------- Gemini

GEMINI_PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"


class FakeGeminiLive(FakeRealtimeServer):
    """Gemini Live BidiGenerateContent: JSON in binary frames, PCM16 16 kHz in, 24 kHz out."""

    vendor = "gemini"
    input_rate = 16000

    def __init__(self, script: FakeScript | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("binary_frames", True)
        super().__init__(script, **kwargs)
        self.setup: dict[str, Any] = {}
        self.tool_responses: list[dict[str, Any]] = []
        self.output_pcm24k = bytearray()

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        if parts.path != GEMINI_PATH:
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self.api_key is not None:
            key = request.headers.get("x-goog-api-key") or parse_qs(parts.query).get("key", [""])[0]
            if key != self.api_key:
                return self._unauthorized(conn)
        return None

    async def _on_message(self, conn: _Conn, msg: dict[str, Any]) -> None:
        if not conn.state.get("setup_done"):
            setup = msg.get("setup")
            if not isinstance(setup, dict) or not setup.get("model"):
                await conn.ws.close(1007, "first message must be setup with a model")
                return
            self.setup = setup
            conn.state["setup_done"] = True
            detection = (setup.get("realtimeInputConfig") or {}).get("automaticActivityDetection")
            conn.state["auto_vad"] = not (detection or {}).get("disabled", False)
            await self._send(conn, {"setupComplete": {}})
            if self.script.greet_on_connect and self.script.greeting is not None:
                conn.greeted = True
                self._start_response(conn, self.script.greeting)
            return
        realtime = msg.get("realtimeInput") or msg.get("realtime_input")
        if isinstance(realtime, dict):
            await self._realtime_input(conn, realtime)
        content = msg.get("clientContent") or msg.get("client_content")
        if isinstance(content, dict) and content.get("turnComplete"):
            if not conn.greeted and self.script.greeting is not None:
                conn.greeted = True
                self._start_response(conn, self.script.greeting)
            else:
                reply = self._next_reply(conn)
                if reply is not None:
                    self._start_response(conn, reply)
        tool = msg.get("toolResponse") or msg.get("tool_response")
        if isinstance(tool, dict):
            self.tool_responses.extend(tool.get("functionResponses") or ())
            if self.script.after_tool is not None:
                self._start_response(conn, self.script.after_tool)

    async def _realtime_input(self, conn: _Conn, realtime: dict[str, Any]) -> None:
        audio = realtime.get("audio")
        if isinstance(audio, dict):
            mime = str(audio.get("mimeType") or "")
            if mime != "audio/pcm;rate=16000":
                await conn.ws.close(1007, f"unsupported audio mimeType {mime}")
                return
            pcm = base64.b64decode(audio.get("data") or "")
            self.caller_audio.extend(pcm)
            samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
            if conn.state.get("auto_vad", True):
                await self._feed_vad(conn, samples)
        if "activityStart" in realtime:
            await self._on_speech_start(conn)
        if "activityEnd" in realtime:
            await self._on_speech_stop(conn)

    async def _on_speech_start(self, conn: _Conn) -> None:
        if self._interrupt_speaking(conn):
            await self._send(conn, {"serverContent": {"interrupted": True}})

    async def _on_speech_stop(self, conn: _Conn) -> None:
        await self._send(
            conn, {"serverContent": {"inputTranscription": {"text": self.script.user_transcript}}}
        )
        reply = self._next_reply(conn)
        if reply is not None:
            self._start_response(conn, reply)

    async def _respond(self, conn: _Conn, response: FakeResponse) -> None:
        if response.tool_call is not None:
            name, args = response.tool_call
            await self._send(
                conn,
                {
                    "toolCall": {
                        "functionCalls": [{"id": _uid("fc"), "name": name, "args": dict(args)}]
                    }
                },
            )
            conn.response = None
            return
        for chunk in self._chunks(response.audio):
            pcm24 = resample(ulaw_decode(chunk), 8000, 24000).tobytes()
            self.output_pcm24k.extend(pcm24)
            await self._send(
                conn,
                {
                    "serverContent": {
                        "modelTurn": {
                            "parts": [
                                {
                                    "inlineData": {
                                        "mimeType": "audio/pcm;rate=24000",
                                        "data": base64.b64encode(pcm24).decode("ascii"),
                                    }
                                }
                            ]
                        }
                    }
                },
            )
            await self._pace()
        if response.transcript:
            await self._send(
                conn, {"serverContent": {"outputTranscription": {"text": response.transcript}}}
            )
        await self._send(conn, {"serverContent": {"generationComplete": True}})
        final: dict[str, Any] = {"serverContent": {"turnComplete": True}}
        usage = _usage_gemini(response.usage)
        if usage is not None:
            final["usageMetadata"] = usage
            self.usage_sent.append(dict(response.usage or {}))
        conn.response = None
        await self._send(conn, final)

    async def _send_error(self, conn: _Conn, message: str, code: str) -> None:
        # Gemini reports errors by closing the socket with a reason.
        with contextlib.suppress(Exception):
            await conn.ws.close(1011, f"{code}: {message}"[:120])


# ---------------------------------------------------------------------------- ElevenLabs


class FakeElevenLabsAgent(FakeRealtimeServer):
    """ElevenLabs Agents conversation websocket, plus ``get-signed-url`` over HTTP."""

    vendor = "elevenlabs"

    def __init__(
        self, script: FakeScript | None = None, *, agent_id: str = "agent_test", **kwargs: Any
    ) -> None:
        super().__init__(script, **kwargs)
        self.agent_id = agent_id
        self.signatures: set[str] = set()
        self.pongs: list[Any] = []
        self.pings_sent: list[int] = []
        self.tool_results: list[dict[str, Any]] = []
        self.initiation: dict[str, Any] = {}
        self.stale_audio_ids: list[int] = []

    def _check_request(self, conn: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = parse_qs(parts.query)
        if parts.path == "/v1/convai/conversation/get-signed-url":
            if self.api_key is not None and request.headers.get("xi-api-key") != self.api_key:
                return self._unauthorized(conn)
            if query.get("agent_id", [""])[0] != self.agent_id:
                return conn.respond(HTTPStatus.NOT_FOUND, "unknown agent\n")
            sig = uuid.uuid4().hex
            self.signatures.add(sig)
            signed = (
                f"{self.url}/v1/convai/conversation?agent_id={self.agent_id}"
                f"&conversation_signature={sig}"
            )
            return conn.respond(HTTPStatus.OK, json.dumps({"signed_url": signed}))
        if parts.path != "/v1/convai/conversation":
            return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if query.get("agent_id", [""])[0] != self.agent_id:
            return conn.respond(HTTPStatus.NOT_FOUND, "unknown agent\n")
        if self.api_key is not None:
            sig = query.get("conversation_signature", [""])[0]
            if sig not in self.signatures and request.headers.get("xi-api-key") != self.api_key:
                return self._unauthorized(conn)
        return None

    def _event_id(self, conn: _Conn) -> int:
        conn.state["event_id"] = conn.state.get("event_id", 0) + 1
        return int(conn.state["event_id"])

    async def _on_message(self, conn: _Conn, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if not conn.state.get("initiated"):
            if kind != "conversation_initiation_client_data":
                await conn.ws.close(1008, "expected conversation_initiation_client_data")
                return
            conn.state["initiated"] = True
            self.initiation = msg
            await self._send(
                conn,
                {
                    "type": "conversation_initiation_metadata",
                    "conversation_initiation_metadata_event": {
                        "conversation_id": _uid("conv"),
                        "agent_output_audio_format": self.script.output_audio_format,
                        "user_input_audio_format": self.script.input_audio_format,
                    },
                },
            )
            if self.script.ping_on_start:
                event_id = self._event_id(conn)
                self.pings_sent.append(event_id)
                await self._send(
                    conn, {"type": "ping", "ping_event": {"event_id": event_id, "ping_ms": None}}
                )
            if self.script.greeting is not None:
                conn.greeted = True
                self._start_response(conn, self.script.greeting)
            return
        if "user_audio_chunk" in msg:
            if "type" in msg:
                await self._send_error(conn, "user_audio_chunk takes no type", "bad_message")
            audio = base64.b64decode(msg.get("user_audio_chunk") or "")
            self.caller_audio.extend(audio)
            await self._feed_vad(conn, ulaw_decode(audio))
        elif kind == "pong":
            self.pongs.append(msg.get("event_id"))
        elif kind == "client_tool_result":
            self.tool_results.append(msg)
            if self.script.after_tool is not None:
                self._start_response(conn, self.script.after_tool)
        elif kind == "user_message":
            reply = self._next_reply(conn)
            if reply is not None:
                self._start_response(conn, reply)

    async def _on_speech_start(self, conn: _Conn) -> None:
        if self._interrupt_speaking(conn):
            last_audio = int(conn.state.get("last_audio_id", 0))
            await self._send(
                conn, {"type": "interruption", "interruption_event": {"event_id": last_audio}}
            )
            # Audio already in flight when the interruption was decided: the client must drop it.
            self.stale_audio_ids.append(last_audio)
            await self._send(
                conn,
                {
                    "type": "audio",
                    "audio_event": {
                        "audio_base_64": base64.b64encode(b"\x00" * 160).decode("ascii"),
                        "event_id": last_audio,
                    },
                },
            )

    async def _on_speech_stop(self, conn: _Conn) -> None:
        await self._send(
            conn,
            {
                "type": "user_transcript",
                "user_transcription_event": {"user_transcript": self.script.user_transcript},
            },
        )
        reply = self._next_reply(conn)
        if reply is not None:
            self._start_response(conn, reply)

    async def _respond(self, conn: _Conn, response: FakeResponse) -> None:
        if response.tool_call is not None:
            name, args = response.tool_call
            await self._send(
                conn,
                {
                    "type": "client_tool_call",
                    "client_tool_call": {
                        "tool_name": name,
                        "tool_call_id": _uid("tc"),
                        "parameters": dict(args),
                    },
                },
            )
            conn.response = None
            return
        if response.transcript:
            await self._send(
                conn,
                {
                    "type": "agent_response",
                    "agent_response_event": {"agent_response": response.transcript},
                },
            )
        for chunk in self._chunks(response.audio):
            event_id = self._event_id(conn)
            conn.state["last_audio_id"] = event_id
            await self._send(
                conn,
                {
                    "type": "audio",
                    "audio_event": {
                        "audio_base_64": base64.b64encode(chunk).decode("ascii"),
                        "event_id": event_id,
                    },
                },
            )
            await self._pace()
        conn.response = None

    async def _send_error(self, conn: _Conn, message: str, code: str) -> None:
        await self._send(conn, {"type": "error", "error_event": {"message": message, "code": code}})


def tone_response(
    ms: float,
    *,
    freq: float = 440.0,
    transcript: str = "",
    usage: Mapping[str, int] | None = None,
) -> FakeResponse:
    """A response whose audio is a recognisable tone of ``ms`` milliseconds."""
    from voice_runtime.audio import tone_ulaw

    return FakeResponse(audio=tone_ulaw(freq, ms, -12.0), transcript=transcript, usage=usage)


def pattern_audio(ms: float) -> bytes:
    """Loud μ-law audio with a non-repeating byte pattern (for byte-exact comparisons)."""
    n = int(ms * 8)
    t = np.arange(n, dtype=np.float64)
    wave = 8000.0 * np.sin(2 * math.pi * 330.0 * t / 8000.0) + 3000.0 * np.sin(t * 0.0173)
    from voice_runtime.audio import ulaw_encode

    return ulaw_encode(wave.astype(np.int16)).tobytes()


# ---------------------------------------------------------------------------- whole calls


@dataclass
class FakeCall:
    """A live call: the session, the caller simulator, and the bridge's outcome."""

    session: Any
    simulator: Any
    events: list[Any]
    transcripts: list[Any]
    task: asyncio.Task[Any] | None = None

    async def result(self, timeout: float = 10.0) -> Any:  # noqa: ASYNC109
        """Wait for what the on-connect coroutine returned (a BridgeResult for agents)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.task is None:
            if loop.time() >= deadline:
                raise TimeoutError("the call never connected")
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(asyncio.shield(self.task), max(0.0, deadline - loop.time()))

    def of(self, kind: type) -> list[Any]:
        """The recorded agent events of one type."""
        return [e for e in self.events if isinstance(e, kind)]


@contextlib.asynccontextmanager
async def serve_call(
    on_connect: Callable[[Any, FakeCall], Any],
    *,
    stream_options: Any = None,
    parameters: Mapping[str, str] | None = None,
) -> Any:
    """Serve one Twilio media stream on 127.0.0.1, run ``on_connect(session, call)`` when it
    starts, and connect a caller simulator to it.

    Yields a :class:`FakeCall`; on exit the caller hangs up and everything is torn down.
    """
    from fastapi import FastAPI

    from voice_runtime.session import VoiceSession
    from voice_runtime.testing.server import serve_in_loop
    from voice_runtime.testing.simulator import CallerSimulator
    from voice_runtime.transports.twilio_ws import register_voice_websocket

    session = VoiceSession()
    app = FastAPI()
    register_voice_websocket(app, session, options=stream_options)
    call = FakeCall(session, None, [], [])

    async def watch() -> None:
        await session.wait_for_ws_connect_async(30.0)
        result = on_connect(session, call)
        call.task = asyncio.ensure_future(result)

    watcher = asyncio.create_task(watch(), name="fake-call-connect")
    async with serve_in_loop(app) as srv:
        sim = CallerSimulator(srv.ws_url + "/voice", parameters=parameters)
        call.simulator = sim
        await sim.connect()
        try:
            yield call
        finally:
            await sim.hangup()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(watcher, 5.0)
            if call.task is not None:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(call.task, 10.0)
            session.signal_disconnected()


@contextlib.asynccontextmanager
async def bridged_call(
    agent: Any,
    *,
    stream_options: Any = None,
    parameters: Mapping[str, str] | None = None,
    **attach_kwargs: Any,
) -> Any:
    """A whole call with ``agent`` (an agent or a ``factory(session)``) bridged onto it.

    ``attach_kwargs`` go to :func:`~voice_runtime.realtime.attach_agent`; every agent event
    and transcript line is recorded on the yielded :class:`FakeCall`.
    """
    from voice_runtime.realtime.bridge import attach_agent

    def on_connect(session: Any, call: FakeCall) -> Any:
        real = agent(session) if callable(agent) and not hasattr(agent, "push_audio") else agent
        user_event = attach_kwargs.pop("on_event", None)
        user_transcript = attach_kwargs.pop("on_transcript", None)

        def on_event(event: Any) -> Any:
            call.events.append(event)
            return None if user_event is None else user_event(event)

        def on_transcript(line: Any) -> Any:
            call.transcripts.append(line)
            return None if user_transcript is None else user_transcript(line)

        return attach_agent(
            session, real, on_event=on_event, on_transcript=on_transcript, **attach_kwargs
        )

    async with serve_call(on_connect, stream_options=stream_options, parameters=parameters) as call:
        yield call
