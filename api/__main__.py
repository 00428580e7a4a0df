"""``python -m shardlite``: the same as the ``shardlite`` command."""

from shardlite.ops.cli import main

main()
