"""The Twilio REST side against FakeTwilioRest: the real twilio SDK over a real socket."""

from __future__ import annotations

import logging
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from voice_runtime.errors import (
    MissingCredentialError,
    MissingStreamUrlError,
    ProviderError,
    VoiceRuntimeError,
)
from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest
from voice_runtime.transport import create_transport, get_sms_transport
from voice_runtime.transports import _rest, twilio_call, twilio_sms
from voice_runtime.transports.twilio_call import (
    MissingTwilioCredentialError,
    TwilioCallListIncompleteError,
    TwilioCallNotFoundError,
    TwilioCallRow,
    TwilioRegion,
    TwilioRestError,
    build_route_stream_xml,
    build_stream_twiml,
    build_stream_xml,
    hangup_call,
    hangup_call_async,
    initiate_outbound_call,
    initiate_outbound_call_async,
    list_calls,
    list_calls_async,
    list_recent_calls,
)

OUR_NUMBER = "+15550001111"
CALLEE = "+15550002222"
IE1 = "api.dublin.ie1.twilio.com"
AU1 = "api.sydney.au1.twilio.com"


@pytest.fixture
def fake() -> Iterator[FakeTwilioRest]:
    with FakeTwilioRest() as server:
        yield server


@pytest.fixture
def env(fake: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch) -> FakeTwilioRest:
    """Point voice_runtime at the fake with a full set of settings."""
    for name, value in fake.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TWILIO_PHONE_NUMBER", OUR_NUMBER)
    monkeypatch.setenv("VOICE_STREAM_URL", "https://bot.example.com")
    monkeypatch.delenv("TWILIO_HTTP_TIMEOUT", raising=False)
    return fake


def stream_of(twiml: str) -> ET.Element:
    root = ET.fromstring(twiml)
    assert root.tag == "Response"
    connect = root.find("Connect")
    assert connect is not None
    stream = connect.find("Stream")
    assert stream is not None
    return stream


def only_request(fake: FakeTwilioRest):
    requests = fake.requests
    assert len(requests) == 1
    return requests[0]


def region_list_args(fake: FakeTwilioRest, **overrides: object) -> dict[str, object]:
    args: dict[str, object] = {
        "api_host": "api.twilio.com",
        "account_sid": fake.account_sid,
        "auth": (fake.account_sid, fake.auth_token),
        "to": CALLEE,
        "start_after": datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
    }
    args.update(overrides)
    return args


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


# --------------------------------------------------------------------------- TwiML


def test_stream_twiml_turns_https_into_wss_voice_url() -> None:
    stream = stream_of(build_stream_twiml("https://bot.example.com"))
    assert stream.get("url") == "wss://bot.example.com/voice"
    assert stream_of(build_stream_twiml("http://localhost:8080/")).get("url") == (
        "ws://localhost:8080/voice"
    )
    assert build_stream_xml is build_stream_twiml


def test_stream_twiml_carries_parameters_and_attributes_escaped() -> None:
    twiml = build_stream_twiml(
        "https://bot.example.com/base",
        parameters={"tenant": "acme", "quote": 'a"<&>b'},
        status_callback="https://bot.example.com/stream-status",
        name="agent",
        path="/media",
    )
    stream = stream_of(twiml)
    assert stream.get("url") == "wss://bot.example.com/base/media"
    assert stream.get("name") == "agent"
    assert stream.get("statusCallback") == "https://bot.example.com/stream-status"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"tenant": "acme", "quote": 'a"<&>b'}


def test_route_stream_xml_quotes_the_token() -> None:
    stream = stream_of(build_route_stream_xml("https://bot.example.com/", "a/b c", parameters={}))
    assert stream.get("url") == "wss://bot.example.com/voice/a%2Fb%20c"


@pytest.mark.parametrize(
    "url", ["bot.example.com", "ftp://bot.example.com", "https://bot.example.com/?a=1", ""]
)
def test_stream_twiml_rejects_urls_twilio_cannot_dial(url: str) -> None:
    with pytest.raises(ValueError):
        build_stream_twiml(url)


# --------------------------------------------------------------------------- outbound calls


def test_outbound_call_sends_inline_twiml(env: FakeTwilioRest) -> None:
    call_sid = initiate_outbound_call(CALLEE)
    request = only_request(env)
    assert request.method == "POST"
    assert request.path == f"/2010-04-01/Accounts/{env.account_sid}/Calls.json"
    assert request.auth_user == env.account_sid
    assert sorted(request.form_dict) == ["From", "To", "Twiml"]
    assert request.field("To") == CALLEE
    assert request.field("From") == OUR_NUMBER
    assert stream_of(request.field("Twiml") or "").get("url") == "wss://bot.example.com/voice"
    assert call_sid.startswith("CA") and env.calls[call_sid].status == "queued"


