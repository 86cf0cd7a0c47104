"""Mix the two legs of a call on a 20 ms clock, for listening live and for recordings.

::

    write_caller(b) ─► caller queue ─┐                           ┌─► ffplay (monitor)
                                     ├─ mix thread, one frame ───┼─► μ-law WAV (record_path)
    write_agent(b)  ─► agent queue  ─┘  per leg every 20 ms      └─► stereo PCM16 WAV

Each leg is a bounded FIFO of 160-byte μ-law frames; every tick takes one frame from each
(silence when a leg is empty), so bursty agent audio drains at real-time speed, as the
caller hears it. A full queue drops its oldest frame and counts the drop.
"""

from __future__ import annotations

import collections
import logging
import os
import shutil
import subprocess
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import numpy.typing as npt

from voice_runtime.audio.codec import BytesLike, ulaw_decode, ulaw_encode
from voice_runtime.audio.pcm import FRAME_BYTES, FRAME_INTERVAL, SAMPLE_RATE, SILENCE_FRAME
from voice_runtime.audio.wav import UlawWavWriter
from voice_runtime.config import settings

logger = logging.getLogger(__name__)

MAX_FRAMES = 400  # per leg: 8 s of audio before the oldest frames are dropped
CATCHUP_LIMIT = 5 * FRAME_INTERVAL  # further behind than this, the clock skips ahead

_FFPLAY_ARGS = (
    "-nodisp",
    "-loglevel",
    "quiet",
    "-probesize",
    "32",
    "-fflags",
    "nobuffer",
    "-f",
    "mulaw",
    "-ar",
    str(SAMPLE_RATE),
    "-i",
    "-",
)


def _mix_table() -> npt.NDArray[np.uint8]:
    # Every (caller code, agent code) pair mixed once: decode, add in int32, clip, encode.
    # 64 KiB, and mixing a frame becomes one table lookup.
    linear = ulaw_decode(np.arange(256, dtype=np.uint8)).astype(np.int32)
    summed = np.clip(linear[:, None] + linear[None, :], -32768, 32767).astype(np.int16)
    table = ulaw_encode(summed).reshape(-1)
    table.flags.writeable = False
    return table


_MIX = _mix_table()


def mix_frames(caller: bytes, agent: bytes) -> bytes:
    """Mix two μ-law buffers: decode both, add, clip to int16, encode.

    Buffers of unequal length are mixed as if the shorter one ended in silence.
    """
    size = max(len(caller), len(agent))
    if len(caller) != len(agent):
        caller = bytes(caller).ljust(size, b"\xff")
        agent = bytes(agent).ljust(size, b"\xff")
    # Interleaving the two code streams bytewise yields the table index directly when read
    # as little-endian uint16: agent code in the low byte, caller code in the high byte.
    pairs = bytearray(2 * size)
    pairs[0::2] = agent
    pairs[1::2] = caller
    return _MIX.take(np.frombuffer(pairs, dtype="<u2")).tobytes()


@dataclass(frozen=True)
class MixerStats:
    """Counters of one :class:`AudioMixer`."""

    ticks: int
    caller_frames: int
    agent_frames: int
    caller_dropped: int
    agent_dropped: int
    recorded_bytes: int
    monitoring: bool


class _Leg:
    """One direction's frame queue; the mixer's lock guards every access."""

    def __init__(self, name: str, max_frames: int) -> None:
        self.name = name
        self.queue: collections.deque[bytes] = collections.deque()
        self.max_frames = max_frames
        self.partial = b""  # bytes of a frame not yet complete, kept for the next write
        self.accepted = 0
        self.dropped = 0

    def push(self, chunk: bytes) -> int:
        data = self.partial + chunk if self.partial else chunk
        whole = len(data) - len(data) % FRAME_BYTES
        self.partial = data[whole:]
        dropped = 0
        for i in range(0, whole, FRAME_BYTES):
            if len(self.queue) >= self.max_frames:
                self.queue.popleft()  # the oldest goes: live monitoring must not lag
                dropped += 1
            self.queue.append(data[i : i + FRAME_BYTES])
        self.accepted += whole // FRAME_BYTES
        self.dropped += dropped
        return dropped

    def pop(self) -> bytes | None:
        return self.queue.popleft() if self.queue else None

    def seal(self) -> None:
        """Queue the pending partial frame, padded with silence (end of the stream)."""
        if self.partial:
            self.queue.append(self.partial.ljust(FRAME_BYTES, b"\xff"))
            self.partial = b""
            self.accepted += 1

    def clear(self) -> None:
        self.queue.clear()
        self.partial = b""


