"""Bad input: bad landing files and bad specs through `daybreak run`, as a user runs it. Each must
exit 3 (2 for a malformed argument) with an error naming the file, column or spec field, before any
work: no partition published (quarantined rows may stay, for inspection), no MLflow store, run or model version, no
Ray started.

Forty-odd cases cost forty CLI start-ups, so one driver process calls the real entry point
(``daybreak.cli.main``) once per case with its argv, each case in a home of its own, and reports
the exit code, what went to stderr, whether Ray was initialized and which child processes exist.
Two cases also run as processes of their own, side by side with the driver.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml
from conftest import BIN, SPEC
from tally import tally
from test_stage import COL, _replace_field

DAY = "2013-01-02"

# run_cli(argv): argv through daybreak's real entry point in this process -> (exit code, stdout, stderr).
RUN_CLI = r"""
def run_cli(argv):
    import contextlib, io, sys
    import daybreak.cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        sys.argv = ["daybreak", *argv]
        try:
            daybreak.cli.main(hard_exit=False)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = "raised"
    return code, out.getvalue(), err.getvalue()
"""

DRIVER = RUN_CLI + r"""
import json, os, sys
import psutil
import daybreak.cli
daybreak.cli.setup_logging()  # once, on the real stderr; each case's own stderr is captured
cases_file, results_file = sys.argv[1:3]
out = []
for case in json.load(open(cases_file)):
    os.environ["DAYBREAK_HOME"] = case["home"]
    code, _, err = run_cli(case["argv"])
    ray = sys.modules.get("ray")
    out.append({"name": case["name"], "rc": code, "stderr": err, "ray": bool(ray and ray.is_initialized()),
                "children": [p.name() for p in psutil.Process().children(recursive=True)]})
    if out[-1]["ray"]:  # a case that got that far must not spoil the next ones
        ray.shutdown()
