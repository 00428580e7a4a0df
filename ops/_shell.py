"""``shardlite shell KEY``: interactive SQL on one actor, wherever it lives.

It follows the sqlite3 shell: a statement ends at a ``;`` that ``apsw.complete`` accepts,
so it may span lines and a line may hold several; a line starting with ``.`` is a dot
command when no statement is pending; prompts appear only on a terminal, so piped input
prints results alone. Each statement is one ``actor.sql`` call. A failing statement
prints ``Error: CODE: MESSAGE`` and the shell goes on, as sqlite3 does without
``-bail``, but the exit status is 1 so that scripts see it.
"""

from __future__ import annotations

import re
import socket
import sys

import apsw
import click
import httpx
import msgspec

from shardlite.actor import Error, SqlResult
from shardlite.router import ActorHandle, Client, connect

from ._output import jsonable, print_result

__all__ = ["shell"]

CONTINUATION_PROMPT = "   ...> "
CONNECT_TIMEOUT_S = 5.0
MODES = ("table", "json")

_BLANK = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)
"""Whitespace and comments only: nothing to send."""

_HIDDEN = r"name NOT LIKE 'sqlite_%' AND name NOT LIKE '\_shardlite%' ESCAPE '\'"
TABLES_SQL = (
    f"SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') AND {_HIDDEN} ORDER BY name"
)
SCHEMA_SQL = f"SELECT sql FROM sqlite_schema WHERE sql IS NOT NULL AND {_HIDDEN}"

HELP = """\
.exit, .quit       Leave the shell
.help              Show this message
.mode [table|json] Show or set how results are printed
.schema [TABLE]    Show the CREATE statements (of TABLE and its indexes)
.tables            List the tables and views
SQL statements end with ';' and may span lines; Ctrl-C drops a pending statement."""


def is_blank(text: str) -> bool:
    """True if ``text`` holds nothing but whitespace and comments."""
    return _BLANK.fullmatch(text) is not None


def split_statements(text: str) -> tuple[list[str], str]:
    """The complete statements at the start of ``text``, and the incomplete rest."""
    statements: list[str] = []
    start = 0
    for i, char in enumerate(text):
        if char == ";" and apsw.complete(text[start : i + 1]):
            statement = text[start : i + 1].strip()
            if not is_blank(statement[:-1]):
                statements.append(statement)
            start = i + 1
    return statements, text[start:]


class Session:
    """One actor, an output mode, and whether any statement failed."""

    def __init__(self, actor: ActorHandle, url: str, mode: str) -> None:
        self.actor = actor
        self.url = url
        self.mode = mode
        self.failed = False

    def query(self, sql: str, params: list[str] | None = None) -> SqlResult | None:
        """The statement's result, or None after printing why it failed."""
        try:
            return self.actor.sql(sql, params)
        except Error as exc:
            self.error(f"{exc.code}: {exc.message}")
        except (OSError, httpx.TransportError) as exc:
            self.error(f"unavailable: cannot reach {self.url}: {exc}")
        return None

    def error(self, text: str) -> None:
        self.failed = True
        click.echo(f"Error: {text}", err=True)

    def run(self, sql: str) -> None:
        result = self.query(sql)
        if result is None:
            return
        if self.mode == "json":
            body = {
                "columns": result.columns,
                "rows": jsonable(result.rows),
                "changes": result.changes,
                "last_insert_rowid": result.last_insert_rowid,
            }
            click.echo(msgspec.json.encode(body).decode())
        else:
            print_result(result, False)

    def dot(self, line: str) -> bool:
        """Run a dot command; False when it asks to leave."""
        command, *args = line.split()
        if command in (".quit", ".exit"):
            return False
        if command == ".help":
            click.echo(HELP)
        elif command == ".tables":
            result = self.query(TABLES_SQL)
            for row in result.rows if result else []:
                click.echo(row[0])
        elif command == ".schema" and len(args) <= 1:
            sql = SCHEMA_SQL + (" AND tbl_name LIKE ?" if args else "") + " ORDER BY tbl_name"
            result = self.query(sql, args)
            for row in result.rows if result else []:
                click.echo(f"{row[0]};")
        elif command == ".mode" and not args:
            click.echo(self.mode)
        elif command == ".mode" and len(args) == 1 and args[0] in MODES:
            self.mode = args[0]
        elif command == ".mode":
            self.error(f"usage: .mode {'|'.join(MODES)}")
        else:
            self.error(f"unknown or malformed command {line.strip()!r}; try .help")
        return True


def _read_line(prompt: str | None) -> str:
    """One line of input ('' at end of input), after the prompt if there is one."""
    if prompt is not None:
        click.echo(prompt, nl=False)
    return sys.stdin.readline()


def run_shell(session: Session, key: str, interactive: bool) -> None:
    """Read, run and print until end of input or ``.quit``."""
    pending = ""
    while True:
        prompt = (CONTINUATION_PROMPT if pending else f"{key}> ") if interactive else None
        try:
            line = _read_line(prompt)
        except KeyboardInterrupt:
            if not interactive:
                raise
            click.echo()
            pending = ""
            continue
        if not line:
            if interactive:
                click.echo()
            break
        if not pending and line.lstrip().startswith("."):
            if not session.dot(line.strip()):
                return
            continue
        statements, rest = split_statements(pending + line)
        pending = "" if is_blank(rest) else rest
        for statement in statements:
            session.run(statement)
    if pending:  # like sqlite3: the last statement may go without its ';'
        session.run(pending.strip())


def _check_reachable(client: Client, url: str) -> None:
    """Fail now, in one line, rather than at the first statement."""
    target = client.target
    try:
        socket.create_connection((target.host, target.port), CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None


@click.command()
@click.argument("key")
@click.option(
    "--url",
    envvar="SHARDLITE_URL",
    default="rpc://127.0.0.1:7070",
    show_default=True,
    help="Server to talk to (rpc:// or http://).",
)
@click.option(
    "--token",
    envvar="SHARDLITE_TOKEN",
    default=None,
    help="Access token, when the server requires one [env: SHARDLITE_TOKEN].",
)
@click.option("--json", "as_json", is_flag=True, help="Print each result as one JSON line.")
def shell(key: str, *, url: str, token: str | None, as_json: bool) -> None:
    """Interactive SQL on actor KEY, wherever it lives (like the sqlite3 shell).

    Statements end with ';' and may span lines; .help lists the dot commands. Reads
    standard input, so `echo "SELECT 1;" | shardlite shell KEY` works too. Exits with
    status 1 if any statement failed.
    """
    try:
        client = connect(url, token=token)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    with client:
        _check_reachable(client, url)
        session = Session(client.actor(key), url, "json" if as_json else "table")
        run_shell(session, key, sys.stdin.isatty())
    if session.failed:
        sys.exit(1)
