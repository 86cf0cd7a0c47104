"""The ``voice-runtime`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from voice_runtime.config import ENV_VARS

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

    engine = args.engine
    if engine == "auto":
        try:
            from voice_runtime.offline import require_offline

            require_offline("faster_whisper")
            engine = "offline"
        except ImportError:
            print(
                'offline engines not installed (pip install "voice-runtime[offline]"); '
                "running the demo on the mock engines",
                file=sys.stderr,
            )
            engine = "mock"
    lines = tuple(args.line) if args.line else DEFAULT_LINES
    record = None if args.no_record else Path(args.record)
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
        print(f"demo ok: {said} agent turns, {heard} caller turns, {result.seconds:.1f} s")
    return 0 if any(t.speaker == "caller" for t in result.turns) else 1


def _cmd_simulate(args: argparse.Namespace) -> int:
    from voice_runtime.testing.simulator import CallerSimulator

    params = dict(p.split("=", 1) for p in args.param or [])

    async def run() -> CallerSimulator:
        sim = CallerSimulator(args.url, parameters=params)
        sim.on_event = lambda ev: print(f"{ev.t:7.2f}s  {ev.kind} {ev.detail}".rstrip())
        await sim.connect()
        try:
            if args.wav:
                await sim.send_wav(args.wav)
            for text in args.say or []:
                await sim.wait_idle(0.6, timeout=args.duration)
                await sim.say(text, args.voice)
            if not await sim.wait_closed(args.duration):
                print(f"hanging up after {args.duration:.0f} s")
        finally:
            await sim.hangup()
        return sim

    sim = asyncio.run(run())
    print(f"heard {sim.heard_ms / 1000:.2f} s of agent audio; {len(sim.marks_echoed)} marks echoed")
    if args.record:
        sim.write_recording(args.record)
        print(f"recording: {args.record}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``voice-runtime`` command."""
    parser = argparse.ArgumentParser(
        prog="voice-runtime",
        description="Phone calls over Twilio Media Streams, and tools to try them without a phone.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
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
        help="a line the caller says (repeat for several; default: two lines)",
    )
    demo.add_argument(
        "--record",
        default="demo_call.wav",
        metavar="PATH",
        help="where to write the stereo recording (default demo_call.wav)",
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
    sim.set_defaults(func=_cmd_simulate)
    _add_control_plane(sub)
    return parser


def _add_control_plane(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    try:
        from voice_runtime.control_cli import add_commands
    except ImportError:
        return
    add_commands(sub, _env_help)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``voice-runtime`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
