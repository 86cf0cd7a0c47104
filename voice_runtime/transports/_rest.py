"""Building twilio SDK clients: bounded timeouts, optional base-URL rewrite, quiet logs.

Every Twilio REST client voice_runtime uses is built here, so none can be unbounded: the
SDK's own HTTP clients wait forever by default (a black-holed egress would block a call
path for minutes). When an API base URL is configured (``api_base_url=`` or
TWILIO_API_BASE_URL), requests meant for ``https://api.twilio.com`` or a regional
``https://api.{edge}.{region}.twilio.com`` go to that base instead, and the intended host
travels in the ``X-Voice-Runtime-Api-Host`` header; that is how tests point the real SDK at
:class:`voice_runtime.testing.fake_twilio_rest.FakeTwilioRest`, and how a proxy can be used.

This module imports the twilio SDK (a core dependency); the transports import it lazily.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import twilio.rest
from twilio.base.exceptions import TwilioException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response

from voice_runtime.config import settings
from voice_runtime.transports.twilio_models import (
    DEFAULT_API_HOST,
    TwilioRegion,
    TwilioRestError,
    transport_error,
)

if TYPE_CHECKING:
    from twilio.rest import Client

logger = logging.getLogger(__name__)

API_HOST_HEADER = "X-Voice-Runtime-Api-Host"
"""Header naming the Twilio host a rewritten request was meant for."""

DEFAULT_TIMEOUT_S = 15.0

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_API_HOST = re.compile(rf"api(?:\.{_LABEL}){{0,2}}\.twilio\.com")

# ClientBase falls back to os.environ when given an empty/None mapping; a non-empty mapping
# without values keeps the SDK from reading TWILIO_* variables behind config.py's back.
_NO_AMBIENT_ENV: Mapping[str, str] = {"TWILIO_EDGE": "", "TWILIO_REGION": ""}


def resolve_timeout(timeout: float | None = None) -> float:
    """Return a finite positive timeout: ``timeout``, else TWILIO_HTTP_TIMEOUT (default 15)."""
    if timeout is None:
        timeout = settings().twilio_http_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"Twilio HTTP timeout must be a number, got {type(timeout).__name__}")
    value = float(timeout)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"Twilio HTTP timeout must be a finite positive number, got {timeout!r}")
    return value


def normalize_base_url(api_base_url: str) -> str:
    """Validate an API base URL override (http or https, a host, no query) and strip '/'."""
    if not isinstance(api_base_url, str):
        raise ValueError("api_base_url must be a string")
    parts = urlsplit(api_base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("api_base_url must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("api_base_url must not carry credentials, a query or a fragment")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def resolve_base_url(api_base_url: str | None = None) -> str | None:
    """Return the normalised override: ``api_base_url``, else TWILIO_API_BASE_URL, else None."""
    if api_base_url is None:
        api_base_url = settings().twilio_api_base_url
    if api_base_url is None or not api_base_url.strip():
        return None
    return normalize_base_url(api_base_url)


def rewrite_url(url: str, api_base_url: str | None) -> tuple[str, str | None]:
    """Map a Twilio API URL onto ``api_base_url``; return (url to use, intended host or None)."""
    if api_base_url is None:
        return url, None
    parts = urlsplit(url)
    host = parts.netloc
    if parts.scheme != "https" or not _API_HOST.fullmatch(host):
        return url, None
    query = f"?{parts.query}" if parts.query else ""
    return f"{api_base_url}{parts.path}{query}", host


def api_host_for(region: str | None, edge: str | None) -> str:
    """The API host the SDK would use for ``region``/``edge`` (us1 when only an edge is set)."""
    if not region and not edge:
        return DEFAULT_API_HOST
    labels = [label for label in ("api", edge, region or "us1", "twilio", "com") if label]
    return ".".join(labels)


def _log_target(url: str) -> dict[str, str]:
    # The path holds only SIDs; the query (To=...) may hold phone numbers, so it is dropped.
    return {"path": urlsplit(url).path}


class _QuietLogging:
    """The SDK clients' request/response logging, minus query values and bodies."""

    def log_request(self, kwargs: dict[str, Any]) -> None:
        """Log the method and path only (the SDK's version logs query values)."""
        logger.debug(
            "Twilio REST request",
            extra={"method": kwargs.get("method"), **_log_target(kwargs["url"])},
        )

    def log_response(self, status_code: int, response: Any) -> None:
        """Log the status only."""
        logger.debug("Twilio REST response", extra={"status": status_code})


