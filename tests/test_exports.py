"""The public surface: names users import must not disappear by accident."""

from __future__ import annotations

import importlib

import pytest

import voice_runtime

COMPAT_TOP_LEVEL = {
    "VoiceSession",
    "MissingStreamUrlError",
    "CallNotAnsweredError",
    "CallHangupError",
    "create_stt",
    "get_stt_class",
    "create_tts",
    "get_sms_transport",
    "AudioMixer",
    "mix_frames",
    "SttProvider",
    "TtsProvider",
}

COMPAT_MODULES = {
    "voice_runtime.session": {
        "FRAME_BYTES",
        "VoiceSession",
        "MissingStreamUrlError",
        "CallNotAnsweredError",
        "CallHangupError",
    },
    "voice_runtime.audio": {
        "FRAME_BYTES",
        "FRAME_INTERVAL",
        "SILENCE_FRAME",
        "mix_frames",
        "AudioMixer",
    },
    "voice_runtime.providers": {"SttProvider", "TtsProvider"},
    "voice_runtime.stt": {"create_stt", "get_stt_class"},
    "voice_runtime.tts": {"create_tts"},
    "voice_runtime.transport": {"get_sms_transport", "create_transport"},
    "voice_runtime.stt_tee": {"SttTee"},
    "voice_runtime.mock.stt": {"MockStt"},
    "voice_runtime.mock.tts": {"MockTts"},
    "voice_runtime.transports.twilio_ws": {"register_voice_websocket"},
    "voice_runtime.transports.twilio_call": {
        "build_stream_twiml",
        "build_stream_xml",
        "build_route_stream_xml",
        "initiate_outbound_call",
        "hangup_call",
        "TwilioRegion",
        "TwilioCallRow",
        "TwilioCallNotFoundError",
        "TwilioCallListIncompleteError",
        "list_calls",
        "list_recent_calls",
    },
    "voice_runtime.transports.twilio_sms": {"send_sms"},
    "voice_runtime.transports.mock_bridge": {
        "FakeWsBridge",
        "initiate_mock_call",
        "create_text_relay",
        "cleanup_bridges",
        "is_mock_transport",
    },
}


# The exact public surface: adding or removing a name is a decision, so it changes this list.
TOP_LEVEL_ALL = [
    "AudioMixer",
    "CallHangupError",
    "CallInfo",
    "CallerSimulator",
    "CallNotAnsweredError",
    "ConfigurationError",
    "Conversation",
    "LoopThreadError",
    "MediaFormat",
    "MissingCredentialError",
    "MissingStreamUrlError",
    "NoEventLoopError",
    "ProtocolError",
    "ProviderError",
    "SessionEvent",
    "SttProvider",
    "TtsProvider",
    "VoiceRuntimeError",
    "VoiceServer",
    "VoiceSession",
    "attach_agent",
    "create_stt",
    "create_transport",
    "create_tts",
    "get_sms_transport",
    "get_stt_class",
    "mix_frames",
    "run_agent_call",
]

TESTING_ALL = [
    "CallerSimulator",
    "FakeElevenLabsAgent",
    "FakeElevenLabsTts",
    "FakeGeminiLive",
    "FakeOpenAIRealtime",
    "FakeScribeServer",
    "FakeSpeechSdk",
    "FakeTwilioRest",
    "FakeXaiRealtime",
    "ManualClock",
    "free_port",
    "serve_in_loop",
    "word_accuracy",
]

LAZY_TOP_LEVEL = {
    "VoiceServer": "voice_runtime.server",
    "Conversation": "voice_runtime.conversation",
    "CallerSimulator": "voice_runtime.testing.simulator",
    "run_agent_call": "voice_runtime.realtime.bridge",
    "attach_agent": "voice_runtime.realtime.bridge",
}


def test_top_level_all_is_pinned() -> None:
    assert sorted(voice_runtime.__all__) == sorted(TOP_LEVEL_ALL)
    assert len(set(voice_runtime.__all__)) == len(voice_runtime.__all__)


