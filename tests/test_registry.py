"""One registry class behind the STT, TTS, transport and SMS factories."""

from __future__ import annotations

import pytest

from voice_runtime import stt, transport, tts
from voice_runtime.registry import Registry


@pytest.mark.parametrize(
    ("factory", "prefix", "known"),
    [
        (stt.create_stt, "Unknown STT provider: nope", "azure, elevenlabs, mock, offline"),
        (tts.create_tts, "Unknown TTS provider: nope", "azure, elevenlabs, mock, offline"),
        (transport.get_sms_transport, "Unknown SMS transport: nope", "twilio"),
        (transport.create_transport, "Unknown transport: nope", "mock, twilio"),
    ],
)
def test_unknown_names_keep_the_prefix_and_list_the_known_ones(
    factory: object, prefix: str, known: str
) -> None:
    with pytest.raises(ValueError) as info:
        factory("nope")  # type: ignore[operator]
    assert str(info.value) == f"{prefix} (known: {known})"


def test_the_factories_share_the_registry_class() -> None:
    registries = [stt.STT_PROVIDERS, tts.TTS_PROVIDERS, transport.TRANSPORTS]
    assert all(type(r) is Registry for r in [*registries, transport.SMS_TRANSPORTS])
    assert stt.available_stt_providers() == stt.STT_PROVIDERS.names()
    assert stt.get_stt_class("mock").__name__ == "MockStt"
    assert transport.get_sms_transport().__name__ == "voice_runtime.transports.twilio_sms"


def test_a_registry_imports_only_what_is_looked_up() -> None:
    import sys

    reg = Registry("codec", {"json": "json:dumps", "nothing": "voice_runtime_no_such_module"})
    assert reg.load("json") is __import__("json").dumps
    assert "voice_runtime_no_such_module" not in sys.modules
    reg.register("path", "os.path")
    assert reg.load("path") is __import__("os").path
    with pytest.raises(ValueError, match="already registered"):
        reg.register("json", "json:loads")
    assert "path" in reg and reg.names() == ["json", "nothing", "path"]
