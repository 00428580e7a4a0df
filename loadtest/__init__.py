"""The load harness: ``shardlite loadtest`` (scenarios, open and closed loops, HDR
histograms merged across generator processes, JSON and PNG results, PostgreSQL side by
side). See DESIGN.md in this folder."""

from ._cli import loadtest, run_loadtest
from ._spec import LoadSpec, parse_target

__all__ = ["LoadSpec", "loadtest", "parse_target", "run_loadtest"]
