"""The ``shardlite`` command line: serve, sql and (later) the ops verbs."""

from .cli import main

__all__ = ["main"]
