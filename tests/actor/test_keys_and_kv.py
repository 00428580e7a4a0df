"""Keys -> file names (never a path of the tenant's choosing), and the KV API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardlite.actor import (
    MAX_KEY_BYTES,
    ActorPool,
    BadRequest,
    KvDelete,
    KvGet,
    KvList,
    KvPut,
    NotFound,
    TooLarge,
    key_to_relpath,
    relpath_to_key,
    validate_key,
)
from shardlite.actor._keys import resolve_actor_path

BAD_KEYS = [
    "",
    ".",
    "..",
    "../etc/passwd",
    "a/b",
    "a\\b",
    "/abs",
    "nul\x00byte",
    "tab\there",
    "line\nfeed",
    "del\x7f",
    "x" * (MAX_KEY_BYTES + 1),
    "é" * (MAX_KEY_BYTES // 2 + 1),
    "\u202eright-to-left",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_bad_requests(key: str) -> None:
    with pytest.raises(BadRequest):
        validate_key(key)


@pytest.mark.parametrize(
    "key", ["tenant-1", "Acme Corp", "user:42", "%2e%2e", "...", "🙂", "a" * 256]
)
def test_valid_keys_map_to_a_file_inside_the_shard(key: str, tmp_path: Path) -> None:
    validate_key(key)
    path = resolve_actor_path(str(tmp_path), key)
    assert os.path.dirname(os.path.dirname(path)) == str(tmp_path.resolve())
    name = os.path.basename(path)
    assert "/" not in name and not name.startswith(".") and len(name.encode()) <= 255


valid_keys = st.text(
    alphabet=st.characters(
        blacklist_categories=["Cc", "Cf", "Cs", "Zl", "Zp"], blacklist_characters="/\\"
    ),
    min_size=1,
    max_size=60,
).filter(lambda k: k not in (".", "..") and len(k.encode()) <= MAX_KEY_BYTES)


@given(valid_keys)
def test_file_names_are_reversible_and_distinct(key: str) -> None:
    rel = key_to_relpath(key)
    if "~~" in rel:  # too long to escape in full: ends in a hash, the key is stored inside
        assert relpath_to_key(rel) is None
    else:
        assert relpath_to_key(rel) == key
    assert rel.count(os.sep) == 1
    assert key_to_relpath(key + "x") != rel


def test_symlinked_fanout_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = tmp_path / "shard"
    shard.mkdir()
    fanout = os.path.dirname(key_to_relpath("victim"))
    os.symlink(outside, shard / fanout)
    with pytest.raises(BadRequest):
        resolve_actor_path(str(shard), "victim")


async def test_path_like_keys_create_nothing(pool: ActorPool, tmp_path: Path) -> None:
    from shardlite.actor import Sql

    before = set(tmp_path.parent.iterdir())
    for key in ("../escape", "/etc/x", "..", "a/../../b"):
        with pytest.raises(BadRequest):
            await pool.call(key, Sql("CREATE TABLE t(v)"))
    assert set(tmp_path.parent.iterdir()) == before
    assert not [p for p in tmp_path.rglob("*") if p.suffix.startswith(".db")]


async def test_kv_put_get_delete(pool: ActorPool) -> None:
    value = {"n": 1, "list": [1.5, None, True, "x"], "blob": b"\x00\xff"}
    assert (await pool.call("k", KvPut("a", value))).ok
    assert (await pool.call("k", KvGet("a"))).value == value
    await pool.call("k", KvPut("a", "replaced"))
    assert (await pool.call("k", KvGet("a"))).value == "replaced"
    assert (await pool.call("k", KvDelete("a"))).deleted is True
    assert (await pool.call("k", KvDelete("a"))).deleted is False
    with pytest.raises(NotFound):
        await pool.call("k", KvGet("a"))


async def test_kv_list_by_prefix_with_paging(pool: ActorPool) -> None:
    names = ["user:1", "user:2", "user:3", "user;", "usex", "admin", "user:\U0010ffff"]
    for name in names:
        await pool.call("k", KvPut(name, name.upper()))
    items = (await pool.call("k", KvList("user:", 100))).items
    assert [n for n, _ in items] == ["user:1", "user:2", "user:3", "user:\U0010ffff"]
    page1 = (await pool.call("k", KvList("user:", 2))).items
    page2 = (await pool.call("k", KvList("user:", 2, page1[-1][0]))).items
    assert [n for n, _ in page1 + page2] == ["user:1", "user:2", "user:3", "user:\U0010ffff"]
    everything = (await pool.call("k", KvList("", 1000))).items
    assert len(everything) == len(names)
    with pytest.raises(BadRequest):
        await pool.call("k", KvList("", 0))


async def test_kv_limits(pool: ActorPool) -> None:
    with pytest.raises(BadRequest):
        await pool.call("k", KvPut("n" * 5000, 1))
    with pytest.raises(TooLarge):
        await pool.call("k", KvPut("big", b"x" * (3 << 20)))
