"""Spec expressions are evaluated vectorised on Arrow, and nothing but the whitelist runs."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest

from daybreak.spec import evaluate, names_in
from daybreak.spec._expr import check_expression


@pytest.fixture
def t() -> pa.Table:
    ts = pa.array([datetime(2013, 1, 1, 10, tzinfo=UTC), datetime(2013, 1, 2, 3, tzinfo=UTC)],
                  pa.timestamp("us", tz="UTC"))
    return pa.table({"ts": ts, "minute": [15, 59], "delay": pa.array([20.0, None]), "x": [1, 4]})


def test_arithmetic_comparison_and_nulls(t: pa.Table) -> None:
    assert evaluate("delay > 15", t).to_pylist() == [True, None]
    assert evaluate("coalesce(delay, 0) * 2", t).to_pylist() == [40.0, 0.0]
    assert evaluate("x / 2", t).to_pylist() == [0.5, 2.0]
    assert evaluate("clip(x, 2, 3)", t).to_pylist() == [2, 3]
    assert evaluate("x > 1 and x < 5", t).to_pylist() == [False, True]
    assert evaluate("1 < x < 3", t).to_pylist() == [False, False]
    assert evaluate("3", t).to_pylist() == [3, 3]


def test_time_functions(t: pa.Table) -> None:
    out = evaluate("ts + minutes(minute)", t).to_pylist()
    assert out[0] == datetime(2013, 1, 1, 10, 15, tzinfo=UTC)
    # 03:00 UTC on Jan 2 is 22:00 on Tuesday Jan 1 in New York
    assert evaluate("hour(local(ts, 'America/New_York'))", t).to_pylist() == [5, 22]
    assert evaluate("dayofweek(local(ts, 'America/New_York'))", t).to_pylist() == [1, 1]


@pytest.mark.parametrize("expr, msg", [
    ("open('x')", "unknown function 'open'"),
    ("ts.year", "Attribute is not allowed"),
    ("x[0]", "Subscript is not allowed"),
    ("(lambda: 1)()", "unknown function"),
    ("nope + 1", "unknown column(s) ['nope']"),
    ("x +", "cannot parse"),
])
def test_rejected_expressions_name_the_place(expr: str, msg: str) -> None:
    with pytest.raises(ValueError) as e:
        check_expression(expr, {"ts", "x"}, where="features.columns[0].expr")
    assert "features.columns[0].expr" in str(e.value) and msg in str(e.value)


def test_names_in() -> None:
    assert names_in("coalesce(a, b) + minutes(c)") == {"a", "b", "c"}


def test_bucketing_quantising_ratios_and_crosses() -> None:
    t = pa.table({"x": [-1.0, 0.0, 4.99, 5.0, 12.0, None, float("nan")],
                  "b": [1, 0, 2, None, 4, 1, 1],
                  "s": ["a", "b", None, "c", "d", "e", "f"]})
    assert evaluate("bucket(x, 0, 5, 10)", t).to_pylist() == [0, 1, 1, 2, 3, None, None]
    assert evaluate("quantize(x, 5)", t).to_pylist()[:6] == [-5.0, 0.0, 0.0, 5.0, 10.0, None]
    assert evaluate("ratio(x, b)", t).to_pylist()[:6] == [-1.0, None, 2.495, None, 3.0, None]
    assert evaluate("cross(s, b)", t).to_pylist() == ["a|1", "b|0", None, None, "d|4", "e|1", "f|1"]
    assert evaluate("round(clip(x, 0, 10) / 3)", t).to_pylist()[:5] == [0.0, 0.0, 2.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="increase strictly"):
        evaluate("bucket(x, 5, 1)", t)
    with pytest.raises(ValueError, match="numeric edges"):
        evaluate("bucket(x)", t)


def test_a_column_may_share_a_functions_name() -> None:
    assert names_in("hour + hour(ts)") == {"hour", "ts"}
    check_expression("hour * 2", {"hour"}, where="x")
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['hour'\]"):
        check_expression("hour * 2", {"ts"}, where="x")
