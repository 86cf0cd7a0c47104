"""The exception tree of voice_runtime.

Every exception class the package defines derives from :class:`VoiceRuntimeError`
(``tests/test_errors_tree.py`` walks every module to keep it so). Classes whose home is
elsewhere (to avoid import cycles or a vendor SDK import here) are marked with their module.

::

    VoiceRuntimeError
    ├── ConfigurationError              a required setting is missing or invalid (a ValueError)
    │   ├── MissingCredentialError      names the environment variable to set
    │   │   └── MissingTwilioCredentialError     transports.twilio_models (RuntimeError)
    │   └── MissingStreamUrlError       VOICE_STREAM_URL is not set
    ├── SessionError
    │   ├── CallNotAnsweredError        the media stream did not connect in time
    │   ├── CallHangupError             the call ended during a listen operation
    │   │   └── IdleHangupError         the runtime hung up on a caller who stayed silent
    │   ├── NoEventLoopError            a cross-thread call before the session has a loop
    │   ├── LoopThreadError             a blocking call made on the event-loop thread
    │   └── CallRejectedError           realtime.hooks: a session resolver refused the call
    ├── CallbacksBusyError              _callbacks: too many user callbacks waiting
    ├── ClusterError                    cluster.state: no such call, owner gone, Redis down
    ├── ProtocolError                   a wire message we cannot use
    │   ├── MediaStreamError            transports.twilio_protocol: a bad Twilio frame
    │   ├── WebSocketProtocolError      transports.fastws: the peer broke RFC 6455
    │   └── MalformedMessage            realtime._base: a bad vendor field (a ValueError)
    ├── ProviderError                   a vendor failed; ``retryable`` says whether to retry
    │   ├── ProviderConnectionError     the vendor could not be reached (retryable)
    │   ├── VendorFatal                 realtime._base: the agent session cannot go on
    │   └── TwilioRestError             transports.twilio_models (TwilioRestException)
    │       ├── TwilioCallNotFoundRestError      (also a TwilioCallNotFoundError)
    │       └── TwilioTransportError    Twilio unreachable (also the HTTP library's error)
    ├── TwilioCallNotFoundError         transports.twilio_models (RuntimeError)
    └── TwilioCallListIncompleteError   transports.twilio_models (RuntimeError)

``ConfigurationError`` is also a ``ValueError`` (0.1.x raised ValueError for a bad setting such
as TWILIO_HTTP_TIMEOUT). Twilio errors keep the bases 0.1.x code catches: ``RuntimeError`` for
the call lookups, the SDK's ``TwilioRestException`` for REST failures.
"""

from __future__ import annotations


class VoiceRuntimeError(Exception):
    """Root of every error raised by voice_runtime."""


class ConfigurationError(VoiceRuntimeError, ValueError):
    """A required setting is missing or invalid; a ValueError too, as 0.1.x raised."""


class MissingCredentialError(ConfigurationError, RuntimeError):
    """A credential was neither passed explicitly nor found in the environment."""

    def __init__(self, variable: str, what: str | None = None) -> None:
        self.variable = variable
        label = what or variable
        super().__init__(f"{label} is not configured: pass it explicitly or set {variable}")


class MissingStreamUrlError(ConfigurationError, RuntimeError):
    """Raised when VOICE_STREAM_URL is not set."""

    def __init__(self) -> None:
        super().__init__(
            "Set VOICE_STREAM_URL to the public https:// (or wss://) base URL of this "
            "server, so Twilio can open the media stream (use a tunnel for local development)"
        )


class SessionError(VoiceRuntimeError):
    """Misuse or failure of a VoiceSession."""


class CallNotAnsweredError(SessionError):
    """Raised when the media stream does not connect within the timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"WebSocket did not connect within {timeout}s")


class CallHangupError(SessionError):
    """Raised when the call is hung up during a listen operation."""

    def __init__(self) -> None:
        super().__init__("Call was hung up during listen operation")


class IdleHangupError(CallHangupError):
    """Raised by ``Conversation.listen`` after it hung up on a caller who stayed silent."""

    def __init__(self) -> None:
        SessionError.__init__(self, "Call was ended: the caller stayed silent (idle timeout)")


class NoEventLoopError(SessionError):
    """A thread-safe session call was made before the session was bound to a loop."""


class LoopThreadError(SessionError):
    """A blocking call was made on the event-loop thread, where it would deadlock."""

    def __init__(self, method: str, twin: str | None = None) -> None:
        self.method = method
        self.twin = twin
        instead = f"use its async twin {twin}() instead" if twin else "call it from a worker thread"
        if twin:
            instead += ", or call it from a worker thread"
        super().__init__(
            f"{method}() blocks and was called on the event-loop thread, where it would "
            f"deadlock; {instead}"
        )


class ProtocolError(VoiceRuntimeError):
    """A wire message that cannot be used (malformed, unknown, out of order)."""


class ProviderError(VoiceRuntimeError):
    """A speech or agent vendor failed.

    ``retryable`` is True for connection errors, timeouts, 408, 429 and 5xx answers;
    False for other 4xx answers and terminal vendor errors (auth, quota, bad input).
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        retryable: bool = False,
        status: int | None = None,
        code: str | None = None,
    ) -> None:
        self.provider = provider
        self.retryable = retryable
        self.status = status
        self.code = code
        super().__init__(f"{provider}: {message}" if provider else message)


class ProviderConnectionError(ProviderError):
    """The vendor could not be reached; always retryable."""

    def __init__(self, message: str, *, provider: str = "") -> None:
        super().__init__(message, provider=provider, retryable=True)


def is_retryable_status(status: int) -> bool:
    """Return True for HTTP statuses worth retrying (408, 429, 5xx)."""
    return status in (408, 429) or 500 <= status <= 599


__all__ = [
    "CallHangupError",
    "CallNotAnsweredError",
    "ConfigurationError",
    "IdleHangupError",
    "LoopThreadError",
    "MissingCredentialError",
    "MissingStreamUrlError",
    "NoEventLoopError",
    "ProtocolError",
    "ProviderConnectionError",
    "ProviderError",
    "SessionError",
    "VoiceRuntimeError",
    "is_retryable_status",
]
