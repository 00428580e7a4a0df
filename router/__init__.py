"""Routing and the client: from a key to the server that owns it.

Today: the RPC wire format (``wire``) and the Python clients. The router issue adds
key -> slot -> shard -> host placement, the directory backends and forwarding.
"""

from . import _wire as wire
from ._aclient import AsyncActor, AsyncClient, connect_async
from ._client import Actor, Client, connect
from ._protocol import ConnectionLost, parse_url

__all__ = [
    "Actor",
    "AsyncActor",
    "AsyncClient",
    "Client",
    "ConnectionLost",
    "connect",
    "connect_async",
    "parse_url",
    "wire",
]
