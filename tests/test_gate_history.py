"""The gate reads the day-to-day spread's history from the registry: the daily estimates earlier
gates recorded on their candidates' tags, in a real (sqlite) MLflow registry; and replay rebuilds
the same history from the gate runs it re-judges."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from daybreak.gate._gating import gate_history
from daybreak.gate._replay import _history, _Recorded
from daybreak.infra.records import GateRecord, Tag


def _estimate(value: float, **extra) -> dict:
    return {"champion": {"day": "x", "metric": "roc_auc", "value": value, "se": 0.01, **extra}}


@pytest.fixture
def registry(tmp_path: Path, spec) -> MlflowClient:
    cl = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                      registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    cl.create_registered_model(spec.model.name)
    (tmp_path / "m").mkdir()

    def version(day: str | None, daily: str | None) -> None:
        tags = {} if day is None else {Tag.GATE_HOLDOUT_DATE: day}
        if daily is not None:
            tags[Tag.GATE_DAILY] = daily
        cl.create_model_version(spec.model.name, source=str(tmp_path / "m"), tags=tags)

    for d in range(1, 31):  # one gate a day, December 2012 (the 13th without a record: not gated)
        version(f"2012-12-{d:02d}", None if d == 13 else json.dumps(_estimate(d / 100)))
    version("2012-12-30", json.dumps(_estimate(0.99)))  # regated later: the newest version wins
    version("2012-12-29", "{not json")  # the newest record of the 29th is unreadable: the day is skipped
    version("2012-12-31", json.dumps(_estimate(0.5)))  # the gated day itself: not history
    for bad in ('{"champion": {"value": ' + "9" * 5000 + "}}", "[" * 3000 + "]" * 3000):
        version("2012-11-30", bad)  # edited tags (outside the lookback, but read): never a crash
    version(None, json.dumps(_estimate(0.5)))  # no holdout date
    return cl


def test_the_gate_reads_the_lookback_from_the_registry_newest_record_per_day(registry, spec) -> None:
    history = gate_history(spec, registry, "2012-12-31")
    got = [(e["day"], e["value"]) for e in history["champion"]]
    # 28 days back: 2012-12-03 .. 2012-12-30, less the 13th (no record) and the 29th (unreadable)
    want = [(f"2012-12-{d:02d}", d / 100) for d in range(3, 29) if d != 13] + [("2012-12-30", 0.99)]
    assert got == want
    off = spec.model_copy(update={"gate": spec.gate.model_copy(update={
        "bootstrap": spec.gate.bootstrap.model_copy(update={"between_days": "off"})})})
    assert gate_history(off, registry, "2012-12-31") == {}


def test_replay_uses_the_recorded_history_and_replaces_the_days_it_rejudged(spec) -> None:
    recorded = {"champion": [{"day": f"2012-12-{d:02d}", "metric": "roc_auc", "value": d / 100, "se": 0.01}
                             for d in range(1, 31)] + ["junk", {"day": 5}]}
    r = _Recorded("2012-12-31", "7", GateRecord(decision="PROMOTE"), {"history": recorded}, pd.DataFrame())
    same = _history(spec, r, {})
    assert [e["value"] for e in same["champion"]] == [d / 100 for d in range(3, 31)]  # the 28-day lookback
    # a replay under another policy re-judged the 29th and 30th: its estimates replace the recorded
    replayed = {"2012-12-29": _estimate(-1.0), "2012-12-30": _estimate(-2.0, unit="row"),
                "2012-12-31": _estimate(-3.0)}  # the day itself is never its own history
    got = _history(spec, r, replayed)["champion"]
    assert [e["value"] for e in got][-3:] == [0.28, -1.0, -2.0]
    assert got[-1]["unit"] == "row" and got[-1]["days"] == 1


@pytest.mark.parametrize("text", [
    '{"champion": {"value": ' + "9" * 5000 + "}}",  # past Python's int digit limit: ValueError
    "[" * 3000 + "]" * 3000,  # RecursionError
    '{"champion": {"metric": "roc_auc", "value": ' + "9" * 400 + ', "se": 0.01}}',  # OverflowError as a float
    '{"champion": {"metric": "roc_auc", "value": 0.1, "se": -1}}',  # a negative error
    '{"champion": {"metric": "roc_auc", "value": true, "se": 0.01}}',
    "x" * 9000,
])
def test_an_edited_tag_never_crashes_a_reader(text: str) -> None:
    from daybreak.gate._gating import history_of
    from daybreak.infra.records import Lineage

    tags = {Tag.GATE_DAILY: text, Tag.GATE_RULES: text, Tag.HOLDOUT: text, Tag.GATE_DECISION: "REJECT"}
    rec = GateRecord.from_tags(tags)
    assert isinstance(rec.rules, list) and all(isinstance(r, dict) for r in rec.rules)
    assert Lineage.from_tags(tags).holdout == [] or all(isinstance(d, str) for d in Lineage.from_tags(tags).holdout)
    assert history_of({"2013-01-01": rec.daily}) == {}


def test_a_regate_that_records_no_estimate_clears_the_earlier_one() -> None:
    assert GateRecord(decision="INSUFFICIENT_DATA").to_tags()[Tag.GATE_DAILY] == "{}"
