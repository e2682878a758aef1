"""The prediction log's writer and reader, the serving fast path with identity columns, the
monitoring spec, and notifications (a real HTTP receiver on loopback)."""

from __future__ import annotations

import json
import logging
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from daybreak.deploy import prune, read_log
from daybreak.deploy._predlog import PredictionLog, log_files, log_zone
from daybreak.deploy._serve import fast_columns
from daybreak.infra.errors import SpecError
from daybreak.infra.store import Store
from daybreak.spec import load_spec, parse_spec

FEATURES = ["distance", "carrier_code"]


def _log(spec, store: Store, **cfg) -> PredictionLog:
    s = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(
        update={"log": spec.monitoring.log.model_copy(update={"flush_seconds": 3600, **cfg})})})
    return PredictionLog(s, store)


def _batch(n: int, start: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    frame = pd.DataFrame({"distance": np.arange(start, start + n, dtype=float),
                          "carrier_code": np.array(["UA"] * n, dtype=object)})
    return frame, np.linspace(0, 1, n)


def test_rows_are_written_by_event_date_in_the_sources_zone(spec, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    plog = _log(spec, store)
    try:
        frame, preds = _batch(4)
        ids = {"carrier": ["UA", "UA", "AA", "AA"], "flight": [1, "2", 3, 4], "origin": ["EWR"] * 4,
               "dest": ["IAH"] * 4,
               # 00:30 UTC on the 6th is still the 5th in New York, where staging counts days
               "event_time": ["2013-01-05T15:00:00+00:00", "2013-01-06T00:30:00Z", "2013-01-06T15:00:00Z", "bad"]}
        plog.record("7", frame, preds, [("r1", 3, {k: v[:3] for k, v in ids.items()}),
                                        ("r2", 1, {k: v[3:] for k, v in ids.items()})])
        assert plog.flush() == 4
    finally:
        plog.close()
    days = {d: log_files(store, log_zone(spec), date.fromisoformat(d)) for d in ("2013-01-05", "2013-01-06")}
    assert len(days["2013-01-05"]) == 1 and len(days["2013-01-06"]) == 1
    five = read_log(spec, store, [date(2013, 1, 5)]).to_pandas()
    assert five["flight"].tolist() == ["1", "2"] and (five["request_id"] == "r1").all()
    assert (five["model_version"] == "7").all() and five["distance"].tolist() == [0.0, 1.0]
    # an event time that does not parse falls back to the day it was served
    served = read_log(spec, store, [pd.Timestamp.now(tz="UTC").tz_convert("America/New_York").date()])
    assert served is not None and served.to_pandas()["request_id"].tolist() == ["r2"]
    # files appear whole: no temporary names are left behind
    assert not [p for p in (tmp_path / "store").rglob("_*")]


def test_sampling_bounds_and_drops(spec, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    plog = _log(spec, store, sample_rate=0.25, max_pending_rows=1000)
    try:
        n = sum(plog.sampled() for _ in range(20_000))
        assert 4500 < n < 5500  # 25% of requests, within 7 standard deviations
        frame, preds = _batch(800)
        plog.record("1", frame, preds, [("a", 800, None)])
        plog.record("1", frame, preds, [("b", 800, None)])  # over max_pending_rows: dropped, counted
        assert plog.stats()["dropped_rows"] == 800 and plog.stats()["pending_rows"] == 800
        assert plog.flush() == 800
    finally:
        plog.close()
    off = _log(spec, store, sample_rate=0.0)
    assert not any(off.sampled() for _ in range(1000))
    off.close()


def test_a_store_that_fails_costs_rows_not_requests(spec, tmp_path: Path) -> None:
    blocker = tmp_path / "store"
    blocker.write_text("not a folder")  # the log cannot create its folders here
    plog = _log(spec, Store(blocker))
    frame, preds = _batch(10)
    plog.record("1", frame, preds, [("a", 10, None)])
    assert plog.flush() == 0
    stats = plog.stats()
    assert stats["dropped_rows"] == 10 and stats["last_error"]
    plog.close()


@pytest.mark.parametrize("process", [False, True], ids=["thread", "child process"])
def test_a_write_that_fails_on_its_second_day_counts_the_first_days_rows_written(spec, tmp_path: Path,
                                                                                 process: bool) -> None:
    """One flush holding two days writes a file a day: when the second day's fails, the first
    day's rows are on disk and counted written; only the second day's are counted dropped."""
    store = Store(tmp_path / "store")
    blocked = Path(store.path(log_zone(spec), "date=2013-01-06"))
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")  # that day's folder cannot be made
    s = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(
        update={"log": spec.monitoring.log.model_copy(update={"flush_seconds": 3600})})})
    plog = PredictionLog(s, store, process=process)
    try:
        frame, preds = _batch(5)
        days = ["2013-01-05T15:00:00Z"] * 3 + ["2013-01-06T15:00:00Z"] * 2
        plog.record("1", frame, preds, [("a", 5, {"event_time": days})])
        assert plog.flush() == 3
        stats = plog.stats()
        assert (stats["written_rows"], stats["dropped_rows"], stats["files"]) == (3, 2, 1) and stats["last_error"]
    finally:
        plog.close()
    assert read_log(spec, store, [date(2013, 1, 5)]).num_rows == 3


def test_reader_skips_a_damaged_file_and_retention_prunes(spec, tmp_path: Path, caplog) -> None:
    store = Store(tmp_path / "store")
    plog = _log(spec, store)
    frame, preds = _batch(3)
    for d in ("2013-01-01", "2013-01-20", "2013-02-10"):
        plog.record("1", frame, preds, [("x", 3, {"event_time": [f"{d}T15:00:00Z"] * 3})])
    plog.close()
    folder = Path(store.path(log_zone(spec), "date=2013-01-20"))
    (folder / "zz-broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with caplog.at_level(logging.WARNING):
        t = read_log(spec, store, [date(2013, 1, 20)])
    assert t.num_rows == 3 and "zz-broken.parquet" in caplog.text
    assert prune(spec, store, date(2013, 2, 10)) == ["2013-01-01"]  # retention_days=30
    assert read_log(spec, store, [date(2013, 1, 1)]) is None
    assert read_log(spec, store, [date(2013, 1, 20)]).num_rows == 3


def test_fast_path_takes_identity_columns_but_nothing_else() -> None:
    fields = (("distance", "double", False), ("carrier_code", "string", False))
    ids = frozenset({"flight", "event_time"})
    split = {"dataframe_split": {"columns": ["flight", "distance", "carrier_code"], "data": [[1, 2.0, "UA"]]}}
    cols = fast_columns(split, fields, ids)
    assert cols == {"flight": (1,), "distance": (2.0,), "carrier_code": ("UA",)}
    records = {"dataframe_records": [{"distance": 2.0, "carrier_code": "UA", "event_time": "2013-01-01T00:00:00Z"}]}
    assert fast_columns(records, fields, ids)["event_time"] == ("2013-01-01T00:00:00Z",)
    unknown = {"dataframe_split": {"columns": ["tail", "distance", "carrier_code"], "data": [[1, 2.0, "UA"]]}}
    assert fast_columns(unknown, fields, ids) is None  # MLflow's parser decides about unknown columns
    assert fast_columns(split, fields) is None  # no identity columns configured: as before
    dup = {"dataframe_split": {"columns": ["distance", "distance", "carrier_code"], "data": [[1.0, 2.0, "UA"]]}}
    assert fast_columns(dup, fields, ids) is None
    mixed = {"dataframe_records": [{"distance": 2.0, "carrier_code": "UA", "flight": 1},
                                   {"distance": 2.0, "carrier_code": "UA"}]}
    assert fast_columns(mixed, fields, ids) is None


def test_monitoring_spec_is_checked_and_does_not_change_the_model_identity(spec) -> None:
    raw = spec.model_dump(mode="json")
    raw["monitoring"] = {"log": {"sample_rate": 0.1}, "notify": {"webhook": "https://hooks.example/x"}}
    assert parse_spec(raw).spec_hash() == spec.spec_hash()
    for bad, where in [({"log": {"id_columns": ["tailnum"]}}, "monitoring.log.id_columns[0]"),
                       ({"log": {"sample_rate": 1.5}}, "sample_rate"),
                       ({"metric": "rmse"}, "monitoring.metric"),
                       ({"drift": {"warn_psi": 0.5, "block_psi": 0.2}}, "block_psi"),
                       ({"notify": {"webhook": "ftp://x"}}, "webhook"),
                       ({"slices": ["nope"]}, "monitoring.slices[0]")]:
        raw["monitoring"] = bad
        with pytest.raises((SpecError, ValueError), match=where.split("[")[0].split(".")[-1]):
            parse_spec(raw)


def test_notification_posts_json_and_never_raises(spec, caplog) -> None:
    from daybreak.monitor._monitor import notify

    got = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook?token=hunter2"
        with_url = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(update={
            "notify": spec.monitoring.notify.model_copy(update={"webhook": url})})})
        assert notify(with_url, {"event": "daybreak.model.alert", "x": 1}) is True
        assert got == [{"event": "daybreak.model.alert", "x": 1}]
    finally:
        server.shutdown()
    with caplog.at_level(logging.WARNING):
        assert notify(with_url, {"event": "e"}) is False  # the receiver is gone
    assert "hunter2" not in caplog.text and "127.0.0.1" in caplog.text
    assert notify(spec, {"event": "e"}) is False  # no webhook configured


