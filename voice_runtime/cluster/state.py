"""Cluster state on Redis: instances, call owners, and a control channel per instance.

Keys (``prefix`` default ``vr``)::

    {p}:inst:{id}     JSON of one instance (url, live calls, capacity, ready); expires
    {p}:instances     set of instance ids (members whose key expired are dropped on read)
    {p}:call:{sid}    JSON of one live call (instance, direction, started_at); expires
    {p}:calls:{id}    set of the call SIDs an instance owns; expires
    {p}:ctl:{id}      pub/sub channel: commands for the calls of instance ``id``
    {p}:reply:{uuid}  list: a command's answer (BLPOP by whoever sent it)
    {p}:num:{hash}    the call SID of a live call's far party (an HMAC of the number)

Everything an instance writes expires after ``expiry_heartbeats`` heartbeats, so a dead
instance and its calls leave within a few heartbeats. An instance keeps the truth about its
calls in memory and rewrites it on every heartbeat: the media path never waits on Redis, and
after a Redis restart the next heartbeat restores the cluster's state. The ``redis`` package
is imported when a Cluster first talks to Redis, never at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from voice_runtime.cluster.instance import InstanceRole
from voice_runtime.cluster.tokens import RouteSigner, valid_instance_id
from voice_runtime.config import settings
from voice_runtime.errors import ConfigurationError, VoiceRuntimeError

if TYPE_CHECKING:
    from voice_runtime.cluster.control import CallHandle

logger = logging.getLogger(__name__)

__all__ = ["Cluster", "ClusterCall", "ClusterError", "InstanceInfo"]

# Static log lines for refused route tokens, by the signer's reason.
_REFUSALS = {
    "forged": "media stream refused: route token not signed by this cluster",
    "foreign": "media stream refused: route token names another instance",
    "expired": "media stream refused: route token expired",
    "used": "media stream refused: route token already used",
}

REDIS_INSTALL_HINT = 'pip install "voice-runtime[redis]"'


class ClusterError(VoiceRuntimeError):
    """A cluster request failed: no such call, owner gone, Redis unreachable, or refused."""


@dataclass(frozen=True)
class InstanceInfo:
    """One instance as its last heartbeat described it."""

    instance_id: str
    url: str
    live_calls: int
    reserved: int
    capacity: int
    ready: bool
    draining: bool
    heartbeat_at: float

    @property
    def free(self) -> int:
        """Call slots left (routes on their way in count as taken)."""
        return max(0, self.capacity - max(self.live_calls, self.reserved))


@dataclass(frozen=True)
class ClusterCall:
    """A live call in the cluster (no phone numbers)."""

    call_sid: str
    instance_id: str
    direction: str
    started_at: float


def _secret(explicit: str | bytes | None) -> bytes | None:
    current = settings()
    value = explicit if explicit is not None else current.voice_cluster_secret
    if value:
        return value.encode() if isinstance(value, str) else value
    if current.twilio_auth_token:
        # Every instance of one Twilio account shares this; a key derived from it is shared.
        digest = hashlib.sha256(b"voice-runtime cluster\0" + current.twilio_auth_token.encode())
        return digest.digest()
    return None


class Cluster(InstanceRole):
    """The cluster one VoiceServer (or a plain script) belongs to, kept on Redis.

    ``redis_url`` defaults to VOICE_REDIS_URL, ``instance_id`` to VOICE_INSTANCE_ID (else a
    random one), ``instance_url`` (this instance's own public base URL, where streams and
    callbacks of its calls go) to VOICE_INSTANCE_URL and then the server's public URL,
    ``secret`` (the HMAC key of route tokens, the same on every instance) to
    VOICE_CLUSTER_SECRET, else one derived from TWILIO_AUTH_TOKEN. ``heartbeat_s`` defaults to
    VOICE_CLUSTER_HEARTBEAT_S (2); an instance is gone after ``expiry_heartbeats`` missed ones.
    A script that only sends commands needs nothing but ``redis_url``.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        instance_id: str | None = None,
        instance_url: str | None = None,
        secret: str | bytes | None = None,
        heartbeat_s: float | None = None,
        expiry_heartbeats: int = 3,
        control_timeout_s: float = 10.0,
        prefix: str = "vr",
    ) -> None:
        current = settings()
        url = redis_url or current.voice_redis_url
        if not url:
            raise ConfigurationError("a cluster needs Redis: set VOICE_REDIS_URL (redis://host)")
        self.redis_url: str = url
        self.instance_id = instance_id or current.voice_instance_id or "vr-" + secrets.token_hex(4)
        if not valid_instance_id(self.instance_id):
            raise ConfigurationError("VOICE_INSTANCE_ID: 1-64 letters, digits, '-' or '_'")
        self.instance_url = instance_url or current.voice_instance_url
        self.heartbeat_s = heartbeat_s or current.voice_cluster_heartbeat_s
        if not self.heartbeat_s > 0 or expiry_heartbeats < 2:
            raise ConfigurationError("heartbeat_s must be > 0 and expiry_heartbeats >= 2")
        self.expiry_s = self.heartbeat_s * expiry_heartbeats
        self.control_timeout_s = control_timeout_s
        self.prefix = prefix
        key = _secret(secret)
        self.signer = RouteSigner(key, self.instance_id) if key is not None else None
        self.server: Any = None
        # Redis health: None before the first contact, then True/False.
        self.redis_up: bool | None = None
        self.outages = 0
        self.commands_executed = 0
        self.events_forwarded = 0
        self._down_since = 0.0
        self._lock = threading.Lock()
        self._calls: dict[str, ClusterCall] = {}
        self._gone: set[str] = set()
        self._dirty: set[str] = set()
        self._numbers: dict[str, str] = {}
        self._gone_numbers: set[str] = set()
        self._view: list[InstanceInfo] = []
        self._handed: dict[str, int] = {}
        self._redis: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poke: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._full_beat = True

    # ------------------------------------------------------------------ keys and client

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def channel(self, instance_id: str) -> str:
        """The pub/sub channel of ``instance_id``'s commands."""
        return self._key("ctl", instance_id)

    def client(self) -> Any:
        """The asyncio Redis client of this cluster (created on first use, in this loop)."""
        loop = asyncio.get_running_loop()
        if self._redis is None or self._loop is not loop:
            try:
                import redis.asyncio as aioredis
            except ImportError as exc:
                raise ImportError(f"the cluster needs redis: {REDIS_INSTALL_HINT}") from exc
            timeout = max(1.0, self.heartbeat_s)
            self._redis = aioredis.from_url(
                self.redis_url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                decode_responses=True,
            )
            self._loop = loop
        return self._redis

    async def aclose(self) -> None:
        """Close the Redis connections (a server's cluster does this when it stops)."""
        if self._redis is not None:
            redis, self._redis = self._redis, None
            with contextlib.suppress(Exception):
                await redis.aclose()

    async def __aenter__(self) -> Cluster:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ Redis health

    def _down(self, exc: BaseException) -> None:
        if self.redis_up is not False:
            self.outages += 1
            self._down_since = time.monotonic()
            logger.warning(
                "cluster: Redis unreachable; live calls go on, cluster state and control wait",
                extra={"instance": self.instance_id, "error": type(exc).__name__,
                       "outages": self.outages},
            )  # fmt: skip
        self.redis_up = False
        self._full_beat = True

    def _up(self) -> None:
        if self.redis_up is False:
            logger.warning(
                "cluster: Redis reachable again",
                extra={"instance": self.instance_id,
                       "outage_s": round(time.monotonic() - self._down_since, 1)},
            )  # fmt: skip
        self.redis_up = True

    # ------------------------------------------------------------------ the owner's side

    def attach(self, server: Any) -> None:
        """Serve ``server``'s calls as this instance (VoiceServer does this)."""
        if self.signer is None:
            raise ConfigurationError(
                "a cluster instance needs a shared secret: set VOICE_CLUSTER_SECRET"
            )
        self.server = server

    def issue_token(self, ttl_s: float, call_sid: str | None = None) -> str:
        """A signed route token for a stream to this instance."""
        assert self.signer is not None
        return self.signer.issue(ttl_s, call_sid=call_sid or "")

    def claim_route(self, token: str, registry: Any) -> tuple[Any, str | None]:
        """The route of a stream's token, or (None, why) to refuse it before accept.

        A token this instance issued and remembers gives its route; a valid one it does not
        remember was issued by another instance handing a call over (a fresh route).
        """
        from voice_runtime.calls import Route

        assert self.signer is not None
        check = self.signer.check(token)
        if check.reason is not None:
            return None, _REFUSALS.get(check.reason, _REFUSALS["forged"])
        route = registry.claim(token)
        if route is None:
            route = Route(token=token, expires_at=time.monotonic() + 1.0, call_sid=check.call_sid)
        return route, None

    def base_url(self) -> str | None:
        """This instance's public base URL (VOICE_INSTANCE_URL, else the server's)."""
        if self.instance_url or self.server is None:
            return self.instance_url
        try:
            base: str = self.server._public_base()
        except ConfigurationError:  # no public URL yet
            return None
        return base

    def call_started(self, call_sid: str, direction: str, far_number: str | None = None) -> None:
        """Note a call this instance now owns (any thread; Redis learns it in the background).

        ``far_number`` (the caller, or the callee of a call placed here) lets an SMS from it
        reach the call; Redis only sees a keyed hash of it.
        """
        if not call_sid:
            return
        with self._lock:
            if far_number and self.signer is not None:
                self._numbers[call_sid] = self._number_key(far_number)
            old = self._calls.get(call_sid)
            started = old.started_at if old is not None else time.time()
            self._calls[call_sid] = ClusterCall(call_sid, self.instance_id, direction, started)
            self._gone.discard(call_sid)
            self._dirty.add(call_sid)
        self._wake()

    def call_ended(self, call_sid: str | None) -> None:
        """Note that a call of this instance ended (any thread)."""
        if not call_sid:
            return
        with self._lock:
            if self._calls.pop(call_sid, None) is None:
                return
            self._dirty.discard(call_sid)
            self._gone.add(call_sid)
            number = self._numbers.pop(call_sid, None)
            if number is not None:
                self._gone_numbers.add(number)
        self._wake()

    def live_calls(self) -> list[ClusterCall]:
        """The calls this instance owns now."""
        with self._lock:
            return list(self._calls.values())

    # ------------------------------------------------------------------ anyone's side

    async def owner_of(self, call_sid: str) -> str | None:
        """The instance that owns ``call_sid``, or None."""
        raw = await self.client().get(self._key("call", call_sid))
        if raw is None:
            return None
        owner: str = json.loads(raw)["instance_id"]
        return owner

    async def instances(self) -> list[InstanceInfo]:
        """The live instances, by id."""
        r = self.client()
        ids = sorted(await r.smembers(self._key("instances")))
        if not ids:
            return []
        raws = await r.mget([self._key("inst", i) for i in ids])
        gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
        if gone:
            await r.srem(self._key("instances"), *gone)
        return [InstanceInfo(**json.loads(raw)) for raw in raws if raw is not None]

    async def calls(self) -> list[ClusterCall]:
        """Every live call of the cluster (call SID, instance, direction, started at)."""
        r = self.client()
        found: list[ClusterCall] = []
        for inst in await self.instances():
            sids = sorted(await r.smembers(self._key("calls", inst.instance_id)))
            if not sids:
                continue
            raws = await r.mget([self._key("call", s) for s in sids])
            for raw in raws:
                if raw is not None:
                    call = ClusterCall(**json.loads(raw))
                    if call.instance_id == inst.instance_id:
                        found.append(call)
        return found

    def control(self, call_sid: str) -> CallHandle:
        """Controls of ``call_sid`` wherever it lives: hangup, transfer, send_digits, …."""
        from voice_runtime.cluster.control import CallHandle

        return CallHandle(self, call_sid)

    def reply_key(self) -> str:
        """A fresh key for one command's answer."""
        return self._key("reply", uuid.uuid4().hex)
