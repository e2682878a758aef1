"""Label maturity on a delayed-label dataset (issue 23 item 5): support tickets whose label
(escalated) is known only when the ticket is resolved, up to five days after it was opened, or
not yet. Training, the gate's holdout and the monitor use only labels known by the end of their
date, and the windows over the label's column take the label's known-at time."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daybreak.features import build_features
from daybreak.gate import holdout
from daybreak.infra.context import RunContext
from daybreak.spec import LABEL_KNOWN_AT, parse_spec
from daybreak.stage import stage
from daybreak.train import train_model

DAYS = [date(2024, 6, 1) + timedelta(days=k) for k in range(14)]

SPEC = {
    "name": "tickets",
    "sources": {"tickets": {
        "path": "landing/tickets/{date}.parquet", "format": "parquet",
        "calendar": {"start": "2024-06-01"},
        "columns": {"ticket_id": "int64", "queue": "string", "opened_at": "timestamp[us, UTC]",
                    "resolved_at": "timestamp[us, UTC]", "escalated": "bool", "words": "int64"}}},
    "features": {
        "name": "tickets", "base": "tickets", "event_time": "opened_at", "keys": ["ticket_id"],
        # known when the ticket is resolved; unresolved tickets have no label yet
        "label": {"name": "escalated", "expr": "where(escalated, 1, 0)", "known_at": "resolved_at",
                  "max_delay": "5d"},
        "columns": [{"name": "queue", "expr": "queue", "categorical": True},
                    {"name": "words", "expr": "words"}],
        "windows": [{"by": ["queue"], "value": "where(escalated, 1.0, 0.0)", "aggs": ["count", "mean"],
                     "windows": ["7d"], "prefix": "queue_escalated_"}],
    },
    "model": {"name": "tickets", "task": "classification", "params": {"max_depth": 2}},
    "training": {"window_days": 5, "holdout_days": 2, "min_rows": 50},
    "gate": {"min_rows": 20, "min_class_rows": 5},
}


def _generate(landing: Path, rng: np.random.Generator) -> pd.DataFrame:
    (landing / "tickets").mkdir(parents=True)
    frames = []
    for k, d in enumerate(DAYS):
        n = 80
        start = datetime(d.year, d.month, d.day, tzinfo=UTC)
        opened = [start + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 86400, n))]
        words = rng.integers(5, 400, n)
        escalated = rng.random(n) < np.clip(words / 500, 0.05, 0.9)
        delay_h = rng.uniform(0, 120, n)  # resolved within five days ...
        unresolved = rng.random(n) < 0.1  # ... or not yet
        resolved = [None if u else o + timedelta(hours=float(h)) for o, h, u in zip(opened, delay_h, unresolved,
                                                                                   strict=True)]
        t = pa.table({"ticket_id": pa.array(np.arange(k * n, (k + 1) * n), pa.int64()),
                      "queue": rng.choice(["billing", "tech", "sales"], n).tolist(),
                      "opened_at": pa.array(opened, pa.timestamp("us", tz="UTC")),
                      "resolved_at": pa.array(resolved, pa.timestamp("us", tz="UTC")),
                      "escalated": escalated.tolist(), "words": pa.array(words, pa.int64())})
        pq.write_table(t, landing / "tickets" / f"{d}.parquet")
        frames.append(t.to_pandas())
    return pd.concat(frames, ignore_index=True)


def _immature(truth: pd.DataFrame, days: list[date], cut: datetime) -> int:
    on = truth["opened_at"].dt.date.isin(days)
    return int((on & (truth["resolved_at"].isna() | (truth["resolved_at"] > pd.Timestamp(cut)))).sum())


def _tickets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> tuple[pd.DataFrame, Any]:
    """The generated tickets (the truth) under a fresh DAYBREAK_HOME, and the parsed spec."""
    home = tmp_path / "home"
    truth = _generate(home / "store" / "landing", np.random.default_rng(seed))
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    return truth, parse_spec(SPEC)


def test_immature_labels_are_left_out_of_training_and_holdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              ray_local) -> None:
    truth, spec = _tickets(tmp_path, monkeypatch, 3)
    w = spec.features.windows[0]
    assert (w.known_at, w.max_delay) == ("resolved_at", "5d")  # the label's, taken by the window
    for d in DAYS:
        assert stage(spec, RunContext.create(d))["rows"] == 80
        build_features(spec, RunContext.create(d))

    day = DAYS[-1]
    ctx = RunContext.create(day)
    cut = datetime(2024, 6, 15, tzinfo=UTC)  # the end of the logical date
    assert spec.label_cut(day) == cut
    part = pq.read_table(ctx.store.partition(f"features/tickets/v={spec.feature_version()}", day).files[0])
    assert LABEL_KNOWN_AT in part.column_names and LABEL_KNOWN_AT not in spec.features.feature_names()

    # labels take up to 5 days: the holdout ends on the newest day whose labels are in by then
    assert spec.holdout_days(day) == [date(2024, 6, 8), date(2024, 6, 9)]
    assert spec.train_days(day) == [date(2024, 6, k) for k in range(3, 8)]
    res = train_model(spec, ctx)
    window = spec.train_days(day)
    expect_out = _immature(truth, window, cut)
    assert 0 < expect_out < 5 * 80
    assert res["status"] == "trained" and res["immature_rows"] == expect_out, res
    assert res["rows"] == 5 * 80 - expect_out

    rows = holdout(spec, ctx)
    held = spec.holdout_days(day)
    assert rows.attrs["immature_rows"] == _immature(truth, held, cut) > 0
    assert len(rows) == 2 * 80 - rows.attrs["immature_rows"]
    assert (pd.to_datetime(rows[LABEL_KNOWN_AT], utc=True) <= pd.Timestamp(cut)).all()


def test_windows_count_a_label_only_once_it_is_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     ray_local) -> None:
    """The queue's escalation rate at a ticket's opening counts only tickets resolved before it."""
    truth, spec = _tickets(tmp_path, monkeypatch, 5)
    for d in DAYS[:4]:
        stage(spec, RunContext.create(d))
    built = build_features(spec, RunContext.create(DAYS[3]))
    got = pq.read_table(built["uri"]).to_pandas()
    for _, row in got.sample(20, random_state=0).iterrows():
        t = row["event_time"]
        known = truth[(truth["queue"] == row["queue"]) & truth["resolved_at"].notna()
                      & (truth["resolved_at"] < t) & (truth["resolved_at"] > t - pd.Timedelta(days=7))
                      & (truth["resolved_at"] - truth["opened_at"] <= pd.Timedelta(days=5))]
        assert row["queue_escalated_count_7d"] == len(known)


def test_a_long_label_delay_moves_the_holdout_back_and_the_cut_follows_the_date_zone() -> None:
    """A label known 30 days later: at the end of D nothing of the last 30 days is labelled, so the
    holdout and the training window end 30 days back; the cut is midnight in the source's date zone."""
    raw = {**SPEC, "features": {**SPEC["features"], "label": {"name": "escalated", "expr": "where(escalated, 1, 0)",
                                                               "known_at": "30d"}}}
    raw["sources"] = {"tickets": {**SPEC["sources"]["tickets"],
                                  "event_time": {"column": "opened_at", "date_timezone": "America/New_York"}}}
    spec = parse_spec(raw, try_model=False)
    day = date(2024, 7, 31)
    assert spec.label_lag_days() == 30 and spec.labelled_day(day) == date(2024, 7, 1)
    assert spec.holdout_days(day) == [date(2024, 6, 30), date(2024, 7, 1)]
    assert spec.train_days(day)[-1] == date(2024, 6, 29)
    assert spec.label_cut(day) == datetime(2024, 8, 1, 4, tzinfo=UTC)  # midnight in New York (EDT)
