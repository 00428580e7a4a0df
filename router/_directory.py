"""The directory: the cluster's placement, kept in a KvStore (``sqlite:`` or ``etcd://``).

Keys, under ``/shardlite/``: ``cluster`` (slot count, fixed at creation), ``shards/<id>``
(slot ranges, owner node, epoch), ``hosts/<id>`` (a host's public addresses) and
``nodes/<id>`` (a running shard process and its own RPC address, bound to a lease: it
vanishes when the process stops renewing it). Values are msgpack.

Every change of a shard is a compare-and-swap on the shard's key at the revision it was
read at, and raises its epoch by one: two writers racing for one shard cannot both win,
and a server holding an older epoch learns it is stale (fencing, DESIGN.md).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import trio

from ._kv import Delete, DirectoryUnavailable, KvEntry, KvStore, Put, SqliteKv
from ._placement import (
    ClusterRecord,
    HostRecord,
    MoveRecord,
    NodeRecord,
    Placement,
    ShardRecord,
    shard_name,
    split_slots,
)

PREFIX = "/shardlite/"
CLUSTER_KEY = PREFIX + "cluster"
SHARDS = PREFIX + "shards/"
NODES = PREFIX + "nodes/"
HOSTS = PREFIX + "hosts/"
MOVES = PREFIX + "moves/"
REVOKED = "/shardlite-auth/revoked/"
"""Revoked token ids (outside PREFIX: placement reads do not carry them)."""
DEFAULT_FILE = "directory.db"
DEFAULT_LEASE_TTL_S = 10.0
MAX_SHARDS_AT_CREATION = 120
"""The cluster is created in one transaction: etcd allows 128 operations per one."""

_encode = msgspec.msgpack.encode


class Directory:
    """Placement reads and changes over a :class:`KvStore`."""

    def __init__(self, kv: KvStore) -> None:
        self.kv = kv
        self.url = kv.url
        self._mod: dict[tuple[str, int], int] = {}  # (shard, epoch) -> mod_revision read
        self.move_mod: dict[str, int] = {}  # shard -> mod_revision of its move record read

    async def load(self) -> Placement | None:
        """The placement now (None: no cluster has been created yet)."""
        revision, entries = await self.kv.get_prefix(PREFIX)
        cluster: ClusterRecord | None = None
        shards: dict[str, ShardRecord] = {}
        nodes: dict[str, NodeRecord] = {}
        hosts: dict[str, HostRecord] = {}
        moves: dict[str, MoveRecord] = {}
        for entry in entries:
            key = entry.key
            if key == CLUSTER_KEY:
                cluster = _decode(entry, ClusterRecord)
            elif key.startswith(SHARDS):
                shard = _decode(entry, ShardRecord)
                shards[shard.id] = shard
                self._mod[shard.id, shard.epoch] = entry.mod_revision
            elif key.startswith(NODES):
                node = _decode(entry, NodeRecord)
                nodes[node.id] = node
            elif key.startswith(HOSTS):
                host = _decode(entry, HostRecord)
                hosts[host.id] = host
            elif key.startswith(MOVES):
                move = _decode(entry, MoveRecord)
                moves[move.shard] = move
                self.move_mod[move.shard] = entry.mod_revision
        for shard_id in set(self.move_mod) - set(moves):
            del self.move_mod[shard_id]
        if cluster is None:
            return None
        return Placement(revision, cluster, shards, nodes, hosts, moves=moves)

    async def create_cluster(self, slots: int, shards: int, owners: list[str]) -> bool:
        """Create the cluster with ``shards`` shards given round-robin to ``owners``.

        False if a cluster exists already (someone else created it first).
        """
        if not 1 <= shards <= min(slots, MAX_SHARDS_AT_CREATION):
            raise ValueError(
                f"cannot create {shards} shards of {slots} slots (at most "
                f"{MAX_SHARDS_AT_CREATION} at creation: split shards later)"
            )
        cluster = ClusterRecord(str(uuid.uuid4()), slots, _now())
        ops: list[Put | Delete] = [Put(CLUSTER_KEY, _encode(cluster))]
        for i, span in enumerate(split_slots(slots, shards)):
            record = ShardRecord(shard_name(i), [span], owners[i % len(owners)], 1)
            ops.append(Put(SHARDS + record.id, _encode(record)))
        return await self.kv.txn([(CLUSTER_KEY, 0)], ops)

    async def cas_shard(self, current: ShardRecord, new: ShardRecord) -> bool:
        """Replace ``current`` (as last loaded) by ``new`` at the next epoch, if nobody
        changed the shard since. False: reload and decide again."""
        if new.id != current.id or new.epoch != current.epoch + 1:
            raise ValueError("a shard change keeps its id and raises its epoch by one")
        mod = self._mod.get((current.id, current.epoch))
        if mod is None:
            raise ValueError(f"{current.id} at epoch {current.epoch} was not read by load()")
        return await self.kv.txn([(SHARDS + current.id, mod)], [Put(SHARDS + new.id, _encode(new))])

    def shard_mod(self, shard: ShardRecord) -> int:
        mod = self._mod.get((shard.id, shard.epoch))
        if mod is None:
            raise ValueError(f"{shard.id} at epoch {shard.epoch} was not read by load()")
        return mod

    async def load_move(self, shard: str) -> tuple[MoveRecord | None, int]:
        """The move record of ``shard`` now, and its mod_revision (0: none)."""
        _, entries = await self.kv.get_prefix(MOVES + shard)
        for entry in entries:
            if entry.key == MOVES + shard:
                return _decode(entry, MoveRecord), entry.mod_revision
        return None, 0

    async def put_move(self, move: MoveRecord, expect_mod: int) -> int:
        """Write ``move`` if its record is still at ``expect_mod`` (0: absent); the new
        mod_revision, or 0 if someone changed it first."""
        if not await self.kv.txn(
            [(MOVES + move.shard, expect_mod)], [Put(MOVES + move.shard, _encode(move))]
        ):
            return 0
        record, mod = await self.load_move(move.shard)
        return mod if record == move else 0

    async def end_move(self, shard: str, expect_mod: int) -> bool:
        return await self.kv.txn([(MOVES + shard, expect_mod)], [Delete(MOVES + shard)])

    async def flip(
        self,
        move: MoveRecord,
        move_mod: int,
        changes: list[tuple[ShardRecord | None, ShardRecord]],
        done: MoveRecord,
    ) -> bool:
        """The point of no return of a move or split, in one transaction: iff the move
        record is still at ``move_mod`` (the source still holds its fence) and every
        shard is as last loaded (None: must not exist), write the new shard records and
        the move's next phase."""
        compare = [(MOVES + move.shard, move_mod)]
        ops: list[Put | Delete] = [Put(MOVES + move.shard, _encode(done))]
        for current, new in changes:
            compare.append((SHARDS + new.id, 0 if current is None else self.shard_mod(current)))
            ops.append(Put(SHARDS + new.id, _encode(new)))
        return await self.kv.txn(compare, ops)

    async def put_host(self, host: HostRecord, lease: int) -> None:
        await self.kv.txn([], [Put(HOSTS + host.id, _encode(host), lease)])

    async def put_node(self, node: NodeRecord, lease: int) -> None:
        await self.kv.txn([], [Put(NODES + node.id, _encode(node), lease)])

    async def revoke_token(self, jti: str, expires: float) -> None:
        """Record a revoked token id until the token would have expired anyway."""
        await self.kv.txn([], [Put(REVOKED + jti, _encode(expires))])

    async def revoked_tokens(self) -> dict[str, float]:
        """Revoked token id -> when the token expires (expired ones are dropped)."""
        _, entries = await self.kv.get_prefix(REVOKED)
        now = time.time()
        out: dict[str, float] = {}
        stale = []
        for entry in entries:
            expires = float(msgspec.msgpack.decode(entry.value))
            if expires < now:
                stale.append(Delete(entry.key))
            else:
                out[entry.key[len(REVOKED) :]] = expires
        if stale:
            await self.kv.txn([], stale[:100])
        return out

    async def wait_change(self, revision: int, timeout_s: float) -> int:
        return await self.kv.wait_revision(revision, timeout_s)

    async def aclose(self) -> None:
        await self.kv.aclose()


