"""``python -m shardlite.shards._child``: a shard process started by the supervisor."""

from shardlite.shards._supervisor import child_main

child_main()
