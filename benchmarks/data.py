"""Actor files for the benchmarks, built once per suite run and copied for each server.

Creating an actor file costs a few milliseconds (several fdatasyncs), so 10,000 of them
take a while: the first section that needs N files builds them (untimed) with a
``shardlite serve --durability os`` and every later user gets a copy of the closed files.
"""

from __future__ import annotations

import os
import shutil

from shardlite.actor import ActorConfig, Batch, Statement

from . import rpc_load
from .common import CREATE_SQL, INSERT_SQL, serve_shardlite

DEFAULT_PAGE_SIZE = ActorConfig().page_size
"""``shardlite serve --page-size``'s default."""


def actor_files(cache: str, keys: int, dest: str, page_size: int = DEFAULT_PAGE_SIZE) -> str:
    """Copy a data directory holding ``keys`` actor files (table t, one row) to ``dest``."""
    pages = "" if page_size == DEFAULT_PAGE_SIZE else f"-p{page_size}"
    base = os.path.join(cache, f"actors-{keys}{pages}")
    if not os.path.isdir(base):
        building = base + ".building"
        shutil.rmtree(building, ignore_errors=True)
        server, _, port = serve_shardlite(
            building,
            "os",
            *("--max-open-actors", str(keys + 16), "--page-size", str(page_size)),
        )
        with server:
            op = Batch([Statement(CREATE_SQL), Statement(INSERT_SQL, [0, 0])])
            names = [rpc_load.key_name(i) for i in range(keys)]
            r = rpc_load.run(port, rpc_load.templates(names, lambda i: op), once=True)
        if r["errors"] or r["requests"] != keys:
            raise RuntimeError(f"creating {keys} actor files failed: {r}")
        os.rename(building, base)  # only after a clean stop: every file closed
    shutil.copytree(base, dest)
    return dest
