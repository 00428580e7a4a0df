"""shardlite's benchmark suite: `python -m benchmarks [section ...] [--quick]`.

Measurements, not tests: each section prints its figures beside a baseline measured in
the same run and records them in docs/benchmarks.md (see run.py).
"""
