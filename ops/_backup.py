"""``shardlite ops backup``, ``restore`` and ``verify``.

A backup of a shard (or of one key) is a directory: each actor's file as the backup API
copied it on its owner (consistent per actor: every actor is its own database, like a
Litestream replica per file) and ``manifest.json`` with each file's key, size and sha256.
``restore`` checks everything before it touches anything live: the manifest, every
file's size, sha256, ``integrity_check`` and the key stored inside, and that each key
belongs to the shard being restored; then each file replaces its actor's, one at a time,
through the actor (the server checks it again).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid
from typing import Any

import trio

from shardlite.actor import check_actor_file, key_to_relpath, sha256_file
from shardlite.router import Directory, Placement, ShardRecord, wire

from ._nodes import Nodes, OpsError, find_shard, owner_address

FORMAT = "shardlite-backup"
VERSION = 1
MANIFEST = "manifest.json"
CHUNK_BYTES = 4 << 20
UPLOAD_BYTES = 1 << 20


async def _target(directory: Directory, name: str) -> tuple[Placement, ShardRecord, str | None]:
    """(placement, shard, key or None) for a shard id or an actor key."""
    placement = await directory.load()
    if placement is None:
        raise OpsError(f"the directory {directory.url} holds no cluster yet")
    if name in placement.shards:
        return placement, placement.shards[name], None
    return placement, placement.shard_for(name), name


async def backup(
    directory: Directory, nodes: Nodes, name: str, into: str, echo: Any
) -> dict[str, Any]:
    placement, shard, key = await _target(directory, name)
    owner = owner_address(placement, shard)
    keys = [key] if key is not None else (await nodes.ask(owner, wire.ShardKeys(shard.id))).keys
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    label = shard.id if key is None else "key-" + key_to_relpath(key).split("/")[1][:-3]
    out = os.path.join(into, f"{label}-{stamp}")
    os.makedirs(out, mode=0o700, exist_ok=False)
    actors = []
    total = 0
    for i, k in enumerate(keys):
        info = await nodes.ask(owner, wire.Snapshot(k, CHUNK_BYTES))
        if not info.exists:
            continue  # deleted since it was listed
        rel = os.path.join("files", key_to_relpath(k))
        path = os.path.join(out, rel)
        digest = hashlib.sha256(info.data)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        async with await trio.open_file(path, "wb") as f:
            await f.write(info.data)
            offset = len(info.data)
            while offset < info.size:
                chunk = await nodes.ask(owner, wire.ReadChunk(info.id, offset, CHUNK_BYTES))
                if not chunk.data:
                    raise OpsError(f"the copy of {k!r} ended early")
                await f.write(chunk.data)
                digest.update(chunk.data)
                offset += len(chunk.data)
            await f.flush()
            await trio.to_thread.run_sync(os.fsync, f.fileno())
        if digest.hexdigest() != info.sha256:
            raise OpsError(f"the copy of {k!r} does not match the owner's checksum")
        actors.append({"key": k, "file": rel, "size": info.size, "sha256": info.sha256})
        total += info.size
        if (i + 1) % 500 == 0:
            echo(f"  {i + 1}/{len(keys)} actors, {total / 1e6:.1f} MB")
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": stamp,
        "cluster": placement.cluster.id,
        "slots": placement.cluster.slots,
        "shard": shard.id,
        "ranges": [list(r) for r in shard.ranges],
        "epoch": shard.epoch,
        "key": key,
        "actors": actors,
    }
    await trio.to_thread.run_sync(_write_manifest, out, manifest)
    return {"path": out, "shard": shard.id, "actors": len(actors), "bytes": total}


def _write_manifest(out: str, manifest: dict[str, Any]) -> None:
    with open(os.path.join(out, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out, MANIFEST + ".tmp"), os.path.join(out, MANIFEST))


def check_backup(path: str) -> dict[str, Any]:
    """The manifest, after every file of it was checked; OpsError saying what is wrong."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise OpsError(f"{path} is not a shardlite backup (no {MANIFEST})") from None
    except ValueError as exc:
        raise OpsError(f"{path}/{MANIFEST} is damaged: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise OpsError(f"{path}: not a {FORMAT} version {VERSION} manifest")
    base = os.path.abspath(path)
    for actor in manifest["actors"]:
        file = os.path.abspath(os.path.join(base, actor["file"]))
        if not file.startswith(base + os.sep):
            raise OpsError(f"{path}: the manifest points outside the backup ({actor['file']})")
        try:
            size = os.path.getsize(file)
        except FileNotFoundError:
            raise OpsError(f"{path}: {actor['file']} (actor {actor['key']!r}) is missing") from None
        if size != actor["size"]:
            raise OpsError(
                f"{path}: {actor['file']} is {size} bytes, the manifest says {actor['size']}"
            )
        if sha256_file(file) != actor["sha256"]:
            raise OpsError(f"{path}: {actor['file']} does not match its sha256 (damaged)")
        problem = check_actor_file(file, actor["key"])
        if problem:
            raise OpsError(f"{path}: {actor['file']}: {problem}")
        actor["path"] = file
    return manifest


async def restore(
    directory: Directory, nodes: Nodes, name: str, source: str, *, replace: bool, echo: Any
) -> dict[str, Any]:
    manifest = await trio.to_thread.run_sync(check_backup, source)
    placement, shard, key = await _target(directory, name)
    actors = manifest["actors"]
    if key is not None:
        actors = [a for a in actors if a["key"] == key]
        if not actors:
            raise OpsError(f"the backup {source} holds no actor {key!r}")
    for actor in actors:
        belongs = placement.shard_for(actor["key"]).id
        if belongs != shard.id:
            raise OpsError(
                f"the backup holds actor {actor['key']!r}, which belongs to {belongs}, not "
                f"{shard.id}: restore the backup into {belongs}"
            )
    owner = owner_address(placement, shard)
    if key is None and not replace:
        present = (await nodes.ask(owner, wire.ShardKeys(shard.id))).keys
        if present:
            raise OpsError(
                f"{shard.id} holds {len(present)} actors: restore into an empty shard, or "
                "pass --replace to overwrite the actors the backup holds"
            )
    total = 0
    for i, actor in enumerate(actors):
        upload = uuid.uuid4().hex
        async with await trio.open_file(actor["path"], "rb") as f:
            offset = 0
            while True:
                data = await f.read(UPLOAD_BYTES)
                if not data and offset:
                    break
                await nodes.ask(owner, wire.Upload(upload, offset, data))
                offset += len(data)
                if not data:
                    break
        await nodes.ask(
            owner, wire.RestoreActor(actor["key"], upload, actor["size"], actor["sha256"])
        )
        total += actor["size"]
        if (i + 1) % 500 == 0:
            echo(f"  {i + 1}/{len(actors)} actors restored")
    return {"shard": shard.id, "actors": len(actors), "bytes": total, "from": source}


async def verify(directory: Directory, nodes: Nodes, name: str | None) -> list[dict[str, Any]]:
    placement = await directory.load()
    if placement is None:
        raise OpsError(f"the directory {directory.url} holds no cluster yet")
    shards = (
        [find_shard(placement, name)]
        if name
        else sorted(placement.shards.values(), key=lambda s: s.id)
    )
    rows = []
    for shard in shards:
        row: dict[str, Any] = {"shard": shard.id, "owner": shard.owner}
        try:
            result = await nodes.ask(owner_address(placement, shard), wire.VerifyShard(shard.id))
        except Exception as exc:  # a shard whose owner is down is reported, not skipped
            row.update(checked=None, problems={}, log_problems={}, error=str(exc))
        else:
            row.update(
                checked=result.checked,
                problems=result.problems,
                log_problems=result.log_problems,
                error=None,
            )
        rows.append(row)
    return rows


__all__ = ["backup", "check_backup", "restore", "verify"]
