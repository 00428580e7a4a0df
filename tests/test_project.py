"""Project-wide checks: layering, lint, types, documented settings."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardlite.shards import SETTINGS, settings_markdown

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {
    "actor": set(),
    "router": {"actor"},
    "shards": {"actor", "router"},
    "loadtest": {"actor", "router"},
}


def _imports(folder: Path) -> set[str]:
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_layers_import_only_what_is_below_them(layer: str) -> None:
    allowed = LAYERS[layer] | {layer}
    for module in _imports(ROOT / layer):
        parts = module.split(".")
        if parts[0] == "shardlite" and len(parts) > 1:
            assert parts[1] in allowed, f"{layer}/ imports {module}"
        assert parts[0] not in {"actor", "router", "shards", "ops", "loadtest"}, (
            f"{layer}/ imports {module} by its folder name; use shardlite.{module}"
        )


def test_docs_settings_is_generated_from_the_settings_table() -> None:
    doc = (ROOT / "docs" / "settings.md").read_text()
    assert doc == settings_markdown(), (
        "regenerate: shardlite settings --markdown > docs/settings.md"
    )


def test_every_setting_is_a_serve_flag_with_an_environment_variable() -> None:
    from click.testing import CliRunner

    from shardlite.ops.cli import main

    help_text = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    for setting in SETTINGS:
        assert setting.flag in help_text and setting.envvar in help_text, setting.name
    assert "docs/settings.md" in (ROOT / "README.md").read_text()


def test_settings_parse_units_and_name_the_flag_on_error() -> None:
    from shardlite.shards import settings_from

    settings = settings_from({"max_db_bytes": "64MiB", "idle_timeout": "500ms"})
    assert (settings.max_db_bytes, settings.idle_timeout) == (64 << 20, 0.5)
    with pytest.raises(ValueError, match="--max-db-bytes"):
        settings_from({"max_db_bytes": "lots"})
    with pytest.raises(ValueError, match="--max-batch: must be at least 1"):
        settings_from({"max_batch": "0"})  # (no call would ever run)
    with pytest.raises(ValueError, match="--log-batches-per-commit: must be at least 1"):
        settings_from({"log_batches_per_commit": "0"})
    with pytest.raises(ValueError, match="--mailbox-size: must not be negative"):
        settings_from({"mailbox_size": "-1"})
    assert (
        settings_from({"log_batches_per_commit": "64"}).actor_config().log_batches_per_commit == 64
    )


def test_environment_variables_reach_serve() -> None:
    from click.testing import CliRunner

    from shardlite.ops.cli import main

    result = CliRunner().invoke(main, ["serve"], env={"SHARDLITE_MAX_DB_BYTES": "lots"})
    assert result.exit_code == 2 and "--max-db-bytes" in result.output


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    result = subprocess.run([ruff, "check", str(ROOT)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [ruff, "format", "--check", str(ROOT)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    if shutil.which("mypy") is None:
        pytest.fail("mypy is not installed: pip install -e '.[dev]'")
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "typecheck")],
        check=False,
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rpc_doc_example_matches_the_wire_format() -> None:
    from shardlite.actor import Sql
    from shardlite.router import wire

    doc = (ROOT / "docs" / "rpc.md").read_text()
    frame = wire.request_frame(7, "tenant-1", Sql("SELECT ?", [42]))
    assert frame.hex(" ") in doc
