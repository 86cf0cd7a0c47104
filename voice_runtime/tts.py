"""TTS factory: ``create_tts(provider, **kw)``."""

from __future__ import annotations

from typing import Any

from voice_runtime.registry import Registry

TTS_PROVIDERS = Registry(
    "TTS provider",
    {
        "elevenlabs": "voice_runtime.providers.elevenlabs_tts:ElevenLabsTTS",
        "azure": "voice_runtime.providers.azure_tts:AzureTTS",
        "offline": "voice_runtime.providers.offline_tts:OfflineTts",
        "mock": "voice_runtime.mock.tts:MockTts",
    },
)

__all__ = ["TTS_PROVIDERS", "available_tts_providers", "create_tts", "get_tts_class"]


def available_tts_providers() -> list[str]:
    """Names accepted by :func:`create_tts`."""
    return TTS_PROVIDERS.names()


def get_tts_class(provider: str = "elevenlabs") -> type[Any]:
    """Return the TTS provider class without instantiating it."""
    return TTS_PROVIDERS.load(provider)


def create_tts(provider: str = "elevenlabs", **kwargs: Any) -> Any:
    """Create a TTS provider; keyword arguments go to its constructor."""
    return get_tts_class(provider)(**kwargs)
