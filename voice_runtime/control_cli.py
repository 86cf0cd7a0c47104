"""The ``voice-runtime serve``, ``call`` and ``sms`` commands.

Running a server lives in :mod:`voice_runtime.serving` (re-exported here for scripts that
imported it from this module).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from voice_runtime.config import settings
from voice_runtime.errors import CallNotAnsweredError, ConfigurationError, VoiceRuntimeError
from voice_runtime.server import VoiceServer
from voice_runtime.serving import BackgroundVoiceServer, ConnectionLimits, serve_forever
from voice_runtime.session import VoiceSession

logger = logging.getLogger(__name__)

__all__ = ["BackgroundVoiceServer", "add_commands", "load_target", "serve_forever"]

SERVE_ENV = (
    "VOICE_SERVER_PORT",
    "VOICE_PUBLIC_URL",
    "VOICE_STREAM_URL",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_SKIP_SIGNATURE_VALIDATION",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_HTTP_TIMEOUT",
    "VOICE_REDIS_URL",
    "VOICE_INSTANCE_URL",
    "VOICE_INSTANCE_ID",
    "VOICE_CLUSTER_SECRET",
    "VOICE_CLUSTER_HEARTBEAT_S",
)
CALL_ENV = (
    "VOICE_SERVER_PORT",
    "VOICE_PUBLIC_URL",
    "VOICE_STREAM_URL",
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_PHONE_NUMBER",
    "TWILIO_SKIP_SIGNATURE_VALIDATION",
    "TWILIO_HTTP_TIMEOUT",
    "TWILIO_REGION",
    "TWILIO_EDGE",
    "TWILIO_API_BASE_URL",
)
SMS_ENV = (
    "TWILIO_ACCOUNT_SID",
    "TWILIO_AUTH_TOKEN",
    "TWILIO_PHONE_NUMBER",
    "TWILIO_HTTP_TIMEOUT",
    "TWILIO_REGION",
    "TWILIO_EDGE",
    "TWILIO_API_BASE_URL",
)


# --------------------------------------------------------------------------- loading APP


def load_target(spec: str, app_dir: str | None = ".") -> Any:
    """Import ``"module:attribute"`` (like uvicorn's APP argument) and return the attribute.

    ``app_dir`` is put first on ``sys.path`` so modules next to the caller are found.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"expected MODULE:ATTRIBUTE, got {spec!r}")
    if app_dir is not None:
        path = str(Path(app_dir).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"could not import module {module_name!r}: {exc}") from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}") from None
    return target


# --------------------------------------------------------------------------- commands


def _parameters(pairs: Sequence[str] | None) -> dict[str, str]:
    params: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigurationError(f"--param expects NAME=VALUE, got {pair!r}")
        params[name] = value
    return params


_E164 = re.compile(r"\+[1-9][0-9]{1,14}")


def check_e164(number: str) -> str:
    """Return ``number`` if it is E.164 (``+`` and 2-15 digits), else raise ConfigurationError."""
    if not _E164.fullmatch(number):
        raise ConfigurationError(
            "the number must be E.164, like +14155550123 (+, country code, digits)"
        )
    return number


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0 picks a free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _cmd_serve(args: argparse.Namespace) -> int:
    code = _workers(args)
    if code is not None:
        return code
    try:
        target = load_target(args.app, args.app_dir)
        factory = load_target(args.session_factory, args.app_dir) if args.session_factory else None
    except ConfigurationError as exc:
        return _fail(str(exc))
    voice = _as_server(target, factory)
    if voice is None:
        return _fail(f"{args.app} is neither a call handler nor a VoiceServer")
    if args.public_url is not None:
        voice.public_url = args.public_url
    if args.max_calls is not None:
        voice.max_calls = args.max_calls
    if args.drain_timeout is not None:
        voice.drain_timeout = args.drain_timeout
    if args.allow_unrouted:
        voice.allow_unrouted_streams = True
    if args.console or args.phone:
        _announce_console(voice, args)
    try:
        limits = _limits(args)
        if args.trust_proxy is not None:
            voice.trust_forwarded_headers = args.trust_proxy
        serve_forever(
            voice,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            limits=limits,
            log_format=args.log_format,
        )
    except (ConfigurationError, ValueError) as exc:
        return _fail(str(exc))
    return 0


