"""Local fake servers for the realtime vendors, over real websockets on 127.0.0.1.

Each fake speaks one vendor's wire protocol closely enough for the real client code to run
against it unchanged (pass the fake's :attr:`~FakeRealtimeServer.base_url` as
``AgentOptions.base_url``):

* :class:`FakeOpenAIRealtime` — OpenAI Realtime GA events; refuses beta-shaped sessions;
  validates ``conversation.item.truncate`` against the audio it sent;
* :class:`FakeXaiRealtime` — the same events with xAI's session shape and server pings;
* :class:`FakeGeminiLive` — ``setup``/``setupComplete``, PCM16 16 kHz in, 24 kHz out, JSON
  in binary frames;
* :class:`FakeElevenLabsAgent` — ``conversation_initiation_*``, ``ulaw_8000``, ping/pong,
  interruption event ids, client tools, and the signed-URL HTTP endpoint.

They are scriptable with a :class:`FakeScript`: a greeting, replies per caller turn, a tool
call and the reply after its result, usage figures. Caller speech is detected by energy
(or forced with :meth:`~FakeRealtimeServer.trigger_speech_started`). Every client message is
recorded (:attr:`~FakeRealtimeServer.received`), so tests can assert on, say, the
``audio_end_ms`` of a truncate (the valid ones are in ``truncated`` as ``(item_id,
audio_end_ms)``). :meth:`~FakeRealtimeServer.send_raw` sends any message as is, wrong field
types included. :meth:`~FakeRealtimeServer.drop` kills the sockets without a
close frame; ``refuse_connections`` makes the handshake fail with HTTP 503.
"""

from __future__ import annotations

from voice_runtime.testing.fake_realtime.base import FakeRealtimeServer, FakeResponse, FakeScript
from voice_runtime.testing.fake_realtime.calls import (
    FakeCall,
    bridged_call,
    pattern_audio,
    serve_call,
    tone_response,
)
from voice_runtime.testing.fake_realtime.elevenlabs import FakeElevenLabsAgent
from voice_runtime.testing.fake_realtime.gemini import GEMINI_PATH as GEMINI_PATH
from voice_runtime.testing.fake_realtime.gemini import FakeGeminiLive
from voice_runtime.testing.fake_realtime.openai import FakeOpenAIRealtime
from voice_runtime.testing.fake_realtime.xai import FakeXaiRealtime

__all__ = [
    "FakeCall",
    "FakeElevenLabsAgent",
    "FakeGeminiLive",
    "FakeOpenAIRealtime",
    "FakeRealtimeServer",
    "FakeResponse",
    "FakeScript",
    "FakeXaiRealtime",
    "bridged_call",
    "pattern_audio",
    "serve_call",
    "tone_response",
]
