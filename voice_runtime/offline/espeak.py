"""eSpeak NG text-to-speech through ctypes, on the library bundled by ``espeakng-loader``.

The library keeps one global synthesiser per process (voice, rate, callback), so every
call into it runs under the module lock ``_LOCK``. The lock is held only while audio is
being computed, which is several hundred times faster than real time; a slow consumer of
a stream never holds it, because chunks go into an unbounded queue as they are produced.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import cast

import numpy as np

from voice_runtime.errors import ProviderError
from voice_runtime.offline import require_offline

logger = logging.getLogger(__name__)

# Values from espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exit() when data is missing
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_EE_OK = 0

_BUFFER_MS = 60  # audio per callback: small enough for a quick first chunk
# libespeak-ng copies the data path into a 160-byte buffer and silently falls back to its
# build-time path when it does not fit; longer paths are reached through a short symlink.
_MAX_DATA_PATH = 150
_RATE_MIN_WPM = 80
_RATE_MAX_WPM = 450
_POLL_S = 0.05  # how often a waiting consumer re-checks its stop event
_JOIN_TIMEOUT_S = 5.0

_CALLBACK_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_LOCK = threading.Lock()  # serialises every call into libespeak-ng
_LIBRARY: _Library | None = None
_END = object()


class _Library:
    """The process-wide libespeak-ng handle, initialised once in synchronous mode."""

    def __init__(self) -> None:
        loader = require_offline("espeakng_loader")
        lib = ctypes.CDLL(loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK_TYPE]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int

        data_path = _short_data_path(loader.get_data_path())
        rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, os.fsencode(data_path), _INITIALIZE_DONT_EXIT
        )
        if rate <= 0:
            raise ProviderError(
                "libespeak-ng failed to initialise (data directory unreadable, or its path "
                "is too long for the library)",
                provider="espeak",
            )
        self.lib = lib
        self.sample_rate = int(rate)
        self.voice: str | None = None
        # The sink of the synthesis in progress; swapped only under _LOCK.
        self.sink: _Sink | None = None
        # Kept on the instance so the C callback pointer stays alive for the process.
        self._callback = _CALLBACK_TYPE(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)
        logger.debug("espeak-ng initialised", extra={"sample_rate": self.sample_rate})

    def _on_audio(self, wav: ctypes._Pointer, numsamples: int, _events: int) -> int:
        """Receive one buffer from the library; return 1 to abort the synthesis."""
        sink = self.sink
        if sink is None:
            return 1
        try:
            if numsamples > 0 and wav:
                chunk = np.ctypeslib.as_array(wav, shape=(numsamples,)).astype(np.int16)
                return 0 if sink.put(chunk) else 1
            return 1 if sink.aborted() else 0
        except BaseException:  # an exception must never unwind into C code
            logger.exception("espeak-ng audio callback failed")
            return 1

    def select(self, voice: str, rate_wpm: int) -> None:
        """Make ``voice`` and ``rate_wpm`` current; caller holds ``_LOCK``."""
        if voice != self.voice:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                self.voice = None
                raise ValueError(f"espeak-ng has no voice named {voice!r}")
            self.voice = voice
        self.lib.espeak_SetParameter(_PARAM_RATE, rate_wpm, 0)

    def synth(self, text: bytes) -> int:
        """Run one synthesis to completion (or abort); caller holds ``_LOCK``."""
        return int(
            self.lib.espeak_Synth(
                text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
            )
        )


def _short_data_path(data_path: str) -> str:
    """Return ``data_path``, or a short symlink to it when the library could not use it."""
    if len(os.fsencode(data_path)) <= _MAX_DATA_PATH:
        return data_path
    holder = tempfile.mkdtemp(prefix="vr-espeak-")
    atexit.register(shutil.rmtree, holder, ignore_errors=True)
    link = os.path.join(holder, "espeak-ng-data")
    os.symlink(data_path, link, target_is_directory=True)
    logger.info("espeak-ng data path is long; using a short symlink", extra={"link": link})
    return link


class _Sink:
    """Where one synthesis delivers its chunks, with its abort conditions."""

    def __init__(self, stop: threading.Event | None) -> None:
        self.chunks: queue.Queue[object] = queue.Queue()
        self.abort = threading.Event()
        self._stop = stop

    def aborted(self) -> bool:
        """True once the consumer left or the caller's stop event is set."""
        return self.abort.is_set() or (self._stop is not None and self._stop.is_set())

    def put(self, chunk: np.ndarray) -> bool:
        """Queue a chunk; False tells the library to abort."""
        if self.aborted():
            return False
        self.chunks.put(chunk)
        return True


def _library() -> _Library:
    """Return the process-wide library, initialising it on first use."""
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is None:
            _LIBRARY = _Library()
        return _LIBRARY


def _synthesis_worker(lib: _Library, sink: _Sink, text: bytes, voice: str, rate: int) -> None:
    """Synthesise ``text`` into ``sink``; always ends the stream with a marker or an error."""
    outcome: object = _END
    try:
        with _LOCK:
            if not sink.aborted():
                lib.select(voice, rate)
                lib.sink = sink
                try:
                    status = lib.synth(text)
                finally:
                    lib.sink = None
                if status != _EE_OK and not sink.aborted():
                    outcome = ProviderError(
                        f"espeak_Synth failed with status {status}", provider="espeak"
                    )
    except BaseException as exc:  # handed to the consumer thread, which re-raises it
        outcome = exc
    sink.chunks.put(outcome)


class EspeakEngine:
    """eSpeak NG synthesis of text to 16-bit mono PCM at the library's rate (22050 Hz)."""

    provider = "espeak"

    def __init__(self, voice: str = "en-us", rate_wpm: int = 175) -> None:
        if not _RATE_MIN_WPM <= rate_wpm <= _RATE_MAX_WPM:
            raise ValueError(f"rate_wpm must be within {_RATE_MIN_WPM}..{_RATE_MAX_WPM}")
        self.voice = voice
        self.rate_wpm = int(rate_wpm)
        self._lib = _library()
        with _LOCK:
            self._lib.select(voice, self.rate_wpm)  # fail now on an unknown voice

    @property
    def sample_rate(self) -> int:
        """Sample rate of the produced audio in Hz."""
        return self._lib.sample_rate

    def synthesize_stream(
        self, text: str, stop: threading.Event | None = None
    ) -> Iterator[tuple[np.ndarray, int]]:
        """Yield ``(int16 chunk, sample_rate)`` pairs as the library produces them.

        Synthesis runs in a worker thread, so the first chunk can be used while the rest of
        the text is still being computed. Setting ``stop`` or closing the iterator aborts
        the synthesis at the next library buffer.
        """
        encoded = text.replace("\x00", " ").strip().encode("utf-8")
        if not encoded:
            return
        sink = _Sink(stop)
        worker = threading.Thread(
            target=_synthesis_worker,
            args=(self._lib, sink, encoded, self.voice, self.rate_wpm),
            name="espeak-synth",
            daemon=True,
        )
        worker.start()
        rate = self._lib.sample_rate
        try:
            while not sink.aborted():
                try:
                    item = sink.chunks.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield cast(np.ndarray, item), rate
        finally:
            sink.abort.set()
            worker.join(_JOIN_TIMEOUT_S)
            if worker.is_alive():
                logger.warning("espeak-ng synthesis did not stop in time")

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Synthesise all of ``text``; return ``(int16 samples, sample_rate)``."""
        chunks = [chunk for chunk, _ in self.synthesize_stream(text)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
        return audio, self.sample_rate


__all__ = ["EspeakEngine"]
