"""The spec fails early, naming the field, and its hashes identify what shapes the data."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import SPEC

from daybreak.infra.errors import SpecError
from daybreak.spec import load_spec, parse_duration, parse_spec


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load(SPEC.read_text())


def test_demo_spec_loads_with_all_features(raw: dict) -> None:
    s = parse_spec(raw)
    names = s.features.feature_names()
    assert "wx_temp" in names and "carrier_dep_delay_mean_7d" in names and "plane_year" in names
    assert s.features.categorical_names() == ["carrier_code", "origin_code", "dest_code"]
    assert s.features.lookback_days() == 9  # 7d windows + 1d max_delay + a day of margin


def _err(raw: dict) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw, origin="t.yaml")
    return str(e.value)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda r: r["features"]["columns"].append({"name": "x", "expr": "no_such_col + 1"}),
         "features.columns[6].expr: unknown column(s) ['no_such_col']"),
        (lambda r: r["features"]["columns"].append({"name": "x", "expr": "__import__('os')"}),
         "unknown function '__import__'"),
        (lambda r: r["features"]["columns"].append({"name": "x", "expr": "distance.real"}),
         "Attribute is not allowed"),
        (lambda r: r["sources"]["flights"]["columns"].update(year="integer"),
         "sources.flights.columns.year.type: unknown type 'integer'"),
        # a list of numbers where durations go: one line, saying what a duration looks like (issue 23)
        (lambda r: r["features"]["windows"][0].update(windows=[5, 20]),
         "  features.windows[0].windows[0], [1]: a duration is text such as '7d', '2h' or '30m' (a time span, "
         "not a count of rows) (got 5, 20)"),
        (lambda r: r["gate"].update(baselines=[{"kind": "feature"}]),
         "  gate.baselines[0]: a feature baseline needs 'column'"),
        (lambda r: r["sources"]["flights"].update(unique=["nope"]), "unique: column 'nope' is not in the contract"),
        (lambda r: r["sources"]["flights"]["event_time"].update(date_timezone="Mars/Olympus"),
         "unknown time zone 'Mars/Olympus'"),
        (lambda r: r["sources"]["flights"].update(severity={"vibes": "warn"}), "unknown rule(s) ['vibes']"),
        (lambda r: r["sources"]["flights"]["columns"].update(carrier={"type": "string", "min": 1}),
         "columns.carrier: min/max apply to numeric columns only"),
        (lambda r: r["features"]["windows"][0].update(windows=["7 days"]), "invalid duration '7 days'"),
        (lambda r: r["features"]["asof"][0].update(source="nope"), "features.asof[0].source: unknown source 'nope'"),
        (lambda r: r["features"]["asof"][0]["columns"].update(wx_x="nope"), "column 'nope' is not in source 'weather'"),
        (lambda r: r["model"].update(flavor="lightgbm"), "model.flavor"),
        (lambda r: r["training"].update(window_days=0), "training.window_days"),
        (lambda r: r.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda r: r.update(online={"materialize": True, "max_staleness": "soon"}),
         "online.max_staleness: invalid duration 'soon'"),
        (lambda r: r.update(online={"url": "redis://:secret@host"}), "online.url: Extra inputs are not permitted"),
        (lambda r: r["sources"]["flights"].update(path="landing/flights/all.csv"), "must contain '{date}'"),
        (lambda r: r["features"]["columns"].append({"name": "distance", "expr": "distance"}),
         "duplicate feature names ['distance']"),
    ],
)
def test_bad_spec_names_the_field(raw: dict, mutate, expected: str) -> None:
    r = copy.deepcopy(raw)
    mutate(r)
    msg = _err(r)
    assert "t.yaml: invalid spec" in msg
    assert expected in msg, msg


def test_missing_file_and_bad_yaml(tmp_path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)


def test_feature_version_ignores_model_changes(raw: dict) -> None:
    a = parse_spec(raw)
    r = copy.deepcopy(raw)
    r["model"]["params"]["max_depth"] = 3
    b = parse_spec(r)
    assert a.feature_version() == b.feature_version()
    assert a.spec_hash() != b.spec_hash()
    r["features"]["windows"][0]["windows"] = ["2d"]
    assert parse_spec(r).feature_version() != a.feature_version()


def test_durations() -> None:
    assert parse_duration("90m").total_seconds() == 5400
    assert parse_duration("7d").days == 7
    with pytest.raises(ValueError):
        parse_duration("soon")
