"""Leaks are refused when the spec is validated, naming the field (issue 23, DESIGN.md "Time").

Specs here are not flights: a single price series with no entity, and per-store daily sales.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from daybreak.infra.errors import SpecError
from daybreak.spec import parse_spec

PRICES: dict[str, Any] = {
    "name": "prices",
    "sources": {"prices": {"path": "landing/prices/{date}.csv", "columns": {
        "day": "timestamp[us, UTC]", "close": "float64", "volume": "float64"}}},
    "features": {
        "name": "prices", "base": "prices", "event_time": "day + hours(16)",
        # the label is the day's close: known at the close, the row's event time
        "label": {"name": "close_next", "expr": "close", "known_at": "event_time"},
        "windows": [{"by": [], "value": "close", "lag": [1, 5], "rows": [5], "aggs": ["mean", "last"],
                     "lookback": "14d", "prefix": "close_"}],
        "columns": [{"name": "ret_1", "expr": "close_lag_1 / close_lag_5 - 1"}],
    },
    "model": {"name": "prices", "task": "regression"},
}

SALES: dict[str, Any] = {
    "name": "sales",
    "sources": {
        "sales": {"path": "landing/sales/{date}.csv", "columns": {
            "store": "string", "day": "timestamp[us, UTC]", "units": "float64", "promo": "int64",
            "returned": "float64"}},
        "footfall": {"path": "landing/footfall/{date}.csv", "columns": {
            "store": "string", "at": "timestamp[us, UTC]", "visitors": "float64"}},
    },
    "features": {
        "name": "sales", "base": "sales", "event_time": "day + hours(20)", "keys": ["store"],
        "label": {"name": "units", "expr": "units"},
        "columns": [{"name": "promo", "expr": "promo"}],
        "windows": [{"by": ["store"], "value": "visitors", "source": "footfall", "time": "at",
                     "aggs": ["sum"], "windows": ["7d"], "prefix": "visitors_"}],
    },
    "model": {"name": "sales", "task": "regression"},
}


def _err(raw: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(raw, try_model=False)
    return str(e.value)


def test_the_two_shapes_validate() -> None:
    p = parse_spec(PRICES, try_model=False)
    assert p.features.feature_names() == ["ret_1", "close_mean_5rows", "close_last_5rows", "close_lag_1",
                                          "close_lag_5"]
    assert p.features.lookback_days() == 15  # 14d lookback, a day of margin
    s = parse_spec(SALES, try_model=False)
    assert s.features.lookback_days("footfall") == 8 and s.features.lookback_days() == 0


def test_self_asof_without_known_at_is_refused() -> None:
    """The issue's leak: the base source joined onto itself by entity, at the row's own date, with
    the event later the same day, handed every row its own end-of-day value."""
    raw = copy.deepcopy(SALES)
    raw["features"]["asof"] = [{"source": "sales", "time": "day", "by": ["store"], "tolerance": "2d",
                                "columns": {"prev_units": "units"}}]
    msg = _err(raw)
    assert "features.asof[0].known_at: an as-of join of the base source 'sales' onto itself needs known_at" in msg
    assert "spec: features" not in msg  # the path is said once, as the YAML reads
    raw["features"]["asof"][0]["known_at"] = "day"  # the row's own time: the same leak, declared
    assert "features.asof[0].known_at: joins label column(s) ['units'] known by the row's own event" in _err(raw)
    raw["features"]["asof"][0]["known_at"] = "day + days(1)"  # known the next day: fine, saying how late
    assert "features.asof[0]: known_at needs max_delay" in _err(raw)
    raw["features"]["asof"][0]["max_delay"] = "1d"
    parse_spec(raw, try_model=False)


def test_window_over_a_label_column_known_at_the_event_is_refused() -> None:
    """A store's recent units counting today's sale, whose units are not known until it closes."""
    raw = copy.deepcopy(SALES)
    raw["features"]["windows"].append({"by": ["store"], "value": "units", "aggs": ["mean"], "windows": ["7d"],
                                       "prefix": "units_"})
    msg = _err(raw)
    assert "features.windows[1].known_at: the window aggregates label column(s) ['units']" in msg
    raw["features"]["windows"][1]["known_at"] = "event_time"  # said explicitly: the same leak
    assert "features.windows[1].known_at" in _err(raw)
    raw["features"]["windows"][1]["known_at"] = "day + days(1)"  # known the next morning
    raw["features"]["windows"][1]["max_delay"] = "1d"
    parse_spec(raw, try_model=False)


def test_window_over_a_label_column_takes_label_known_at() -> None:
    raw = copy.deepcopy(SALES)
    raw["features"]["label"]["known_at"] = "2d"
    raw["features"]["windows"].append({"by": ["store"], "value": "units", "aggs": ["mean"], "windows": ["7d"],
                                       "prefix": "units_"})
    w = parse_spec(raw, try_model=False).features.windows[1]
    assert w.known_at == "event_time + seconds(172800)" and w.max_delay == "172800s"
    assert w.lookback_days() == 10


def test_derived_feature_reading_the_label_on_its_own_row_is_refused() -> None:
    raw = copy.deepcopy(SALES)
    raw["features"]["columns"].append({"name": "net", "expr": "units - coalesce(returned, 0)"})
    assert "features.columns[1].expr: reads label column(s) ['units'] of its own row" in _err(raw)


def test_derived_features_and_delta_label_read_window_outputs() -> None:
    """`price / prev_price - 1` and a delta label `y - last(y)`: the two things users could not say."""
    raw = copy.deepcopy(PRICES)
    raw["features"]["label"] = {"name": "change", "expr": "close - close_lag_1", "known_at": "event_time"}
    raw["features"]["columns"].append({"name": "ret_sq", "expr": "ret_1 * ret_1"})  # an earlier column
    s = parse_spec(raw, try_model=False)
    assert "ret_sq" in s.features.feature_names()
    raw["features"]["columns"].insert(0, {"name": "early", "expr": "ret_1 + 1"})  # before ret_1 exists
    assert "features.columns[0].expr: unknown column(s) ['ret_1']" in _err(raw)


@pytest.mark.parametrize("change, expected", [
    ({"lag": [1], "windows": None}, "rows and lag need `lookback`"),
    ({"rows": [0]}, "between 1 and"),
    ({"aggs": ["median"]}, "aggs[0]"),
    ({"source": "nope"}, "features.windows[0].source: unknown source 'nope'"),
    ({"time": "day"}, "features.windows[0]: `time` is for a window over another `source`"),
])
def test_window_kinds_fail_naming_the_field(change: dict[str, Any], expected: str) -> None:
    raw = copy.deepcopy(PRICES)
    w = raw["features"]["windows"][0]
    for k, v in change.items():
        if v is None:
            w.pop(k, None)
        else:
            w[k] = v
    if "lag" in change:
        w.pop("lookback"), w.pop("rows")
        raw["features"]["columns"] = []
    assert expected in _err(raw)


def test_window_over_another_source_needs_its_time() -> None:
    raw = copy.deepcopy(SALES)
    del raw["features"]["windows"][0]["time"]
    assert "features.windows[0].time: a window over source 'footfall' needs `time`" in _err(raw)


def test_new_fields_at_their_defaults_do_not_change_the_hashes() -> None:
    """Upgrading rebuilds nothing: a spec written with the new fields at their defaults hashes as
    one written without them."""
    plain = parse_spec(SALES, try_model=False)
    raw = copy.deepcopy(SALES)
    raw["features"]["leak_check"] = "block"
    raw["features"]["windows"][0] |= {"rows": [], "lag": []}
    raw["training"] = {"count_days": "calendar", "incomplete_history": "exclude"}
    explicit = parse_spec(raw, try_model=False)
    assert (plain.spec_hash(), plain.feature_version()) == (explicit.spec_hash(), explicit.feature_version())
    raw["features"]["windows"][0]["rows"] = [3]
    raw["features"]["windows"][0]["lookback"] = "7d"
    assert parse_spec(raw, try_model=False).feature_version() != plain.feature_version()


def test_label_known_at_expression_needs_max_delay_for_windows() -> None:
    raw = copy.deepcopy(SALES)
    raw["sources"]["sales"]["columns"]["counted_at"] = "timestamp[us, UTC]"
    raw["features"]["label"]["known_at"] = "counted_at"
    raw["features"]["windows"].append({"by": ["store"], "value": "units", "aggs": ["mean"], "windows": ["7d"],
                                       "prefix": "units_"})
    assert "features.label.max_delay: windows over the label's columns take label.known_at" in _err(raw)
    raw["features"]["label"]["max_delay"] = "2d"
    assert parse_spec(raw, try_model=False).features.windows[1].max_delay == "2d"


@pytest.mark.parametrize("known_at", ["day", "event_time - hours(1)", "hours(20) + day", "event_time + seconds(0)",
                                      "(day + hours(20))"])
def test_known_at_not_after_the_event_is_refused_however_spelled(known_at: str) -> None:
    """A known_at that reads only what the event time reads is compared with it on made-up rows
    (the review's bypasses: exact spellings of the event time were all that was caught)."""
    raw = copy.deepcopy(SALES)
    raw["features"]["windows"].append({"by": ["store"], "value": "units", "aggs": ["mean"], "windows": ["7d"],
                                       "known_at": known_at, "prefix": "units_"})
    assert "features.windows[1].known_at: the window aggregates label column(s) ['units'] and takes a row as " \
           "known at or before its own event" in _err(raw)


@pytest.mark.parametrize("known_at", ["day + hours(0)", "day + seconds(0)", "day - days(1)", "day + hours(20)"])
def test_self_asof_known_by_its_own_event_is_refused(known_at: str) -> None:
    raw = copy.deepcopy(SALES)
    raw["features"]["asof"] = [{"source": "sales", "time": "day", "by": ["store"], "tolerance": "2d",
                                "known_at": known_at, "max_delay": "2d", "columns": {"prev_units": "units"}}]
    assert "features.asof[0].known_at: joins label column(s) ['units'] known by the row's own event" in _err(raw)


def test_self_asof_needs_known_at_whatever_the_label() -> None:
    """The rule holds when the label reads only keys or event-time columns too (the early return
    for a label without inputs skipped it)."""
    raw = copy.deepcopy(SALES)
    raw["features"]["label"] = {"name": "y", "expr": "dayofweek(day) == 0"}
    raw["features"]["asof"] = [{"source": "sales", "time": "day", "by": ["store"], "columns": {"p": "promo"}}]
    assert "features.asof[0].known_at: an as-of join of the base source 'sales' onto itself needs known_at" \
        in _err(raw)


def test_label_known_before_the_event_and_windows_earlier_than_the_label_are_refused() -> None:
    raw = copy.deepcopy(SALES)
    raw["features"]["label"]["known_at"] = "day"  # midnight, before the 20:00 event
    assert "features.label.known_at: 'day' is before the event" in _err(raw)
    raw["features"]["label"]["known_at"] = "30d"
    raw["features"]["windows"].append({"by": ["store"], "value": "units", "aggs": ["mean"], "windows": ["60d"],
                                       "known_at": "event_time + hours(1)", "max_delay": "1h", "prefix": "units_"})
    assert "features.windows[1].known_at: 'event_time + hours(1)' is earlier than features.label.known_at" \
        in _err(raw)


def test_a_calendar_change_rebuilds_no_features() -> None:
    """Which days run is not what a row's features are: a holiday added keeps the feature version
    (and changes the spec hash: with count_days: expected it shapes training)."""
    plain = parse_spec(SALES, try_model=False)
    raw = copy.deepcopy(SALES)
    raw["sources"]["sales"]["calendar"] = {"days": "weekdays", "holidays": ["2024-12-25"]}
    holiday = parse_spec(raw, try_model=False)
    assert holiday.feature_version() == plain.feature_version()
    assert holiday.spec_hash() != plain.spec_hash()