class RestHttpClient(_QuietLogging, TwilioHttpClient):
    """The SDK's sync HTTP client with a bounded timeout, URL rewrite and leak-free logs.

    Every request reaches ``requests.Session.send`` with ``timeout=`` (this client's
    timeout unless the SDK passes one) and ``allow_redirects=False``, so tools that intercept
    ``requests`` (``responses``, ``requests-mock``) see both.
    """

    def __init__(self, *, timeout: float, api_base_url: str | None = None) -> None:
        super().__init__(timeout=resolve_timeout(timeout), logger=logger)
        self.api_base_url = None if api_base_url is None else normalize_base_url(api_base_url)

    def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        target, host = rewrite_url(url, self.api_base_url)
        if host is not None:
            headers = {**(headers or {}), API_HOST_HEADER: host}
        # A redirect would resend the Basic credentials to wherever it points: never follow.
        return super().request(
            method,
            target,
            params=params,
            data=data,
            headers=headers,
            auth=auth,
            timeout=self.timeout if timeout is None else resolve_timeout(timeout),
            allow_redirects=False,
        )

    def close(self) -> None:
        """Close the pooled connections."""
        if self.session is not None:
            self.session.close()


def _form_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pairs(values: Mapping[str, object] | None) -> list[tuple[str, str]] | None:
    """Flatten a mapping whose values may be lists into repeated (key, value) pairs."""
    if values is None:
        return None
    pairs: list[tuple[str, str]] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            pairs.extend((key, _form_value(item)) for item in value if item is not None)
        else:
            pairs.append((key, _form_value(value)))
    return pairs