def _as_server(target: Any, factory: Any = None) -> VoiceServer | None:
    """The app's VoiceServer as given (its STT, TTS, options), or one around a handler."""
    if isinstance(target, VoiceServer):
        if factory is not None:
            target.session_factory = factory
        return target
    if callable(target):
        return VoiceServer(on_call=target, session_factory=factory or VoiceSession)
    return None


def _announce_console(voice: VoiceServer, args: argparse.Namespace) -> None:
    """Turn on /console and /phone and print the addresses to open."""
    from voice_runtime.console import install_console
    from voice_runtime.urls import http_base, is_local_host

    console = install_console(voice)
    public = voice.public_url or settings().voice_public_url or settings().voice_stream_url
    port = settings().voice_server_port if args.port is None else args.port
    if public:
        base, local = http_base(public), False
    else:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        local = is_local_host(args.host)
    # The token goes to the operator's terminal only (never to a log): from this machine on
    # a loopback bind no token is needed.
    pages = (["console"] if args.console else []) + (["phone"] if args.phone else [])
    for page in pages:
        what = "call your bot from the browser" if page == "phone" else "live calls"
        print(f"{page}: {console.url(base, page, with_token=not local)}  ({what})", flush=True)


def _workers(args: argparse.Namespace) -> int | None:
    """None to serve here; else run ``--workers`` instances (or refuse): the exit code."""
    current = settings()
    redis_url = args.redis_url or current.voice_redis_url
    if args.redis_url:  # the worker's VoiceServer finds its cluster through the environment
        os.environ["VOICE_REDIS_URL"] = args.redis_url
    if args.instance_url:
        os.environ["VOICE_INSTANCE_URL"] = args.instance_url
    template = args.instance_url or current.voice_instance_url
    # Default: one worker per core with Redis, unless this instance was given one fixed URL.
    per_worker_urls = template is None or "{port}" in template or "{worker}" in template
    workers = args.workers
    if workers is None:
        workers = (os.cpu_count() or 1) if redis_url and per_worker_urls else 1
    if workers < 1:
        return _fail("--workers must be at least 1")
    port = current.voice_server_port if args.port is None else args.port
    if workers == 1:
        if template is not None and per_worker_urls:  # one worker of a template: worker 0
            from voice_runtime.cluster.workers import instance_urls

            os.environ["VOICE_INSTANCE_URL"] = instance_urls(template, args.host, [port])[0]
        return None
    if not redis_url:
        return _fail(
            f"--workers {workers} needs Redis to share calls between workers: set "
            "VOICE_REDIS_URL (or --redis-url), or serve with --workers 1"
        )
    if port == 0:
        return _fail("--workers needs a first port (worker i listens on port + i), not 0")
    from voice_runtime.cluster.workers import run_workers, serve_argv

    try:
        return run_workers(
            serve_argv(args.serve_parser, args),
            workers=workers,
            port=port,
            redis_url=redis_url,
            host=args.host,
            instance_url=template,
            instance_id=current.voice_instance_id,
        )
    except ValueError as exc:
        return _fail(str(exc))


# ``serve`` option -> ConnectionLimits field (the option's value None keeps the default).
_LIMIT_OPTIONS = {
    "header_timeout": "header_timeout_s",
    "body_timeout": "body_timeout_s",
    "max_connections": "max_connections",
    "send_timeout": "send_timeout_s",
    "close_timeout": "close_timeout_s",
    "ws_ping_interval": "ws_ping_interval_s",
    "ws_ping_timeout": "ws_ping_timeout_s",
    "ws_max_frames_per_s": "ws_frames_per_s",
}


def _limits(args: argparse.Namespace) -> ConnectionLimits:
    """The connection limits the ``serve`` options ask for (a ping option of 0 turns it off)."""
    chosen: dict[str, Any] = {}
    for option, field in _LIMIT_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if field.startswith("ws_ping") and value == 0:
            value = None
        chosen[field] = value
    return ConnectionLimits(**chosen)


