"""xAI Grok voice agent: the OpenAI-compatible realtime protocol with xAI's session shape.

The events are OpenAI's GA names, so everything but the session configuration comes from
:class:`~voice_runtime.realtime.openai.OpenAICompatibleAgent`. xAI puts ``voice``,
``instructions``, ``turn_detection`` and ``tools`` at the top of ``session`` (not under
``audio``) and has no ``session.type``; formats are ``audio/pcmu`` both ways, so Twilio audio
passes through untouched and barge-in truncates exactly as with OpenAI. Server ``ping``
events are ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar

from voice_runtime.realtime._base import deep_merge
from voice_runtime.realtime.openai import OpenAICompatibleAgent

DEFAULT_XAI_URL = "wss://api.x.ai/v1"

__all__ = ["XaiRealtimeAgent"]


class XaiRealtimeAgent(OpenAICompatibleAgent):
    """xAI Grok voice agent (``audio/pcmu`` both ways).

    Key: ``api_key`` or ``XAI_API_KEY``. ``options.base_url`` overrides
    ``wss://api.x.ai/v1`` (``/realtime`` is appended, plus ``?model=`` when a model is set).
    """

    # Grok's server_vad takes the tuning values but not OpenAI's response switches.
    turn_detection_base: ClassVar[dict[str, Any]] = {"type": "server_vad"}

    provider: ClassVar[str] = "xai"
    default_url: ClassVar[str] = DEFAULT_XAI_URL
    default_model: ClassVar[str | None] = None
    credential_what: ClassVar[str] = "xAI API key"

    def session_config(self) -> dict[str, Any]:
        """The ``session`` object sent in ``session.update`` (xAI shape)."""
        o = self.options
        session: dict[str, Any] = {
            "turn_detection": self._turn_detection(),
            "audio": {
                "input": {"format": {"type": "audio/pcmu"}},
                "output": {"format": {"type": "audio/pcmu"}},
            },
        }
        if o.voice:
            session["voice"] = o.voice
        if o.instructions is not None:
            session["instructions"] = o.instructions
        if o.tools:
            session["tools"] = [t.as_function() for t in o.tools]
        if o.language and o.transcribe_input:
            session["audio"]["input"]["transcription"] = {"language_hint": o.language}
        return deep_merge(session, o.extra)

    def _instructions_update(self, instructions: str) -> dict[str, Any]:
        return {"instructions": instructions}