class AsyncRestHttpClient(_QuietLogging, AsyncTwilioHttpClient):
    """The SDK's async HTTP client with a bounded timeout, URL rewrite and leak-free logs.

    The aiohttp session is opened on first use, inside the running loop; close it with
    ``await client.close()`` (the helpers in this module do).
    """

    def __init__(self, *, timeout: float, api_base_url: str | None = None) -> None:
        # pool_connections=False: the SDK would open an aiohttp session here, outside a loop.
        super().__init__(pool_connections=False, timeout=resolve_timeout(timeout), logger=logger)
        self.api_base_url = None if api_base_url is None else normalize_base_url(api_base_url)
        self._session: Any = None

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the SDK's signature
        allow_redirects: bool = False,
    ) -> Response:
        import aiohttp

        # The SDK's async client ignores its own timeout when none is passed per request.
        limit = self.timeout if timeout is None else resolve_timeout(timeout)
        target, host = rewrite_url(url, self.api_base_url)
        headers = dict(headers or {})
        if host is not None:
            headers[API_HOST_HEADER] = host
        if auth is not None:
            # aiohttp 3.14 deprecates BasicAuth objects; the header is the portable form.
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        body: dict[str, Any] = {}
        content_type = headers.get("Content-Type", "")
        if data is not None:
            if content_type.endswith("json"):
                body["json"] = data
            else:
                body["data"] = _pairs(data)
        self.log_request({"method": method.upper(), "url": target})
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        async with self._session.request(
            method.upper(),
            target,
            params=_pairs(params),
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=limit),
            allow_redirects=False,
            **body,
        ) as response:
            text = await response.text()
            self.log_response(response.status, response)
            return Response(response.status, text, response.headers)

    async def close(self) -> None:
        """Close the aiohttp session, if one was opened."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()


def _check_credential(value: object, name: str) -> str:
    # The message never holds the value: it is a secret.
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-blank string")
    if any(ord(char) > 0xFF for char in value):
        # requests would raise a UnicodeEncodeError whose repr holds the whole secret.
        raise ValueError(f"{name} must hold only Latin-1 characters")
    return value


def _client(
    username: str,
    password: str,
    http_client: RestHttpClient | AsyncRestHttpClient,
    *,
    account_sid: str | None,
    region: str | None,
    edge: str | None,
    client_class: Callable[..., Client] | None = None,
) -> Client:
    # Looked up at call time, so ``patch("twilio.rest.Client")`` replaces it.
    cls = client_class if client_class is not None else twilio.rest.Client
    return cls(
        _check_credential(username, "account_sid"),
        _check_credential(password, "auth_token"),
        account_sid=account_sid,
        region=region or None,
        edge=edge or None,
        http_client=http_client,
        environment=dict(_NO_AMBIENT_ENV),
    )


def _ambient_routing(region: str | None, edge: str | None) -> tuple[str | None, str | None]:
    # TWILIO_REGION / TWILIO_EDGE: used when config.py knows them (the SDK read them in 0.1.x).
    if region is None and edge is None:
        current = settings()
        region = getattr(current, "twilio_region", None)
        edge = getattr(current, "twilio_edge", None)
    return region, edge


def build_client(
    account_sid: str,
    auth_token: str,
    *,
    api_base_url: str | None = None,
    timeout: float | None = None,
    region: str | None = None,
    edge: str | None = None,
    client_class: Callable[..., Client] | None = None,
) -> Client:
    """Return a sync ``twilio.rest.Client`` with a bounded timeout and the configured base URL.

    ``client_class`` replaces ``twilio.rest.Client`` (a test's stand-in). Close the client
    with :func:`close_client` when done (it pools connections).
    """
    region, edge = _ambient_routing(region, edge)
    http_client = RestHttpClient(
        timeout=resolve_timeout(timeout), api_base_url=resolve_base_url(api_base_url)
    )
    return _client(
        account_sid,
        auth_token,
        http_client,
        account_sid=None,
        region=region,
        edge=edge,
        client_class=client_class,
    )


def build_async_client(
    account_sid: str,
    auth_token: str,
    *,
    api_base_url: str | None = None,
    timeout: float | None = None,
    region: str | None = None,
    edge: str | None = None,
) -> Client:
    """Return a ``twilio.rest.Client`` for the SDK's ``*_async`` methods (same options).

    Close it with ``await aclose_client(client)`` when done.
    """
    region, edge = _ambient_routing(region, edge)
    http_client = AsyncRestHttpClient(
        timeout=resolve_timeout(timeout), api_base_url=resolve_base_url(api_base_url)
    )
    return _client(account_sid, auth_token, http_client, account_sid=None, region=region, edge=edge)


def build_region_client(
    region: TwilioRegion,
    *,
    api_base_url: str | None = None,
    timeout: float | None = None,
    use_async: bool = False,
    client_class: Callable[..., Client] | None = None,
) -> Client:
    """Return a client bound to one explicit :class:`TwilioRegion` (host, account, auth)."""
    region = TwilioRegion.model_validate(region)
    http_client: RestHttpClient | AsyncRestHttpClient
    cls = AsyncRestHttpClient if use_async else RestHttpClient
    http_client = cls(timeout=resolve_timeout(timeout), api_base_url=resolve_base_url(api_base_url))
    return _client(
        region.auth[0],
        region.auth[1],
        http_client,
        account_sid=region.account_sid,
        region=region.region,
        edge=region.edge,
        client_class=client_class,
    )


def client_api_host(client: Client) -> str:
    """The API host a client sends requests to (after its region/edge settings).

    A stand-in client (a mock) that cannot say is taken to use ``api.twilio.com``.
    """
    try:
        url = client.get_hostname(client.api.base_url)
    except Exception:  # noqa: BLE001 - a stand-in client; the host only labels logs/errors
        return DEFAULT_API_HOST
    host = urlsplit(url).hostname if isinstance(url, str) else None
    return host or DEFAULT_API_HOST


def close_client(client: Client) -> None:
    """Release a sync client's pooled connections (only those of our own HTTP client)."""
    http_client = getattr(client, "http_client", None)
    if isinstance(http_client, RestHttpClient):
        http_client.close()


async def aclose_client(client: Client) -> None:
    """Release an async client's aiohttp session (only that of our own HTTP client)."""
    http_client = getattr(client, "http_client", None)
    if isinstance(http_client, AsyncRestHttpClient):
        await http_client.close()


def _is_transport_error(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    try:
        import requests

        if isinstance(exc, requests.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests comes with twilio
        pass
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with twilio
        pass
    return False


def as_rest_error(exc: BaseException) -> TwilioRestError | None:
    """Return the TwilioRestError describing ``exc``, or None when it is not a REST failure."""
    if isinstance(exc, TwilioRestError):
        return exc
    if isinstance(exc, TwilioException) and hasattr(exc, "status"):
        return TwilioRestError.from_exception(exc)
    if _is_transport_error(exc):
        return transport_error(exc)
    return None


@contextlib.contextmanager
def rest_errors() -> Iterator[None]:
    """Re-raise SDK and transport failures as :class:`TwilioRestError` (cause kept)."""
    try:
        yield
    except Exception as exc:
        error = as_rest_error(exc)
        if error is None or error is exc:
            raise
        raise error from exc


@contextlib.contextmanager
def sync_client(client: Client | None, build: Callable[[], Client]) -> Iterator[Client]:
    """Yield ``client`` as is, or a client from ``build()`` that is closed afterwards."""
    if client is not None:
        yield client
        return
    built = build()
    try:
        yield built
    finally:
        close_client(built)


@contextlib.asynccontextmanager
async def async_client(client: Client | None, build: Callable[[], Client]) -> AsyncIterator[Client]:
    """Yield ``client`` as is, or an async client from ``build()`` closed afterwards."""
    if client is not None:
        yield client
        return
    built = build()
    try:
        yield built
    finally:
        await aclose_client(built)


__all__ = [
    "API_HOST_HEADER",
    "DEFAULT_TIMEOUT_S",
    "AsyncRestHttpClient",
    "RestHttpClient",
    "aclose_client",
    "api_host_for",
    "as_rest_error",
    "async_client",
    "build_async_client",
    "build_client",
    "build_region_client",
    "client_api_host",
    "close_client",
    "normalize_base_url",
    "resolve_base_url",
    "resolve_timeout",
    "rest_errors",
    "rewrite_url",
    "sync_client",
]
