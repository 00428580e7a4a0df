"""The ``shardlite ops`` verbs that act on shards: move, drain, split, verify, backup, restore."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import msgspec
import trio
from rich.console import Console
from rich.table import Table

from shardlite.router import Directory, DirectoryUnavailable, open_directory
from shardlite.shards._settings import DEFAULT_DATA_DIR

from . import _backup, _move
from ._nodes import Nodes, OpsError, ops_token

MOVE_TOKEN_TTL_S = 24 * 3600.0
"""The admin token a verb mints for itself lives as long as a long copy may take."""

F = TypeVar("F", bound=Callable[..., Any])


def _common(fn: F) -> F:
    fn = click.option(
        "--directory",
        envvar="SHARDLITE_DIRECTORY",
        default="",
        help="Directory URL (sqlite:PATH or etcd://HOST:PORT); default: the one under --data.",
    )(fn)
    fn = click.option(
        "--data",
        envvar="SHARDLITE_DATA",
        default=DEFAULT_DATA_DIR,
        show_default=True,
        help="Data directory of this host (its embedded directory, its signing keys).",
    )(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)


def _run(data: str, directory_url: str, body: Callable[[Directory, Nodes], Awaitable[Any]]) -> Any:
    """Run ``body`` with the directory and node connections; one-line errors."""

    async def main() -> Any:
        nodes = Nodes(ops_token(data, MOVE_TOKEN_TTL_S))
        try:
            async with open_directory(directory_url, data) as directory:
                return await body(directory, nodes)
        finally:
            nodes.close()

    try:
        return trio.run(main)
    except (OpsError, DirectoryUnavailable, ValueError, LookupError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach a shard process: {exc}") from None
    except Exception as exc:
        if hasattr(exc, "code") and hasattr(exc, "message"):  # a shardlite.Error
            raise click.ClickException(f"{exc.code}: {exc.message}") from None
        raise


def _echo_for(as_json: bool) -> Callable[[str], None]:
    return (lambda line: click.echo(line, err=True)) if as_json else click.echo


def _print_json(value: Any) -> None:
    click.echo(msgspec.json.encode(value).decode())


@click.command()
@click.argument("shard")
@click.option("--to", "to_host", help="The host to move it to (its --host-id).")
@click.option("--resume", is_flag=True, help="Finish the move in progress.")
@click.option("--abort", is_flag=True, help="Undo the move in progress (before its flip).")
@_common
def move(
    *,
    shard: str,
    to_host: str | None,
    resume: bool,
    abort: bool,
    data: str,
    directory: str,
    as_json: bool,
) -> None:
    """Move SHARD to another host while it serves (copy, catch up, cut over)."""
    if resume and abort:
        raise click.UsageError("--resume and --abort exclude each other")
    if not (resume or abort or to_host):
        raise click.UsageError("say where: --to HOST (or --resume / --abort)")
    echo = _echo_for(as_json)

    async def body(d: Directory, nodes: Nodes) -> Any:
        mover = _move.Mover(d, nodes, echo)
        if abort:
            await mover.abort(*await mover.existing(shard))
            return {"shard": shard, "aborted": True}
        if resume:
            return await mover.run(*await mover.existing(shard))
        assert to_host is not None
        return await mover.run(*await mover.start(shard, to_host))

    report = _run(data, directory, body)
    if as_json:
        _print_json(report)
    elif "cutover_ms" in report:
        click.echo(
            f"done in {report['seconds']} s: {report.get('actors', '?')} actors, "
            f"{report.get('bytes', 0) / 1e6:.1f} MB, requests held {report['cutover_ms']} ms"
        )


@click.command()
@click.argument("host")
@click.option("--parallel", default=1, show_default=True, help="Moves at once.")
@_common
def drain(host: str, parallel: int, data: str, directory: str, as_json: bool) -> None:
    """Move every shard off HOST (to the other hosts, evenly)."""
    echo = _echo_for(as_json)

    async def body(d: Directory, nodes: Nodes) -> Any:
        plan = await _move.drain_plan(d, host)
        echo(f"{host}: {len(plan)} shards to move")
        reports: list[Any] = []
        limiter = trio.CapacityLimiter(max(1, parallel))

        async def one(shard: str, to: str) -> None:
            async with limiter:
                mover = _move.Mover(d, Nodes(nodes.token), echo)
                try:
                    reports.append(await mover.run(*await mover.start(shard, to)))
                finally:
                    mover.nodes.close()

        async with trio.open_nursery() as nursery:
            for shard, to in plan:
                nursery.start_soon(one, shard, to)
        return reports

    try:
        reports = _run(data, directory, body)
    except click.ClickException:
        raise
    if as_json:
        _print_json(reports)
    else:
        click.echo(f"{host} drained: {len(reports)} shards moved")


@click.command()
@click.argument("shard")
@_common
def split(shard: str, data: str, directory: str, as_json: bool) -> None:
    """Give the upper half of SHARD's slots to a new shard on the same process."""

    async def body(d: Directory, nodes: Nodes) -> Any:
        return await _move.Mover(d, nodes, _echo_for(as_json)).split(shard)

    report = _run(data, directory, body)
    if as_json:
        _print_json(report)
    else:
        ranges = ", ".join(f"{a}-{b - 1}" for a, b in report["slots"])
        click.echo(
            f"{report['new_shard']} now holds slots {ranges} and {report['actors_moved']} "
            f"actors of {shard} ({report['seconds']} s)"
        )


