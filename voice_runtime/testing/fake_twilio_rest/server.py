"""The fake Twilio REST API server: lifecycle, state, fault injection and HTTP routing."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from voice_runtime.testing._serve import bind_free_socket
from voice_runtime.testing.fake_twilio_rest.callbacks import SentCallback, _CallCallbacks
from voice_runtime.testing.fake_twilio_rest.conferences import (
    FakeConference,
    FakeParticipant,
    _Conferences,
)
from voice_runtime.testing.fake_twilio_rest.records import (
    _CALL,
    _RECORDING,
    _RECORDINGS,
    _ROUTE,
    _STATUS_TEXT,
    API_HOST_HEADER,
    DEFAULT_ACCOUNT_SID,
    DEFAULT_API_HOST,
    DEFAULT_AUTH_TOKEN,
    TERMINAL_CALL_STATUSES,
    FakeCall,
    FakeMessage,
    FakeRecording,
    FakeRequest,
    FaultRule,
    _Answer,
    _error_body,
    _sid,
)
from voice_runtime.testing.fake_twilio_rest.resources import _Resources
from voice_runtime.transports.twilio_models import TwilioRegion

logger = logging.getLogger(__name__)


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


class FakeTwilioRest(_Resources, _CallCallbacks, _Conferences):
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
        self._sent: list[SentCallback] = []
        self._conferences: dict[str, FakeConference] = {}
        self._participant_callbacks: list[Callable[[FakeParticipant], None]] = []
        self._update_callbacks: list[Callable[[FakeCall], None]] = []
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
        created: FakeCall | Callable[[], None] | None = None
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
        if status == 204:
            handler.send_response(204)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        else:
            handler.send_json(status, body)
        if isinstance(created, FakeCall):
            self._notify_created(created)
        elif created is not None:
            self._after_answer(created)

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

    def on_call_updated(self, callback: Callable[[FakeCall], None]) -> Callable[[FakeCall], None]:
        """Call ``callback(call)`` after each answered call update (new TwiML, URL or status).

        Runs like :meth:`on_call_created` callbacks (request thread, errors kept). A far end
        uses it to end a media stream when the call is given new TwiML, as Twilio does.
        """
        with self._lock:
            self._update_callbacks.append(callback)
        return callback

    def _notify_updated(self, call: FakeCall) -> None:
        with self._lock:
            callbacks = list(self._update_callbacks)
        snapshot = dataclasses.replace(call, updates=list(call.updates))
        for callback in callbacks:
            self._after_answer(functools.partial(callback, snapshot))

    def _after_answer(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # kept for the test to assert on
            logger.exception("fake Twilio callback failed")
            with self._lock:
                self.callback_errors.append(exc)

    def _route(
        self, request: FakeRequest, user: str
    ) -> tuple[int, Any, FakeCall | Callable[[], None] | None]:
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
                return 200, self._update_call(request, call), lambda: self._notify_updated(call)
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
        elif rest.startswith("Conferences"):
            return self._route_conferences(request, user, rest)
        elif rest == "Messages.json" and method == "POST":
            return 201, self._create_message(request, user), None
        raise _Answer(404, 20404, f"The requested resource {request.path} was not found")
