"""A fake Twilio REST API on 127.0.0.1, for testing code that places calls and sends SMS.

It speaks the real wire format (form-encoded requests, Basic auth, snake_case JSON, Twilio
error bodies), so the official ``twilio`` SDK and voice_runtime's REST helpers run against
it unchanged::

    from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest

    def test_places_call(monkeypatch):
        with FakeTwilioRest() as fake:
            for name, value in fake.env().items():
                monkeypatch.setenv(name, value)
            monkeypatch.setenv("TWILIO_PHONE_NUMBER", "+15550001111")
            monkeypatch.setenv("VOICE_STREAM_URL", "https://bot.example.com")
            call_sid = initiate_outbound_call("+15550002222")
            assert fake.calls[call_sid].twiml.startswith("<?xml")

voice_runtime's clients send requests meant for ``https://api.twilio.com`` (or a regional
``api.{edge}.{region}.twilio.com``) to TWILIO_API_BASE_URL and name the intended host in the
``X-Voice-Runtime-Api-Host`` header; the fake keeps calls per host, so regional behaviour
(404/20404 in the wrong region) is real. A plain SDK client can be pointed here with any
``http_client`` that rewrites URLs the same way.

Implemented: ``POST/GET …/Calls.json`` (create; list with To/From/Status/StartTime filters
and paging), ``POST/GET …/Calls/{CA}.json``, ``POST/GET …/Calls/{CA}/Recordings.json``,
``POST/GET …/Calls/{CA}/Recordings/{RE}.json`` and ``POST …/Messages.json``. Every request
is recorded in :attr:`FakeTwilioRest.requests`; faults are scripted with
:meth:`FakeTwilioRest.fail_next`, :meth:`FakeTwilioRest.add_fault` and
:meth:`FakeTwilioRest.respond_next`.

The server is a stdlib ``ThreadingHTTPServer`` on its own thread; :meth:`FakeTwilioRest.stop`
joins that thread and every request thread and closes the socket.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from voice_runtime.testing._serve import bind_free_socket
from voice_runtime.transports.twilio_models import TwilioRegion

logger = logging.getLogger(__name__)

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


class _Server(ThreadingHTTPServer):
    # Request threads are joined by server_close(), so stop() leaves no thread behind.
    daemon_threads = False
    block_on_close = True
    fake: FakeTwilioRest


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0  # a silent client cannot hold stop() for long
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Silent: request lines carry phone numbers in queries; see FakeTwilioRest.requests.
        return

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.server.fake._handle(self, "GET")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.server.fake._handle(self, "POST")

    def do_DELETE(self) -> None:  # noqa: N802 - stdlib naming
        self.server.fake._handle(self, "DELETE")

    def send_json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        """Write one JSON answer."""
        data = json.dumps(body).encode()
        self.send_response(status, _STATUS_TEXT.get(status))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


class FakeTwilioRest:
    """A fake Twilio REST API served from a background thread on 127.0.0.1.

    Use it as a context manager or call :meth:`start` / :meth:`stop`. :meth:`env` gives the
    environment variables that point voice_runtime at it.
    """

    def __init__(
        self,
        *,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        host: str = "127.0.0.1",
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.host = host
        self._accounts: dict[str, str] = {account_sid: auth_token}
        self._lock = threading.Lock()
        self._requests: list[FakeRequest] = []
        self._calls: dict[str, FakeCall] = {}
        self._recordings: dict[str, FakeRecording] = {}
        self._messages: dict[str, FakeMessage] = {}
        self._faults: list[FaultRule] = []
        self._call_callbacks: list[Callable[[FakeCall], None]] = []
        self.callback_errors: list[BaseException] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> FakeTwilioRest:
        """Bind a free port and serve in a background thread; return self."""
        if self._server is not None:
            raise RuntimeError("FakeTwilioRest is already running")
        self._stopping.clear()
        server = _Server((self.host, 0), _Handler, bind_and_activate=False)
        server.socket.close()  # replaced by the shared free-port socket (already listening)
        server.socket = bind_free_socket(self.host, blocking=True)
        server.server_address = server.socket.getsockname()
        server.fake = self
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="FakeTwilioRest",
            daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, join every thread and close the socket (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes delayed answers
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeTwilioRest:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port."""
        if self._server is None:
            raise RuntimeError("FakeTwilioRest is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:{port}``: the value for TWILIO_API_BASE_URL."""
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point voice_runtime at this fake with its credentials."""
        return {
            "TWILIO_API_BASE_URL": self.base_url,
            "TWILIO_ACCOUNT_SID": self.account_sid,
            "TWILIO_AUTH_TOKEN": self.auth_token,
        }

    def region(self, api_host: str = DEFAULT_API_HOST) -> TwilioRegion:
        """A TwilioRegion for ``api_host`` with this fake's default account."""
        from voice_runtime.transports.twilio_models import TwilioRegion

        return TwilioRegion(
            api_host=api_host,
            account_sid=self.account_sid,
            auth=(self.account_sid, self.auth_token),
        )

    def add_account(self, account_sid: str, auth_token: str) -> None:
        """Accept another account (Basic auth ``account_sid:auth_token``)."""
        with self._lock:
            self._accounts[account_sid] = auth_token

    # ----------------------------------------------------------------- state

    @property
    def requests(self) -> list[FakeRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    @property
    def calls(self) -> dict[str, FakeCall]:
        """Calls by SID (a copy of the mapping; the calls are live objects)."""
        with self._lock:
            return dict(self._calls)

    @property
    def recordings(self) -> dict[str, FakeRecording]:
        """Recordings by SID."""
        with self._lock:
            return dict(self._recordings)

    @property
    def messages(self) -> dict[str, FakeMessage]:
        """Messages by SID."""
        with self._lock:
            return dict(self._messages)

    def add_call(
        self,
        to: str,
        *,
        from_: str = "+15550000000",
        status: str = "completed",
        direction: str = "inbound",
        start_time: datetime | None = None,
        api_host: str = DEFAULT_API_HOST,
        account_sid: str | None = None,
        sid: str | None = None,
    ) -> FakeCall:
        """Seed a call (for listing or updating) and return it."""
        call = FakeCall(
            sid=sid or _sid("CA"),
            account_sid=account_sid or self.account_sid,
            api_host=api_host,
            to=to,
            from_=from_,
            status=status,
            direction=direction,
            start_time=start_time,
            date_created=start_time or datetime.now(UTC),
        )
        with self._lock:
            self._calls[call.sid] = call
        return call

    def set_call_status(self, call_sid: str, status: str) -> None:
        """Move a call to ``status`` (``in-progress`` also sets its start time)."""
        with self._lock:
            call = self._calls[call_sid]
            call.status = status
            if status == "in-progress" and call.start_time is None:
                call.start_time = datetime.now(UTC)
            if status in TERMINAL_CALL_STATUSES and call.end_time is None:
                call.end_time = datetime.now(UTC)

    # ----------------------------------------------------------------- faults and hooks

    def add_fault(
        self,
        status: int,
        code: int | None = None,
        message: str | None = None,
        *,
        method: str | None = None,
        path: str | None = None,
        host: str | None = None,
        times: int | None = None,
        body: Any = None,
        delay: float = 0.0,
    ) -> FaultRule:
        """Answer matching requests with an error (or ``body``); ``times`` None = always."""
        rule = FaultRule(
            status=status,
            code=code,
            message=message,
            method=method,
            path=path,
            host=host,
            times=times,
            body=body,
            delay=delay,
        )
        with self._lock:
            self._faults.append(rule)
        return rule

    def fail_next(
        self,
        status: int,
        code: int | None = None,
        message: str | None = None,
        *,
        method: str | None = None,
        path: str | None = None,
        host: str | None = None,
        delay: float = 0.0,
    ) -> FaultRule:
        """Answer the next matching request with this Twilio error, once."""
        return self.add_fault(
            status, code, message, method=method, path=path, host=host, times=1, delay=delay
        )

    def respond_next(
        self,
        status: int,
        body: Any,
        *,
        method: str | None = None,
        path: str | None = None,
        host: str | None = None,
    ) -> FaultRule:
        """Answer the next matching request with ``body`` as JSON (a str is sent as is)."""
        return self.add_fault(status, method=method, path=path, host=host, times=1, body=body)

    def clear_faults(self) -> None:
        """Drop every scripted fault."""
        with self._lock:
            self._faults.clear()

    def on_call_created(self, callback: Callable[[FakeCall], None]) -> Callable[[FakeCall], None]:
        """Call ``callback(call)`` after each created call has been answered (201).

        It runs on the request's thread; exceptions are kept in :attr:`callback_errors`.
        Long work (dialling the TwiML's stream with a caller simulator) belongs on its
        own thread. Usable as a decorator.
        """
        with self._lock:
            self._call_callbacks.append(callback)
        return callback

    # ----------------------------------------------------------------- HTTP

    def _handle(self, handler: _Handler, method: str) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        form: tuple[tuple[str, str], ...] = ()
        if raw and "json" not in (handler.headers.get("Content-Type") or ""):
            form = tuple(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        user, password = self._basic_auth(handler.headers.get("Authorization"))
        request = FakeRequest(
            method=method,
            path=parts.path,
            query=tuple(parse_qsl(parts.query, keep_blank_values=True)),
            form=form,
            auth_user=user,
            api_host=handler.headers.get(API_HOST_HEADER) or DEFAULT_API_HOST,
            headers=dict(handler.headers.items()),
        )
        with self._lock:
            self._requests.append(request)
            rule = next(
                (r for r in self._faults if r.matches(method, parts.path, request.api_host)),
                None,
            )
            if rule is not None:
                rule.hits += 1
        if rule is not None:
            if rule.delay > 0 and self._stopping.wait(rule.delay):
                return
            if rule.body is not None:
                self._send_raw(handler, rule.status, rule.body)
            else:
                message = rule.message or f"Scripted error {rule.code or rule.status}"
                handler.send_json(rule.status, _error_body(rule.status, rule.code, message))
            return
        if not self._authorized(user, password):
            handler.send_json(
                401,
                _error_body(401, 20003, "Authenticate"),
                {"WWW-Authenticate": 'Basic realm="Twilio API"'},
            )
            return
        created: FakeCall | None = None
        try:
            status, body, created = self._route(request, user or "")
        except _Answer as answer:
            if answer.body is not None:
                self._send_raw(handler, answer.status, answer.body)
            else:
                handler.send_json(
                    answer.status, _error_body(answer.status, answer.code, answer.message)
                )
            return
        handler.send_json(status, body)
        if created is not None:
            self._notify_created(created)

    @staticmethod
    def _send_raw(handler: _Handler, status: int, body: Any) -> None:
        if isinstance(body, str):
            data = body.encode()
            handler.send_response(status, _STATUS_TEXT.get(status))
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
        else:
            handler.send_json(status, body)

    @staticmethod
    def _basic_auth(header: str | None) -> tuple[str | None, str | None]:
        if not header or not header.lower().startswith("basic "):
            return None, None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None, None
        user, sep, password = decoded.partition(":")
        return (user, password) if sep else (None, None)

    def _authorized(self, user: str | None, password: str | None) -> bool:
        with self._lock:
            return user is not None and self._accounts.get(user) == password

    def _notify_created(self, call: FakeCall) -> None:
        with self._lock:
            callbacks = list(self._call_callbacks)
        snapshot = dataclasses.replace(call, updates=list(call.updates))
        for callback in callbacks:
            try:
                callback(snapshot)
            except Exception as exc:  # kept for the test to assert on
                logger.exception("on_call_created callback failed")
                with self._lock:
                    self.callback_errors.append(exc)

    def _route(self, request: FakeRequest, user: str) -> tuple[int, Any, FakeCall | None]:
        match = _ROUTE.fullmatch(request.path)
        if match is None or match["account"] != user:
            raise _Answer(404, 20404, f"The requested resource {request.path} was not found")
        rest, method = match["rest"], request.method
        if rest == "Calls.json":
            if method == "POST":
                call = self._create_call(request, user)
                return 201, call.to_json(), call
            if method == "GET":
                return 200, self._list_calls(request, user), None
        elif found := _CALL.fullmatch(rest):
            call = self._find_call(request, user, found["call"])
            if method == "POST":
                return 200, self._update_call(request, call), None
            if method == "GET":
                return 200, call.to_json(), None
        elif found := _RECORDINGS.fullmatch(rest):
            call = self._find_call(request, user, found["call"])
            if method == "POST":
                return 201, self._create_recording(request, call), None
            if method == "GET":
                return 200, self._list_recordings(request, call), None
        elif found := _RECORDING.fullmatch(rest):
            call = self._find_call(request, user, found["call"])
            recording = self._find_recording(request, call, found["rec"])
            if method == "POST":
                return 200, self._update_recording(request, recording), None
            if method == "GET":
                return 200, recording.to_json(), None
        elif rest == "Messages.json" and method == "POST":
            return 201, self._create_message(request, user), None
        raise _Answer(404, 20404, f"The requested resource {request.path} was not found")

    # ----------------------------------------------------------------- resources

    def _find_call(self, request: FakeRequest, account: str, call_sid: str) -> FakeCall:
        with self._lock:
            call = self._calls.get(call_sid)
        if call is None or call.account_sid != account or call.api_host != request.api_host:
            raise _Answer(404, 20404, f"The requested resource {request.path} was not found")
        return call

    def _create_call(self, request: FakeRequest, account: str) -> FakeCall:
        to, from_ = request.field("To"), request.field("From")
        twiml, url = request.field("Twiml"), request.field("Url")
        if not to:
            raise _Answer(400, 21201, "No 'To' number is specified")
        if not from_:
            raise _Answer(400, 21213, "No 'From' number is specified")
        if not twiml and not url and not request.field("ApplicationSid"):
            raise _Answer(400, 21205, "Url parameter is required.")
        if twiml is not None and len(twiml) > 4000:
            raise _Answer(400, 21232, "Twiml parameter is too long (max 4000 characters)")
        call = FakeCall(
            sid=_sid("CA"),
            account_sid=account,
            api_host=request.api_host,
            to=to,
            from_=from_,
            twiml=twiml,
            url=url,
            method=request.field("Method"),
            params=request.form,
        )
        with self._lock:
            self._calls[call.sid] = call
        return call

    def _update_call(self, request: FakeRequest, call: FakeCall) -> dict[str, Any]:
        status = request.field("Status")
        with self._lock:
            if call.status in TERMINAL_CALL_STATUSES:
                raise _Answer(400, 21220, "Call is not in-progress. Cannot redirect.")
            if status is not None and status not in ("completed", "canceled"):
                raise _Answer(400, 20001, f"Invalid call status {status}")
            call.updates.append(request.form)
            if request.field("Twiml") is not None:
                call.twiml, call.url = request.field("Twiml"), None
            if request.field("Url") is not None:
                call.url, call.twiml = request.field("Url"), None
            if status is not None:
                call.status = status
                call.end_time = datetime.now(UTC)
            return call.to_json()

    def _list_calls(self, request: FakeRequest, account: str) -> dict[str, Any]:
        query = dict(request.query)
        try:
            page_size = min(max(int(query.get("PageSize", "50")), 1), 1000)
            page = max(int(query.get("Page", "0")), 0)
        except ValueError:
            raise _Answer(400, 20001, "Invalid paging parameters") from None
        filters: list[tuple[str, datetime, bool]] = []
        for key in ("StartTime>", "StartTime>=", "StartTime<", "StartTime<=", "StartTime"):
            if key in query:
                parsed = _parse_filter_time(query[key])
                if parsed is None:
                    raise _Answer(400, 20001, f"Invalid {key} filter")
                filters.append((key[len("StartTime") :], *parsed))
        with self._lock:
            candidates = [
                call
                for call in self._calls.values()
                if call.account_sid == account and call.api_host == request.api_host
            ]
        selected = [
            call
            for call in candidates
            if (query.get("To") in (None, call.to))
            and (query.get("From") in (None, call.from_))
            and (query.get("Status") in (None, call.status))
            and all(_time_matches(call.start_time, op, when, day) for op, when, day in filters)
        ]
        selected.sort(key=lambda call: call.date_created, reverse=True)
        chunk = selected[page * page_size : (page + 1) * page_size]
        base_query = [(k, v) for k, v in request.query if k not in ("Page", "PageToken")]

        def page_uri(number: int) -> str:
            extra = [("Page", str(number))]
            if number > 0:
                extra.append(("PageToken", f"PA{number}"))
            return f"{request.path}?{urlencode(base_query + extra)}"

        has_next = (page + 1) * page_size < len(selected)
        return {
            "calls": [call.to_json() for call in chunk],
            "page": page,
            "page_size": page_size,
            "start": page * page_size,
            "end": page * page_size + max(len(chunk) - 1, 0),
            "uri": page_uri(page),
            "first_page_uri": page_uri(0),
            "previous_page_uri": page_uri(page - 1) if page > 0 else None,
            "next_page_uri": page_uri(page + 1) if has_next else None,
        }

    def _create_recording(self, request: FakeRequest, call: FakeCall) -> dict[str, Any]:
        with self._lock:
            if call.status in TERMINAL_CALL_STATUSES:
                raise _Answer(400, 21220, "Call is not in-progress. Cannot start recording.")
            recording = FakeRecording(
                sid=_sid("RE"), account_sid=call.account_sid, call_sid=call.sid, params=request.form
            )
            self._recordings[recording.sid] = recording
            return recording.to_json()

    def _list_recordings(self, request: FakeRequest, call: FakeCall) -> dict[str, Any]:
        with self._lock:
            items = [r.to_json() for r in self._recordings.values() if r.call_sid == call.sid]
        return {
            "recordings": items,
            "page": 0,
            "page_size": 50,
            "start": 0,
            "end": max(len(items) - 1, 0),
            "uri": request.path,
            "first_page_uri": request.path,
            "previous_page_uri": None,
            "next_page_uri": None,
        }

    def _find_recording(
        self, request: FakeRequest, call: FakeCall, recording_sid: str
    ) -> FakeRecording:
        with self._lock:
            recording = self._recordings.get(recording_sid)
        if recording is None or recording.call_sid != call.sid:
            raise _Answer(404, 20404, f"The requested resource {request.path} was not found")
        return recording

    def _update_recording(self, request: FakeRequest, recording: FakeRecording) -> dict[str, Any]:
        status = request.field("Status")
        if status not in ("stopped", "paused", "in-progress"):
            raise _Answer(400, 20001, "Status must be stopped, paused or in-progress")
        with self._lock:
            if recording.status == "stopped":
                raise _Answer(400, 21220, "Recording is already stopped")
            recording.status = status
            return recording.to_json()

    def _create_message(self, request: FakeRequest, account: str) -> dict[str, Any]:
        to, from_ = request.field("To"), request.field("From")
        service = request.field("MessagingServiceSid")
        body, media = request.field("Body") or "", tuple(request.fields("MediaUrl"))
        if not to:
            raise _Answer(400, 21604, "A 'To' phone number is required.")
        if not from_ and not service:
            raise _Answer(400, 21603, "A 'From' phone number is required.")
        if not body and not media:
            raise _Answer(400, 21602, "Message body is required.")
        message = FakeMessage(
            sid=_sid("SM"),
            account_sid=account,
            to=to,
            from_=from_,
            body=body,
            media_urls=media,
            messaging_service_sid=service,
            status_callback=request.field("StatusCallback"),
            status="queued" if from_ else "accepted",
        )
        with self._lock:
            self._messages[message.sid] = message
        return message.to_json()


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


__all__ = [
    "API_HOST_HEADER",
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "FakeCall",
    "FakeMessage",
    "FakeRecording",
    "FakeRequest",
    "FakeTwilioRest",
    "FaultRule",
]
