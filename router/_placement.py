"""Where a key lives: key -> slot (a stable hash) -> shard -> node (one shard process).

The slot of a key is ``crc32(utf-8 key) % slots``: stable across processes, versions and
languages (a client in any language can compute it), and the slot count is fixed when the
cluster is created. Each shard owns ranges of slots; each shard has one owner node at a
time, and an epoch that grows with every change of its owner or slots. A placement map
is a snapshot of all that, as the directory held it at one revision.
"""

from __future__ import annotations

import bisect
import zlib

import msgspec

DEFAULT_SLOTS = 4096
MAX_SLOTS = 1 << 16


def slot_of(key: str, slots: int) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % slots


class ClusterRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """Fixed at creation."""

    id: str
    slots: int
    created: float


class ShardRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A shard: its slot ranges (``[start, end)``), its owner node, and its epoch."""

    id: str
    ranges: list[tuple[int, int]]
    owner: str
    epoch: int


class NodeRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A running shard process, registered while it lives (bound to a lease)."""

    id: str  # "<host-id>/<n>"
    host: str
    rpc: str  # "host:port" of this process's own RPC listener (direct routing)
    http: str
    pid: int
    started: float


class HostRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A host's public entry points (any process there answers any key)."""

    id: str
    rpc: str
    http: str


class MoveRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """A shard move (or split) in progress: what ``ops move --resume/--abort`` finish.

    ``phase``: ``copy`` (the target copies while the source serves), ``fenced`` (the
    source holds the shard's requests; ``fenced_by`` is the process that holds them),
    ``flipped`` (the directory names the target: the point of no return).
    """

    shard: str
    source: str  # owner node when the move began
    target: str  # node that will own the shard
    phase: str
    started: float
    epoch: int  # the shard's epoch when the move began
    kind: str = "move"  # or "split"
    new_shard: str = ""  # split: the shard that takes the upper half of the slots
    fenced_by: str = ""


class ShardLocation(msgspec.Struct, frozen=True):
    """Where a shard is served: what a ``wrong_shard`` error carries."""

    shard: str
    epoch: int
    owner: str
    rpc: str


class PlacementMap(msgspec.Struct, frozen=True):
    """One snapshot of the directory, as the ``placement`` RPC operation sends it."""

    revision: int
    cluster: ClusterRecord
    shards: list[ShardRecord]
    nodes: list[NodeRecord]
    hosts: list[HostRecord] = []


class Placement:
    """One snapshot of the directory, indexed for lookups by key."""

    __slots__ = ("_owners", "_starts", "cluster", "hosts", "moves", "nodes", "revision", "shards")

    def __init__(
        self,
        revision: int,
        cluster: ClusterRecord,
        shards: dict[str, ShardRecord],
        nodes: dict[str, NodeRecord],
        hosts: dict[str, HostRecord] | None = None,
        *,
        moves: dict[str, MoveRecord] | None = None,
    ) -> None:
        self.revision = revision
        self.moves = moves or {}
        self.cluster = cluster
        self.shards = shards
        self.nodes = nodes
        self.hosts = hosts or {}
        spans = sorted(
            (start, end, shard.id) for shard in shards.values() for start, end in shard.ranges
        )
        for start, end, shard_id in spans:
            if not 0 <= start < end <= cluster.slots:
                raise ValueError(f"shard {shard_id}: bad slot range [{start}, {end})")
        self._starts = [start for start, _, _ in spans]
        self._owners = [(end, shard_id) for _, end, shard_id in spans]

    @classmethod
    def from_map(cls, m: PlacementMap) -> Placement:
        return cls(
            m.revision,
            m.cluster,
            {s.id: s for s in m.shards},
            {n.id: n for n in m.nodes},
            {h.id: h for h in m.hosts},
        )

    def to_map(self) -> PlacementMap:
        return PlacementMap(
            self.revision,
            self.cluster,
            list(self.shards.values()),
            list(self.nodes.values()),
            list(self.hosts.values()),
        )

    def shard_for(self, key: str) -> ShardRecord:
        return self.shard_for_slot(slot_of(key, self.cluster.slots))

    def shard_for_slot(self, slot: int) -> ShardRecord:
        i = bisect.bisect_right(self._starts, slot) - 1
        if i >= 0:
            end, shard_id = self._owners[i]
            if slot < end:
                return self.shards[shard_id]
        raise LookupError(f"slot {slot} belongs to no shard")

    def location(self, shard: ShardRecord) -> ShardLocation:
        node = self.nodes.get(shard.owner)
        return ShardLocation(shard.id, shard.epoch, shard.owner, node.rpc if node else "")

    def check(self) -> None:
        """Every slot belongs to exactly one shard."""
        covered = sorted(r for s in self.shards.values() for r in s.ranges)
        at = 0
        for start, end in covered:
            if start != at:
                raise ValueError(f"slots [{at}, {start}) belong to no shard or to two")
            at = end
        if at != self.cluster.slots:
            raise ValueError(f"slots [{at}, {self.cluster.slots}) belong to no shard")


def split_slots(slots: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous, near-equal ranges covering ``[0, slots)``."""
    return [(slots * i // shards, slots * (i + 1) // shards) for i in range(shards)]


def shard_name(n: int) -> str:
    return f"shard-{n:02d}"


__all__ = [
    "DEFAULT_SLOTS",
    "ClusterRecord",
    "HostRecord",
    "MoveRecord",
    "NodeRecord",
    "Placement",
    "PlacementMap",
    "ShardLocation",
    "ShardRecord",
    "shard_name",
    "slot_of",
    "split_slots",
]