class AudioMixer:
    """Mix caller and agent audio in real time; monitor through ffplay and/or record to WAV.

    ``record_path`` gets the mono mix as a μ-law WAV (format 7, 8 kHz), ``stereo_path`` a
    PCM16 WAV with the caller left and the agent right. ``monitor`` plays the mix through
    ``ffplay``; ``None`` reads VOICE_MONITOR when the mixer is constructed. Recording needs
    no ffplay; a requested monitor without ffplay logs a warning and recording goes on.

    ``write_caller``/``write_agent`` are thread-safe and never block on the mix. Audio
    written before :meth:`start` waits in the queues; after :meth:`shutdown` it is ignored.
    """

    def __init__(
        self,
        record_path: Path | None = None,
        *,
        monitor: bool | None = None,
        stereo_path: Path | None = None,
        max_queue_frames: int = MAX_FRAMES,
    ) -> None:
        if monitor is None:
            monitor = settings().voice_monitor
        if max_queue_frames < 1:
            raise ValueError(f"max_queue_frames must be at least 1, got {max_queue_frames}")
        self.record_path = Path(record_path) if record_path is not None else None
        self.stereo_path = Path(stereo_path) if stereo_path is not None else None
        self.monitor = bool(monitor)
        self._lifecycle = threading.Lock()  # serialises start() and shutdown()
        self._lock = threading.Lock()  # queues, counters and state
        self._out_lock = threading.Lock()  # recorders: the mix thread and shutdown's drain
        self._caller = _Leg("caller", max_queue_frames)
        self._agent = _Leg("agent", max_queue_frames)
        self._state = "new"  # new -> running -> closed
        self._accepting = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._mono: UlawWavWriter | None = None
        self._stereo: wave.Wave_write | None = None
        self._ticks = 0
        self._recorded_bytes = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Open the outputs and start the 20 ms mix thread; a second call does nothing."""
        with self._lifecycle:
            self._start()

    def _start(self) -> None:
        with self._lock:
            if self._state == "running":
                return
            if self._state == "closed":
                raise RuntimeError("AudioMixer cannot be restarted after shutdown()")
            self._state = "running"
        try:
            self._open_outputs()
        except BaseException:
            self._close_outputs()
            with self._lock:
                self._state = "closed"
                self._accepting = False
            raise
        if self._mono is None and self._stereo is None and self._proc is None:
            logger.debug("audio mixer has no output (no monitor, no recording) and stays idle")
            with self._lock:
                self._accepting = False
                self._caller.clear()
                self._agent.clear()
            return
        self._thread = threading.Thread(
            target=self._run, name="voice-runtime-audio-mixer", daemon=True
        )
        self._thread.start()
        logger.info(
            "audio mixer started",
            extra={
                "record_path": str(self.record_path) if self.record_path else None,
                "stereo_path": str(self.stereo_path) if self.stereo_path else None,
                "monitoring": self._proc is not None,
            },
        )

    def shutdown(self, *, drain: bool = True) -> None:
        """Stop the mix thread, complete the WAV headers and stop ffplay; idempotent.

        With ``drain`` (the default) audio still queued is mixed into the recordings
        first, so a recording holds everything that was written to the mixer.
        """
        with self._lifecycle:
            self._shutdown(drain)

    def _shutdown(self, drain: bool) -> None:
        with self._lock:
            if self._state == "closed":
                return
            was_running = self._state == "running"
            self._state = "closed"
            self._accepting = False
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=2.0)
            if thread.is_alive():
                # Most likely blocked writing to a stalled ffplay: stopping it unblocks.
                self._stop_player()
                thread.join(timeout=2.0)
            if thread.is_alive():
                logger.warning("audio mixer thread did not stop in time")
        if was_running and drain:
            with self._lock:
                self._caller.seal()
                self._agent.seal()
            while self._has_queued():
                self._tick(play=False)
        self._close_outputs()
        self._stop_player()
        stats = self.stats
        logger.info(
            "audio mixer stopped",
            extra={
                "ticks": stats.ticks,
                "recorded_bytes": stats.recorded_bytes,
                "caller_dropped": stats.caller_dropped,
                "agent_dropped": stats.agent_dropped,
            },
        )

    def __enter__(self) -> AudioMixer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- input -------------------------------------------------------------------------

    def write_caller(self, chunk: BytesLike) -> None:
        """Queue caller μ-law audio of any length (thread-safe)."""
        self._write(self._caller, chunk)

    def write_agent(self, chunk: BytesLike) -> None:
        """Queue agent μ-law audio of any length (thread-safe)."""
        self._write(self._agent, chunk)

    def clear_agent(self) -> None:
        """Drop queued agent audio, e.g. when the caller barges in and playback is cleared."""
        with self._lock:
            self._agent.clear()

    def _write(self, leg: _Leg, chunk: BytesLike) -> None:
        with self._lock:
            if not self._accepting:
                return
            dropped = leg.push(bytes(chunk))
            first_drop = dropped and leg.dropped == dropped
        if first_drop:
            logger.warning(
                "audio mixer queue full, dropping oldest frames",
                extra={"leg": leg.name, "max_frames": leg.max_frames},
            )

    # -- state -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the mix thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def monitoring(self) -> bool:
        """True while the mix is being played through ffplay."""
        return self._proc is not None

    @property
    def stats(self) -> MixerStats:
        """A snapshot of the counters (frames accepted and dropped, bytes recorded)."""
        with self._lock:
            return MixerStats(
                ticks=self._ticks,
                caller_frames=self._caller.accepted,
                agent_frames=self._agent.accepted,
                caller_dropped=self._caller.dropped,
                agent_dropped=self._agent.dropped,
                recorded_bytes=self._recorded_bytes,
                monitoring=self._proc is not None,
            )

    # -- internals ---------------------------------------------------------------------

    def _open_outputs(self) -> None:
        if self.record_path is not None:
            self._mono = UlawWavWriter(self.record_path).open()
        if self.stereo_path is not None:
            self.stereo_path.parent.mkdir(parents=True, exist_ok=True)
            stereo = wave.open(os.fspath(self.stereo_path), "wb")  # noqa: SIM115
            stereo.setnchannels(2)
            stereo.setsampwidth(2)
            stereo.setframerate(SAMPLE_RATE)
            self._stereo = stereo
        if self.monitor:
            self._proc = self._start_player()

    def _start_player(self) -> subprocess.Popen[bytes] | None:
        ffplay = shutil.which("ffplay")
        if ffplay is None:
            logger.warning("ffplay not found, audio monitoring is off (install ffmpeg)")
            return None
        try:
            return subprocess.Popen(
                [ffplay, *_FFPLAY_ARGS],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                bufsize=0,
            )
        except OSError:
            logger.warning("ffplay could not be started, audio monitoring is off", exc_info=True)
            return None

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now > next_tick + CATCHUP_LIMIT:
                next_tick = now  # we were stalled: skip the lost ticks instead of bursting
            elif now < next_tick and self._stop.wait(next_tick - now):
                break
            next_tick += FRAME_INTERVAL
            try:
                self._tick(play=True)
            except Exception:
                logger.exception("audio mixer tick failed; mixer stops")
                return

    def _has_queued(self) -> bool:
        with self._lock:
            return bool(self._caller.queue or self._agent.queue)

    def _tick(self, *, play: bool) -> None:
        """Mix one frame from each leg (silence for an empty leg) into the outputs."""
        with self._lock:
            caller = self._caller.pop()
            agent = self._agent.pop()
            self._ticks += 1
        if caller is not None and agent is not None:
            mixed = mix_frames(caller, agent)
        else:
            # One leg only: pass its frame through untouched (no decode/encode round trip).
            mixed = caller or agent or SILENCE_FRAME
        with self._out_lock:
            if self._mono is not None:
                try:
                    self._mono.write(mixed)
                    self._recorded_bytes += len(mixed)
                except (OSError, ValueError):
                    logger.warning("audio mixer recording write failed; recording stops")
                    self._abandon(self._mono)
                    self._mono = None
            if self._stereo is not None:
                self._write_stereo(caller, agent)
        if play:
            self._play(mixed)

    def _write_stereo(self, caller: bytes | None, agent: bytes | None) -> None:
        if self._stereo is None:
            return
        frame = np.zeros((FRAME_BYTES, 2), dtype="<i2")
        if caller is not None:
            frame[:, 0] = ulaw_decode(caller)
        if agent is not None:
            frame[:, 1] = ulaw_decode(agent)
        try:
            # writeframesraw leaves the header to close(), which knows the final size.
            self._stereo.writeframesraw(frame.tobytes())
        except (OSError, ValueError, wave.Error):
            logger.warning("audio mixer stereo recording write failed; it stops")
            self._abandon(self._stereo)
            self._stereo = None

    def _play(self, mixed: bytes) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        try:
            proc.stdin.write(mixed)
        except (OSError, ValueError):
            logger.warning("ffplay pipe closed, audio monitoring is off")
            self._stop_player()

    @staticmethod
    def _abandon(writer: UlawWavWriter | wave.Wave_write) -> None:
        try:
            writer.close()
        except Exception:
            pass

    def _close_outputs(self) -> None:
        with self._out_lock:
            mono, self._mono = self._mono, None
            stereo, self._stereo = self._stereo, None
        if mono is not None:
            try:
                mono.close()
            except OSError:
                logger.warning("audio mixer could not complete the recording", exc_info=True)
        if stereo is not None:
            try:
                stereo.close()
            except (OSError, wave.Error):
                logger.warning("audio mixer could not complete the stereo recording")

    def _stop_player(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        proc.terminate()
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            logger.warning("ffplay did not exit after terminate, killing it")
            proc.kill()
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass


__all__ = ["CATCHUP_LIMIT", "MAX_FRAMES", "AudioMixer", "MixerStats", "mix_frames"]
