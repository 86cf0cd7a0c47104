"""``voice-runtime serve``, ``call`` and ``sms``: help texts, real runs against the fakes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
import pytest
from twilio.request_validator import RequestValidator

from voice_runtime import control_cli
from voice_runtime.cli import main
from voice_runtime.mock.tts import MockTts
from voice_runtime.testing.fake_twilio_rest import FakeCall, FakeTwilioRest
from voice_runtime.testing.simulator import CallerSimulator

ROOT = Path(__file__).resolve().parent.parent
OUR_NUMBER = "+15550001111"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stream_of(twiml: str) -> tuple[str, dict[str, str]]:
    stream = ET.fromstring(twiml).find("Connect/Stream")
    assert stream is not None, twiml
    return stream.attrib["url"], {p.attrib["name"]: p.attrib["value"] for p in stream}


# --------------------------------------------------------------------------- help


def test_top_level_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "call", "sms"):
        assert command in out


@pytest.mark.parametrize(
    ("command", "names"),
    [
        ("serve", control_cli.SERVE_ENV),
        ("call", control_cli.CALL_ENV),
        ("sms", control_cli.SMS_ENV),
    ],
)
def test_subcommand_help_names_its_environment(
    capsys: pytest.CaptureFixture[str], command: str, names: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    _, _, epilog = out.partition("environment variables:")
    assert epilog, out
    for name in names:
        assert name in epilog, name
    # RawDescriptionHelpFormatter keeps one variable per line.
    assert len([line for line in epilog.splitlines() if line.strip()]) == len(names)


# --------------------------------------------------------------------------- sms


def test_sms_sends_through_twilio(
    fake_env: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["sms", "+15550002222", "Your code is 1234", "--media-url", "https://x.test/a.png"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "queued" and result["to"] == "+15550002222"
    message = fake_env.messages[result["message_sid"]]
    assert (message.to, message.from_, message.body) == (
        "+15550002222",
        OUR_NUMBER,
        "Your code is 1234",
    )
    assert message.media_urls == ("https://x.test/a.png",)


def test_sms_without_sender_names_the_variable(
    fake_env: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TWILIO_PHONE_NUMBER")
    assert main(["sms", "+15550002222", "hi"]) == 2
    assert "TWILIO_PHONE_NUMBER" in capsys.readouterr().err
    assert not fake_env.messages


# --------------------------------------------------------------------------- call


def test_call_twiml_only_prints_the_stream_twiml(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["call", "+15550002222", "--twiml-only", "--public-url", "https://bot.example.com",
         "--param", "campaign=spring"]
    )  # fmt: skip
    assert code == 0
    url, params = stream_of(capsys.readouterr().out)
    assert url == "wss://bot.example.com/voice"
    assert params == {"campaign": "spring"}


def test_call_places_a_call_that_connects_back(
    fake_env: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    phones: list[threading.Thread] = []
    heard: list[str] = []

    async def answer(call: FakeCall) -> None:
        url, params = stream_of(call.twiml or "")
        signature = RequestValidator(fake_env.auth_token).compute_signature(url, {})
        sim = CallerSimulator(
            url, call_sid=call.sid, parameters=params, headers={"X-Twilio-Signature": signature}
        )
        await sim.connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not sim.closed and loop.time() < deadline:
            if fake_env.calls[call.sid].status == "completed":  # hung up over REST
                break
            await asyncio.sleep(0.02)
        heard.append(url)
        await sim.hangup()

    def created(call: FakeCall) -> None:
        phone = threading.Thread(target=asyncio.run, args=(answer(call),))
        phones.append(phone)
        phone.start()

    fake_env.on_call_created(created)
    code = main(["call", "+15550002222", "--public-url", base, "--port", str(port),
                 "--ring-timeout", "15", "--param", "campaign=spring"])  # fmt: skip
    for phone in phones:
        phone.join(10)
    out = capsys.readouterr().out
    assert code == 0, out
    (call,) = fake_env.calls.values()
    assert "call answered" in out and call.sid in out
    assert heard and heard[0].startswith(f"ws://127.0.0.1:{port}/voice/")
    assert call.status == "completed"  # the default handler hung up over REST
    create = fake_env.requests[0]
    assert create.field("Timeout") == "15"
    assert stream_of(create.field("Twiml") or "")[1] == {
        "direction": "outbound",
        "campaign": "spring",
    }


BOT_THAT_LISTENS = """
from voice_runtime import Conversation, VoiceServer
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts

