"""The ``voice-runtime`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import websockets

from voice_runtime.config import ENV_VARS
from voice_runtime.errors import VoiceRuntimeError

__all__ = ["main"]


def _env_help(names: Sequence[str]) -> str:
    rows = [v for v in ENV_VARS if v.name in names]
    lines = ["environment variables:"]
    for var in rows:
        default = f" (default {var.default})" if var.default else ""
        lines.append(f"  {var.name:<34} {var.meaning}{default}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    from voice_runtime.demo import DEFAULT_LINES, run_demo
    from voice_runtime.offline import OFFLINE_INSTALL_HINT, require_offline

    lines = tuple(args.line) if args.line else DEFAULT_LINES
    if any(not line.strip() for line in lines):
        print("error: --line needs some text to say", file=sys.stderr)
        return 2
    if len(lines) > len(DEFAULT_LINES):
        print(
            f"error: the demo agent asks {len(DEFAULT_LINES)} questions; "
            f"give at most {len(DEFAULT_LINES)} --line",
            file=sys.stderr,
        )
        return 2
    if args.timeout <= 0:
        print("error: --timeout must be more than 0 seconds", file=sys.stderr)
        return 2
    engine = args.engine
    if engine in ("auto", "offline"):
        try:
            require_offline("faster_whisper")
            engine = "offline"
        except ImportError:
            if engine == "offline":
                print(f"error: the offline engines are not installed: {OFFLINE_INSTALL_HINT}",
                      file=sys.stderr)  # fmt: skip
                return 2
            print(
                f"offline engines not installed ({OFFLINE_INSTALL_HINT}); "
                "running the demo on the mock engines",
                file=sys.stderr,
            )
            engine = "mock"
    # --quiet writes no file unless --record asks for one.
    wanted = args.record or (None if args.quiet else "demo_call.wav")
    record = None if args.no_record or wanted is None else Path(wanted)
    result = run_demo(
        engine=engine,
        lines=lines,
        record=record,
        out=None if args.quiet else sys.stdout,
        timeout=args.timeout,
        virtual_time=args.fast,
    )
    if args.quiet:
        said = sum(1 for t in result.turns if t.speaker == "agent")
        heard = sum(1 for t in result.turns if t.speaker == "caller")
        written = f"; recording: {result.recording}" if result.recording is not None else ""
        print(f"demo ok: {said} agent turns, {heard} caller turns, {result.seconds:.1f} s{written}")
    return 0 if any(t.speaker == "caller" for t in result.turns) else 1


class _SimulateError(VoiceRuntimeError):
    """A ``simulate`` problem reported as one line, without a traceback."""


def _dtmf_plan(specs: Sequence[str] | None) -> list[tuple[float, str]]:
    """Parse ``--dtmf DIGITS@SECONDS`` options into (seconds, digits), soonest first."""
    plan: list[tuple[float, str]] = []
    for spec in specs or []:
        digits, sep, at = spec.partition("@")
        try:
            seconds = float(at) if sep else 0.0
        except ValueError:
            seconds = -1.0
        if not digits or seconds < 0 or any(d not in "0123456789*#" for d in digits):
            raise _SimulateError(f"--dtmf expects DIGITS@SECONDS (digits 0-9 * #), got {spec!r}")
        plan.append((seconds, digits))
    return sorted(plan)


def _connect_error(url: str, exc: BaseException) -> str:
    """One line saying why the websocket to ``url`` did not open."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 403:
        return f"{url}: refused with HTTP 403 (bad or missing signature? try --auth-token)"
    if status == 404:
        return f"{url}: HTTP 404, no media stream websocket at this path"
    if status is not None:
        return f"{url}: the server answered HTTP {status} instead of opening a websocket"
    if isinstance(exc, ConnectionRefusedError):
        return f"{url}: connection refused (is the server running on that host and port?)"
    if isinstance(exc, TimeoutError):
        return f"{url}: no answer within 10 s"
    return f"{url}: could not connect: {type(exc).__name__}: {exc}"


def _simulate_setup(
    args: argparse.Namespace,
) -> tuple[dict[str, str], bytes | None, dict[str, str]]:
    """Check the ``simulate`` options before connecting: (parameters, caller audio, headers)."""
    from voice_runtime.errors import ConfigurationError

    scheme = args.url.partition("://")[0].lower()
    if scheme in ("http", "https"):
        fixed = ("ws" if scheme == "http" else "wss") + args.url[len(scheme) :]
        raise _SimulateError(f"simulate needs a websocket URL (ws:// or wss://), e.g. {fixed}")
    if scheme not in ("ws", "wss"):
        raise _SimulateError(f"not a websocket URL: {args.url!r} (expected ws://host:port/path)")
    params: dict[str, str] = {}
    for pair in args.param or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise _SimulateError(f"--param expects NAME=VALUE, got {pair!r}")
        params[name] = value
    audio = None
    if args.wav:
        from voice_runtime.audio import read_wav

        try:
            audio = read_wav(args.wav).to_ulaw_8k_mono()
        except FileNotFoundError:
            raise _SimulateError(f"--wav: no such file: {args.wav}") from None
        except (OSError, ValueError, ConfigurationError) as exc:
            raise _SimulateError(f"--wav: cannot play {args.wav}: {exc}") from None
    headers: dict[str, str] = {}
    if args.auth_token:
        from twilio.request_validator import RequestValidator

        # Twilio signs a media stream's upgrade over its URL with no parameters.
        headers["X-Twilio-Signature"] = RequestValidator(args.auth_token).compute_signature(
            args.url, {}
        )
    return params, audio, headers


