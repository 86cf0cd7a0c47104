"""Test doubles users can run their own bots against (fakes over real sockets).

Each name is imported on first use (the fakes pull in web frameworks and vendor stand-ins).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from voice_runtime._lazy import lazy_attributes

if TYPE_CHECKING:
    from voice_runtime.testing._serve import free_port
    from voice_runtime.testing.clock import ManualClock
    from voice_runtime.testing.fake_azure import FakeSpeechSdk
    from voice_runtime.testing.fake_elevenlabs import FakeElevenLabsTts, FakeScribeServer
    from voice_runtime.testing.fake_realtime import (
        FakeElevenLabsAgent,
        FakeGeminiLive,
        FakeOpenAIRealtime,
        FakeXaiRealtime,
    )
    from voice_runtime.testing.fake_twilio_rest import FakeTwilioRest
    from voice_runtime.testing.metrics import word_accuracy
    from voice_runtime.testing.server import serve_in_loop
    from voice_runtime.testing.simulator import CallerSimulator

_LAZY = {
    "CallerSimulator": "voice_runtime.testing.simulator",
    "FakeElevenLabsAgent": "voice_runtime.testing.fake_realtime",
    "FakeElevenLabsTts": "voice_runtime.testing.fake_elevenlabs",
    "FakeGeminiLive": "voice_runtime.testing.fake_realtime",
    "FakeOpenAIRealtime": "voice_runtime.testing.fake_realtime",
    "FakeScribeServer": "voice_runtime.testing.fake_elevenlabs",
    "FakeSpeechSdk": "voice_runtime.testing.fake_azure",
    "FakeTwilioRest": "voice_runtime.testing.fake_twilio_rest",
    "FakeXaiRealtime": "voice_runtime.testing.fake_realtime",
    "ManualClock": "voice_runtime.testing.clock",
    "free_port": "voice_runtime.testing._serve",
    "serve_in_loop": "voice_runtime.testing.server",
    "word_accuracy": "voice_runtime.testing.metrics",
}
__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)

__all__ = [
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
