"""What a load run leaves behind: a table, a JSON file, a PNG plot; and ``compare``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

PLOT_PERCENTILES = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9"))


def print_summary(result: dict[str, Any], console: Console) -> None:
    """Throughput, errors by code, latency percentiles."""
    cfg = result["config"]
    loop = (
        f"open loop at {cfg['rate']:,.0f}/s"
        if cfg["rate"]
        else f"closed loop, {cfg['concurrency']} in flight"
    )
    dist = cfg["dist"] + (f":{cfg['zipf_s']}" if cfg["dist"] == "zipf" else "")
    console.print(
        f"[bold]{cfg['scenario']}[/] on {result['target']['url']} ({result['target']['server']}), "
        f"{cfg['keys']:,} keys {dist}, {loop}, {cfg['procs']} generator process(es)"
    )
    table = Table("requests", "req/s", "errors", "error rate", "duration")
    table.add_row(
        f"{result['requests']:,}",
        f"{result['throughput']:,.0f}",
        f"{result['errors']:,}",
        f"{result['error_rate']:.2%}",
        f"{result['duration_s']:.1f} s",
    )
    console.print(table)
    lat = result["latency_ms"]
    latency = Table("p50", "p90", "p99", "p99.9", "max", "mean", title="latency (ms)")
    latency.add_row(*(f"{lat[k]:.3f}" for k in ("p50", "p90", "p99", "p999", "max", "mean")))
    console.print(latency)
    if result["errors_by_code"]:
        errors = Table("code", "count", "first message", title="errors")
        for code, n in sorted(result["errors_by_code"].items(), key=lambda kv: -kv[1]):
            errors.add_row(code, f"{n:,}", result["first_errors"].get(code, "")[:100])
        console.print(errors)


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def load_json(path: str) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    if data.get("shardlite_loadtest") != 1:
        raise ValueError(f"{path} is not a shardlite loadtest result")
    return data


def write_png(result: dict[str, Any], path: str) -> None:
    """Throughput and latency percentiles over time, and the percentile distribution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    # whole seconds of the run only: the replies that arrive after its end make a short
    # last "second" that would read as a drop in throughput
    series = [s for s in result["series"] if s["second"] + 1 <= result["config"]["duration_s"]]
    series = series or result["series"]
    seconds = [s["second"] + 1 for s in series]
    fig, (ax_rate, ax_lat, ax_dist) = plt.subplots(3, 1, figsize=(10, 11))
    cfg = result["config"]
    fig.suptitle(
        f"shardlite loadtest: {cfg['scenario']} on {result['target']['server']} "
        f"({cfg['keys']:,} keys {cfg['dist']}), {result['throughput']:,.0f} req/s, "
        f"p99 {result['latency_ms']['p99']:.2f} ms"
    )
    ax_rate.plot(seconds, [s["requests"] for s in series], label="requests/s", color="tab:blue")
    ax_rate.plot(seconds, [s["errors"] for s in series], label="errors/s", color="tab:red")
    ax_rate.set_ylabel("per second")
    ax_rate.set_xlabel("second of the run")
    ax_rate.legend(loc="lower right")
    ax_rate.grid(alpha=0.3)
    for key, label in PLOT_PERCENTILES:
        ax_lat.plot(seconds, [s[key] for s in series], label=label)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("second of the run")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper right")
    ax_lat.grid(alpha=0.3, which="both")
    dist = result["distribution"]
    if dist:
        xs = [1 / (1 - q / 100) if q < 100 else 1 / (1 - 0.99999) for q, _ in dist]
        ax_dist.plot(xs, [v for _, v in dist], color="tab:purple")
        ax_dist.set_xscale("log")
        ticks = [1, 2, 10, 100, 1000, 10000, 100000]
        labels = ["0%", "50%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        ax_dist.set_xticks(ticks, labels)
        ax_dist.xaxis.set_minor_formatter(NullFormatter())
    ax_dist.set_xlabel("percentile")
    ax_dist.set_ylabel("latency (ms)")
    ax_dist.set_title("latency by percentile (whole run)")
    ax_dist.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


COMPARE_ROWS: tuple[tuple[str, Callable[[dict[str, Any]], float], bool], ...] = (
    ("req/s", lambda r: r["throughput"], True),
    ("p50 ms", lambda r: r["latency_ms"]["p50"], False),
    ("p90 ms", lambda r: r["latency_ms"]["p90"], False),
    ("p99 ms", lambda r: r["latency_ms"]["p99"], False),
    ("p99.9 ms", lambda r: r["latency_ms"]["p999"], False),
    ("max ms", lambda r: r["latency_ms"]["max"], False),
    ("error rate", lambda r: r["error_rate"], False),
)


def compare(results: list[tuple[str, dict[str, Any]]], console: Console) -> dict[str, Any]:
    """Side by side, each run's figures and their ratio to the first run's."""
    base_name, base = results[0]
    table = Table("", *(name for name, _ in results), title=f"ratios are ÷ {base_name}")
    out: dict[str, Any] = {"baseline": base_name, "rows": {}}
    for label, get, higher_better in COMPARE_ROWS:
        b = get(base)
        cells = []
        for name, r in results:
            v = get(r)
            text = (
                f"{v:,.0f}" if label == "req/s" else (f"{v:.2%}" if "rate" in label else f"{v:.3f}")
            )
            if name != base_name and b:
                text += f" ({v / b:.2f}×)"
            cells.append(text)
            out["rows"].setdefault(label, {})[name] = v
        table.add_row(label + (" ↑" if higher_better else " ↓"), *cells)
    config = Table("", *(name for name, _ in results), title="configuration")
    for key in ("scenario", "keys", "dist", "concurrency", "rate", "procs"):
        config.add_row(key, *(str(r["config"][key]) for _, r in results))
    config.add_row("target", *(r["target"]["server"] for _, r in results))
    console.print(config)
    console.print(table)
    return out


__all__ = ["compare", "load_json", "print_summary", "write_json", "write_png"]
