"""The prediction log written by a child process (``daybreak serve``'s): the same rows as the
writer thread writes, from the request bodies read again; a child that dies costs its rows only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daybreak.deploy import read_log
from daybreak.deploy._predlog import PredictionLog
from daybreak.deploy._serve import RawBatch, batch_columns, parse_fast
from daybreak.infra.store import Store

FIELDS = (("distance", "double", False), ("carrier_code", "string", False), ("plane_year", "double", True))
IDS = frozenset({"flight", "event_time"})
DAY = "2013-01-05"


def _log(spec, store: Store, process: bool) -> PredictionLog:
    s = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(
        update={"log": spec.monitoring.log.model_copy(update={"flush_seconds": 3600})})})
    return PredictionLog(s, store, process=process)


def _bodies() -> list[bytes]:
    """Request bodies of the shapes the fast path reads: split and records, with and without
    identity columns, nulls, text and numbers."""
    return [json.dumps(b).encode() for b in (
        {"dataframe_split": {"columns": ["distance", "carrier_code", "plane_year"],
                             "data": [[100.0, "UA", 2004], [250.5, "AA", None]]}},
        {"dataframe_split": {"columns": ["flight", "event_time", "distance", "carrier_code", "plane_year"],
                             "data": [[1545, f"{DAY}T15:00:00Z", 1400.0, "B6", 1999.0]]}},
        {"dataframe_records": [{"distance": 17.0, "carrier_code": "DL", "plane_year": None,
                                "flight": "77", "event_time": f"{DAY}T20:00:00Z"},
                               {"distance": 18.0, "carrier_code": "MQ", "plane_year": 2010,
                                "flight": "78", "event_time": f"{DAY}T21:00:00Z"}]},
    )]


def _read(spec, root: Path) -> pd.DataFrame:
    today = pd.Timestamp.now(tz="UTC").tz_convert("America/New_York").date()  # rows without an event time
    t = read_log(spec, Store(root), [pd.Timestamp(DAY).date(), today])
    assert t is not None
    return t.to_pandas().drop(columns=["served_at"]).sort_values(["request_id", "distance"]).reset_index(drop=True)


def test_the_child_writes_the_rows_the_thread_writes(spec, tmp_path: Path) -> None:
    """What the loop parsed, logged by the thread as columns, and by the child from the bodies."""
    bodies = _bodies()
    parsed = [parse_fast(b, FIELDS, IDS, 1000) for b in bodies]
    assert all(p is not None for p in parsed)
    carried = [p.ids for p in parsed]
    assert carried == [False, True, True]
    data = batch_columns([p.columns for p in parsed], FIELDS)
    preds = np.linspace(0.1, 0.5, sum(p.rows for p in parsed))
    requests = [(f"r{i}", p.rows, ({k: list(p.columns[k]) for k in IDS if k in p.columns} or None) if p.ids else None)
                for i, p in enumerate(parsed)]
    frame = pd.DataFrame({"distance": [5.0], "carrier_code": ["EV"], "plane_year": [np.nan]})
    for process in (False, True):
        plog = _log(spec, Store(tmp_path / str(process)), process)
        try:
            if process:
                assert plog.remote
                plog.record_raw("3", RawBatch(FIELDS, IDS, bodies, carried, [r[0] for r in requests]), preds)
            else:
                assert not plog.remote
                plog.record("3", data, preds, requests)
            plog.record("4", frame, np.array([0.9]), [("p", 1, {"event_time": [f"{DAY}T16:00:00Z"]})])
            assert plog.flush() == 6
            assert plog.stats()["files"] >= 2 and plog.stats()["dropped_rows"] == 0  # two dates
        finally:
            plog.close()
    thread, child = _read(spec, tmp_path / "False"), _read(spec, tmp_path / "True")
    assert len(thread) == 6
    pd.testing.assert_frame_equal(thread, child)
    assert child["request_id"].tolist() == ["p", "r0", "r0", "r1", "r2", "r2"]
    assert child["flight"].fillna("-").tolist() == ["-", "-", "-", "1545", "77", "78"]
    assert child["plane_year"].isna().sum() == 3  # null in, null logged


def test_a_child_that_dies_costs_its_rows_and_the_next_write_starts_another(spec, tmp_path: Path) -> None:
    plog = _log(spec, Store(tmp_path / "store"), True)
    frame = pd.DataFrame({"distance": [1.0, 2.0], "carrier_code": ["UA", "AA"], "plane_year": [2001.0, 2002.0]})
    ids = {"event_time": [f"{DAY}T15:00:00Z"] * 2}
    try:
        plog.record("1", frame, np.array([0.1, 0.2]), [("a", 2, ids)])
        assert plog.flush() == 2
        first = plog._child.proc
        first.kill()  # found dead before a write: another takes it, nothing lost
        first.join(timeout=10)
        plog.record("1", frame, np.array([0.3, 0.4]), [("b", 2, ids)])
        assert plog.flush() == 2
        second = plog._child.proc
        assert second is not first
        # dies in the middle of a write (while reading what it was sent): those rows are lost, and counted
        plog.record("1", {"distance": _Exit()}, np.array([0.0]), [("x", 1, None)])
        assert plog.flush() == 0
        stats = plog.stats()
        assert stats["dropped_rows"] == 1 and "writer process ended" in stats["last_error"]
        second.join(timeout=10)
        assert second.exitcode == 3
        plog.record("1", frame, np.array([0.5, 0.6]), [("c", 2, ids)])
        assert plog.flush() == 2
        assert plog._child.proc not in (first, second) and plog.stats()["last_error"] is None
    finally:
        plog.close()
    assert sorted(set(_read(spec, tmp_path / "store")["request_id"])) == ["a", "b", "c"]


class _Exit:
    """Ends the process that unpickles it."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_write_the_child_cannot_do_costs_rows_and_close_ends_the_child(spec, tmp_path: Path) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")  # the child cannot create its folders here
    plog = _log(spec, Store(blocker), True)
    frame = pd.DataFrame({"distance": [1.0], "carrier_code": ["UA"], "plane_year": [2001.0]})
    plog.record("1", frame, np.array([0.1]), [("a", 1, None)])
    assert plog.flush() == 0
    stats = plog.stats()
    assert stats["dropped_rows"] == 1 and stats["last_error"] and "writer process" not in stats["last_error"]
    child = plog._child.proc
    assert child.is_alive()  # a failed write is not a dead child
    plog.record("1", frame, np.array([0.2]), [("b", 1, None)])
    plog.close()  # what waits is tried, then the child ends
    assert not child.is_alive() and plog.stats()["dropped_rows"] == 2


