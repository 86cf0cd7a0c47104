"""Fake ElevenLabs servers on 127.0.0.1 that speak the real wire protocols.

* :class:`FakeScribeServer`: the Scribe v2 realtime websocket
  (``/v1/speech-to-text/realtime``). It answers ``session_started``, collects the
  ``input_audio_chunk`` audio of each connection and follows a script: commit a transcript
  once a segment holds N bytes (or a given piece of audio), send partials, drop the socket,
  send any vendor error, refuse handshakes.
* :class:`FakeElevenLabsTts`: ``POST /v1/text-to-speech/{voice_id}`` (what the SDK's
  ``text_to_speech.convert`` sends) and ``…/{voice_id}/stream`` (``.stream``) over HTTP/1.1:
  ``xi-api-key`` header, ``output_format`` query, JSON body with ``text``; it answers with
  chunked μ-law audio (keep-alive, so a reused client is exercised). Only ``ulaw_8000`` is
  served. It can answer with an error status, cut the stream mid-way or stall.

Both run in the caller's event loop (``async with``) or in a thread of their own
(``with``), and record what they received for assertions.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import struct
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from voice_runtime.logutil import redacting_ws_logger
from voice_runtime.testing._serve import FakeService, bind_free_socket, close_server, port_of
from voice_runtime.testing._wait import wait_on_change

logger = logging.getLogger(__name__)

__all__ = [
    "FakeElevenLabsTts",
    "FakeScribeServer",
    "ScribeConnection",
    "ScribePlan",
    "ScribeUtterance",
    "TtsRequest",
]


# ---------------------------------------------------------------------- Scribe realtime


@dataclass
class ScribeUtterance:
    """A transcript the fake commits once the current segment has enough audio.

    With ``audio`` set, the segment must contain exactly those bytes (so audio lost on the
    way means no transcript); otherwise ``after_bytes`` of any audio are enough. A partial
    with the first half of the words is sent at ``partial_at`` of the way (None: never).
    """

    text: str
    after_bytes: int = 8000
    audio: bytes | None = None
    partial_at: float | None = 0.5


@dataclass
class ScribePlan:
    """What one connection does, by connection index."""

    refuse_status: int | None = None  # answer the handshake with this HTTP status
    drop_after_bytes: int | None = None  # abort the TCP connection after this much audio
    error: str | None = None  # send an error of this message_type …
    error_after_bytes: int = 0  # … once this much audio arrived on the connection
    close_after_error: bool = True
    close_code: int = 1011


@dataclass(eq=False)
class ScribeConnection:
    """What the fake saw on one websocket connection."""

    index: int
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    audio: bytearray = field(default_factory=bytearray)
    messages: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False
    ws: Any = field(default=None, repr=False)

    def param(self, name: str) -> str | None:
        """First value of a query parameter."""
        values = self.query.get(name)
        return values[0] if values else None


class FakeScribeServer(FakeService):
    """A local Scribe realtime websocket server driven by a script (see the module doc)."""

    def __init__(
        self,
        utterances: list[ScribeUtterance] | None = None,
        *,
        plans: list[ScribePlan] | None = None,
        default_plan: ScribePlan | None = None,
        api_key: str | None = None,
    ) -> None:
        super().__init__()
        self.utterances: list[ScribeUtterance] = list(utterances or [])
        self.plans: list[ScribePlan] = list(plans or [])
        self.default_plan = default_plan or ScribePlan()
        self.api_key = api_key
        self.connections: list[ScribeConnection] = []
        self.handshakes = 0  # upgrade requests, refused ones included
        self.refused = 0
        self.committed: list[str] = []
        self._server: Any = None
        self._changed = asyncio.Event()

    def plan_for(self, index: int) -> ScribePlan:
        """The plan of connection ``index`` (0-based, counting every handshake)."""
        return self.plans[index] if index < len(self.plans) else self.default_plan

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT``."""
        return f"ws://{self.host}:{self.port}"

    @property
    def current(self) -> ScribeConnection | None:
        """The newest open connection."""
        for conn in reversed(self.connections):
            if not conn.closed:
                return conn
        return None

    async def _start(self) -> None:
        from websockets.asyncio.server import serve

        self._changed = asyncio.Event()
        sock = bind_free_socket(self.host)
        self.port = port_of(sock)
        self._server = await serve(
            self._handler,
            sock=sock,
            process_request=self._process_request,
            max_size=2**22,
            logger=redacting_ws_logger("websockets.server"),
        )

    async def _stop(self) -> None:
        if self._server is not None:
            await close_server(self._server)
            self._server = None

    def _process_request(self, connection: Any, request: Any) -> Any:
        index = self.handshakes
        self.handshakes += 1
        self._notify()
        if not request.path.startswith("/v1/speech-to-text/realtime"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        status = self.plan_for(index).refuse_status
        if status is not None:
            self.refused += 1
            return connection.respond(HTTPStatus(status), "refused by the test script\n")
        connection.fake_index = index
        return None

    async def _handler(self, ws: Any) -> None:
        request = ws.request
        parsed = urllib.parse.urlsplit(request.path)
        conn = ScribeConnection(
            index=getattr(ws, "fake_index", len(self.connections)),
            path=parsed.path,
            query=urllib.parse.parse_qs(parsed.query),
            headers={k.lower(): v for k, v in request.headers.raw_items()},
            ws=ws,
        )
        self.connections.append(conn)
        self._notify()
        try:
            if self.api_key is not None and conn.headers.get("xi-api-key") != self.api_key:
                await self._send(conn, {"message_type": "auth_error", "error": "invalid api key"})
                await ws.close(1008, "auth")
                return
            await self._send(
                conn,
                {
                    "message_type": "session_started",
                    "session_id": uuid.uuid4().hex,
                    "config": {
                        "sample_rate": 8000,
                        "audio_format": conn.param("audio_format"),
                        "language_code": conn.param("language_code"),
                        "commit_strategy": conn.param("commit_strategy"),
                        "model_id": conn.param("model_id"),
                    },
                },
            )
            await self._serve(conn, self.plan_for(conn.index))
        except Exception as exc:
            # Closed sockets end here; anything else is a bug in the fake worth seeing.
            from websockets.exceptions import ConnectionClosed

            if not isinstance(exc, ConnectionClosed):
                logger.exception("fake Scribe handler failed")
        finally:
            conn.closed = True
            self._notify()

    async def _serve(self, conn: ScribeConnection, plan: ScribePlan) -> None:
        segment = bytearray()
        partial_sent = False
        error_sent = False
        async for raw in conn.ws:
            message = json.loads(raw)
            conn.messages.append(message)
            if message.get("message_type") != "input_audio_chunk":
                continue
            audio = base64.b64decode(message.get("audio_base_64") or "")
            conn.audio.extend(audio)
            segment.extend(audio)
            self._notify()
            if plan.drop_after_bytes is not None and len(conn.audio) >= plan.drop_after_bytes:
                conn.ws.transport.abort()  # no close frame: a dropped socket
                return
            if plan.error and not error_sent and len(conn.audio) >= plan.error_after_bytes:
                error_sent = True
                await self._send(conn, {"message_type": plan.error, "error": "scripted failure"})
                if plan.close_after_error:
                    await conn.ws.close(plan.close_code, plan.error)
                    return
            if message.get("commit"):
                text = self.utterances.pop(0).text if self.utterances else ""
                await self._commit(conn, text)
                segment.clear()
                partial_sent = False
                continue
            if not self.utterances:
                continue
            utt = self.utterances[0]
            if utt.audio is not None:
                done = bytes(utt.audio) in segment
                progress = 1.0 if done else 0.0
            else:
                done = len(segment) >= utt.after_bytes
                progress = len(segment) / max(1, utt.after_bytes)
            if not partial_sent and utt.partial_at is not None and progress >= utt.partial_at:
                partial_sent = True
                words = utt.text.split()
                half = " ".join(words[: max(1, len(words) // 2)])
                await self._send(conn, {"message_type": "partial_transcript", "text": half})
            if done:
                self.utterances.pop(0)
                await self._commit(conn, utt.text)
                segment.clear()
                partial_sent = False

    async def _commit(self, conn: ScribeConnection, text: str) -> None:
        self.committed.append(text)
        await self._send(conn, {"message_type": "committed_transcript", "text": text})

    @staticmethod
    async def _send(conn: ScribeConnection, message: dict[str, Any]) -> None:
        conn.sent.append(message)
        await conn.ws.send(json.dumps(message))

    def _notify(self) -> None:
        self._changed.set()

    # ------------------------------------------------------------------ test controls

    async def send(self, message: dict[str, Any]) -> None:
        """Send any message to the newest open connection (server loop only)."""
        conn = self.current
        if conn is None:
            raise RuntimeError("no open Scribe connection")
        await self._send(conn, message)

    async def commit_now(self, text: str) -> None:
        """Commit ``text`` on the newest open connection at once (server loop only)."""
        conn = self.current
        if conn is None:
            raise RuntimeError("no open Scribe connection")
        await self._commit(conn, text)

    async def send_partial(self, text: str) -> None:
        """Send a partial transcript to the newest open connection (server loop only)."""
        await self.send({"message_type": "partial_transcript", "text": text})

    async def drop(self) -> None:
        """Abort the newest open connection without a close frame (server loop only)."""
        conn = self.current
        if conn is not None:
            conn.ws.transport.abort()

    # The wait helpers take a timeout like CallerSimulator's, hence the ASYNC109 waivers.
    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> bool:
        """Wait on the server loop until ``predicate()`` holds; False on timeout."""
        return await wait_on_change(self._changed, predicate, timeout)

    async def wait_for_connections(self, n: int, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Wait until ``n`` websocket connections were accepted."""
        return await self.wait_until(lambda: len(self.connections) >= n, timeout)

    async def wait_for_audio(self, nbytes: int, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """Wait until the newest connection received ``nbytes`` of audio."""
        return await self.wait_until(
            lambda: bool(self.connections) and len(self.connections[-1].audio) >= nbytes, timeout
        )


# ---------------------------------------------------------------------- TTS over HTTP


@dataclass
class TtsRequest:
    """One request the fake TTS server received."""

    method: str
    path: str
    voice_id: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: dict[str, Any]


def _ulaw_wav_header(data_size: int) -> bytes:
    """A WAV header for 8 kHz mono μ-law (format 7) with a LIST chunk before the data."""
    fmt = struct.pack("<HHIIHHH", 7, 1, 8000, 8000, 1, 8, 0)
    info = b"INFOISFT\x06\x00\x00\x00fake\x00\x00"
    chunks = (
        b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"LIST"
        + struct.pack("<I", len(info))
        + info
        + b"data"
        + struct.pack("<I", data_size)
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunks) + data_size) + b"WAVE" + chunks


def _default_audio(text: str) -> bytes:
    from voice_runtime.audio import tone_ulaw

    return tone_ulaw(330.0, max(200.0, 60.0 * len(text)), level_dbfs=-22.0)


class FakeElevenLabsTts(FakeService):
    """A local ElevenLabs TTS endpoint streaming chunked μ-law (see the module doc).

    ``audio_for(text)`` makes the audio (default: a soft tone of about 60 ms per
    character). Faults: ``fail_status`` answers every request with that HTTP error;
    ``fail_after_bytes`` aborts the connection mid-stream; ``stall_after_bytes`` stops
    sending and keeps the connection open.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        audio_for: Callable[[str], bytes] | None = None,
        chunk_bytes: int = 800,
        chunk_interval_s: float = 0.0,
        first_chunk_delay_s: float = 0.0,
        fail_status: int | None = None,
        fail_after_bytes: int | None = None,
        stall_after_bytes: int | None = None,
        riff_header: bool = False,
    ) -> None:
        super().__init__()
        self.api_key = api_key
        self.audio_for = audio_for or _default_audio
        self.chunk_bytes = chunk_bytes
        self.chunk_interval_s = chunk_interval_s
        self.first_chunk_delay_s = first_chunk_delay_s
        self.fail_status = fail_status
        self.fail_after_bytes = fail_after_bytes
        self.stall_after_bytes = stall_after_bytes
        self.riff_header = riff_header
        self.requests: list[TtsRequest] = []
        self.connections_opened = 0
        self.audio_sent: list[bytes] = []  # full audio of each answered request
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self._closing = asyncio.Event()

    async def _start(self) -> None:
        self._closing = asyncio.Event()
        sock = bind_free_socket(self.host)
        self.port = port_of(sock)
        self._server = await asyncio.start_server(self._on_connection, sock=sock)

    async def _stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        self._closing.set()
        for writer in list(self._writers):
            writer.transport.abort()
        # Handlers end on their own once their sockets are gone; cancelling them instead
        # makes asyncio's stream callback log the cancellation on Python 3.11.
        handlers = set(self._handlers)
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=2.0)
            for task in late:
                task.cancel()
        if server is not None:
            await close_server(server)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.connections_opened += 1
        try:
            while True:
                request = await self._read_request(reader)
                if request is None:
                    return
                if not await self._respond(request, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            self._handlers.discard(task)
            writer.transport.abort()

    async def _read_request(self, reader: asyncio.StreamReader) -> TtsRequest | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        raw = await reader.readexactly(length) if length else b""
        parsed = urllib.parse.urlsplit(target)
        parts = parsed.path.strip("/").split("/")
        voice_id = parts[2] if len(parts) >= 3 else ""
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {"_raw": raw.decode("latin-1")}
        request = TtsRequest(
            method, parsed.path, voice_id, urllib.parse.parse_qs(parsed.query), headers, body
        )
        self.requests.append(request)
        return request

    async def _respond(self, request: TtsRequest, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        parts = request.path.strip("/").split("/")
        routed = parts[:2] == ["v1", "text-to-speech"] and (
            len(parts) == 3 or (len(parts) == 4 and parts[3] == "stream")
        )
        if request.method != "POST" or not routed or not parts[2]:
            await self._error(writer, 404, "not_found", "no such route")
            return True
        if self.api_key is not None and request.headers.get("xi-api-key") != self.api_key:
            await self._error(writer, 401, "invalid_api_key", "invalid api key")
            return True
        if request.query.get("output_format", ["mp3_44100_128"]) != ["ulaw_8000"]:
            # The real default is MP3; this fake only makes μ-law.
            await self._error(writer, 400, "invalid_output_format", "only ulaw_8000 is served")
            return True
        text = request.body.get("text")
        if not isinstance(text, str) or not text:
            await self._error(writer, 422, "invalid_request", "body needs 'text'")
            return True
        if self.fail_status is not None:
            await self._error(writer, self.fail_status, "scripted_failure", "scripted failure")
            return True
        audio = self.audio_for(text)
        self.audio_sent.append(audio)
        payload = audio
        if self.riff_header:
            payload = _ulaw_wav_header(len(audio)) + audio
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: audio/basic\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n"
            b"request-id: " + str(next(self._ids)).encode() + b"\r\n\r\n"
        )
        await writer.drain()
        if self.first_chunk_delay_s:
            await asyncio.sleep(self.first_chunk_delay_s)
        sent = 0
        for i in range(0, len(payload), self.chunk_bytes):
            if self.fail_after_bytes is not None and sent >= self.fail_after_bytes:
                writer.transport.abort()  # no final chunk: the client sees a broken stream
                return False
            if self.stall_after_bytes is not None and sent >= self.stall_after_bytes:
                await self._closing.wait()  # hold the connection open until stopped
                return False
            chunk = payload[i : i + self.chunk_bytes]
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)
            if self.chunk_interval_s:
                await asyncio.sleep(self.chunk_interval_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    @staticmethod
    async def _error(writer: asyncio.StreamWriter, status: int, code: str, message: str) -> None:
        body = json.dumps({"detail": {"status": code, "message": message}}).encode()
        reason = HTTPStatus(status).phrase.encode()
        writer.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        await writer.drain()
