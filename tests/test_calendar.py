"""Calendars (issue 23, item 6) and history-aware backfill (item 7): a day with no expected drop
runs nothing and registers nothing, a missing expected drop is still an error, and a backfill from
a cold store stages the look-back its first date reads (or refuses naming the days).

The feed is synthetic, not flights: ten stores' hourly unit sales, dropped on business days only
(no files on Saturdays, Sundays and Good Friday 2024-03-29). The CLI runs as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BIN

from daybreak.infra.errors import SpecError
from daybreak.spec import parse_spec
from daybreak.spec._calendar import CalendarSpec

HOLIDAY = date(2024, 3, 29)  # Good Friday: no drop although a weekday


def _feed_spec(calendar: object = None) -> dict:
    """A small per-store daily feed; `calendar` as the sales source declares it (None: none)."""
    sales = {
        "path": "landing/sales/{date}.csv", "format": "csv", "kind": "events",
        "columns": {"store": {"type": "string", "nullable": False}, "ts": {"type": "timestamp[us, UTC]",
                                                                            "nullable": False},
                    "units": "float64"},
        "unique": ["store", "ts"],
        "event_time": {"column": "ts"},
    }
    if calendar is not None:
        sales["calendar"] = calendar
    return {
        "name": "store_sales",
        "sources": {"sales": sales},
        "features": {
            "name": "store_sales", "base": "sales", "event_time": "ts", "keys": ["store"],
            "label": {"name": "y", "expr": "units", "known_at": "1h"},  # an hour's sales, known when it ends
            "columns": [{"name": "hour", "expr": "hour(event_time)"}],
            "windows": [{"by": ["store"], "value": "units", "aggs": ["count", "mean"], "windows": ["3d"],
                         "prefix": "units_"}],
        },
        "model": {"name": "store_sales", "task": "regression", "params": {"max_depth": 3, "eta": 0.3,
                                                                          "num_boost_round": 20}},
        "training": {"window_days": 8, "min_rows": 50},
        "gate": {"metric": "rmse", "min_rows": 20, "bootstrap": None, "slices": {"columns": []}},
    }


def _write_feed(landing: Path, first: date, last: date, skip: set[date] = frozenset()) -> list[date]:
    """One CSV per business day from `first` to `last` (none on weekends, HOLIDAY or `skip`)."""
    rng = np.random.default_rng(7)
    out = landing / "sales"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    d = first
    while d <= last:
        if d.weekday() < 5 and d != HOLIDAY and d not in skip:
            lines = ["store,ts,units"]
            for s in range(10):
                for h in range(24):
                    units = 20 + 3 * s + 5 * np.sin(h / 24 * 2 * np.pi) + rng.normal(0, 1)
                    lines.append(f"s{s},{d.isoformat()}T{h:02d}:30:00Z,{units:.3f}")
            (out / f"{d.isoformat()}.csv").write_text("\n".join(lines) + "\n")
            written.append(d)
        d += timedelta(days=1)
    return written


def _home(tmp_path: Path, calendar: object, first: date, last: date,
          skip: set[date] = frozenset()) -> tuple[Path, Path]:
    home = tmp_path / "home"
    _write_feed(home / "store" / "landing", first, last, skip)
    spec = tmp_path / "sales.yaml"
    spec.write_text(yaml.safe_dump(_feed_spec(calendar), sort_keys=False))
    return home, spec


def daybreak(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "daybreak"), *args], env={**os.environ, "DAYBREAK_HOME": str(home)},
                          capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _versions(home: Path, spec: Path) -> list[dict]:
    return json.loads(daybreak("versions", "--spec", str(spec), "--json", home=home).stdout)


# --- the calendar itself ---------------------------------------------------------------------------

def test_short_forms_parse() -> None:
    assert CalendarSpec.model_validate("daily") == CalendarSpec()
    assert CalendarSpec.model_validate("weekdays").days == "weekdays"
    assert CalendarSpec.model_validate("exchange:XNYS").exchange == "XNYS" if _has_xcals() else True
    with pytest.raises(ValueError, match="not a calendar"):
        CalendarSpec.model_validate("fortnightly")


def test_weekdays_holidays_and_start() -> None:
    cal = CalendarSpec(days="weekdays", holidays=[HOLIDAY], start=date(2024, 3, 4))
    assert cal.expects(date(2024, 3, 28)) and not cal.expects(HOLIDAY)
    assert not cal.expects(date(2024, 3, 30)) and not cal.expects(date(2024, 3, 3))  # Saturday; before start
    assert cal.reason(date(2024, 3, 9)) == "no drop expected on 2024-03-09 (Saturday; calendar: weekdays)"
    assert "holiday" in cal.reason(HOLIDAY)
    assert cal.expected_days(date(2024, 3, 25), date(2024, 4, 2)) == [
        date(2024, 3, d) for d in (25, 26, 27, 28)] + [date(2024, 4, 1), date(2024, 4, 2)]
    assert cal.expected_before(date(2024, 4, 1), 2) == [date(2024, 3, 27), date(2024, 3, 28)]
    # stops at the data's first day (fewer than asked), and the search is bounded
    assert cal.expected_before(date(2024, 3, 6), 10) == [date(2024, 3, 4), date(2024, 3, 5)]
    assert len(CalendarSpec().expected_before(date(2025, 2, 1), 100_000)) == 3660  # MAX_DAYS back at most


def _has_xcals() -> bool:
    try:
        import exchange_calendars  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_xcals(), reason="exchange_calendars is not installed (pip install 'daybreak[calendars]')")
def test_exchange_sessions() -> None:
    nyse = CalendarSpec.model_validate("exchange:XNYS")
    assert nyse.expects(date(2024, 7, 5)) and nyse.expects(date(2024, 7, 3))  # sessions
    assert not nyse.expects(date(2024, 7, 4))  # Independence Day
    assert not nyse.expects(date(2024, 7, 6))  # a Saturday
    assert "not a XNYS session" in nyse.reason(date(2024, 7, 4))
    assert nyse.expected_before(date(2024, 7, 8), 3) == [date(2024, 7, 2), date(2024, 7, 3), date(2024, 7, 5)]


def test_bad_calendars_name_the_field() -> None:
    raw = _feed_spec({"exchange": "XXXX"})
    with pytest.raises(SpecError) as e:
        parse_spec(raw, try_model=False)
    if _has_xcals():
        assert "sources.sales.calendar.exchange: unknown exchange 'XXXX'" in str(e.value)
    else:
        assert "sources.sales.calendar.exchange" in str(e.value) and "daybreak[calendars]" in str(e.value)
    for bad, field in (({"days": "fortnightly"}, "sources.sales.calendar.days"),
                       ({"holidays": ["2024-02-30"]}, "sources.sales.calendar.holidays[0]"),
                       ({"every": "day"}, "sources.sales.calendar.every"),
                       ("monthly", "sources.sales.calendar")):
        with pytest.raises(SpecError) as e:
            parse_spec(_feed_spec(bad), try_model=False)
        assert field in str(e.value), (bad, str(e.value))
    for ok in ("weekdays", "daily", {"days": "weekdays", "holidays": ["2024-03-29"], "start": "2024-03-04"}):
        assert parse_spec(_feed_spec(ok), try_model=False).expects(date(2024, 3, 28))


# --- the pipeline on a weekday feed ------------------------------------------------------------------

OFF = {"2024-03-29", "2024-03-30", "2024-03-31"}  # Good Friday and a weekend: no drop expected


@pytest.fixture(scope="module")
def weekday(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The weekday feed backfilled over 2024-03-25 .. 2024-04-02 (Good Friday and a weekend in
    it) from a cold store, by the CLI. 2024-04-03 is a weekday whose file never came."""
    calendar = {"days": "weekdays", "holidays": [HOLIDAY.isoformat()]}
    home, spec = _home(tmp_path_factory.mktemp("weekday"), calendar, date(2024, 3, 11), date(2024, 4, 3),
                       skip={date(2024, 4, 3)})
    out = daybreak("backfill", "--spec", str(spec), "--start", "2024-03-25", "--end", "2024-04-02", "--json",
                   home=home)
    return {"home": home, "spec": spec, "out": out, "days": {d["date"]: d for d in json.loads(out.stdout)}}


