"""0.1.x module-level names keep working, written the way 0.1.x users write their tests.

Module constants are patched with ``monkeypatch.setattr(module, NAME, value)`` and read;
``patch("voice_runtime.transports.twilio_ws.hangup_call")`` intercepts the transport's REST
hang-up; the private 0.1.x modules still import; and every public module-level name of
0.1.15 still exists.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Iterator
from typing import Any
from unittest.mock import MagicMock, patch

import pytest
from conftest import single_session_server, wait_for
from fastapi import FastAPI

from voice_runtime.providers import azure_stt, azure_tts, elevenlabs_stt, elevenlabs_tts
from voice_runtime.session import VoiceSession
from voice_runtime.testing.fake_azure import FakeSpeechSdk
from voice_runtime.testing.fake_elevenlabs import FakeScribeServer
from voice_runtime.testing.server import serve_in_loop
from voice_runtime.testing.simulator import CallerSimulator
from voice_runtime.transports.twilio_ws import register_voice_websocket

# Every public module-level name of voice-runtime 0.1.15 (functions, classes, constants and
# the names it imported from its own modules), per module.
OLD_SURFACE: dict[str, tuple[str, ...]] = {
    "voice_runtime": (
        "AudioMixer",
        "CallHangupError",
        "CallNotAnsweredError",
        "MissingStreamUrlError",
        "SttProvider",
        "TtsProvider",
        "VoiceSession",
        "create_stt",
        "create_tts",
        "get_sms_transport",
        "get_stt_class",
        "mix_frames",
    ),
    "voice_runtime.audio": (
        "AudioMixer",
        "CATCHUP_LIMIT",
        "FRAME_BYTES",
        "FRAME_INTERVAL",
        "MAX_FRAMES",
        "SILENCE_FRAME",
        "mix_frames",
    ),
    "voice_runtime.mock.stt": ("MockStt",),
    "voice_runtime.mock.tts": ("MockTts",),
    "voice_runtime.providers": ("SttProvider", "TtsProvider"),
    "voice_runtime.providers.azure_stt": (
        "AZURE_SPEECH_KEY",
        "AZURE_SPEECH_REGION",
        "AzurePersistentStt",
        "ECHO_DISCARD_WINDOW_S",
    ),
    "voice_runtime.providers.azure_tts": (
        "AZURE_SPEECH_KEY",
        "AZURE_SPEECH_REGION",
        "AZURE_TTS_VOICE",
        "AzureTTS",
    ),
    "voice_runtime.providers.elevenlabs_stt": (
        "ECHO_DISCARD_WINDOW_S",
        "ELEVENLABS_API_KEY",
        "PersistentSttSession",
        "STT_LANGUAGE_CODE",
        "STT_MODEL_ID",
    ),
    "voice_runtime.providers.elevenlabs_tts": (
        "ELEVENLABS_API_KEY",
        "ELEVENLABS_MODEL",
        "ELEVENLABS_VOICE_ID",
        "ElevenLabsTTS",
    ),
    "voice_runtime.session": (
        "CallHangupError",
        "CallNotAnsweredError",
        "FRAME_BYTES",
        "MissingStreamUrlError",
        "VOICE_SERVER_PORT",
        "VoiceSession",
    ),
    "voice_runtime.stt": ("create_stt", "get_stt_class"),
    "voice_runtime.stt_tee": ("SttTee",),
    "voice_runtime.transport": ("get_sms_transport",),
    "voice_runtime.transports._twilio_client": (
        "DEFAULT_TIMEOUT_S",
        "TwilioRegion",
        "build_explicit_twilio_client",
        "build_twilio_client",
    ),
    "voice_runtime.transports._twilio_models": (
        "TwilioCallListIncompleteError",
        "TwilioCallNotFoundError",
        "TwilioCallRow",
        "TwilioRegion",
        "validate_sid",
    ),
    "voice_runtime.transports.mock_bridge": (
        "FakeWsBridge",
        "cleanup_bridges",
        "create_text_relay",
        "initiate_mock_call",
        "is_mock_transport",
    ),
    "voice_runtime.transports.twilio_call": (
        "TwilioCallListIncompleteError",
        "TwilioCallNotFoundError",
        "TwilioCallRow",
        "TwilioRegion",
        "build_explicit_twilio_client",
        "build_route_stream_xml",
        "build_stream_twiml",
        "build_stream_xml",
        "build_twilio_client",
        "hangup_call",
        "initiate_outbound_call",
        "list_calls",
        "list_recent_calls",
        "validate_sid",
    ),
    "voice_runtime.transports.twilio_sms": ("build_twilio_client", "send_sms"),
    "voice_runtime.transports.twilio_ws": (
        "REST_CLOSE_WAIT_S",
        "TwilioRegion",
        "hangup_call",
        "register_voice_websocket",
        "twilio_call",
    ),
    "voice_runtime.tts": ("create_tts",),
}

VOICE_ENV = (
    "ELEVENLABS_API_KEY",
    "ELEVENLABS_VOICE_ID",
    "ELEVENLABS_MODEL",
    "STT_MODEL_ID",
    "STT_LANGUAGE_CODE",
    "AZURE_SPEECH_KEY",
    "AZURE_SPEECH_REGION",
    "AZURE_TTS_VOICE",
    "VOICE_SERVER_PORT",
)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VOICE_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_sdk(monkeypatch: pytest.MonkeyPatch) -> FakeSpeechSdk:
    return FakeSpeechSdk().install(monkeypatch)


@pytest.fixture
def patched_elevenlabs() -> Iterator[MagicMock]:
    with patch("elevenlabs.ElevenLabs") as cls:
        cls.return_value.text_to_speech.convert.side_effect = lambda **kw: iter([b"\x01" * 160])
        yield cls


def _mock_session() -> MagicMock:
    session = MagicMock()
    session.is_disconnected = False
    return session


def _spoken_with(sdk_class: MagicMock) -> tuple[str, str, str]:
    """(api key, voice id, model id) of the newest ElevenLabs SDK request."""
    convert = sdk_class.return_value.text_to_speech.convert.call_args.kwargs
    return sdk_class.call_args.kwargs["api_key"], convert["voice_id"], convert["model_id"]


# ----------------------------------------------------------------------------- surface


def test_every_0_1_15_public_module_name_still_exists() -> None:
    missing = {
        module_name: [n for n in names if not hasattr(importlib.import_module(module_name), n)]
        for module_name, names in OLD_SURFACE.items()
    }
    assert not {m: n for m, n in missing.items() if n}, missing


def test_the_0_1_private_twilio_modules_still_import() -> None:
    from voice_runtime.transports import twilio_call, twilio_models
    from voice_runtime.transports._twilio_client import (
        DEFAULT_TIMEOUT_S,
        build_explicit_twilio_client,
        build_twilio_client,
    )
    from voice_runtime.transports._twilio_models import (
        TwilioCallListIncompleteError,
        TwilioCallNotFoundError,
        TwilioCallRow,
        TwilioRegion,
        validate_sid,
    )

    assert DEFAULT_TIMEOUT_S == 15.0
    assert build_twilio_client is twilio_call.build_twilio_client
    assert build_explicit_twilio_client is twilio_call.build_explicit_twilio_client
    assert TwilioRegion is twilio_call.TwilioRegion is twilio_models.TwilioRegion
    assert TwilioCallRow is twilio_call.TwilioCallRow
    assert TwilioCallNotFoundError is twilio_call.TwilioCallNotFoundError
    assert TwilioCallListIncompleteError is twilio_call.TwilioCallListIncompleteError
    assert validate_sid("CA123") == "CA123"


def test_twilio_ws_names_of_0_1_and_no_eager_twilio_sdk() -> None:
    import subprocess
    import sys

    from voice_runtime.transports import twilio_call, twilio_ws
    from voice_runtime.transports.twilio_ws import TwilioRegion, hangup_call

    assert twilio_ws.twilio_call is twilio_call
    assert hangup_call is twilio_call.hangup_call and TwilioRegion is twilio_call.TwilioRegion
    # Importing the transport alone still loads no Twilio SDK.
    code = (
        "import sys, voice_runtime.transports.twilio_ws; "
        "print(any(m == 'twilio' or m.startswith('twilio.') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------- module constants


def test_elevenlabs_tts_constants_read_the_environment_now(
    no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert elevenlabs_tts.ELEVENLABS_VOICE_ID == "21m00Tcm4TlvDq8ikWAM"
    assert elevenlabs_tts.ELEVENLABS_MODEL == "eleven_multilingual_v2"
    assert elevenlabs_tts.ELEVENLABS_API_KEY == ""
    monkeypatch.setenv("ELEVENLABS_API_KEY", "env-key")
    monkeypatch.setenv("ELEVENLABS_VOICE_ID", "env-voice")
    assert elevenlabs_tts.ELEVENLABS_API_KEY == "env-key"
    assert elevenlabs_tts.ELEVENLABS_VOICE_ID == "env-voice"


def test_patched_elevenlabs_tts_constants_reach_new_providers(
    no_env: None, monkeypatch: pytest.MonkeyPatch, patched_elevenlabs: MagicMock
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(elevenlabs_tts, "ELEVENLABS_API_KEY", "k")
        mp.setattr(elevenlabs_tts, "ELEVENLABS_VOICE_ID", "module-voice")
        mp.setattr(elevenlabs_tts, "ELEVENLABS_MODEL", "module-model")
        assert elevenlabs_tts.ELEVENLABS_API_KEY == "k"
        ElevenLabsTTS().speak("Hi.", _mock_session())
        assert _spoken_with(patched_elevenlabs) == ("k", "module-voice", "module-model")
        # An explicit argument still wins over the module's value.
        ElevenLabsTTS(api_key="explicit", voice_id="v").speak("Hi.", _mock_session())
        assert _spoken_with(patched_elevenlabs) == ("explicit", "v", "module-model")
    # The undo set back the values it read; the environment is read again afterwards.
    monkeypatch.setenv("ELEVENLABS_API_KEY", "env-key")
    monkeypatch.setenv("ELEVENLABS_MODEL", "env-model")
    assert elevenlabs_tts.ELEVENLABS_API_KEY == "env-key"
    ElevenLabsTTS().speak("Hi.", _mock_session())
    assert _spoken_with(patched_elevenlabs) == ("env-key", "21m00Tcm4TlvDq8ikWAM", "env-model")


def test_a_constant_patched_to_empty_means_no_key(
    monkeypatch: pytest.MonkeyPatch, patched_elevenlabs: MagicMock
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    monkeypatch.setenv("ELEVENLABS_API_KEY", "env-key")
    monkeypatch.setattr(elevenlabs_tts, "ELEVENLABS_API_KEY", "")
    ElevenLabsTTS().speak("Hi.", _mock_session())
    # As in 0.1.x, the module's empty key is what the SDK gets, not the environment's.
    assert _spoken_with(patched_elevenlabs)[0] == ""


def test_mock_patch_of_a_constant_leaves_nothing_behind(
    no_env: None, monkeypatch: pytest.MonkeyPatch, patched_elevenlabs: MagicMock
) -> None:
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS

    with patch.object(elevenlabs_tts, "ELEVENLABS_VOICE_ID", "patched-voice"):
        ElevenLabsTTS(api_key="k").speak("Hi.", _mock_session())
        assert _spoken_with(patched_elevenlabs)[1] == "patched-voice"
    monkeypatch.setenv("ELEVENLABS_VOICE_ID", "env-voice")
    ElevenLabsTTS(api_key="k").speak("Hi.", _mock_session())
    assert _spoken_with(patched_elevenlabs)[1] == "env-voice"


@pytest.mark.parametrize(
    ("module", "name", "variable"),
    [
        (elevenlabs_tts, "ELEVENLABS_API_KEY", "ELEVENLABS_API_KEY"),
        (elevenlabs_stt, "STT_MODEL_ID", "STT_MODEL_ID"),
        (azure_tts, "AZURE_TTS_VOICE", "AZURE_TTS_VOICE"),
    ],
)
def test_setting_back_the_value_read_is_no_override(
    no_env: None, monkeypatch: pytest.MonkeyPatch, module: Any, name: str, variable: str
) -> None:
    # monkeypatch's undo before pytest 9.2 set back the value it had read.
    read = getattr(module, name)
    setattr(module, name, "patched")
    setattr(module, name, read)
    try:
        monkeypatch.setenv(variable, "from-env-later")
        assert getattr(module, name) == "from-env-later"
        assert module._CONSTANTS.value(name) == "from-env-later"
    finally:
        delattr(module, name)


async def test_patched_elevenlabs_stt_constants_reach_new_providers(no_env: None) -> None:
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession

    async with FakeScribeServer(api_key="module-key") as server:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(elevenlabs_stt, "ELEVENLABS_API_KEY", "module-key")
            mp.setattr(elevenlabs_stt, "STT_MODEL_ID", "module-model")
            mp.setattr(elevenlabs_stt, "STT_LANGUAGE_CODE", "fi")
            stt = PersistentSttSession(base_url=server.base_url)
            explicit = PersistentSttSession(api_key="other", language_code="sv")
        assert elevenlabs_stt.STT_MODEL_ID == "scribe_v2_realtime"  # undone
        await stt.start(asyncio.Queue())
        try:
            assert await server.wait_for_connections(1)
            conn = server.connections[0]
            assert conn.headers["xi-api-key"] == "module-key"
            assert conn.param("model_id") == "module-model"
            assert conn.param("language_code") == "fi"
        finally:
            await stt.stop()
    assert explicit.language_code == "sv" and explicit.model_id == "module-model"


def _discarded(caplog: pytest.LogCaptureFixture, message: str) -> int:
    return sum(r.getMessage() == message for r in caplog.records)


async def test_patched_echo_window_changes_the_elevenlabs_echo_discard(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from voice_runtime.providers.elevenlabs_stt import PersistentSttSession

    caplog.set_level(logging.INFO, logger=elevenlabs_stt.__name__)
    echo_log = "committed transcript discarded as echo"
    committed: list[str] = []
    async with FakeScribeServer() as server:
        stt = PersistentSttSession(api_key="k", base_url=server.base_url)
        stt.on_committed = committed.append
        await stt.start(asyncio.Queue())
        try:
            assert await server.wait_for_connections(1)
            # A running provider reads the constant each time the agent stops speaking.
            monkeypatch.setattr(elevenlabs_stt, "ECHO_DISCARD_WINDOW_S", 3600.0)
            stt.set_speaking(True)
            stt.set_speaking(False)
            await server.commit_now("our own echo")
            assert await wait_for(lambda: _discarded(caplog, echo_log) == 1)
            monkeypatch.setattr(elevenlabs_stt, "ECHO_DISCARD_WINDOW_S", 0)
            stt.set_speaking(True)
            stt.set_speaking(False)
            await server.commit_now("the caller")
            assert await wait_for(lambda: committed == ["the caller"]), committed
        finally:
            await stt.stop()
    assert _discarded(caplog, echo_log) == 1


async def test_patched_echo_window_changes_the_azure_echo_discard(
    monkeypatch: pytest.MonkeyPatch, fake_sdk: FakeSpeechSdk, caplog: pytest.LogCaptureFixture
) -> None:
    from voice_runtime.providers.azure_stt import AzurePersistentStt

    caplog.set_level(logging.INFO, logger=azure_stt.__name__)
    echo_log = "recognized text discarded as echo"
    recognized: list[str] = []
    stt = AzurePersistentStt(subscription_key="k")
    stt.on_committed = recognized.append
    inbound: asyncio.Queue[bytes | None] = asyncio.Queue()
    await stt.start(inbound)
    try:
        assert await wait_for(lambda: bool(fake_sdk.recognizers))
        monkeypatch.setattr(azure_stt, "ECHO_DISCARD_WINDOW_S", 3600.0)
        stt.set_speaking(True)
        stt.set_speaking(False)
        with fake_sdk.lock:
            fake_sdk.utterances.append(("our own echo", 160))
        inbound.put_nowait(b"\xff" * 160)
        assert await wait_for(lambda: _discarded(caplog, echo_log) == 1)
        monkeypatch.setattr(azure_stt, "ECHO_DISCARD_WINDOW_S", 0)
        stt.set_speaking(True)
        stt.set_speaking(False)
        with fake_sdk.lock:
            fake_sdk.utterances.append(("the caller", 160))
        inbound.put_nowait(b"\xff" * 160)
        assert await wait_for(lambda: recognized == ["the caller"]), recognized
    finally:
        await stt.stop()
    assert _discarded(caplog, echo_log) == 1


async def test_patched_azure_constants_reach_new_providers(
    no_env: None, fake_sdk: FakeSpeechSdk
) -> None:
    from voice_runtime.providers.azure_stt import AzurePersistentStt
    from voice_runtime.providers.azure_tts import AzureTTS

    assert azure_tts.AZURE_SPEECH_REGION == "westeurope"
    assert azure_tts.AZURE_TTS_VOICE == "fi-FI-NooraNeural"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(azure_tts, "AZURE_SPEECH_KEY", "tts-key")
        mp.setattr(azure_tts, "AZURE_SPEECH_REGION", "northeurope")
        mp.setattr(azure_tts, "AZURE_TTS_VOICE", "fi-FI-HarriNeural")
        mp.setattr(azure_stt, "AZURE_SPEECH_KEY", "stt-key")
        mp.setattr(azure_stt, "AZURE_SPEECH_REGION", "swedencentral")
        tts = AzureTTS()
        stt = AzurePersistentStt()
    result = await asyncio.to_thread(tts.speak, "Hei.", _mock_session())
    assert "error" not in result
    config = fake_sdk.synthesizers[0].config
    assert (config.subscription, config.region) == ("tts-key", "northeurope")
    assert tts.voice_name == "fi-FI-HarriNeural"
    await stt.start(asyncio.Queue())
    try:
        assert await wait_for(lambda: bool(fake_sdk.recognizers))
        config = fake_sdk.recognizers[0].config
        assert (config.subscription, config.region) == ("stt-key", "swedencentral")
    finally:
        await stt.stop()
    assert azure_stt.AZURE_SPEECH_KEY == "" and azure_stt.AZURE_SPEECH_REGION == "westeurope"


def test_session_voice_server_port_reads_the_environment_now(
    no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_runtime import session

    assert session.VOICE_SERVER_PORT == 8080
    monkeypatch.setenv("VOICE_SERVER_PORT", "9090")
    assert session.VOICE_SERVER_PORT == 9090
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(session, "VOICE_SERVER_PORT", 7000)
        assert session.VOICE_SERVER_PORT == 7000
    monkeypatch.setenv("VOICE_SERVER_PORT", "9191")
    assert session.VOICE_SERVER_PORT == 9191


# ------------------------------------------------------------------ twilio_ws hang-up


@pytest.fixture
def twilio_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", "AC" + "0" * 32)
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "token")
    monkeypatch.setenv("TWILIO_SKIP_SIGNATURE_VALIDATION", "1")


async def _hang_up_through(sim: CallerSimulator, hangup: MagicMock) -> None:
    """Wait until the transport asked ``hangup`` to end ``sim``'s call, then hang up."""
    assert await wait_for(lambda: hangup.called), "the patched hangup_call was not called"
    await sim.hangup()
    hangup.assert_called_once_with(sim.call_sid)


