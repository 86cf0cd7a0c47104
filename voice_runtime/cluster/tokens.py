"""Signed route tokens: a stream's token names the instance that owns it.

A token is ``{instance}.{expires}.{nonce}.{call_sid}.{signature}``: the signature is an
HMAC-SHA256 (cluster secret) over everything before it, so any instance can issue a token
for another (a hand-off) and only the instance it names accepts it. Checking needs no
network: the media path never waits on Redis. Pure code, no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time

__all__ = ["RouteSigner", "TokenCheck"]

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class TokenCheck:
    """Why a token was refused (``reason``), or None and the call SID it was issued for."""

    __slots__ = ("call_sid", "nonce", "reason")

    def __init__(self, reason: str | None, call_sid: str | None = None, nonce: str = "") -> None:
        self.reason = reason
        self.call_sid = call_sid
        self.nonce = nonce


def valid_instance_id(value: str) -> bool:
    """Whether ``value`` can name an instance (letters, digits, ``-``, ``_``; 1-64)."""
    return bool(_ID.fullmatch(value))


class RouteSigner:
    """Issues and checks the route tokens of one instance (thread-safe)."""

    def __init__(self, secret: bytes, instance_id: str) -> None:
        if not valid_instance_id(instance_id):
            raise ValueError("an instance id is 1-64 letters, digits, '-' or '_'")
        self._key = secret
        self.instance_id = instance_id
        self._used: dict[str, float] = {}
        self._prune_at = 10_000
        self._lock = threading.Lock()

    def _sign(self, body: str) -> str:
        mac = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode("ascii")

    def digest(self, value: str) -> str:
        """A keyed hash of ``value`` (a phone number is never written to Redis in clear)."""
        return hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, ttl_s: float, *, instance_id: str | None = None, call_sid: str = "") -> str:
        """A token for a stream to ``instance_id`` (default this one), valid ``ttl_s``."""
        owner = instance_id or self.instance_id
        expires = int(time.time() + ttl_s) + 1
        body = f"{owner}.{expires:x}.{secrets.token_urlsafe(12)}.{call_sid}"
        return f"{body}.{self._sign(body)}"

    def check(self, token: str) -> TokenCheck:
        """Verify ``token`` for this instance; mark it used (a token serves one stream)."""
        parts = token.split(".")
        if len(parts) != 5 or not token.isascii():
            return TokenCheck("forged")
        owner, expires, nonce, call_sid, signature = parts
        body = token.rsplit(".", 1)[0]
        if not hmac.compare_digest(self._sign(body), signature):
            return TokenCheck("forged")
        if owner != self.instance_id:
            return TokenCheck("foreign")
        now = time.time()
        try:
            expired = int(expires, 16) < now
        except ValueError:
            return TokenCheck("forged")
        if expired:
            return TokenCheck("expired")
        with self._lock:
            if len(self._used) > self._prune_at:  # forget tokens that expired since
                self._used = {n: e for n, e in self._used.items() if e >= now}
                # Amortised: the next sweep waits until the table has doubled.
                self._prune_at = max(10_000, 2 * len(self._used))
            if nonce in self._used:
                return TokenCheck("used")
            self._used[nonce] = int(expires, 16)
        return TokenCheck(None, call_sid or None, nonce)