def test_weekday_feed_backfills_across_weekends_and_a_holiday(weekday: dict) -> None:
    """No error, no blocked day and no model version on the days with no expected drop; a missing
    *expected* drop still fails, naming the day."""
    home, spec, out, days = weekday["home"], weekday["spec"], weekday["out"], weekday["days"]
    assert len(days) == 9
    for d, s in days.items():
        assert s["decision"] != "BLOCKED_BY_DATA", s
        assert s["expected"] is (d not in OFF), s
        if d in OFF:
            assert s["candidate_version"] is None and s["rows_staged"] is None and "no drop expected" in s["note"]
            assert s["decision"] is None
        else:
            assert s["rows_staged"] == 240 and s["note"] is None
    assert days["2024-03-25"]["candidate_version"] is not None
    assert days["2024-03-30"]["note"] == "no drop expected on 2024-03-30 (Saturday; calendar: weekdays)"
    assert "holiday" in days["2024-03-29"]["note"]
    # the history the first date reads was staged first (not part of the JSON: one entry per date)
    assert "[history] 2024-03-15" in out.stderr and "[history] 2024-03-22" in out.stderr
    assert "[history] 2024-03-16" not in out.stderr  # a Saturday: no drop to stage
    # no version, no staged partition for a day without a drop
    logical = {v["logical_date"] for v in _versions(home, spec)}
    assert logical and not logical & OFF
    assert not any((home / "store" / "staged" / "sales" / f"date={d}").exists() for d in OFF)

    # each step by itself on a weekend day: nothing runs, and it says why
    for step in ("stage", "features", "monitor", "train", "gate", "promote", "deploy", "score"):
        res = json.loads(daybreak(step, "--spec", str(spec), "--date", "2024-03-30", "--json", home=home).stdout)
        assert res["expected"] is False and res["skipped"] is True and "Saturday" in res["reason"], (step, res)
    human = daybreak("run", "--spec", str(spec), "--date", "2024-03-31", home=home).stdout
    assert "no drop expected on 2024-03-31 (Sunday; calendar: weekdays)" in human
    assert not {v["logical_date"] for v in _versions(home, spec)} & OFF

    # a weekday whose file is missing is still an error, naming the day
    proc = daybreak("run", "--spec", str(spec), "--date", "2024-04-03", home=home, check=False)
    assert proc.returncode == 3 and "no landing file for 2024-04-03" in proc.stderr, proc.stderr[-2000:]


