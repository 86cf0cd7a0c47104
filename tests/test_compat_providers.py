"""0.1.x users' own tests keep passing: written the way they write them.

MagicMock and autospec sessions go into each TTS and the transport, ``elevenlabs.ElevenLabs`` is
patched, the websocket endpoint is captured from ``app.websocket``, providers are built with
no environment, and a known secret never shows in an error or a log.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any
from unittest.mock import AsyncMock, MagicMock, call, create_autospec, patch

import pytest
from conftest import wait_for
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from voice_runtime.errors import MissingCredentialError, ProviderError
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_azure import FakeSpeechSdk
from voice_runtime.testing.fake_elevenlabs import FakeElevenLabsTts, FakeScribeServer
from voice_runtime.transports.twilio_ws import register_voice_websocket

SECRET = "sk-KNOWN-SECRET-0123456789"
VOICE_ENV = (
    "ELEVENLABS_API_KEY",
    "ELEVENLABS_VOICE_ID",
    "ELEVENLABS_MODEL",
    "STT_MODEL_ID",
    "STT_LANGUAGE_CODE",
    "AZURE_SPEECH_KEY",
    "AZURE_SPEECH_REGION",
    "AZURE_TTS_VOICE",
)
CHUNKS = [b"\x01" * 160, b"", b"\x02" * 320]


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VOICE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_sdk(monkeypatch: pytest.MonkeyPatch) -> FakeSpeechSdk:
    return FakeSpeechSdk().install(monkeypatch)


def _mock_session() -> MagicMock:
    """The session 0.1.x users pass: a MagicMock with the flag speak() looks at."""
    session = MagicMock()
    session.is_disconnected = False
    return session


def _autospec_session() -> Any:
    session = create_autospec(VoiceSession, instance=True)
    session.is_disconnected = False
    return session


@pytest.fixture
def patched_elevenlabs() -> Iterator[MagicMock]:
    with patch("elevenlabs.ElevenLabs") as cls:
        cls.return_value.text_to_speech.convert.return_value = iter(CHUNKS)
        yield cls


# ---------------------------------------------------------------------------- item 4


def test_every_provider_constructs_with_no_environment(
    no_env: None, fake_sdk: FakeSpeechSdk, caplog: pytest.LogCaptureFixture
) -> None:
    from voice_runtime.providers.azure_stt import AzurePersistentStt
    from voice_runtime.providers.azure_tts import AzureTTS
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS
    from voice_runtime.stt import create_stt
    from voice_runtime.tts import create_tts

    makers = [
        ElevenLabsTTS,
        PersistentSttSession,
        AzureTTS,
        AzurePersistentStt,
        create_tts,
        create_stt,
        lambda: create_tts("azure"),
        lambda: create_stt("azure"),
    ]
    for make in makers:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="voice_runtime"):
            provider = make()
        assert provider is not None
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, (make, [r.getMessage() for r in warnings])
        assert "API key" in warnings[0].getMessage() or "key" in warnings[0].getMessage()


async def test_the_missing_key_is_raised_when_audio_would_first_flow(
    no_env: None, fake_sdk: FakeSpeechSdk
) -> None:
    from voice_runtime.providers.azure_stt import AzurePersistentStt
    from voice_runtime.providers.azure_tts import AzureTTS
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    session = _mock_session()
    for tts, variable in (
        (ElevenLabsTTS(), "ELEVENLABS_API_KEY"),
        (AzureTTS(), "AZURE_SPEECH_KEY"),
    ):
        with pytest.raises(MissingCredentialError, match=variable):
            await asyncio.to_thread(tts.speak, "Hello.", session)
    session.put_outbound_sync.assert_not_called()
    for stt, variable in (
        (PersistentSttSession(), "ELEVENLABS_API_KEY"),
        (AzurePersistentStt(), "AZURE_SPEECH_KEY"),
    ):
        with pytest.raises(MissingCredentialError, match=variable):
            await stt.start(asyncio.Queue())
        await stt.stop()
    assert fake_sdk.recognizers == [] and fake_sdk.synthesizers == []


async def test_a_keyless_stt_in_a_call_reports_auth_error(
    no_env: None, voice_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from voice_runtime.stt import create_stt

    errors: list[str] = []

    def factory() -> Any:
        stt = create_stt()
        stt.on_error = errors.append
        return stt

    s = voice_server.session
    s.stt_factory = factory
    async with voice_server.simulator() as sim:
        await s.wait_for_ws_connect_async(5)
        assert await wait_for(lambda: errors == ["auth_error"])
        await sim.send_silence(100)  # the call goes on
    failed = [r for r in caplog.records if r.getMessage().startswith("STT failed to start: ")]
    assert len(failed) == 1 and "ELEVENLABS_API_KEY" in caplog.text


def test_credentials_are_read_at_construction(
    no_env: None, monkeypatch: pytest.MonkeyPatch, patched_elevenlabs: MagicMock
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    monkeypatch.setenv("ELEVENLABS_API_KEY", "key-at-construction")
    monkeypatch.setenv("ELEVENLABS_VOICE_ID", "voice-env")
    tts = ElevenLabsTTS()
    monkeypatch.setenv("ELEVENLABS_API_KEY", "key-changed-later")
    tts.speak("Hi.", _mock_session())
    patched_elevenlabs.assert_called_once_with(api_key="key-at-construction")
    assert patched_elevenlabs.return_value.text_to_speech.convert.call_args.kwargs["voice_id"] == (
        "voice-env"
    )


# ---------------------------------------------------------------------------- item 5


def test_elevenlabs_tts_makes_the_0_1_calls_on_a_magicmock_session(
    no_env: None, patched_elevenlabs: MagicMock
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    session = _mock_session()
    tts = ElevenLabsTTS(api_key="k")
    result = tts.speak("Hello there.", session)

    patched_elevenlabs.assert_called_once_with(api_key="k")
    patched_elevenlabs.return_value.text_to_speech.convert.assert_called_once_with(
        voice_id="21m00Tcm4TlvDq8ikWAM",
        model_id="eleven_multilingual_v2",
        text="Hello there.",
        output_format="ulaw_8000",
    )
    audio = [c for c in CHUNKS if c]
    assert session.put_outbound_sync.call_args_list == [call(c) for c in audio]
    assert session.tap_agent.call_args_list == [call(c) for c in audio]
    session.send_mark_and_wait.assert_called_once_with("tts_complete", timeout=30.0)
    # The mark is asked for after the last chunk.
    names = [c[0] for c in session.mock_calls]
    assert names.index("send_mark_and_wait") > max(
        i for i, n in enumerate(names) if n == "put_outbound_sync"
    )
    assert result["last_spoken"] == "Hello there." and "error" not in result
    assert result["interrupted"] is False and result["call_disconnected"] is False


def test_one_sdk_client_serves_every_speak(no_env: None, patched_elevenlabs: MagicMock) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    convert = patched_elevenlabs.return_value.text_to_speech.convert
    convert.side_effect = lambda **kw: iter(CHUNKS)
    tts = ElevenLabsTTS(api_key="k")
    for text in ("One.", "Two.", "Three."):
        tts.speak(text, _mock_session())
    assert patched_elevenlabs.call_count == 1 and convert.call_count == 3


def test_elevenlabs_tts_on_an_autospec_session(no_env: None, patched_elevenlabs: MagicMock) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    session = _autospec_session()
    result = ElevenLabsTTS(api_key="k").speak("Autospec.", session)
    assert session.put_outbound_sync.call_count == 2
    session.send_mark_and_wait.assert_called_once_with("tts_complete", timeout=30.0)
    assert result["last_spoken"] == "Autospec."


def test_sdk_failures_become_error_results(no_env: None, patched_elevenlabs: MagicMock) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    patched_elevenlabs.return_value.text_to_speech.convert.side_effect = RuntimeError("boom")
    tts = ElevenLabsTTS(api_key="k")
    errors: list[str] = []
    tts.on_error = errors.append
    session = _mock_session()
    result = tts.speak("Fails.", session)
    assert result["error"] == "boom" and errors == ["elevenlabs_tts_failed: boom"]
    session.send_mark_and_wait.assert_not_called()


def test_stop_event_interrupts_without_waiting_for_the_mark(
    no_env: None, patched_elevenlabs: MagicMock
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    stop = threading.Event()
    session = _mock_session()
    session.put_outbound_sync.side_effect = lambda chunk: stop.set()
    result = ElevenLabsTTS(api_key="k").speak("Cut short.", session, stop)
    assert result["interrupted"] is True
    assert session.put_outbound_sync.call_count == 1
    session.send_mark_and_wait.assert_not_called()


def test_empty_text_and_a_gone_call_return_at_once(
    no_env: None, patched_elevenlabs: MagicMock
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    tts = ElevenLabsTTS(api_key="k")
    session = _mock_session()
    assert tts.speak("", session)["last_spoken"] == ""
    session.is_disconnected = True
    assert tts.speak("Anyone?", session)["call_disconnected"] is True
    session.put_outbound_sync.assert_not_called()
    session.send_mark_and_wait.assert_not_called()


def test_without_the_sdk_speak_names_the_extra(
    no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    monkeypatch.setitem(sys.modules, "elevenlabs", None)  # makes the import fail
    tts = ElevenLabsTTS(api_key="k")  # constructing needs no SDK
    with pytest.raises(ImportError, match=r'pip install "voice-runtime\[elevenlabs\]"'):
        tts.speak("Hello.", _mock_session())


def test_import_voice_runtime_needs_no_elevenlabs_sdk() -> None:
    code = (
        "import sys; sys.modules['elevenlabs'] = None\n"
        "import voice_runtime, voice_runtime.tts, voice_runtime.providers.elevenlabs_tts\n"
        "from voice_runtime.tts import create_tts\n"
        "create_tts(api_key='k')\n"
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_other_tts_providers_take_a_magicmock_session(fake_sdk: FakeSpeechSdk) -> None:
    from voice_runtime.mock.tts import MockTts
    from voice_runtime.providers.azure_tts import AzureTTS

    for tts in (AzureTTS(subscription_key="k"), MockTts()):
        session = _mock_session()
        result = tts.speak("Hello from a mock.", session)
        assert session.put_outbound_sync.call_count > 0, tts
        assert session.tap_agent.call_count == session.put_outbound_sync.call_count
        session.send_mark_and_wait.assert_called_once_with("tts_complete", timeout=30.0)
        assert result["last_spoken"] == "Hello from a mock." and "error" not in result


def test_azure_tts_with_the_0_1_sdk_patch() -> None:
    from types import SimpleNamespace

    from voice_runtime.providers.azure_tts import AzureTTS

    with patch("voice_runtime.providers.azure_tts.speechsdk") as sdk:
        synth = sdk.SpeechSynthesizer.return_value

        def speak_text_async(text: str) -> MagicMock:
            on_audio = synth.synthesizing.connect.call_args[0][0]
            on_audio(SimpleNamespace(result=SimpleNamespace(audio_data=b"\xff" * 160)))
            return MagicMock()

        synth.speak_text_async.side_effect = speak_text_async
        session = _mock_session()
        result = AzureTTS(subscription_key="k", region="northeurope").speak("Moi.", session)
    sdk.SpeechConfig.assert_called_once_with(subscription="k", region="northeurope")
    sdk.SpeechSynthesizer.assert_called_once()
    session.put_outbound_sync.assert_called_once_with(b"\xff" * 160)
    session.send_mark_and_wait.assert_called_once_with("tts_complete", timeout=30.0)
    assert result["last_spoken"] == "Moi." and "error" not in result


async def test_azure_stt_with_the_0_1_sdk_patch() -> None:
    from types import SimpleNamespace

    from voice_runtime.providers.azure_stt import AzurePersistentStt

    with patch("voice_runtime.providers.azure_stt.speechsdk") as sdk:
        stt = AzurePersistentStt(subscription_key="k")
        heard: list[str] = []
        stt.on_committed = heard.append
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        await stt.start(q)
        recognizer = sdk.SpeechRecognizer.return_value
        assert await wait_for(lambda: recognizer.start_continuous_recognition_async.called)
        q.put_nowait(b"\x01" * 160)
        push = sdk.audio.PushAudioInputStream.return_value
        assert await wait_for(lambda: push.write.called)
        on_final = recognizer.recognized.connect.call_args[0][0]
        on_final(SimpleNamespace(result=SimpleNamespace(text="hei")))
        assert await wait_for(lambda: heard == ["hei"])
        await stt.stop()
    push.write.assert_called_with(b"\x01" * 160)


# ---------------------------------------------------------------------------- item 6


def _start(call_sid: str = "CA123", stream_sid: str = "MZ123") -> str:
    return json.dumps({"event": "start", "streamSid": stream_sid, "start": {"callSid": call_sid}})


def _media(audio: bytes) -> str:
    return json.dumps({"event": "media", "media": {"payload": base64.b64encode(audio).decode()}})


def _transport_session() -> MagicMock:
    """The mock session of 0.1.x transport tests."""
    session = MagicMock()
    session.stream_sid = None
    session.call_sid = None
    session.inbound = asyncio.Queue()
    session.get_outbound = AsyncMock(side_effect=asyncio.CancelledError)
    session.get_pending_mark = AsyncMock(side_effect=asyncio.CancelledError)
    session._disconnect_requested = None
    session._clear_queue = None
    session.stt_factory = None
    session.stt = None
    return session


@pytest.fixture
def skip_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_SKIP_SIGNATURE_VALIDATION", "1")


def test_transport_drives_a_magicmock_session(skip_signatures: None) -> None:
    app = FastAPI()
    session = _transport_session()
    register_voice_websocket(app, session)
    audio = b"\xab" * 160
    with TestClient(app) as client, client.websocket_connect("/voice") as ws:
        ws.send_text(json.dumps({"event": "connected"}))
        ws.send_text(_media(audio))  # before start, as 0.1.x tests send it
        ws.send_text(_start())
        ws.send_text(json.dumps({"event": "mark", "mark": {"name": "tts_complete"}}))
        ws.send_text(json.dumps({"event": "stop"}))
    session.put_inbound.assert_called_once_with(audio)
    session.tap_caller.assert_called_once_with(audio)
    session.signal_ws_connected.assert_called_once_with("MZ123")
    assert session.call_sid == "CA123"
    session.signal_mark_received.assert_called_once_with("tts_complete")
    session.signal_disconnected.assert_called_once()


def test_transport_sends_what_a_mock_session_gives(skip_signatures: None) -> None:
    app = FastAPI()
    session = _transport_session()
    session.get_outbound = AsyncMock(side_effect=[b"\x05" * 160, asyncio.CancelledError()])
    session.get_pending_mark = AsyncMock(side_effect=["tts_complete__0a1b2c3d", None])
    stt = MagicMock()
    session.stt_factory = MagicMock(return_value=stt)
    session.stt_secondary_factory = None
    with TestClient(app) as client:
        register_voice_websocket(app, session)
        with client.websocket_connect("/voice") as ws:
            ws.send_text(_start())
            sent = [json.loads(ws.receive_text()) for _ in range(2)]
            ws.send_text(json.dumps({"event": "stop"}))
    kinds = {m["event"]: m for m in sent}
    assert base64.b64decode(kinds["media"]["media"]["payload"]) == b"\x05" * 160
    assert kinds["mark"]["mark"]["name"] == "tts_complete__0a1b2c3d"
    assert kinds["media"]["streamSid"] == "MZ123"
    stt.start.assert_called_once_with(session.inbound)
    session.on_stt_ready.assert_called_once_with(stt)
    stt.stop.assert_called_once()
    assert session.stt is None  # built from the factory: dropped after the call


@pytest.mark.parametrize("instance", [False, True])
def test_transport_takes_an_autospec_session(
    skip_signatures: None, instance: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app = FastAPI()
    session = create_autospec(VoiceSession, instance=instance)
    register_voice_websocket(app, session)
    with TestClient(app) as client, client.websocket_connect("/voice") as ws:
        ws.send_text(_start())
        ws.send_text(_media(b"\x11" * 160))
        ws.send_text(json.dumps({"event": "stop"}))
    session.signal_ws_connected.assert_called_once_with("MZ123")
    session.put_inbound.assert_called_once_with(b"\x11" * 160)
    session.signal_disconnected.assert_called_once()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_stt_tee_and_conversation_take_mocks() -> None:
    from voice_runtime.conversation import Conversation
    from voice_runtime.stt_tee import SttTee

    primary, secondary = MagicMock(), MagicMock()
    tee = SttTee(primary, secondary)
    await tee.start(asyncio.Queue())
    tee.on_committed = print
    assert primary.on_committed is print
    tee.set_speaking(True)
    await tee.stop()
    primary.start.assert_called_once()
    secondary.start.assert_called_once()
    primary.set_speaking.assert_called_once_with(True)
    primary.stop.assert_called_once() and secondary.stop.assert_called_once()

    session = _mock_session()
    tts = MagicMock()
    tts.speak.return_value = {"last_spoken": "Hi."}
    conv = Conversation(session, tts)
    assert (await asyncio.to_thread(conv.say, "Hi."))["last_spoken"] == "Hi."
    tts.speak.assert_called_once_with("Hi.", session, conv.stop_event)
    conv.hangup()
    session.request_disconnect.assert_called_once_with()


# ---------------------------------------------------------------------------- item 7


def _capture(session: Any) -> tuple[MagicMock, list[tuple[str, Any]]]:
    captured: list[tuple[str, Any]] = []

    def fake_ws_decorator(path: str) -> Any:
        def decorator(fn: Any) -> Any:
            captured.append((path, fn))
            return fn

        return decorator

    app = MagicMock()
    app.websocket = MagicMock(side_effect=fake_ws_decorator)
    register_voice_websocket(app, session)
    return app, captured


def test_the_0_1_route_is_the_last_one_added_and_takes_just_the_websocket() -> None:
    _app, captured = _capture(VoiceSession())
    path, endpoint = captured[-1]
    assert path == "/voice" and captured[0] == captured[-1]
    assert list(inspect.signature(endpoint).parameters) == ["websocket"]

    app = FastAPI()
    register_voice_websocket(app, VoiceSession())
    paths = [r.path for r in app.routes]
    assert paths[-1] == "/voice" and "/voice/{token}" in paths


def _mock_ws(messages: list[str]) -> Any:
    """The 0.1.x tests' websocket double: receive_text plays messages, then blocks."""
    release = asyncio.Event()
    pending = list(messages)

    async def receive_text() -> str:
        if pending:
            return pending.pop(0)
        await release.wait()
        raise WebSocketDisconnect(1000)

    ws = AsyncMock()
    ws.receive_text = receive_text
    ws.release = release
    return ws


