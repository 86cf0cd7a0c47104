"""Scale-out on Redis: instances, call owners, control from anywhere.

Each server process is an *instance* with an id and its own public base URL. Route tokens are
signed with the cluster secret and name their instance, so a stream that reaches another
instance is refused before accept. Redis holds which instance owns each call (expiring,
refreshed by heartbeats), the live instances with their load, and a control channel per
instance; :meth:`Cluster.control` ends, transfers or records a call on any instance, from any
instance or a plain script. See docs/scaling.md. The ``redis`` package (extra ``redis``) is
imported only when a cluster first talks to Redis.
"""

from __future__ import annotations

from typing import Any

from voice_runtime.cluster.control import CallHandle
from voice_runtime.cluster.state import Cluster, ClusterCall, ClusterError, InstanceInfo
from voice_runtime.cluster.tokens import RouteSigner

__all__ = [
    "CallHandle",
    "Cluster",
    "ClusterCall",
    "ClusterError",
    "InstanceInfo",
    "RouteSigner",
    "cluster_for",
]


def cluster_for(value: Any) -> Cluster | None:
    """VoiceServer's ``cluster=``: a Cluster, a Redis URL, False, or None (VOICE_REDIS_URL)."""
    from voice_runtime.config import settings

    if value is False:
        return None
    if isinstance(value, Cluster):
        return value
    if isinstance(value, str):
        return Cluster(value)
    if value is None or value is True:
        url = settings().voice_redis_url
        if url:
            return Cluster(url)
        if value is True:
            return Cluster()  # raises, naming VOICE_REDIS_URL
        return None
    raise TypeError("cluster must be a Cluster, a Redis URL, True, False or None")
