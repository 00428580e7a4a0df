"""The server raises its descriptor limit to what --max-open-actors needs, when it may."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, resource, sys
from shardlite.shards._server import raise_fd_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
wanted = hard + 1000
got = raise_fd_limit(wanted)
print(json.dumps({"hard": hard, "wanted": wanted, "got": got,
                  "now": resource.getrlimit(resource.RLIMIT_NOFILE)}))
"""


def test_the_soft_limit_reaches_the_hard_one_and_past_it_when_privileged() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, timeout=60
    )
    r = json.loads(out.stdout)
    soft_now, hard_now = r["now"]
    assert r["got"] == soft_now
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    if _may_raise_limits() and r["wanted"] <= nr_open:
        assert soft_now == hard_now == r["wanted"]  # raised past the old hard limit
    else:
        assert soft_now == hard_now == r["hard"]  # up to the hard limit, not past it


def _may_raise_limits() -> bool:
    """CAP_SYS_RESOURCE (bit 24) in this process's effective capabilities."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << 24))
    return False
