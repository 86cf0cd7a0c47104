"""Typed values and errors for the Twilio REST side (calls, regions, call records).

::

    VoiceRuntimeError
    ├── MissingCredentialError
    │   └── MissingTwilioCredentialError   also a RuntimeError, as in 0.1.x
    ├── TwilioCallNotFoundError            also a RuntimeError; ``attempted_hosts``
    │   └── TwilioCallNotFoundRestError    without regions: also a TwilioRestError (404/20404)
    ├── TwilioCallListIncompleteError      also a RuntimeError; ``api_host``, ``pages_fetched``
    └── ProviderError
        └── TwilioRestError                also a twilio ``TwilioRestException``; ``status``,
            │                              ``code``, ``message``, ``retryable``, cause kept
            └── TwilioTransportError       Twilio unreachable or timed out; also an instance
                                           of the HTTP library's exception (requests.Timeout)
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator
from twilio.base.exceptions import TwilioRestException

from voice_runtime.errors import (
    MissingCredentialError,
    ProviderError,
    VoiceRuntimeError,
    is_retryable_status,
)

DEFAULT_API_HOST = "api.twilio.com"

_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_REGIONAL_HOST = re.compile(rf"api\.{_DNS_LABEL}\.{_DNS_LABEL}\.twilio\.com")


_SID_FORBIDDEN = frozenset("/?#%\\")


def validate_sid(value: object) -> str:
    """Return ``value`` if it is a SID that cannot change a request path, else raise ValueError.

    Any non-empty string is accepted (as 0.1.x did, e.g. ``"CA-test"``) except one holding
    ``/ ? # % \\``, whitespace or control characters, or a bare ``.``/``..``: the SDK pastes
    SIDs into URL paths unquoted, so those could change the path or a header.
    """
    if (
        not isinstance(value, str)
        or not value
        or value in (".", "..")
        or any(
            char in _SID_FORBIDDEN or char.isspace() or unicodedata.category(char) == "Cc"
            for char in value
        )
    ):
        raise ValueError(
            "SID must be a non-empty string without '/', '?', '#', '%', '\\', whitespace or "
            "control characters (they would change the request path)"
        )
    return value


def validate_account_sid(value: object) -> str:
    """Return ``value`` if it is a non-empty ASCII alphanumeric account SID, else ValueError."""
    if not isinstance(value, str) or not value.isascii() or not value.isalnum():
        raise ValueError("account SID must be a non-empty ASCII alphanumeric string")
    return value


def validate_api_host(value: object) -> str:
    """Return ``value`` if it is ``api.twilio.com`` or ``api.{edge}.{region}.twilio.com``."""
    if not isinstance(value, str) or (
        value != DEFAULT_API_HOST and not _REGIONAL_HOST.fullmatch(value)
    ):
        raise ValueError(
            "api_host must be api.twilio.com or api.{edge}.{region}.twilio.com "
            "(lowercase DNS labels)"
        )
    return value


class TwilioRegion(BaseModel):
    """Where and as whom to reach Twilio: API host, account SID and (user, secret) auth."""

    model_config = ConfigDict(
        frozen=True,
        strict=True,
        hide_input_in_errors=True,
        revalidate_instances="always",
    )

    api_host: str
    account_sid: str
    auth: tuple[str, str] = Field(repr=False)

    @field_validator("api_host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return validate_api_host(value)

    @field_validator("account_sid")
    @classmethod
    def _check_account(cls, value: str) -> str:
        return validate_account_sid(value)

    @field_validator("auth")
    @classmethod
    def _check_auth(cls, value: tuple[str, str]) -> tuple[str, str]:
        if any(not part.strip() for part in value):
            raise ValueError("auth needs two non-blank strings (user, secret)")
        return value

    @property
    def edge(self) -> str | None:
        """The edge label of a regional host, None for ``api.twilio.com``."""
        parts = self.api_host.split(".")
        return parts[1] if len(parts) == 5 else None

    @property
    def region(self) -> str | None:
        """The region label of a regional host, None for ``api.twilio.com``."""
        parts = self.api_host.split(".")
        return parts[2] if len(parts) == 5 else None


class TwilioCallRow(BaseModel):
    """One call record: SID, status, start time (epoch seconds or None), direction, caller."""

    model_config = ConfigDict(frozen=True, strict=True, hide_input_in_errors=True)

    call_sid: str
    status: str
    start_time: float | None
    direction: str
    caller: str | None

    @field_validator("call_sid", "status", "direction")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("caller")
    @classmethod
    def _blank_caller_is_unknown(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return value


class _CallRecord(BaseModel):
    """A raw call record as Twilio sends it, checked before any lossy SDK parsing."""

    model_config = ConfigDict(strict=True, hide_input_in_errors=True)

    sid: str
    status: str
    direction: str
    start_time: datetime | None
    caller: str | None = Field(default=None, alias="from")

    @field_validator("start_time", mode="before")
    @classmethod
    def _rfc2822_with_offset(cls, value: object) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise ValueError("start_time must be an RFC 2822 date string or null")
        try:
            parsed = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            raise ValueError("start_time is not an RFC 2822 date") from None
        # "-0000" (and a missing zone) parse as naive: the instant is unknown, so refuse.
        if parsed.utcoffset() is None:
            raise ValueError("start_time must carry a UTC offset")
        return parsed.astimezone(UTC)

    def to_row(self) -> TwilioCallRow:
        """Convert to the public five-field row."""
        return TwilioCallRow(
            call_sid=self.sid,
            status=self.status,
            start_time=None if self.start_time is None else self.start_time.timestamp(),
            direction=self.direction,
            caller=self.caller,
        )


class _CallPage(BaseModel):
    """One page of ``Calls.json``: the records and the (explicit, maybe null) next link."""

    model_config = ConfigDict(strict=True, hide_input_in_errors=True)

    calls: list[_CallRecord]
    next_page_uri: str | None


class MissingTwilioCredentialError(MissingCredentialError, RuntimeError):
    """A Twilio setting is missing; a RuntimeError too, as the 0.1.x package raised."""


class TwilioCallNotFoundError(VoiceRuntimeError, RuntimeError):
    """No region knew the call (every one answered 404 with code 20404)."""

    def __init__(self, attempted_hosts: tuple[str, ...]) -> None:
        self.attempted_hosts = tuple(attempted_hosts)
        super().__init__(f"Call not found in: {', '.join(self.attempted_hosts)}")


class TwilioCallListIncompleteError(VoiceRuntimeError, RuntimeError):
    """The call list still had a next page when the page cap was reached."""

    def __init__(self, api_host: str, pages_fetched: int) -> None:
        self.api_host = api_host
        self.pages_fetched = pages_fetched
        super().__init__(f"Call list from {api_host} is incomplete after {pages_fetched} page(s)")


class TwilioRestError(ProviderError, TwilioRestException):
    """A Twilio REST request failed.

    ``status`` is the HTTP status (None when Twilio could not be reached), ``code`` the
    Twilio error code (an int, when Twilio sent one), ``message`` Twilio's text and
    ``retryable`` True for connection errors, timeouts, 408, 429 and 5xx. The original
    exception is kept as ``__cause__``. Because it is also a ``TwilioRestException``, code
    written against 0.1.x that caught the SDK's exception still catches it.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        retryable: bool | None = None,
        uri: str = "",
        method: str = "",
    ) -> None:
        if retryable is None:
            retryable = status is None or is_retryable_status(status)
        if status is None:
            text = f"could not reach the Twilio REST API: {message}"
        else:
            suffix = f", code {code}" if code is not None else ""
            text = f"HTTP {status}{suffix}: {message}"
        # Both bases have their own __init__ (and ProviderError's super() would land in the
        # SDK's), so set the attributes of both here.
        Exception.__init__(self, f"twilio: {text}")
        self.provider = "twilio"
        self.retryable = retryable
        self.status = status
        self.code = code  # type: ignore[assignment]
        self.message = message
        self.msg = message
        self.uri = uri
        self.method = method
        self.details = None

    def __str__(self) -> str:
        # The SDK's __str__ prints ANSI colours on a tty; a library error should not.
        return Exception.__str__(self)

    @classmethod
    def from_exception(cls, exc: BaseException) -> TwilioRestError:
        """Describe an SDK or transport exception as a TwilioRestError (cause not set)."""
        if isinstance(exc, TwilioRestError):
            return exc
        status = getattr(exc, "status", None)
        if isinstance(status, int) and not isinstance(status, bool):
            code = getattr(exc, "code", None)
            code = code if isinstance(code, int) and not isinstance(code, bool) else None
            message = (
                getattr(exc, "msg", None)
                or getattr(exc, "detail", None)
                or getattr(exc, "title", None)
                or type(exc).__name__
            )
            return cls(
                str(message),
                status=status,
                code=code,
                uri=str(getattr(exc, "uri", "") or ""),
                method=str(getattr(exc, "method", "") or ""),
            )
        return cls(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class TwilioCallNotFoundRestError(TwilioCallNotFoundError, TwilioRestError):
    """Hang-up without regions of a call Twilio does not know (404, code 20404).

    Both a :class:`TwilioCallNotFoundError` and a :class:`TwilioRestError` (so the SDK's
    ``TwilioRestException``, which the SDK's 404 answer was in 0.1.x).
    """

    def __init__(self, attempted_hosts: tuple[str, ...], *, uri: str = "") -> None:
        TwilioRestError.__init__(
            self, "call not found", status=404, code=20404, retryable=False, uri=uri, method="POST"
        )
        self.attempted_hosts = tuple(attempted_hosts)
        self.args = (f"Call not found in: {', '.join(self.attempted_hosts)}",)


class TwilioTransportError(TwilioRestError):
    """Twilio could not be reached (connection refused, DNS, timeout): ``status`` is None.

    Each instance is also an instance of the HTTP library's exception it replaces (for
    example ``requests.exceptions.ReadTimeout``), so ``except requests.Timeout`` written
    against 0.1.x still catches it. Build them with :func:`transport_error`.
    """


_TRANSPORT_CLASSES: dict[type[BaseException], type[TwilioTransportError]] = {}
_URL_QUERY = re.compile(r"\?[^\s'\"()<>]*")


def _transport_class(kind: type[BaseException]) -> type[TwilioTransportError]:
    cls = _TRANSPORT_CLASSES.get(kind)
    if cls is None:
        try:
            cls = type(
                f"TwilioTransportError[{kind.__name__}]",
                (TwilioTransportError, kind),
                {"__module__": __name__, "__str__": TwilioRestError.__str__},
            )
        except TypeError:  # an exception type that cannot be combined (layout, final class)
            cls = TwilioTransportError
        cls = _TRANSPORT_CLASSES.setdefault(kind, cls)
    return cls


def transport_error(exc: BaseException) -> TwilioRestError:
    """A retryable TwilioRestError for a transport failure, also of ``exc``'s own type."""
    # URLs in transport messages carry the query (To=phone number): drop it.
    detail = _URL_QUERY.sub("?…", str(exc))
    message = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    cls = _transport_class(type(exc))
    error = cls.__new__(cls, message)
    TwilioRestError.__init__(error, message)
    # Attributes the HTTP library's own code and users read (request, response, ...).
    for name, value in getattr(exc, "__dict__", {}).items():
        error.__dict__.setdefault(name, value)
    return error


def parse_call_page(payload: object) -> tuple[list[TwilioCallRow], str | None]:
    """Validate one raw ``Calls.json`` page; return its rows and its next-page link."""
    page = _CallPage.model_validate(payload)
    return [record.to_row() for record in page.calls], page.next_page_uri


__all__ = [
    "DEFAULT_API_HOST",
    "MissingTwilioCredentialError",
    "TwilioCallListIncompleteError",
    "TwilioCallNotFoundError",
    "TwilioCallNotFoundRestError",
    "TwilioCallRow",
    "TwilioRegion",
    "TwilioRestError",
    "TwilioTransportError",
    "parse_call_page",
    "transport_error",
    "validate_account_sid",
    "validate_api_host",
    "validate_sid",
]
