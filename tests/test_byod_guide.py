"""The "bring your own data" guide (docs/bring-your-own-data.md), followed as a user would: its
code blocks are read from the page, the data scripts run, the specs are written, and its
commands run with the real `daybreak` command line. The page cannot drift from what runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import BIN, ROOT

GUIDE = ROOT / "docs" / "bring-your-own-data.md"
BLOCK = re.compile(r"```(\w+)(?: title=\"([^\"]+)\")?\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str | None, str]]:
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(GUIDE.read_text())]


def _section(title: str) -> list[tuple[str, str | None, str]]:
    """The code blocks of one example: from its data script to its commands."""
    text = GUIDE.read_text()
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return [(m.group(1), m.group(2), m.group(3)) for m in BLOCK.finditer(text[start:end if end > 0 else None])]


def _follow(title: str, workdir: Path) -> list[dict]:
    """Run an example's blocks in `workdir`: python scripts, YAML files, then each daybreak
    command (with --json where it takes one). Returns the JSON outputs of backfill."""
    env = {**os.environ, "DAYBREAK_HOME": str(workdir)}
    outputs: list[dict] = []
    for lang, name, body in _section(title):
        if lang == "python":
            subprocess.run([sys.executable, "-c", body], cwd=workdir, check=True, timeout=120)
        elif lang == "yaml" and name:
            (workdir / name).write_text(body)
        elif lang == "bash":
            for line in body.splitlines():
                if not line.startswith("daybreak "):
                    continue
                args = shlex.split(line)[1:]
                if args[0] in ("backfill", "versions", "validate"):
                    args.append("--json")
                proc = subprocess.run([str(BIN / "daybreak"), *args], cwd=workdir, env=env, capture_output=True,
                                      text=True, timeout=900)
                assert proc.returncode == 0, f"{line}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                outputs.append({"command": args[0], "out": json.loads(proc.stdout)})
    return outputs


def _out(outputs: list[dict], command: str) -> object:
    return next(o["out"] for o in outputs if o["command"] == command)


def _features(workdir: Path, name: str, day: str) -> pd.DataFrame:
    parts = sorted((workdir / "store" / "features" / name).glob(f"v=*/date={day}"))
    assert parts, f"no feature partition for {day}"
    return pq.read_table(parts[-1]).to_pandas()


def test_the_guide_has_both_examples() -> None:
    names = [n for _, n, _ in _blocks() if n]
    assert names == ["make_load.py", "load.yaml", "make_sales.py", "sales.yaml"]


def test_single_series_example(tmp_path: Path) -> None:
    out = _follow("## 3. Example", tmp_path)
    days = _out(out, "backfill")
    assert [d["date"] for d in days] == [f"2024-03-{d}" for d in range(12, 17)]
    assert not any(d.get("decision") == "BLOCKED_BY_DATA" for d in days), days
    versions = _out(out, "versions")
    assert versions, "the backfill registered no version"

    # the features say what the guide says: at 10:00 the last known reading is 08:00's
    rows = _features(tmp_path, "load", "2024-03-12").set_index("event_time")
    raw = pd.concat(pd.read_csv(tmp_path / "store" / "landing" / "load" / f"2024-03-{d}.csv",
                                parse_dates=["hour"]) for d in (10, 11, 12)).set_index("hour")["load_kw"]
    ten = pd.Timestamp("2024-03-12T10:00", tz="UTC")
    assert rows.loc[ten, "load_lag_1"] == pytest.approx(raw[pd.Timestamp("2024-03-12T08:00", tz="UTC")])
    assert rows.loc[ten, "load_lag_24"] == pytest.approx(raw[pd.Timestamp("2024-03-11T09:00", tz="UTC")])
    want = raw[(raw.index <= pd.Timestamp("2024-03-12T08:00", tz="UTC"))].tail(24).mean()
    assert rows.loc[ten, "load_mean_24rows"] == pytest.approx(want)
    assert rows.loc[ten, "vs_yesterday"] == pytest.approx(rows.loc[ten, "load_lag_1"] / rows.loc[ten, "load_lag_24"])
    # the first day's windows reach before the data's first day, which calendar.start declares:
    # nothing is missing, so no day is left out of training
    manifests = list((tmp_path / "store" / "features" / "load").glob("v=*/date=2024-03-01/_manifest.json"))
    assert manifests and json.loads(manifests[0].read_text())["missing_history"] == []


def test_business_day_example(tmp_path: Path) -> None:
    out = _follow("## 4. Example", tmp_path)
    days = _out(out, "backfill")
    by_date = {d["date"]: d for d in days}
    assert len(by_date) == (date(2024, 6, 7) - date(2024, 5, 20)).days + 1
    assert not any(d.get("decision") == "BLOCKED_BY_DATA" for d in days), days
    for d, r in by_date.items():
        if date.fromisoformat(d).weekday() >= 5 or d == "2024-05-27":
            assert not r.get("candidate_version"), (d, r)  # no drop expected: nothing trained
        else:
            assert r.get("candidate_version"), (d, r)
    versions = _out(out, "versions")
    trained_on = {v.get("logical_date") or v.get("date") for v in versions}
    assert not any(date.fromisoformat(str(d)).weekday() >= 5 for d in trained_on if d), trained_on
    assert "2024-05-27" not in trained_on

    # the previous business day across a weekend and a holiday
    tue = _features(tmp_path, "sales", "2024-05-28").set_index("store")
    fri = pd.read_csv(tmp_path / "store" / "landing" / "sales" / "2024-05-24.csv").set_index("store")["units"]
    assert (tue["units_lag_1"] - fri.reindex(tue.index)).abs().max() < 1e-9
