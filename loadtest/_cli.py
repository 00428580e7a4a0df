"""``shardlite loadtest``: run a load test, compare results, start a PostgreSQL to compare with."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from ._spec import SCENARIOS, LoadSpec, check, parse_dist, parse_duration, parse_target

EXIT_TOO_MANY_ERRORS = 3


class _Parsed(click.ParamType):  # type: ignore[type-arg]
    """An option parsed by one of the spec's parsers; its ValueError is the usage error."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self._parse = parse

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if not isinstance(value, str):
            return value  # a default already parsed
        try:
            return self._parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group(invoke_without_command=True)
@click.option("--target", help="rpc://HOST:PORT, http://HOST:PORT or postgres://USER@HOST:PORT/DB.")
@click.option("--scenario", type=click.Choice(SCENARIOS), default="insert", show_default=True)
@click.option(
    "--keys",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Actor keys (PostgreSQL: tenants) the requests spread over.",
)
@click.option(
    "--dist",
    type=_Parsed("DIST", parse_dist),
    default="uniform",
    show_default=True,
    help="Key distribution: uniform, zipf:S, hot (one key), cold (each key once).",
)
@click.option(
    "--duration",
    type=_Parsed("DURATION", parse_duration),
    default="10s",
    show_default=True,
    help="How long to drive load (30s, 2m, ...).",
)
@click.option(
    "--max-requests",
    type=click.IntRange(min=0),
    default=0,
    help="Also stop after this many requests (0: no limit).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Requests in flight (closed loop); the cap on them in open loop.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Requests per second, open loop (latency from the intended send time); 0: closed loop.",
)
@click.option(
    "--procs", type=click.IntRange(min=1), default=1, show_default=True, help="Generator processes."
)
@click.option(
    "--read-ratio",
    type=click.FloatRange(0, 1),
    default=0.9,
    show_default=True,
    help="Reads among requests (mixed, kv).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="INSERTs per request (batch).",
)
@click.option(
    "--rows",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Rows per key before a read or mixed run.",
)
@click.option("--method", default="", help="Actor-class method to call (call).")
@click.option("--args", "method_args", default="[]", help="JSON array of the method's arguments.")
@click.option("--key-prefix", default="lt-", show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--no-setup", is_flag=True, help="Do not create schemas and rows first.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Result JSON (default: loadtest-SCENARIO-TIME.json).",
)
@click.option(
    "--plot", type=click.Path(dir_okay=False), help="PNG plot (default: the JSON's name, .png)."
)
@click.option("--no-plot", is_flag=True, help="Do not draw the PNG.")
@click.option(
    "--max-error-rate",
    type=click.FloatRange(0, 1),
    default=0.01,
    show_default=True,
    help=f"Exit with status {EXIT_TOO_MANY_ERRORS} when errors exceed this share of requests.",
)
@click.option("--allow-remote", is_flag=True, help="Allow a target that is not a loopback address.")
@click.option(
    "--token", envvar="SHARDLITE_TOKEN", default="", help="Access token [env: SHARDLITE_TOKEN]."
)
@click.option("--quiet", is_flag=True, help="No live progress line.")
@click.pass_context
def loadtest(ctx: click.Context, /, **opts: Any) -> None:
    """Drive load at a shardlite server (or PostgreSQL) and report throughput and latency.

    \b
    shardlite loadtest --target rpc://127.0.0.1:7070 --scenario insert --keys 10000 --dist zipf:1.1 --duration 30s
    shardlite loadtest --target rpc://127.0.0.1:7070 --scenario mixed --rate 20000 --duration 60s
    shardlite loadtest --target postgres://postgres@127.0.0.1:5432/postgres --scenario insert
    shardlite loadtest compare run-a.json run-b.json
    """
    if ctx.invoked_subcommand is not None:
        return
    if not opts["target"]:
        raise click.UsageError("--target is required (or a subcommand: compare, postgres)")
    try:
        method_args = json.loads(opts["method_args"])
        if not isinstance(method_args, list):
            raise ValueError("not a JSON array")
    except ValueError as exc:
        raise click.BadParameter(f"{exc}", param_hint="--args") from None
    dist, zipf_s = opts["dist"]
    try:
        target = parse_target(opts["target"], allow_remote=opts["allow_remote"])
        spec = LoadSpec(
            target=opts["target"],
            scenario=opts["scenario"],
            keys=opts["keys"],
            dist=dist,
            zipf_s=zipf_s or 1.1,
            duration_s=opts["duration"],
            max_requests=opts["max_requests"],
            concurrency=opts["concurrency"],
            rate=opts["rate"],
            procs=opts["procs"],
            read_ratio=opts["read_ratio"],
            batch_size=opts["batch_size"],
            rows=opts["rows"],
            method=opts["method"],
            method_args=method_args,
            key_prefix=opts["key_prefix"],
            seed=opts["seed"],
            setup=not opts["no_setup"],
            token=opts["token"] or "",
        )
        check(spec)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    _missing_extra()
    out = opts["out"] or f"loadtest-{spec.scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    plot = None if opts["no_plot"] else (opts["plot"] or os.path.splitext(out)[0] + ".png")
    result = run_loadtest(spec, target, quiet=opts["quiet"])
    console = Console()
    from ._report import print_summary, write_json, write_png

    print_summary(result, console)
    write_json(result, out)
    console.print(f"result: {out}")
    if plot:
        write_png(result, plot)
        console.print(f"plot:   {plot}")
    if result["error_rate"] > opts["max_error_rate"]:
        console.print(
            f"[red]error rate {result['error_rate']:.2%} is over --max-error-rate "
            f"{opts['max_error_rate']:.2%}[/]"
        )
        sys.exit(EXIT_TOO_MANY_ERRORS)


