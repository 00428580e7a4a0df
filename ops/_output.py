"""Printing results for people (rich tables) and for scripts (--json)."""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from shardlite.actor import SqlResult, WorkflowInfo


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"x'{value.hex()}'" if len(value) <= 32 else f"<blob {len(value)} bytes>"
    return str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"$blob": base64.b64encode(value).decode()}
    return value


def jsonable(value: Any) -> Any:
    """``value`` with every blob inside it as ``{"$blob": ...}`` (for JSON output)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return _jsonable(value)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""


def print_workflows(runs: list[WorkflowInfo], as_json: bool, *, steps: bool) -> None:
    """Workflow runs as a table (with each one's steps if ``steps``), or as JSON."""
    console = Console()
    if as_json:
        console.print_json(msgspec.json.encode(jsonable(msgspec.to_builtins(runs))).decode())
        return
    table = Table("workflow", "method", "status", "created", "updated", "result / error")
    for run in runs:
        outcome = run.error if run.error else ("" if run.result is None else repr(run.result))
        table.add_row(
            run.id, run.method, run.status, _when(run.created), _when(run.updated), outcome
        )
    console.print(table)
    for run in runs if steps else []:
        step_table = Table("#", "step", "status", "attempts", "result / error", title=run.id)
        for s in run.steps:
            outcome = s.error if s.error else ("" if s.result is None else repr(s.result))
            step_table.add_row(str(s.seq), s.name, s.status, str(s.attempts), outcome)
        console.print(step_table)


def print_result(result: SqlResult, as_json: bool) -> None:
    console = Console()
    if as_json:
        rows = [[_jsonable(v) for v in row] for row in result.rows]
        body = {
            "columns": result.columns,
            "rows": rows,
            "changes": result.changes,
            "last_insert_rowid": result.last_insert_rowid,
        }
        console.print_json(msgspec.json.encode(body).decode())
        return
    if result.columns:
        table = Table(*result.columns)
        for row in result.rows:
            table.add_row(*(_cell(v) for v in row))
        console.print(table)
        console.print(f"{len(result.rows)} row(s)")
    else:
        console.print(
            f"{result.changes} row(s) changed; last_insert_rowid {result.last_insert_rowid}"
        )