async def test_a_captured_endpoint_serves_a_real_session_over_a_mock_websocket(
    skip_signatures: None,
) -> None:
    session = VoiceSession()
    session.set_loop(asyncio.get_running_loop())
    _app, captured = _capture(session)
    handler = captured[-1][1]
    ws = _mock_ws([json.dumps({"event": "connected"}), _start("CAreal")])
    ws.send_text = AsyncMock(side_effect=ConnectionError("pipe broken"))
    await session.put_outbound(b"\x00" * 160)
    task = asyncio.create_task(handler(ws))
    assert await wait_for(lambda: session.call_sid == "CAreal")
    # A failed send means the call is gone, as in 0.1.x.
    assert await wait_for(lambda: session.is_disconnected)
    ws.release.set()
    await asyncio.wait_for(task, 5)
    ws.accept.assert_awaited_once()


# ---------------------------------------------------------------------------- secrets


async def test_a_known_secret_is_in_no_error_and_no_log(
    caplog: pytest.LogCaptureFixture, voice_server: Any
) -> None:
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with (
        FakeElevenLabsTts(api_key="the-right-key") as tts_server,
        FakeScribeServer(api_key="the-right-key") as stt_server,
    ):
        stt = PersistentSttSession(api_key=SECRET, base_url=stt_server.base_url)
        stt.on_error = texts.append
        await stt.start(asyncio.Queue())
        assert await wait_for(lambda: texts == ["auth_error"])
        await stt.stop()
        with ElevenLabsTTS(api_key=SECRET, base_url=tts_server.base_url) as tts:
            tts.on_error = texts.append
            s = voice_server.session
            async with voice_server.simulator():
                await s.wait_for_ws_connect_async(5)
                result = await asyncio.to_thread(tts.speak, "Wrong key.", s)
        assert tts_server.requests[0].headers["xi-api-key"] == SECRET  # it was sent
    assert "HTTP 401" in result["error"]
    texts.append(result["error"])
    texts.append(repr(tts.__dict__.get("base_url")))
    logged = "\n".join(
        r.getMessage() + repr(r.__dict__) + (caplog.text if r.exc_info else "")
        for r in caplog.records
    )
    assert caplog.records and SECRET not in logged and SECRET not in caplog.text
    assert all(SECRET not in t for t in texts)
    assert SECRET not in repr(stt.url)


async def test_realtime_agents_keep_the_key_out_of_the_handshake_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from voice_runtime.realtime import AgentOptions, OpenAIRealtimeAgent
    from voice_runtime.testing.fake_realtime import FakeOpenAIRealtime

    caplog.set_level(logging.DEBUG)
    async with FakeOpenAIRealtime() as fake:  # expects another key: the handshake is refused
        agent = OpenAIRealtimeAgent(AgentOptions(base_url=fake.base_url), api_key=SECRET)
        with pytest.raises(ProviderError) as refused:
            await agent.start()
        await agent.close()
    client_lines = [
        r.getMessage() for r in caplog.records if r.name.startswith("websockets.client")
    ]
    assert "> Authorization: [redacted]" in client_lines
    assert SECRET not in "\n".join(client_lines) and SECRET not in str(refused.value)