def test_outbound_call_with_every_option(env: FakeTwilioRest) -> None:
    call_sid = initiate_outbound_call(
        CALLEE,
        stream_url="https://other.example.com",
        route_token="tok-1",
        parameters={"lang": "fi"},
        status_callback="https://bot.example.com/status",
        status_callback_events=["initiated", "ringing", "answered", "completed"],
        status_callback_method="GET",
        machine_detection="DetectMessageEnd",
        async_amd=True,
        async_amd_status_callback="https://bot.example.com/amd",
        timeout=25,
        record=True,
        time_limit=900,
        from_="+15553334444",
    )
    request = only_request(env)
    assert request.fields("StatusCallbackEvent") == [
        "initiated",
        "ringing",
        "answered",
        "completed",
    ]
    assert {k: v for k, v in request.form if k not in ("StatusCallbackEvent", "Twiml")} == {
        "To": CALLEE,
        "From": "+15553334444",
        "StatusCallback": "https://bot.example.com/status",
        "StatusCallbackMethod": "GET",
        "MachineDetection": "DetectMessageEnd",
        "AsyncAmd": "true",
        "AsyncAmdStatusCallback": "https://bot.example.com/amd",
        "Timeout": "25",
        "Record": "true",
        "TimeLimit": "900",
    }
    stream = stream_of(request.field("Twiml") or "")
    assert stream.get("url") == "wss://other.example.com/voice/tok-1"
    assert [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")] == [
        ("lang", "fi")
    ]
    assert env.calls[call_sid].to == CALLEE


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status_callback_events": ["answered"]},  # events without a callback
        {"status_callback": "https://x/s", "status_callback_events": ["picked-up"]},
        {"status_callback": "https://x/s", "status_callback_events": "answered"},
        {"status_callback_method": "PUT"},
        {"machine_detection": "enable"},
        {"async_amd": True},
        {"machine_detection": "Enable", "async_amd_status_callback": "https://x/amd"},
        {"timeout": 0},
        {"timeout": 601},
        {"time_limit": 1.5},
        {"record": "yes"},
        {"parameters": {"a": 1}},
        {"parameters": {"x": "y" * 5000}},  # TwiML over Twilio's 4000 characters
    ],
)
def test_outbound_call_rejects_bad_options_before_any_request(
    env: FakeTwilioRest, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        initiate_outbound_call(CALLEE, **kwargs)  # type: ignore[arg-type]
    assert env.requests == []


def test_outbound_call_needs_stream_url(env: FakeTwilioRest, monkeypatch) -> None:
    monkeypatch.delenv("VOICE_STREAM_URL")
    with pytest.raises(MissingStreamUrlError, match="VOICE_STREAM_URL"):
        initiate_outbound_call(CALLEE)
    assert env.requests == []


@pytest.mark.parametrize(
    "variable", ["TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN", "TWILIO_PHONE_NUMBER"]
)
def test_missing_twilio_settings_name_the_variable(
    env: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.delenv(variable)
    with pytest.raises(MissingTwilioCredentialError, match=variable) as info:
        initiate_outbound_call(CALLEE)
    assert info.value.variable == variable
    assert isinstance(info.value, MissingCredentialError)
    assert isinstance(info.value, RuntimeError)  # what 0.1.x raised
    with pytest.raises(MissingCredentialError, match=variable):
        twilio_sms.send_sms(CALLEE, "hello")
    assert env.requests == []


def test_explicit_client_replaces_environment_credentials(
    env: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _rest.build_client(env.account_sid, env.auth_token, api_base_url=env.base_url)
    monkeypatch.delenv("TWILIO_ACCOUNT_SID")
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    try:
        call_sid = initiate_outbound_call(CALLEE, client=client)
    finally:
        _rest.close_client(client)
    assert env.calls[call_sid].to == CALLEE


def test_created_call_hook_sees_the_twiml(env: FakeTwilioRest) -> None:
    seen: list[str] = []
    done = threading.Event()

    @env.on_call_created
    def dial(call) -> None:
        seen.append(stream_of(call.twiml).get("url"))
        done.set()

    initiate_outbound_call(CALLEE, route_token="abc")
    assert done.wait(5)
    assert seen == ["wss://bot.example.com/voice/abc"]
    assert env.callback_errors == []


async def test_outbound_call_async(env: FakeTwilioRest) -> None:
    call_sid = await initiate_outbound_call_async(
        CALLEE, status_callback="https://x/s", status_callback_events=["answered", "completed"]
    )
    request = only_request(env)
    assert request.fields("StatusCallbackEvent") == ["answered", "completed"]
    assert request.field("From") == OUR_NUMBER
    assert request.auth_user == env.account_sid
    assert env.calls[call_sid].twiml == request.field("Twiml")


# --------------------------------------------------------------------------- REST errors


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (400, 21211, False),
        (404, 20404, False),
        (429, 20429, True),
        (500, 20500, True),
        (503, None, True),
    ],
)
def test_rest_failures_become_clear_errors(
    env: FakeTwilioRest, status: int, code: int | None, retryable: bool
) -> None:
    env.fail_next(status, code, "scripted failure")
    with pytest.raises(TwilioRestError) as info:
        initiate_outbound_call(CALLEE)
    error = info.value
    assert (error.status, error.code, error.retryable) == (status, code, retryable)
    assert "scripted failure" in str(error) and "\x1b[" not in str(error)
    assert isinstance(error, ProviderError) and isinstance(error, TwilioRestException)
    assert isinstance(error.__cause__, TwilioRestException)


def test_wrong_auth_token_is_a_401_with_code_20003(
    env: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "wrong-token")
    with pytest.raises(TwilioRestError) as info:
        initiate_outbound_call(CALLEE)
    assert (info.value.status, info.value.code, info.value.retryable) == (401, 20003, False)


def test_unreachable_api_is_a_retryable_error(
    env: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("TWILIO_API_BASE_URL", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(TwilioRestError) as info:
        initiate_outbound_call(CALLEE)
    assert info.value.status is None and info.value.retryable
    assert info.value.__cause__ is not None


def test_http_timeout_bounds_a_request(env: FakeTwilioRest, monkeypatch) -> None:
    monkeypatch.setenv("TWILIO_HTTP_TIMEOUT", "0.3")
    env.fail_next(201, delay=30)
    started = time.monotonic()
    with pytest.raises(TwilioRestError) as info:
        initiate_outbound_call(CALLEE)
    assert time.monotonic() - started < 5
    assert info.value.retryable and info.value.status is None


async def test_async_http_timeout_bounds_a_request(env: FakeTwilioRest, monkeypatch) -> None:
    monkeypatch.setenv("TWILIO_HTTP_TIMEOUT", "0.3")
    env.fail_next(201, delay=30)
    started = time.monotonic()
    with pytest.raises(TwilioRestError) as info:
        await initiate_outbound_call_async(CALLEE)
    assert time.monotonic() - started < 5
    assert info.value.retryable


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_http_timeout_must_be_finite_and_positive(
    env: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("TWILIO_HTTP_TIMEOUT", value)
    with pytest.raises(ValueError, match="TWILIO_HTTP_TIMEOUT"):
        initiate_outbound_call(CALLEE)
    assert env.requests == []


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0, -2.0, True, "5"])
def test_explicit_timeout_must_be_finite_and_positive(value: object) -> None:
    with pytest.raises(ValueError):
        _rest.build_client("AC1", "token", timeout=value)  # type: ignore[arg-type]


def test_client_timeout_defaults_to_15_and_follows_the_setting(monkeypatch) -> None:
    monkeypatch.delenv("TWILIO_HTTP_TIMEOUT", raising=False)
    client = _rest.build_client("AC1", "token")
    assert isinstance(client, Client) and client.http_client.timeout == 15.0
    _rest.close_client(client)
    monkeypatch.setenv("TWILIO_HTTP_TIMEOUT", "2.5")
    client = _rest.build_client("AC1", "token")
    assert client.http_client.timeout == 2.5
    _rest.close_client(client)


def test_base_url_rewrite_only_touches_twilio_api_hosts() -> None:
    base = _rest.normalize_base_url("http://127.0.0.1:9000/prefix/")
    assert _rest.rewrite_url("https://api.twilio.com/2010-04-01/X.json?a=1", base) == (
        "http://127.0.0.1:9000/prefix/2010-04-01/X.json?a=1",
        "api.twilio.com",
    )
    assert _rest.rewrite_url(f"https://{IE1}/2010-04-01/X.json", base)[1] == IE1
    assert _rest.rewrite_url("https://example.com/x", base) == ("https://example.com/x", None)
    assert _rest.rewrite_url("https://api.twilio.com/x", None) == ("https://api.twilio.com/x", None)
    for bad in ("ftp://x", "http://x/?q=1", "http://user:pw@x", "nohost"):
        with pytest.raises(ValueError):
            _rest.normalize_base_url(bad)


def test_logs_never_carry_phone_numbers(env: FakeTwilioRest, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    call_sid = initiate_outbound_call(CALLEE)
    twilio_sms.send_sms(CALLEE, "secret body")
    list_calls(**region_list_args(env))  # type: ignore[arg-type]
    ours = [r for r in caplog.records if r.name.startswith(("voice_runtime", "twilio"))]
    assert any(getattr(r, "call_sid", None) == call_sid for r in ours)
    for record in ours:
        text = record.getMessage() + repr(vars(record))
        assert CALLEE not in text and CALLEE.replace("+", "%2B") not in text
        assert "secret body" not in text


# --------------------------------------------------------------------------- live call control


def test_update_call_sends_twiml_url_or_status(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress")
    assert twilio_call.update_call(call.sid, twiml="<Response><Say>Bye</Say></Response>") == (
        "in-progress"
    )
    twilio_call.update_call(call.sid, url="https://bot.example.com/next")
    assert twilio_call.update_call(call.sid, status="completed") == "completed"
    forms = [r.form for r in env.requests]
    assert forms == [
        (("Twiml", "<Response><Say>Bye</Say></Response>"),),
        (("Url", "https://bot.example.com/next"),),
        (("Status", "completed"),),
    ]
    assert all(r.path.endswith(f"/Calls/{call.sid}.json") for r in env.requests)


@pytest.mark.parametrize(
    ("sid", "kwargs"),
    [
        ("CA1", {}),
        ("CA1", {"twiml": "<Response/>", "url": "https://x"}),
        ("CA1", {"status": "in-progress"}),
        ("CA1/../CA2", {"status": "completed"}),
        ("CA1", {"twiml": "   "}),
    ],
)
def test_update_call_validates_before_any_request(
    env: FakeTwilioRest, sid: str, kwargs: dict[str, str]
) -> None:
    with pytest.raises(ValueError):
        twilio_call.update_call(sid, **kwargs)
    assert env.requests == []


@pytest.mark.parametrize(
    ("target", "noun"), [("+15557778888", "Number"), ("sip:agent@pbx.example.com", "Sip")]
)
def test_transfer_call_dials_number_or_sip(env: FakeTwilioRest, target: str, noun: str) -> None:
    call = env.add_call(CALLEE, status="in-progress")
    twilio_call.transfer_call(call.sid, target, caller_id=OUR_NUMBER)
    root = ET.fromstring(only_request(env).field("Twiml") or "")
    dial = root.find("Dial")
    assert dial is not None and dial.get("callerId") == OUR_NUMBER
    assert [(child.tag, child.text) for child in dial] == [(noun, target)]


def test_send_digits_plays_them_then_reconnects_the_stream(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress")
    twilio_call.send_digits(call.sid, "12w#", route_token="r1")
    root = ET.fromstring(only_request(env).field("Twiml") or "")
    assert [child.tag for child in root] == ["Play", "Connect"]
    assert root[0].get("digits") == "12w#"
    assert stream_of(ET.tostring(root, encoding="unicode")).get("url") == (
        "wss://bot.example.com/voice/r1"
    )
    with pytest.raises(ValueError):
        twilio_call.send_digits(call.sid, "12; DROP")


def test_send_digits_needs_a_stream_url(env: FakeTwilioRest, monkeypatch) -> None:
    monkeypatch.delenv("VOICE_STREAM_URL")
    with pytest.raises(MissingStreamUrlError):
        twilio_call.send_digits(env.add_call(CALLEE, status="in-progress").sid, "1")
    assert env.requests == []


def test_recording_start_and_stop(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress")
    recording_sid = twilio_call.start_recording(call.sid, recording_channels="dual")
    twilio_call.stop_recording(call.sid, recording_sid)
    create, stop = env.requests
    assert create.path.endswith(f"/Calls/{call.sid}/Recordings.json")
    assert create.form == (("RecordingChannels", "dual"),)
    assert stop.path.endswith(f"/Calls/{call.sid}/Recordings/{recording_sid}.json")
    assert stop.form == (("Status", "stopped"),)
    assert env.recordings[recording_sid].status == "stopped"


async def test_call_control_async_twins(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress")
    recording_sid = await twilio_call.start_recording_async(call.sid)
    await twilio_call.stop_recording_async(call.sid, recording_sid)
    await twilio_call.send_digits_async(call.sid, "9")
    await twilio_call.transfer_call_async(call.sid, "+15557778888")
    assert await twilio_call.update_call_async(call.sid, status="completed") == "completed"
    assert [r.path.rsplit("/", 1)[-1] for r in env.requests] == [
        "Recordings.json",
        f"{recording_sid}.json",
        f"{call.sid}.json",
        f"{call.sid}.json",
        f"{call.sid}.json",
    ]
    assert env.calls[call.sid].status == "completed"


# --------------------------------------------------------------------------- hang-up


def test_hangup_completes_the_call(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress")
    hangup_call(call.sid)
    assert only_request(env).form == (("Status", "completed"),)
    assert env.calls[call.sid].status == "completed"


def test_hangup_of_an_ended_call_succeeds(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="completed")
    hangup_call(call.sid)  # Twilio answers 400/21220
    assert len(env.requests) == 1


def test_hangup_of_an_unknown_call_without_regions(env: FakeTwilioRest) -> None:
    with pytest.raises(TwilioCallNotFoundError) as info:
        hangup_call("CA" + "f" * 32)
    assert info.value.attempted_hosts == ("api.twilio.com",)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, VoiceRuntimeError)


def test_hangup_without_credentials_is_a_runtime_error(env: FakeTwilioRest, monkeypatch) -> None:
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    with pytest.raises(RuntimeError, match="TWILIO_AUTH_TOKEN"):
        hangup_call("CA1")


def test_hangup_tries_regions_in_order(env: FakeTwilioRest) -> None:
    env.add_account("AC" + "9" * 32, "second-token")
    call = env.add_call(CALLEE, status="in-progress", api_host=IE1, account_sid="AC" + "9" * 32)
    second = TwilioRegion(
        api_host=IE1, account_sid="AC" + "9" * 32, auth=("AC" + "9" * 32, "second-token")
    )
    hangup_call(call.sid, regions=(env.region(), second, env.region(AU1)))
    assert [(r.api_host, r.auth_user) for r in env.requests] == [
        ("api.twilio.com", env.account_sid),  # 404/20404: not here
        (IE1, "AC" + "9" * 32),
    ]
    assert env.calls[call.sid].status == "completed"


def test_hangup_in_regions_treats_21220_as_done(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress", api_host=IE1)
    env.fail_next(400, 21220, "Call is not in-progress", host="api.twilio.com")
    hangup_call(call.sid, regions=(env.region(), env.region(IE1)))
    assert [r.api_host for r in env.requests] == ["api.twilio.com"]


def test_hangup_in_regions_propagates_other_errors(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress", api_host=IE1)
    env.fail_next(500, 20500, "Internal error", host="api.twilio.com")
    with pytest.raises(TwilioRestError) as info:
        hangup_call(call.sid, regions=(env.region(), env.region(IE1)))
    assert info.value.status == 500 and info.value.retryable
    assert [r.api_host for r in env.requests] == ["api.twilio.com"]
    assert env.calls[call.sid].status == "in-progress"


def test_hangup_in_regions_not_found_anywhere(env: FakeTwilioRest) -> None:
    with pytest.raises(TwilioCallNotFoundError) as info:
        hangup_call("CA" + "e" * 32, regions=(env.region(IE1), env.region()))
    assert info.value.attempted_hosts == (IE1, "api.twilio.com")
    assert [r.api_host for r in env.requests] == [IE1, "api.twilio.com"]


@pytest.mark.parametrize("case", ["empty", "list", "duplicate", "sid", "not-a-region"])
def test_hangup_regions_are_validated_first(env: FakeTwilioRest, case: str) -> None:
    region = env.region()
    sid, regions = "CA1", (region,)
    if case == "empty":
        regions = ()
    elif case == "list":
        regions = [region]  # type: ignore[assignment]
    elif case == "duplicate":
        regions = (region, env.region())
    elif case == "sid":
        sid = "CA1?x=1"
    else:
        regions = ({"api_host": "api.twilio.com"},)  # type: ignore[assignment]
    with pytest.raises(ValueError):
        hangup_call(sid, regions=regions)
    assert env.requests == []


async def test_hangup_async_with_and_without_regions(env: FakeTwilioRest) -> None:
    call = env.add_call(CALLEE, status="in-progress", api_host=IE1)
    await hangup_call_async(call.sid, regions=(env.region(), env.region(IE1)))
    assert [r.api_host for r in env.requests] == ["api.twilio.com", IE1]
    local = env.add_call(CALLEE, status="in-progress")
    await hangup_call_async(local.sid)
    await hangup_call_async(local.sid)  # already ended: still success
    with pytest.raises(TwilioCallNotFoundError):
        await hangup_call_async("CA" + "d" * 32, regions=(env.region(AU1),))


# --------------------------------------------------------------------------- SMS


def test_send_sms_returns_the_message_fields(env: FakeTwilioRest) -> None:
    result = get_sms_transport().send_sms(to=CALLEE, body="Your code is 1234")
    request = only_request(env)
    assert request.path == f"/2010-04-01/Accounts/{env.account_sid}/Messages.json"
    assert dict(request.form) == {"To": CALLEE, "From": OUR_NUMBER, "Body": "Your code is 1234"}
    assert result == {"message_sid": result["message_sid"], "status": "queued", "to": CALLEE}
    assert env.messages[result["message_sid"]].body == "Your code is 1234"


def test_send_sms_with_media_service_and_callback(
    env: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TWILIO_PHONE_NUMBER")  # a messaging service needs no number
    service = "MG" + "1" * 32
    result = twilio_sms.send_sms(
        CALLEE,
        "pics",
        media_urls=["https://cdn.example.com/1.png", "https://cdn.example.com/2.png"],
        messaging_service_sid=service,
        status_callback="https://bot.example.com/sms-status",
    )
    request = only_request(env)
    assert request.fields("MediaUrl") == [
        "https://cdn.example.com/1.png",
        "https://cdn.example.com/2.png",
    ]
    assert request.field("MessagingServiceSid") == service
    assert request.field("From") is None
    assert request.field("StatusCallback") == "https://bot.example.com/sms-status"
    assert result["status"] == "accepted"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"to": " ", "body": "x"},
        {"to": CALLEE, "body": ""},
        {"to": CALLEE, "body": "x", "media_urls": "https://one"},
        {"to": CALLEE, "body": "x", "messaging_service_sid": "MG/1"},
    ],
)
def test_send_sms_validates_before_any_request(
    env: FakeTwilioRest, kwargs: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        twilio_sms.send_sms(**kwargs)  # type: ignore[arg-type]
    assert env.requests == []


def test_send_sms_refused_by_twilio(env: FakeTwilioRest) -> None:
    env.fail_next(400, 21211, "Invalid 'To' Phone Number", path="Messages")
    with pytest.raises(TwilioRestError) as info:
        twilio_sms.send_sms("+1", "x")
    assert (info.value.status, info.value.code, info.value.retryable) == (400, 21211, False)


async def test_send_sms_async(env: FakeTwilioRest) -> None:
    result = await twilio_sms.send_sms_async(CALLEE, "hi", media_urls=["https://m/1"])
    request = only_request(env)
    assert request.fields("MediaUrl") == ["https://m/1"] and request.field("Body") == "hi"
    assert result["to"] == CALLEE and result["message_sid"].startswith("SM")


def test_sms_reply_twiml() -> None:
    assert list(ET.fromstring(twilio_sms.sms_reply_twiml(None))) == []
    assert list(ET.fromstring(twilio_sms.sms_reply_twiml(""))) == []
    root = ET.fromstring(twilio_sms.sms_reply_twiml("Thanks <3 & bye"))
    assert [(child.tag, child.text) for child in root] == [("Message", "Thanks <3 & bye")]


def test_parse_inbound_sms() -> None:
    sms = twilio_sms.parse_inbound_sms(
        {
            "MessageSid": "SM1",
            "From": CALLEE,
            "To": OUR_NUMBER,
            "Body": "hello",
            "NumMedia": "2",
            "MediaUrl0": "https://m/0",
            "MediaUrl1": "https://m/1",
            "AccountSid": "AC1",
        }
    )
    assert (sms.message_sid, sms.from_, sms.to, sms.body) == ("SM1", CALLEE, OUR_NUMBER, "hello")
    assert sms.media_urls == ("https://m/0", "https://m/1") and sms.account_sid == "AC1"
    with pytest.raises(ValueError, match="MediaUrl1"):
        twilio_sms.parse_inbound_sms(
            {"MessageSid": "SM1", "From": "a", "To": "b", "NumMedia": "2", "MediaUrl0": "u"}
        )
    with pytest.raises(ValueError, match="MessageSid"):
        twilio_sms.parse_inbound_sms({"From": "a", "To": "b"})


def test_transport_factories() -> None:
    assert get_sms_transport() is twilio_sms and callable(get_sms_transport("twilio").send_sms)
    assert create_transport() is twilio_call
    with pytest.raises(ValueError, match="Unknown SMS transport: carrier-pigeon"):
        get_sms_transport("carrier-pigeon")
    with pytest.raises(ValueError, match="Unknown transport: smoke-signals"):
        create_transport("smoke-signals")


# --------------------------------------------------------------------------- regions and rows


@pytest.mark.parametrize("host", ["api.twilio.com", IE1, "api.a-1.b2.twilio.com"])
def test_region_accepts_twilio_api_hosts(host: str) -> None:
    assert TwilioRegion(api_host=host, account_sid="AC1", auth=("AC1", "t")).api_host == host


@pytest.mark.parametrize(
    "host",
    [
        "API.twilio.com",
        "api.ie1.twilio.com",
        "evil.com",
        "api.twilio.com.evil.com",
        "api.-x.ie1.twilio.com",
        "api.twilio.com:443",
        "api.dublin.ie1.twilio.com/",
    ],
)
def test_region_rejects_other_hosts(host: str) -> None:
    with pytest.raises(ValidationError):
        TwilioRegion(api_host=host, account_sid="AC1", auth=("AC1", "t"))


def test_region_hides_the_secret_and_is_strict() -> None:
    secret = "s3cr3t-token-value"
    region = TwilioRegion(api_host=IE1, account_sid="AC1", auth=("AC1", secret))
    assert secret not in repr(region) and secret not in str(region)
    with pytest.raises(ValidationError) as info:
        TwilioRegion(api_host="evil.com", account_sid="AC1", auth=("AC1", secret))
    assert secret not in str(info.value)
    with pytest.raises(ValidationError) as info:
        TwilioRegion(api_host=IE1, account_sid="AC-1", auth=[secret, secret])  # type: ignore[arg-type]
    assert secret not in str(info.value) and "auth" in str(info.value)
    for auth in (("AC1", " "), ("", secret)):
        with pytest.raises(ValidationError):
            TwilioRegion(api_host=IE1, account_sid="AC1", auth=auth)
    with pytest.raises(ValidationError):
        region.api_host = "api.twilio.com"  # type: ignore[misc]


def test_call_row_is_frozen_strict_and_blanks_the_caller() -> None:
    row = TwilioCallRow(
        call_sid="CA1", status="completed", start_time=None, direction="inbound", caller=" "
    )
    assert row.caller is None
    with pytest.raises(ValidationError):
        row.status = "busy"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        TwilioCallRow(call_sid="CA1", status="x", start_time="1", direction="d", caller=None)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TwilioCallRow(call_sid=" ", status="x", start_time=None, direction="d", caller=None)


def test_error_classes_keep_their_contract() -> None:
    not_found = TwilioCallNotFoundError(("api.twilio.com", IE1))
    assert not_found.attempted_hosts == ("api.twilio.com", IE1) and IE1 in str(not_found)
    incomplete = TwilioCallListIncompleteError(IE1, 3)
    assert (incomplete.api_host, incomplete.pages_fetched) == (IE1, 3)
    for error in (not_found, incomplete):
        assert isinstance(error, RuntimeError) and isinstance(error, VoiceRuntimeError)


# --------------------------------------------------------------------------- list_calls


@pytest.mark.parametrize(
    "overrides",
    [
        {"to": " "},
        {"to": None},
        {"start_after": datetime(2026, 1, 1)},
        {"start_after": "2026-01-01T00:00:00Z"},
        {"page_size": 0},
        {"page_size": 1001},
        {"page_size": True},
        {"page_size": 2.0},
        {"max_pages": 0},
        {"max_pages": True},
        {"api_host": "evil.com"},
        {"account_sid": "AC/1"},
        {"auth": ("AC1", "")},
        {"auth": ["AC1", "t"]},
    ],
)
def test_list_calls_validates_before_any_request(
    env: FakeTwilioRest, overrides: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        list_calls(**region_list_args(env, **overrides))  # type: ignore[arg-type]
    assert env.requests == []


def test_list_calls_follows_pages_and_filters(env: FakeTwilioRest) -> None:
    after = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    newer = [env.add_call(CALLEE, start_time=after + timedelta(minutes=m)) for m in range(1, 6)]
    env.add_call(CALLEE, start_time=after)  # at start_after: the fake returns it, we drop it
    env.add_call(CALLEE, start_time=after - timedelta(hours=1))
    env.add_call("+15550003333", start_time=after + timedelta(minutes=1))
    env.add_call(CALLEE, start_time=after + timedelta(minutes=1), api_host=IE1)
    rows = list_calls(**region_list_args(env, start_after=after, page_size=2))  # type: ignore[arg-type]
    assert sorted(row.call_sid for row in rows) == sorted(call.sid for call in newer)
    assert all(
        isinstance(row, TwilioCallRow) and row.start_time > after.timestamp() for row in rows
    )
    first = env.requests[0]
    assert (first.param("To"), first.param("StartTime>"), first.param("PageSize")) == (
        CALLEE,
        "2026-01-01T12:00:00Z",
        "2",
    )
    assert len(env.requests) == 3 and all(r.auth_user == env.account_sid for r in env.requests)


def test_list_calls_in_a_region(env: FakeTwilioRest) -> None:
    after = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    here = env.add_call(CALLEE, start_time=after + timedelta(minutes=1), api_host=IE1)
    env.add_call(CALLEE, start_time=after + timedelta(minutes=1))
    rows = list_calls(**region_list_args(env, api_host=IE1, start_after=after))  # type: ignore[arg-type]
    assert [row.call_sid for row in rows] == [here.sid]
    assert [r.api_host for r in env.requests] == [IE1]


def test_list_calls_keeps_unknown_start_times_and_blank_callers(env: FakeTwilioRest) -> None:
    env.respond_next(
        200,
        {
            "calls": [
                raw_call("CA1", start_time=None, **{"from": ""}),
                raw_call("CA2", start_time="Thu, 01 Jan 2026 11:00:00 +0000"),
                raw_call("CA3", start_time="Thu, 01 Jan 2026 14:30:00 +0200"),  # 12:30 UTC
                {k: v for k, v in raw_call("CA4").items() if k != "from"},
            ],
            "next_page_uri": None,
        },
    )
    rows = list_calls(**region_list_args(env))  # type: ignore[arg-type]
    assert [(row.call_sid, row.caller) for row in rows] == [
        ("CA1", None),
        ("CA3", "+15559990000"),
        ("CA4", None),
    ]
    assert rows[0].start_time is None
    assert rows[1].start_time == datetime(2026, 1, 1, 12, 30, tzinfo=UTC).timestamp()


def test_list_calls_accepts_an_absolute_link_on_the_same_host(env: FakeTwilioRest) -> None:
    collection = f"/2010-04-01/Accounts/{env.account_sid}/Calls.json"
    env.respond_next(
        200,
        {"calls": [raw_call("CA1")], "next_page_uri": f"https://api.twilio.com{collection}?Page=1"},
    )
    env.respond_next(200, {"calls": [raw_call("CA2")], "next_page_uri": None})
    rows = list_calls(**region_list_args(env))  # type: ignore[arg-type]
    assert [row.call_sid for row in rows] == ["CA1", "CA2"]
    assert env.requests[1].path == collection and env.requests[1].query == (("Page", "1"),)


@pytest.mark.parametrize(
    "link",
    [
        "https://evil.example.com{c}?Page=1",
        "http://api.twilio.com{c}?Page=1",
        "https://api.dublin.ie1.twilio.com{c}?Page=1",
        "https://user@api.twilio.com{c}?Page=1",
        "https://api.twilio.com:443{c}?Page=1",
        "//evil.example.com{c}",
        "/2010-04-01/Accounts/AC999/Calls.json?Page=1",
        "/2010-04-01/Accounts/{sid}/Messages.json?Page=1",
        "/2010-04-01/Accounts/{sid}/Calls/CA1.json",
        "/2010-04-01/Accounts/AC999/../{sid}/Calls.json",
        "/2010-04-01/Accounts/{sid}/%2e%2e/{sid}/Calls.json",
        "{c}?Page=1#frag",
        "{c}?Page=%zz",
        "{c}?Page=1 2",
        "\\\\evil.example.com{c}",
        "{c}?Page=\u00e9",
        "",
    ],
)
def test_list_calls_refuses_foreign_or_malformed_links(env: FakeTwilioRest, link: str) -> None:
    collection = f"/2010-04-01/Accounts/{env.account_sid}/Calls.json"
    env.respond_next(
        200,
        {
            "calls": [raw_call("CA1")],
            "next_page_uri": link.format(c=collection, sid=env.account_sid),
        },
    )
    with pytest.raises(ValueError):
        list_calls(**region_list_args(env))  # type: ignore[arg-type]
    assert len(env.requests) == 1


@pytest.mark.parametrize(
    "page",
    [
        {"calls": [raw_call("CA1")]},  # next_page_uri missing
        {"next_page_uri": None},
        {"calls": {"CA1": {}}, "next_page_uri": None},
        {"calls": [{"status": "completed", "direction": "inbound"}], "next_page_uri": None},
        {"calls": [raw_call("CA1", status=None)], "next_page_uri": None},
        {"calls": [raw_call("CA1", start_time="yesterday")], "next_page_uri": None},
        {
            "calls": [raw_call("CA1", start_time="Thu, 01 Jan 2026 13:00:00 -0000")],
            "next_page_uri": None,
        },
        {"calls": [raw_call("CA1", start_time=1767272400)], "next_page_uri": None},
        {"calls": [raw_call(" ")], "next_page_uri": None},
        {"calls": [], "next_page_uri": 7},
        [],
        "not json at all",
    ],
)
def test_list_calls_validates_every_page(env: FakeTwilioRest, page: object) -> None:
    env.respond_next(200, page)
    with pytest.raises(ValueError):
        list_calls(**region_list_args(env))  # type: ignore[arg-type]


def test_list_calls_validates_later_pages_too(env: FakeTwilioRest) -> None:
    collection = f"/2010-04-01/Accounts/{env.account_sid}/Calls.json"
    env.respond_next(200, {"calls": [raw_call("CA1")], "next_page_uri": f"{collection}?Page=1"})
    env.respond_next(200, {"calls": [raw_call("CA2", direction=5)], "next_page_uri": None})
    with pytest.raises(ValueError):
        list_calls(**region_list_args(env))  # type: ignore[arg-type]
    assert len(env.requests) == 2


def test_list_calls_raises_when_pages_remain(env: FakeTwilioRest) -> None:
    after = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    for minute in range(1, 6):
        env.add_call(CALLEE, start_time=after + timedelta(minutes=minute))
    with pytest.raises(TwilioCallListIncompleteError) as info:
        list_calls(**region_list_args(env, page_size=2, max_pages=2))  # type: ignore[arg-type]
    assert (info.value.api_host, info.value.pages_fetched) == ("api.twilio.com", 2)
    assert len(env.requests) == 2
    rows = list_calls(**region_list_args(env, page_size=2, max_pages=3))  # type: ignore[arg-type]
    assert len(rows) == 5


def test_list_calls_http_failure(env: FakeTwilioRest) -> None:
    env.fail_next(503, 20503, "Service unavailable")
    with pytest.raises(TwilioRestError) as info:
        list_calls(**region_list_args(env))  # type: ignore[arg-type]
    assert (info.value.status, info.value.code, info.value.retryable) == (503, 20503, True)
    with pytest.raises(TwilioRestError) as info:
        list_calls(**region_list_args(env, auth=(env.account_sid, "wrong")))  # type: ignore[arg-type]
    assert (info.value.status, info.value.code) == (401, 20003)


async def test_list_calls_async(env: FakeTwilioRest) -> None:
    after = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    calls = [env.add_call(CALLEE, start_time=after + timedelta(minutes=m)) for m in (1, 2, 3)]
    rows = await list_calls_async(**region_list_args(env, page_size=1))  # type: ignore[arg-type]
    assert sorted(r.call_sid for r in rows) == sorted(c.sid for c in calls)
    with pytest.raises(TwilioCallListIncompleteError):
        await list_calls_async(**region_list_args(env, page_size=1, max_pages=2))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await list_calls_async(**region_list_args(env, to=""))  # type: ignore[arg-type]


def test_list_recent_calls_is_deprecated(env: FakeTwilioRest, monkeypatch) -> None:
    five_minutes_ago = (datetime.now(UTC) - timedelta(minutes=5)).replace(microsecond=0)
    recent = env.add_call(OUR_NUMBER, start_time=five_minutes_ago)
    env.add_call(OUR_NUMBER, start_time=datetime.now(UTC) - timedelta(hours=5))
    with pytest.deprecated_call():
        rows = list_recent_calls(3600.0)
    assert rows == [
        {"call_sid": recent.sid, "status": "completed", "start_time": recent.start_time.timestamp()}
    ]
    assert env.requests[0].param("To") == OUR_NUMBER
    monkeypatch.delenv("TWILIO_ACCOUNT_SID")
    with pytest.deprecated_call():
        assert list_recent_calls() == []


# --------------------------------------------------------------------------- the fake itself


def test_fake_releases_its_thread_and_port() -> None:
    fake = FakeTwilioRest().start()
    port = fake.port
    fake.stop()
    fake.stop()  # idempotent
    assert not any(t.name == "FakeTwilioRest" for t in threading.enumerate())
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