@click.command()
@click.argument("shard", required=False)
@_common
def verify(shard: str | None, data: str, directory: str, as_json: bool) -> None:
    """integrity_check of every actor file, and a read of the completed shard-log
    segments (of SHARD, or of all shards); exit 1 on damage."""
    rows = _run(data, directory, lambda d, nodes: _backup.verify(d, nodes, shard))
    if as_json:
        _print_json(rows)
    else:
        table = Table("shard", "owner", "actor files", "damaged", "log", title="verify")
        for row in rows:
            unknown = row["checked"] is None
            damaged = "-" if unknown else str(len(row["problems"]))
            log_state = "-" if unknown else "damaged" if row["log_problems"] else "ok"
            checked = "not checked (below)" if row["error"] else str(row["checked"])
            table.add_row(row["shard"], row["owner"], checked, damaged, log_state)
        console = Console()
        console.print(table)
        for row in rows:
            if row["error"]:
                console.print(f"{row['shard']}: {row['error']}", markup=False, soft_wrap=True)
            for key, problem in sorted(row["problems"].items()):
                console.print(
                    f"{row['shard']}: actor {key!r}: {problem}", markup=False, soft_wrap=True
                )
            for segment, problem in sorted(row["log_problems"].items()):
                console.print(
                    f"{row['shard']}: log segment {segment}: {problem}",
                    markup=False,
                    soft_wrap=True,
                )
    if any(row["problems"] or row["log_problems"] or row["error"] for row in rows):
        raise SystemExit(1)


@click.command()
@click.argument("target", metavar="KEY|SHARD")
@click.option("--to", "into", required=True, help="Directory the backup goes into.")
@_common
def backup(target: str, into: str, data: str, directory: str, as_json: bool) -> None:
    """Consistent copies of every actor file of a shard (or one key), with a manifest."""
    echo = _echo_for(as_json)
    result = _run(data, directory, lambda d, nodes: _backup.backup(d, nodes, target, into, echo))
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['path']}: {result['actors']} actors, {result['bytes'] / 1e6:.1f} MB")


@click.command()
@click.argument("target", metavar="KEY|SHARD")
@click.option("--from", "source", required=True, help="The backup directory (with manifest.json).")
@click.option(
    "--replace", is_flag=True, help="Overwrite actors that exist (default: empty shard only)."
)
@_common
def restore(
    *, target: str, source: str, replace: bool, data: str, directory: str, as_json: bool
) -> None:
    """Restore a shard (or one key) from a backup; every file is checked first."""
    echo = _echo_for(as_json)
    result = _run(
        data,
        directory,
        lambda d, nodes: _backup.restore(d, nodes, target, source, replace=replace, echo=echo),
    )
    if as_json:
        _print_json(result)
    else:
        click.echo(f"{result['shard']}: {result['actors']} actors restored from {result['from']}")


VERBS = [move, drain, split, verify, backup, restore]

__all__ = ["VERBS"]
