"""Control of a call on any instance: the command bus and the owner's executor.

A command is a JSON object published on the owner's channel: ``op``, ``call_sid``, ``args``
and, when the sender waits, ``reply`` (a list key the owner RPUSHes its answer to). The owner
runs it on the call's session with ``session.control`` semantics. Forwarded webhooks
(``status``) travel the same way without a reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from voice_runtime.cluster.instance import _redis_errors
from voice_runtime.cluster.state import ClusterError
from voice_runtime.errors import LoopThreadError
from voice_runtime.types import SessionEvent

if TYPE_CHECKING:
    from voice_runtime.cluster.state import Cluster

logger = logging.getLogger(__name__)

__all__ = ["OPS", "CallHandle", "execute", "send"]

OPS = frozenset(
    {"hangup", "transfer", "send_digits", "start_recording", "stop_recording", "clear",
     "publish_event", "status", "sms"}
)  # fmt: skip


async def send(
    cluster: Cluster,
    owner: str,
    call_sid: str,
    op: str,
    args: dict[str, Any],
    *,
    wait: bool = True,
    timeout: float | None = None,
) -> Any:
    """Publish one command to ``owner``; with ``wait`` return its result (else delivered?)."""
    r = cluster.client()
    message: dict[str, Any] = {"op": op, "call_sid": call_sid, "args": args}
    reply = cluster.reply_key() if wait else None
    if reply is not None:
        message["reply"] = reply
    listeners = await r.publish(cluster.channel(owner), json.dumps(message))
    if not wait:
        return bool(listeners)
    if not listeners:
        raise ClusterError("the call's instance is not listening (gone or cut off from Redis)")
    budget = cluster.control_timeout_s if timeout is None else timeout
    answer = await r.blpop([reply], timeout=budget)
    if answer is None:
        raise ClusterError(f"no answer from the call's instance within {budget:g} s")
    result = json.loads(answer[1])
    if not result.get("ok"):
        raise ClusterError(f"{op} failed on the call's instance: {result.get('error')}")
    return result.get("result")


async def execute(cluster: Cluster, raw: str) -> None:
    """Run one command on this instance's session and answer it (the owner's side)."""
    try:
        message = json.loads(raw)
        op, call_sid, args = message["op"], str(message["call_sid"]), dict(message["args"])
        reply = message.get("reply")
    except (ValueError, KeyError, TypeError):
        logger.warning("cluster: malformed command dropped")
        return
    try:
        result = await run_op(cluster, op, call_sid, args)
        answer: dict[str, Any] = {"ok": True, "result": result}
    except Exception as exc:
        # The error's type only: its text may quote a number or digits.
        answer = {"ok": False, "error": type(exc).__name__}
        logger.warning(
            "cluster: command failed",
            extra={"call_sid": call_sid, "op": op, "error": type(exc).__name__},
        )
    cluster.commands_executed += 1
    if reply:
        try:
            r = cluster.client()
            pipe = r.pipeline(transaction=False)
            pipe.rpush(reply, json.dumps(answer))
            pipe.expire(reply, 60)
            await pipe.execute()
        except _redis_errors() as exc:
            cluster._down(exc)


async def run_op(cluster: Cluster, op: str, call_sid: str, args: Mapping[str, Any]) -> Any:
    """Execute ``op`` on the session of ``call_sid`` here (same semantics as session.control)."""
    server = cluster.server
    if op not in OPS:
        raise ClusterError("unknown command")
    session = server.registry.by_call_sid(call_sid) if server is not None else None
    if session is None:
        raise ClusterError("the call is not on this instance")
    if op == "status":
        await server._apply_status(session, dict(args["form"]))
        return None
    if op == "sms":  # an SMS from the call's far party, posted to another instance
        await server._emit(session, SessionEvent("sms", dict(args)))
        return None
    if op == "publish_event":
        await server._emit(session, SessionEvent(str(args["kind"]), dict(args.get("data") or {})))
        return None
    if op == "clear":
        session.request_clear_buffer()
        return None
    from voice_runtime.transports.call_control import CallControl

    control = session.control
    if control is None:  # placed here, its stream not started yet
        control = session.control = CallControl(session, stream_url=cluster.base_url())
    if op == "hangup":
        control.hangup(after_playback=bool(args.get("after_playback")))
        return None
    if op == "transfer":
        return await control.transfer_async(str(args["target"]), caller_id=args.get("caller_id"))
    if op == "send_digits" and isinstance(control, CallControl) and cluster.signer is not None:
        # The stream restarts after the digits: on this instance, with a token naming it.
        from voice_runtime.transports import twilio_call

        return await twilio_call.send_digits_async(
            call_sid,
            str(args["digits"]),
            stream_url=control.stream_url or cluster.base_url(),
            route_token=cluster.signer.issue(60.0, call_sid=call_sid),
            parameters=control._stream_parameters(),
            client=control.client,
        )
    if op == "send_digits":
        return await control.send_digits_async(str(args["digits"]))
    if op == "start_recording":
        return await control.start_recording_async(**dict(args.get("options") or {}))
    await control.stop_recording_async(args.get("recording_sid"))
    return None


class CallHandle:
    """The controls of one call, wherever it lives (``cluster.control(call_sid)``).

    Named like ``session.control``: each sync method blocks (use it from a plain script or a
    worker thread; on an event loop it raises LoopThreadError) and has an ``*_async`` twin.
    Each finds the call's owner in Redis, sends the command on its channel and waits for the
    owner's answer; ClusterError when the call is unknown, its owner is gone or does not
    answer within ``cluster.control_timeout_s``, or the command failed there.
    """

    def __init__(self, cluster: Cluster, call_sid: str) -> None:
        self.cluster = cluster
        self.call_sid = call_sid

    async def _do(self, op: str, **args: Any) -> Any:
        cluster = self.cluster
        if cluster.server is not None and cluster.server.registry.by_call_sid(self.call_sid):
            return await run_op(cluster, op, self.call_sid, args)  # ours: no round trip
        try:
            owner = await cluster.owner_of(self.call_sid)
            if owner is None:
                raise ClusterError("no live call with that SID in the cluster")
            return await send(cluster, owner, self.call_sid, op, args)
        except _redis_errors() as exc:
            raise ClusterError(f"Redis unreachable: {type(exc).__name__}") from exc

    def _do_sync(self, op: str, **args: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise LoopThreadError(f"cluster.control(...).{op}", f"{op}_async")
        # A private loop and client for this call: the cluster's own client belongs to the
        # loop that serves (a Redis client cannot cross event loops).
        src = self.cluster
        clone = type(src)(
            src.redis_url,
            instance_id=src.instance_id,
            heartbeat_s=src.heartbeat_s,
            control_timeout_s=src.control_timeout_s,
            prefix=src.prefix,
            secret=b"control only",
        )

        async def run() -> Any:
            async with clone:
                return await CallHandle(clone, self.call_sid)._do(op, **args)

        return asyncio.run(run())

    def hangup(self, *, after_playback: bool = False) -> None:
        """End the call; with ``after_playback`` once its queued audio has been heard."""
        self._do_sync("hangup", after_playback=after_playback)

    async def hangup_async(self, *, after_playback: bool = False) -> None:
        """Async twin of :meth:`hangup`."""
        await self._do("hangup", after_playback=after_playback)

    def transfer(self, target: str, *, caller_id: str | None = None) -> str:
        """Hand the call to a number or ``sip:`` address; returns the call status."""
        result: str = self._do_sync("transfer", target=target, caller_id=caller_id)
        return result

    async def transfer_async(self, target: str, *, caller_id: str | None = None) -> str:
        """Async twin of :meth:`transfer`."""
        result: str = await self._do("transfer", target=target, caller_id=caller_id)
        return result

    def send_digits(self, digits: str) -> str:
        """Play DTMF ``digits`` into the call (its stream restarts on its owner)."""
        result: str = self._do_sync("send_digits", digits=digits)
        return result

    async def send_digits_async(self, digits: str) -> str:
        """Async twin of :meth:`send_digits`."""
        result: str = await self._do("send_digits", digits=digits)
        return result

    def start_recording(self, **options: Any) -> str:
        """Start a Twilio recording of the call; returns the recording SID."""
        result: str = self._do_sync("start_recording", options=options)
        return result

    async def start_recording_async(self, **options: Any) -> str:
        """Async twin of :meth:`start_recording`."""
        result: str = await self._do("start_recording", options=options)
        return result

    def stop_recording(self, recording_sid: str | None = None) -> None:
        """Stop a recording (default: the one started through the call's control)."""
        self._do_sync("stop_recording", recording_sid=recording_sid)

    async def stop_recording_async(self, recording_sid: str | None = None) -> None:
        """Async twin of :meth:`stop_recording`."""
        await self._do("stop_recording", recording_sid=recording_sid)

    def clear(self) -> None:
        """Drop the agent audio queued for the caller (Twilio ``clear``)."""
        self._do_sync("clear")

    async def clear_async(self) -> None:
        """Async twin of :meth:`clear`."""
        await self._do("clear")

    def publish_event(self, kind: str, data: Mapping[str, Any] | None = None) -> None:
        """Deliver ``SessionEvent(kind, data)`` to the call's ``on_event`` (JSON data)."""
        self._do_sync("publish_event", kind=kind, data=dict(data or {}))

    async def publish_event_async(self, kind: str, data: Mapping[str, Any] | None = None) -> None:
        """Async twin of :meth:`publish_event`."""
        await self._do("publish_event", kind=kind, data=dict(data or {}))