def _end_when_answered(session: VoiceSession) -> None:
    """Default ``call`` handler: the callee answered, so the test call is done."""
    session.request_disconnect(after_playback=True)


def _cmd_call(args: argparse.Namespace) -> int:
    try:
        check_e164(args.number)
        params = _parameters(args.param)
        cfg = settings()
        public_url = args.public_url or cfg.voice_public_url or cfg.voice_stream_url
        if args.twiml_only:
            from voice_runtime.transports.twilio_call import build_stream_twiml

            if not public_url:
                return _fail("--twiml-only needs --public-url (or VOICE_PUBLIC_URL)")
            print(build_stream_twiml(public_url, parameters=params or None))
            return 0
        voice = _as_server(load_target(args.app, args.app_dir) if args.app else _end_when_answered)
        if voice is None:
            return _fail(f"{args.app} is neither a call handler nor a VoiceServer")
        if args.public_url is not None or voice.public_url is None:
            voice.public_url = public_url
        options: dict[str, Any] = {"parameters": params}
        if args.ring_timeout is not None:
            options["timeout"] = args.ring_timeout
        if args.machine_detection:
            options["machine_detection"] = args.machine_detection
        if args.record:
            options["record"] = True
        if args.time_limit is not None:
            options["time_limit"] = args.time_limit
        port = cfg.voice_server_port if args.port is None else args.port
        with BackgroundVoiceServer(voice, host=args.host, port=port, log_level=args.log_level):
            session = voice.place_call(args.number, **options)
            print(f"call placed: {session.call_sid}")
            try:
                session.wait_for_ws_connect(args.answer_timeout)
            except CallNotAnsweredError:
                _cancel(session.call_sid)
                print("call not answered", file=sys.stderr)
                return 1
            print("call answered")
            if not session.wait_until_disconnected(args.max_duration):
                session.request_disconnect(after_playback=True)
                session.wait_until_disconnected(10.0)
            print("call ended")
        return 0
    except (VoiceRuntimeError, ValueError) as exc:
        return _fail(str(exc))


def _cancel(call_sid: str | None) -> None:
    """End a call still ringing at ``--answer-timeout`` so it does not ring on unattended."""
    if not call_sid:
        return
    from voice_runtime.transports.twilio_control import update_call

    try:
        update_call(call_sid, status="canceled")
    except (VoiceRuntimeError, ValueError) as exc:
        print(f"could not cancel the call: {exc}", file=sys.stderr)


def _cmd_sms(args: argparse.Namespace) -> int:
    from voice_runtime.transport import get_sms_transport

    try:
        check_e164(args.number)
        result = get_sms_transport().send_sms(
            args.number,
            args.text,
            media_urls=args.media_url,
            messaging_service_sid=args.messaging_service_sid,
            status_callback=args.status_callback,
            from_=args.sender,
        )
    except (VoiceRuntimeError, ValueError) as exc:
        return _fail(str(exc))
    print(json.dumps(result))
    return 0


