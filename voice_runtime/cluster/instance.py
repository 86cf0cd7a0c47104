"""The instance side of a Cluster: heartbeats, the control subscriber, hand-off, health.

:class:`~voice_runtime.cluster.state.Cluster` inherits :class:`InstanceRole`; this module
holds what only a serving instance runs (it keeps the truth about its calls in memory and
writes it to Redis in the background, so the media path never waits on Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from voice_runtime.cluster.state import Cluster, ClusterCall, InstanceInfo
    from voice_runtime.cluster.tokens import RouteSigner

logger = logging.getLogger("voice_runtime.cluster.state")

__all__ = ["InstanceRole"]


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError)


class InstanceRole:
    """Heartbeats, the control channel subscriber and what they feed (a Cluster mixin)."""

    instance_id: str
    heartbeat_s: float
    expiry_s: float
    signer: RouteSigner | None
    server: Any
    redis_up: bool | None
    outages: int
    events_forwarded: int
    _lock: threading.Lock
    _calls: dict[str, ClusterCall]
    _gone: set[str]
    _dirty: set[str]
    _numbers: dict[str, str]
    _gone_numbers: set[str]
    _view: list[InstanceInfo]
    _handed: dict[str, int]
    _loop: asyncio.AbstractEventLoop | None
    _poke: asyncio.Event | None
    _tasks: set[asyncio.Task[Any]]
    _full_beat: bool

    if TYPE_CHECKING:

        def client(self) -> Any: ...

        def channel(self, instance_id: str) -> str: ...

        def _key(self, *parts: str) -> str: ...

        def _down(self, exc: BaseException) -> None: ...

        def _up(self) -> None: ...

        def base_url(self) -> str | None: ...

        def live_calls(self) -> list[ClusterCall]: ...

        async def aclose(self) -> None: ...

        async def instances(self) -> list[InstanceInfo]: ...

        async def owner_of(self, call_sid: str) -> str | None: ...

    def _wake(self) -> None:
        loop, poke = self._loop, self._poke
        if loop is None or poke is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            poke.set()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(poke.set)

    async def start(self) -> None:
        """Start heartbeats and the control subscriber (returns at once; Redis may be down)."""
        self.client()
        self._poke = asyncio.Event()
        for coro, name in ((self._beat_loop(), "vr-cluster-beat"),
                           (self._control_loop(), "vr-cluster-control")):  # fmt: skip
            task = asyncio.create_task(coro, name=name)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Stop, and take this instance out of Redis at once (bounded)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                pipe = self.client().pipeline(transaction=False)
                pipe.delete(
                    self._key("inst", self.instance_id), self._key("calls", self.instance_id)
                )
                pipe.srem(self._key("instances"), self.instance_id)
                for call in self.live_calls():
                    pipe.delete(self._key("call", call.call_sid))
                await pipe.execute()
        await self.aclose()

    def _instance_record(self) -> dict[str, Any]:
        server = self.server
        draining = bool(getattr(server, "draining", False))
        reserved = server.registry.reserved_count if server is not None else 0
        capacity = int(getattr(server, "max_calls", 0))
        return {
            "instance_id": self.instance_id,
            "url": self.base_url() or "",
            "live_calls": len(self._calls),
            "reserved": reserved,
            "capacity": capacity,
            "ready": not draining and reserved < capacity,
            "draining": draining,
            "heartbeat_at": time.time(),
        }

    async def _beat(self) -> None:
        r = self.client()
        ttl = int(self.expiry_s * 1000)
        with self._lock:
            full, self._full_beat = self._full_beat, False
            write = list(self._calls.values()) if full else [
                self._calls[s] for s in self._dirty if s in self._calls
            ]  # fmt: skip
            gone, self._gone = self._gone, set()
            gone_numbers, self._gone_numbers = self._gone_numbers, set()
            numbers = [(k, s) for s, k in self._numbers.items() if full or s in self._dirty]
            self._dirty.clear()
            owned = list(self._calls)
        try:
            pipe = r.pipeline(transaction=False)
            me = self.instance_id
            pipe.set(self._key("inst", me), json.dumps(self._instance_record()), px=ttl)
            pipe.sadd(self._key("instances"), me)
            for call in write:
                pipe.set(self._key("call", call.call_sid), json.dumps(asdict(call)), px=ttl)
            for number, sid in numbers:
                pipe.set(number, sid, px=ttl)
            if gone_numbers:
                pipe.delete(*gone_numbers)
            if gone:
                pipe.delete(*(self._key("call", sid) for sid in gone))
                pipe.srem(self._key("calls", me), *gone)
            if write:
                pipe.sadd(self._key("calls", me), *(c.call_sid for c in write))
            if full:
                # Refresh every live call's expiry; forget SIDs this instance no longer owns.
                pipe.delete(self._key("calls", me))
                if owned:
                    pipe.sadd(self._key("calls", me), *owned)
            pipe.pexpire(self._key("calls", me), ttl)
            await pipe.execute()
        except BaseException:
            with self._lock:  # not written: try again on the next beat
                self._gone |= {s for s in gone if s not in self._calls}
                self._gone_numbers |= gone_numbers
                self._full_beat = True
            raise
        self._view = await self.instances()
        self._handed = {}  # the new view counts them

    async def _beat_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()
        assert self._poke is not None
        while True:
            if loop.time() >= next_full:
                self._full_beat = True
                next_full = loop.time() + self.heartbeat_s
            try:
                await self._beat()
                self._up()
            except _redis_errors() as exc:
                self._down(exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("cluster heartbeat failed", extra={"instance": self.instance_id})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), max(0.0, next_full - loop.time()))
            self._poke.clear()
            # Coalesce a burst of call starts and ends into one write.
            await asyncio.sleep(min(0.05, self.heartbeat_s / 10))

    async def _control_loop(self) -> None:
        from voice_runtime.cluster.control import execute

        while True:
            pubsub = None
            try:
                pubsub = self.client().pubsub()
                await pubsub.subscribe(self.channel(self.instance_id))
                self._up()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        task = asyncio.create_task(execute(cast("Cluster", self), message["data"]))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
            except _redis_errors() as exc:
                self._down(exc)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("cluster control channel failed")
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(pubsub.aclose())
            await asyncio.sleep(min(1.0, self.heartbeat_s / 2))

    def pick_instance(self) -> InstanceInfo | None:
        """The least-loaded other ready instance with a free slot (from the last heartbeat).

        Calls handed to an instance since its last heartbeat count as taken slots, so a
        burst of hand-offs spreads instead of piling onto one instance.
        """
        fresh = time.time() - self.expiry_s
        handed = self._handed

        def taken(i: InstanceInfo) -> int:
            return max(i.live_calls, i.reserved) + handed.get(i.instance_id, 0)

        best = [
            i for i in self._view
            if i.instance_id != self.instance_id and i.ready and i.url
            and taken(i) < i.capacity and i.heartbeat_at >= fresh
        ]  # fmt: skip
        if not best:
            return None
        return min(best, key=lambda i: (taken(i) / max(1, i.capacity), i.url))

    def hand_off(self) -> InstanceInfo | None:
        """:meth:`pick_instance`, counting the call handed to it."""
        target = self.pick_instance()
        if target is not None:
            self._handed[target.instance_id] = self._handed.get(target.instance_id, 0) + 1
        return target

    def health(self) -> dict[str, Any]:
        """The instance and the cluster as this instance last saw them (no Redis request)."""
        record = self._instance_record()
        view = [asdict(i) for i in self._view]
        return {
            "instance": record,
            "cluster": {
                "redis": {None: "unknown", True: "up", False: "down"}[self.redis_up],
                "redis_outages": self.outages,
                "instances": view,
                "live_calls": sum(i["live_calls"] for i in view),
                "capacity": sum(i["capacity"] for i in view),
            },
        }

    async def forward(
        self, call_sid: str, op: str, args: Mapping[str, Any], patience_s: float = 2.0
    ) -> bool:
        """Hand a webhook's event to the call's owner; False when no owner was found.

        A call placed a moment ago may not be in Redis yet: look again for ``patience_s``.
        """
        from voice_runtime.cluster.control import send

        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience_s
        try:
            while True:
                owner = await self.owner_of(call_sid)
                if owner is not None and owner != self.instance_id:
                    delivered = await send(
                        cast("Cluster", self), owner, call_sid, op, dict(args), wait=False
                    )
                    self.events_forwarded += int(delivered)
                    return delivered
                # A call just placed elsewhere may not be in Redis yet.
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(0.1)
        except _redis_errors() as exc:
            self._down(exc)
            return False

    def _number_key(self, number: str) -> str:
        assert self.signer is not None
        return self._key("num", self.signer.digest(number.strip()))

    async def deliver_sms(self, sender: str, fields: Mapping[str, Any]) -> bool:
        """``SessionEvent("sms", fields)`` on the live call with ``sender``, on any instance."""
        if self.signer is None or not sender:
            return False
        try:
            call_sid = await self.client().get(self._number_key(sender))
        except _redis_errors() as exc:
            self._down(exc)
            return False
        if call_sid is None:
            return False
        session = self.server.registry.by_call_sid(call_sid) if self.server is not None else None
        if session is not None:
            from voice_runtime._callbacks import CallbacksBusyError
            from voice_runtime.types import SessionEvent

            with contextlib.suppress(CallbacksBusyError):
                await self.server._emit(session, SessionEvent("sms", dict(fields)))
            return True
        return await self.forward(call_sid, "sms", fields, patience_s=0.0)
