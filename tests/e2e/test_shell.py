"""`shardlite shell KEY` against a real server: statements split like the sqlite3 shell's,
errors that let the shell go on but fail its exit status, dot commands, JSON lines, both
transports, and prompts only on a terminal."""

from __future__ import annotations

import base64
import itertools
import os
import pty
import select
import signal
import subprocess
import sys
from typing import Any

import msgspec
import pytest
from click.testing import CliRunner, Result

import shardlite
from shardlite.ops._shell import shell
from tests.conftest import free_port
from tests.e2e.conftest import IO_TIMEOUT_S

_keys = itertools.count()


@pytest.fixture(params=["rpc", "http"])
def url(request: pytest.FixtureRequest, module_server: Any) -> str:
    return str(module_server.rpc_url if request.param == "rpc" else module_server.http_url)


@pytest.fixture
def key() -> str:
    return f"shell-{next(_keys)}"


def run(url: str, key: str, script: str, *args: str) -> Result:
    return CliRunner().invoke(shell, [key, "--url", url, *args], input=script)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in text.splitlines()]


def test_piped_statements_span_lines_and_share_lines(url: str, key: str) -> None:
    script = (
        "CREATE TABLE t(\n"
        "  id INTEGER PRIMARY KEY,\n"
        "  v TEXT\n"
        ");\n"
        "INSERT INTO t(v) VALUES ('semi;colon'); INSERT INTO t(v) VALUES ('two');\n"
        "SELECT id, v FROM t ORDER BY id;\n"
    )
    result = run(url, key, script)
    assert result.exit_code == 0, result.output
    assert "semi;colon" in result.stdout and "two" in result.stdout
    assert "2 row(s)" in result.stdout
    assert f"{key}>" not in result.stdout and "...>" not in result.stdout
    with shardlite.connect(url) as client:
        assert client.actor(key).sql("SELECT v FROM t ORDER BY id").rows == [
            ("semi;colon",),
            ("two",),
        ]


def test_failing_statement_prints_error_and_the_shell_goes_on(url: str, key: str) -> None:
    script = "CREATE TABLE t(v UNIQUE);\nINSERT INTO t VALUES (1);\nSELEC 1;\n"
    script += "INSERT INTO t VALUES (1);\nSELECT 'still here';\n"
    result = run(url, key, script)
    assert result.exit_code == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 2, result.stderr
    assert errors[0].startswith("Error: sql_error: ") and "SELEC" in errors[0]
    assert errors[1].startswith("Error: constraint: ")
    assert "still here" in result.stdout


def test_last_statement_may_go_without_its_semicolon(url: str, key: str) -> None:
    result = run(url, key, "SELECT 40 + 2 AS answer\n", "--json")
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout) == [
        {"columns": ["answer"], "rows": [[42]], "changes": 0, "last_insert_rowid": 0}
    ]


def test_comments_alone_send_nothing(url: str, key: str) -> None:
    result = run(url, key, "-- a comment\n/* another */ ;\n-- and a last one", "--json")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


def test_json_prints_one_object_per_statement_with_blobs(url: str, key: str) -> None:
    script = "CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB);\n"
    script += "INSERT INTO t(b) VALUES (x'00ff10');\nSELECT id, b FROM t;\n"
    result = run(url, key, script, "--json")
    assert result.exit_code == 0, result.output
    create, insert, select_ = json_lines(result.stdout)
    assert create == {"columns": [], "rows": [], "changes": 0, "last_insert_rowid": 0}
    assert (insert["changes"], insert["last_insert_rowid"]) == (1, 1)
    blob = {"$blob": base64.b64encode(b"\x00\xff\x10").decode()}
    assert select_["columns"] == ["id", "b"] and select_["rows"] == [[1, blob]]


def test_tables_show_blobs_as_hex(url: str, key: str) -> None:
    result = run(url, key, "SELECT x'cafe' AS b, NULL AS n;\n")
    assert result.exit_code == 0, result.output
    assert "x'cafe'" in result.stdout and "NULL" in result.stdout


def test_tables_and_schema_list_only_user_objects(url: str, key: str) -> None:
    with shardlite.connect(url) as client:
        actor = client.actor(key)
        actor.kv.put("hidden", 1)  # creates the actor's internal _shardlite_kv table
        actor.sql("CREATE TABLE t(a, b)")
        actor.sql("CREATE INDEX t_a ON t(a)")
        actor.sql("CREATE TABLE u(x)")
        actor.sql("CREATE VIEW v AS SELECT a FROM t")
    result = run(url, key, ".tables\n.schema t\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "t",
        "u",
        "v",
        "CREATE TABLE t(a, b);",
        "CREATE INDEX t_a ON t(a);",
    ]