def tunnel_check(url: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Fetch ``{url}/health``; (True, summary) when a voice-runtime server answered it."""
    import httpx

    base = url.strip().rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False, f"{url!r} is not an http(s):// URL"
    health = base + "/health"
    try:
        response = httpx.get(health, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        return False, f"could not reach {health}: {type(exc).__name__}: {exc}"
    try:
        body = response.json()
    except ValueError:
        body = None
    if (
        response.status_code == 200
        and isinstance(body, dict)
        and body.get("status") == "ok"
        and "live_calls" in body
    ):
        note = "" if parts.scheme == "https" else " (plain http: Twilio needs https://)"
        return True, f"OK: {health} reached a voice-runtime server{note}"
    return False, (
        f"{health} answered HTTP {response.status_code} but not as a voice-runtime server "
        "(is the tunnel pointing at the port `voice-runtime serve` listens on?)"
    )


def _cmd_tunnel_check(args: argparse.Namespace) -> int:
    ok, message = tunnel_check(args.url, args.timeout)
    print(message if ok else f"error: {message}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def add_commands(subparsers: Any, env_help: Callable[[Sequence[str]], str]) -> None:
    """Add ``serve``, ``call`` and ``sms`` to the ``voice-runtime`` command."""
    fmt = argparse.RawDescriptionHelpFormatter

    serve = subparsers.add_parser(
        "serve",
        help="serve Twilio calls with a call handler (like uvicorn MODULE:FUNCTION)",
        description="Serve the Twilio voice webhook (POST /twilio/voice), status callbacks, "
        "the media streams (/voice, /voice/{token}), /health and /ready, running APP once "
        "per call. SIGTERM drains: new calls get a busy answer, live calls may finish up to "
        "--drain-timeout, then the process exits 0.",
        epilog=env_help(SERVE_ENV),
        formatter_class=fmt,
    )
    serve.add_argument(
        "app",
        metavar="APP",
        help="MODULE:FUNCTION call handler, run with each call's session (a plain function "
        "runs in a worker thread, a coroutine function on the loop), or MODULE:NAME of a "
        "VoiceServer",
    )
    serve.add_argument("--app-dir", default=".", help="look for MODULE here first (default .)")
    serve.add_argument(
        "--session-factory", metavar="MODULE:NAME", help="make each call's session with this"
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=port_number, help="port (default VOICE_SERVER_PORT, 8080)")
    serve.add_argument(
        "--public-url", help="public base URL Twilio reaches this server at (VOICE_PUBLIC_URL)"
    )
    serve.add_argument("--max-calls", type=int, help="concurrent calls before busy (default 200)")
    serve.add_argument(
        "--drain-timeout", type=float, help="seconds live calls get on shutdown (default 30)"
    )
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run N instances on ports PORT..PORT+N-1 sharing Redis (default: one per core "
        "with VOICE_REDIS_URL, else 1); SIGTERM drains them all",
    )
    serve.add_argument("--redis-url", help="Redis of the cluster (VOICE_REDIS_URL)")
    serve.add_argument(
        "--instance-url",
        metavar="TEMPLATE",
        help="this instance's public base URL (VOICE_INSTANCE_URL); with --workers use {port} "
        "or {worker}, e.g. https://voice.example.com/w{worker}",
    )
    serve.add_argument(
        "--trust-proxy",
        nargs="?",
        const="127.0.0.0/8,::1",
        default=None,
        metavar="NETWORKS",
        help="honour X-Forwarded-Proto/-Host (stream URLs when no public URL is set) from these "
        "comma-separated proxy networks (default with no value: this host)",
    )
    serve.add_argument(
        "--allow-unrouted",
        action="store_true",
        help="serve /voice without a route token even while signatures are enforced (e.g. "
        "for TwiML from call --twiml-only; a captured signature of it can be replayed)",
    )
    serve.add_argument(
        "--console",
        action="store_true",
        help="serve the live call console at /console and print its address (off by default)",
    )
    serve.add_argument(
        "--phone",
        action="store_true",
        help="serve the browser phone at /phone (talk to your bot from the microphone, no "
        "Twilio number needed) and print its address",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="level of every logger: uvicorn's, voice_runtime's and the app's (default info)",
    )
    serve.add_argument(
        "--log-format",
        default="text",
        choices=("text", "json"),
        help="text lines ending in [CallSid/StreamSid], or one JSON object per line",
    )
    limits = serve.add_argument_group("connection limits (see docs/security.md)")
    limits.add_argument(
        "--header-timeout",
        type=float,
        metavar="S",
        help="seconds a request's headers may take to arrive (default 5)",
    )
    limits.add_argument(
        "--body-timeout",
        type=float,
        metavar="S",
        help="seconds a request body may take after its headers (default 10)",
    )
    limits.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections before new ones get 503 (default 2 x max-calls + 64)",
    )
    limits.add_argument(
        "--send-timeout",
        type=float,
        metavar="S",
        help="seconds an HTTP response may make no progress before the connection is aborted "
        "(default 30)",
    )
    limits.add_argument(
        "--close-timeout",
        type=float,
        metavar="S",
        help="seconds a close may take before the connection is aborted (default 5)",
    )
    limits.add_argument(
        "--ws-ping-interval",
        type=float,
        metavar="S",
        help="websocket keepalive ping interval, 0 for none (default 20)",
    )
    limits.add_argument(
        "--ws-ping-timeout",
        type=float,
        metavar="S",
        help="seconds a ping may wait for its pong, 0 for no limit (default 20)",
    )
    limits.add_argument(
        "--ws-max-frames-per-s",
        type=float,
        metavar="N",
        help="websocket frames a second one connection may send on average, bursts of 2000 "
        "allowed, 0 for no limit (default 500)",
    )
    serve.set_defaults(func=_cmd_serve, serve_parser=serve)

    check = subparsers.add_parser(
        "tunnel-check",
        help="check that a public URL (a tunnel's) reaches a running voice-runtime server",
        description="Fetch URL/health through the public URL (the tunnel or proxy Twilio will "
        "use) and say whether a voice-runtime server answered. Exit 0 when it did, 1 if not.",
    )
    check.add_argument("url", help="the public base URL, e.g. https://abc.trycloudflare.com")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    check.set_defaults(func=_cmd_tunnel_check)

    call = subparsers.add_parser(
        "call",
        help="place an outbound call and run a handler on it",
        description="Serve the media stream on --port, place a call to NUMBER whose stream "
        "comes back to --public-url, and run --app (a handler, or a VoiceServer with its own STT "
        "and TTS) with the call's session. Without --app the call is hung up once answered. "
        "Exit status: 0 answered, 1 not answered, 2 error. --twiml-only prints the TwiML.",
        epilog=env_help(CALL_ENV),
        formatter_class=fmt,
    )
    call.add_argument("number", metavar="NUMBER", help="the number to call (E.164)")
    call.add_argument("--app", help="MODULE:FUNCTION call handler or MODULE:NAME VoiceServer")
    call.add_argument("--app-dir", default=".", help="look for MODULE here first (default .)")
    call.add_argument("--public-url", help="public base URL of this server (VOICE_PUBLIC_URL)")
    call.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    call.add_argument("--port", type=port_number, help="port (default VOICE_SERVER_PORT, 8080)")
    call.add_argument(
        "--param", action="append", metavar="NAME=VALUE", help="a <Parameter> of the stream"
    )
    call.add_argument("--ring-timeout", type=int, help="seconds to let it ring")
    call.add_argument(
        "--machine-detection", choices=("Enable", "DetectMessageEnd"), help="answering machine"
    )
    call.add_argument("--record", action="store_true", help="record the call")
    call.add_argument("--time-limit", type=int, help="longest call, seconds")
    call.add_argument(
        "--answer-timeout", type=float, default=60.0, help="give up unanswered after (60 s)"
    )
    call.add_argument(
        "--max-duration", type=float, default=600.0, help="hang up after this long (600 s)"
    )
    call.add_argument("--twiml-only", action="store_true", help="print the TwiML and exit")
    call.add_argument("--log-level", default="warning", help="uvicorn log level")
    call.set_defaults(func=_cmd_call)

    sms = subparsers.add_parser(
        "sms",
        help="send an SMS",
        description="Send TEXT to NUMBER through the Twilio REST API and print the result "
        '({"message_sid", "status", "to"}) as JSON.',
        epilog=env_help(SMS_ENV),
        formatter_class=fmt,
    )
    sms.add_argument("number", metavar="NUMBER", help="recipient (E.164)")
    sms.add_argument("text", metavar="TEXT", help="message body")
    sms.add_argument("--media-url", action="append", help="attach media (MMS); repeatable")
    sms.add_argument("--messaging-service-sid", help="send through this Messaging Service (MG…)")
    sms.add_argument("--status-callback", help="URL for delivery status callbacks")
    sms.add_argument("--from", dest="sender", help="sender number (default TWILIO_PHONE_NUMBER)")
    sms.set_defaults(func=_cmd_sms)
