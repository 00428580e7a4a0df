"""The actor class the ``actors`` benchmark section serves (``--app benchmarks.actor_app:Bench``)."""

from __future__ import annotations

from typing import Any

import shardlite

COUNTER_SQL = "UPDATE counter SET n = n + 1 WHERE id = 1 RETURNING n"


class Bench(shardlite.Actor):
    def migrate(self, db: Any) -> None:
        db.sql(
            "CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL) STRICT"
        )
        db.sql("INSERT OR IGNORE INTO counter VALUES (1, 0)")

    @shardlite.method
    def noop(self) -> None:
        """The trivial method: what the method layer costs by itself."""

    @shardlite.method
    def hit(self) -> int:
        """The counter: one UPDATE ... RETURNING, the same statement the raw-sql case sends."""
        return int(self.db.sql(COUNTER_SQL).rows[0][0])

    @shardlite.method
    def arm(self, n: int, at: float) -> None:
        """Set ``n`` alarms (a0, a1, ...), all at the Unix time ``at``."""
        for i in range(n):
            self.alarms.set(f"a{i}", at=at)

    def on_alarm(self, name: str, payload: Any) -> None:
        """Nothing to do: the section measures the scheduler, not the handler."""
