"""ElevenLabs realtime speech-to-text (Scribe v2 realtime) over its websocket.

:class:`PersistentSttSession` keeps one Scribe websocket per call: caller μ-law goes out
natively (``audio_format=ulaw_8000``, no conversion), the server's VAD commits utterances,
partial text goes to ``on_recognizing`` and committed text to ``on_committed``, both through
the shared echo discard.

The wire protocol is spoken directly with ``websockets`` (a core dependency) rather than
through the ``elevenlabs`` SDK's realtime helper: that helper prints handler failures to
stdout, folds socket drops and vendor errors into one event and offers no connect timeout,
and this module needs exact control over those to reconnect without losing audio.

Faults. A fatal vendor error (``transcriber_error``, ``queue_overflow``,
``resource_exhausted``, ``session_time_limit_exceeded``, a generic ``error``) or a dropped
socket reconnects with exponential backoff (``base·2ⁿ`` ± 25 %, at most ``max_delay``,
``max_reconnects`` consecutive attempts). Caller audio that arrives meanwhile is kept
(bounded) and sent once the new socket is up, preceded by the audio of the utterance in
progress, so the words the old socket never committed are transcribed by the new one. A
terminal error (``auth_error``, ``quota_exceeded``, ``rate_limited``, ``input_error``, …)
calls ``on_error`` at once; exhausted attempts call ``on_error`` too. The provider never
goes deaf silently.

The API key is read at construction (argument, else ELEVENLABS_API_KEY). Without one the
provider still constructs (with a warning), and ``start()`` raises
:class:`~voice_runtime.errors.MissingCredentialError`. The key travels in the ``xi-api-key``
header, never in the URL, and is redacted from websockets' handshake log.

The 0.1.x module constants ``ELEVENLABS_API_KEY``, ``STT_MODEL_ID`` and ``STT_LANGUAGE_CODE``
read the current setting; a value set on this module is used by providers constructed
afterwards, unless an argument is given. ``ECHO_DISCARD_WINDOW_S`` (0.4 s) is read each time
the agent stops speaking, unless ``echo_tail_s`` is given.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import urllib.parse
from typing import Any

from voice_runtime.config import ModuleConstants, settings
from voice_runtime.credentials import CREDENTIAL_VARIABLES, require_credential, resolve_credential
from voice_runtime.errors import ProviderConnectionError
from voice_runtime.logutil import clip, redacting_ws_logger
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import HEALTHY_AFTER_S, EndKind, ReconnectingStt
from voice_runtime.urls import ws_base

logger = logging.getLogger(__name__)
# websockets logs handshake headers at DEBUG: the key must not be one of them.
_WS_LOGGER = redacting_ws_logger("websockets.client")

DEFAULT_BASE_URL = "wss://api.elevenlabs.io"
REALTIME_PATH = "/v1/speech-to-text/realtime"
MAX_MESSAGE_AUDIO_BYTES = 3200  # 0.4 s of μ-law in one message when catching up

#: Vendor errors after which a new socket may work.
FATAL_ERRORS = frozenset(
    {
        "error",
        "transcriber_error",
        "queue_overflow",
        "resource_exhausted",
        "session_time_limit_exceeded",
        "insufficient_audio_activity",
    }
)
#: Vendor errors no reconnect can fix: ``on_error`` at once.
TERMINAL_ERRORS = frozenset(
    {
        "auth_error",
        "quota_exceeded",
        "rate_limited",
        "input_error",
        "invalid_request",
        "unaccepted_terms",
        "unaccepted_terms_error",
        "chunk_size_exceeded",
    }
)
#: Vendor notices that change nothing for a VAD-committed stream.
IGNORED_NOTICES = frozenset({"commit_throttled"})

ECHO_DISCARD_WINDOW_S = 0.4
"""Seconds after the agent stops speaking during which committed text is dropped as echo."""

__all__ = ["ECHO_DISCARD_WINDOW_S", "FATAL_ERRORS", "TERMINAL_ERRORS", "PersistentSttSession"]

_KEY_WHAT = "ElevenLabs API key"
_CONSTANTS = ModuleConstants(
    __name__,
    {
        "ELEVENLABS_API_KEY": "elevenlabs_api_key",
        "STT_MODEL_ID": "stt_model_id",
        "STT_LANGUAGE_CODE": "stt_language_code",
    },
)


def _echo_window() -> float:
    return ECHO_DISCARD_WINDOW_S  # the module global now, so a patch of it takes effect


class _ConnectFailed(ProviderConnectionError):
    def __init__(self, reason: str, *, terminal: bool) -> None:
        # Rooted in the tree; ``terminal`` (not ``retryable``) decides the retry.
        super().__init__(reason)
        self.retryable = not terminal
        self.reason = reason
        self.terminal = terminal


class PersistentSttSession(ReconnectingStt):
    """One ElevenLabs Scribe realtime websocket per call, reconnecting without losing audio."""

    capabilities = Capabilities(native_ulaw=True, interim_results=True, streaming=True)
    _task_name = "elevenlabs-stt"
    _logger = logger

    def __init__(
        self,
        api_key: str | None = None,
        language_code: str | None = None,
        *,
        model_id: str | None = None,
        base_url: str | None = None,
        max_reconnects: int = 3,
        reconnect_base_delay: float = 1.0,
        reconnect_max_delay: float = 30.0,
        connect_timeout: float = 10.0,
        buffer_ms: float = 20_000.0,
        vad_silence_threshold_secs: float | None = 1.5,
        vad_threshold: float | None = 0.5,
        min_speech_duration_ms: int | None = 300,
        min_silence_duration_ms: int | None = None,
        echo_tail_s: float | None = None,
    ) -> None:
        cfg = settings()
        key = resolve_credential(
            api_key,
            CREDENTIAL_VARIABLES["elevenlabs"],
            what=_KEY_WHAT,
            required=False,
            lookup=lambda name: _CONSTANTS.value(name, cfg),
        )
        super().__init__(
            max_reconnects=max_reconnects,
            reconnect_base_delay=reconnect_base_delay,
            reconnect_max_delay=reconnect_max_delay,
            buffer_ms=buffer_ms,
            echo_tail_s=_echo_window if echo_tail_s is None else echo_tail_s,
        )
        self._api_key = key
        self.language_code = language_code or _CONSTANTS.value("STT_LANGUAGE_CODE", cfg)
        self.model_id = model_id or _CONSTANTS.value("STT_MODEL_ID", cfg)
        self.base_url = ws_base(base_url or DEFAULT_BASE_URL)
        self.connect_timeout = connect_timeout
        self._vad: dict[str, Any] = {
            "vad_silence_threshold_secs": vad_silence_threshold_secs,
            "vad_threshold": vad_threshold,
            "min_speech_duration_ms": min_speech_duration_ms,
            "min_silence_duration_ms": min_silence_duration_ms,
        }
        self._audio_ready = asyncio.Event()  # caller audio buffered, or its end
        self._ws: Any = None

    # ------------------------------------------------------------------ public API

    @property
    def url(self) -> str:
        """The websocket URL with its query parameters (no credentials in it)."""
        params: list[tuple[str, str]] = [
            ("model_id", self.model_id),
            ("audio_format", "ulaw_8000"),
            ("commit_strategy", "vad"),
        ]
        if self.language_code:
            params.append(("language_code", self.language_code))
        params.extend((k, str(v)) for k, v in self._vad.items() if v is not None)
        return f"{self.base_url}{REALTIME_PATH}?{urllib.parse.urlencode(params)}"

    @property
    def dropped_audio_ms(self) -> float:
        """Caller audio dropped because the reconnect buffer was full."""
        return self._buffer.dropped_bytes / 8.0

    def _check_credentials(self) -> None:
        require_credential(self._api_key, CREDENTIAL_VARIABLES["elevenlabs"], what=_KEY_WHAT)

    # ------------------------------------------------------------------ audio in

    def _flush(self) -> None:
        self._audio_ready.set()  # the send loop does the sending

    def _close_input(self) -> None:
        self._audio_ready.set()  # the send loop closes the socket once the buffer is empty

    async def _send_loop(self, ws: Any) -> None:
        """Send buffered caller audio as it arrives; close the socket when input ends."""
        from websockets.exceptions import ConnectionClosed

        try:
            await self._send_audio(ws)
        except ConnectionClosed:
            pass  # the receive loop sees the close and decides what follows
        except Exception:
            # A sender that died on a live socket would leave the STT deaf: force a reconnect.
            logger.exception("ElevenLabs STT sender failed; reconnecting")
            with contextlib.suppress(Exception):
                await ws.close(1011)

    async def _send_audio(self, ws: Any) -> None:
        buffer = self._buffer
        while True:
            if buffer.pending_bytes == 0:
                if self._input_ended:
                    with contextlib.suppress(Exception):
                        await ws.close(1000)
                    return
                self._audio_ready.clear()
                await self._audio_ready.wait()
                continue
            frames = buffer.peek(MAX_MESSAGE_AUDIO_BYTES)
            message = {
                "message_type": "input_audio_chunk",
                "audio_base_64": base64.b64encode(b"".join(frames)).decode("ascii"),
                "commit": False,
                "sample_rate": 8000,
            }
            await ws.send(json.dumps(message))
            buffer.ack(len(frames))

    # ------------------------------------------------------------------ connections

    async def _session_once(self) -> tuple[EndKind, str]:
        """Connect, serve the websocket until it ends and close it; return why it ended."""
        try:
            ws = await self._connect()
        except _ConnectFailed as exc:
            if exc.terminal:
                return "terminal", exc.reason
            logger.warning(
                "ElevenLabs STT connect failed: %s", clip(exc.reason), extra={"reason": exc.reason}
            )
            return "fatal", exc.reason
        opened = time.monotonic()
        sender = asyncio.create_task(self._send_loop(ws), name="elevenlabs-stt-send")
        try:
            end, reason = await self._receive_loop(ws, sender)
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            await self._close_ws()
        if time.monotonic() - opened >= HEALTHY_AFTER_S:
            self._healthy = True
        if self._input_ended:
            return "end_of_input", reason  # the last connection of the call
        if end == "fatal" and not self._stopping:
            logger.warning(
                "ElevenLabs STT connection lost: %s", clip(reason), extra={"reason": reason}
            )
        return end, reason

    async def _connect(self) -> Any:
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        try:
            ws = await connect(
                self.url,
                additional_headers={"xi-api-key": self._api_key or ""},
                logger=_WS_LOGGER,
                open_timeout=self.connect_timeout,
                max_size=2**22,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise _ConnectFailed("auth_error", terminal=True) from exc
            if status == 429:
                raise _ConnectFailed("rate_limited", terminal=True) from exc
            if 400 <= status < 500 and status != 408:
                raise _ConnectFailed(f"http_{status}", terminal=True) from exc
            raise _ConnectFailed(f"http_{status}", terminal=False) from exc
        except (OSError, TimeoutError) as exc:
            raise _ConnectFailed(type(exc).__name__, terminal=False) from exc
        except Exception as exc:  # handshake garbage, refused upgrade, …
            raise _ConnectFailed(type(exc).__name__, terminal=False) from exc
        self._ws = ws
        self.connections += 1
        logger.info("ElevenLabs STT connected", extra={"connection": self.connections})
        return ws

    async def _receive_loop(self, ws: Any, sender: asyncio.Task[None]) -> tuple[EndKind, str]:
        from websockets.exceptions import ConnectionClosed

        try:
            async for raw in ws:
                if isinstance(raw, bytes):
                    continue
                try:
                    data = json.loads(raw)
                    kind = str(data.get("message_type", ""))
                except (ValueError, AttributeError):
                    logger.warning("unreadable message from ElevenLabs STT")
                    continue
                if kind in TERMINAL_ERRORS:
                    logger.error(
                        "ElevenLabs STT terminal error: %s",
                        clip(kind),
                        extra={"vendor_error": kind},
                    )
                    return "terminal", kind
                if kind in FATAL_ERRORS:
                    logger.warning(
                        "ElevenLabs STT fatal error: %s", clip(kind), extra={"vendor_error": kind}
                    )
                    return "fatal", kind
                self._handle(kind, data)
        except ConnectionClosed:
            pass
        if self._stopping or (self._input_ended and sender.done()):
            return "stopped", "closed"
        return "fatal", "socket_closed"  # dropped without a vendor error

    def _handle(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "partial_transcript":
            self._healthy = True
            text = str(data.get("text") or "").strip()
            if text and self._echo.allow_partial():
                self._emit(self.on_recognizing, text)
        elif kind == "committed_transcript":
            self._healthy = True
            self._buffer.committed()
            text = str(data.get("text") or "").strip()
            if not text:
                return
            if not self._echo.allow_committed():
                logger.info("committed transcript discarded as echo")
                return
            self._committed(text)
        elif kind == "session_started":
            logger.debug("ElevenLabs STT session started")
        elif kind in IGNORED_NOTICES:
            logger.debug("ElevenLabs STT notice", extra={"vendor_notice": kind})

    async def _close_ws(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2.0)

    async def _disconnect(self) -> None:
        self._audio_ready.set()
        await self._close_ws()