heard = []


def handle(session):
    conv = Conversation(session, MockTts())
    heard.append(conv.listen(timeout=0.2))  # the server's STT: no ConfigurationError
    conv.hangup()


app = VoiceServer(on_call=handle, stt=MockStt)
"""


def test_call_runs_an_app_voice_server_with_its_stt(
    fake_env: FakeTwilioRest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "cli_listening_bot.py").write_text(BOT_THAT_LISTENS)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cli_listening_bot", raising=False)
    port = free_port()
    phones: list[threading.Thread] = []

    async def answer(call: FakeCall) -> None:
        url, params = stream_of(call.twiml or "")
        signature = RequestValidator(fake_env.auth_token).compute_signature(url, {})
        headers = {"X-Twilio-Signature": signature}
        async with CallerSimulator(url, call_sid=call.sid, parameters=params, headers=headers):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while fake_env.calls[call.sid].status != "completed" and loop.time() < deadline:
                await asyncio.sleep(0.02)

    def created(call: FakeCall) -> None:
        phones.append(threading.Thread(target=asyncio.run, args=(answer(call),)))
        phones[-1].start()

    fake_env.on_call_created(created)
    code = main(["call", "+15550002222", "--public-url", f"http://127.0.0.1:{port}",
                 "--port", str(port), "--app", "cli_listening_bot:app",
                 "--app-dir", str(tmp_path)])  # fmt: skip
    for phone in phones:
        phone.join(10)
    assert code == 0, capsys.readouterr()
    assert sys.modules["cli_listening_bot"].heard == [None]
    sys.modules.pop("cli_listening_bot", None)


def test_call_not_answered_exits_1(
    fake_env: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    code = main(["call", "+15550002222", "--public-url", f"http://127.0.0.1:{port}",
                 "--port", str(port), "--answer-timeout", "0.3"])  # fmt: skip
    assert code == 1
    assert "not answered" in capsys.readouterr().err


# --------------------------------------------------------------------------- serve


def test_serve_runs_a_handler_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "VOICE_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "voice_runtime.cli", "serve", "subclass_session:handle_call",
         "--session-factory", "subclass_session:TelcoSession", "--app-dir", "examples",
         "--port", str(port), "--drain-timeout", "2", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        asyncio.run(_call_then_drain(proc, base))
        output, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


async def _call_then_drain(proc: subprocess.Popen[str], base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as http:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, "server exited during startup"
            try:
                if (await http.get("/ready")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            await asyncio.sleep(0.05)

        form = {"CallSid": "CA" + "5" * 32, "From": "+15550100200", "To": OUR_NUMBER}
        url, params = stream_of((await http.post("/twilio/voice", data=form)).text)
        assert params["caller_number"] == "+15550100200"
        greeting = MockTts(ms_per_char=15).audio_for("Welcome to Acme support. Press any key.")
        async with CallerSimulator(url, parameters=params, call_sid=form["CallSid"]) as sim:
            assert await sim.wait_for_heard(100, 10)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # While draining: not ready, and new calls get the busy answer.
            while (await http.get("/ready")).status_code != 503:
                assert time.monotonic() - t0 < 2
                await asyncio.sleep(0.02)
            busy = await http.post("/twilio/voice", data={**form, "CallSid": "CA" + "6" * 32})
            assert "<Hangup" in busy.text and "<Stream" not in busy.text
            assert await sim.wait_closed(5)
            assert time.monotonic() - t0 <= 2.5
        assert bytes(sim.heard) == greeting  # the live call was not cut mid-sentence


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("no_colon", "expected MODULE:ATTRIBUTE"),
        ("no_such_module_xyz:handle", "could not import module"),
        ("subclass_session:no_such_handler", "has no attribute"),
        ("subclass_session:CALL_RECORDS", "neither a call handler nor a VoiceServer"),
    ],
)
def test_serve_reports_a_bad_app(
    capsys: pytest.CaptureFixture[str], app: str, message: str
) -> None:
    assert main(["serve", app, "--app-dir", str(ROOT / "examples")]) == 2
    assert message in capsys.readouterr().err


def test_serve_reports_a_bad_trusted_proxy_network(capsys: pytest.CaptureFixture[str]) -> None:
    app = "subclass_session:handle_call"
    argv = ["serve", app, "--app-dir", str(ROOT / "examples"), "--trust-proxy", "proxy.local"]
    assert main(argv) == 2
    assert "'proxy.local' is not an IP network" in capsys.readouterr().err
