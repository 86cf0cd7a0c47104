"""X-Twilio-Signature checks for webhooks and media-stream upgrades, and proxy trust.

Enforced whenever TWILIO_AUTH_TOKEN is set (unless TWILIO_SKIP_SIGNATURE_VALIDATION is);
without a token the server runs with a loud warning. The signed URL is the public one Twilio
used, taken from configuration only: the configured public base URL (``public_url=``, else
VOICE_PUBLIC_URL, else VOICE_STREAM_URL) with the request's path and query string. With
signatures enforced and no public base URL, every webhook and upgrade is refused: the URL is
never rebuilt from the request's ``Host`` or ``X-Forwarded-*`` headers, which the sender
chooses.

``X-Forwarded-Proto`` and ``X-Forwarded-Host`` are honoured only from trusted proxy networks
(``trust_forwarded_headers``), and only where no public URL is configured: for the stream URL
in TwiML answers when signatures are off.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import HTTPConnection

from voice_runtime.config import Settings, settings
from voice_runtime.errors import ConfigurationError
from voice_runtime.logutil import LogLimiter
from voice_runtime.urls import http_scheme, ws_scheme

logger = logging.getLogger(__name__)

__all__ = [
    "LOOPBACK_NETWORKS",
    "IPNetwork",
    "SignaturePolicy",
    "TrustedProxies",
    "check_public_url",
    "check_request_signature",
    "check_websocket_signature",
    "public_url_for",
    "refusal_before_body",
    "request_base_url",
    "require_public_url",
    "signature_mode",
    "trusted_networks",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TrustedProxies = bool | str | Iterable[str | IPNetwork] | None
"""What ``trust_forwarded_headers`` accepts: networks, a comma-separated string, or a bool."""

LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
"""What ``trust_forwarded_headers=True`` means: a proxy on this host (uvicorn's own default)."""

NO_PUBLIC_URL = (
    "Twilio signatures are enforced (TWILIO_AUTH_TOKEN is set) but no public URL is "
    "configured: set VOICE_PUBLIC_URL (or VoiceServer(public_url=...)) to the https URL "
    "Twilio reaches this server at; the signed URL is never rebuilt from request headers"
)

_warned_no_token = False
_warned_skip = False
_refusals = LogLimiter()


def trusted_networks(value: TrustedProxies) -> tuple[IPNetwork, ...]:
    """Normalise a ``trust_forwarded_headers`` value to a tuple of IP networks.

    ``False``/``None``/empty: trust no proxy. ``True``: loopback only (the 0.1.x meaning of
    "behind a proxy" was a proxy on the same host). A string is a comma-separated list.
    Raises ConfigurationError for anything that is not a network or address.
    """
    if value is None or value is False:
        return ()
    if value is True:
        return LOOPBACK_NETWORKS
    items: Iterable[str | IPNetwork] = value.split(",") if isinstance(value, str) else value
    networks: list[IPNetwork] = []
    for item in items:
        if isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(item)
            continue
        if not isinstance(item, str):
            raise ConfigurationError(
                "trust_forwarded_headers takes IP networks (e.g. '10.0.0.0/8'), not "
                f"{type(item).__name__}"
            )
        if not item.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigurationError(
                f"trust_forwarded_headers: {item.strip()!r} is not an IP network"
            ) from None
    return tuple(networks)


@dataclass(frozen=True)
class SignaturePolicy:
    """How signatures are checked: the auth token, the public base URL, proxy trust."""

    auth_token: str | None = None
    public_base_url: str | None = None
    trust_forwarded_headers: TrustedProxies = False
    skip: bool = False
    # More base URLs Twilio may sign for this server (a cluster instance's own URL).
    other_base_urls: tuple[str, ...] = ()
    trusted_proxies: tuple[IPNetwork, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "trusted_proxies", trusted_networks(self.trust_forwarded_headers))

    @classmethod
    def from_settings(
        cls,
        cfg: Settings | None = None,
        *,
        public_base_url: str | None = None,
        trust_forwarded_headers: TrustedProxies = False,
        other_base_urls: tuple[str, ...] = (),
    ) -> SignaturePolicy:
        """Build the policy from the environment's settings and explicit overrides."""
        cfg = cfg or settings()
        base = public_base_url or cfg.voice_public_url or cfg.voice_stream_url
        return cls(
            auth_token=cfg.twilio_auth_token,
            public_base_url=base or (other_base_urls[0] if other_base_urls else None),
            trust_forwarded_headers=trust_forwarded_headers,
            skip=cfg.twilio_skip_signature_validation,
            other_base_urls=other_base_urls,
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


def check_public_url(url: str) -> str:
    """Return ``url`` if it is an http(s)/ws(s) base URL with a host and no query or fragment.

    Raises ConfigurationError otherwise (Twilio signs the exact URL, so a typo here would
    refuse every webhook).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise ConfigurationError(f"public URL {url!r} must be an https:// (or http://) URL")
    if parts.query or parts.fragment:
        raise ConfigurationError(f"public URL {url!r} must not carry a query or fragment")
    return url


def require_public_url(policy: SignaturePolicy) -> None:
    """Raise ConfigurationError when the public URL is malformed, or missing while
    signatures are enforced."""
    if policy.public_base_url:
        check_public_url(policy.public_base_url)
    elif policy.mode == "enforce":
        raise ConfigurationError(NO_PUBLIC_URL)


def _peer_is_trusted(conn: HTTPConnection, policy: SignaturePolicy) -> bool:
    if not policy.trusted_proxies or conn.client is None:
        return False
    try:
        peer = ipaddress.ip_address(conn.client.host)
    except ValueError:
        return False
    return any(peer in network for network in policy.trusted_proxies)


def request_base_url(conn: HTTPConnection, policy: SignaturePolicy) -> str:
    """``scheme://host`` as the request saw it; ``X-Forwarded-*`` only from trusted proxies.

    For building URLs when no public URL is configured; never for signature checks.
    """
    scheme, netloc = conn.url.scheme, conn.url.netloc
    if _peer_is_trusted(conn, policy):
        proto = conn.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        host = conn.headers.get("x-forwarded-host", "").split(",")[0].strip()
        if proto in ("http", "https", "ws", "wss"):
            scheme = proto
        if host and all(c not in host for c in "/?#@\\ "):
            netloc = host
    return f"{scheme}://{netloc}"


def public_url_for(conn: HTTPConnection, policy: SignaturePolicy, *, websocket: bool) -> str:
    """The URL Twilio signed for this request: the configured public base, path and query.

    Without a configured base (signatures not enforced), the request's own base URL.
    """
    base = policy.public_base_url or request_base_url(conn, policy)
    parts = urlsplit(base)
    scheme, netloc, prefix = parts.scheme, parts.netloc, parts.path.rstrip("/")
    scheme = ws_scheme(scheme) if websocket else http_scheme(scheme)
    path = conn.url.path
    if prefix and not path.startswith(prefix + "/"):
        path = prefix + path
    return urlunsplit((scheme, netloc, path, conn.url.query, ""))


def _signed_urls(conn: HTTPConnection, policy: SignaturePolicy, *, websocket: bool) -> list[str]:
    """Every URL Twilio may have signed for this request (public URL first)."""
    urls = [public_url_for(conn, policy, websocket=websocket)]
    for base in policy.other_base_urls:
        other = replace(policy, public_base_url=base, other_base_urls=())
        urls.append(public_url_for(conn, other, websocket=websocket))
    return urls


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


def _refuse(kind: str, message: str) -> bool:
    if _refusals.allow(kind):
        logger.warning(message, extra={"refused": _refusals.count(kind)})
    return False


def refusal_before_body(conn: HTTPConnection, policy: SignaturePolicy) -> str | None:
    """Why a webhook is refused before its body is read, or None when it may be read.

    With signatures enforced: "no_public_url" when no public URL is configured,
    "no_signature" when the request carries no ``X-Twilio-Signature``.
    """
    if policy.mode != "enforce":
        return None
    if not policy.public_base_url:
        _refuse("no_public_url", NO_PUBLIC_URL)
        return "no_public_url"
    if not conn.headers.get("x-twilio-signature", "").strip():
        _refuse("webhook_signature", "webhook refused: bad or missing X-Twilio-Signature")
        return "no_signature"
    return None


def check_websocket_signature(conn: HTTPConnection, policy: SignaturePolicy | None = None) -> bool:
    """Validate a media-stream upgrade's X-Twilio-Signature; True when it may be accepted."""
    policy = policy or SignaturePolicy.from_settings()
    allowed = _allowed_without_check(policy)
    if allowed is not None:
        return allowed
    if not policy.public_base_url:
        return _refuse("no_public_url", NO_PUBLIC_URL)
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(policy.auth_token)
    signature = conn.headers.get("x-twilio-signature", "")
    ok = bool(signature) and any(
        validator.validate(url, {}, signature) for url in _signed_urls(conn, policy, websocket=True)
    )
    if not ok:
        return _refuse(
            "stream_signature", "media stream refused: bad or missing X-Twilio-Signature"
        )
    return True


def check_request_signature(
    conn: HTTPConnection, form: Mapping[str, str], policy: SignaturePolicy | None = None
) -> bool:
    """Validate a form-encoded webhook's X-Twilio-Signature; True when it may be served."""
    policy = policy or SignaturePolicy.from_settings()
    allowed = _allowed_without_check(policy)
    if allowed is not None:
        return allowed
    if not policy.public_base_url:
        return _refuse("no_public_url", NO_PUBLIC_URL)
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(policy.auth_token)
    signature = conn.headers.get("x-twilio-signature", "")
    # A multi-dict (``getlist``) keeps repeated fields, which Twilio signs one by one.
    params = form if hasattr(form, "getlist") else dict(form)
    ok = bool(signature) and any(
        validator.validate(url, params, signature)
        for url in _signed_urls(conn, policy, websocket=False)
    )
    if not ok:
        return _refuse("webhook_signature", "webhook refused: bad or missing X-Twilio-Signature")
    return True