def test_row_count_compares_expected_days(weekday: dict) -> None:
    """The row-count check of Monday's candidate (window ending on Sunday) compares Thursday, the
    newest day a drop was due, with the window's other expected days: the weekend and Good Friday
    are not zero-row days."""
    from daybreak.gate._datachecks import run_data_checks
    from daybreak.infra.context import RunContext
    from daybreak.infra.records import Tag
    from daybreak.spec import load_spec

    spec = load_spec(weekday["spec"], try_model=False)
    ctx = RunContext.create("2024-04-01", store=str(weekday["home"] / "store"))
    tags = {Tag.WINDOW_START: "2024-03-24", Tag.WINDOW_END: "2024-03-31"}
    rules, _ = run_data_checks(spec, ctx, tags, None)
    rc = next(r for r in rules if r["rule"] == "row_count")
    assert rc["verdict"] == "pass" and rc["value"] == 1.0, rc
    assert rc["detail"] == "2024-03-28: 240 rows vs median 240 of 3 earlier expected days", rc


def test_weekday_feed_trains_every_expected_day(weekday: dict) -> None:
    """Every expected day trains a candidate: a look-back over a weekend or a holiday is no gap in
    the history (no missing_history), so no day is left out of training."""
    days = weekday["days"]
    assert all(s["candidate_version"] is not None for d, s in days.items() if d not in OFF), days
    assert all(_manifest(weekday["home"], d)["missing_history"] == [] for d in days if d not in OFF)


