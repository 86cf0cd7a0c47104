"""Checked by ``mypy --strict`` in tests/test_typecheck.py (never run): what the factories return.

A user's editor and type checker see these types; a change that loses one fails the check.
"""

from __future__ import annotations

from typing import assert_type

from voice_runtime import create_stt, create_tts, get_sms_transport, get_stt_class
from voice_runtime.contracts import AsyncTtsProvider, SmsTransport, SttProvider, TtsProvider
from voice_runtime.mock.stt import MockStt
from voice_runtime.mock.tts import MockTts
from voice_runtime.providers.azure_stt import AzurePersistentStt
from voice_runtime.providers.azure_tts import AzureTTS
from voice_runtime.providers.elevenlabs_stt import PersistentSttSession
from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS
from voice_runtime.providers.fallback import FallbackStt, FallbackTts
from voice_runtime.providers.offline_stt import OfflineStt
from voice_runtime.providers.offline_tts import OfflineTts


def factories(name: str) -> None:
    """Each literal name gives its class; any other string gives the protocol."""
    assert_type(create_tts(), ElevenLabsTTS)
    assert_type(create_tts("elevenlabs"), ElevenLabsTTS)
    assert_type(create_tts("azure"), AzureTTS)
    assert_type(create_tts("offline"), OfflineTts)
    assert_type(create_tts("mock"), MockTts)
    assert_type(create_tts(name), AsyncTtsProvider)
    assert_type(create_tts(["elevenlabs", "offline"]), FallbackTts)
    assert_type(create_stt(), PersistentSttSession)
    assert_type(create_stt("azure"), AzurePersistentStt)
    assert_type(create_stt("offline"), OfflineStt)
    assert_type(create_stt("mock"), MockStt)
    assert_type(create_stt(name), SttProvider)
    assert_type(create_stt(["elevenlabs", "offline"]), FallbackStt)
    assert_type(get_stt_class("mock"), type[MockStt])
    assert_type(get_sms_transport(), SmsTransport)


def protocols() -> None:
    """Every built-in provider, and each chain, is what the protocols describe."""
    tts: list[AsyncTtsProvider] = [
        create_tts(),
        create_tts("azure"),
        create_tts("offline"),
        create_tts("mock"),
        create_tts(["mock", "offline"]),
    ]
    stt: list[SttProvider] = [
        create_stt(),
        create_stt("azure"),
        create_stt("offline"),
        create_stt("mock"),
        create_stt(["mock", "offline"]),
    ]
    plain: TtsProvider = tts[0]
    from voice_runtime.transports import twilio_sms

    sms: SmsTransport = twilio_sms
    print(len(tts), len(stt), plain, sms)
