"""The live call console (``/console``) and the browser phone (``/phone``).

Both are off by default; ``VoiceServer(console=True)`` (or ``voice-runtime serve --console`` /
``--phone``) turns them on. The pages are static HTML, CSS and JavaScript shipped in this
package: no CDN, no build step. See ``docs/console-and-phone.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from voice_runtime.console.routes import WebConsole

if TYPE_CHECKING:
    from voice_runtime.server import VoiceServer

__all__ = ["WebConsole", "install_console"]


def install_console(server: VoiceServer, *, token: str | None = None) -> WebConsole:
    """Serve the console and the browser phone on ``server``'s app; return the console."""
    existing = getattr(server, "console", None)
    if isinstance(existing, WebConsole):
        return existing
    console = WebConsole(server, token=token)
    console.install(server.app)
    server.console = console
    return console
