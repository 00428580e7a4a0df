"""Actor classes through real `shardlite serve` processes: HTTP, RPC, kill -9, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import shardlite
from tests.e2e.conftest import wait_until

APP_SOURCE = textwrap.dedent(
    """
    import os
    import trio
    import shardlite

    SIDE = os.environ["SIDE_EFFECTS"]

    def side(what):
        with open(SIDE, "a") as f:
            f.write(what + "\\n")

    class Counter(shardlite.Actor):
        def migrate(self, db):
            db.sql("CREATE TABLE IF NOT EXISTS hits (n INTEGER NOT NULL) STRICT")
            db.sql("CREATE TABLE IF NOT EXISTS fired (name TEXT, at REAL) STRICT")
            db.sql("CREATE TABLE IF NOT EXISTS steps (name TEXT) STRICT")

        @shardlite.method
        def hit(self, by=1):
            self.db.sql("INSERT INTO hits VALUES (?)", [by])
            return self.db.sql("SELECT sum(n) FROM hits").rows[0][0]

        @shardlite.method
        def total(self):
            return self.db.sql("SELECT coalesce(sum(n), 0) FROM hits").rows[0][0]

        @shardlite.method
        def echo(self, *args, **kwargs):
            return {"args": list(args), "kwargs": kwargs}

        @shardlite.method
        async def pull(self, other):
            n = await self.actor(other).call("total")
            self.db.sql("INSERT INTO hits VALUES (?)", [n])
            return n

        @shardlite.method
        def arm(self, name, delay):
            return self.alarms.set(name, delay=delay)

        @shardlite.method
        def fired(self):
            return [r[0] for r in self.db.sql("SELECT name FROM fired").rows]

        def on_alarm(self, name, payload):
            self.db.sql("INSERT INTO fired VALUES (?, unixepoch('subsec'))", [name])

        @shardlite.workflow
        async def pipeline(self, wf, gate):
            def first():
                side("first")
                self.db.sql("INSERT INTO steps VALUES ('first')")
                return 1

            async def second():
                side("second-start")
                while not os.path.exists(gate):
                    await trio.sleep(0.05)
                return 2

            def third():
                side("third")
                self.db.sql("INSERT INTO steps VALUES ('third')")
                return 3

            a = await wf.step("first", first)
            b = await wf.step("second", second)
            await wf.sleep(1.5)
            c = await wf.step("third", third)
            return a + b + c
    """
)


@pytest.fixture
def app_server(tmp_path: Path, start_server: Any) -> Callable[..., Any]:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "counter_app.py").write_text(APP_SOURCE)
    side = tmp_path / "side-effects.txt"
    env = {
        "PYTHONPATH": os.pathsep.join([str(app_dir), os.environ.get("PYTHONPATH", "")]),
        "SIDE_EFFECTS": str(side),
    }

    def start(*args: str) -> Any:
        return start_server("--app", "counter_app:Counter", *args, env=env)

    start.side = side  # type: ignore[attr-defined]
    return start


def test_calls_over_http_and_rpc(app_server: Any) -> None:
    server = app_server("--procs", "2")
    assert "actor classes" in server.log
    http = server.http_url
    r = httpx.post(f"{http}/v1/actors/page-1/call/hit", content=b"{}")
    assert r.status_code == 200 and r.json() == 1
    r = httpx.post(f"{http}/v1/actors/page-1/call/hit", json={"args": [41]})
    assert r.json() == 42
    r = httpx.post(
        f"{http}/v1/actors/page-1/call/echo",
        json={"args": [1, {"$blob": "AAE="}], "kwargs": {"x": [None, True]}},
    )
    assert r.json() == {"args": [1, {"$blob": "AAE="}], "kwargs": {"x": [None, True]}}
    for body, status, code in [
        (b'{"args": 1}', 400, "bad_request"),
        (b"{not json", 400, "bad_request"),
        (b'{"argz": []}', 400, "bad_request"),
    ]:
        r = httpx.post(f"{http}/v1/actors/page-1/call/hit", content=body)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    r = httpx.post(f"{http}/v1/actors/page-1/call/nope", json={})
    assert r.status_code == 404 and "no method 'nope'" in r.json()["error"]["message"]
    r = httpx.post(f"{http}/v1/actors/page-1/call/hit", json={"args": [1, 2, 3]})
    assert r.status_code == 400 and "bad arguments" in r.json()["error"]["message"]

    with shardlite.connect(server.rpc_url) as client:
        assert client.actor("page-1").call("total") == 42
        with pytest.raises(shardlite.NotFound):
            client.actor("page-1").call("migrate")  # not marked @method
        # keys on both processes: an async method calls an actor another process owns
        for i in range(20):
            client.actor(f"src-{i}").call("hit", i)
            assert client.actor(f"dst-{i}").call("pull", f"src-{i}") == i

    async def concurrent() -> None:
        async with shardlite.connect_async(server.rpc_url) as client:

            async def worker() -> None:
                for _ in range(50):
                    await client.actor("hot").call("hit")

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(worker)
            assert await client.actor("hot").call("total") == 400

    trio.run(concurrent)
    with shardlite.connect(server.http_url) as client:  # the HTTP client speaks it too
        assert client.actor("hot").call("hit", 0) == 400


def test_alarm_fires_after_kill_9(app_server: Any) -> None:
    server = app_server("--procs", "1")
    with shardlite.connect(server.rpc_url) as client:
        client.actor("alarmed").call("arm", "wake-up", 2.0)
    server.kill()  # SIGKILL with the alarm pending
    server = app_server("--procs", "1")
    with shardlite.connect(server.rpc_url) as client:
        fired = wait_until(lambda: client.actor("alarmed").call("fired"))
        assert fired == ["wake-up"]


def test_workflow_resumes_after_kill_9_without_repeating_steps(
    app_server: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    server = app_server("--procs", "1")
    with shardlite.connect(server.rpc_url) as client:
        wf = client.actor("flow")
        started = wf.start_workflow("pipeline", str(gate), workflow_id="run-1")
        assert started["status"] == "running"

        def first_done() -> bool:
            steps = wf.workflow("run-1").steps
            return bool(steps) and steps[0].status == "done"

        wait_until(first_done)
        wait_until(lambda: "second-start" in app_server.side.read_text())
    server.kill()  # between steps: 'first' done, 'second' in flight
    gate.touch()
    server = app_server("--procs", "1")
    with shardlite.connect(server.http_url) as client:
        wf = client.actor("flow")

        def completed() -> Any:
            info = wf.workflow("run-1")
            assert info.status != "failed", info
            return info if info.status == "completed" else None

        info = wait_until(completed, timeout=60)
        assert info.result == 6
        assert [s.name for s in info.steps] == ["first", "second", "sleep", "third"]
        assert [w.id for w in wf.workflows()] == ["run-1"]
        again = wf.start_workflow("pipeline", str(gate), workflow_id="run-1")
        assert again["status"] == "completed"  # idempotent by id: no second run
    effects = app_server.side.read_text().split()
    assert effects.count("first") == 1 and effects.count("third") == 1
    r = httpx.get(f"{server.http_url}/v1/actors/flow/workflows/run-1")
    assert r.status_code == 200 and r.json()["status"] == "completed"
    assert [s["name"] for s in r.json()["steps"]] == ["first", "second", "sleep", "third"]
    r = httpx.get(f"{server.http_url}/v1/actors/flow/workflows/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    shown = cli("workflows", "flow", "run-1", "--json", "--url", server.rpc_url)
    assert json.loads(shown.stdout)[0]["status"] == "completed"
    listed = cli("workflows", "flow", "--url", server.http_url)
    assert "run-1" in listed.stdout and "completed" in listed.stdout


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardlite", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_call_and_bad_app(app_server: Any, tmp_path: Path) -> None:
    server = app_server("--procs", "1")
    out = cli("call", "cli-key", "hit", "5", "--url", server.rpc_url)
    assert out.returncode == 0 and json.loads(out.stdout) == 5
    out = cli("call", "cli-key", "nope", "--url", server.rpc_url)
    assert out.returncode != 0 and "no method 'nope'" in out.stderr
    for spec, why in [
        ("no_such_module:X", "cannot import"),
        ("json:dumps", "neither a shardlite.Actor subclass nor an App"),
        ("json", "expected MODULE:OBJECT"),
    ]:
        out = cli("serve", "--data", str(tmp_path / "bad"), "--app", spec)
        assert out.returncode != 0 and why in out.stderr, out.stderr
