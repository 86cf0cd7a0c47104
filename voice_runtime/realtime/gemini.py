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
from typing import Any, ClassVar

import numpy as np

from voice_runtime.audio import StreamResampler, ulaw_decode, ulaw_encode
from voice_runtime.realtime._base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    WebSocketAgent,
    deep_merge,
    ws_base,
)
from voice_runtime.realtime.agent import AgentOptions
from voice_runtime.realtime.credentials import CREDENTIAL_VARIABLES, resolve_credential
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

logger = logging.getLogger(__name__)

DEFAULT_GEMINI_URL = "wss://generativelanguage.googleapis.com"
DEFAULT_GEMINI_MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"
INPUT_RATE = 16000
OUTPUT_RATE = 24000
_RATE_RE = re.compile(r"rate=(\d+)")

__all__ = ["GeminiLiveAgent", "gemini_schema", "gemini_usage"]


def gemini_usage(meta: Mapping[str, Any] | None) -> Usage | None:
    """Normalise a ``usageMetadata`` object; None when there is none."""
    if not meta:
        return None

    def by_modality(key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in meta.get(key) or ():
            if isinstance(d, Mapping):
                mod = str(d.get("modality", "")).upper()
                out[mod] = out.get(mod, 0) + int(d.get("tokenCount") or 0)
        return out

    prompt = by_modality("promptTokensDetails")
    response = by_modality("responseTokensDetails")
    output = meta.get("responseTokenCount")
    if output is None:
        output = meta.get("candidatesTokenCount")
    return Usage(
        input_tokens=int(meta.get("promptTokenCount") or 0)
        + int(meta.get("toolUsePromptTokenCount") or 0),
        output_tokens=int(output or 0) + int(meta.get("thoughtsTokenCount") or 0),
        input_audio_tokens=prompt.get("AUDIO", 0),
        input_text_tokens=prompt.get("TEXT", 0),
        output_audio_tokens=response.get("AUDIO", 0),
        output_text_tokens=response.get("TEXT", 0),
        cached_input_tokens=int(meta.get("cachedContentTokenCount") or 0),
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
        if "setupComplete" in msg or "setup_complete" in msg:
            done = msg.get("setupComplete") or msg.get("setup_complete") or {}
            self._mark_ready(done.get("sessionId") if isinstance(done, dict) else None)
        content = msg.get("serverContent") or msg.get("server_content")
        if isinstance(content, dict):
            self._on_content(content, received_at)
        tool_call = msg.get("toolCall") or msg.get("tool_call")
        if isinstance(tool_call, dict):
            for fc in tool_call.get("functionCalls") or ():
                if isinstance(fc, dict) and fc.get("name"):
                    args = fc.get("args") if isinstance(fc.get("args"), dict) else {}
                    self._emit(
                        ToolCall(
                            str(fc.get("id") or fc.get("name")),
                            str(fc["name"]),
                            args,
                            json.dumps(args),
                            self._item,
                        )
                    )
        cancelled = msg.get("toolCallCancellation") or msg.get("tool_call_cancellation")
        if isinstance(cancelled, dict):
            ids = tuple(str(i) for i in cancelled.get("ids") or ())
            if ids:
                self._emit(ToolCallCancelled(ids))
        usage = gemini_usage(msg.get("usageMetadata") or msg.get("usage_metadata"))
        if usage is not None:
            self._emit(usage)
        go_away = msg.get("goAway") or msg.get("go_away")
        if isinstance(go_away, dict):
            logger.warning(
                "gemini announced the end of the connection", extra={"provider": "gemini"}
            )
            self._emit(
                AgentError(
                    f"server will close the connection in {go_away.get('timeLeft', '?')}",
                    fatal=False,
                    code="go_away",
                    provider=self.provider,
                )
            )

    def _on_content(self, content: dict[str, Any], received_at: float) -> None:
        if content.get("interrupted"):
            self._flush_user_text()
            if self._out is not None:
                self._out.reset()
            self._emit(UserSpeechStarted(interrupted_item_id=self._item))
            if self._turn_audio or self._model_text:
                self._emit(AssistantTurnEnd(None, self._item, "cancelled"))
            self._next_turn()
        transcription = content.get("inputTranscription") or content.get("input_transcription")
        if isinstance(transcription, dict) and transcription.get("text"):
            self._user_text.append(str(transcription["text"]))
            self._emit(UserTranscript(str(transcription["text"]), False))
        turn = content.get("modelTurn") or content.get("model_turn")
        if isinstance(turn, dict):
            self._flush_user_text()
            for part in turn.get("parts") or ():
                if isinstance(part, dict):
                    self._on_part(part, received_at)
        out_tr = content.get("outputTranscription") or content.get("output_transcription")
        if isinstance(out_tr, dict) and out_tr.get("text"):
            self._flush_user_text()
            self._model_text.append(str(out_tr["text"]))
            self._emit(AssistantText(str(out_tr["text"]), False, self._item))
        if content.get("turnComplete") or content.get("turn_complete"):
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

    def _on_part(self, part: dict[str, Any], received_at: float) -> None:
        inline = part.get("inlineData") or part.get("inline_data")
        if isinstance(inline, dict):
            mime = str(inline.get("mimeType") or inline.get("mime_type") or "")
            if not mime.startswith("audio/pcm"):
                return
            try:
                raw = base64.b64decode(inline.get("data") or "", validate=True)
            except (binascii.Error, ValueError):
                logger.warning("undecodable gemini audio", extra={"provider": "gemini"})
                return
            match = _RATE_RE.search(mime)
            rate = int(match.group(1)) if match else OUTPUT_RATE
            if self._out is None or self._out.in_rate != rate:
                self._out = StreamResampler(rate, 8000, self._output_quality, low_latency=True)
            samples = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<i2")
            pcm8k = self._out.process(samples)
            self._turn_audio = True
            if pcm8k.size:
                self._emit(
                    AssistantAudio(ulaw_encode(pcm8k).tobytes(), self._item, None, received_at)
                )
        elif part.get("text") and not part.get("thought"):
            self._model_text.append(str(part["text"]))
            self._emit(AssistantText(str(part["text"]), False, self._item))

    def _flush_user_text(self) -> None:
        if self._user_text:
            self._emit(UserTranscript("".join(self._user_text).strip(), True))
            self._user_text.clear()

    def _next_turn(self) -> None:
        self._turn += 1
        self._turn_audio = False
        self._model_text.clear()