async def test_patched_twilio_ws_hangup_call_ends_a_single_session_call(
    twilio_env: None,
) -> None:
    async with single_session_server() as server:
        with patch("voice_runtime.transports.twilio_ws.hangup_call") as hangup:
            async with server.simulator() as sim:
                await server.session.wait_for_ws_connect_async(5)
                server.session.request_disconnect()
                await _hang_up_through(sim, hangup)
                assert await sim.wait_closed(5)


async def test_patched_twilio_ws_hangup_call_ends_a_voice_server_call(twilio_env: None) -> None:
    app = FastAPI()

    async def on_call(session: VoiceSession) -> None:
        session.request_disconnect()

    register_voice_websocket(app, session_factory=VoiceSession, on_call=on_call)
    async with serve_in_loop(app) as srv:
        with patch("voice_runtime.transports.twilio_ws.hangup_call") as hangup:
            async with CallerSimulator(srv.ws_url + "/voice") as sim:
                await _hang_up_through(sim, hangup)
                assert await sim.wait_closed(5)


async def test_setting_back_hangup_call_as_read_leaves_twilio_call_patchable(
    twilio_env: None,
) -> None:
    from voice_runtime.transports import twilio_ws

    # monkeypatch's undo before pytest 9.2 set back the value it had read.
    read = twilio_ws.hangup_call
    twilio_ws.hangup_call = MagicMock()
    twilio_ws.hangup_call = read
    try:
        async with single_session_server() as server:
            with patch("voice_runtime.transports.twilio_call.hangup_call") as hangup:
                async with server.simulator() as sim:
                    await server.session.wait_for_ws_connect_async(5)
                    server.session.request_disconnect()
                    await _hang_up_through(sim, hangup)
    finally:
        del twilio_ws.hangup_call
