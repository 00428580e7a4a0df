"""The shard server process: the actor pool, the HTTP app, the RPC server, settings."""

from ._http import create_app
from ._metrics import Metrics
from ._rpc import serve_rpc
from ._server import ServerInfo, run_server, shard_dir
from ._settings import SETTINGS, Setting, Settings, settings_from, settings_markdown

__all__ = [
    "SETTINGS",
    "Metrics",
    "ServerInfo",
    "Setting",
    "Settings",
    "create_app",
    "run_server",
    "serve_rpc",
    "settings_from",
    "settings_markdown",
    "shard_dir",
]