def test_testing_all_is_pinned_and_every_name_resolves() -> None:
    import voice_runtime.testing as testing

    assert sorted(testing.__all__) == sorted(TESTING_ALL)
    for name in testing.__all__:
        assert getattr(testing, name).__name__ == name
    assert set(testing.__all__) <= set(dir(testing))


def test_lazy_top_level_names_are_the_real_objects() -> None:
    for name, home in LAZY_TOP_LEVEL.items():
        assert getattr(voice_runtime, name) is getattr(importlib.import_module(home), name)
        assert name in dir(voice_runtime)
    with pytest.raises(AttributeError, match="no_such_name"):
        voice_runtime.no_such_name  # noqa: B018 - the attribute access is the test


def test_lazy_top_level_names_are_not_imported_up_front() -> None:
    import subprocess
    import sys

    code = (
        "import sys, voice_runtime; "
        "heavy = ['voice_runtime.server', 'voice_runtime.realtime', 'voice_runtime.testing', "
        "'voice_runtime.conversation']; "
        "print([m for m in heavy if m in sys.modules]); "
        "from voice_runtime import VoiceServer; print('voice_runtime.server' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout.split("\n")
    assert out[:2] == ["[]", "True"]


def test_top_level_all_keeps_the_compat_names() -> None:
    assert set(voice_runtime.__all__) >= COMPAT_TOP_LEVEL
    for name in voice_runtime.__all__:
        assert hasattr(voice_runtime, name), name


def test_compat_modules_keep_their_names() -> None:
    for module_name, names in COMPAT_MODULES.items():
        module = importlib.import_module(module_name)
        missing = {n for n in names if not hasattr(module, n)}
        assert not missing, (module_name, missing)


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("voice_runtime").joinpath("py.typed").is_file()


def test_exceptions_share_one_root_and_keep_compat_bases() -> None:
    from voice_runtime.errors import VoiceRuntimeError
    from voice_runtime.transports.twilio_call import TwilioCallNotFoundError

    assert issubclass(voice_runtime.CallNotAnsweredError, VoiceRuntimeError)
    assert issubclass(voice_runtime.MissingStreamUrlError, RuntimeError)
    assert issubclass(TwilioCallNotFoundError, RuntimeError)
    assert "VOICE_STREAM_URL" in str(voice_runtime.MissingStreamUrlError())
    assert "did not connect within 3s" in str(voice_runtime.CallNotAnsweredError(3))


def test_unknown_providers_raise_value_errors() -> None:
    import pytest

    with pytest.raises(ValueError, match="Unknown STT provider: nope"):
        voice_runtime.create_stt("nope")
    with pytest.raises(ValueError, match="Unknown TTS provider: nope"):
        voice_runtime.create_tts("nope")
    with pytest.raises(ValueError, match="Unknown SMS transport: nope"):
        voice_runtime.get_sms_transport("nope")


def test_import_reads_no_environment(monkeypatch) -> None:
    import os
    import sys

    reads: list[str] = []
    real_get = os.environ.get

    def spy(key, default=None):
        reads.append(key)
        return real_get(key, default)

    for name in [m for m in sys.modules if m.startswith("voice_runtime")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(os.environ, "get", spy)
    importlib.import_module("voice_runtime")
    assert [k for k in reads if k.startswith(("VOICE_", "TWILIO_", "ELEVENLABS_", "AZURE_"))] == []


def test_the_frame_constant_is_defined_once_and_re_exported() -> None:
    import re
    from pathlib import Path

    import voice_runtime.audio
    import voice_runtime.session

    root = Path(voice_runtime.__file__).parent
    defining = [
        str(path.relative_to(root))
        for path in sorted(root.rglob("*.py"))
        if re.search(r"^\s*FRAME(_BYTES)?\s*(:[^=]+)?=\s*160\b", path.read_text(), re.M)
    ]
    assert defining == ["audio/pcm.py"]
    assert voice_runtime.session.FRAME_BYTES == voice_runtime.audio.FRAME_BYTES == 160
