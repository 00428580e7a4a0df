"""The directory's KvStore contract and the Directory on it: one suite, both backends.

Every test that takes ``directory_url`` runs on the embedded ``sqlite:`` file and on a
real etcd (``conftest.py``). Lease expiry is waited for by polling with generous bounds:
etcd counts TTLs in whole seconds and expires leases on its own schedule.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trio

from shardlite.router._directory import (
    PREFIX,
    Directory,
    open_directory,
    open_lease,
    parse_directory_url,
)
from shardlite.router._etcd import EtcdKv
from shardlite.router._kv import Delete, DirectoryUnavailable, KvStore, Put
from shardlite.router._placement import HostRecord, NodeRecord, ShardRecord, slot_of

WAIT_S = 15.0  # bound on anything that waits for the store (expiry, a watch)
OPEN_FAST_S = 5.0  # an unreachable etcd must be reported within this


@pytest.fixture
async def directory(directory_url: str) -> AsyncIterator[Directory]:
    async with open_directory(directory_url) as d:
        yield d


def short_ttl(kv: KvStore) -> float:
    """The shortest lease each backend keeps honestly (etcd: whole seconds, at least 1)."""
    return 1.0 if kv.url.startswith("etcd://") else 0.3


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S} s"
        await trio.sleep(0.1)


async def keys(kv: KvStore, prefix: str = PREFIX) -> list[str]:
    return [e.key for e in (await kv.get_prefix(prefix))[1]]


# --- the KvStore contract


async def test_get_prefix_sorts_by_key_and_the_revision_grows(directory: Directory) -> None:
    kv = directory.kv
    rev0, entries = await kv.get_prefix(PREFIX + "t/")
    assert entries == []
    names = ["t/b", "t/a", "t/é", "t/a/1", "t/Z", "t/"]
    revisions = []
    for i, name in enumerate(names):
        assert await kv.txn([], [Put(PREFIX + name, b"v%d" % i)])
        revisions.append((await kv.get_prefix(PREFIX + "t/"))[0])
    assert rev0 < revisions[0] and revisions == sorted(set(revisions))
    assert await kv.txn([], [Put(PREFIX + "u/x", b""), Put(PREFIX + "t", b"")])  # not under t/

    rev, entries = await kv.get_prefix(PREFIX + "t/")
    assert rev > revisions[-1]
    assert [e.key for e in entries] == sorted(PREFIX + n for n in names)
    for e in entries:
        i = names.index(e.key.removeprefix(PREFIX))
        assert (e.value, e.mod_revision, e.lease) == (b"v%d" % i, revisions[i], 0)
    empty = (await kv.get_prefix(PREFIX + "u/"))[1]
    assert [(e.key, e.value) for e in empty] == [(PREFIX + "u/x", b"")]


async def test_txn_applies_all_or_nothing_on_its_compares(directory: Directory) -> None:
    kv = directory.kv
    key, other = PREFIX + "cas", PREFIX + "other"
    assert await kv.txn([(key, 0)], [Put(key, b"1")])  # absent: compares as 0
    rev, [entry] = await kv.get_prefix(key)

    assert not await kv.txn([(key, 0)], [Put(key, b"2"), Put(other, b"x")])
    assert not await kv.txn([(key, entry.mod_revision + 1)], [Put(key, b"2")])
    assert not await kv.txn([(key, entry.mod_revision), (other + "x", 5)], [Delete(key)])
    after, entries = await kv.get_prefix(PREFIX)
    assert after == rev and entries == [entry]  # failed: nothing written, no revision

    assert await kv.txn([(key, entry.mod_revision), (other, 0)], [Put(key, b"2"), Put(other, b"x")])
    rev2, entries = await kv.get_prefix(PREFIX)
    assert rev2 > rev
    assert [(e.key, e.value, e.mod_revision) for e in entries] == [
        (key, b"2", rev2),
        (other, b"x", rev2),  # one transaction: one revision
    ]


async def test_delete(directory: Directory) -> None:
    kv = directory.kv
    a, b = PREFIX + "a", PREFIX + "b"
    assert await kv.txn([], [Put(a, b"1"), Put(b, b"2")])
    rev, [entry_a, _] = await kv.get_prefix(PREFIX)
    assert await kv.txn([(a, entry_a.mod_revision)], [Delete(a)])
    rev2, entries = await kv.get_prefix(PREFIX)
    assert rev2 > rev and [e.key for e in entries] == [b]
    assert await kv.txn([(a, 0)], [Delete(a)])  # deleting what is absent is no error
    assert await kv.txn([(a, 0)], [Put(a, b"again")])
    assert await keys(kv) == [a, b]


async def test_revoke_deletes_the_keys_of_the_lease(directory: Directory) -> None:
    kv = directory.kv
    lease = await kv.grant(30)
    assert lease != 0
    await kv.txn([], [Put(PREFIX + "l/a", b"", lease), Put(PREFIX + "l/b", b"", lease)])
    await kv.txn([], [Put(PREFIX + "l/c", b"")])
    _, entries = await kv.get_prefix(PREFIX)
    assert [(e.key, e.lease) for e in entries] == [
        (PREFIX + "l/a", lease),
        (PREFIX + "l/b", lease),
        (PREFIX + "l/c", 0),
    ]
    assert await kv.keepalive(lease)
    await kv.revoke(lease)
    assert await keys(kv) == [PREFIX + "l/c"]
    assert not await kv.keepalive(lease)
    await kv.revoke(lease)  # again: nothing left to do, no error
    with pytest.raises(DirectoryUnavailable):
        await kv.txn([], [Put(PREFIX + "l/d", b"", lease)])
    assert await keys(kv) == [PREFIX + "l/c"]


async def test_an_expired_lease_takes_its_keys_and_cannot_be_used(directory: Directory) -> None:
    kv = directory.kv
    lease = await kv.grant(short_ttl(kv))
    await kv.txn([], [Put(PREFIX + "gone", b"", lease), Put(PREFIX + "stays", b"")])

    async def expired() -> bool:
        return await keys(kv) == [PREFIX + "stays"]

    await eventually(expired, "expired")
    assert not await kv.keepalive(lease)
    with pytest.raises(DirectoryUnavailable):
        await kv.txn([], [Put(PREFIX + "gone", b"", lease)])
    assert await keys(kv) == [PREFIX + "stays"]


async def test_keepalive_keeps_the_keys(directory: Directory) -> None:
    kv = directory.kv
    ttl = short_ttl(kv)
    lease = await kv.grant(ttl)
    await kv.txn([], [Put(PREFIX + "kept", b"", lease)])
    end = time.monotonic() + 2 * ttl
    while time.monotonic() < end:
        assert await kv.keepalive(lease)
        await trio.sleep(ttl / 5)
    assert await keys(kv) == [PREFIX + "kept"]
    await kv.revoke(lease)


async def test_wait_revision_wakes_on_a_change_and_times_out(directory_url: str) -> None:
    async with open_directory(directory_url) as reader, open_directory(directory_url) as writer:
        rev, _ = await reader.kv.get_prefix(PREFIX)

        async def write_soon() -> None:
            await trio.sleep(0.3)
            await writer.kv.txn([], [Put(PREFIX + "w", b"1")])

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_soon)
            woke = await reader.wait_change(rev, WAIT_S)
        assert time.monotonic() - started < WAIT_S / 2
        now, _ = await reader.kv.get_prefix(PREFIX)
        assert woke > rev and woke == now

        started = time.monotonic()
        assert await reader.wait_change(rev, WAIT_S) == now  # already past: at once
        assert time.monotonic() - started < WAIT_S / 2

        started = time.monotonic()
        assert await reader.wait_change(now, 0.5) == now  # nothing changes: the timeout
        assert 0.4 < time.monotonic() - started < WAIT_S / 2


# --- the Directory


async def test_the_first_cluster_wins_and_covers_every_slot(directory_url: str) -> None:
    async with open_directory(directory_url) as a, open_directory(directory_url) as b:
        assert await a.load() is None
        won: dict[str, bool] = {}

        async def create(name: str, d: Directory, shards: int) -> None:
            won[name] = await d.create_cluster(4096, shards, [f"{name}-1", f"{name}-2"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create, "a", a, 8)
            nursery.start_soon(create, "b", b, 5)
        assert sorted(won.values()) == [False, True]
        winner = "a" if won["a"] else "b"
        placement = await a.load()
        assert placement is not None
        assert not await b.create_cluster(4096, 3, ["late"])
        again = await b.load()
        assert again is not None and again.cluster == placement.cluster
        assert again.shards == placement.shards and again.revision == placement.revision

    assert placement.cluster.slots == 4096
    assert len(placement.shards) == (8 if winner == "a" else 5)
    covered = [0] * 4096
    for shard in placement.shards.values():
        assert shard.epoch == 1 and shard.owner.startswith(winner)
        for start, end in shard.ranges:
            for slot in range(start, end):
                covered[slot] += 1
    assert covered == [1] * 4096
    placement.check()
    owners = [placement.shards[s].owner for s in sorted(placement.shards)]
    assert owners[:2] == [f"{winner}-1", f"{winner}-2"]  # round-robin
    for key in ["tenant-1", "Acme Corp", "🙂"]:
        shard = placement.shard_for(key)
        assert any(s <= slot_of(key, 4096) < e for s, e in shard.ranges)


async def test_only_one_of_two_racing_shard_changes_wins(directory_url: str) -> None:
    async with open_directory(directory_url) as a, open_directory(directory_url) as b:
        assert await a.create_cluster(64, 2, ["n1"])
        pa, pb = await a.load(), await b.load()
        assert pa is not None and pb is not None
        won: dict[str, bool] = {}

        async def move(owner: str, d: Directory, shard: ShardRecord) -> None:
            new = ShardRecord(shard.id, shard.ranges, owner, shard.epoch + 1)
            won[owner] = await d.cas_shard(shard, new)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(move, "to-a", a, pa.shards["shard-00"])
            nursery.start_soon(move, "to-b", b, pb.shards["shard-00"])
        assert sorted(won.values()) == [False, True]
        if won["to-a"]:
            winner, loser, stale_dir, stale = "to-a", "to-b", b, pb.shards["shard-00"]
        else:
            winner, loser, stale_dir, stale = "to-b", "to-a", a, pa.shards["shard-00"]
        async with open_directory(directory_url) as c:
            now = await c.load()
        assert now is not None
        assert (now.shards["shard-00"].owner, now.shards["shard-00"].epoch) == (winner, 2)
        assert now.shards["shard-01"] == pa.shards["shard-01"]

        # the loser, still holding the stale record, loses again; after a reload it can win
        retry = ShardRecord(stale.id, stale.ranges, loser, 2)
        assert not await stale_dir.cas_shard(stale, retry)
        fresh = await stale_dir.load()
        assert fresh is not None
        current = fresh.shards["shard-00"]
        assert await stale_dir.cas_shard(current, ShardRecord(current.id, current.ranges, loser, 3))
        with pytest.raises(ValueError):
            await stale_dir.cas_shard(current, ShardRecord(current.id, current.ranges, loser, 9))


async def test_nodes_and_hosts_live_as_long_as_their_lease(directory: Directory) -> None:
    assert await directory.create_cluster(16, 1, ["h1/0"])
    lease = await open_lease(directory, ttl_s=30)
    node = NodeRecord("h1/0", "h1", "127.0.0.1:7001", "127.0.0.1:8001", 1234, time.time())
    host = HostRecord("h1", "127.0.0.1:7000", "127.0.0.1:8000")
    await directory.put_node(node, lease.id)
    await directory.put_host(host, lease.id)
    placement = await directory.load()
    assert placement is not None
    assert placement.nodes == {"h1/0": node} and placement.hosts == {"h1": host}
    assert placement.location(placement.shards["shard-00"]).rpc == "127.0.0.1:7001"
    assert lease.valid

    await lease.revoke()
    placement = await directory.load()
    assert placement is not None and placement.nodes == {} and placement.hosts == {}
    assert len(placement.shards) == 1  # the shards are not leased
    with pytest.raises(DirectoryUnavailable):
        await directory.put_node(node, lease.id)


# --- URLs and failures


async def test_unknown_or_empty_urls_are_value_errors() -> None:
    for url in ["redis://127.0.0.1:6379", "etcd://", "sqlite:", "127.0.0.1:2379"]:
        with pytest.raises(ValueError, match="URL"):
            async with open_directory(url):
                pass
    assert parse_directory_url("etcd://a:1,b:2", ".") == ("etcd", "http://a:1,http://b:2")


async def test_an_unreachable_etcd_fails_fast_naming_the_url(unused_port: int) -> None:
    url = f"etcd://127.0.0.1:{unused_port}"
    started = time.monotonic()
    with pytest.raises(DirectoryUnavailable, match=re.escape(url) + " is unreachable"):
        async with open_directory(url):
            pass
    assert time.monotonic() - started < OPEN_FAST_S


async def test_a_dead_etcd_endpoint_is_skipped(etcd_url: str, unused_port: int) -> None:
    url = f"etcd://127.0.0.1:{unused_port},{etcd_url.removeprefix('etcd://')}"
    async with open_directory(url) as d:
        assert d.url == url
        rev, _ = await d.kv.get_prefix(PREFIX)
        assert await d.kv.txn([], [Put(PREFIX + "failover", b"")])
        assert (await d.kv.get_prefix(PREFIX))[0] > rev
        await d.kv.txn([], [Delete(PREFIX + "failover")])


def _fake_etcd(answer: Callable[[httpx.Request], httpx.Response]) -> EtcdKv:
    return EtcdKv("http://etcd.invalid:2379", transport=httpx.MockTransport(answer))


@pytest.mark.parametrize(
    "answer",
    [
        lambda r: httpx.Response(503, text="Service Unavailable"),
        lambda r: httpx.Response(500, json={"error": "etcdserver: no leader", "code": 14}),
        lambda r: httpx.Response(200, text="{not json"),
        lambda r: httpx.Response(200, json={"kvs": [{"key": 5}]}),
        lambda r: httpx.Response(200, json=[1, 2]),
    ],
    ids=["503", "500-json", "bad-json", "bad-fields", "not-an-object"],
)
async def test_bad_etcd_answers_are_directory_unavailable(
    answer: Callable[[httpx.Request], httpx.Response],
) -> None:
    kv = _fake_etcd(answer)
    try:
        with pytest.raises(DirectoryUnavailable, match=re.escape("etcd://etcd.invalid:2379")):
            await kv.get_prefix(PREFIX)
        with pytest.raises(DirectoryUnavailable, match=re.escape("etcd://etcd.invalid:2379")):
            await kv.wait_revision(1, 1.0)
    finally:
        await kv.aclose()


async def test_a_read_timeout_is_directory_unavailable() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    kv = _fake_etcd(answer)
    try:
        with pytest.raises(DirectoryUnavailable, match="ReadTimeout"):
            await kv.grant(5)
    finally:
        await kv.aclose()