@pytest.mark.parametrize("bad", [b'{"dataframe_split": {"columns": ["distance"], "data": [[1.0]]}}'])
def test_a_body_that_no_longer_parses_fails_its_write_not_the_child(spec, tmp_path: Path, bad: bytes) -> None:
    plog = _log(spec, Store(tmp_path / "store"), True)
    try:
        plog.record_raw("1", RawBatch(FIELDS, IDS, [bad], [False], ["x"]), np.array([0.1]))
        assert plog.flush() == 0 and "no longer parses" in plog.stats()["last_error"]
        plog.record_raw("1", RawBatch(FIELDS, IDS, _bodies()[:1], [False], ["y"]), np.array([0.1, 0.2]))
        assert plog.flush() == 2
    finally:
        plog.close()


def test_entries_go_to_the_child_in_messages_of_about_send_rows(spec, tmp_path: Path, monkeypatch) -> None:
    """Many small entries (1 row a request) go as a few messages, each whole, in order."""
    sent: list[int] = []
    plog = _log(spec, Store(tmp_path / "store"), True)
    try:
        plog.record("1", {"distance": np.array([0.0]), "carrier_code": np.array(["UA"], dtype=object),
                          "plane_year": np.array([np.nan])}, np.array([0.0]), [("warm", 1, None)])
        assert plog.flush() == 1  # the child is up
        real = plog._child.conn.send_bytes
        monkeypatch.setattr(plog._child.conn, "send_bytes", lambda b: (sent.append(len(b)), real(b))[1])
        for k in range(25):
            n = 100
            plog.record("1", {"distance": np.arange(k * n, (k + 1) * n, dtype=float),
                              "carrier_code": np.array(["UA"] * n, dtype=object),
                              "plane_year": np.full(n, 2000.0)}, np.full(n, k / 100), [(f"r{k:02d}", n, None)])
        assert plog.flush() == 2500
        assert len(sent) == 3 + 1 and sent[-1] == 0  # 1000, 1000, 500 rows, then "write what you hold"
    finally:
        plog.close()
    got = _read(spec, tmp_path / "store")
    got = got[got["request_id"] != "warm"]
    assert got["distance"].tolist() == list(np.arange(2500, dtype=float))
