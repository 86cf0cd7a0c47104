"""Fake Gemini Live (BidiGenerateContent: JSON in binary frames, PCM16 in and out)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from voice_runtime.audio import resample, ulaw_decode
from voice_runtime.testing.fake_realtime.base import (
    FakeRealtimeServer,
    FakeResponse,
    FakeScript,
    _Conn,
    _uid,
)


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