def test_mode_switches_between_tables_and_json(url: str, key: str) -> None:
    result = run(url, key, ".mode\n.mode json\nSELECT 7 AS n;\n.mode\n.mode table\nSELECT 8;\n")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "table",
        '{"columns":["n"],"rows":[[7]],"changes":0,"last_insert_rowid":0}',
        "json",
    ]
    assert "│ 8 │" in result.stdout


def test_bad_dot_commands_are_errors_and_the_shell_goes_on(url: str, key: str) -> None:
    result = run(url, key, ".nope\n.mode xml\nSELECT 'after' AS a;\n", "--json")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: unknown or malformed command '.nope'; try .help",
        "Error: usage: .mode table|json",
    ]
    assert json_lines(result.stdout)[0]["rows"] == [["after"]]


def test_help_lists_the_dot_commands(url: str, key: str) -> None:
    result = run(url, key, ".help\n")
    assert result.exit_code == 0, result.output
    for command in (".exit", ".quit", ".help", ".mode", ".schema", ".tables"):
        assert command in result.stdout


def test_quit_stops_reading(url: str, key: str) -> None:
    result = run(url, key, "SELECT 1 AS a;\n.quit\nCREATE TABLE never(x);\n", "--json")
    assert result.exit_code == 0, result.output
    assert len(json_lines(result.stdout)) == 1
    with shardlite.connect(url) as client:
        names = client.actor(key).sql("SELECT name FROM sqlite_schema").rows
    assert ("never",) not in names


@pytest.mark.parametrize("bad_url", ["rpc://127.0.0.1:{port}", "http://127.0.0.1:{port}"])
def test_unreachable_server_fails_in_one_line(bad_url: str) -> None:
    target = bad_url.format(port=free_port())
    result = CliRunner().invoke(shell, ["k", "--url", target], input="SELECT 1;\n")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: cannot reach {target}: ")
    assert len(result.stderr.splitlines()) == 1


def test_bad_url_is_a_usage_error() -> None:
    result = CliRunner().invoke(shell, ["k", "--url", "ftp://x"], input="")
    assert result.exit_code == 2
    assert "--url" in result.stderr and "rpc://HOST:PORT" in result.stderr


def test_python_m_shardlite_shell_reads_piped_stdin(module_server: Any, key: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shardlite", "shell", key, "--url", module_server.rpc_url],
        input="CREATE TABLE t(v);\nINSERT INTO t VALUES ('piped');\nSELECT v FROM t;\n",
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT_S * 3,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "piped" in done.stdout and done.stderr == ""
    assert f"{key}>" not in done.stdout


class Terminal:
    """The shell on a pseudo-terminal: what a person at the keyboard sees."""

    def __init__(self, url: str, key: str) -> None:
        self.fd, child = pty.openpty()
        cmd = [sys.executable, "-m", "shardlite", "shell", key, "--url", url]
        # Ctrl-C as at a terminal, even when pytest runs with SIGINT ignored (a background
        # job of a non-interactive shell does): an ignored signal stays ignored across
        # exec, and Python then installs no KeyboardInterrupt handler. A handled one is
        # reset to the default, so handle it here while the child starts.
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self.proc = subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child)
        finally:
            signal.signal(signal.SIGINT, previous)
        os.close(child)

    def read_until(self, text: str) -> str:
        seen = b""
        while text.encode() not in seen:
            ready, _, _ = select.select([self.fd], [], [], IO_TIMEOUT_S)
            try:
                chunk = os.read(self.fd, 4096) if ready else b""
            except OSError:  # EIO: the shell exited and closed the terminal
                chunk = b""
            assert chunk, f"no {text!r} on the terminal; saw {seen.decode(errors='replace')!r}"
            seen += chunk
        return seen.decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> int:
        code = self.proc.wait(IO_TIMEOUT_S)
        os.close(self.fd)
        return code


def test_terminal_shows_prompts_and_ctrl_c_drops_the_pending_statement(
    module_server: Any, key: str
) -> None:
    term = Terminal(module_server.rpc_url, key)
    try:
        term.read_until(f"{key}> ")
        term.type("SELECT 'dropped'\n")
        term.read_until("   ...> ")
        term.proc.send_signal(signal.SIGINT)
        term.read_until(f"{key}> ")
        term.type("SELECT 'kept';\n")
        shown = term.read_until(f"{key}> ")
        assert "kept" in shown.split("SELECT 'kept';")[1]
        assert "dropped" not in shown.split("SELECT 'kept';")[1]
        term.type("\x04")  # Ctrl-D: end of input
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait(IO_TIMEOUT_S)
