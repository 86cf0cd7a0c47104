"""Find and run the code blocks of the Markdown docs (used by tests/test_docs_snippets.py).

``python tests/docs_kit.py docs/page.md`` runs one page's ```python blocks the same way and
prints each result, for writing a page (``pytest tests/test_docs_snippets.py -k page`` too).

What running a block means:

- It runs with runpy, ``run_name="__docs__"`` (its ``if __name__ == "__main__":`` part does
  not run), in a temp working directory, with no voice_runtime variable (no credential) in the
  environment, warnings as errors.
- A block that builds a ``VoiceServer`` with an ``on_call`` and does not call it itself gets
  one simulated call: the server is served on a free port, the CallerSimulator dials in,
  waits for the bot to speak, answers out loud (piper speech with the offline extra, else a
  tone), and the bot must end the call.
- It must log no error and no blocked event loop, unless the block quotes that log line
  itself, raise nothing in any thread, and leave no thread running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import runpy
import shlex
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)\s*(?P<info>[^`\s]*)[^`]*$")
# A block that serves and calls its bot itself is not called a second time.
_SELF_CALLING = re.compile(r"CallerSimulator|serve_in_loop|start_in_thread|BackgroundVoiceServer")
COMMAND_LANGS = {"bash", "sh", "shell", "console"}
_SEPARATORS = {"&&", "||", "|", ";", "&"}
# Threads that live as long as the process by design (tqdm's monitor starts with model loads).
_LONG_LIVED = ("tqdm_monitor",)


def doc_files() -> list[Path]:
    """README.md and every docs/*.md, new pages included."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # line number of the first code line (1-based)
    lang: str
    code: str

    @property
    def where(self) -> str:
        """``file:line`` of the block, for test ids and failure messages."""
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path`` (indented ones, e.g. in lists, dedented)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j][indent:] if lines[j][:indent].isspace() else lines[j])
            j += 1
        if j >= len(lines):
            raise ValueError(f"{path.relative_to(ROOT)}:{i + 1}: code block never closed")
        found.append(Block(path, i + 2, opening["info"].lower(), "\n".join(body) + "\n"))
        i = j + 1
    return found


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of ``path``."""
    return [b for b in fenced_blocks(path) if b.lang in ("python", "py")]


def cli_commands(block: Block) -> list[list[str]]:
    """The argument lists of the ``voice-runtime`` commands in a shell block."""
    text = block.code.replace("\\\n", " ")
    commands: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output, not a command
            line = line[2:]
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""  # "12#@3" is an argument; a lone "#" starts a comment
        tokens: list[str] = []
        for token in lexer:
            if token.startswith("#"):
                break
            tokens.append(token)
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in _SEPARATORS:
                segment.append(token)
                continue
            while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
                segment.pop(0)  # VAR=value before the command
            if segment and segment[0] == "voice-runtime":
                commands.append(segment[1:])
            segment = []
    return commands


def without_main(code: str) -> str:
    """``code`` without its ``if __name__ == "__main__":`` part (it does not run here)."""
    kept: list[str] = []
    skipping = False
    for line in code.splitlines():
        if re.match(r"if __name__ == ['\"]__main__['\"]:", line):
            skipping = True
            continue
        if skipping and (not line.strip() or line[0].isspace()):
            continue
        skipping = False
        kept.append(line)
    return "\n".join(kept)


# --------------------------------------------------------------------------- running a block


class _Failures(logging.Handler):
    """ERROR records (a handler that failed, a provider that could not start) and the
    watchdog's warnings (a handler that blocked the event loop)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.name == "voice_runtime.watchdog":
            self.messages.append(record.getMessage())


@functools.cache
def caller_speech() -> bytes:
    """What the simulated caller says: real speech with the offline extra, else a tone."""
    from voice_runtime.audio import silence_ulaw, tone_ulaw

    try:
        from voice_runtime.offline import synthesize_ulaw

        speech = synthesize_ulaw("A table for two.", "piper")
    except ImportError:
        speech = tone_ulaw(300.0, 1000.0, -12.0)
    return speech + silence_ulaw(800)


async def _dial(url: str) -> tuple[float, bool]:
    """One call: hear the greeting, answer, and wait for the bot to end the call."""
    from voice_runtime.testing import CallerSimulator

    sim = CallerSimulator(
        url,
        parameters={"caller_number": "+15550100"},
        silence_when_idle=False,
        playback="instant",  # the bot's audio counts as heard at once: no real-time wait
    )
    async with sim:
        await sim.wait_for_heard(100, timeout=15)
        await sim.wait_idle(0.6, timeout=15)
        if not sim.closed:
            await sim.send_audio(caller_speech(), realtime=False)
        ended = await sim.wait_closed(20)
    return sim.heard_ms, ended


def call_the_bot(voice: Any) -> str | None:
    """Serve ``voice`` on a free port, place one simulated call; what went wrong, if anything."""
    # Audio goes out as fast as it is made (the caller plays it instantly): pacing is the
    # transport's business, and the docs test checks the bot, not the clock.
    voice.stream_options = dataclasses.replace(voice.stream_options, lead_ms=60_000.0)
    with voice.start_in_thread(port=0) as server:
        heard_ms, ended = asyncio.run(_dial(f"ws://127.0.0.1:{server.port}{voice.path}"))
    if heard_ms <= 0:
        return "the bot said nothing to a simulated caller"
    if not ended:
        return "the bot did not end the simulated call within 20 s"
    return None


@contextmanager
def _logging_restored() -> Iterator[None]:
    """Put logging back as it was: a block may configure it (``configure_logging``)."""
    names = ["", "uvicorn", "uvicorn.error", "uvicorn.access", "voice_runtime"]
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    filters = {h: h.filters[:] for lg in loggers for h in lg.handlers}
    try:
        yield
    finally:
        for lg, handlers, level, propagate in saved:
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        for handler, kept in filters.items():
            handler.filters[:] = kept


def run_block(block: Block) -> str | None:
    """Run one python block as the docs test does; None when it passed, else why not."""
    threads_before = set(threading.enumerate())
    failures = _Failures()
    problems: list[str] = []
    with _logging_restored():
        logging.getLogger().addHandler(failures)
        problems += _run(block)
    # A block about failures quotes the line it logs; any other error line is a failure.
    problems += [f"logged: {m}" for m in failures.messages if m not in block.code]
    deadline = time.monotonic() + 2.0
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(max(0.0, deadline - time.monotonic()))
    leaked = [
        t.name
        for t in set(threading.enumerate()) - threads_before
        if t.is_alive() and not t.name.startswith(_LONG_LIVED)
    ]
    if leaked:
        problems.append(f"left threads running: {', '.join(sorted(leaked))}")
    return "; ".join(problems) or None


def _run(block: Block) -> list[str]:
    """Execute the block (and call its bot); the problems found on the way."""
    from voice_runtime import VoiceServer
    from voice_runtime.config import ENV_VARS

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    problems: list[str] = []
    try:
        for var in ENV_VARS:  # no credentials, no public URL: only the fakes are reachable
            os.environ.pop(var.name, None)
        os.environ["HF_HUB_OFFLINE"] = "1"
        with tempfile.TemporaryDirectory() as workdir:
            os.chdir(workdir)
            # Named and padded like the doc, so a traceback points at the doc's own line.
            script = Path(workdir) / block.path.name
            script.write_text("\n" * (block.line - 1) + block.code, encoding="utf-8")
            try:
                namespace = runpy.run_path(str(script), run_name="__docs__")
                if not _SELF_CALLING.search(without_main(block.code)):
                    for value in list(namespace.values()):
                        if isinstance(value, VoiceServer) and value.on_call is not None:
                            problem = call_the_bot(value)
                            if problem:
                                problems.append(problem)
            finally:
                os.chdir(saved_cwd)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    return problems


def main(argv: list[str]) -> int:
    """Run the python blocks of the files named in ``argv`` and print each result."""
    failed = 0
    for name in argv:
        for block in python_blocks(Path(name).resolve()):
            try:
                problem = run_block(block)
            except Exception:
                problem = traceback.format_exc()
            failed += problem is not None
            print(f"{block.where}: {problem or 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
