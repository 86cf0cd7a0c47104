"""STT factory: ``create_stt(provider, **kw)`` and ``get_stt_class(provider)``."""

from __future__ import annotations

from typing import Any

from voice_runtime.registry import Registry

STT_PROVIDERS = Registry(
    "STT provider",
    {
        "elevenlabs": "voice_runtime.providers.elevenlabs_stt:PersistentSttSession",
        "azure": "voice_runtime.providers.azure_stt:AzurePersistentStt",
        "offline": "voice_runtime.providers.offline_stt:OfflineStt",
        "mock": "voice_runtime.mock.stt:MockStt",
    },
)

__all__ = ["STT_PROVIDERS", "available_stt_providers", "create_stt", "get_stt_class"]


def available_stt_providers() -> list[str]:
    """Names accepted by :func:`create_stt`."""
    return STT_PROVIDERS.names()


def get_stt_class(provider: str = "elevenlabs") -> type[Any]:
    """Return the STT provider class without instantiating it."""
    return STT_PROVIDERS.load(provider)


def create_stt(provider: str = "elevenlabs", **kwargs: Any) -> Any:
    """Create an STT provider; keyword arguments go to its constructor."""
    return get_stt_class(provider)(**kwargs)
