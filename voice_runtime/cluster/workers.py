"""``voice-runtime serve --workers N``: N instances on one host, one port each, one Redis.

The supervisor starts N ``voice-runtime serve`` processes (worker ``i`` on ``port + i``,
instance id ``{id}-{i}``, instance URL from a template with ``{port}``/``{worker}``), forwards
SIGTERM/SIGINT to all of them (each drains its calls) and exits when they have, with the worst
exit code. Routed streams and callbacks reach their owner through its own port (see
docs/scaling.md for the reverse proxy in front).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

logger = logging.getLogger(__name__)

__all__ = ["instance_urls", "run_workers", "serve_argv"]

# Options the supervisor sets per worker itself.
_OWN = frozenset({"help", "workers", "port", "host", "redis_url", "instance_url"})


def serve_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The ``serve`` options of ``args`` as a command line, without --workers/--port."""
    out: list[str] = []
    for action in parser._actions:
        dest = action.dest
        if not action.option_strings or dest in _OWN:
            continue
        value = getattr(args, dest, None)
        if value is None or value is False or value == action.default:
            continue
        flag = action.option_strings[-1]
        out += [flag] if value is True else [flag, str(value)]
    return [args.app, *out]


def instance_urls(template: str | None, host: str, ports: Sequence[int]) -> list[str]:
    """Each worker's public base URL: ``template`` with {port}/{worker}, else http://host:port."""
    if template is None:
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return [f"http://{shown}:{port}" for port in ports]
    if len(ports) > 1 and "{port}" not in template and "{worker}" not in template:
        raise ValueError(
            "with --workers every worker needs its own URL: put {port} or {worker} in "
            "VOICE_INSTANCE_URL (or --instance-url), e.g. https://voice.example.com/w{worker}"
        )
    return [
        template.replace("{port}", str(p)).replace("{worker}", str(i)) for i, p in enumerate(ports)
    ]


def _die_with_parent() -> None:
    """In a worker, before exec: SIGTERM (a drain) when the supervisor dies, even by SIGKILL.

    Orphaned workers would keep their ports and calls with nobody to stop them. Linux only
    (prctl PR_SET_PDEATHSIG); elsewhere a worker outlives a killed supervisor.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def run_workers(
    argv: Sequence[str],
    *,
    workers: int,
    port: int,
    redis_url: str,
    host: str,
    instance_url: str | None,
    instance_id: str | None,
) -> int:
    """Run ``workers`` ``serve`` processes until SIGTERM/SIGINT; the worst exit code."""
    ports = [port + i for i in range(workers)]
    urls = instance_urls(instance_url, host, ports)
    base_id = instance_id or f"{socket.gethostname().split('.')[0][:40]}-{port}"
    procs: list[subprocess.Popen[bytes]] = []
    for i, (worker_port, url) in enumerate(zip(ports, urls, strict=True)):
        env = dict(os.environ)
        env.update({
            "VOICE_REDIS_URL": redis_url,
            "VOICE_INSTANCE_ID": f"{base_id}-{i}",
            "VOICE_INSTANCE_URL": url,
        })  # fmt: skip
        cmd = [sys.executable, "-m", "voice_runtime.cli", "serve", *argv,
               "--workers", "1", "--port", str(worker_port), "--host", host]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
    logger.info("workers started", extra={"workers": workers, "first_port": port})
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        # The first signal drains every worker; a second one stops them at once.
        sig = signal.SIGKILL if stopping else signal.SIGTERM
        stopping = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    reported: set[int] = set()
    try:
        while any(p.poll() is None for p in procs):
            for i, proc in enumerate(procs):
                if proc.returncode not in (None, 0) and not stopping and i not in reported:
                    reported.add(i)
                    logger.error("a worker exited", extra={"worker": i, "code": proc.returncode})
            time.sleep(0.2)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return max(abs(p.returncode or 0) for p in procs)
