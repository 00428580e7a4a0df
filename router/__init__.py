"""Routing and the client: from a key to the server that owns it.

The RPC wire format (``wire``), the Python clients, key -> slot -> shard -> node
placement, the directory (``sqlite:`` and ``etcd://``) and forwarding between shard
processes.
"""

from . import _wire as wire
from ._aclient import AsyncActorHandle, AsyncClient, connect_async
from ._client import ActorHandle, Client, connect
from ._directory import (
    DEFAULT_LEASE_TTL_S,
    Directory,
    Lease,
    open_directory,
    open_lease,
    parse_directory_url,
)
from ._forward import Forwarded, Forwarder, ForwardWaiter
from ._kv import DirectoryUnavailable, KvStore
from ._placement import (
    DEFAULT_SLOTS,
    ClusterRecord,
    HostRecord,
    MoveRecord,
    NodeRecord,
    Placement,
    PlacementMap,
    ShardLocation,
    ShardRecord,
    shard_name,
    slot_of,
    split_slots,
)
from ._protocol import ConnectionLost, parse_url

__all__ = [
    "DEFAULT_LEASE_TTL_S",
    "DEFAULT_SLOTS",
    "ActorHandle",
    "AsyncActorHandle",
    "AsyncClient",
    "Client",
    "ClusterRecord",
    "ConnectionLost",
    "Directory",
    "DirectoryUnavailable",
    "ForwardWaiter",
    "Forwarded",
    "Forwarder",
    "HostRecord",
    "KvStore",
    "Lease",
    "MoveRecord",
    "NodeRecord",
    "Placement",
    "PlacementMap",
    "ShardLocation",
    "ShardRecord",
    "connect",
    "connect_async",
    "open_directory",
    "open_lease",
    "parse_directory_url",
    "parse_url",
    "shard_name",
    "slot_of",
    "split_slots",
    "wire",
]
