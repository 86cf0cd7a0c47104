"""ElevenLabs text-to-speech through the official ``elevenlabs`` SDK, as native μ-law 8 kHz.

:class:`ElevenLabsTTS` streams ``text_to_speech.convert(voice_id=..., model_id=..., text=...,
output_format="ulaw_8000")`` and hands every chunk to the call as it arrives: no ffmpeg, no
transcoding. ``speak_async`` is the core: it uses ``elevenlabs.AsyncElevenLabs`` on the
running loop (one client and connection pool per loop, kept alive across speaks), so no
thread waits on the vendor or on the caller. The blocking ``speak`` runs ``speak_async`` on
the session's loop (a private one for a mock session); :meth:`ElevenLabsTTS.stream` is a
plain sync iterator through ``elevenlabs.ElevenLabs``.

The SDK classes are looked up when a speak needs a client, so ``patch("elevenlabs.ElevenLabs")``
in a test takes effect: while ``elevenlabs.ElevenLabs`` is patched (0.1.x tests do it), every
speak, async or not, goes through that patched client. ``base_url`` points the SDK anywhere
(a proxy, or :class:`~voice_runtime.testing.fake_elevenlabs.FakeElevenLabsTts`).

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

import asyncio
import importlib
import json
import logging
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

from voice_runtime._sync import at_loop_shutdown, running_loop
from voice_runtime.config import ModuleConstants, settings
from voice_runtime.credentials import CREDENTIAL_VARIABLES, require_credential, resolve_credential
from voice_runtime.errors import (
    ProviderConnectionError,
    ProviderError,
    is_retryable_status,
)
from voice_runtime.providers import Capabilities
from voice_runtime.providers.base import nothing_to_say, play_chunks_async, speak_sync

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


class ElevenLabsTTS:
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
        # An async client belongs to the loop it was made on (its connection pool does):
        # one per loop, so speaking from two loops never shares (or closes) another's pool.
        self._aclients: dict[asyncio.AbstractEventLoop, _AsyncClient] = {}
        self._closing: set[asyncio.Task[None]] = set()

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

    def _sync_client_patched(self, sdk: Any) -> bool:
        """True when ``elevenlabs.ElevenLabs`` was replaced (a test's MagicMock, as in 0.1.x).

        Such a test expects the speech to go through the patched client, so the sync client
        is used then, even from ``speak_async``.
        """
        factory = sdk.ElevenLabs
        home = getattr(getattr(sdk, "client", None), "ElevenLabs", factory)
        return not isinstance(factory, type) or factory is not home

    def _async_client(self) -> _AsyncClient:
        """The ``AsyncElevenLabs`` client of the running loop (made on first use there)."""
        factory = import_elevenlabs_sdk().AsyncElevenLabs
        loop = asyncio.get_running_loop()
        with self._client_lock:
            current = self._aclients.get(loop)
        if current is not None and current.factory is factory:
            return current
        self._drop_async_client(loop)
        kwargs: dict[str, Any] = {"api_key": self._api_key}
        http: httpx.AsyncClient | None = None
        if isinstance(factory, type):
            kwargs["api_key"] = self._require_key()
            http = httpx.AsyncClient(
                timeout=self.read_timeout, limits=httpx.Limits(max_keepalive_connections=4)
            )
            kwargs["httpx_client"] = http
            kwargs["timeout"] = self.read_timeout
        if self._custom_base_url:
            kwargs["base_url"] = self.base_url
        made = _AsyncClient(factory(**kwargs), factory, http)
        with self._client_lock:
            for old in [lp for lp in self._aclients if lp.is_closed()]:
                del self._aclients[old]  # its loop is gone, and its sockets with it
            self._aclients[loop] = made
        if http is not None:
            # A server's loop ends with its shutdown: the pool must close before it.
            at_loop_shutdown(loop, self, self._release_async_client)
        return made

    def _drop_async_client(self, loop: asyncio.AbstractEventLoop) -> None:
        """Forget ``loop``'s async client; its pool is closed on that loop if it still runs."""
        with self._client_lock:
            gone = self._aclients.pop(loop, None)
        if gone is None or gone.http is None or loop.is_closed():
            return
        if running_loop() is loop:
            task = loop.create_task(gone.http.aclose())
            self._closing.add(task)  # keep a reference until it ran
            task.add_done_callback(self._closing.discard)
            return
        try:
            asyncio.run_coroutine_threadsafe(gone.http.aclose(), loop)
        except RuntimeError:
            pass  # closed meanwhile

    async def _release_async_client(self) -> None:
        """Close the running loop's async client now (a private loop that is about to end)."""
        with self._client_lock:
            gone = self._aclients.pop(asyncio.get_running_loop(), None)
        if gone is not None and gone.http is not None:
            await gone.http.aclose()

    async def aclose(self) -> None:
        """Close the connection pools (async twin of :meth:`close`)."""
        await self._release_async_client()
        self.close()

    def close(self) -> None:
        """Close the connection pools."""
        with self._client_lock:
            http, self._http = self._http, None
            self._client = self._client_factory = None
        if http is not None:
            http.close()
        with self._client_lock:
            loops = list(self._aclients)
        for loop in loops:
            self._drop_async_client(loop)

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
        except Exception as exc:
            mapped = _vendor_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            close = getattr(audio, "close", None)
            if close is not None:
                close()  # ends the HTTP response at once when speak() stopped early

    def astream(self, text: str) -> AsyncIterator[bytes]:
        """Async twin of :meth:`stream` through ``elevenlabs.AsyncElevenLabs`` (no thread).

        The client is resolved now, so a missing key or SDK raises here, not mid-stream.
        When a test patched ``elevenlabs.ElevenLabs``, the patched sync client is used.
        """
        sdk = import_elevenlabs_sdk()
        if self._sync_client_patched(sdk):
            return _as_async(self.stream(text))
        made = self._async_client()
        return self._achunks(made.client, text, real_sdk=made.http is not None)

    async def _achunks(self, client: Any, text: str, *, real_sdk: bool) -> AsyncIterator[bytes]:
        stripper = _RiffStripper()
        audio = client.text_to_speech.convert(**self._convert_kwargs(text, real_sdk=real_sdk))
        try:
            async for raw in audio:
                chunk = stripper.feed(raw)
                if chunk:
                    yield chunk
            tail = stripper.flush()
            if tail:
                yield tail
        except Exception as exc:
            mapped = _vendor_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            aclose = getattr(audio, "aclose", None)
            if aclose is not None:
                await aclose()  # ends the HTTP response at once when speak stopped early

    def speak(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Stream ``text`` into the call and wait until the caller heard it (blocking).

        Runs :meth:`speak_async` on the session's loop (a private one for a mock session).
        Returns the shared result dict; empty text returns at once.
        """
        return speak_sync(
            lambda: self._speak_and_release(text, session, stop_event),
            session,
            "ElevenLabsTTS.speak",
        )

    async def _speak_and_release(
        self, text: str, session: VoiceSession, stop_event: threading.Event | None
    ) -> dict[str, Any]:
        try:
            return await self.speak_async(text, session, stop_event)
        finally:
            if getattr(session, "loop", None) is not asyncio.get_running_loop():
                # A private loop ends with this speak: close its pool while it still runs.
                await self._release_async_client()

    async def speak_async(
        self,
        text: str,
        session: VoiceSession,
        stop_event: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Stream ``text`` into the call and await until the caller heard it (no thread).

        Each chunk goes to the session as it arrives; ``stop_event`` is checked before every
        chunk and while the caller listens. Returns the shared result dict.
        """
        if not text.strip():
            return nothing_to_say(text, session)
        return await play_chunks_async(
            text,
            session,
            self.astream(text),
            stop_event,
            on_error=self.on_error,
            provider="elevenlabs",
            mark_timeout=self.mark_timeout,
        )


class _AsyncClient:
    """An ``AsyncElevenLabs`` client, the class it was made from and the pool it owns."""

    __slots__ = ("client", "factory", "http")

    def __init__(self, client: Any, factory: Any, http: httpx.AsyncClient | None) -> None:
        self.client = client
        self.factory = factory
        self.http = http  # None for a stand-in class (a test's mock), which gets no pool


async def _as_async(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A sync chunk iterator (a patched 0.1.x client's) as an async one."""
    try:
        for chunk in chunks:
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _vendor_error(exc: Exception) -> Exception | None:
    """The provider error for an SDK or HTTP failure, or None when it is neither."""
    if isinstance(exc, httpx.TimeoutException):
        return ProviderConnectionError(f"timed out ({type(exc).__name__})", provider="elevenlabs")
    if isinstance(exc, httpx.TransportError):
        return ProviderConnectionError(
            f"stream failed ({type(exc).__name__})", provider="elevenlabs"
        )
    # The SDK's ApiError (and its subclasses) carry the HTTP status.
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int) or isinstance(status, bool):
        return None
    detail = _error_detail(getattr(exc, "body", None))
    return ProviderError(
        f"HTTP {status}" + (f" ({detail})" if detail else ""),
        provider="elevenlabs",
        retryable=is_retryable_status(status),
        status=status,
        code=detail or None,
    )
