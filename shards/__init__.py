"""The shard server process: the actor pool, the HTTP app, the RPC server, settings."""

from ._http import create_app
from ._metrics import Metrics
from ._routing import shard_dir
from ._rpc import serve_rpc
from ._server import ServerInfo, run_server
from ._settings import SETTINGS, Setting, Settings, settings_from, settings_markdown
from ._supervisor import (
    STARTUP_ERRORS,
    HostInfo,
    default_procs,
    run_supervisor,
    startup_error,
    stopped_starting,
)

__all__ = [
    "SETTINGS",
    "STARTUP_ERRORS",
    "HostInfo",
    "Metrics",
    "ServerInfo",
    "Setting",
    "Settings",
    "create_app",
    "default_procs",
    "run_server",
    "run_supervisor",
    "serve_rpc",
    "settings_from",
    "settings_markdown",
    "shard_dir",
    "startup_error",
    "stopped_starting",
]
