"""TTS factory: ``create_tts(provider, **kw)``.

``provider`` is a registered name, or a list of names and providers for a fallback chain
(:class:`~voice_runtime.providers.fallback.FallbackTts`). The result is typed: the provider
class for a literal name (``create_tts("elevenlabs")`` is an ``ElevenLabsTTS``), else
``AsyncTtsProvider`` (a ``TtsProvider`` that also has ``speak_async``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast, overload

from voice_runtime.contracts import AsyncTtsProvider, TtsProvider
from voice_runtime.registry import Registry

if TYPE_CHECKING:
    from voice_runtime.mock.tts import MockTts
    from voice_runtime.providers.azure_tts import AzureTTS
    from voice_runtime.providers.elevenlabs_tts import ElevenLabsTTS
    from voice_runtime.providers.fallback import FallbackTts
    from voice_runtime.providers.offline_tts import OfflineTts

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


@overload
def get_tts_class(provider: Literal["elevenlabs"] = ...) -> type[ElevenLabsTTS]: ...
@overload
def get_tts_class(provider: Literal["azure"]) -> type[AzureTTS]: ...
@overload
def get_tts_class(provider: Literal["offline"]) -> type[OfflineTts]: ...
@overload
def get_tts_class(provider: Literal["mock"]) -> type[MockTts]: ...
@overload
def get_tts_class(provider: str) -> type[AsyncTtsProvider]: ...
def get_tts_class(provider: str = "elevenlabs") -> type[Any]:
    """Return the TTS provider class without instantiating it."""
    return cast("type[Any]", TTS_PROVIDERS.load(provider))


@overload
def create_tts(provider: Literal["elevenlabs"] = ..., **kwargs: Any) -> ElevenLabsTTS: ...
@overload
def create_tts(provider: Literal["azure"], **kwargs: Any) -> AzureTTS: ...
@overload
def create_tts(provider: Literal["offline"], **kwargs: Any) -> OfflineTts: ...
@overload
def create_tts(provider: Literal["mock"], **kwargs: Any) -> MockTts: ...
@overload
def create_tts(provider: str, **kwargs: Any) -> AsyncTtsProvider: ...
@overload
def create_tts(provider: Sequence[str | TtsProvider], **kwargs: Any) -> FallbackTts: ...
def create_tts(provider: str | Sequence[str | TtsProvider] = "elevenlabs", **kwargs: Any) -> Any:
    """Create a TTS provider; keyword arguments go to its constructor.

    A list (``["elevenlabs", "offline"]``) makes a fallback chain: names are created with no
    arguments, provider objects are used as they are, and the keyword arguments go to the
    :class:`~voice_runtime.providers.fallback.FallbackTts`.
    """
    if not isinstance(provider, str):
        from voice_runtime.providers.fallback import FallbackTts

        chain = [create_tts(p) if isinstance(p, str) else p for p in provider]
        names = [p if isinstance(p, str) else TTS_PROVIDERS.name_of(p) for p in provider]
        return FallbackTts(chain, names=names, **kwargs)
    return get_tts_class(provider)(**kwargs)
