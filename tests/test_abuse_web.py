"""Attacks on the HTTP webhooks of a VoiceServer served the production way (a second process),
each with a legitimate call beside it that must lose no frame; and the webhook rules that need
no second process (malformed forms, user callbacks off the loop, well-formed TwiML)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import select
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from abuse_kit import PacedCaller, ServedApp, assert_no_frame_lost
from conftest import wait_for
from starlette.datastructures import ImmutableMultiDict
from twilio.request_validator import RequestValidator

from voice_runtime._callbacks import CallbackRunner
from voice_runtime.server import MAX_WEBHOOK_BYTES, VoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.transports.twilio_call import build_stream_twiml
from voice_runtime.transports.twilio_sms import sms_reply_twiml
from voice_runtime.transports.xml_text import xml_safe
from voice_runtime.types import SessionEvent

TOKEN = "abuse-web-token-0123456789"
MB = 1 << 20
ATTACK_BYTES = 200 * MB
WEBHOOKS = ("/twilio/voice", "/twilio/status", "/twilio/sms")
CALL_SID = "CA" + "7" * 32
VOICE_FORM = {"CallSid": CALL_SID, "From": "+15550100200", "To": "+15550100300"}
SMS_FORM = {"MessageSid": "SM" + "8" * 32, "From": "+15550100200", "To": "+15550100300"}


def sign(url: str, params: dict[str, str] | None = None) -> str:
    return RequestValidator(TOKEN).compute_signature(url, params or {})


def signed_app(**env: str | None) -> ServedApp:
    """The abuse app with signatures enforced against its own URL as the public one."""
    # The legitimate call uses the fixed /voice path, off by default under signatures.
    app = ServedApp({"TWILIO_AUTH_TOKEN": TOKEN, **env}, args=["--allow-unrouted"])
    app.env["VOICE_PUBLIC_URL"] = app.url
    return app


def signed_caller(app: ServedApp) -> PacedCaller:
    """A legitimate call whose upgrade carries a valid signature."""
    url = app.ws_url + "/voice"
    return PacedCaller(url, headers={"X-Twilio-Signature": sign(url)})


@contextlib.contextmanager
def call_beside(app: ServedApp, caller: PacedCaller) -> Iterator[PacedCaller]:
    """Run ``caller`` for the block; then check it lost no frame."""
    caller.start()
    assert caller.started.wait(10)
    assert wait_until(lambda: app.call_record(caller.call_sid)["bytes"] > 0)
    try:
        yield caller
    finally:
        caller.stop()
    assert_no_frame_lost(app, caller)


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def post_form(
    app: ServedApp, path: str, form: dict[str, str], signed: bool = True, timeout: float = 10
) -> tuple[int, str]:
    """POST a form (signed for the app's public URL); return status and body."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signed:
        headers["X-Twilio-Signature"] = sign(app.url + path, form)
    data = urllib.parse.urlencode(form).encode()
    request = urllib.request.Request(app.url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def body_pieces(total: int, chunked: bool, piece: int = 64 * 1024) -> Iterator[bytes]:
    """A form body of ``total`` bytes, generated piece by piece (never held whole)."""
    data = b"Body=" + b"a" * (piece - 5)
    sent = 0
    while sent < total:
        chunk = data[: min(piece, total - sent)]
        sent += len(chunk)
        yield b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
    if chunked:
        yield b"0\r\n\r\n"


def post_huge(
    app: ServedApp, path: str, *, chunked: bool, headers: dict[str, str]
) -> tuple[int | None, int]:
    """Stream a 200 MB POST until the server answers or closes; (status or None, bytes sent)."""
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{app.port}",
        "Content-Type: application/x-www-form-urlencoded",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {ATTACK_BYTES}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    sent = 0
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for piece in body_pieces(ATTACK_BYTES, chunked):
                if select.select([sock], [], [], 0)[0]:
                    break  # the server answered: stop sending
                sock.sendall(piece)
                sent += len(piece)
        except OSError:  # reset or timed out: the server stopped reading
            pass
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, sent


# --------------------------------------------------------------------------- item 1: body cap


def test_huge_unsigned_posts_are_refused_without_reading_them() -> None:
    with signed_app() as app, call_beside(app, signed_caller(app)):
        # Warm up every webhook path (lazy imports, first allocations) before measuring.
        for path in WEBHOOKS:
            form = SMS_FORM if path.endswith("sms") else VOICE_FORM
            assert post_form(app, path, form)[0] in (200, 204), path
            assert post_form(app, path, form, signed=False)[0] == 403
        rss_before, fds_before = app.rss_mb(), app.fd_count()
        results: dict[tuple[str, bool, str], tuple[int | None, int]] = {}
        for path in WEBHOOKS:
            for chunked in (False, True):
                # No signature: refused before the body is read. A forged one: the body is
                # read up to the cap, then refused.
                results[path, chunked, "none"] = post_huge(app, path, chunked=chunked, headers={})
                forged = {"X-Twilio-Signature": "forged"}
                results[path, chunked, "forged"] = post_huge(
                    app, path, chunked=chunked, headers=forged
                )
        rss_after = app.rss_mb()
        print(f"\nRSS {rss_before:.1f} MB -> {rss_after:.1f} MB after {len(results)} x 200 MB")
        for key, (status, sent) in results.items():
            print(f"  {key}: status {status}, {sent / MB:.1f} MB sent before it stopped")
        for (_, chunked, signature), (status, sent) in results.items():
            expected = 403 if signature == "none" else 413
            # The answer may be lost to the reset of the unread body; never another one.
            assert status in (expected, None), results
            assert sent < 32 * MB, results  # the server stopped reading long before 200 MB
            if not chunked:
                assert status == expected, results  # answered from the headers alone
        assert rss_after - rss_before < 8, (rss_before, rss_after)
        # Every refused connection was closed by the server.
        assert wait_until(lambda: app.fd_count() <= fds_before), (fds_before, app.fd_count())
        # Still serving: a legitimate signed webhook right after.
        assert post_form(app, "/twilio/voice", VOICE_FORM)[0] == 200


def test_serve_refuses_to_start_without_a_public_url_when_signatures_are_enforced() -> None:
    app = ServedApp({"TWILIO_AUTH_TOKEN": TOKEN})
    try:
        with pytest.raises(RuntimeError, match="exited during startup"):
            app.start()
    finally:
        app.__exit__(None, None, None)  # kills it, had it started
    assert app.proc is not None and app.proc.returncode == 2
    assert "VOICE_PUBLIC_URL" in app.output
    assert "Traceback" not in app.output


# --------------------------------------------------------------------------- item 5: callbacks


def test_blocking_sms_handlers_do_not_stall_a_live_call() -> None:
    with signed_app(ABUSE_SMS_GATE="1") as app, call_beside(app, signed_caller(app)) as caller:
        pool = concurrent.futures.ThreadPoolExecutor(30)
        forms = [{**SMS_FORM, "MessageSid": f"SM{i:032d}", "Body": "hi"} for i in range(30)]
        answers = [pool.submit(post_form, app, "/twilio/sms", form, True, 30) for form in forms]
        # Handlers are blocked in worker threads; the loop still answers and the call's
        # audio keeps arriving (with the handlers on the loop, neither could happen).
        assert wait_until(lambda: app.get_json("/test/sms")["running"] >= 8)
        received = app.call_record(caller.call_sid)["bytes"]
        assert wait_until(lambda: app.call_record(caller.call_sid)["bytes"] >= received + 25 * 160)
        with urllib.request.urlopen(
            urllib.request.Request(app.url + "/test/sms/release", method="POST"), timeout=5
        ):
            pass
        results = [a.result(30) for a in answers]
        pool.shutdown()
        assert all(status == 200 and "got it" in body for status, body in results), results
        state = app.get_json("/test/sms")
        assert state["entered"] == 30
        assert state["max_running"] <= 8  # the callback pool is bounded


# --------------------------------------------------------------------------- in-process


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Error records and tracebacks, except the startup one about the public URL (these
    servers learn their URL once serving, as tests on port 0 do)."""
    return [
        r
        for r in caplog.records
        if (r.levelno >= logging.ERROR or r.exc_info) and "no public URL" not in r.getMessage()
    ]


@contextlib.asynccontextmanager
async def serving(
    monkeypatch: pytest.MonkeyPatch, *, signed: bool = True, **kwargs: Any
) -> AsyncIterator[tuple[VoiceServer, httpx.AsyncClient, str]]:
    for name in ("TWILIO_SKIP_SIGNATURE_VALIDATION", "VOICE_PUBLIC_URL", "VOICE_STREAM_URL"):
        monkeypatch.delenv(name, raising=False)
    if signed:
        monkeypatch.setenv("TWILIO_AUTH_TOKEN", TOKEN)
    else:
        monkeypatch.delenv("TWILIO_AUTH_TOKEN", raising=False)
    server = VoiceServer(**kwargs)
    async with serve_in_loop(server.app) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        server.public_url = srv.url
        yield server, http, srv.url


async def post_signed(
    http: httpx.AsyncClient, base: str, path: str, form: dict[str, str]
) -> httpx.Response:
    signature = sign(base + path, form)
    return await http.post(path, data=form, headers={"X-Twilio-Signature": signature})


@pytest.mark.parametrize(
    ("path", "form"),
    [
        pytest.param("/twilio/voice", {"From": "+15550100200"}, id="voice-no-callsid"),
        pytest.param("/twilio/voice", {"CallSid": "CA/../x"}, id="voice-bad-callsid"),
        pytest.param("/twilio/status", {"CallStatus": "completed"}, id="status-no-callsid"),
        pytest.param("/twilio/sms", {"From": "+1555", "To": "+1666"}, id="sms-no-sid"),
        pytest.param("/twilio/sms", {**SMS_FORM, "NumMedia": "x"}, id="sms-bad-nummedia"),
        pytest.param("/twilio/sms", {**SMS_FORM, "NumMedia": "2"}, id="sms-missing-media"),
    ],
)
async def test_incomplete_signed_forms_get_400(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    form: dict[str, str],
) -> None:
    async with serving(monkeypatch, on_sms=lambda sms: "ok") as (server, http, base):
        reply = await post_signed(http, base, path, form)
        assert reply.status_code == 400
        assert not server.registry._routes
    assert not errors(caplog)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"CallSid=CA1&From=\xff\xfe", id="not-utf8"),
        pytest.param(b"CallSid=CA1&&&From", id="not-a-form"),
        pytest.param("&".join(f"f{i}=1" for i in range(300)).encode(), id="too-many-fields"),
    ],
)
async def test_malformed_bodies_get_400(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    async with serving(monkeypatch) as (server, http, _base):
        for path in WEBHOOKS:
            reply = await http.post(
                path,
                content=body,
                headers={
                    "X-Twilio-Signature": "anything",
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            )
            assert reply.status_code == 400, path
        assert server.webhook_refusals.count("malformed") == len(WEBHOOKS)
    assert not errors(caplog)


async def test_a_body_that_trickles_in_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(monkeypatch) as (server, _, base):
        server.webhook_read_timeout_s = 0.3
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /twilio/sms HTTP/1.1\r\nHost: x\r\nX-Twilio-Signature: s\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nB"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 408"), status
        writer.close()


async def test_missing_signature_is_refused_before_the_body_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving(monkeypatch) as (_, _http, base):
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Headers only: the 403 comes without a single byte of the announced body.
        writer.write(
            b"POST /twilio/voice HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 403"), status
        writer.close()
    assert MAX_WEBHOOK_BYTES == 64 * 1024


async def test_sync_callbacks_run_in_worker_threads_async_ones_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: dict[str, str] = {}
    loop_thread = threading.current_thread().name

    def inbound_parameters(form: Any) -> dict[str, str]:
        threads["inbound_parameters"] = threading.current_thread().name
        return {"tenant": "acme"}

    async def on_sms(sms: Any) -> str:
        threads["on_sms"] = threading.current_thread().name
        return "async reply"

    async with serving(monkeypatch, inbound_parameters=inbound_parameters, on_sms=on_sms) as (
        _,
        http,
        base,
    ):
        assert (await post_signed(http, base, "/twilio/voice", VOICE_FORM)).status_code == 200
        reply = await post_signed(http, base, "/twilio/sms", SMS_FORM)
        assert "async reply" in reply.text
    assert threads["inbound_parameters"].startswith("vr-callback")
    assert threads["on_sms"] == loop_thread


async def test_status_events_stay_in_order_and_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = threading.Event()
    seen: list[tuple[str, str]] = []

    def on_event(event: SessionEvent) -> None:
        seen.append((event.data.get("status", ""), threading.current_thread().name))
        if event.data.get("status") == "ringing":
            gate.wait(10)  # a slow handler

    async with serving(monkeypatch) as (server, http, base):
        session = VoiceSession(on_event=on_event)
        server.registry.bind_call(CALL_SID, session)
        first = asyncio.ensure_future(
            post_signed(
                http, base, "/twilio/status", {"CallSid": CALL_SID, "CallStatus": "ringing"}
            )
        )
        assert await wait_for(lambda: len(seen) == 1)
        second = asyncio.ensure_future(
            post_signed(
                http, base, "/twilio/status", {"CallSid": CALL_SID, "CallStatus": "in-progress"}
            )
        )
        # The loop is free while the first handler blocks, but the second event waits its
        # turn: it is in flight (counted) and not delivered.
        assert (await http.get("/health")).status_code == 200
        assert await wait_for(lambda: server.callbacks.pending == 2)
        assert len(seen) == 1
        gate.set()
        assert (await first).status_code == 204 and (await second).status_code == 204
    assert [status for status, _ in seen] == ["ringing", "in-progress"]
    assert all(name.startswith("vr-callback") for _, name in seen)
    session.signal_disconnected()


async def test_too_many_pending_callbacks_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()

    def on_sms(sms: Any) -> str:
        gate.wait(10)
        return "late"

    async with serving(monkeypatch, on_sms=on_sms, max_pending_callbacks=2) as (
        server,
        http,
        base,
    ):
        held = [
            asyncio.ensure_future(
                post_signed(http, base, "/twilio/sms", {**SMS_FORM, "MessageSid": f"SM{i}"})
            )
            for i in range(2)
        ]
        assert await wait_for(lambda: server.callbacks.pending == 2)
        refused = await post_signed(http, base, "/twilio/sms", {**SMS_FORM, "MessageSid": "SM9"})
        assert refused.status_code == 503
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]


# --------------------------------------------------------------------------- item 10: TwiML


CONTROL = "a\x00b\x01c\x0bd\ud800e\uffff"


def test_xml_safe_removes_what_xml_cannot_carry() -> None:
    assert xml_safe(CONTROL + "\t\n\r é😀") == "abcde\t\n\r é😀"


def test_sms_reply_and_stream_parameters_stay_well_formed() -> None:
    message = ET.fromstring(sms_reply_twiml("hi\x00 there\x01\x0b!")).find("Message")
    assert message is not None and message.text == "hi there!"
    twiml = build_stream_twiml("https://x.example.com", parameters={"note\x0b": CONTROL})
    (param,) = ET.fromstring(twiml).iter("Parameter")
    assert param.attrib == {"name": "note", "value": "abcde"}


async def test_webhook_twiml_is_well_formed_with_control_characters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def inbound_parameters(form: Any) -> dict[str, str]:
        return {"note": form["Note"]}

    async with serving(
        monkeypatch, signed=False, inbound_parameters=inbound_parameters, on_sms=lambda s: s.body
    ) as (_, http, _base):
        voice = await http.post(
            "/twilio/voice", data={**VOICE_FORM, "From": "+1555\x0b0100", "Note": "a\x00b\x01c"}
        )
        params = {
            p.attrib["name"]: p.attrib["value"] for p in ET.fromstring(voice.text).iter("Parameter")
        }
        assert params["note"] == "abc" and params["caller_number"] == "+15550100"
        sms = await http.post("/twilio/sms", data={**SMS_FORM, "Body": "x\x00y\x01z\x0b"})
        message = ET.fromstring(sms.text).find("Message")
        assert message is not None and message.text == "xyz"


async def test_repeated_fields_are_signed_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(monkeypatch) as (_, http, base):
        pairs = [*SMS_FORM.items(), ("Tag", "b"), ("Tag", "a")]
        # What Twilio signs: every value of a repeated field (the SDK's multi-dict form).
        signature = RequestValidator(TOKEN).compute_signature(
            base + "/twilio/sms", ImmutableMultiDict(pairs)
        )
        reply = await http.post(
            "/twilio/sms",
            content=urllib.parse.urlencode(pairs),
            headers={
                "X-Twilio-Signature": signature,
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        assert reply.status_code == 200


async def test_a_cancelled_waiter_does_not_let_the_next_callback_jump_the_queue() -> None:
    runner = CallbackRunner(workers=2)
    gate = threading.Event()
    order: list[int] = []

    def slow(x: int) -> None:
        gate.wait(5)
        order.append(x)

    first = asyncio.ensure_future(runner.run(slow, 1, key="s"))
    second = asyncio.ensure_future(runner.run(order.append, 2, key="s"))
    third = asyncio.ensure_future(runner.run(order.append, 3, key="s"))
    assert await wait_for(lambda: runner.pending == 3)
    second.cancel()
    await asyncio.sleep(0.1)  # room for the third to run early, were the lane broken
    assert order == []
    gate.set()
    await first
    await third
    assert order == [1, 3]
    runner.shutdown()
