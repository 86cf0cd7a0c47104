"""Listing Twilio calls: validated paging over ``calls.page`` / ``calls.get_page``.

The paging state machine (:class:`_CallListing`) does no I/O; :func:`list_calls` and its
async twin feed it the SDK's pages and validate every page's raw JSON. Clients come from
``twilio_call.build_explicit_twilio_client`` / ``build_twilio_client``, looked up at call
time (the patch points). Re-exported by :mod:`voice_runtime.transports.twilio_call`.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
import warnings
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

from voice_runtime.config import settings
from voice_runtime.transports.twilio_control import _clients
from voice_runtime.transports.twilio_models import (
    TwilioCallListIncompleteError,
    TwilioCallRow,
    TwilioRegion,
    TwilioRestError,
    parse_call_page,
    validate_sid,
)

if TYPE_CHECKING:
    from twilio.rest import Client

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CALLS_API_VERSION = "2010-04-01"

__all__ = ["list_calls", "list_calls_async", "list_recent_calls"]


def _validate_list_query(
    to: object, start_after: object, page_size: object, max_pages: object
) -> None:
    if not isinstance(to, str) or not to.strip():
        raise ValueError("to must be a non-blank string")
    if not isinstance(start_after, datetime) or start_after.utcoffset() is None:
        raise ValueError("start_after must be a timezone-aware datetime")
    if type(page_size) is not int or not 1 <= page_size <= 1000:
        raise ValueError("page_size must be an int between 1 and 1000")
    if type(max_pages) is not int or max_pages < 1:
        raise ValueError("max_pages must be a positive int")


def _next_page_url(link: object, api_host: str, collection: str) -> str:
    """Resolve ``next_page_uri``; only the same https host and the same collection pass."""
    if (
        not isinstance(link, str)
        or not link
        or any(ord(char) <= 0x20 or ord(char) >= 0x7F for char in link)
        or "\\" in link
        or "#" in link
        or _BAD_PERCENT.search(link)
    ):
        raise ValueError("Malformed next_page_uri in the call list")
    parts = urlsplit(link)
    if (parts.scheme or parts.netloc) and (parts.scheme != "https" or parts.netloc != api_host):
        raise ValueError("next_page_uri leaves the API host of the call list")
    segments = unquote(parts.path).split("/")
    if any(segment in (".", "..") for segment in segments):
        raise ValueError("next_page_uri has dot segments")
    target = urljoin(f"https://{api_host}{collection}", link)
    resolved = urlsplit(target)
    if resolved.scheme != "https" or resolved.netloc != api_host or resolved.path != collection:
        raise ValueError("next_page_uri leaves the Calls collection of the account")
    return target


class _CallListing:
    """The paging state machine of a call list, without I/O: queries out, JSON pages in."""

    def __init__(
        self,
        *,
        api_host: str,
        account_sid: str,
        to: str | None,
        start_after: datetime,
        page_size: int,
        max_pages: int,
        cap_is_error: bool = True,
    ) -> None:
        self.api_host = api_host
        self.collection = f"/{_CALLS_API_VERSION}/Accounts/{account_sid}/Calls.json"
        self.after = start_after.astimezone(UTC)
        self.max_pages = max_pages
        self.cap_is_error = cap_is_error
        self.pages_fetched = 0
        self.rows: list[TwilioCallRow] = []
        # The SDK's calls.page() keywords: To, StartTime> (UTC, ...Z) and PageSize.
        self.first_query: dict[str, Any] = {"start_time_after": self.after, "page_size": page_size}
        if to is not None:
            self.first_query["to"] = to
        self.next_url: str | None = None

    def feed(self, payload: object) -> None:
        """Take one decoded page; set ``next_url`` (None when done) or raise."""
        self.pages_fetched += 1
        rows, link = parse_call_page(payload)
        cutoff = self.after.timestamp()
        self.rows.extend(row for row in rows if row.start_time is None or row.start_time > cutoff)
        if link is None:
            self.next_url = None
            return
        target = _next_page_url(link, self.api_host, self.collection)
        if self.pages_fetched >= self.max_pages:
            if self.cap_is_error:
                raise TwilioCallListIncompleteError(self.api_host, self.pages_fetched)
            self.next_url = None
            return
        self.next_url = target


def _status_error(response: Any, path: str) -> TwilioRestError:
    """The TwilioRestError for a non-200 page (the SDK raises a bare TwilioException)."""
    try:
        body = json.loads(response.text)
    except (TypeError, ValueError):
        body = {}
    body = body if isinstance(body, dict) else {}
    code = body.get("code")
    status = response.status_code
    return TwilioRestError(
        str(body.get("message") or "call list request failed"),
        status=status if isinstance(status, int) else None,
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        uri=path,
        method="GET",
    )


def _page_failure(exc: Exception, path: str) -> Exception:
    """Map what the SDK raised while fetching or decoding a page to our error."""
    from twilio.base.exceptions import TwilioException
    from twilio.http.response import Response

    from voice_runtime.transports import _rest

    error = _rest.as_rest_error(exc)
    if error is not None:
        return error
    if isinstance(exc, TwilioException) and len(exc.args) > 1 and isinstance(exc.args[1], Response):
        return _status_error(exc.args[1], path)  # "Unable to fetch page", with the response
    if isinstance(
        exc, TwilioException | json.JSONDecodeError | TypeError | AttributeError | KeyError
    ):
        # The SDK's page parser choked on the body (not JSON, not an object of records).
        return ValueError("Call list page is not a JSON object with a list of calls")
    return exc


def _page_payload(page: object) -> object:
    # The raw JSON the SDK decoded: validated here, before the SDK's lossy record parsing.
    return getattr(page, "_payload", None)


def _read_page(fetch: Callable[[], object], path: str) -> object:
    try:
        page = fetch()
    except Exception as exc:
        error = _page_failure(exc, path)
        if error is exc:
            raise
        raise error from exc
    return _page_payload(page)


async def _read_page_async(fetch: Callable[[], Awaitable[object]], path: str) -> object:
    try:
        page = await fetch()
    except Exception as exc:
        error = _page_failure(exc, path)
        if error is exc:
            raise
        raise error from exc
    return _page_payload(page)


def _fetch_all(listing: _CallListing, client: Client) -> list[TwilioCallRow]:
    """Read every page through the SDK (``calls.page``, then ``calls.get_page``)."""
    listing.feed(_read_page(lambda: client.calls.page(**listing.first_query), listing.collection))
    while listing.next_url is not None:
        url = listing.next_url
        listing.feed(_read_page(functools.partial(client.calls.get_page, url), listing.collection))
    return listing.rows


async def _fetch_all_async(listing: _CallListing, client: Client) -> list[TwilioCallRow]:
    """Async twin of :func:`_fetch_all` (``page_async``, ``get_page_async``)."""
    first = listing.first_query
    listing.feed(
        await _read_page_async(lambda: client.calls.page_async(**first), listing.collection)
    )
    while listing.next_url is not None:
        url = listing.next_url
        listing.feed(
            await _read_page_async(
                functools.partial(client.calls.get_page_async, url), listing.collection
            )
        )
    return listing.rows


def _new_listing(
    api_host: str,
    account_sid: str,
    auth: tuple[str, str],
    to: str,
    start_after: datetime,
    page_size: int,
    max_pages: int,
) -> tuple[_CallListing, TwilioRegion]:
    region = TwilioRegion(api_host=api_host, account_sid=account_sid, auth=auth)
    _validate_list_query(to, start_after, page_size, max_pages)
    listing = _CallListing(
        api_host=region.api_host,
        account_sid=region.account_sid,
        to=to,
        start_after=start_after,
        page_size=page_size,
        max_pages=max_pages,
    )
    return listing, region


def list_calls(
    *,
    api_host: str,
    account_sid: str,
    auth: tuple[str, str],
    to: str,
    start_after: datetime,
    page_size: int = 200,
    max_pages: int = 10,
    api_base_url: str | None = None,
    timeout: float | None = None,
) -> list[TwilioCallRow]:
    """Return every call to ``to`` that started after ``start_after`` in one explicit region.

    Everything is validated before the first request: the region (see
    :class:`TwilioRegion`), ``to`` non-blank, ``start_after`` timezone-aware,
    ``1 <= page_size <= 1000`` and ``max_pages >= 1`` as ints (ValueError otherwise).
    Pages are followed through ``next_page_uri`` only on the same https host and the same
    ``/2010-04-01/Accounts/{sid}/Calls.json`` collection (anything else is a ValueError);
    every page's raw JSON is validated. Rows with an unknown start time are kept, those that
    started at or before ``start_after`` dropped. A next page left after ``max_pages`` raises
    :class:`TwilioCallListIncompleteError`; a REST failure raises :class:`TwilioRestError`.
    No partial list is ever returned.

    ``api_base_url`` (default TWILIO_API_BASE_URL) sends the requests elsewhere (a proxy, a
    fake) while the host rules above still apply to the https URLs Twilio names.
    """
    listing, region = _new_listing(
        api_host, account_sid, auth, to, start_after, page_size, max_pages
    )
    from voice_runtime.transports import _rest

    if api_base_url is None and timeout is None:
        client = _clients().build_explicit_twilio_client(region)
    else:
        client = _clients().build_explicit_twilio_client(
            region, api_base_url=api_base_url, timeout=timeout
        )
    try:
        return _fetch_all(listing, client)
    finally:
        _rest.close_client(client)


async def list_calls_async(
    *,
    api_host: str,
    account_sid: str,
    auth: tuple[str, str],
    to: str,
    start_after: datetime,
    page_size: int = 200,
    max_pages: int = 10,
    api_base_url: str | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - per-request HTTP timeout
) -> list[TwilioCallRow]:
    """Async twin of :func:`list_calls` (the SDK's ``page_async``/``get_page_async``)."""
    from voice_runtime.transports import _rest

    listing, region = _new_listing(
        api_host, account_sid, auth, to, start_after, page_size, max_pages
    )
    client = _rest.build_region_client(
        region, api_base_url=api_base_url, timeout=timeout, use_async=True
    )
    try:
        return await _fetch_all_async(listing, client)
    finally:
        await _rest.aclose_client(client)


def list_recent_calls(lookback_s: float = 3600.0) -> list[dict[str, Any]]:
    """Deprecated: calls to TWILIO_PHONE_NUMBER in the last ``lookback_s`` seconds.

    Returns ``[]`` without credentials, else ``{"call_sid", "status", "start_time"}`` dicts
    (``start_time`` in epoch seconds, 0 when unknown), at most one page of 200. Use
    :func:`list_calls`, which is complete or raises.
    """
    warnings.warn(
        "list_recent_calls() is deprecated; use list_calls(), which reads every page",
        DeprecationWarning,
        stacklevel=2,
    )
    if isinstance(lookback_s, bool) or not isinstance(lookback_s, int | float):
        raise ValueError("lookback_s must be a number of seconds")
    if not math.isfinite(lookback_s) or lookback_s < 0:
        raise ValueError("lookback_s must be a finite, non-negative number of seconds")
    from voice_runtime.transports import _rest

    current = settings()
    if not current.twilio_account_sid or not current.twilio_auth_token:
        return []
    account_sid = validate_sid(current.twilio_account_sid)
    client = _clients().build_twilio_client(account_sid, current.twilio_auth_token)
    try:
        listing = _CallListing(
            api_host=_rest.client_api_host(client),
            account_sid=account_sid,
            to=current.twilio_phone_number or None,
            start_after=datetime.fromtimestamp(time.time() - lookback_s, tz=UTC),
            page_size=200,
            max_pages=1,
            cap_is_error=False,
        )
        rows = _fetch_all(listing, client)
    finally:
        _rest.close_client(client)
    return [
        {
            "call_sid": row.call_sid,
            "status": row.status,
            "start_time": row.start_time if row.start_time is not None else 0,
        }
        for row in rows
    ]
