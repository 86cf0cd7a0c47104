"""Audio for the call leg: G.711 codecs, PCM helpers, resampling, mixing and WAV files.

The call leg is G.711 μ-law, 8 kHz, mono, in 20 ms frames of 160 bytes. Everything here
works on whole buffers with numpy; nothing loops over samples in Python.

- :mod:`~voice_runtime.audio.codec`: μ-law/A-law ↔ PCM16, bit-exact with ``audioop``.
- :mod:`~voice_runtime.audio.pcm`: PCM16 conversions, levels, framing, silence and tones.
- :mod:`~voice_runtime.audio.resample`: libsoxr resampling, streaming and one-shot.
- :mod:`~voice_runtime.audio.mixer`: :func:`mix_frames` and the live/recording
  :class:`AudioMixer`.
- :mod:`~voice_runtime.audio.wav`: reading and writing WAV (μ-law, A-law, PCM).
"""

from __future__ import annotations

from voice_runtime.audio.codec import (
    alaw_decode,
    alaw_encode,
    alaw_to_pcm16,
    pcm16_to_alaw,
    pcm16_to_ulaw,
    ulaw_decode,
    ulaw_encode,
    ulaw_to_pcm16,
)
from voice_runtime.audio.mixer import CATCHUP_LIMIT, MAX_FRAMES, AudioMixer, MixerStats, mix_frames
from voice_runtime.audio.pcm import (
    FRAME_BYTES,
    FRAME_INTERVAL,
    SAMPLE_RATE,
    SILENCE_FRAME,
    duration_ms,
    float_to_pcm16,
    frames,
    pcm16_from_bytes,
    pcm16_to_bytes,
    pcm16_to_float,
    rms_dbfs,
    silence_ulaw,
    tone_pcm16,
    tone_ulaw,
)
from voice_runtime.audio.resample import SUPPORTED_RATES, StreamResampler, resample
from voice_runtime.audio.wav import (
    UlawWavWriter,
    WavAudio,
    parse_wav,
    read_wav,
    write_pcm16_wav,
    write_stereo_call_wav,
    write_ulaw_wav,
)

__all__ = [
    "CATCHUP_LIMIT",
    "FRAME_BYTES",
    "FRAME_INTERVAL",
    "MAX_FRAMES",
    "SAMPLE_RATE",
    "SILENCE_FRAME",
    "SUPPORTED_RATES",
    "AudioMixer",
    "MixerStats",
    "StreamResampler",
    "UlawWavWriter",
    "WavAudio",
    "alaw_decode",
    "alaw_encode",
    "alaw_to_pcm16",
    "duration_ms",
    "float_to_pcm16",
    "frames",
    "mix_frames",
    "parse_wav",
    "pcm16_from_bytes",
    "pcm16_to_alaw",
    "pcm16_to_bytes",
    "pcm16_to_float",
    "pcm16_to_ulaw",
    "read_wav",
    "resample",
    "rms_dbfs",
    "silence_ulaw",
    "tone_pcm16",
    "tone_ulaw",
    "ulaw_decode",
    "ulaw_encode",
    "ulaw_to_pcm16",
    "write_pcm16_wav",
    "write_stereo_call_wav",
    "write_ulaw_wav",
]