json.dump(out, open(results_file, "w"))
"""


# --- the landing corpus (the ideas of tests/test_stage.py, through the CLI) --------------------

def _lines(landing: Path) -> list[str]:
    return (landing / "flights" / f"{DAY}.csv").read_text().splitlines(keepends=True)


def _parquet_half(landing: Path) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pacsv.read_csv(landing / "flights" / f"{DAY}.csv"), buf)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _drop(line: str, col: str) -> str:
    return ",".join(x for i, x in enumerate(line.rstrip("\n").split(",")) if i != COL[col]) + "\n"


def _column(lines: list[str], col: str, value: str) -> bytes:
    return "".join(lines[:1] + [_replace_field(ln, COL[col], value) for ln in lines[1:]]).encode()


# name -> (files under the case's landing {relative path: bytes}, spec changes for flights, what stderr must say)
LANDING: dict[str, tuple[Callable[[list[str], Path], dict[str, bytes]], dict[str, Any], list[str]]] = {
    "empty file": (lambda ln, lp: {"flights/D.csv": b""}, {}, ["2013-01-02.csv: empty file"]),
    "header only": (lambda ln, lp: {"flights/D.csv": ln[0].encode()}, {}, ["row_count: 0 rows < rows.min 1"]),
    "missing column": (lambda ln, lp: {"flights/D.csv": "".join(_drop(x, "arr_delay") for x in ln).encode()}, {},
                       ["missing column(s) required by the contract: ['arr_delay']"]),
    "extra column, blocked": (lambda ln, lp: {"flights/D.csv": "".join(
        x.rstrip("\n") + (",wifi\n" if i == 0 else ",yes\n") for i, x in enumerate(ln)).encode()},
        {"extra_columns": "block"}, ["not in the contract: ['wifi']"]),
    "wrong type in a whole column": (lambda ln, lp: {"flights/D.csv": _column(ln, "distance", "far")}, {},
                                     ["distance", "943 of 943 rows"]),
    "not utf-8": (lambda ln, lp: {"flights/D.csv": "".join([*ln[:3], _replace_field(ln[3], COL["tailnum"], "N#4"),
                                                           *ln[4:]]).encode().replace(b"N#4", b"N\xe9\xff4")}, {},
                  ["not valid utf-8 text"]),
    "all-null label": (lambda ln, lp: {"flights/D.csv": _column(ln, "arr_delay", "NA")}, {},
                       ["arr_delay is null in 100% of rows"]),
    "every row on another date": (lambda ln, lp: {"flights/D.csv": _column(ln, "time_hour", "2013-01-05T15:00:00Z")},
                                  {}, ["is not on 2013-01-02", "time_hour"]),
    "too many rows": (lambda ln, lp: {"flights/D.csv": "".join(ln).encode()}, {"rows": {"min": 1, "max": 900}},
                      ["row_count: 943 rows > rows.max 900"]),
    "truncated parquet": (lambda ln, lp: {"flights/D.parquet": _parquet_half(lp)}, {"format": "parquet"},
                          ["2013-01-02.parquet: cannot be read as parquet"]),
    "binary garbage": (lambda ln, lp: {"flights/D.csv": bytes(range(256)) * 64}, {}, ["flights", "2013-01-02.csv"]),
    "no landing file": (lambda ln, lp: {"flights/2013-01-01.csv": "".join(ln).encode()}, {},
                        ["no landing file for 2013-01-02", "flights/2013-01-02.csv"]),
    "bad weather file stops every source": (lambda ln, lp: {"flights/D.csv": "".join(ln).encode(),
                                                            "weather/D.csv": b"origin,year\nEWR,2013\n"},
                                            {}, ["weather", "missing column(s)"]),
}


# --- bad specs: a change to specs/flights.yaml and what stderr must name ------------------------

def _set(*path: Any, value: Any) -> Callable[[dict], None]:
    def f(r: dict) -> None:
        for p in path[:-1]:
            r = r[p]
        r[path[-1]] = value
    return f


def _do(fn: Callable[[dict], Any]) -> Callable[[dict], None]:
    return lambda r: (fn(r), None)[1]


SPECS: dict[str, tuple[str, Callable[[dict], None], list[str]]] = {
    # unknown column
    "feature on an unknown column": ("unknown column", _do(lambda r: r["features"]["columns"].append(
        {"name": "x", "expr": "no_such_col * 2"})), ["features.columns[6].expr", "no_such_col"]),
    "label on an unknown column": ("unknown column", _set("features", "label", "expr", value="arr_dealy > 15"),
                                   ["features.label.expr", "arr_dealy"]),
    "window by an unknown column": ("unknown column", _set("features", "windows", 0, "by", value=["airline"]),
                                    ["features.windows[0].by", "airline"]),
    "lookup by a column the events lack": ("unknown column", _set("features", "lookups", 0, "by", value=["model"]),
                                           ["features.lookups[0].by", "'model'"]),
    "unknown key": ("unknown column", _set("features", "keys", value=["carrier", "gate"]), ["features.keys", "gate"]),
    "unknown slice column": ("unknown column", _set("gate", "slices", "columns", value=["terminal"]),
                             ["gate.slices.columns[0]", "terminal"]),
    "unknown unique column": ("unknown column", _set("sources", "flights", "unique", value=["flight_id"]),
                              ["sources.flights", "unique", "flight_id"]),
    "asof from an unknown source column": ("unknown column", _set("features", "asof", 0, "columns", "wx_temp",
                                                                  value="temperature"),
                                           ["features.asof[0]", "temperature"]),
    # wrong type
    "unknown column type": ("wrong type", _set("sources", "flights", "columns", "year", value="integer"),
                            ["sources.flights.columns.year.type", "integer"]),
    "label compares text with a number": ("wrong type", _set("features", "label", "expr", value="carrier > 15"),
                                          ["features.label.expr", "string, int64"]),
    "window over a text column": ("wrong type", _set("features", "windows", 0, "value", value="tailnum"),
                                  ["features.windows[0].value", "string"]),
    "event time that is not a time": ("wrong type", _set("features", "event_time", value="dep_time"),
                                      ["features.event_time", "not a timestamp"]),
    "numeric feature from text": ("wrong type", _do(lambda r: r["features"]["columns"].append(
        {"name": "x", "expr": "dest"})), ["features.columns[6].expr", "categorical"]),
    "lookup key of another type": ("wrong type", _set("sources", "planes", "columns", "tailnum", value="int64"),
                                   ["features.lookups[0].by", "tailnum"]),
    "xgboost param of the wrong type": ("wrong type", _set("model", "params", "max_depth", value="deep"),
                                        ["model.params.max_depth", "deep"]),
    "xgboost param out of range": ("wrong type", _set("model", "params", "subsample", value=2),
                                   ["model.params.subsample"]),
    "training window as text": ("wrong type", _set("training", "window_days", value="a week"),
                                ["training.window_days"]),
    "time zone that does not exist": ("wrong type", _set("sources", "flights", "event_time", "date_timezone",
                                                         value="America/Gotham"), ["date_timezone", "America/Gotham"]),
    # impossible window
    "zero-length window": ("impossible window", _set("features", "windows", 0, "windows", value=["0d", "7d"]),
                           ["features.windows[0].windows", "'0d'"]),
    "negative window": ("impossible window", _set("features", "windows", 1, "windows", value=["-3h"]),
                        ["features.windows[1].windows", "'-3h'"]),
    "no windows": ("impossible window", _set("features", "windows", 0, "windows", value=[]),
                   ["features.windows[0].windows"]),
    "window longer than any history": ("impossible window", _set("features", "windows", 0, "windows",
                                                                 value=["100000d"]),
                                       ["features.windows[0].windows", "100000d"]),
    "window too long to compute": ("impossible window", _set("features", "windows", 0, "windows",
                                                             value=["99999999999d"]),
                                   ["features.windows[0].windows", "99999999999d"]),
    "look-back delay longer than any history": ("impossible window", _set("features", "windows", 0, "max_delay",
                                                                          value="20000d"),
                                                ["features.windows[0].max_delay", "20000d"]),
    "empty training window": ("impossible window", _set("training", "window_days", value=0),
                              ["training.window_days"]),
    "training window past the calendar": ("impossible window", _set("training", "window_days", value=10**9),
                                          ["training.window_days"]),
    "holdout past the calendar": ("impossible window", _set("training", "holdout_days", value=10**9),
                                  ["training.holdout_days"]),
    "no aggregates": ("impossible window", _set("features", "windows", 0, "aggs", value=[]),
                      ["features.windows[0].aggs"]),
    # unknown estimator
    "unknown flavor": ("unknown estimator", _set("model", "flavor", value="lightgbm"), ["model.flavor", "xgboost"]),
    "unknown sklearn estimator": ("unknown estimator", _do(lambda r: r["model"].update(
        flavor="sklearn", estimator="sklearn.ensemble.RandomJungleClassifier", params={})),
        ["model.estimator", "RandomJungleClassifier"]),
    "estimator from a missing package": ("unknown estimator", _do(lambda r: r["model"].update(
        flavor="sklearn", estimator="catboost_not_here.CatBoostClassifier", params={})),
        ["model.estimator", "catboost_not_here"]),
    "not an estimator": ("unknown estimator", _do(lambda r: r["model"].update(
        flavor="sklearn", estimator="sklearn.preprocessing.StandardScaler", params={})),
        ["model.estimator", "no fit/predict"]),
    "estimator outside the allowed modules": ("unknown estimator", _do(lambda r: r["model"].update(
        flavor="sklearn", estimator="collections.OrderedDict", params={})),
        ["model.estimator", "not in an allowed module", "DAYBREAK_ALLOWED_ESTIMATOR_MODULES"]),
    "estimator param that does not exist": ("unknown estimator", _do(lambda r: r["model"].update(
        flavor="sklearn", estimator="sklearn.ensemble.RandomForestClassifier", params={"n_estimatorz": 10})),
        ["model.params", "n_estimatorz"]),
    "estimator param of the wrong type": ("unknown estimator", _do(lambda r: r["model"].update(
        flavor="sklearn", estimator="sklearn.ensemble.RandomForestClassifier", params={"n_estimators": "ten"})),
        ["model.params.n_estimators", "ten"]),
    "unknown xgboost metric": ("unknown estimator", _set("model", "params", "eval_metric", value="accuracy"),
                               ["model.params.eval_metric", "accuracy"]),
    "unknown xgboost objective": ("unknown estimator", _set("model", "params", "objective", value="binary:magic"),
                                  ["model.params.objective", "binary:magic"]),
    "tuning range xgboost refuses": ("unknown estimator", _set("model", "tuning", value={
        "space": {"max_depth": {"low": 2, "high": 8, "integer": True}, "eta": {"low": -1, "high": 0.3}}, "trials": 2}),
        ["model.tuning.space.eta"]),
    # and the rest of what a spec can get wrong before anything runs
    "alias MLflow refuses": ("other", _set("promotion", "alias", value="v1"), ["promotion.alias", "'v1'"]),
    "one alias for both": ("other", _set("promotion", "previous_alias", value="champion"),
                           ["promotion", "previous_alias"]),
    "unknown text encoding": ("other", _set("sources", "flights", "encoding", value="klingon"),
                              ["sources.flights.encoding", "klingon"]),
    "row bounds the wrong way round": ("other", _set("sources", "flights", "rows", value={"min": 10, "max": 5}),
                                       ["sources.flights.rows"]),
}

# the CLI's own arguments
ARGS: dict[str, tuple[Callable[[Path, Path], list[str]], list[str]]] = {
    "date that does not exist": (lambda spec, tmp: ["--spec", str(spec), "--date", "2013-02-30"],
                                 ["invalid date", "2013-02-30"]),
    "spec file that does not exist": (lambda spec, tmp: ["--spec", str(tmp / "nope.yaml"), "--date", DAY],
                                      ["spec file not found", "nope.yaml"]),
    "spec that is not YAML": (lambda spec, tmp: ["--spec", str(tmp / "broken.yaml"), "--date", DAY],
                              ["broken.yaml", "not valid YAML"]),
}
USAGE = {"date that does not exist"}  # a malformed argument: a usage error (exit 2); the others are bad input (3)


def _home(base: Path, landing: Path, files: dict[str, bytes] | None = None) -> Path:
    """A daybreak home whose landing zone is the real one, plus `files` under landing/CASE."""
    home = base / "home"
    (home / "store" / "landing").mkdir(parents=True)
    for d in landing.iterdir():  # hard links: staging refuses symbolic links out of the landing root
        shutil.copytree(d, home / "store" / "landing" / d.name, copy_function=os.link)
    for rel, data in (files or {}).items():
        p = home / "store" / "landing" / "CASE" / rel.replace("/D.", f"/{DAY}.")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return home


def nothing_done(home: Path, cwd: Path, ray_dir: Path | None = None) -> list[str]:
    """What the failed run did anyway: files beyond the landing zone and the quarantine, an
    MLflow store, a Ray session."""
    problems = []
    store = home / "store"
    for root, dirs, names in os.walk(store):
        rel = Path(root).relative_to(store)
        if rel.parts[:1] in (("landing",), ("quarantine",)):
            dirs.clear()
            continue
        problems += [f"wrote {rel / n}" for n in names]
    problems += [f"created {p.name}" for p in (home / "mlflow.db", home / "mlartifacts", cwd / "mlruns") if p.exists()]
    if ray_dir is not None and ray_dir.exists() and any(ray_dir.iterdir()):
        problems.append(f"started Ray (a session in {ray_dir})")
    return problems


def judge(r: dict[str, Any], expect: list[str], rc: int = 3) -> list[str]:
    problems = []
    if r["rc"] != rc:
        problems.append(f"exit {r['rc']} (want {rc})")
    lines = r["stderr"].splitlines()
    first = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), len(lines))
    errors = lines[first:first + 1] + [ln for ln in lines[first + 1:] if ln.startswith("  ")]  # a spec's fields
    text = "\n".join(errors)
    if not errors:
        problems.append("no 'error:' line on stderr")
    problems += [f"the error does not name {e!r}" for e in expect if e not in text]
    if "Traceback" in r["stderr"]:
        problems.append("a traceback instead of an error message")
    if r.get("ray"):
        problems.append("Ray was initialized")
    if r.get("children"):
        problems.append(f"left child processes {r['children']}")
    return [f"{p}\n      stderr: {' | '.join(errors) or r['stderr'][-400:]}" if i == 0 else p
            for i, p in enumerate(problems)]


def test_bad_landing_files_and_bad_specs(tmp_path: Path, landing: Path) -> None:
    raw = yaml.safe_load(SPEC.read_text())
    lines = (landing / "flights" / f"{DAY}.csv").read_text().splitlines(keepends=True)
    cases: list[dict[str, Any]] = []
    made: dict[str, dict[str, bytes]] = {}
    for name, (files, change, expect) in LANDING.items():
        base = tmp_path / f"landing-{len(cases)}"
        made[name] = files(lines, landing)
        r = copy.deepcopy(raw)
        for rel in made[name]:  # the sources the case has files for read them from its folder
            src = rel.split("/")[0]
            r["sources"][src]["path"] = f"landing/CASE/{src}/{{date}}{Path(rel).suffix}"
        r["sources"]["flights"] |= change
        spec = base / "spec.yaml"
        home = _home(base, landing, made[name])
        spec.write_text(yaml.safe_dump(r, sort_keys=False))
        cases.append({"tally": "landing", "name": name, "home": str(home), "expect": expect,
                      "argv": ["run", "--spec", str(spec), "--date", DAY, "--no-deploy"]})
    for name, (kind, mutate, expect) in SPECS.items():
        base = tmp_path / f"spec-{len(cases)}"
        r = copy.deepcopy(raw)
        mutate(r)
        spec = base / "spec.yaml"
        home = _home(base, landing)
        spec.write_text(yaml.safe_dump(r, sort_keys=False))
        cases.append({"tally": "spec", "name": f"{kind}: {name}", "home": str(home), "expect": expect,
                      "argv": ["run", "--spec", str(spec), "--date", DAY, "--no-deploy"]})
    (tmp_path / "broken.yaml").write_text("name: flights\nsources: [unclosed\n")
    for name, (argv, expect) in ARGS.items():
        base = tmp_path / f"args-{len(cases)}"
        home = _home(base, landing)
        cases.append({"tally": "spec", "name": f"arguments: {name}", "home": str(home), "expect": expect,
                      "argv": ["run", *argv(SPEC, tmp_path), "--no-deploy"],
                      "rc": 2 if name in USAGE else 3})

    # two cases as processes of their own (Ray would leave a session in RAY_TMPDIR), next to the driver
    solo = [next(c for c in cases if c["name"] == "missing column"),
            next(c for c in cases if c["name"].endswith("lookup by a column the events lack"))]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "DAYBREAK_HOME"}
    procs = []
    for i, c in enumerate(solo):
        home = _home(Path(c["home"]).parent / "solo", landing, made.get(c["name"]))
        own = dict(c, home=str(home), name=c["name"] + " (own process)", ray_dir=str(tmp_path / f"ray{i}"))
        procs.append((own, subprocess.Popen([str(BIN / "daybreak"), *c["argv"]], cwd=cwd, text=True,
                                            env=env | {"DAYBREAK_HOME": own["home"], "RAY_TMPDIR": own["ray_dir"]},
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    driver = subprocess.run([str(BIN / "python"), "-c", DRIVER, str(tmp_path / "cases.json"),
                             str(tmp_path / "results.json")], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    for own, p in procs:
        _, err = p.communicate(timeout=600)
        results[own["name"]] = {"rc": p.returncode, "stderr": err}
        cases.append(own)

    tallies = {"landing": tally("bad input: landing files"), "spec": tally("bad input: specs")}
    for c in cases:
        r = results[c["name"]]
        problems = [f"{c['name']}: {p}" for p in judge(r, c["expect"], c.get("rc", 3))]
        problems += [f"{c['name']}: {p}" for p in nothing_done(Path(c["home"]), cwd,
                                                               Path(c["ray_dir"]) if "ray_dir" in c else None)]
        tallies[c["tally"]].record(problems)
        print("\n".join(problems) if problems else f"ok: {c['name']}")
    for t in tallies.values():
        t.check()
