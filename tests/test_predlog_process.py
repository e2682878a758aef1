"""The prediction log written by a child process (``daybreak serve``'s): the same rows as the
writer thread writes, from the request bodies read again; a child that dies costs its rows only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daybreak.deploy import _predlog, read_log
from daybreak.deploy._predlog import PredictionLog
from daybreak.deploy._serve import RawBatch, batch_columns, parse_fast
from daybreak.infra.store import Store

FIELDS = (("distance", "double", False), ("carrier_code", "string", False), ("plane_year", "double", True))
IDS = frozenset({"flight", "event_time"})
DAY = "2013-01-05"


def _log(spec, store: Store, process: bool, flush_seconds: float = 3600) -> PredictionLog:
    s = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(
        update={"log": spec.monitoring.log.model_copy(update={"flush_seconds": flush_seconds})})})
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
                plog.record_raw("3", RawBatch(FIELDS, IDS, bodies, [r[0] for r in requests]), preds)
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


def test_a_body_that_no_longer_parses_costs_its_rows_only(spec, tmp_path: Path) -> None:
    bad = b'{"dataframe_split": {"columns": ["distance"], "data": [[1.0]]}}'
    plog = _log(spec, Store(tmp_path / "store"), True)
    try:
        plog.record_raw("1", RawBatch(FIELDS, IDS, _bodies()[:1], ["y"]), np.array([0.1, 0.2]))
        plog.record_raw("1", RawBatch(FIELDS, IDS, [bad], ["x"]), np.array([0.1]))
        plog.record_raw("1", RawBatch(FIELDS, IDS, _bodies()[:1], ["z"]), np.array([0.3, 0.4]))
        assert plog.flush() == 4
        stats = plog.stats()
        assert "no longer parses" in stats["last_error"] and stats["dropped_rows"] == 1
        plog.record_raw("1", RawBatch(FIELDS, IDS, _bodies()[:1], ["w"]), np.array([0.1, 0.2]))
        assert plog.flush() == 2 and plog.stats()["last_error"] is None
    finally:
        plog.close()


def test_the_child_ignores_the_servers_stop_signals(spec, tmp_path: Path) -> None:
    """Ctrl-C and a service manager's SIGTERM reach the whole process group: the child must live
    to write what the server flushes as it stops."""
    import signal

    plog = _log(spec, Store(tmp_path / "store"), True)
    frame = pd.DataFrame({"distance": [1.0], "carrier_code": ["UA"], "plane_year": [2001.0]})
    try:
        plog.record("1", frame, np.array([0.1]), [("a", 1, None)])
        assert plog.flush() == 1
        child = plog._child.proc
        os.kill(child.pid, signal.SIGTERM)
        os.kill(child.pid, signal.SIGINT)
        plog.record("1", frame, np.array([0.2]), [("b", 1, None)])
        assert plog.flush() == 1 and plog._child.proc is child  # the same child wrote it
    finally:
        plog.close()
    assert not child.is_alive()


def test_a_child_that_does_not_answer_is_ended_and_its_rows_counted(spec, tmp_path: Path, monkeypatch) -> None:

    monkeypatch.setattr(_predlog, "WRITE_TIMEOUT", 2.0)  # (the child's start is not in it)
    s = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(  # (no writer thread racing this one)
        update={"log": spec.monitoring.log.model_copy(update={"flush_seconds": 0.01})})})
    plog = PredictionLog(s, Store(tmp_path / "store"), process=True, thread=False)
    frame = pd.DataFrame({"distance": [1.0], "carrier_code": ["UA"], "plane_year": [2001.0]})
    try:
        plog.record("1", frame, np.array([0.1]), [("a", 1, None)])
        assert plog.flush() == 1
        hung = plog._child.proc
        plog.record("1", {"distance": _Sleep()}, np.array([0.0]), [("x", 1, None)])  # hangs the child
        assert plog.flush() == 0
        stats = plog.stats()
        assert "did not answer within 2 s" in stats["last_error"] and stats["dropped_rows"] == 1
        assert not hung.is_alive()
        plog.record("1", frame, np.array([0.2]), [("b", 1, None)])
        assert plog.flush() == 1 and plog._child.proc is not hung  # another child
    finally:
        plog.close()


def test_a_write_that_fails_midway_is_never_written_later(spec, tmp_path: Path) -> None:
    """A chunk sent, then the next cannot be pickled: the child holding the first is ended, so the
    rows counted as not written are not written by the next flush either."""
    plog = _log(spec, Store(tmp_path / "store"), True)
    big = 1500  # more than SEND_ROWS: its own message, sent before the bad one
    try:
        plog.record("1", {"distance": np.arange(big, dtype=float), "carrier_code": np.array(["UA"] * big, dtype=object),
                          "plane_year": np.full(big, 2000.0)}, np.zeros(big), [("first", big, None)])
        plog.record("1", {"distance": np.array([lambda: 0], dtype=object)}, np.zeros(1), [("bad", 1, None)])
        assert plog.flush() == 0 and plog.stats()["dropped_rows"] == big + 1
        frame = pd.DataFrame({"distance": [1.0], "carrier_code": ["UA"], "plane_year": [2001.0]})
        plog.record("1", frame, np.array([0.2]), [("after", 1, None)])
        assert plog.flush() == 1
    finally:
        plog.close()
    assert set(_read(spec, tmp_path / "store")["request_id"]) == {"after"}


class _Sleep:
    """Stops the process that unpickles it for an hour."""

    def __reduce__(self):
        import time

        return time.sleep, (3600,)


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


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal value for value and type for type (floats: NaN where NaN, and the sign of zero)."""
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return (a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
                and np.array_equal(np.signbit(a), np.signbit(b)))
    return a.dtype == b.dtype and [(type(x), x) for x in a] == [(type(x), x) for x in b]


