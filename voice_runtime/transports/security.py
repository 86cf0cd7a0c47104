"""X-Twilio-Signature checks for webhooks and media-stream upgrades.

Enforced whenever TWILIO_AUTH_TOKEN is set (unless TWILIO_SKIP_SIGNATURE_VALIDATION is);
without a token the server runs with a loud warning. The URL that is signed is the public
one Twilio used: VOICE_PUBLIC_URL (or VOICE_STREAM_URL) plus the request's path and query.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import HTTPConnection

from voice_runtime.config import Settings, settings

logger = logging.getLogger(__name__)

_warned_no_token = False

__all__ = ["check_websocket_signature", "public_url_for", "signature_mode"]


def signature_mode(cfg: Settings | None = None) -> str:
    """Return "enforce", "skip" (explicitly disabled) or "off" (no auth token)."""
    cfg = cfg or settings()
    if cfg.twilio_skip_signature_validation:
        return "skip"
    if not cfg.twilio_auth_token:
        return "off"
    return "enforce"


def public_url_for(conn: HTTPConnection, cfg: Settings, *, websocket: bool) -> str:
    """Rebuild the URL Twilio signed for this request."""
    base = cfg.voice_public_url or cfg.voice_stream_url
    if base:
        parts = urlsplit(base)
        scheme = parts.scheme
        netloc = parts.netloc
    else:
        scheme = conn.url.scheme
        netloc = conn.url.netloc
    if websocket:
        scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    else:
        scheme = {"wss": "https", "ws": "http"}.get(scheme, scheme)
    return urlunsplit((scheme, netloc, conn.url.path, conn.url.query, ""))


def check_websocket_signature(conn: HTTPConnection, cfg: Settings | None = None) -> bool:
    """Validate the upgrade request's X-Twilio-Signature; True when it may be accepted."""
    global _warned_no_token
    cfg = cfg or settings()
    mode = signature_mode(cfg)
    if mode == "skip":
        return True
    if mode == "off":
        if not _warned_no_token:
            _warned_no_token = True
            logger.warning(
                "TWILIO_AUTH_TOKEN is not set: Twilio signatures are NOT checked; "
                "anyone who finds this server can open media streams"
            )
        return True
    from twilio.request_validator import RequestValidator

    url = public_url_for(conn, cfg, websocket=True)
    signature = conn.headers.get("x-twilio-signature", "")
    ok = bool(signature) and RequestValidator(cfg.twilio_auth_token).validate(url, {}, signature)
    if not ok:
        logger.warning("media stream refused: bad or missing X-Twilio-Signature")
    return ok
