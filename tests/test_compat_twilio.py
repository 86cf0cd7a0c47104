"""Tests written the way 0.1.x users test their apps: they mock Twilio, not our internals.

Users patch ``twilio.rest.Client``, intercept ``requests`` (the ``responses`` package, a
patched ``requests.Session.send``) or replace ``twilio_call.build_twilio_client``; each of
those must see every Twilio REST request voice_runtime makes. Errors they catch
(ValueError, the SDK's exceptions, ``requests`` timeouts) stay catchable, and no secret
leaks into an error, a repr or a log line.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from unittest.mock import MagicMock, patch

import pytest
import requests
import responses
from pydantic import ValidationError
from responses import matchers
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from voice_runtime.config import Settings, settings
from voice_runtime.errors import ConfigurationError, MissingStreamUrlError
from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest
from voice_runtime.transports import twilio_call, twilio_sms
from voice_runtime.transports.twilio_call import (
    TwilioCallNotFoundError,
    TwilioRegion,
    TwilioRestError,
    hangup_call,
    initiate_outbound_call,
    list_calls,
    list_recent_calls,
    start_recording,
    stop_recording,
    update_call,
)

ACCOUNT = "AC" + "5" * 32
TOKEN = "tok-SECRET-7f3a9c21"
OUR_NUMBER = "+15550001111"
CALLEE = "+15550002222"
IE1 = "api.dublin.ie1.twilio.com"
AU1 = "api.sydney.au1.twilio.com"
CALLS = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Calls.json"


def calls_url(host: str = "api.twilio.com", sid: str | None = None) -> str:
    base = f"https://{host}/2010-04-01/Accounts/{ACCOUNT}/Calls"
    return f"{base}.json" if sid is None else f"{base}/{sid}.json"


def raw_call(sid: str, **fields: object) -> dict[str, object]:
    record: dict[str, object] = {
        "sid": sid,
        "status": "completed",
        "direction": "inbound",
        "start_time": "Thu, 01 Jan 2026 13:00:00 +0000",
        "from": "+15559990000",
    }
    record.update(fields)
    return record


def twilio_error(status: int, code: int, message: str = "scripted") -> dict[str, object]:
    return {"code": code, "message": message, "more_info": "", "status": status}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings of a 0.1.x app, talking to the real (here intercepted) api.twilio.com."""
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ACCOUNT)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("TWILIO_PHONE_NUMBER", OUR_NUMBER)
    monkeypatch.setenv("VOICE_STREAM_URL", "https://bot.example.com")
    for name in ("TWILIO_API_BASE_URL", "TWILIO_REGION", "TWILIO_EDGE", "TWILIO_HTTP_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def rsps(env: None) -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


def basic_auth(user: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


# ------------------------------------------------------------- patch("twilio.rest.Client")


def test_patched_client_class_sees_call_hangup_and_sms(env: None) -> None:
    with patch("twilio.rest.Client") as client_cls:
        client = client_cls.return_value
        client.calls.create.return_value.sid = "CA123"
        client.messages.create.return_value = MagicMock(sid="SM1", status="queued")

        assert initiate_outbound_call(CALLEE) == "CA123"
        hangup_call("CA-test")
        result = twilio_sms.send_sms(CALLEE, "hello")

    assert client_cls.call_count == 3
    assert all(c.args == (ACCOUNT, TOKEN) for c in client_cls.call_args_list)
    create = client.calls.create.call_args.kwargs
    assert (create["to"], create["from_"]) == (CALLEE, OUR_NUMBER)
    assert 'url="wss://bot.example.com/voice"' in create["twiml"]
    client.calls.assert_called_with("CA-test")
    client.calls.return_value.update.assert_called_once_with(status="completed")
    assert result == {"message_sid": "SM1", "status": "queued", "to": CALLEE}


def test_hangup_of_an_unknown_call_is_still_the_sdks_404(env: None) -> None:
    with patch("twilio.rest.Client") as client_cls:
        client_cls.return_value.calls.return_value.update.side_effect = TwilioRestException(
            404, calls_url(sid="CA1"), "The requested resource was not found", code=20404
        )
        with pytest.raises(TwilioRestException) as info:
            hangup_call("CA1")
    assert (info.value.status, info.value.code) == (404, 20404)
    assert isinstance(info.value, TwilioCallNotFoundError)
    assert info.value.attempted_hosts == ("api.twilio.com",)


def test_patched_client_class_sees_regional_hangups(env: None) -> None:
    ie1, au1 = MagicMock(name="ie1"), MagicMock(name="au1")
    ie1.calls.return_value.update.side_effect = TwilioRestException(
        404, calls_url(IE1, "CA1"), "not here", code=20404
    )
    regions = (
        TwilioRegion(api_host=IE1, account_sid=ACCOUNT, auth=("SKie1", "ie1-secret")),
        TwilioRegion(api_host=AU1, account_sid=ACCOUNT, auth=("SKau1", "au1-secret")),
    )
    with patch("twilio.rest.Client", side_effect=[ie1, au1]) as client_cls:
        hangup_call("CA1", regions=regions)
    first, second = client_cls.call_args_list
    assert first.args == ("SKie1", "ie1-secret") and second.args == ("SKau1", "au1-secret")
    assert (first.kwargs["edge"], first.kwargs["region"]) == ("dublin", "ie1")
    assert first.kwargs["account_sid"] == ACCOUNT
    au1.calls.return_value.update.assert_called_once_with(status="completed")


def test_patching_client_where_0_1_x_imported_it(env: None) -> None:
    region = TwilioRegion(api_host=IE1, account_sid=ACCOUNT, auth=(ACCOUNT, TOKEN))
    with (
        patch("voice_runtime.transports.twilio_call.Client") as call_cls,
        patch("voice_runtime.transports.twilio_sms.Client") as sms_cls,
    ):
        call_cls.return_value.calls.create.return_value.sid = "CA9"
        sms_cls.return_value.messages.create.return_value = MagicMock(sid="SM9", status="sent")
        assert initiate_outbound_call(CALLEE) == "CA9"
        hangup_call("CA9", regions=(region,))
        assert twilio_sms.send_sms(CALLEE, "hi")["message_sid"] == "SM9"
    assert call_cls.call_count == 2 and sms_cls.call_count == 1
    assert call_cls.call_args.kwargs["region"] == "ie1"
    # The patch leaves nothing behind: the real class is used again.
    assert "Client" not in vars(twilio_call) and twilio_call.Client is Client


# ------------------------------------------------------------- responses (requests level)


def test_outbound_call_through_requests(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, CALLS, json={"sid": "CA1", "status": "queued"}, status=201)
    assert initiate_outbound_call(CALLEE) == "CA1"
    (call,) = rsps.calls
    form = dict(
        pair.split("=", 1) for pair in str(call.request.body).split("&")
    )  # form-encoded, as Twilio expects
    assert form["To"] == "%2B15550002222" and "Twiml" in form
    assert call.request.headers["Authorization"] == basic_auth(ACCOUNT, TOKEN)
    assert call.request.req_kwargs["timeout"] == 15.0


def test_hangup_with_regions_through_requests(rsps: responses.RequestsMock) -> None:
    regions = tuple(
        TwilioRegion(api_host=host, account_sid=ACCOUNT, auth=(ACCOUNT, TOKEN))
        for host in ("api.twilio.com", IE1, AU1)
    )
    rsps.add(responses.POST, calls_url(sid="CA-test"), json=twilio_error(404, 20404), status=404)
    rsps.add(responses.POST, calls_url(IE1, "CA-test"), json=twilio_error(400, 21220), status=400)
    hangup_call("CA-test", regions=regions)  # 21220 in ie1: already ended, done
    assert [c.request.url for c in rsps.calls] == [
        calls_url(sid="CA-test"),
        calls_url(IE1, "CA-test"),
    ]
    assert all(c.request.body == "Status=completed" for c in rsps.calls)

    rsps.add(responses.POST, calls_url(AU1, "CA2"), json=twilio_error(404, 20404), status=404)
    with pytest.raises(TwilioCallNotFoundError) as info:
        hangup_call("CA2", regions=regions[2:])
    assert info.value.attempted_hosts == (AU1,) and isinstance(info.value, RuntimeError)


def test_list_calls_pages_through_requests(rsps: responses.RequestsMock) -> None:
    next_uri = f"/2010-04-01/Accounts/{ACCOUNT}/Calls.json?PageSize=2&Page=1&PageToken=PACA2"
    rsps.add(
        responses.GET,
        calls_url(IE1),
        json={"calls": [raw_call("CA1"), raw_call("CA2")], "next_page_uri": next_uri},
        match=[
            matchers.query_param_matcher(
                {"To": CALLEE, "StartTime>": "2026-01-01T12:00:00Z", "PageSize": "2"}
            )
        ],
    )
    rsps.add(
        responses.GET,
        calls_url(IE1),
        json={"calls": [raw_call("CA3", start_time=None)], "next_page_uri": None},
        match=[matchers.query_param_matcher({"PageSize": "2", "Page": "1", "PageToken": "PACA2"})],
    )
    rows = list_calls(
        api_host=IE1,
        account_sid=ACCOUNT,
        auth=("SKkey", "key-secret"),
        to=CALLEE,
        start_after=datetime(2026, 1, 1, 12, tzinfo=UTC),
        page_size=2,
    )
    assert [row.call_sid for row in rows] == ["CA1", "CA2", "CA3"]
    assert len(rsps.calls) == 2
    assert all(
        c.request.headers["Authorization"] == basic_auth("SKkey", "key-secret") for c in rsps.calls
    )


def test_list_recent_calls_through_requests(rsps: responses.RequestsMock) -> None:
    rsps.add(
        responses.GET,
        CALLS,
        json={"calls": [raw_call("CA1", start_time=None)], "next_page_uri": None},
    )
    with pytest.deprecated_call():
        assert list_recent_calls() == [{"call_sid": "CA1", "status": "completed", "start_time": 0}]
    assert rsps.calls[0].request.params["To"] == OUR_NUMBER


def test_sms_through_requests(rsps: responses.RequestsMock) -> None:
    url = f"https://api.twilio.com/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    rsps.add(responses.POST, url, json={"sid": "SM1", "status": "queued"}, status=201)
    assert twilio_sms.send_sms(CALLEE, "hi") == {
        "message_sid": "SM1",
        "status": "queued",
        "to": CALLEE,
    }
    assert "Body=hi" in str(rsps.calls[0].request.body)


def test_a_redirect_is_never_followed(rsps: responses.RequestsMock) -> None:
    rsps.add(
        responses.POST,
        CALLS,
        status=307,
        headers={"Location": "https://collector.example.com/steal"},
    )
    with pytest.raises(TwilioRestException) as info:
        initiate_outbound_call(CALLEE)
    assert info.value.status == 307
    assert [c.request.url for c in rsps.calls] == [CALLS]


# --------------------------------------------------------------------------- patched Session.send


def _answer(request: requests.PreparedRequest) -> requests.Response:
    path = request.path_url.split("?")[0]
    if path.endswith("/Calls.json") and request.method == "GET":
        status, body = 200, {"calls": [raw_call("CA1")], "next_page_uri": None}
    elif path.endswith("/Recordings.json"):
        status, body = 201, {"sid": "RE1", "status": "in-progress"}
    elif request.method == "POST" and path.endswith(("/Calls.json", "/Messages.json")):
        status, body = 201, {"sid": "CA1", "status": "queued"}
    else:
        status, body = 200, {"sid": "CA1", "status": "completed"}
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode()
    response.headers["Content-Type"] = "application/json"
    response.request = request
    response.url = str(request.url)
    return response


def test_every_request_carries_the_timeout_and_no_redirects(
    env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_HTTP_TIMEOUT", "2.5")
    sent: list[tuple[str, dict[str, Any]]] = []

    def send(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any):
        sent.append((f"{request.method} {request.path_url}", kwargs))
        return _answer(request)

    monkeypatch.setattr(requests.Session, "send", send)
    region = TwilioRegion(api_host=IE1, account_sid=ACCOUNT, auth=(ACCOUNT, TOKEN))
    initiate_outbound_call(CALLEE)
    update_call("CA-test", url="https://bot.example.com/next")
    start_recording("CA-test")
    stop_recording("CA-test", "RE1")
    hangup_call("CA-test")
    hangup_call("CA-test", regions=(region,))
    list_calls(
        api_host=IE1,
        account_sid=ACCOUNT,
        auth=(ACCOUNT, TOKEN),
        to=CALLEE,
        start_after=datetime(2026, 1, 1, tzinfo=UTC),
    )
    with pytest.deprecated_call():
        list_recent_calls()
    twilio_sms.send_sms(CALLEE, "hi")
    assert len(sent) == 9
    for target, kwargs in sent:
        assert kwargs["timeout"] == 2.5, target
        assert kwargs["allow_redirects"] is False, target


# --------------------------------------------------------------------------- build_twilio_client


def test_replacing_build_twilio_client_reaches_every_sync_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeTwilioRest() as fake:
        monkeypatch.setenv("TWILIO_ACCOUNT_SID", fake.account_sid)
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", fake.auth_token)
        monkeypatch.setenv("TWILIO_PHONE_NUMBER", OUR_NUMBER)
        monkeypatch.setenv("VOICE_STREAM_URL", "https://bot.example.com")
        # If anything bypassed the replacement it would fail fast here, not reach the fake.
        monkeypatch.setenv("TWILIO_API_BASE_URL", "http://127.0.0.1:9")

        class ToFake(TwilioHttpClient):
            """What a 0.1.x user writes to point the SDK at a local server."""

            def request(self, method: str, url: str, **kwargs: Any):  # type: ignore[override]
                local = url.replace("https://api.twilio.com", fake.base_url)
                return super().request(method, local, **kwargs)

        built: list[Client] = []

        def build(account_sid: str, auth_token: str) -> Client:
            client = Client(account_sid, auth_token, http_client=ToFake(timeout=5))
            built.append(client)
            return client

        def build_explicit(region: TwilioRegion) -> Client:
            return build(region.auth[0], region.auth[1])

        monkeypatch.setattr(twilio_call, "build_twilio_client", build)
        monkeypatch.setattr(twilio_call, "build_explicit_twilio_client", build_explicit)
        monkeypatch.setattr(twilio_sms, "build_twilio_client", build)
        try:
            sid = initiate_outbound_call(CALLEE)
            update_call(sid, url="https://bot.example.com/next")
            recording = start_recording(sid)
            stop_recording(sid, recording)
            twilio_call.transfer_call(sid, "+15550003333")
            twilio_call.send_digits(sid, "1#")
            hangup_call(sid)
            hangup_call(sid, regions=(fake.region(),))
            list_calls(
                api_host="api.twilio.com",
                account_sid=fake.account_sid,
                auth=(fake.account_sid, fake.auth_token),
                to=CALLEE,
                start_after=datetime(2026, 1, 1, tzinfo=UTC),
            )
            with pytest.deprecated_call():
                list_recent_calls()
            twilio_sms.send_sms(CALLEE, "hi")
        finally:
            for client in built:
                client.http_client.session.close()
        assert len(built) == len(fake.requests) == 11
        assert fake.calls[sid].status == "completed"


# --------------------------------------------------------------------------- errors users catch


@pytest.mark.parametrize("value", ["abc", "inf", "0", "-3"])
def test_a_bad_http_timeout_is_a_value_error(
    env: None, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TWILIO_HTTP_TIMEOUT", value)
    with pytest.raises(ValueError, match="TWILIO_HTTP_TIMEOUT"):
        initiate_outbound_call(CALLEE)
    with pytest.raises(ValueError, match="TWILIO_HTTP_TIMEOUT"):
        twilio_call.build_twilio_client(ACCOUNT, TOKEN)


def test_configuration_errors_are_value_errors() -> None:
    assert issubclass(ConfigurationError, ValueError)
    with pytest.raises(ValueError):
        Settings.from_env({"VOICE_SERVER_PORT": "eighty"})
    assert issubclass(MissingStreamUrlError, RuntimeError)  # as 0.1.x raised


def test_rest_failures_are_the_sdks_exceptions(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, CALLS, json=twilio_error(400, 21211, "Invalid To"), status=400)
    with pytest.raises(TwilioRestException) as info:
        initiate_outbound_call(CALLEE)
    assert isinstance(info.value, TwilioException) and isinstance(info.value, TwilioRestError)
    assert (info.value.status, info.value.code) == (400, 21211)


def test_a_transport_timeout_is_the_http_librarys_timeout(rsps: responses.RequestsMock) -> None:
    rsps.add(responses.POST, CALLS, body=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(requests.exceptions.ReadTimeout) as info:
        initiate_outbound_call(CALLEE)
    assert isinstance(info.value, requests.exceptions.Timeout)
    assert isinstance(info.value, TwilioRestError) and info.value.retryable
    assert isinstance(info.value.__cause__, requests.exceptions.ReadTimeout)


def test_an_unreachable_api_is_the_http_librarys_connection_error(
    rsps: responses.RequestsMock,
) -> None:
    with pytest.raises(requests.exceptions.ConnectionError) as info:
        hangup_call("CA1")  # nothing registered: responses refuses the connection
    assert isinstance(info.value, TwilioRestError) and info.value.status is None


# --------------------------------------------------------------------------- call SIDs


@pytest.mark.parametrize("sid", ["CA-test", "CA_test.1", "CAfake", "call:1"])
def test_any_sid_that_keeps_the_path_is_accepted(rsps: responses.RequestsMock, sid: str) -> None:
    rsps.add(responses.POST, calls_url(sid=sid), json={"sid": sid, "status": "completed"})
    hangup_call(sid)
    assert update_call(sid, status="completed") == "completed"
    assert len(rsps.calls) == 2


@pytest.mark.parametrize(
    "sid",
    ["", "CA/1", "CA?x=1", "CA#1", "CA%2F", "CA\\1", "CA 1", "CA\t1", "CA\n", "CA\x00", "..", 5],
)
def test_sids_that_could_change_the_path_are_refused(
    rsps: responses.RequestsMock, sid: object
) -> None:
    for action in (
        lambda: hangup_call(sid),  # type: ignore[arg-type]
        lambda: update_call(sid, status="completed"),  # type: ignore[arg-type]
        lambda: start_recording(sid),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="SID must be a non-empty string without"):
            action()
    assert len(rsps.calls) == 0


# --------------------------------------------------------------------------- secrets


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def test_no_secret_in_errors_reprs_or_logs(
    rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = (TOKEN, base64.b64encode(f"{ACCOUNT}:{TOKEN}".encode()).decode())
    region = TwilioRegion(api_host=IE1, account_sid=ACCOUNT, auth=(ACCOUNT, TOKEN))
    rsps.add(responses.POST, CALLS, json={"sid": "CA1", "status": "queued"}, status=201)
    rsps.add(responses.POST, CALLS, json=twilio_error(401, 20003, "Authenticate"), status=401)
    rsps.add(responses.POST, CALLS, json=twilio_error(500, 20500, "Internal"), status=500)
    rsps.add(responses.POST, CALLS, body=requests.exceptions.ConnectTimeout("connect timeout"))
    rsps.add(responses.POST, CALLS, status=302, headers={"Location": "https://x.example.com/"})
    rsps.add(responses.POST, calls_url(IE1, "CA1"), json=twilio_error(404, 20404), status=404)
    rsps.add(responses.GET, calls_url(IE1), json={"calls": "nope", "next_page_uri": None})

    list_args: dict[str, Any] = {
        "api_host": IE1,
        "account_sid": ACCOUNT,
        "auth": (ACCOUNT, TOKEN),
        "to": CALLEE,
        "start_after": datetime(2026, 1, 1, tzinfo=UTC),
    }
    attempts = [
        lambda: initiate_outbound_call(CALLEE),  # succeeds
        lambda: initiate_outbound_call(CALLEE),  # 401
        lambda: initiate_outbound_call(CALLEE),  # 500
        lambda: initiate_outbound_call(CALLEE),  # timeout
        lambda: initiate_outbound_call(CALLEE),  # redirect
        lambda: hangup_call("CA1", regions=(region,)),  # not found
        lambda: hangup_call("CA9"),  # connection refused
        lambda: list_calls(**list_args),  # malformed page
        lambda: list_calls(**{**list_args, "api_host": "api.evil.com"}),
        lambda: list_calls(**{**list_args, "auth": (ACCOUNT, TOKEN + "\u20ac")}),
        lambda: list_calls(**{**list_args, "auth": [ACCOUNT, TOKEN]}),
        lambda: TwilioRegion(api_host="evil.com", account_sid=ACCOUNT, auth=(ACCOUNT, TOKEN)),
        lambda: TwilioRegion(api_host=IE1, account_sid="AC/1", auth=(TOKEN, TOKEN)),
        lambda: TwilioRegion(api_host=IE1, account_sid=ACCOUNT, auth=(ACCOUNT, TOKEN, TOKEN)),
        lambda: twilio_call.build_twilio_client(ACCOUNT, TOKEN + "\u20ac"),
        lambda: hangup_call("CA1", regions=(("api.twilio.com", ACCOUNT, (ACCOUNT, TOKEN)),)),
        lambda: hangup_call("CA1", regions=({"api_host": "x", "auth": (ACCOUNT, TOKEN)},)),
    ]
    errors: list[BaseException] = []
    for attempt in attempts:
        try:
            attempt()
        except Exception as exc:  # noqa: BLE001 - every failure is inspected below
            errors.append(exc)
    assert len(errors) == len(attempts) - 1
    assert any(isinstance(e, ValidationError) for e in errors)

    client = twilio_call.build_twilio_client(ACCOUNT, TOKEN)
    texts = [repr(region), str(region), repr(client), repr(client.http_client), caplog.text]
    texts.append(repr(settings()))
    for error in errors:
        texts.extend(f"{e!s} {e!r} {getattr(e, '__dict__', {})!r}" for e in _chain(error))
    texts.extend(r.getMessage() + repr(vars(r)) for r in caplog.records)
    assert caplog.records  # the run was logged
    for text in texts:
        for secret in secrets:
            assert secret not in text
