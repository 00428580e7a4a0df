"""The ``shardlite`` command line (``shardlite.ops.cli:main``): serve, sql, settings."""