class Lease:
    """A lease kept alive by :meth:`run`; ``lost`` is set if it ever expires."""

    def __init__(self, kv: KvStore, lease_id: int, ttl_s: float) -> None:
        self.kv = kv
        self.id = lease_id
        self.ttl_s = ttl_s
        self.lost = trio.Event()
        self.confirmed_at = trio.current_time()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Renew at a third of the TTL; tolerate a failing directory until it expires."""
        task_status.started()
        while not self.lost.is_set():
            await trio.sleep(self.ttl_s / 3)
            sent = trio.current_time()  # the lease runs from before the renewal reached it
            try:
                alive = await self.kv.keepalive(self.id)
            except DirectoryUnavailable:
                alive = trio.current_time() - self.confirmed_at < self.ttl_s
            else:
                self.confirmed_at = sent
            if not alive:
                self.lost.set()

    @property
    def valid(self) -> bool:
        """Still ours as far as we can know: renewed within its TTL."""
        return not self.lost.is_set() and trio.current_time() - self.confirmed_at < self.ttl_s

    async def revoke(self) -> None:
        with contextlib.suppress(DirectoryUnavailable):
            await self.kv.revoke(self.id)


async def open_lease(directory: Directory, ttl_s: float = DEFAULT_LEASE_TTL_S) -> Lease:
    return Lease(directory.kv, await directory.kv.grant(ttl_s), ttl_s)


def parse_directory_url(url: str, data: str) -> tuple[str, str]:
    """("sqlite", path) or ("etcd", "http://host:port,..."); ValueError for anything else."""
    if not url:
        return "sqlite", os.path.join(os.path.abspath(data), DEFAULT_FILE)
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ValueError(f"directory URL {url!r}: expected sqlite:PATH")
        return "sqlite", os.path.abspath(path)
    if url.startswith("etcd://"):
        hosts = url[len("etcd://") :].rstrip("/")
        if not hosts:
            raise ValueError(f"directory URL {url!r}: expected etcd://HOST:PORT")
        return "etcd", ",".join(f"http://{h}" for h in hosts.split(","))
    raise ValueError(f"unknown directory URL {url!r}: expected sqlite:PATH or etcd://HOST:PORT")


@contextlib.asynccontextmanager
async def open_directory(url: str, data: str = ".") -> AsyncIterator[Directory]:
    """The directory at ``url`` ('' = the embedded ``sqlite:`` file under ``data``)."""
    kind, where = parse_directory_url(url, data)
    kv: KvStore
    if kind == "sqlite":
        kv = await SqliteKv(where).open()
    else:
        from ._etcd import EtcdKv

        kv = await EtcdKv(where).open()
    directory = Directory(kv)
    try:
        yield directory
    finally:
        await directory.aclose()


def _decode(entry: KvEntry, kind: Any) -> Any:
    try:
        return msgspec.msgpack.decode(entry.value, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DirectoryUnavailable(f"directory key {entry.key}: {exc}") from exc


def _now() -> float:
    import time

    return time.time()


__all__ = [
    "Directory",
    "DirectoryUnavailable",
    "Lease",
    "open_directory",
    "open_lease",
    "parse_directory_url",
]
