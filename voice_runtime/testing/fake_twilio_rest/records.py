"""Records of the fake Twilio REST API: requests, calls, recordings, messages, faults."""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_AUTH_TOKEN = "fake-auth-token"
DEFAULT_API_HOST = "api.twilio.com"
API_HOST_HEADER = "X-Voice-Runtime-Api-Host"

TERMINAL_CALL_STATUSES = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
_API_PREFIX = "/2010-04-01/Accounts/"
_ROUTE = re.compile(r"/2010-04-01/Accounts/(?P<account>[^/]+)/(?P<rest>.+)")
# Any SID the client may send (voice_runtime accepts e.g. "CA-test"), one path segment each.
_CALL = re.compile(r"Calls/(?P<call>[^/]+)\.json")
_RECORDINGS = re.compile(r"Calls/(?P<call>[^/]+)/Recordings\.json")
_RECORDING = re.compile(r"Calls/(?P<call>[^/]+)/Recordings/(?P<rec>[^/]+)\.json")
_STATUS_TEXT = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
}


def _sid(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _rfc2822(moment: datetime | None) -> str | None:
    return None if moment is None else format_datetime(moment.astimezone(UTC))


def _parse_filter_time(value: str) -> tuple[datetime, bool] | None:
    """Parse a StartTime filter value; return (instant, date_only) or None when malformed."""
    text = value.strip()
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC), True
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment, False


@dataclass(frozen=True)
class FakeRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: tuple[tuple[str, str], ...]
    form: tuple[tuple[str, str], ...]
    auth_user: str | None
    api_host: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def field(self, name: str) -> str | None:
        """The first form value of ``name``, or None."""
        return next((value for key, value in self.form if key == name), None)

    def fields(self, name: str) -> list[str]:
        """Every form value of ``name``, in order (repeated keys such as StatusCallbackEvent)."""
        return [value for key, value in self.form if key == name]

    def param(self, name: str) -> str | None:
        """The first query value of ``name``, or None."""
        return next((value for key, value in self.query if key == name), None)

    @property
    def form_dict(self) -> dict[str, str]:
        """Form fields as a dict (the last value wins for repeated keys)."""
        return dict(self.form)


@dataclass
class FakeCall:
    """A call the fake knows, created through the API or seeded with ``add_call``."""

    sid: str
    account_sid: str
    api_host: str
    to: str
    from_: str
    status: str = "queued"
    direction: str = "outbound-api"
    twiml: str | None = None
    url: str | None = None
    method: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))
    params: tuple[tuple[str, str], ...] = ()
    updates: list[tuple[tuple[str, str], ...]] = field(default_factory=list)
    callback_seq: int = 0

    def to_json(self) -> dict[str, Any]:
        """The call as Twilio's JSON resource."""
        path = f"{_API_PREFIX}{self.account_sid}/Calls/{self.sid}"
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "to": self.to,
            "to_formatted": self.to,
            "from": self.from_,
            "from_formatted": self.from_,
            "status": self.status,
            "direction": self.direction,
            "start_time": _rfc2822(self.start_time),
            "end_time": _rfc2822(self.end_time),
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(datetime.now(UTC)),
            "parent_call_sid": None,
            "answered_by": None,
            "duration": None,
            "price": None,
            "uri": f"{path}.json",
            "subresource_uris": {"recordings": f"{path}/Recordings.json"},
        }


@dataclass
class FakeRecording:
    """A recording started on a call."""

    sid: str
    account_sid: str
    call_sid: str
    status: str = "in-progress"
    params: tuple[tuple[str, str], ...] = ()
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        """The recording as Twilio's JSON resource."""
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "call_sid": self.call_sid,
            "api_version": "2010-04-01",
            "status": self.status,
            "channels": 1,
            "source": "StartCallRecordingAPI",
            "start_time": _rfc2822(self.date_created),
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(datetime.now(UTC)),
            "duration": None,
            "uri": (
                f"{_API_PREFIX}{self.account_sid}/Calls/{self.call_sid}/Recordings/{self.sid}.json"
            ),
        }


@dataclass
class FakeMessage:
    """A message sent through the fake."""

    sid: str
    account_sid: str
    to: str
    from_: str | None
    body: str
    media_urls: tuple[str, ...] = ()
    messaging_service_sid: str | None = None
    status_callback: str | None = None
    status: str = "queued"
    date_created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> dict[str, Any]:
        """The message as Twilio's JSON resource."""
        return {
            "sid": self.sid,
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "to": self.to,
            "from": self.from_,
            "body": self.body,
            "status": self.status,
            "direction": "outbound-api",
            "num_media": str(len(self.media_urls)),
            "num_segments": "1",
            "messaging_service_sid": self.messaging_service_sid,
            "date_created": _rfc2822(self.date_created),
            "date_updated": _rfc2822(self.date_created),
            "date_sent": None,
            "error_code": None,
            "error_message": None,
            "price": None,
            "uri": f"{_API_PREFIX}{self.account_sid}/Messages/{self.sid}.json",
        }


@dataclass
class FaultRule:
    """A scripted answer: an error (status, code, message) or a raw JSON ``body``.

    It matches requests by ``method``, ``path`` (a regex searched in the path) and
    ``host`` (the intended API host); ``times`` None means every match, else it is used up.
    ``delay`` holds the answer back that many seconds (to exercise client timeouts).
    """

    status: int
    code: int | None = None
    message: str | None = None
    method: str | None = None
    path: str | None = None
    host: str | None = None
    times: int | None = 1
    body: Any = None
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str, host: str) -> bool:
        """Whether this rule applies to the request."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.host is not None and self.host != host:
            return False
        return self.path is None or re.search(self.path, path) is not None


class _Answer(Exception):
    """Raised inside a route to answer at once with an error (or a given body)."""

    def __init__(self, status: int, code: int | None = None, message: str = "", body: Any = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.body = body


def _error_body(status: int, code: int | None, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}" if code else None,
        "status": status,
    }


def _time_matches(start: datetime | None, op: str, when: datetime, date_only: bool) -> bool:
    """Apply one StartTime filter (date-only values compare whole UTC days)."""
    if start is None:
        return False
    if date_only:
        day, limit = start.astimezone(UTC).date(), when.date()
        return {
            ">": day >= limit,  # Twilio's date filters are inclusive of the day
            ">=": day >= limit,
            "<": day <= limit,
            "<=": day <= limit,
            "": day == limit,
        }[op]
    return {
        # Approximates Twilio's coarse filter: inclusive, so clients must filter exactly.
        ">": start >= when,
        ">=": start >= when,
        "<": start <= when,
        "<=": start <= when,
        "": start == when,
    }[op]
