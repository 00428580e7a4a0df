"""The row capture that log durability records from: what a transaction's record holds,
and that an actor's capture state stays put for Python's cyclic collector."""

from __future__ import annotations

import gc

import apsw

from shardlite.actor._capture import RowCapture, _decode, load_tables


def _capture_on(conn: apsw.Connection) -> RowCapture:
    capture = RowCapture()
    capture.tables = load_tables(conn)
    conn.preupdate_hook(capture.hook)
    return capture


def test_each_record_holds_only_the_rows_its_own_transaction_touched() -> None:
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("CREATE TABLE b (k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID")
    capture = _capture_on(conn)
    assert capture.empty

    with conn:
        conn.execute("INSERT INTO a VALUES (1, 'x'), (2, 'y')")
        conn.execute("INSERT INTO b VALUES ('k', 5)")
        assert not capture.empty
        first = capture.take(conn)
    assert capture.empty
    assert first is not None
    assert _decode(first) == [
        ["a", [[1, [1, "x"]], [2, [2, "y"]]]],
        ["b", [[["k"], ["k", 5]]]],
    ]

    with conn:  # a later transaction on one table: the other table's emptied set stays out
        conn.execute("DELETE FROM a WHERE id = 1")
        second = capture.take(conn)
    assert second is not None
    assert _decode(second) == [["a", [[1, None]]]]


def test_an_actors_capture_stays_tracked_across_full_collections() -> None:
    """A dict that empties is untracked by a full pass and tracked again, young, by its
    next write: each actor's would climb the generations again after every full pass.
    The capture keeps its emptied sets, so its dict stays where it is."""
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT)")
    capture = _capture_on(conn)
    for n in range(3):
        with conn:
            conn.execute("INSERT INTO a VALUES (?, 'v')", (n,))
            assert capture.take(conn) is not None
        gc.collect()
        assert gc.is_tracked(capture.touched)
        assert capture.empty
