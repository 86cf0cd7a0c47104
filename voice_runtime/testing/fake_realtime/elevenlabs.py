"""Fake ElevenLabs Agents conversation websocket (plus the signed-URL endpoint)."""

from __future__ import annotations

import base64
import json
import uuid
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from voice_runtime.audio import ulaw_decode
from voice_runtime.testing.fake_realtime.base import (
    FakeRealtimeServer,
    FakeResponse,
    FakeScript,
    _Conn,
    _uid,
)


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
