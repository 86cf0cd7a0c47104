"""Fake xAI Grok voice agent: the OpenAI events with xAI's session shape and pings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from voice_runtime.testing.fake_realtime.base import _Conn, _uid
from voice_runtime.testing.fake_realtime.openai import FakeOpenAIRealtime


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
