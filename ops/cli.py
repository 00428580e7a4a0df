"""The ``shardlite`` command line (click): serve, sql, settings, version."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click
import msgspec
import trio

from shardlite.actor import load_app
from shardlite.loadtest import loadtest
from shardlite.loadtest._spec import parse_duration
from shardlite.router import DirectoryUnavailable
from shardlite.shards import (
    SETTINGS,
    STARTUP_ERRORS,
    HostInfo,
    ServerInfo,
    default_procs,
    run_server,
    run_supervisor,
    settings_from,
    settings_markdown,
    startup_error,
    stopped_starting,
)
from shardlite.shards._auth import (
    PERMS,
    create_token,
    rotate_keys,
    signing_key,
)
from shardlite.shards._settings import DEFAULT_DATA_DIR

from ._nodes import auth_secrets, ops_token
from ._output import jsonable, print_result, print_workflows
from ._shell import shell
from ._verbs import VERBS


def _settings_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One click option per row of the settings table, each also read from SHARDLITE_*."""
    for setting in reversed(SETTINGS):
        help_text = f"{setting.help} [default: {setting.default}; env: {setting.envvar}]"
        fn = click.option(
            setting.flag,
            setting.name,
            envvar=setting.envvar,
            default=None,
            metavar=setting.kind.upper(),
            type=click.Choice(setting.choices) if setting.choices else str,
            help=help_text,
        )(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardlite")
def main() -> None:
    """shardlite: one SQLite file per actor key, served by single-threaded actors."""


@main.command()
@_settings_options
def serve(**values: Any) -> None:
    """Run a shard server on the embedded default (HTTP :8080, RPC :7070)."""
    classes = ""
    try:
        settings = settings_from(values)
        if settings.app:  # fail here, in one line, not in every process
            classes = f"; actor classes: {load_app(settings.app).describe()}"
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    procs = settings.procs or default_procs()

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            if procs == 1:
                info: ServerInfo = await nursery.start(run_server, settings)
                where = f"{info.http_url} and {info.rpc_url}"
                detail = f"up to {info.max_open_actors} open actors"
            else:
                host: HostInfo = await nursery.start(
                    functools.partial(run_supervisor, settings, procs=procs)
                )
                info = host.nodes[0]
                where = f"{host.http_url} and {host.rpc_url}"
                detail = f"{procs} shard processes, up to {info.max_open_actors} open actors each"
            if info.auth:
                click.echo(
                    "auth: required: every request needs a token "
                    "(shardlite ops token create --key PATTERN --perm read|write|admin)"
                )
            else:
                click.echo(
                    "auth: off: anyone who can reach these addresses can read and write every "
                    "actor (fine on loopback; use --auth required otherwise)"
                )
            click.echo(
                f"shardlite serving {where} (data {info.data}, durability {info.durability}, "
                f"{detail}{classes}); Ctrl-C to stop",
            )
            sys.stdout.flush()

    try:
        trio.run(run)
    except (*STARTUP_ERRORS, BaseExceptionGroup) as exc:
        if stopped_starting(exc):  # Ctrl-C or SIGTERM before it was ready
            click.echo("shardlite stopped before it was ready")
            return
        reason = startup_error(exc)
        if reason is None:
            raise
        raise click.ClickException(f"cannot serve: {reason}") from None
    click.echo("shardlite stopped")


F = TypeVar("F", bound=Callable[..., Any])


def _url_option(fn: F) -> F:
    fn = click.option(
        "--token",
        envvar="SHARDLITE_TOKEN",
        default=None,
        help="Access token, when the server requires one [env: SHARDLITE_TOKEN].",
    )(fn)
    return click.option(
        "--url",
        envvar="SHARDLITE_URL",
        default="rpc://127.0.0.1:7070",
        show_default=True,
        help="Server to talk to (rpc:// or http://).",
    )(fn)


@contextlib.contextmanager
def _client(url: str, token: str | None) -> Iterator[Any]:
    """A connected client; errors become one-line ClickExceptions."""
    import shardlite

    try:
        with shardlite.connect(url, token=token) as client:
            yield client
    except shardlite.Error as exc:
        raise click.ClickException(f"{exc.code}: {exc.message}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach {url}: {exc}") from None


@main.command()
@click.argument("key")
@click.argument("sql")
@click.argument("params", nargs=-1)
@_url_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def sql(
    key: str, sql: str, params: tuple[str, ...], *, url: str, token: str | None, as_json: bool
) -> None:
    """Run one SQL statement on actor KEY and print the result.

    PARAMS bind to ? placeholders; each is parsed as JSON when it can be (42, null,
    "text"), else taken as a string.
    """
    values = [_param(p) for p in params]
    with _client(url, token) as client:
        result = client.actor(key).sql(sql, values)
    print_result(result, as_json)


@main.command()
@click.argument("key")
@click.argument("method")
@click.argument("args", nargs=-1)
@_url_option
def call(key: str, method: str, args: tuple[str, ...], url: str, token: str | None) -> None:
    """Call METHOD of actor KEY's class and print what it returned (JSON).

    ARGS are positional arguments, each parsed as JSON when it can be, else a string.
    """
    with _client(url, token) as client:
        value = client.actor(key).call(method, *[_param(a) for a in args])
    click.echo(msgspec.json.encode(jsonable(value)).decode())


@main.command()
@click.argument("key")
@click.argument("workflow_id", required=False)
@click.option(
    "--status",
    type=click.Choice(["running", "sleeping", "completed", "failed"]),
    help="Only workflows in this state.",
)
@click.option("--limit", default=100, show_default=True, help="At most this many workflows.")
@_url_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def workflows(
    key: str,
    workflow_id: str | None,
    *,
    status: str | None,
    limit: int,
    url: str,
    token: str | None,
    as_json: bool,
) -> None:
    """List actor KEY's workflows, or show one (WORKFLOW_ID) with its steps."""
    with _client(url, token) as client:
        actor = client.actor(key)
        if workflow_id is None:
            runs = actor.workflows(status, limit)
        else:
            runs = [actor.workflow(workflow_id)]
    print_workflows(runs, as_json, steps=workflow_id is not None)


def _param(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


@main.group()
def ops() -> None:
    """Operate a cluster: status, move, drain, verify, backup, restore, token."""


@ops.command()
@click.option(
    "--data",
    envvar="SHARDLITE_DATA",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Data directory of this host (where the embedded directory lives).",
)
@click.option(
    "--directory",
    envvar="SHARDLITE_DIRECTORY",
    default="",
    help="Directory URL (sqlite:PATH or etcd://HOST:PORT); default: the one under --data.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(data: str, directory: str, as_json: bool) -> None:
    """Hosts, shard processes, shards with slot ranges, epochs, actor files and sizes."""
    from ._status import gather_status, print_status

    try:
        report = trio.run(gather_status, directory, data, ops_token(data))
    except (LookupError, ValueError, DirectoryUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(msgspec.json.encode(report).decode())
    else:
        print_status(report)


_data_option = click.option(
    "--data",
    envvar="SHARDLITE_DATA",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    help="Data directory of this host (its signing keys, its embedded directory).",
)


@ops.group()
def token() -> None:
    """Access tokens: create, revoke, rotate the signing keys."""


@token.command("create")
@click.option("--key", "pattern", required=True, help="The key, or a pattern with * (tenant-*).")
@click.option("--perm", type=click.Choice(PERMS), required=True, help="What the token allows.")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime (15m, 1h, 7d, ...).")
@_data_option
@click.option("--json", "as_json", is_flag=True, help="Print the token with its claims.")
def token_create(pattern: str, perm: str, ttl: str, data: str, as_json: bool) -> None:
    """Print a new token (signed with $SHARDLITE_AUTH_SECRET, else DATA's newest key)."""
    try:
        ttl_s = parse_duration(ttl)
        kid, secret = signing_key(data, auth_secrets())
        value, claims = create_token(kid, secret, pattern=pattern, perm=perm, ttl_s=ttl_s)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(msgspec.json.encode({"token": value, "kid": kid, **claims}).decode())
    else:
        click.echo(value)


@token.command("revoke")
@click.argument("token_or_id")
@_data_option
@click.option("--directory", envvar="SHARDLITE_DIRECTORY", default="", help="Directory URL.")
def token_revoke(token_or_id: str, data: str, directory: str) -> None:
    """Revoke one token (the token itself, or its id `jti`): every server refuses it
    within seconds."""
    import time

    import jwt

    from shardlite.router import open_directory

    jti, expires = token_or_id, time.time() + 366 * 86400
    if token_or_id.count(".") == 2:
        try:
            claims = jwt.decode(token_or_id, options={"verify_signature": False})
            jti, expires = str(claims["jti"]), float(claims["exp"])
        except (jwt.InvalidTokenError, KeyError) as exc:
            raise click.ClickException(f"not a shardlite token: {exc}") from None

    async def revoke() -> None:
        async with open_directory(directory, data) as d:
            await d.revoke_token(jti, expires)

    try:
        trio.run(revoke)
    except (DirectoryUnavailable, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {jti}")


@token.command("rotate")
@_data_option
@click.option("--retire", metavar="KID", help="Remove this key instead (its tokens stop working).")
def token_rotate(data: str, retire: str | None) -> None:
    """Add a new signing key to DATA (new tokens use it; old ones still verify), or
    retire an old one. Restart the servers to load the change."""
    try:
        kid = rotate_keys(data, retire=retire)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"retired key {kid}" if retire else f"new signing key {kid}")


main.add_command(loadtest)
main.add_command(shell)
for _verb in VERBS:
    ops.add_command(_verb)


@main.command()
@click.option("--markdown", is_flag=True, help="Print the table as Markdown (docs/settings.md).")
def settings(markdown: bool) -> None:
    """List every server setting, its flag, environment variable and default."""
    if markdown:
        click.echo(settings_markdown(), nl=False)
        return
    for s in SETTINGS:
        click.echo(f"{s.flag:24} {s.envvar:34} {s.default!s:18} {s.help}")


if __name__ == "__main__":
    main()
