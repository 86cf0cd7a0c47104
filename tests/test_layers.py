"""The layers of DESIGN.md hold: each arrow is "may import", checked on every import statement
(lazy ones inside functions included, since an import is an import wherever it stands)."""

from __future__ import annotations

import ast
from pathlib import Path

import voice_runtime

PACKAGE = Path(voice_runtime.__file__).parent

SERVER_LAYER = (
    "voice_runtime.server",
    "voice_runtime.serving",
    "voice_runtime.calls",
    "voice_runtime.webhooks",
    "voice_runtime.call_wiring",
    "voice_runtime.call_lifecycle",
    "voice_runtime.single_session",
    "voice_runtime._duck_call",
    "voice_runtime.cluster",
)
# The session and what it is made of: the consumer facade and the transport's port.
SESSION_CORE = (
    "session.py",
    "stream_port.py",
    "playback.py",
    "contracts.py",
    "_marks.py",
    "_queues.py",
    "_session_transport.py",
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif (  # importlib.import_module("voice_runtime.x") with a literal name
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def _offenders(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(n for n in _imports(path) if n.startswith(forbidden))
        if bad:
            found[path.relative_to(PACKAGE).as_posix()] = bad
    return found


def test_the_session_imports_no_transport_provider_realtime_or_server() -> None:
    forbidden = (
        "voice_runtime.transports",
        "voice_runtime.providers",
        "voice_runtime.realtime",
        *SERVER_LAYER,
    )
    assert _offenders([PACKAGE / name for name in SESSION_CORE], forbidden) == {}


# The one exception: twilio_ws resolves the 0.1.x name register_voice_websocket on first
# access (a module __getattr__), because 0.1.x users import it from there; nothing in the
# transport runs server code.
_ZERO_ONE_REEXPORT = {"transports/twilio_ws.py": ["voice_runtime.single_session"]}


def test_transports_import_nothing_from_the_server_layer() -> None:
    paths = sorted((PACKAGE / "transports").rglob("*.py"))
    assert _offenders(paths, SERVER_LAYER) == _ZERO_ONE_REEXPORT


def test_realtime_imports_nothing_from_transports_or_the_server() -> None:
    paths = sorted((PACKAGE / "realtime").rglob("*.py"))
    assert _offenders(paths, ("voice_runtime.transports", *SERVER_LAYER)) == {}
