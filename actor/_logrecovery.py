"""The shard log's recovery, while the shard serves.

A mixin of :class:`~shardlite.actor._logdurability.LogDurability`. Attaching a shard
reads its log (``ShardLog.open``: every record by key) and serves at once. A background
task per shard (``_run_recovery``) brings the files of the keys the log holds records
of up to them (``_recovery.replay_key``), a chunk of keys per worker-thread call; a key
opened before its turn is brought up first (``replay_actor``, which the pool awaits
before it opens the file or runs an exclusive call on it). Each file's LSN says what it
holds, so a key is never brought up twice, and the log is kept whole (``replay_floor``)
until every such file is durable: one syncfs(2) at the end, or a checkpoint as each
closes. A restart after a crash thus serves in the time it takes to read the log, not
to open thousands of files (about 1.6 ms each).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from ._actor import Actor
from ._config import ActorConfig
from ._errors import ActorDamaged, Error, Unavailable
from ._keys import shard_of_path
from ._recovery import RecoveryFailed, one_syncfs, replay_key, syncfs
from ._shardlog import Record

if TYPE_CHECKING:
    from ._logdurability import _Shard

log = logging.getLogger("shardlite.actor")

RECOVERY_CHUNK = 32
"""Keys the background recovery brings up to the log per worker-thread call."""
RECOVERY_RETRY_S = 5.0
"""After a recovery chunk whose every key failed with an I/O error, wait this long."""

EVERY_KEY = "*"
"""In what a detached shard's recovery left: every key (its files' sync failed)."""

Outcome = int | Error | RecoveryFailed
"""Of bringing one key up: 1 or 0 (its file lacked records or not), its error
(ActorDamaged: marked), or RecoveryFailed (I/O: to be tried again)."""


def queued(shard: _Shard, key: str) -> bool:
    """Whether ``key``'s file is still to be brought up to the shard's log."""
    return key in shard.to_replay or key in shard.replaying


class LogRecoveryMixin:
    """The recovery of :class:`~shardlite.actor._logdurability.LogDurability`."""

    # owned by LogDurability
    config: ActorConfig
    shards: dict[str, _Shard]
    recovered_actors: int
    damaged_actors: int
    recovered_alarms: dict[str, dict[str, float | None]]
    on_recovered_alarms: Callable[[str], None]
    shard_of: Callable[[Actor], _Shard]

    def needs_replay(self, actor: Actor) -> bool:
        """Whether the actor's file must be brought up to the log before it is opened."""
        shard = self.shards.get(shard_of_path(actor.path))
        return shard is not None and shard.replay_floor is not None and queued(shard, actor.key)

    async def replay_actor(self, actor: Actor) -> None:
        """Bring the actor's file up to what the log held for it when the shard was
        attached, ahead of the background recovery. Raises ActorDamaged, or Unavailable
        (retryable) if the file could not be written (it is tried again later)."""
        shard = self.shard_of(actor)
        key = actor.key
        while (busy := shard.replaying.get(key)) is not None:
            await busy.wait()  # the background recovery has it
        records = shard.to_replay.pop(key, None)
        if records is None:
            return
        (outcome,) = await self._replay(shard, [(key, records)], keep_failed=True)
        if isinstance(outcome, RecoveryFailed):
            raise Unavailable(str(outcome))
        if isinstance(outcome, Error):
            raise outcome

    async def wait_recovered(self, directory: str | None = None) -> None:
        """Until the shard's files (every attached shard's, without ``directory``) hold,
        durably, what its log held when it was attached."""
        shards = list(self.shards.values()) if directory is None else [self.shards.get(directory)]
        for shard in shards:
            if shard is not None:
                await shard.recovered.wait()

    async def _run_recovery(self, shard: _Shard) -> None:
        if shard.recovered.is_set():
            return
        started = trio.current_time()
        keys = len(shard.to_replay)
        await self._recover(shard, retry=True)
        log.info(
            "shard %s: recovered: the files of %d keys brought up to the log in %.1f s",
            shard.directory,
            keys,
            trio.current_time() - started,
        )

    async def _recover(self, shard: _Shard, *, retry: bool) -> list[str]:
        """Bring every file still lacking records up to the log, a chunk of keys per
        worker-thread call, then make them durable and let the log be trimmed. A key
        whose file could not be written (I/O) is tried again, after RECOVERY_RETRY_S if
        its whole chunk failed; its opens answer 503 meanwhile. Without ``retry`` (a
        shard being detached) it is left in the log (``shard.unapplied``, below which
        nothing is trimmed), which the next attach reads, and returned: the keys whose
        files still lack records of the log (and ``EVERY_KEY`` if the sync that makes
        the brought-up files durable failed)."""
        left: list[str] = []
        while shard.to_replay or shard.replaying:
            if not shard.to_replay:
                await next(iter(shard.replaying.values())).wait()  # an open's replay
                continue
            keys = list(itertools.islice(shard.to_replay, RECOVERY_CHUNK))
            chunk = [(key, shard.to_replay.pop(key)) for key in keys]
            outcomes = await self._replay(shard, chunk, keep_failed=retry)
            failed = [
                (key, records)
                for (key, records), o in zip(chunk, outcomes, strict=True)
                if isinstance(o, RecoveryFailed)
            ]
            if retry and len(failed) == len(chunk):
                await trio.sleep(RECOVERY_RETRY_S)
            elif not retry:
                for key, records in failed:
                    # out of the queue: this keeps the checkpointer, which runs until the
                    # detach closes the log, from trimming its records
                    shard.unapplied.setdefault(key, records[0].lsn)
                    left.append(key)
        if shard.replay_floor is None:
            return left  # another caller finished it
        if one_syncfs(self.config):
            while True:
                try:
                    await trio.to_thread.run_sync(syncfs, shard.directory)
                    break
                except OSError as exc:  # nothing is known durable: the log stays whole
                    log.error("shard %s: syncfs after recovery failed: %s", shard.directory, exc)
                    if not retry:  # replay_floor stays: nothing is trimmed below it
                        return [*left, EVERY_KEY]
                    await trio.sleep(RECOVERY_RETRY_S)
        shard.replay_floor = None
        shard.recovered.set()
        return left

    async def _replay(
        self, shard: _Shard, chunk: list[tuple[str, list[Record]]], *, keep_failed: bool
    ) -> list[Outcome]:
        """:func:`replay_key` for each key of ``chunk`` in a worker thread, the keys in
        ``shard.replaying`` meanwhile. With ``keep_failed``, a key that failed with an
        I/O error goes back in the queue."""
        events = [shard.replaying.setdefault(key, trio.Event()) for key, _ in chunk]
        alarms: dict[str, float | None] = {}

        def run() -> list[Outcome]:
            outcomes: list[Outcome] = []
            for key, records in chunk:
                try:
                    outcomes.append(replay_key(shard.directory, key, records, self.config, alarms))
                except (Error, RecoveryFailed) as exc:
                    outcomes.append(exc)
            return outcomes

        outcomes: list[Outcome] | None = None
        try:
            outcomes = await trio.to_thread.run_sync(run)
        finally:
            for n, ((key, records), event) in enumerate(zip(chunk, events, strict=True)):
                del shard.replaying[key]
                outcome = outcomes[n] if outcomes is not None else None
                if outcome is None or (keep_failed and isinstance(outcome, RecoveryFailed)):
                    shard.to_replay.setdefault(key, records)  # None: cancelled (shutdown)
                if isinstance(outcome, RecoveryFailed):
                    log.error("shard %s: %s", shard.directory, outcome)
                event.set()
        assert outcomes is not None
        for outcome in outcomes:
            if isinstance(outcome, ActorDamaged):
                self.damaged_actors += 1
            elif isinstance(outcome, int):
                self.recovered_actors += outcome
        if alarms:
            self.recovered_alarms.setdefault(shard.directory, {}).update(alarms)
            self.on_recovered_alarms(shard.directory)
        return outcomes


__all__ = ["EVERY_KEY", "RECOVERY_CHUNK", "LogRecoveryMixin", "queued"]