class _Recorder:
    """A log that keeps what the batcher hands it; `remote`: as the child's log, which gets a
    RawBatch and reads it after a pickle round trip."""

    def __init__(self, remote: bool) -> None:
        self.remote, self.got, self.raw, self.merged = remote, [], 0, 0

    def sampled(self) -> bool:
        return True

    def record(self, version, data, preds, requests) -> None:
        self.got.append((version, data, preds, list(requests)))

    def record_raw(self, version, batch, preds) -> None:
        import pickle

        batch = pickle.loads(pickle.dumps(batch, pickle.HIGHEST_PROTOCOL))
        data, requests = batch.columns()
        self.got.append((version, data, preds, requests))
        self.raw += 1
        if batch._merged() is not None:  # read as one body: then body by body must agree
            self.merged += 1
            each, each_requests = batch._each()
            assert set(each) == set(data) and repr(each_requests) == repr(requests)
            assert all(_same(v, each[k]) for k, v in data.items())


@pytest.mark.parametrize("identity", ["flights", "single series"])
def test_the_bodies_read_again_give_what_the_batcher_logs(spec, identity: str) -> None:
    """What ``Batcher._log`` hands a thread's log (the columns the model was given) and what the
    child reads from the bodies are the same, value for value and type for type, over random
    bodies of every fast-path shape: split, records and inputs, nulls, identity columns, text
    with non-ASCII, big integers, requests not sampled, and the partial slice of a big request.
    Half the batches are what clients send, one list of columns in ``dataframe_split``: the child
    reads those as one body (``RawBatch._merged``), checked against reading them body by body."""
    import random
    from types import SimpleNamespace

    from daybreak.deploy import _serve as S

    fields = (("distance", "double", False), ("carrier", "string", False), ("plane_year", "double", True),
              ("flight", "double", True), ("origin", "string", True))
    kinds = {f[0]: f for f in fields}
    rng = random.Random(7)

    def value(kind: str, optional: bool):
        if optional and rng.random() < 0.15:
            return None
        if kind == "double":
            return rng.choice([rng.randint(-5, 3000), rng.uniform(-1e6, 1e6), 0.0, -0.0, 2**53 + 1, 1e308])
        return rng.choice(["UA", "AA", "é", "", "x" * 5])

    def columns(ids: frozenset[str]) -> list[str]:
        cols = [f[0] for f in fields] + [i for i in ("event_time", "dest") if i in ids and rng.random() < 0.3]
        rng.shuffle(cols)
        return cols

    def body(ids: frozenset[str], cols: list[str] | None = None) -> bytes:
        n = rng.choice([1, 1, 2, 3, 40])
        shape = "split" if cols else rng.choice(["split", "records", "inputs_list", "inputs_dict"])
        cols = cols or columns(ids)
        rows = [[value(*kinds[c][1:]) if c in kinds else rng.choice(["2013-01-05T10:00:00Z", 7, None, "JFK"])
                 for c in cols] for _ in range(n)]
        b = ({"dataframe_split": {"columns": cols, "data": rows}} if shape == "split"
             else {"dataframe_records": [dict(zip(cols, r, strict=True)) for r in rows]} if shape == "records"
             else {"inputs": [dict(zip(cols, r, strict=True)) for r in rows]} if shape == "inputs_list"
             else {"inputs": {c: [r[k] for r in rows] for k, c in enumerate(cols)}})
        return json.dumps(b, separators=(",", ":") if rng.random() < 0.5 else None).encode()

    if identity == "single series":  # no entity: the row identity is the event time alone
        one = SimpleNamespace(id_columns=lambda: ["event_time"])
        holder = SimpleNamespace(spec=one, current=None)
    else:
        holder = SimpleNamespace(spec=spec, current=None)
    compared = raw = merged = 0
    for trial in range(200):
        thread, child = _Recorder(False), _Recorder(True)
        bt, bc = S.Batcher(holder, thread), S.Batcher(holder, child)
        bc.ids = bt.ids
        jobs = []
        uniform = columns(bt.ids) if trial % 2 else None  # one list of columns for the whole batch
        for k in range(rng.randint(1, 6)):
            b = body(bt.ids, uniform)
            p = S.parse_fast(b, fields, bt.ids, 100000)
            if p is not None:
                jobs.append(S.Job(fields, p.columns, None, p.rows, None, f"r{trial}-{k}", rng.random() < 0.7,
                                  carried=p.ids, raw=b))
        if not jobs:
            continue
        slices = [(j, 0, j.rows) for j in jobs]
        if rng.random() < 0.3 and jobs[-1].rows > 2:  # the first slice of a big request
            slices[-1] = (jobs[-1], 0, jobs[-1].rows // 2)
        cur = S.Loaded("7", None, 0.0, tuple(tuple(f) for f in fields))  # equal fields, another object (a swap)
        data = S.batch_columns([S._cut(*s) for s in slices], cur.fields)
        preds = np.arange(sum(b - a for _, a, b in slices), dtype=float) + trial * 1000
        bt._log(cur, data, preds, slices)
        bc._log(cur, data, preds, slices)
        assert len(thread.got) == len(child.got)
        for (v1, d1, p1, r1), (v2, d2, p2, r2) in zip(thread.got, child.got, strict=True):
            compared += 1
            assert v1 == v2 and np.array_equal(p1, p2) and set(d1) == set(d2)
            assert all(_same(np.asarray(d1[k]), np.asarray(d2[k])) for k in d1), (trial, d1, d2)
            norm = [[(rid, n, None if c is None else {k: list(v) for k, v in sorted(c.items())})
                     for rid, n, c in r] for r in (r1, r2)]
            assert repr(norm[0]) == repr(norm[1])
        raw += child.raw
        merged += child.merged
        bt.close()
        bc.close()
    assert compared > 150 and raw > 100  # most went as bodies
    assert merged > 50, merged


def test_a_padded_body_goes_to_the_child_as_columns(spec) -> None:
    """A body past RAW_BYTES_PER_ROW a row (whitespace costs nothing to send) is logged as its
    columns: the log's queue holds no more for it than for any other."""
    from types import SimpleNamespace

    from daybreak.deploy import _serve as S

    fields = (("distance", "double", False),)
    log = _Recorder(True)
    batcher = S.Batcher(SimpleNamespace(spec=spec, current=None), log)
    plain = b'{"dataframe_split": {"columns": ["distance"], "data": [[1.0]]}}'
    padded = plain[:-1] + b" " * (2 * S.RAW_BYTES_PER_ROW) + b"}"
    cur = S.Loaded("7", None, 0.0, fields)
    for b in (plain, padded):
        p = S.parse_fast(b, fields, batcher.ids, 10)
        job = S.Job(fields, p.columns, None, p.rows, None, "r", True, carried=False, raw=b)
        batcher._log(cur, S.batch_columns([p.columns], fields), np.array([0.5]), [(job, 0, 1)])
    batcher.close()
    assert log.raw == 1 and len(log.got) == 2  # the plain one as its body, the padded one as columns
    assert [r[1]["distance"].tolist() for r in log.got] == [[1.0], [1.0]]


def test_a_child_that_could_not_start_is_tried_again(spec, tmp_path: Path, monkeypatch) -> None:
    """A start that fails (no processes or files left): the server's writer thread writes that
    flush's rows, and a later flush starts the child."""
    import multiprocessing.process

    monkeypatch.setattr(_predlog, "START_RETRY_SECONDS", 0.0)
    plog = _log(spec, Store(tmp_path / "store"), True)
    frame = pd.DataFrame({"distance": [1.0], "carrier_code": ["UA"], "plane_year": [2001.0]})
    real, calls = multiprocessing.process.BaseProcess.start, []

    def once(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(24, "Too many open files")
        return real(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", once)
    try:
        plog.record("1", frame, np.array([0.1]), [("a", 1, None)])
        assert plog.flush() == 1 and plog.stats()["writer"].startswith("thread")
        plog.record("1", frame, np.array([0.2]), [("b", 1, None)])
        assert plog.flush() == 1 and plog.stats()["writer"] == "process" and plog.stats()["last_error"] is None
    finally:
        plog.close()
    assert len(calls) == 2
    files = sorted(p.name for p in (tmp_path / "store").rglob("*.parquet"))
    assert len(files) == 2 and sum("-w" in f for f in files) == 1  # (the child's files carry its pid)
    assert set(_read(spec, tmp_path / "store")["request_id"]) == {"a", "b"}


def test_a_child_that_never_starts_is_not_started_at_every_flush(spec, tmp_path: Path, monkeypatch) -> None:
    """A child that cannot start (a sandbox without processes, say) was started again at every
    flush, each start seconds of imports, and each flush's rows were lost. Now the server's writer
    thread writes them, and the start is tried again after a back-off that doubles."""
    import multiprocessing.process

    calls = []

    def never(self):
        calls.append(time.monotonic())
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", never)
    monkeypatch.setattr(_predlog, "START_RETRY_SECONDS", 1000.0)
    plog = _log(spec, Store(tmp_path / "store"), True)
    frame = pd.DataFrame({"distance": [1.0], "carrier_code": ["UA"], "plane_year": [2001.0]})
    try:
        for k in range(5):
            plog.record("1", frame, np.array([0.1]), [(f"r{k}", 1, None)])
            assert plog.flush() == 1
        assert len(calls) == 1 and plog.stats()["dropped_rows"] == 0
        plog._child.retry_at = 0.0  # the back-off is over: tried again, and it doubles
        plog.record("1", frame, np.array([0.1]), [("r5", 1, None)])
        assert plog.flush() == 1 and len(calls) == 2
        assert plog._child.retry_at - time.monotonic() > 1500  # 2,000 s: twice the first
    finally:
        plog.close()
    assert len(_read(spec, tmp_path / "store")) == 6


def _dies_at_its_first_write(conn, *args) -> None:
    """A log child that starts and dies as soon as it is given work (an OOM kill, a crash)."""
    conn.send("ready")
    conn.recv_bytes()
    os._exit(1)


def test_a_child_that_dies_at_its_first_write_backs_off_like_a_failed_start(spec, tmp_path: Path,
                                                                             monkeypatch) -> None:
    """A child that says it is ready and dies at its first write was started again at every flush
    (seconds of imports each) and every flush's rows were lost: it now counts as a failed start,
    and the writer thread writes the next flushes until the back-off is over."""
    import multiprocessing.process

    monkeypatch.setattr(_predlog, "_child_main", _dies_at_its_first_write)
    real, starts = multiprocessing.process.BaseProcess.start, []

    def counted(self):
        starts.append(1)
        return real(self)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", counted)
    plog = _log(spec, Store(tmp_path / "store"), True)
    frame = pd.DataFrame({"distance": [1.0], "carrier_code": ["UA"], "plane_year": [2001.0]})
    written = []
    try:
        for k in range(3):
            plog.record("1", frame, np.array([0.1]), [(f"r{k}", 1, None)])
            written.append(plog.flush())
        stats = plog.stats()
    finally:
        plog.close()
    # its first flush's rows are lost if it died once told to write (it may have written some),
    # else the writer thread wrote them: which comes first, its death or the last send, is a race
    assert len(starts) == 1 and written[0] in (0, 1) and written[1:] == [1, 1]
    assert stats["dropped_rows"] == 1 - written[0] and stats["writer"].startswith("thread")
