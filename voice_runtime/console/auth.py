"""Who may open the console and the browser phone.

A request from this machine to a loopback address, with no public URL configured and no proxy
headers, is the operator at their own desk: it needs no token. Anything else (a non-loopback
bind reached from another host, a tunnel, a proxy, a configured public URL) must present the
console token once, as ``?token=`` on a page (which sets an HttpOnly, SameSite=Strict cookie
and redirects the token out of the address bar) or as ``Authorization: Bearer``. Requests that
act (the phone's call API, websockets) must also come from the page's own origin, so another
site open in the same browser cannot use the operator's cookie or the loopback exemption.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from voice_runtime.urls import is_local_host

__all__ = ["COOKIE", "ConsoleAuth"]

COOKIE = "vr_console"
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip")


class ConsoleAuth:
    """Checks a request against the console token and the loopback exemption."""

    def __init__(self, token: str | None, public_url: Callable[[], str | None]) -> None:
        # A blank token would match a blank cookie: refuse to run with one.
        self.token = token if token and token.strip() else secrets.token_urlsafe(18)
        self._public_url = public_url  # read per request: the public URL may be set later

    def is_local(self, conn: HTTPConnection) -> bool:
        """True for the operator's own browser on this machine (no token needed)."""
        if self._public_url():
            return False
        client = conn.client
        if client is None or not is_local_host(client.host):
            return False
        # The Host header too: a tunnel connects from loopback with its public host name, and
        # a DNS-rebinding page reaches loopback under its own name.
        if not is_local_host(conn.url.hostname):
            return False
        return not any(h in conn.headers for h in _PROXY_HEADERS)

    def token_ok(self, presented: str | None) -> bool:
        """Constant-time comparison with the console token."""
        if not presented:
            return False
        return hmac.compare_digest(presented.encode("utf-8", "replace"), self.token.encode())

    def presented(self, conn: HTTPConnection) -> str | None:
        """The token a request carries: its cookie or an Authorization bearer."""
        header = conn.headers.get("authorization", "")
        if header[:7].lower() == "bearer ":
            return header[7:].strip()
        return conn.cookies.get(COOKIE)

    def allowed(self, conn: HTTPConnection) -> bool:
        """Whether the request may read the console or use the phone."""
        return self.is_local(conn) or self.token_ok(self.presented(conn))

    @staticmethod
    def same_origin(conn: HTTPConnection) -> bool:
        """False when a browser says the request comes from another site's page."""
        origin = conn.headers.get("origin")
        if origin is None:
            return True  # not a browser's cross-site request (curl, scripts, same-origin GET)
        return urlsplit(origin).netloc.lower() == conn.headers.get("host", "").lower()
