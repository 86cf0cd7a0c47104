"""ElevenLabs Agents (Conversational AI) over its websocket, μ-law 8 kHz both ways.

The agent's audio formats are set in the agent's own configuration (dashboard or agents
API), not by the client: set ``asr.user_input_audio_format`` and
``tts.agent_output_audio_format`` to ``ulaw_8000``. The session reports both formats in
``conversation_initiation_metadata``; anything else fails :meth:`ElevenLabsAgent.start` with
a non-retryable error that says what to change, instead of playing noise to the caller.

Wire rules kept here: ``user_audio_chunk`` messages have no ``type`` key; every ``ping`` is
answered with a ``pong`` carrying its ``event_id``; after an ``interruption`` every audio
event whose ``event_id`` is at or below the interruption's is dropped. Tools are declared in
the agent's configuration as client tools; their calls arrive as ``client_tool_call`` and are
answered with ``client_tool_result``.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from voice_runtime.credentials import CREDENTIAL_VARIABLES, resolve_credential
from voice_runtime.errors import ProviderConnectionError, ProviderError, is_retryable_status
from voice_runtime.logutil import clip
from voice_runtime.realtime._base import (
    DEFAULT_CONNECT_TIMEOUT_S,
    MAX_ERROR_CHARS,
    MalformedMessage,
    VendorFatal,
    WebSocketAgent,
    deep_merge,
    id_field,
    obj_field,
    str_field,
)
from voice_runtime.realtime.agent import AgentOptions
from voice_runtime.realtime.events import (
    AgentError,
    AssistantAudio,
    AssistantText,
    ToolCall,
    UserSpeechStarted,
    UserTranscript,
)
from voice_runtime.urls import http_base, ws_base

logger = logging.getLogger(__name__)

DEFAULT_ELEVENLABS_URL = "wss://api.elevenlabs.io"
REQUIRED_FORMAT = "ulaw_8000"

__all__ = ["ElevenLabsAgent"]


class ElevenLabsAgent(WebSocketAgent):
    """An ElevenLabs agent (``ulaw_8000`` in and out) on a call.

    ``agent_id`` or ``ELEVENLABS_AGENT_ID`` names the agent. With an API key (``api_key`` or
    ``ELEVENLABS_API_KEY``) a signed URL is fetched first, as private agents need; without
    one the public endpoint is used. ``options.base_url`` overrides
    ``wss://api.elevenlabs.io`` (the signed-URL request goes to the same host over http(s)).
    ``options.instructions``/``greeting``/``voice``/``language`` become conversation
    overrides, which apply only when the agent's security settings allow them.
    """

    provider: ClassVar[str] = "elevenlabs"
    supports_truncate: ClassVar[bool] = False

    def __init__(
        self,
        options: AgentOptions | None = None,
        *,
        agent_id: str | None = None,
        api_key: str | None = None,
        use_signed_url: bool | None = None,
        dynamic_variables: Mapping[str, Any] | None = None,
        user_id: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        allow_insecure: bool = False,
    ) -> None:
        super().__init__(options, connect_timeout=connect_timeout, allow_insecure=allow_insecure)
        self.agent_id = str(
            resolve_credential(
                agent_id, CREDENTIAL_VARIABLES["elevenlabs_agent_id"], what="ElevenLabs agent id"
            )
        )
        self._api_key = resolve_credential(
            api_key,
            CREDENTIAL_VARIABLES["elevenlabs"],
            what="ElevenLabs API key",
            required=False,
            warn=False,
        )
        self.use_signed_url = bool(self._api_key) if use_signed_url is None else use_signed_url
        if self.use_signed_url and not self._api_key:
            raise ProviderError(
                "a signed URL needs an API key (ELEVENLABS_API_KEY)", provider=self.provider
            )
        self.dynamic_variables = dict(dynamic_variables or {})
        self.user_id = user_id
        self.conversation_id: str | None = None
        self._interrupted_id = -1
        self._turn = 1
        self._turn_audio = False

    # ------------------------------------------------------------------ connection

    @property
    def _item(self) -> str:
        return f"elevenlabs-turn-{self._turn}"

    def _base(self) -> str:
        return self.options.base_url or DEFAULT_ELEVENLABS_URL

    def _url(self) -> str:
        return f"{ws_base(self._base())}/v1/convai/conversation?agent_id={quote(self.agent_id)}"

    def _headers(self) -> dict[str, str]:
        # The signed URL carries its own authorisation; never send the key twice.
        if self._api_key and not self.use_signed_url:
            return {"xi-api-key": self._api_key}
        return {}

    async def _resolve_url(self) -> str:
        if not self.use_signed_url:
            return self._url()
        url = f"{http_base(self._base())}/v1/convai/conversation/get-signed-url"
        self._check_transport_security(ws_base(url))
        try:
            async with httpx.AsyncClient(timeout=self.connect_timeout) as client:
                resp = await client.get(
                    url,
                    params={"agent_id": self.agent_id},
                    headers={"xi-api-key": str(self._api_key)},
                )
        except httpx.HTTPError as exc:
            raise ProviderConnectionError(
                f"cannot fetch a signed URL: {type(exc).__name__}", provider=self.provider
            ) from exc
        if resp.status_code != 200:
            raise ProviderError(
                f"signed URL request failed (HTTP {resp.status_code})",
                provider=self.provider,
                retryable=is_retryable_status(resp.status_code),
                status=resp.status_code,
            )
        try:
            signed = str(resp.json()["signed_url"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProviderError(
                "signed URL answer has no signed_url", provider=self.provider
            ) from exc
        return signed

    def initiation_message(self) -> dict[str, Any]:
        """The ``conversation_initiation_client_data`` message sent first."""
        o = self.options
        agent: dict[str, Any] = {}
        if o.instructions is not None:
            agent["prompt"] = {"prompt": o.instructions}
        if o.greeting is not None:
            agent["first_message"] = o.greeting
        if o.language:
            agent["language"] = o.language
        override: dict[str, Any] = {}
        if agent:
            override["agent"] = agent
        if o.voice:
            override["tts"] = {"voice_id": o.voice}
        msg: dict[str, Any] = {
            "type": "conversation_initiation_client_data",
            "conversation_config_override": override,
            "source_info": {"source": "voice_runtime"},
        }
        if self.dynamic_variables:
            msg["dynamic_variables"] = self.dynamic_variables
        if self.user_id:
            msg["user_id"] = self.user_id
        return deep_merge(msg, o.extra)

    async def _on_connected(self) -> None:
        await self._send(self.initiation_message())

    # ------------------------------------------------------------------ client calls

    async def push_audio(self, ulaw: bytes) -> None:
        """Send caller audio (``ulaw_8000``, no ``type`` key)."""
        if ulaw and self.is_open:
            await self._send({"user_audio_chunk": base64.b64encode(ulaw).decode("ascii")})

    async def commit(self) -> None:
        """ElevenLabs detects turns itself; this only signals user activity."""
        if self.is_open:
            await self._send({"type": "user_activity"})

    async def cancel(self) -> None:
        """No cancel message exists in this protocol (no-op)."""
        return

    async def update_instructions(self, instructions: str) -> None:
        """Send the instructions as a ``contextual_update`` (the agent's prompt is fixed)."""
        if self.is_open:
            await self._send({"type": "contextual_update", "text": instructions})

    async def send_text(self, text: str) -> None:
        """Send a user text message."""
        if self.is_open:
            await self._send({"type": "user_message", "text": text})

    async def send_tool_result(
        self, call_id: str, output: str, *, name: str | None = None, is_error: bool = False
    ) -> None:
        """Answer a client tool call."""
        if self.is_open:
            await self._send(
                {
                    "type": "client_tool_result",
                    "tool_call_id": call_id,
                    "result": output,
                    "is_error": is_error,
                }
            )

    async def truncate(self, item_id: str, audio_end_ms: int) -> None:
        """ElevenLabs has no truncation; the bridge only clears the call's audio."""
        return

    # ------------------------------------------------------------------ server messages

    async def _handle(self, msg: dict[str, Any], received_at: float) -> None:
        kind = msg.get("type")
        if kind == "audio":
            self._on_audio(obj_field(msg, "audio_event"), received_at)
        elif kind == "ping":
            event_id = _event_id(obj_field(msg, "ping_event"))
            await self._send_pong(event_id)
        elif kind == "interruption":
            self._on_interruption(obj_field(msg, "interruption_event"))
        elif kind == "conversation_initiation_metadata":
            self._on_metadata(obj_field(msg, "conversation_initiation_metadata_event"))
        elif kind == "user_transcript":
            event = obj_field(msg, "user_transcription_event")
            self._emit(UserTranscript(str_field(event, "user_transcript"), True))
            if self._turn_audio:
                self._next_turn()
        elif kind == "agent_response":
            event = obj_field(msg, "agent_response_event")
            self._emit(AssistantText(str_field(event, "agent_response"), True, self._item))
        elif kind == "agent_response_correction":
            event = obj_field(msg, "agent_response_correction_event")
            text = str_field(event, "corrected_agent_response")
            self._emit(AssistantText(text, True, self._item))
        elif kind == "agent_chat_response_part":
            part = obj_field(msg, "text_response_part")
            part_type, text = str_field(part, "type"), str_field(part, "text")
            if part_type == "delta" and text:
                self._emit(AssistantText(text, False, self._item))
        elif kind == "client_tool_call":
            call = obj_field(msg, "client_tool_call")
            name, call_id = str_field(call, "tool_name"), id_field(call, "tool_call_id")
            params = obj_field(call, "parameters")
            if name and call_id:
                self._emit(ToolCall(call_id, name, params, "", self._item))
        elif kind == "error":
            err = msg.get("error_event") or msg.get("error") or {}
            if isinstance(err, dict):
                text = str_field(err, "message")
            elif isinstance(err, str):
                text = err
            else:
                raise MalformedMessage("error")
            message = clip(text or "vendor error", MAX_ERROR_CHARS)
            self._emit(AgentError(message, fatal=False, provider=self.provider))

    def _message_kind(self, msg: dict[str, Any]) -> str:
        kind = msg.get("type")
        return kind if isinstance(kind, str) and kind in _KNOWN_TYPES else ""

    async def _send_pong(self, event_id: Any) -> None:
        # _send works during the handshake too: pings may come before the metadata.
        await self._send({"type": "pong", "event_id": event_id})

    def _on_metadata(self, event: Mapping[str, Any]) -> None:
        out_fmt = str_field(event, "agent_output_audio_format") or None
        in_fmt = str_field(event, "user_input_audio_format") or None
        self.conversation_id = id_field(event, "conversation_id") or self.conversation_id
        bad = {
            k: v
            for k, v in (
                ("tts.agent_output_audio_format", out_fmt),
                ("asr.user_input_audio_format", in_fmt),
            )
            if v is not None and v != REQUIRED_FORMAT
        }
        if bad:
            detail = ", ".join(f"{k} is {clip(v, 32)!r}" for k, v in bad.items())
            message = (
                f"agent audio format mismatch ({detail}); set both formats to "
                f"{REQUIRED_FORMAT!r} in the agent's configuration"
            )
            if self._handshaking:
                self._fail_handshake(
                    ProviderError(message, provider=self.provider, code="audio_format_mismatch")
                )
                return
            raise VendorFatal(message, "audio_format_mismatch")
        self._mark_ready(self.conversation_id)

    def _on_audio(self, event: Mapping[str, Any], received_at: float) -> None:
        event_id = _event_id(event)
        data = str_field(event, "audio_base_64")
        if event_id is not None and event_id <= self._interrupted_id:
            return  # audio of an interrupted turn that was already in flight
        try:
            audio = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedMessage("audio_base_64", "bad_base64") from None
        if audio:
            self._turn_audio = True
            self._emit(AssistantAudio(audio, self._item, None, received_at))

    def _on_interruption(self, event: Mapping[str, Any]) -> None:
        event_id = _event_id(event)
        if event_id is not None:
            self._interrupted_id = max(self._interrupted_id, event_id)
        self._emit(UserSpeechStarted(interrupted_item_id=self._item))
        self._next_turn()

    def _next_turn(self) -> None:
        self._turn += 1
        self._turn_audio = False


_KNOWN_TYPES = frozenset(
    {
        "audio",
        "ping",
        "interruption",
        "conversation_initiation_metadata",
        "user_transcript",
        "agent_response",
        "agent_response_correction",
        "agent_chat_response_part",
        "client_tool_call",
        "error",
    }
)


def _event_id(event: Mapping[str, Any]) -> int | None:
    """An event's ``event_id``: an integer, or None when absent."""
    value = event.get("event_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedMessage("event_id")
    return value
