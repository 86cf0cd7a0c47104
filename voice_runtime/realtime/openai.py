"""OpenAI Realtime (GA ``gpt-realtime`` shape) over its websocket, μ-law in and out.

With ``audio/pcmu`` as both input and output format, Twilio's payloads go to OpenAI and
OpenAI's deltas go to Twilio byte for byte: no decoding, no resampling. The session uses
the GA shape (``session.type = "realtime"``, formats as objects under ``audio``, flat
function tools) and accepts both GA and beta event spellings from the server.

:class:`OpenAICompatibleAgent` holds everything the OpenAI-compatible vendors share (the
event handling, tool results, truncation); xAI's Grok builds on it in ``xai.py``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

from voice_runtime.credentials import CREDENTIAL_VARIABLES, resolve_credential
from voice_runtime.errors import ProviderError
from voice_runtime.logutil import clip
from voice_runtime.realtime._base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    MAX_ERROR_CHARS,
    MalformedMessage,
    WebSocketAgent,
    count_field,
    deep_merge,
    id_field,
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
    Usage,
    UserSpeechStarted,
    UserSpeechStopped,
    UserTranscript,
)
from voice_runtime.urls import ws_base

logger = logging.getLogger(__name__)

DEFAULT_OPENAI_URL = "wss://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "gpt-realtime"
DEFAULT_TRANSCRIPTION_MODEL = "gpt-4o-mini-transcribe"
_MIN_COMMIT_MS = 100.0  # OpenAI refuses to commit less than 100 ms of audio

__all__ = ["OpenAICompatibleAgent", "OpenAIRealtimeAgent", "openai_usage"]


def openai_usage(usage: Mapping[str, Any] | None, provider: str) -> Usage | None:
    """Normalise a ``response.done`` usage object; None when there is none.

    Raises :class:`~voice_runtime.realtime._base.MalformedMessage` when a field has the
    wrong type.
    """
    if not usage:
        return None
    if not isinstance(usage, Mapping):
        raise MalformedMessage("usage")
    inp = obj_field(usage, "input_token_details")
    out = obj_field(usage, "output_token_details")
    return Usage(
        input_tokens=count_field(usage, "input_tokens", "usage"),
        output_tokens=count_field(usage, "output_tokens", "usage"),
        input_audio_tokens=count_field(inp, "audio_tokens", "usage"),
        input_text_tokens=count_field(inp, "text_tokens", "usage"),
        output_audio_tokens=count_field(out, "audio_tokens", "usage"),
        output_text_tokens=count_field(out, "text_tokens", "usage"),
        cached_input_tokens=count_field(inp, "cached_tokens", "usage"),
        provider=provider,
    )


class OpenAICompatibleAgent(WebSocketAgent):
    """The OpenAI Realtime event protocol, shared by OpenAI and xAI."""

    #: server_vad turn detection before the tuning values of the options are added.
    turn_detection_base: ClassVar[dict[str, Any]] = {
        "type": "server_vad",
        "create_response": True,
        "interrupt_response": True,
    }

    supports_truncate: ClassVar[bool] = True
    default_url: ClassVar[str] = DEFAULT_OPENAI_URL
    default_model: ClassVar[str | None] = DEFAULT_OPENAI_MODEL
    credential_what: ClassVar[str] = "OpenAI API key"

    def __init__(
        self,
        options: AgentOptions | None = None,
        *,
        api_key: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        allow_insecure: bool = False,
    ) -> None:
        super().__init__(options, connect_timeout=connect_timeout, allow_insecure=allow_insecure)
        self._api_key = resolve_credential(
            api_key, CREDENTIAL_VARIABLES[self.provider], what=self.credential_what
        )
        self._active_response: str | None = None
        self._calls_by_response: dict[str, list[ToolCall]] = {}
        self._open_calls: dict[str, str] = {}  # call_id -> response_id awaiting results
        self._uncommitted_ms = 0.0
        self._response_item: dict[str, str] = {}  # response id -> its audio item
        self._handlers = {
            "session.created": self._on_session_created,
            "session.updated": self._on_session_updated,
            "input_audio_buffer.speech_started": self._on_speech_started,
            "input_audio_buffer.speech_stopped": self._on_speech_stopped,
            "input_audio_buffer.committed": self._on_committed,
            "conversation.item.input_audio_transcription.delta": self._on_user_delta,
            "conversation.item.input_audio_transcription.updated": self._on_user_updated,
            "conversation.item.input_audio_transcription.completed": self._on_user_final,
            "response.created": self._on_response_created,
            "response.output_audio.delta": self._on_audio,
            "response.audio.delta": self._on_audio,
            "response.output_audio_transcript.delta": self._on_text_delta,
            "response.audio_transcript.delta": self._on_text_delta,
            "response.output_text.delta": self._on_text_delta,
            "response.text.delta": self._on_text_delta,
            "response.output_audio_transcript.done": self._on_transcript_done,
            "response.audio_transcript.done": self._on_transcript_done,
            "response.output_text.done": self._on_text_done,
            "response.text.done": self._on_text_done,
            "response.function_call_arguments.done": self._on_function_args,
            "response.done": self._on_response_done,
            "error": self._on_error,
        }

    # ------------------------------------------------------------------ connection

    def _url(self) -> str:
        base = ws_base(self.options.base_url or self.default_url)
        model = self.options.model or self.default_model
        url = f"{base}/realtime"
        return f"{url}?model={quote(model)}" if model else url

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"}

    def session_config(self) -> dict[str, Any]:
        """The ``session`` object sent in ``session.update`` (GA shape)."""
        o = self.options
        audio_in: dict[str, Any] = {
            "format": {"type": "audio/pcmu"},
            "turn_detection": self._turn_detection(),
        }
        if o.transcribe_input:
            transcription: dict[str, Any] = {"model": DEFAULT_TRANSCRIPTION_MODEL}
            if o.language:
                transcription["language"] = o.language
            audio_in["transcription"] = transcription
        audio_out: dict[str, Any] = {"format": {"type": "audio/pcmu"}}
        if o.voice:
            audio_out["voice"] = o.voice
        session: dict[str, Any] = {
            "type": "realtime",
            "model": o.model or self.default_model,
            "output_modalities": ["audio"] if o.audio_out else ["text"],
            "audio": {"input": audio_in, "output": audio_out},
        }
        if o.instructions is not None:
            session["instructions"] = o.instructions
        if o.tools:
            session["tools"] = [t.as_function() for t in o.tools]
            session["tool_choice"] = "auto"
        if o.temperature is not None:
            # The GA session has no temperature field; sending one is an error.
            logger.debug("temperature is not part of the GA realtime session; ignored")
        return deep_merge(session, o.extra)

    def _turn_detection(self) -> dict[str, Any] | None:
        o = self.options
        if not o.server_vad:
            return None
        td: dict[str, Any] = dict(self.turn_detection_base)
        if o.vad_threshold is not None:
            td["threshold"] = o.vad_threshold
        if o.silence_duration_ms is not None:
            td["silence_duration_ms"] = o.silence_duration_ms
        if o.prefix_padding_ms is not None:
            td["prefix_padding_ms"] = o.prefix_padding_ms
        return td

    async def _on_connected(self) -> None:
        await self._send({"type": "session.update", "session": self.session_config()})

    async def _after_ready(self) -> None:
        greeting = self.options.greeting
        if greeting:
            await self._send(
                {
                    "type": "response.create",
                    "response": {
                        "instructions": (
                            "Greet the caller by saying exactly this, and nothing else: " + greeting
                        )
                    },
                }
            )

    # ------------------------------------------------------------------ client calls

    async def push_audio(self, ulaw: bytes) -> None:
        """Append caller audio to the input buffer (passed through as pcmu)."""
        if not ulaw or not self.is_open:
            return
        if await self._send(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(ulaw).decode("ascii")}
        ):
            self._uncommitted_ms += len(ulaw) / 8.0

    async def commit(self) -> None:
        """Commit the input buffer and ask for a response."""
        if not self.is_open:
            return
        if self._uncommitted_ms >= _MIN_COMMIT_MS:
            await self._send({"type": "input_audio_buffer.commit"})
            self._uncommitted_ms = 0.0
        if self._active_response is None:
            await self._send({"type": "response.create"})

    async def cancel(self) -> None:
        """Cancel the response in progress (nothing when none is)."""
        if self.is_open and self._active_response is not None:
            await self._send({"type": "response.cancel"})

    async def update_instructions(self, instructions: str) -> None:
        """Replace the session instructions."""
        if self.is_open:
            await self._send(
                {"type": "session.update", "session": self._instructions_update(instructions)}
            )

    def _instructions_update(self, instructions: str) -> dict[str, Any]:
        return {"type": "realtime", "instructions": instructions}

    async def send_text(self, text: str) -> None:
        """Add a user text message and ask for a response."""
        if not self.is_open:
            return
        await self._send(
            {
                "type": "conversation.item.create",
                "item": {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": text}],
                },
            }
        )
        if self._active_response is None:
            await self._send({"type": "response.create"})

    async def send_tool_result(
        self, call_id: str, output: str, *, name: str | None = None, is_error: bool = False
    ) -> None:
        """Return a function result; once a response's calls are all answered, respond."""
        if not self.is_open:
            return
        await self._send(
            {
                "type": "conversation.item.create",
                "item": {"type": "function_call_output", "call_id": call_id, "output": output},
            }
        )
        response_id = self._open_calls.pop(call_id, None)
        still_open = response_id is not None and response_id in self._open_calls.values()
        if not still_open and self._active_response is None:
            await self._send({"type": "response.create"})

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """Cut the assistant item at what the caller heard."""
        if self.is_open and item_id:
            await self._send(
                {
                    "type": "conversation.item.truncate",
                    "item_id": item_id,
                    "content_index": 0,
                    "audio_end_ms": max(0, int(audio_end_ms)),
                }
            )

    # ------------------------------------------------------------------ server events

    async def _handle(self, msg: dict[str, Any], received_at: float) -> None:
        kind = msg.get("type")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is not None:
            handler(msg, received_at)

    def _message_kind(self, msg: dict[str, Any]) -> str:
        kind = msg.get("type")
        return kind if isinstance(kind, str) and kind in self._handlers else ""

    def _on_session_created(self, msg: dict[str, Any], _t: float) -> None:
        session = obj_field(msg, "session")
        self.session_id = id_field(session, "id") or self.session_id

    def _on_session_updated(self, msg: dict[str, Any], _t: float) -> None:
        session = obj_field(msg, "session")
        self._mark_ready(id_field(session, "id"))

    def _on_speech_started(self, msg: dict[str, Any], _t: float) -> None:
        item_id = id_field(msg, "item_id")
        # With server VAD we ask for interrupt_response, so the active response is cancelled.
        active = self._active_response if self._active_response != "response" else None
        self._emit(
            UserSpeechStarted(
                item_id,
                _num(msg.get("audio_start_ms")),
                interrupted_response_id=active,
            )
        )

    def _on_speech_stopped(self, msg: dict[str, Any], _t: float) -> None:
        item_id = id_field(msg, "item_id")
        self._emit(UserSpeechStopped(item_id, _num(msg.get("audio_end_ms"))))

    def _on_committed(self, msg: dict[str, Any], _t: float) -> None:
        self._uncommitted_ms = 0.0

    def _on_user_delta(self, msg: dict[str, Any], _t: float) -> None:
        delta, item_id = str_field(msg, "delta"), id_field(msg, "item_id")
        if delta:
            self._emit(UserTranscript(delta, False, item_id))

    def _on_user_updated(self, msg: dict[str, Any], _t: float) -> None:
        text, item_id = str_field(msg, "transcript", "text"), id_field(msg, "item_id")
        if text:
            self._emit(UserTranscript(text, False, item_id))

    def _on_user_final(self, msg: dict[str, Any], _t: float) -> None:
        text, item_id = str_field(msg, "transcript"), id_field(msg, "item_id")
        self._emit(UserTranscript(text, True, item_id))

    def _on_response_created(self, msg: dict[str, Any], _t: float) -> None:
        response = obj_field(msg, "response")
        self._active_response = id_field(response, "id") or "response"

    def _on_audio(self, msg: dict[str, Any], received_at: float) -> None:
        delta = str_field(msg, "delta")
        item_id, response_id = id_field(msg, "item_id"), id_field(msg, "response_id")
        try:
            audio = base64.b64decode(delta, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedMessage("delta", "bad_base64") from None
        if audio:
            if item_id:
                self._response_item[response_id or ""] = item_id
            self._emit(AssistantAudio(audio, item_id, response_id, received_at))

    def _on_text_delta(self, msg: dict[str, Any], _t: float) -> None:
        delta, item_id = str_field(msg, "delta"), id_field(msg, "item_id")
        if delta:
            self._emit(AssistantText(delta, False, item_id))

    def _on_transcript_done(self, msg: dict[str, Any], _t: float) -> None:
        text, item_id = str_field(msg, "transcript"), id_field(msg, "item_id")
        self._emit(AssistantText(text, True, item_id))

    def _on_text_done(self, msg: dict[str, Any], _t: float) -> None:
        text, item_id = str_field(msg, "text"), id_field(msg, "item_id")
        self._emit(AssistantText(text, True, item_id))

    def _on_function_args(self, msg: dict[str, Any], _t: float) -> None:
        call = _tool_call(msg, id_field(msg, "response_id"))
        if call is not None:
            self._calls_by_response.setdefault(call.response_id or "", []).append(call)

    def _on_response_done(self, msg: dict[str, Any], _t: float) -> None:
        response = obj_field(msg, "response")
        response_id = id_field(response, "id")
        status = str_field(response, "status") or "completed"
        output = list_field(response, "output")
        try:
            usage = openai_usage(response.get("usage"), self.provider)
        except MalformedMessage as exc:
            # Bad figures must not cost the turn's end and its tool calls.
            self._malformed(msg, exc)
            usage = None
        if self._active_response in (response_id, "response") or response_id is None:
            self._active_response = None
        calls = self._calls_by_response.pop(response_id or "", [])
        if not calls:
            calls = self._calls_by_response.pop("", [])
        seen = {c.call_id for c in calls}
        last_item = None
        for item in output:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "function_call" and item.get("call_id") not in seen:
                with contextlib.suppress(MalformedMessage):
                    call = _tool_call(item, response_id)
                    if call is not None:
                        calls.append(call)
            elif item.get("type") == "message" and isinstance(item.get("id"), str):
                last_item = item["id"]
        if usage is not None:
            self._emit(usage)
        if status in ("completed", "incomplete"):
            for call in calls:
                self._open_calls[call.call_id] = response_id or ""
                self._emit(call)
        elif calls:
            logger.info(
                "tool calls of a cancelled response dropped",
                extra={"provider": self.provider, "status": status},
            )
        audio_item = self._response_item.pop(response_id or "", None)
        self._emit(AssistantTurnEnd(response_id, last_item or audio_item, status))

    def _on_error(self, msg: dict[str, Any], _t: float) -> None:
        err = obj_field(msg, "error")
        code = id_field(err, "code") or id_field(err, "type")
        message = clip(str_field(err, "message") or "vendor error", MAX_ERROR_CHARS)
        if self._handshaking:
            self._fail_handshake(ProviderError(message, provider=self.provider, code=code))
            return
        logger.warning("vendor reported an error", extra={"provider": self.provider, "code": code})
        self._emit(AgentError(message, fatal=False, code=code, provider=self.provider))


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def _tool_call(msg: Mapping[str, Any], response_id: str | None) -> ToolCall | None:
    call_id, name = id_field(msg, "call_id"), id_field(msg, "name")
    if not call_id or not name:
        return None
    raw = msg.get("arguments") or "{}"
    if isinstance(raw, dict):
        return ToolCall(call_id, name, raw, "", response_id)
    if not isinstance(raw, str):
        raise MalformedMessage("arguments")
    try:
        args = json.loads(raw)
    except ValueError:
        args = {}  # the tool sees no arguments and answers with its own error
    if not isinstance(args, dict):
        args = {}
    return ToolCall(call_id, name, args, raw, response_id)


class OpenAIRealtimeAgent(OpenAICompatibleAgent):
    """OpenAI Realtime, GA shape, ``audio/pcmu`` both ways.

    Key: ``api_key`` or ``OPENAI_API_KEY``. ``options.base_url`` overrides
    ``wss://api.openai.com/v1`` (``/realtime?model=…`` is appended).
    """

    provider: ClassVar[str] = "openai"
