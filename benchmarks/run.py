"""Run the benchmark sections and record their results in docs/benchmarks.md.

    python -m benchmarks [section ...] [--quick] [--runs N] [--write | --no-write]
    python benchmarks/run.py ...

Sections: inprocess, rpc, durable, router, http, coldstart, recovery, actors, loadtest, auth,
moves
(default: all, in that order).
``--quick`` is a smoke run of a few seconds per section; it leaves docs/benchmarks.md
alone unless ``--write`` is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

from benchmarks import report
from benchmarks.common import LOAD_CPU, Options, SectionResult

RUNNERS: dict[str, Callable[[Options], SectionResult]] = {
    m.NAME: m.run for m in report.SECTION_MODULES
}
MIN_RUNS = 3


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("sections", nargs="*", metavar="section", help=", ".join(RUNNERS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: seconds, not minutes")
    ap.add_argument("--runs", type=int, default=MIN_RUNS, help="runs per figure (default 3)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="write docs even with --quick")
    group.add_argument("--no-write", action="store_true", help="do not write docs")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections if s not in RUNNERS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sections = args.sections or list(RUNNERS)
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # this process drives load: CPU 1
    workdir = tempfile.mkdtemp(prefix="shardlite-bench-")
    results = []
    try:
        for name in sections:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            sub = os.path.join(workdir, name)
            os.makedirs(sub)
            try:
                result = RUNNERS[name](Options(args.quick, args.runs, sub, workdir))
            except BaseException:
                if results and not args.no_write and (args.write or not args.quick):
                    print(f"{name} failed; wrote the sections before it: {report.write(results)}")
                raise
            results.append(result)
            print("\n".join(result.console))
            print(f"== {name} done in {time.perf_counter() - t0:.0f} s\n", flush=True)
    finally:
        if args.keep:
            print(f"scratch directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if results and not args.no_write and (args.write or not args.quick):
        print(f"wrote {report.write(results)}")
    elif results:
        print("docs/benchmarks.md left as it was" + (" (--quick)" if args.quick else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
