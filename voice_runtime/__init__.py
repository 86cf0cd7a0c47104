"""voice_runtime: phone calls over Twilio Media Streams.

Import the public API from here. See the README and docs/ for a tour. The heavier entry points
(``VoiceServer``, ``Conversation``, ``CallerSimulator``, ``run_agent_call``, ``attach_agent``)
are imported on first use, so ``import voice_runtime`` stays cheap.
"""

from typing import TYPE_CHECKING

from voice_runtime._lazy import lazy_attributes
from voice_runtime.audio import AudioMixer, mix_frames
from voice_runtime.errors import (
    CallHangupError,
    CallNotAnsweredError,
    ConfigurationError,
    LoopThreadError,
    MissingCredentialError,
    MissingStreamUrlError,
    NoEventLoopError,
    ProtocolError,
    ProviderError,
    VoiceRuntimeError,
)
from voice_runtime.providers import SttProvider, TtsProvider
from voice_runtime.session import VoiceSession
from voice_runtime.stt import create_stt, get_stt_class
from voice_runtime.transport import create_transport, get_sms_transport
from voice_runtime.tts import create_tts
from voice_runtime.types import CallInfo, MediaFormat, SessionEvent

if TYPE_CHECKING:
    from voice_runtime.conversation import Conversation
    from voice_runtime.realtime import attach_agent, run_agent_call
    from voice_runtime.server import VoiceServer
    from voice_runtime.testing import CallerSimulator

__version__ = "0.2.0"

_LAZY = {
    "CallerSimulator": "voice_runtime.testing",
    "Conversation": "voice_runtime.conversation",
    "VoiceServer": "voice_runtime.server",
    "attach_agent": "voice_runtime.realtime",
    "run_agent_call": "voice_runtime.realtime",
}
__getattr__, __dir__ = lazy_attributes(globals(), _LAZY)

__all__ = [
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