def _cmd_simulate(args: argparse.Namespace) -> int:
    from voice_runtime.testing.simulator import CallerSimulator

    try:
        params, audio, headers = _simulate_setup(args)
        dtmf = _dtmf_plan(args.dtmf)
    except _SimulateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def show(ev: Any) -> None:
        if ev.kind == "mark" and not args.verbose:
            return  # one per played chunk: noise unless asked for
        print(f"{ev.t:7.2f}s  {ev.kind} {ev.detail}".rstrip())

    async def press(sim: CallerSimulator) -> None:
        for seconds, digits in dtmf:
            await asyncio.sleep(max(0.0, seconds - (sim.clock.now() - sim.started_at)))
            for digit in digits:
                await sim.send_dtmf(digit)

    async def run() -> CallerSimulator:
        sim = CallerSimulator(args.url, parameters=params, headers=headers, call_sid=args.call_sid)
        sim.on_event = show
        try:
            await sim.connect()
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise _SimulateError(_connect_error(args.url, exc)) from None
        presser = asyncio.create_task(press(sim)) if dtmf else None
        try:
            if audio is not None:
                await sim.send_audio(audio)
            for text in args.say or []:
                await sim.wait_idle(0.6, timeout=args.duration)
                await sim.say(text, args.voice)
            if not await sim.wait_closed(args.duration):
                print(f"hanging up after {args.duration:.0f} s")
        finally:
            if presser is not None:
                presser.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await presser
            await sim.hangup()
        return sim

    try:
        sim = asyncio.run(run())
    except _SimulateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"heard {sim.heard_ms / 1000:.2f} s of agent audio; {len(sim.marks_echoed)} marks echoed")
    text = _transcribe(bytes(sim.heard))
    if text:
        print(f"heard: {text}")
    if args.record:
        sim.write_recording(args.record)
        print(f"recording: {args.record}")
    return 0


def _transcribe(ulaw: bytes) -> str | None:
    """What the caller heard, as text, when the offline STT is installed (else None)."""
    if len(ulaw) < 8000 // 4:
        return None
    try:
        from voice_runtime.offline import require_offline

        require_offline("faster_whisper")
    except ImportError:
        return None
    import numpy as np

    from voice_runtime.audio import resample, ulaw_to_pcm16
    from voice_runtime.offline.whisper import WhisperEngine

    pcm = np.frombuffer(resample(ulaw_to_pcm16(ulaw), 8000, 16000).tobytes(), dtype=np.int16)
    return WhisperEngine().transcribe(pcm).strip() or None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``voice-runtime`` command."""
    parser = argparse.ArgumentParser(
        prog="voice-runtime",
        description="Phone calls over Twilio Media Streams, and tools to try them without a phone.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at INFO level (simulate: show marks)"
    )
    parser.add_argument("--version", action="version", version=f"voice-runtime {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="run a local demo call (no keys, no network)",
        description="Start the example app on a free local port and call it with the caller "
        "simulator; print the call's timeline and write a stereo recording.",
    )
    demo.add_argument(
        "--engine",
        choices=("auto", "offline", "mock"),
        default="auto",
        help="offline (real speech), mock (tones); auto: offline when installed",
    )
    demo.add_argument(
        "--line",
        action="append",
        metavar="TEXT",
        help="a line the caller says (up to two: the agent asks two questions)",
    )
    demo.add_argument(
        "--record",
        metavar="PATH",
        help="where to write the stereo recording (default demo_call.wav; none with --quiet)",
    )
    demo.add_argument("--no-record", action="store_true", help="do not write a recording")
    demo.add_argument("-q", "--quiet", action="store_true", help="print one summary line only")
    demo.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    demo.add_argument(
        "--fast",
        action="store_true",
        help="skip through the audio on a virtual clock (the timeline shows call time)",
    )
    demo.set_defaults(func=_cmd_demo)

    sim = sub.add_parser(
        "simulate",
        help="call a Media Streams websocket URL with the caller simulator",
        description="Connect to URL as Twilio would (connected, start, media, marks, stop) and "
        "print what happens.",
    )
    sim.add_argument("url", help="websocket URL, e.g. ws://127.0.0.1:8080/voice")
    sim.add_argument(
        "--param", action="append", metavar="NAME=VALUE", help="a <Parameter> of the stream"
    )
    sim.add_argument("--wav", help="play this WAV file as the caller")
    sim.add_argument(
        "--say",
        action="append",
        metavar="TEXT",
        help="say this (offline TTS) after the agent goes quiet",
    )
    sim.add_argument(
        "--voice", default="piper", choices=("piper", "espeak"), help="caller voice for --say"
    )
    sim.add_argument("--duration", type=float, default=30.0, help="hang up after this many seconds")
    sim.add_argument("--record", help="write a stereo recording (caller left, agent right)")
    sim.add_argument(
        "--dtmf",
        action="append",
        metavar="DIGITS@SECONDS",
        help="press these keys this many seconds into the call (repeatable), e.g. 12#@3",
    )
    sim.add_argument(
        "--auth-token",
        help="sign the upgrade with this Twilio auth token, as Twilio does (X-Twilio-Signature)",
    )
    sim.add_argument("--call-sid", help="the call SID to send in start (default: a random CA...)")
    sim.set_defaults(func=_cmd_simulate)
    _add_control_plane(sub)
    return parser


def _add_control_plane(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from voice_runtime.control_cli import add_commands
    except ImportError:
        return
    add_commands(sub, _env_help)


def _version() -> str:
    from voice_runtime import __version__

    return __version__


def load_env_file(path: Path | None = None) -> bool:
    """Read ``.env`` (default: in the working directory) into os.environ; set variables win."""
    path = Path(".env") if path is None else path
    if not path.is_file():
        return False
    from dotenv import load_dotenv

    return bool(load_dotenv(path, override=False))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voice-runtime`` console script."""
    args = build_parser().parse_args(argv)
    load_env_file()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
