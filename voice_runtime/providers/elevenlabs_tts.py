"""ElevenLabs text-to-speech through the official ``elevenlabs`` SDK, as native μ-law 8 kHz.

:class:`ElevenLabsTTS` calls ``client.text_to_speech.convert(voice_id=..., model_id=...,
text=..., output_format="ulaw_8000")`` and hands every chunk to the call as it arrives: no
ffmpeg, no transcoding. ``elevenlabs.ElevenLabs`` is looked up when the first ``speak()``
needs a client (so ``patch("elevenlabs.ElevenLabs")`` in a test takes effect), and that one
client (one connection pool, keep-alive) serves every later ``speak()`` of the provider.
``base_url`` points the SDK anywhere (a proxy, or
:class:`~voice_runtime.testing.fake_elevenlabs.FakeElevenLabsTts`).

The SDK is an extra: without it, ``speak()`` raises an ImportError that names
``pip install "voice-runtime[elevenlabs]"``; ``import voice_runtime`` never needs it.

The API key is read at construction (argument, else ELEVENLABS_API_KEY); a provider built
without one logs a warning and raises :class:`~voice_runtime.errors.MissingCredentialError`
when it would first send text to the vendor.

``speak()`` returns the shared result dict (see :mod:`voice_runtime.providers`). HTTP errors
and broken streams become ``error`` in the result and a call of ``on_error``; a finite
timeout (``read_timeout``) means a stalled server cannot hang the call.

The 0.1.x module constants ``ELEVENLABS_API_KEY``, ``ELEVENLABS_VOICE_ID`` and
``ELEVENLABS_MODEL`` read the current setting; a value set on this module (as tests do with
``monkeypatch.setattr``) is used by providers constructed afterwards, unless an argument is
given.
"""

from __future__ import annotations

import importlib
import json
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from voice_runtime._sync import forbid_on_loop
from voice_runtime.config import ModuleConstants, settings
from voice_runtime.credentials import CREDENTIAL_VARIABLES, require_credential, resolve_credential
from voice_runtime.errors import (
    ProviderConnectionError,
    ProviderError,
    is_retryable_status,
)
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import SpeakAsyncInThread, nothing_to_say, play_chunks

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.elevenlabs.io"
OUTPUT_FORMAT = "ulaw_8000"
SDK_MODULE = "elevenlabs"
INSTALL_HINT = 'pip install "voice-runtime[elevenlabs]"'
_MAX_HEADER_BYTES = 4096

__all__ = ["ElevenLabsTTS", "import_elevenlabs_sdk", "strip_riff_header"]

_KEY_WHAT = "ElevenLabs API key"
_CONSTANTS = ModuleConstants(
    __name__,
    {
        "ELEVENLABS_API_KEY": "elevenlabs_api_key",
        "ELEVENLABS_VOICE_ID": "elevenlabs_voice_id",
        "ELEVENLABS_MODEL": "elevenlabs_model",
    },
)


def import_elevenlabs_sdk() -> Any:
    """Import the ``elevenlabs`` SDK or raise an ImportError naming the ``elevenlabs`` extra."""
    try:
        return importlib.import_module(SDK_MODULE)
    except ImportError as exc:
        raise ImportError(
            f"the elevenlabs SDK is needed for ElevenLabs TTS; install it with: {INSTALL_HINT}",
            name=SDK_MODULE,
        ) from exc


