"""Gemini Live (BidiGenerateContent) over its websocket, with our own client.

Gemini takes PCM16 at 16 kHz and speaks PCM16 at 24 kHz, so both directions go through the
streaming resampler: μ-law 8 kHz → PCM16 → 16 kHz on the way in; 24 kHz → 8 kHz → μ-law on
the way out. Both use the resampler's low-latency FIR path (the rates are integer ratios),
so every 20 ms chunk comes out at once with proper anti-alias filtering; libsoxr's streaming
engine would hold chunks back for ~100 ms, delaying turn detection, barge-in and the agent's
voice. ``input_quality``/``output_quality`` apply only to non-integer rates (libsoxr).

The server may send its JSON in binary frames; both kinds are read. There is no
truncation in this protocol: on ``interrupted`` the bridge only clears the call's audio.

Gemini's configuration is fixed once ``setupComplete`` arrives, so
:meth:`GeminiLiveAgent.update_instructions` adds the new instructions to the conversation as
context (a ``clientContent`` turn that does not ask for a response) rather than changing
the system instruction.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from voice_runtime.audio import StreamResampler, ulaw_decode, ulaw_encode
from voice_runtime.credentials import CREDENTIAL_VARIABLES, resolve_credential
from voice_runtime.logutil import clip
from voice_runtime.realtime._base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    MalformedMessage,
    WebSocketAgent,
    count_field,
    deep_merge,
    list_field,
    obj_field,
    str_field,
)
from voice_runtime.realtime.agent import AgentOptions
from voice_runtime.realtime.events import (
    AgentError,
    AssistantAudio,
    AssistantText,
    AssistantTurnEnd,
    ToolCall,
    ToolCallCancelled,
    Usage,
    UserSpeechStarted,
    UserTranscript,
)
from voice_runtime.urls import ws_base

logger = logging.getLogger(__name__)

DEFAULT_GEMINI_URL = "wss://generativelanguage.googleapis.com"
DEFAULT_GEMINI_MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"
INPUT_RATE = 16000
OUTPUT_RATE = 24000
_RATE_RE = re.compile(r"rate=(\d{1,9})")

__all__ = ["GeminiLiveAgent", "gemini_schema", "gemini_usage"]


def gemini_usage(meta: Mapping[str, Any] | None) -> Usage | None:
    """Normalise a ``usageMetadata`` object; None when there is none.

    Raises :class:`~voice_runtime.realtime._base.MalformedMessage` when a field has the
    wrong type.
    """
    if not meta:
        return None
    if not isinstance(meta, Mapping):
        raise MalformedMessage("usageMetadata")

    def by_modality(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in list_field(meta, key):
            if isinstance(d, Mapping):
                mod = str_field(d, "modality").upper()
                out[mod] = out.get(mod, 0) + count_field(d, "tokenCount", "usageMetadata")
        return out

    def count(key: str) -> int:
        return count_field(meta, key, "usageMetadata")

    prompt = by_modality("promptTokensDetails")
    response = by_modality("responseTokensDetails")
    key = "responseTokenCount" if meta.get("responseTokenCount") is not None else None
    output = count(key or "candidatesTokenCount")
    return Usage(
        input_tokens=count("promptTokenCount") + count("toolUsePromptTokenCount"),
        output_tokens=output + count("thoughtsTokenCount"),
        input_audio_tokens=prompt.get("AUDIO", 0),
        input_text_tokens=prompt.get("TEXT", 0),
        output_audio_tokens=response.get("AUDIO", 0),
        output_text_tokens=response.get("TEXT", 0),
        cached_input_tokens=count("cachedContentTokenCount"),
        provider="gemini",
    )


_SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "description",
        "nullable",
        "enum",
        "properties",
        "required",
        "items",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "anyOf",
        "propertyOrdering",
    }
)


def gemini_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON schema turned into Gemini's OpenAPI subset (upper-case types, known keys only)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key not in _SCHEMA_KEYS:
            continue
        if key == "type" and isinstance(value, str):
            out[key] = value.upper()
        elif key == "properties" and isinstance(value, Mapping):
            out[key] = {k: gemini_schema(v) for k, v in value.items() if isinstance(v, Mapping)}
        elif key == "items" and isinstance(value, Mapping):
            out[key] = gemini_schema(value)
        elif key == "anyOf" and isinstance(value, (list, tuple)):
            out[key] = [gemini_schema(v) for v in value if isinstance(v, Mapping)]
        elif key == "required":
            out[key] = list(value)
        else:
            out[key] = value
    return out


# Top-level server message keys (camelCase, snake_case), for counting bad messages by kind.
_MESSAGE_KEYS = (
    ("setupComplete", "setup_complete"),
    ("serverContent", "server_content"),
    ("toolCall", "tool_call"),
    ("toolCallCancellation", "tool_call_cancellation"),
    ("usageMetadata", "usage_metadata"),
    ("goAway", "go_away"),
)
_MIN_RATE, _MAX_RATE = 8000, 48000


@dataclass(frozen=True, slots=True)
class _Content:
    """A ``serverContent`` message, read and checked."""

    interrupted: bool
    user_text: str
    turn_present: bool
    parts: list[tuple[int, bytes] | str]  # (rate, PCM16) audio, or model text
    model_text: str
    complete: bool


def _parse_part(part: dict[str, Any]) -> tuple[int, bytes] | str | None:
    """A model-turn part: (rate, PCM16 bytes) for audio, the text, or None to skip it."""
    inline = obj_field(part, "inlineData", "inline_data")
    if inline:
        mime = str_field(inline, "mimeType", "mime_type")
        if not mime.startswith("audio/pcm"):
            return None
        data = str_field(inline, "data")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedMessage("inlineData.data", "bad_base64") from None
        match = _RATE_RE.search(mime)
        rate = int(match.group(1)) if match else OUTPUT_RATE
        if not _MIN_RATE <= rate <= _MAX_RATE:
            raise MalformedMessage("inlineData.mimeType", "bad_value")
        return rate, raw
    if part.get("text") and not part.get("thought"):
        return str_field(part, "text")
    return None


class GeminiLiveAgent(WebSocketAgent):
    """Gemini Live with automatic resampling (16 kHz in, 24 kHz out).

    Key: ``api_key`` or ``GEMINI_API_KEY`` / ``GOOGLE_API_KEY`` (sent as ``x-goog-api-key``).
    ``options.base_url`` overrides ``wss://generativelanguage.googleapis.com``.
    """

    provider: ClassVar[str] = "gemini"
    supports_truncate: ClassVar[bool] = False

    def __init__(
        self,
        options: AgentOptions | None = None,
        *,
        api_key: str | None = None,
        api_version: str = "v1beta",
        input_quality: str = "QQ",
        output_quality: str = "HQ",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        allow_insecure: bool = False,
    ) -> None:
        super().__init__(options, connect_timeout=connect_timeout, allow_insecure=allow_insecure)
        self._api_key = resolve_credential(
            api_key, CREDENTIAL_VARIABLES["gemini"], what="Gemini API key"
        )
        self.api_version = api_version
        self._in = StreamResampler(8000, INPUT_RATE, input_quality, low_latency=True)
        self._output_quality = output_quality
        self._out: StreamResampler | None = None
        self._turn = 1
        self._turn_audio = False
        self._model_text: list[str] = []
        self._user_text: list[str] = []
        self._activity_open = False

    # ------------------------------------------------------------------ connection

    @property
    def _item(self) -> str:
        return f"gemini-turn-{self._turn}"

    def _url(self) -> str:
        base = ws_base(self.options.base_url or DEFAULT_GEMINI_URL)
        return (
            f"{base}/ws/google.ai.generativelanguage.{self.api_version}"
            ".GenerativeService.BidiGenerateContent"
        )

    def _headers(self) -> dict[str, str]:
        return {"x-goog-api-key": str(self._api_key)}

    def setup_message(self) -> dict[str, Any]:
        """The ``setup`` message sent first."""
        o = self.options
        model = o.model or DEFAULT_GEMINI_MODEL
        if not model.startswith(("models/", "projects/")):
            model = "models/" + model
        generation: dict[str, Any] = {"responseModalities": ["AUDIO" if o.audio_out else "TEXT"]}
        if o.temperature is not None:
            generation["temperature"] = o.temperature
        speech: dict[str, Any] = {}
        if o.voice:
            speech["voiceConfig"] = {"prebuiltVoiceConfig": {"voiceName": o.voice}}
        if o.language:
            speech["languageCode"] = o.language
        if speech:
            generation["speechConfig"] = speech
        setup: dict[str, Any] = {"model": model, "generationConfig": generation}
        if o.instructions is not None:
            setup["systemInstruction"] = {"parts": [{"text": o.instructions}]}
        if o.tools:
            setup["tools"] = [
                {
                    "functionDeclarations": [
                        {
                            "name": t.name,
                            "description": t.description,
                            "parameters": gemini_schema(t.parameters),
                        }
                        for t in o.tools
                    ]
                }
            ]
        detection: dict[str, Any] = {"disabled": not o.server_vad}
        if o.silence_duration_ms is not None:
            detection["silenceDurationMs"] = o.silence_duration_ms
        if o.prefix_padding_ms is not None:
            detection["prefixPaddingMs"] = o.prefix_padding_ms
        setup["realtimeInputConfig"] = {
            "automaticActivityDetection": detection,
            "activityHandling": "START_OF_ACTIVITY_INTERRUPTS",
        }
        if o.transcribe_input:
            setup["inputAudioTranscription"] = {}
        if o.audio_out:
            setup["outputAudioTranscription"] = {}
        return {"setup": deep_merge(setup, o.extra)}

    async def _on_connected(self) -> None:
        await self._send(self.setup_message())

    async def _after_ready(self) -> None:
        greeting = self.options.greeting
        if greeting:
            await self._send(
                {
                    "clientContent": {
                        "turns": [
                            {
                                "role": "user",
                                "parts": [
                                    {
                                        "text": "Greet the caller by saying exactly this, and "
                                        "nothing else: " + greeting
                                    }
                                ],
                            }
                        ],
                        "turnComplete": True,
                    }
                }
            )

    # ------------------------------------------------------------------ client calls

    async def push_audio(self, ulaw: bytes) -> None:
        """Send caller audio as PCM16 16 kHz."""
        if not ulaw or not self.is_open:
            return
        pcm = self._in.process(ulaw_decode(ulaw))
        if not self.options.server_vad and not self._activity_open:
            self._activity_open = True
            await self._send({"realtimeInput": {"activityStart": {}}})
        if pcm.size:
            await self._send(
                {
                    "realtimeInput": {
                        "audio": {
                            "mimeType": f"audio/pcm;rate={INPUT_RATE}",
                            "data": base64.b64encode(pcm.tobytes()).decode("ascii"),
                        }
                    }
                }
            )

    async def commit(self) -> None:
        """End the caller's turn (activityEnd with client-side VAD, else audioStreamEnd)."""
        if not self.is_open:
            return
        tail = self._in.flush()
        if tail.size:
            await self._send(
                {
                    "realtimeInput": {
                        "audio": {
                            "mimeType": f"audio/pcm;rate={INPUT_RATE}",
                            "data": base64.b64encode(tail.tobytes()).decode("ascii"),
                        }
                    }
                }
            )
        if self.options.server_vad:
            await self._send({"realtimeInput": {"audioStreamEnd": True}})
        elif self._activity_open:
            self._activity_open = False
            await self._send({"realtimeInput": {"activityEnd": {}}})

    async def cancel(self) -> None:
        """Gemini has no cancel message; a new activity interrupts instead (no-op here)."""
        return

    async def update_instructions(self, instructions: str) -> None:
        """Add new instructions as context (Gemini cannot change its setup mid-session)."""
        if self.is_open:
            await self._send(
                {
                    "clientContent": {
                        "turns": [
                            {
                                "role": "user",
                                "parts": [{"text": "Updated instructions: " + instructions}],
                            }
                        ],
                        "turnComplete": False,
                    }
                }
            )

    async def send_text(self, text: str) -> None:
        """Send user text as realtime input."""
        if self.is_open:
            await self._send({"realtimeInput": {"text": text}})

    async def send_tool_result(
        self, call_id: str, output: str, *, name: str | None = None, is_error: bool = False
    ) -> None:
        """Answer a function call (``response.result`` or ``response.error``)."""
        if not self.is_open:
            return
        try:
            value: Any = json.loads(output)
        except ValueError:
            value = output
        key = "error" if is_error else "result"
        if is_error and isinstance(value, Mapping) and "error" in value:
            value = value["error"]
        response: dict[str, Any] = {"id": call_id, "response": {key: value}}
        if name:
            response["name"] = name
        await self._send({"toolResponse": {"functionResponses": [response]}})

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Gemini has no truncation; the bridge only clears the call's audio."""
        return

    # ------------------------------------------------------------------ server messages

    async def _handle(self, msg: dict[str, Any], received_at: float) -> None:
        # Every field is read before anything is applied: a malformed message is dropped
        # whole, never half applied.
        setup_done = "setupComplete" in msg or "setup_complete" in msg
        done = obj_field(msg, "setupComplete", "setup_complete")
        session_id = str_field(done, "sessionId") or None
        content = obj_field(msg, "serverContent", "server_content")
        parsed = self._parse_content(content) if content else None
        calls = self._parse_tool_calls(obj_field(msg, "toolCall", "tool_call"))
        cancelled = obj_field(msg, "toolCallCancellation", "tool_call_cancellation")
        ids = list_field(cancelled, "ids")
        if not all(isinstance(i, str) for i in ids):
            raise MalformedMessage("ids")
        usage = gemini_usage(obj_field(msg, "usageMetadata", "usage_metadata"))
        going_away = "goAway" in msg or "go_away" in msg
        time_left = str_field(obj_field(msg, "goAway", "go_away"), "timeLeft") or "?"

        if setup_done:
            self._mark_ready(session_id)
        if parsed is not None:
            self._on_content(parsed, received_at)
        for call in calls:
            self._emit(call)
        if ids:
            self._emit(ToolCallCancelled(tuple(ids)))
        if usage is not None:
            self._emit(usage)
        if going_away:
            logger.warning(
                "gemini announced the end of the connection", extra={"provider": "gemini"}
            )
            self._emit(
                AgentError(
                    f"server will close the connection in {clip(time_left, 16)}",
                    fatal=False,
                    code="go_away",
                    provider=self.provider,
                )
            )

    def _message_kind(self, msg: dict[str, Any]) -> str:
        for key, snake in _MESSAGE_KEYS:
            if key in msg or snake in msg:
                return key
        return ""

    def _parse_tool_calls(self, tool_call: dict[str, Any]) -> list[ToolCall]:
        calls: list[ToolCall] = []
        for fc in list_field(tool_call, "functionCalls", "function_calls"):
            if not isinstance(fc, dict):
                raise MalformedMessage("functionCalls")
            name = str_field(fc, "name")
            if not name:
                continue
            args = obj_field(fc, "args")
            call_id = str_field(fc, "id") or name
            calls.append(ToolCall(call_id, name, args, json.dumps(args), self._item))
        return calls

    def _parse_content(self, content: dict[str, Any]) -> _Content:
        turn_present = "modelTurn" in content or "model_turn" in content
        turn = obj_field(content, "modelTurn", "model_turn")
        parts: list[tuple[int, bytes] | str] = []
        for part in list_field(turn, "parts"):
            if isinstance(part, dict):
                parsed = _parse_part(part)
                if parsed is not None:
                    parts.append(parsed)
        user = obj_field(content, "inputTranscription", "input_transcription")
        model = obj_field(content, "outputTranscription", "output_transcription")
        return _Content(
            interrupted=bool(content.get("interrupted")),
            user_text=str_field(user, "text"),
            turn_present=turn_present,
            parts=parts,
            model_text=str_field(model, "text"),
            complete=bool(content.get("turnComplete") or content.get("turn_complete")),
        )

    def _on_content(self, content: _Content, received_at: float) -> None:
        if content.interrupted:
            self._flush_user_text()
            if self._out is not None:
                self._out.reset()
            self._emit(UserSpeechStarted(interrupted_item_id=self._item))
            if self._turn_audio or self._model_text:
                self._emit(AssistantTurnEnd(None, self._item, "cancelled"))
            self._next_turn()
        if content.user_text:
            self._user_text.append(content.user_text)
            self._emit(UserTranscript(content.user_text, False))
        if content.turn_present:
            self._flush_user_text()
            for part in content.parts:
                if isinstance(part, str):
                    self._model_text.append(part)
                    self._emit(AssistantText(part, False, self._item))
                else:
                    self._on_audio(*part, received_at)
        if content.model_text:
            self._flush_user_text()
            self._model_text.append(content.model_text)
            self._emit(AssistantText(content.model_text, False, self._item))
        if content.complete:
            self._flush_user_text()
            if self._out is not None:
                tail = self._out.flush()
                if tail.size:
                    self._emit(
                        AssistantAudio(ulaw_encode(tail).tobytes(), self._item, None, received_at)
                    )
            if self._turn_audio or self._model_text:
                if self._model_text:
                    self._emit(AssistantText("".join(self._model_text), True, self._item))
                self._emit(AssistantTurnEnd(None, self._item, "completed"))
                self._next_turn()

    def _on_audio(self, rate: int, raw: bytes, received_at: float) -> None:
        if self._out is None or self._out.in_rate != rate:
            self._out = StreamResampler(rate, 8000, self._output_quality, low_latency=True)
        samples = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2")
        pcm8k = self._out.process(samples)
        self._turn_audio = True
        if pcm8k.size:
            self._emit(AssistantAudio(ulaw_encode(pcm8k).tobytes(), self._item, None, received_at))

    def _flush_user_text(self) -> None:
        if self._user_text:
            self._emit(UserTranscript("".join(self._user_text).strip(), True))
            self._user_text.clear()

    def _next_turn(self) -> None:
        self._turn += 1
        self._turn_audio = False
        self._model_text.clear()