def run_loadtest(spec: LoadSpec, target: Any, *, quiet: bool = False) -> dict[str, Any]:
    """Preflight, setup, the run with its live line, the merged result."""
    from rich.live import Live
    from rich.text import Text

    from ._run import TargetUnreachable, drive, merge, preflight, setup

    console = Console(stderr=True)
    try:
        server = preflight(target)
    except TargetUnreachable as exc:
        raise click.ClickException(str(exc)) from None
    setup_s = setup(spec, target, lambda msg: console.print(msg) if not quiet else None)
    started = time.time()
    last = {"t": 0.0, "count": 0, "rate": 0.0}

    def line(elapsed: float, totals: dict[str, Any]) -> Text:
        if elapsed - last["t"] >= 0.5:
            last["rate"] = (totals["count"] - last["count"]) / (elapsed - last["t"])
            last["t"], last["count"] = elapsed, totals["count"]
        return Text(
            f"{min(elapsed, spec.duration_s):5.1f}/{spec.duration_s:g} s  "
            f"{last['rate']:>10,.0f} req/s  {totals['count']:>11,} done  "
            f"{totals['errors']:>8,} errors  p50 {totals['p50_us'] / 1000:7.2f} ms  "
            f"p99 {totals['p99_us'] / 1000:7.2f} ms"
        )

    try:
        if quiet:
            parts = drive(spec, target, lambda e, t: None)
        else:
            with Live(Text("starting ..."), console=console, refresh_per_second=4) as live:
                parts = drive(spec, target, lambda e, t: live.update(line(e, t)))
    except (RuntimeError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    return merge(spec, target, parts, {"server": server, "started": started, "setup_s": setup_s})


def _missing_extra() -> None:
    try:
        import hdrh.histogram  # noqa: F401
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"the load harness needs {exc.name}: pip install 'shardlite[loadtest]'"
        ) from None


@loadtest.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def compare(results: tuple[str, ...], as_json: bool) -> None:
    """Show result files side by side, with ratios to the first."""
    from ._report import compare as compare_results
    from ._report import load_json

    if len(results) < 2:
        raise click.UsageError("compare needs at least two result files")
    try:
        loaded = [(os.path.basename(p), load_json(p)) for p in results]
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        with open(os.devnull, "w") as devnull:
            table = compare_results(loaded, Console(file=devnull))
        click.echo(json.dumps(table))
    else:
        compare_results(loaded, Console())


@loadtest.command()
@click.option(
    "--data",
    default="./shardlite-postgres",
    show_default=True,
    help="Where the cluster lives (created on first use).",
)
@click.option("--port", type=int, default=5432, show_default=True)
def postgres(data: str, port: int) -> None:
    """Run a local PostgreSQL (fsync and synchronous_commit on) to compare against."""
    import signal

    from ._postgres import PostgresServer, missing

    if gone := missing():
        raise click.ClickException(
            f"PostgreSQL programs not found: {gone} (apt-get install postgresql)"
        )
    server = PostgresServer(data, port=port)
    try:
        server.init()
        server.start()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"postgres serving {server.url} (data {server.data}); Ctrl-C to stop")
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        signal.sigwait(signals)
    finally:
        server.stop()
    click.echo("postgres stopped")


__all__ = ["loadtest", "run_loadtest"]
