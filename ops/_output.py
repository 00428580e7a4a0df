"""Printing results for people (rich tables) and for scripts (--json)."""

from __future__ import annotations

import base64
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from shardlite.actor import SqlResult


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