def test_cold_store_backfill_stages_the_lookback_first(tmp_path: Path) -> None:
    """From a cold store the look-back days are staged and featurised before the first date, so its
    features have no missing history; without their landing files the backfill refuses, naming them."""
    from daybreak.cycle import lookback_days

    home, spec = _home(tmp_path, "daily", date(2024, 3, 1), date(2024, 3, 31))
    # a daily feed here (the flights way): every day has a drop
    for d in range(1, 32):
        day = date(2024, 3, d)
        if day.weekday() >= 5 or day == HOLIDAY:
            src = home / "store" / "landing" / "sales" / "2024-03-04.csv"
            text = src.read_text().replace("2024-03-04", day.isoformat())
            (home / "store" / "landing" / "sales" / f"{day.isoformat()}.csv").write_text(text)
    lookback = lookback_days(parse_spec(_feed_spec("daily"), try_model=False))  # the 3d window (+ its delay)
    assert 3 <= lookback < 6
    staged = home / "store" / "staged" / "sales"

    def is_staged(d: date) -> bool:
        return (staged / f"date={d.isoformat()}").exists()

    # features only: the windows' look-back before the first date
    first = date(2024, 3, 10)
    out = daybreak("backfill", "--spec", str(spec), "--start", "2024-03-10", "--end", "2024-03-10",
                   "--steps", "stage,features", "--json", home=home)
    assert all(is_staged(first - timedelta(days=k)) for k in range(1, lookback + 1)), sorted(os.listdir(staged))
    assert not is_staged(first - timedelta(days=lookback + 1))  # not needed
    res = json.loads(out.stdout)[0]
    assert res["features"]["missing_history"] == [], res["features"]
    assert _manifest(home, "2024-03-10")["missing_history"] == []

    # the full cycle from a later date: its training window (8 days before the holdout) featurised
    # too, each day with its own look-back staged
    out = daybreak("backfill", "--spec", str(spec), "--start", "2024-03-25", "--end", "2024-03-25", "--json",
                   home=home)
    oldest = date(2024, 3, 17) - timedelta(days=lookback)
    assert all(is_staged(oldest + timedelta(days=k)) for k in range((date(2024, 3, 25) - oldest).days))
    assert not is_staged(oldest - timedelta(days=1))
    assert _manifest(home, "2024-03-25")["missing_history"] == []
    assert all(_manifest(home, f"2024-03-{d}")["missing_history"] == [] for d in range(17, 25))
    assert json.loads(out.stdout)[0]["candidate_version"] is not None

    # two look-back days have no landing files: refused up front, naming them; nothing runs
    first = date(2024, 3, 5)
    gone = [first - timedelta(days=lookback - k) for k in (1, 2)]
    for d in gone:
        (home / "store" / "landing" / "sales" / f"{d.isoformat()}.csv").unlink()
    before = sorted(os.listdir(staged))
    proc = daybreak("backfill", "--spec", str(spec), "--start", "2024-03-05", "--end", "2024-03-06",
                    "--steps", "stage,features", home=home, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    # (with the look-back's day of margin the days before the feed's first, 2024-03-01, are named too)
    needed = [first - timedelta(days=k) for k in range(lookback, 0, -1)]
    absent = [d.isoformat() for d in needed if d < date(2024, 3, 1) or d in gone]
    assert (f"backfill 2024-03-05: the look-back needs {', '.join(absent)} staged but they have no landing file"
            in proc.stderr), proc.stderr[-2000:]
    assert "sources.sales.calendar.start" in proc.stderr
    assert sorted(os.listdir(staged)) == before  # nothing was staged
    # ... unless the user says so
    daybreak("backfill", "--spec", str(spec), "--start", "2024-03-05", "--end", "2024-03-05", "--steps", "stage",
             "--no-history", home=home)
    assert is_staged(first) and not is_staged(first - timedelta(days=1))
    # ... or declares that the data begins after those days: the look-back then starts there
    spec.write_text(yaml.safe_dump(_feed_spec({"start": (gone[1] + timedelta(days=1)).isoformat()})))
    daybreak("backfill", "--spec", str(spec), "--start", "2024-03-05", "--end", "2024-03-05", "--steps",
             "stage,features", home=home)
    assert is_staged(first - timedelta(days=1)) and not is_staged(gone[1])


def _manifest(home: Path, day: str) -> dict:
    """The published feature partition's manifest (locally ``date=D`` links to the run's folder)."""
    [folder] = (home / "store" / "features" / "store_sales").glob(f"v=*/date={day}")
    return json.loads((folder / "_manifest.json").read_text())


PREFECT_SCRIPT = """
import json, sys
sys.path.insert(0, {flows!r})
from backfill import backfill
from daily_retrain import daily_retrain
out = {{"day": daily_retrain(date="2024-03-30", spec={spec!r}),
       "lines": backfill("2024-03-29", "2024-03-31", spec={spec!r}, history=False)}}
print("RESULT " + json.dumps(out, default=str))
"""


def test_prefect_flows_run_nothing_on_days_without_a_drop(tmp_path: Path) -> None:
    """The Prefect daily_retrain flow on a Saturday of a weekday feed, and a backfill over Good
    Friday and the weekend: every step says 'no drop expected', nothing fails, nothing is staged."""
    from conftest import ROOT
    from test_prefect import QUIET_PREFECT

    home, spec = _home(tmp_path, {"days": "weekdays", "holidays": [HOLIDAY.isoformat()]}, date(2024, 3, 25),
                       date(2024, 3, 28))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(DAYBREAK_HOME=str(home), PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "results"), PREFECT_LOGGING_LEVEL="WARNING", **QUIET_PREFECT)
    code = PREFECT_SCRIPT.format(flows=str(ROOT / "flows"), spec=str(spec))
    proc = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    day = out["day"]
    for step in ("stage", "features", "monitor", "train", "gate", "promote", "deploy"):
        assert day[step]["expected"] is False and day[step]["skipped"] is True, (step, day[step])
    assert day["summary"]["expected"] is False and "Saturday" in day["summary"]["note"]
    assert [ln["expected"] for ln in out["lines"]] == [False, False, False], out["lines"]
    assert all(ln["decision"] is None and ln["candidate_version"] is None for ln in out["lines"])
    assert not (home / "store" / "staged").exists() or not any((home / "store" / "staged").rglob("date=*"))