class _RiffStripper:
    """Removes a WAV header from the start of a byte stream, if there is one."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._done = False

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            return chunk
        self._head.extend(chunk)
        head = bytes(self._head)
        if len(head) < 4 and b"RIFF".startswith(head):
            return b""
        if not head.startswith(b"RIFF"):
            self._done = True
            return head
        offset = _riff_data_offset(head)
        if offset is None:
            if len(head) > _MAX_HEADER_BYTES:
                # Not a header we understand: pass the bytes on rather than swallow audio.
                self._done = True
                return head
            return b""
        self._done = True
        return head[offset:]

    def flush(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return bytes(self._head)


def _riff_data_offset(head: bytes) -> int | None:
    """Offset of the first audio byte after a RIFF/WAVE header, or None if incomplete."""
    if len(head) < 12:
        return None
    pos = 12
    while pos + 8 <= len(head):
        chunk_id = head[pos : pos + 4]
        (size,) = struct.unpack_from("<I", head, pos + 4)
        if chunk_id == b"data":
            return pos + 8
        pos += 8 + size + (size & 1)
    return None


def strip_riff_header(audio: bytes) -> bytes:
    """Return ``audio`` without a leading WAV header (unchanged when there is none)."""
    stripper = _RiffStripper()
    return stripper.feed(audio) + stripper.flush()


def _error_detail(body: Any) -> str:
    """A short reason from an ElevenLabs error body (``{"detail": {"status", "message"}}``)."""
    if isinstance(body, (bytes, str)):
        try:
            body = json.loads(body)
        except ValueError:
            return ""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, dict):
        return str(detail.get("status") or detail.get("message") or "")[:200]
    if isinstance(detail, str):
        return detail[:200]
    return ""


class ElevenLabsTTS(SpeakAsyncInThread):
    """Streams ElevenLabs speech (``ulaw_8000``) into a call through one reused SDK client."""

    capabilities = Capabilities(native_ulaw=True, streaming=True)

    def __init__(
        self,
        api_key: str | None = None,
        voice_id: str | None = None,
        model_id: str | None = None,
        *,
        base_url: str | None = None,
        language_code: str | None = None,
        voice_settings: dict[str, Any] | None = None,
        optimize_streaming_latency: int | None = None,
        read_timeout: float = 15.0,
        mark_timeout: float = 30.0,
    ) -> None:
        cfg = settings()
        self._api_key = resolve_credential(
            api_key,
            CREDENTIAL_VARIABLES["elevenlabs"],
            what=_KEY_WHAT,
            required=False,
            lookup=lambda name: _CONSTANTS.value(name, cfg),
        )
        self.voice_id = voice_id or _CONSTANTS.value("ELEVENLABS_VOICE_ID", cfg)
        self.model_id = model_id or _CONSTANTS.value("ELEVENLABS_MODEL", cfg)
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self._custom_base_url = base_url is not None
        self.language_code = language_code
        self.voice_settings = voice_settings
        self.optimize_streaming_latency = optimize_streaming_latency
        self.read_timeout = read_timeout
        self.mark_timeout = mark_timeout
        self.on_error: Callable[[str], None] | None = None
        self._client: Any = None
        self._client_factory: Any = None  # the ElevenLabs class the client was made with
        self._http: httpx.Client | None = None
        self._client_lock = threading.Lock()

    # ------------------------------------------------------------------ client

    def _require_key(self) -> str:
        return require_credential(self._api_key, CREDENTIAL_VARIABLES["elevenlabs"], what=_KEY_WHAT)

    @property
    def client(self) -> Any:
        """The SDK client every ``speak()`` shares (made on first use).

        ``elevenlabs.ElevenLabs`` is looked up on each use: when a test patches it, the
        patched class makes a new client.
        """
        factory = import_elevenlabs_sdk().ElevenLabs
        with self._client_lock:
            if self._client is None or self._client_factory is not factory:
                self._client = self._new_client(factory)
                self._client_factory = factory
            return self._client

    def _new_client(self, factory: Any) -> Any:
        kwargs: dict[str, Any] = {"api_key": self._api_key}
        if isinstance(factory, type):
            # The real SDK: key required, our own connection pool (closed by close()) and a
            # finite timeout instead of the SDK's 240 s. A mocked class gets the 0.1.x call.
            kwargs["api_key"] = self._require_key()
            if self._http is None:
                self._http = httpx.Client(
                    timeout=self.read_timeout, limits=httpx.Limits(max_keepalive_connections=4)
                )
            kwargs["httpx_client"] = self._http
            kwargs["timeout"] = self.read_timeout
        if self._custom_base_url:
            kwargs["base_url"] = self.base_url
        return factory(**kwargs)

    def close(self) -> None:
        """Close the connection pool."""
        with self._client_lock:
            http, self._http = self._http, None
            self._client = self._client_factory = None
        if http is not None:
            http.close()

    def __enter__(self) -> ElevenLabsTTS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ synthesis

    def _convert_kwargs(self, text: str, *, real_sdk: bool) -> dict[str, Any]:
        """The SDK call's arguments: those of 0.1.x, plus the options that were set."""
        kwargs: dict[str, Any] = {
            "voice_id": self.voice_id,
            "model_id": self.model_id,
            "text": text,
            "output_format": OUTPUT_FORMAT,
        }
        if self.language_code:
            kwargs["language_code"] = self.language_code
        if self.voice_settings:
            kwargs["voice_settings"] = self.voice_settings
        if self.optimize_streaming_latency is not None:
            kwargs["optimize_streaming_latency"] = self.optimize_streaming_latency
        if real_sdk:
            # The SDK regroups the audio into 1 KiB pieces by default (128 ms of μ-law held
            # back, and a broken stream's last piece lost): take the bytes as they arrive.
            kwargs["request_options"] = {"chunk_size": None}
        return kwargs

    def stream(self, text: str) -> Iterator[bytes]:
        """Yield μ-law 8 kHz chunks of ``text`` as the server sends them.

        Raises :class:`~voice_runtime.errors.MissingCredentialError` without an API key,
        :class:`~voice_runtime.errors.ProviderError` on an HTTP error (``retryable`` for
        408/429/5xx) and :class:`~voice_runtime.errors.ProviderConnectionError` when the
        connection fails or the stream breaks off.
        """
        client = self.client
        return self._chunks(client, text, real_sdk=isinstance(self._client_factory, type))

    def _chunks(self, client: Any, text: str, *, real_sdk: bool) -> Iterator[bytes]:
        stripper = _RiffStripper()
        audio = client.text_to_speech.convert(**self._convert_kwargs(text, real_sdk=real_sdk))
        try:
            for raw in audio:
                chunk = stripper.feed(raw)
                if chunk:
                    yield chunk
            tail = stripper.flush()
            if tail:
                yield tail
        except httpx.TimeoutException as exc:
            raise ProviderConnectionError(
                f"timed out ({type(exc).__name__})", provider="elevenlabs"
            ) from exc
        except httpx.TransportError as exc:
            raise ProviderConnectionError(
                f"stream failed ({type(exc).__name__})", provider="elevenlabs"
            ) from exc
        except Exception as exc:
            # The SDK's ApiError (and its subclasses) carry the HTTP status.
            status = getattr(exc, "status_code", None)
            if not isinstance(status, int) or isinstance(status, bool):
                raise
            detail = _error_detail(getattr(exc, "body", None))
            raise ProviderError(
                f"HTTP {status}" + (f" ({detail})" if detail else ""),
                provider="elevenlabs",
                retryable=is_retryable_status(status),
                status=status,
                code=detail or None,
            ) from exc
        finally:
            close = getattr(audio, "close", None)
            if close is not None:
                close()  # ends the HTTP response at once when speak() stopped early

    def speak(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Stream ``text`` into the call and wait until the caller heard it (blocking).

        Each chunk goes to the session as it arrives; ``stop_event`` is checked before every
        chunk. Returns the shared result dict; empty text returns at once.
        """
        forbid_on_loop(
            getattr(session, "loop", None), "ElevenLabsTTS.speak", "ElevenLabsTTS.speak_async"
        )
        if not text.strip():
            return nothing_to_say(text, session)
        chunks: Any = self.stream(text)  # a generator: closed below
        try:
            return play_chunks(
                text,
                session,
                chunks,
                stop_event,
                on_error=self.on_error,
                provider="elevenlabs",
                mark_timeout=self.mark_timeout,
            )
        finally:
            chunks.close()
