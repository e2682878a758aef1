"""Spec expressions are evaluated vectorised on Arrow, and nothing but the whitelist runs."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pytest

from daybreak.expr import check_expression, evaluate, names_in


@pytest.fixture
def t() -> pa.Table:
    ts = pa.array([datetime(2013, 1, 1, 10, tzinfo=timezone.utc), datetime(2013, 1, 2, 3, tzinfo=timezone.utc)],
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
    assert out[0] == datetime(2013, 1, 1, 10, 15, tzinfo=timezone.utc)
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