AIRFLOW_SCRIPT = """
import json
from datetime import UTC, datetime
from airflow.dag_processing.dagbag import DagBag
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

dag = DagBag(dag_folder={dags!r}).get_dag("weekday_feed")
dr = dag.test(logical_date=datetime(2024, 3, 30, tzinfo=UTC))
with create_session() as session:
    rows = session.query(XComModel).filter(XComModel.dag_id == dag.dag_id, XComModel.run_id == dr.run_id,
                                           XComModel.key == "return_value").all()
    xcom = {{r.task_id: r.value for r in rows}}
print("RESULT " + json.dumps({{"state": str(dr.state), "xcom": xcom,
                               "tasks": {{ti.task_id: str(ti.state) for ti in dr.get_task_instances()}}}}, default=str))
"""


def test_airflow_skips_a_day_without_a_drop(tmp_path: Path) -> None:
    """The daily DAG on a Saturday of a weekday feed: the run succeeds, the landing sensor finds
    nothing to wait for, stage is skipped with the reason in its XCom, and the tasks after it are
    skipped by trigger rule; nothing fails."""
    home, spec = _home(tmp_path, "weekdays", date(2024, 3, 25), date(2024, 3, 28))
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"), "DAYBREAK_HOME": str(home)}
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "weekday_feed.py").write_text(
        f"from daybreak.airflow import daily_retrain_dag\ndaily_retrain_dag({str(spec)!r}, dag_id='weekday_feed')\n")
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.run([str(BIN / "python"), "-c", AIRFLOW_SCRIPT.format(dags=str(tmp_path / "dags"))], env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert out["state"] == "success", out
    # landing has nothing to wait for (no source expects a drop): it succeeds, the steps skip
    assert out["tasks"].pop("landing") == "success" and set(out["tasks"].values()) == {"skipped"}, out["tasks"]
    stage = out["xcom"]["stage"]
    stage = json.loads(stage) if isinstance(stage, str) else stage
    assert stage["expected"] is False and "Saturday" in stage["reason"], stage


def test_history_plan_says_what_each_day_needs() -> None:
    """The plan both backfills (the CLI's and the Prefect flow's) follow: stage unless staged, then
    features, oldest first; days that cannot be staged refuse the whole plan, naming them."""
    from daybreak.cycle import HistoryPlan
    from daybreak.infra.errors import MissingInputError

    spec = parse_spec(_feed_spec("daily"), try_model=False)
    days = [date(2024, 3, k) for k in (4, 5, 6)]
    plan = HistoryPlan(date(2024, 3, 7), days, missing=[], staged=[days[1]])
    assert plan.todo(spec) == [(days[0], ["stage", "features"]), (days[1], ["features"]),
                               (days[2], ["stage", "features"])]
    with pytest.raises(MissingInputError, match="the look-back needs 2024-03-04 staged but it has no landing file"):
        HistoryPlan(date(2024, 3, 7), days, missing=[days[0]]).todo(spec)