def test_flights_spec_loads_with_defaults() -> None:
    s = load_spec(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")
    assert s.id_columns() == ["carrier", "flight", "origin", "dest", "event_time"]
    assert s.live_metric() == "roc_auc" and s.live_floor() == 0.55


def test_log_on_an_s3_store(spec, s3_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same log on S3 (moto's server on loopback): one object per flush and date, no temporary
    keys left behind, read back and pruned like a local one."""
    import uuid

    from s3 import apply_env

    from daybreak.infra.context import RunContext

    apply_env(monkeypatch, s3_server.env())
    bucket = f"log-{uuid.uuid4().hex[:10]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    monkeypatch.setenv("DAYBREAK_STORE", f"s3://{bucket}/store")
    store = RunContext.create("2013-01-20").store
    plog = _log(spec, store)
    frame, preds = _batch(3)
    for d in ("2013-01-01", "2013-01-20"):
        plog.record("4", frame, preds, [(f"r-{d}", 3, {"event_time": [f"{d}T15:00:00Z"] * 3})])
    assert plog.flush() == 6 and plog.stats()["dropped_rows"] == 0
    plog.close()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 2 and all(k.endswith(".parquet") for k in keys), keys
    assert not [k for k in keys if k.rsplit("/", 1)[-1].startswith("_")]
    got = read_log(spec, store, [date(2013, 1, 20)]).to_pandas()
    assert got["request_id"].tolist() == ["r-2013-01-20"] * 3 and got["distance"].tolist() == [0.0, 1.0, 2.0]
    assert (got["model_version"] == "4").all() and got["prediction"].tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert prune(spec, store, date(2013, 2, 10)) == ["2013-01-01"]
    assert read_log(spec, store, [date(2013, 1, 1)]) is None
    assert read_log(spec, store, [date(2013, 1, 20)]).num_rows == 3
