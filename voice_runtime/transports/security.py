"""X-Twilio-Signature checks for webhooks and media-stream upgrades.

Enforced whenever TWILIO_AUTH_TOKEN is set (unless TWILIO_SKIP_SIGNATURE_VALIDATION is);
without a token the server runs with a loud warning. The signed URL is the public one Twilio
used: the configured public base URL (VOICE_PUBLIC_URL, else VOICE_STREAM_URL) with the
request's path and query string. Without a configured base URL, ``X-Forwarded-Proto`` and
``X-Forwarded-Host`` are honoured only when the proxy in front is declared trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import HTTPConnection

from voice_runtime.config import Settings, settings
from voice_runtime.logutil import log_limited

logger = logging.getLogger(__name__)

__all__ = [
    "SignaturePolicy",
    "check_request_signature",
    "check_websocket_signature",
    "public_url_for",
    "signature_mode",
]

_warned_no_token = False
_warned_skip = False


@dataclass(frozen=True)
class SignaturePolicy:
    """How signatures are checked: the auth token, the public base URL, proxy trust."""

    auth_token: str | None = None
    public_base_url: str | None = None
    trust_forwarded_headers: bool = False
    skip: bool = False

    @classmethod
    def from_settings(
        cls,
        cfg: Settings | None = None,
        *,
        public_base_url: str | None = None,
        trust_forwarded_headers: bool = False,
    ) -> SignaturePolicy:
        """Build the policy from the environment's settings and explicit overrides."""
        cfg = cfg or settings()
        return cls(
            auth_token=cfg.twilio_auth_token,
            public_base_url=public_base_url or cfg.voice_public_url or cfg.voice_stream_url,
            trust_forwarded_headers=trust_forwarded_headers,
            skip=cfg.twilio_skip_signature_validation,
        )

    @property
    def mode(self) -> str:
        """ "enforce", "skip" (explicitly disabled) or "off" (no auth token)."""
        if self.skip:
            return "skip"
        if not self.auth_token:
            return "off"
        return "enforce"


def signature_mode(cfg: Settings | None = None) -> str:
    """Return "enforce", "skip" or "off" for the current environment."""
    return SignaturePolicy.from_settings(cfg).mode


def public_url_for(conn: HTTPConnection, policy: SignaturePolicy, *, websocket: bool) -> str:
    """Rebuild the URL Twilio signed for this request."""
    if policy.public_base_url:
        parts = urlsplit(policy.public_base_url)
        scheme, netloc = parts.scheme, parts.netloc
        prefix = parts.path.rstrip("/")
    else:
        scheme, netloc, prefix = conn.url.scheme, conn.url.netloc, ""
        if policy.trust_forwarded_headers:
            proto = conn.headers.get("x-forwarded-proto", "").split(",")[0].strip()
            host = conn.headers.get("x-forwarded-host", "").split(",")[0].strip()
            scheme = proto or scheme
            netloc = host or netloc
    if websocket:
        scheme = {"https": "wss", "http": "ws"}.get(scheme, scheme)
    else:
        scheme = {"wss": "https", "ws": "http"}.get(scheme, scheme)
    path = conn.url.path
    if prefix and not path.startswith(prefix + "/"):
        path = prefix + path
    return urlunsplit((scheme, netloc, path, conn.url.query, ""))


def _allowed_without_check(policy: SignaturePolicy) -> bool | None:
    global _warned_no_token, _warned_skip
    mode = policy.mode
    if mode == "skip":
        if not _warned_skip:
            _warned_skip = True
            logger.warning("TWILIO_SKIP_SIGNATURE_VALIDATION is set: signatures are NOT checked")
        return True
    if mode == "off":
        if not _warned_no_token:
            _warned_no_token = True
            logger.warning(
                "TWILIO_AUTH_TOKEN is not set: Twilio signatures are NOT checked; "
                "anyone who finds this server can open media streams and post webhooks"
            )
        return True
    return None


def check_websocket_signature(conn: HTTPConnection, policy: SignaturePolicy | None = None) -> bool:
    """Validate a media-stream upgrade's X-Twilio-Signature; True when it may be accepted."""
    policy = policy or SignaturePolicy.from_settings()
    allowed = _allowed_without_check(policy)
    if allowed is not None:
        return allowed
    from twilio.request_validator import RequestValidator

    url = public_url_for(conn, policy, websocket=True)
    signature = conn.headers.get("x-twilio-signature", "")
    ok = bool(signature) and RequestValidator(policy.auth_token).validate(url, {}, signature)
    if not ok:
        log_limited(
            logger, "stream_signature", "media stream refused: bad or missing X-Twilio-Signature"
        )
    return ok


def check_request_signature(
    conn: HTTPConnection, form: Mapping[str, str], policy: SignaturePolicy | None = None
) -> bool:
    """Validate a form-encoded webhook's X-Twilio-Signature; True when it may be served."""
    policy = policy or SignaturePolicy.from_settings()
    allowed = _allowed_without_check(policy)
    if allowed is not None:
        return allowed
    from twilio.request_validator import RequestValidator

    url = public_url_for(conn, policy, websocket=False)
    signature = conn.headers.get("x-twilio-signature", "")
    ok = bool(signature) and RequestValidator(policy.auth_token).validate(
        url, dict(form), signature
    )
    if not ok:
        log_limited(
            logger, "webhook_signature", "webhook refused: bad or missing X-Twilio-Signature"
        )
    return ok
