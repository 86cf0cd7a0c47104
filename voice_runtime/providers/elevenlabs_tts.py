"""ElevenLabs text-to-speech streamed over HTTP as native μ-law 8 kHz.

:class:`ElevenLabsTTS` posts to ``/v1/text-to-speech/{voice_id}/stream`` with
``output_format=ulaw_8000`` and hands every chunk to the call as it arrives: no ffmpeg, no
transcoding. One HTTP client (connection pool, keep-alive) serves every ``speak()`` of the
provider. The request is made with ``httpx`` (a core dependency) against the documented
endpoint, so the ``elevenlabs`` SDK is not needed; ``base_url`` points it anywhere (a proxy,
or :class:`~voice_runtime.testing.fake_elevenlabs.FakeElevenLabsTts`).

``speak()`` returns the shared result dict (see :mod:`voice_runtime.providers`). HTTP errors
and broken streams become ``error`` in the result and a call of ``on_error``; finite connect
and read timeouts mean a stalled server cannot hang the call.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from voice_runtime._sync import forbid_on_loop
from voice_runtime.config import settings
from voice_runtime.errors import (
    MissingCredentialError,
    ProviderConnectionError,
    ProviderError,
    is_retryable_status,
)
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import play_chunks

if TYPE_CHECKING:
    from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.elevenlabs.io"
OUTPUT_FORMAT = "ulaw_8000"
_MAX_HEADER_BYTES = 4096

__all__ = ["ElevenLabsTTS", "strip_riff_header"]


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


def _error_detail(body: bytes) -> str:
    """A short reason from an ElevenLabs error body (``{"detail": {"status", "message"}}``)."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return ""
    if isinstance(detail, dict):
        return str(detail.get("status") or detail.get("message") or "")[:200]
    if isinstance(detail, str):
        return detail[:200]
    return ""


class ElevenLabsTTS:
    """Streams ElevenLabs speech (``ulaw_8000``) into a call, one reused HTTP client."""

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
        connect_timeout: float = 5.0,
        read_timeout: float = 15.0,
        mark_timeout: float = 30.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        cfg = settings()
        key = api_key or cfg.elevenlabs_api_key
        if not key:
            raise MissingCredentialError("ELEVENLABS_API_KEY", "ElevenLabs API key")
        self._api_key = key
        self.voice_id = voice_id or cfg.elevenlabs_voice_id
        self.model_id = model_id or cfg.elevenlabs_model
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.language_code = language_code
        self.voice_settings = voice_settings
        self.optimize_streaming_latency = optimize_streaming_latency
        self.mark_timeout = mark_timeout
        self.on_error: Callable[[str], None] | None = None
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._owns_client = http_client is None
        self._client = http_client
        self._client_lock = threading.Lock()

    # ------------------------------------------------------------------ client

    @property
    def client(self) -> httpx.Client:
        """The HTTP client every ``speak()`` shares (created on first use)."""
        with self._client_lock:
            if self._client is None:
                self._client = httpx.Client(
                    timeout=self._timeout,
                    headers={"xi-api-key": self._api_key},
                    limits=httpx.Limits(max_keepalive_connections=4),
                )
            return self._client

    def close(self) -> None:
        """Close the HTTP client (if this provider created it)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None and self._owns_client:
            client.close()

    def __enter__(self) -> ElevenLabsTTS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ synthesis

    def _request(self, text: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        url = f"{self.base_url}/v1/text-to-speech/{self.voice_id}/stream"
        params = {"output_format": OUTPUT_FORMAT}
        if self.optimize_streaming_latency is not None:
            params["optimize_streaming_latency"] = str(self.optimize_streaming_latency)
        body: dict[str, Any] = {"text": text, "model_id": self.model_id}
        if self.language_code:
            body["language_code"] = self.language_code
        if self.voice_settings:
            body["voice_settings"] = self.voice_settings
        return url, params, body

    def stream(self, text: str) -> Iterator[bytes]:
        """Yield μ-law 8 kHz chunks of ``text`` as the server sends them.

        Raises :class:`~voice_runtime.errors.ProviderError` on an HTTP error (``retryable``
        for 408/429/5xx) and :class:`~voice_runtime.errors.ProviderConnectionError` when the
        connection fails or the stream breaks off.
        """
        url, params, body = self._request(text)
        stripper = _RiffStripper()
        try:
            with self.client.stream("POST", url, params=params, json=body) as response:
                if response.status_code >= 400:
                    detail = _error_detail(response.read())
                    status = response.status_code
                    raise ProviderError(
                        f"HTTP {status}" + (f" ({detail})" if detail else ""),
                        provider="elevenlabs",
                        retryable=is_retryable_status(status),
                        status=status,
                        code=detail or None,
                    )
                for raw in response.iter_bytes():
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

    def speak(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Stream ``text`` into the call and wait until the caller heard it (blocking).

        Each chunk goes to the session as it arrives; ``stop_event`` is checked before every
        chunk. Returns the shared result dict.
        """
        forbid_on_loop(session.loop, "ElevenLabsTTS.speak")
        chunks = self.stream(text) if text.strip() else iter(())
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
            # Ends the HTTP response at once when speak() stopped early.
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
