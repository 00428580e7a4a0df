"""Talking to shard processes from the ops CLI: admin operations over RPC, one connection
per process, each request in a worker thread (the verbs themselves run under trio, for
the directory)."""

from __future__ import annotations

import os
from typing import Any

import trio

from shardlite.router import Placement, ShardRecord
from shardlite.router._client import RpcTransport
from shardlite.router._protocol import split_address

ADMIN_TIMEOUT_S = 600.0
"""A copy of a batch of large files may take minutes; a dead process fails at connect."""


class OpsError(Exception):
    """A verb cannot go on: the one-line reason the CLI prints."""


class Nodes:
    """Admin requests to shard processes by address (connections kept for reuse)."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self._transports: dict[str, RpcTransport] = {}

    async def ask(self, address: str, op: Any) -> Any:
        transport = self._transports.get(address)
        if transport is None:
            transport = RpcTransport(split_address(address), ADMIN_TIMEOUT_S, self.token)
            self._transports[address] = transport
        try:
            return await trio.to_thread.run_sync(transport.request, "", op)
        except OSError as exc:
            transport.close()
            del self._transports[address]
            raise OpsError(f"cannot reach the shard process at {address}: {exc}") from None

    def close(self) -> None:
        for transport in self._transports.values():
            transport.close()
        self._transports.clear()


def ops_token(data: str, ttl_s: float = 60.0) -> str | None:
    """An admin token for the ops verbs: $SHARDLITE_TOKEN, else one signed with this
    host's keys for ``ttl_s`` (whoever can read them can mint any token anyway); None
    when the host has no keys (auth is off)."""
    from shardlite.shards._auth import KEYS_FILE, create_token, signing_key

    if os.environ.get("SHARDLITE_TOKEN"):
        return os.environ["SHARDLITE_TOKEN"]
    secrets = auth_secrets()
    if not secrets and not os.path.exists(os.path.join(data, KEYS_FILE)):
        return None
    kid, secret = signing_key(data, secrets)
    return create_token(kid, secret, pattern="*", perm="admin", ttl_s=ttl_s)[0]


def auth_secrets() -> list[str]:
    return [p.strip() for p in os.environ.get("SHARDLITE_AUTH_SECRET", "").split(",") if p.strip()]


def owner_address(placement: Placement, shard: ShardRecord) -> str:
    node = placement.nodes.get(shard.owner)
    if node is None:
        raise OpsError(f"{shard.id}'s owner {shard.owner} is down (not in the directory)")
    return node.rpc


def find_shard(placement: Placement, name: str) -> ShardRecord:
    shard = placement.shards.get(name)
    if shard is None:
        known = ", ".join(sorted(placement.shards)) or "none"
        raise OpsError(f"unknown shard {name!r} (shards: {known})")
    return shard


def host_of(node: str) -> str:
    return node.rpartition("/")[0]


__all__ = [
    "Nodes",
    "OpsError",
    "auth_secrets",
    "find_shard",
    "host_of",
    "ops_token",
    "owner_address",
]
