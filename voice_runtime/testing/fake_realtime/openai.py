"""Fake OpenAI Realtime (GA events; refuses beta-shaped sessions)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from voice_runtime.audio import ulaw_decode
from voice_runtime.testing.fake_realtime.base import (
    FakeRealtimeServer,
    FakeResponse,
    FakeScript,
    _Conn,
    _merge,
    _uid,
)


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
        user_item: dict[str, Any] = {
            "id": item_id,
            "type": "message",
            "role": "user",
            "content": [],
        }
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
