"""daybreak replay: recorded gate decisions re-judged from their gate runs alone, on a real
(sqlite) MLflow registry after a real cycle; read-only."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from sklearn import metrics as skm

from daybreak.cycle import run_cycle
from daybreak.gate import PROMOTE, replay
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import SpecError
from daybreak.infra.records import Decision

DAYS = ("2013-01-02", "2013-01-03", "2013-01-04")


def _gate(spec, **update):
    return spec.model_copy(update={"gate": spec.gate.model_copy(update=update)})


def _ctx(day: str) -> RunContext:
    return RunContext.create(day)


@pytest.fixture(scope="module")
def gated(featured: Path, tmp_path_factory: pytest.TempPathFactory, spec) -> dict:
    """A private home (as `fresh`: a copy of the featured store, an empty registry) where the
    cycle ran for DAYS under a lenient gate: every day PROMOTE. Shared by this module's tests,
    which only read it (the read-only test checks that)."""
    h = tmp_path_factory.mktemp("replay") / "home"
    shutil.copytree(featured / "store", h / "store", symlinks=True)
    s = _gate(spec, compare="no_worse", margin=1.0, floor=0.0,
              slices=spec.gate.slices.model_copy(update={"tolerance": 1.0}))
    old = os.environ.get("DAYBREAK_HOME")
    os.environ["DAYBREAK_HOME"] = str(h)
    try:
        results = [run_cycle(s, _ctx(d), deploy=False) for d in DAYS]
    finally:
        os.environ["DAYBREAK_HOME"] = old or ""
    spec_file = h / "spec.yaml"
    spec_file.write_text(json.dumps(s.model_dump(mode="json")))
    strict = h / "strict.yaml"  # the same gate with a floor no model on this data clears
    strict.write_text(json.dumps({"gate": {**s.gate.model_dump(mode="json"), "floor": 0.99}}))
    return {"home": h, "spec": s, "results": results, "spec_file": spec_file, "strict": strict}


@pytest.fixture
def on_home(gated: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("DAYBREAK_HOME", str(gated["home"]))
    return gated


def test_the_recorded_policy_reproduces_every_recorded_decision(on_home: dict) -> None:
    s = on_home["spec"]
    recorded = [r["gate"] for r in on_home["results"]]
    assert [g["decision"] for g in recorded] == [PROMOTE] * 3, [g["rules"] for g in recorded]
    out = replay(s, _ctx(DAYS[0]), DAYS[0], DAYS[-1])
    assert [d["date"] for d in out["days"]] == list(DAYS) and out["policy"] is None
    for day, g in zip(out["days"], recorded, strict=True):
        assert day["status"] == "replayed"
        assert day["candidate_version"] == g["candidate_version"] and day["champion_version"] == g["champion_version"]
        assert day["replayed_decision"] == day["recorded_decision"] == g["decision"] and not day["changed"]
        assert day["candidate_metric"] == pytest.approx(g["candidate_metric"], rel=1e-12)
        if g["champion_metric"] is None:
            assert day["champion_metric"] is None
        else:
            assert day["champion_metric"] == pytest.approx(g["champion_metric"], rel=1e-12)
    assert [d["champion_version"] for d in out["days"]] == [None, "1", "2"]
    summary = out["summary"]
    assert summary["changed"] == 0 and summary["promotions_recorded"] == summary["promotions_replayed"] == 3

    # forward: each promoted candidate on the following days, where the next gate scored it as
    # its champion; recomputed here from that gate run's scores
    days = out["days"]
    assert [d["forward_version"] for d in days] == ["1", "2", "3"]
    for day, nxt in itertools.pairwise(days):
        scores = pd.read_parquet(mlflow.artifacts.download_artifacts(f"runs:/{nxt['gate_run_id']}/scores.parquet"))
        rows = scores["__day"].astype(str) > day["date"]
        assert day["forward_days"] == [nxt["date"]] and day["forward_rows"] == int(rows.sum()) > 0
        want = skm.roc_auc_score(scores.loc[rows, "label"], scores.loc[rows, "champion"])
        assert day["forward_metric"] == pytest.approx(want, rel=1e-9)
        assert day["recorded_forward_metric"] == day["forward_metric"]
    assert days[2]["forward_metric"] is None and "not scored on a later day" in days[2]["forward_note"]
    assert summary["forward_days_replayed"] == 2
    mean = (days[0]["forward_metric"] + days[1]["forward_metric"]) / 2
    assert summary["mean_forward_replayed"] == pytest.approx(mean)


def test_a_stricter_policy_turns_promotions_into_rejections(on_home: dict) -> None:
    out = replay(on_home["spec"], _ctx(DAYS[0]), DAYS[0], DAYS[-1], policy=str(on_home["strict"]))
    assert out["policy"] == str(on_home["strict"])
    days = out["days"]
    assert [d["recorded_decision"] for d in days] == [PROMOTE] * 3
    assert [d["replayed_decision"] for d in days] == [Decision.REJECT] * 3
    assert all(d["changed"] and "floor" in d["failed_rules"] for d in days)
    # a rejection keeps the champion it faced in service: none on the first day; v1 on the second,
    # which no later gate scored (the recorded history replaced it); v2 on the third, the last day
    assert [d["forward_version"] for d in days] == [None, "1", "2"]
    assert [d["forward_metric"] for d in days] == [None, None, None]
    assert "no model in service" in days[0]["forward_note"]
    s = out["summary"]
    assert (s["changed"], s["promotions_recorded"], s["promotions_replayed"]) == (3, 3, 0)
    assert s["mean_forward_replayed"] is None and s["mean_forward_recorded"] is not None


def test_days_without_a_gate_record_are_listed_not_errors(on_home: dict) -> None:
    out = replay(on_home["spec"], _ctx("2013-01-01"), "2013-01-01", "2013-01-06")
    status = {d["date"]: d["status"] for d in out["days"]}
    assert status == {"2013-01-01": "no_candidate", "2013-01-02": "replayed", "2013-01-03": "replayed",
                      "2013-01-04": "replayed", "2013-01-05": "no_candidate", "2013-01-06": "no_candidate"}
    # gated under another spec (hash) than the one asked about: no candidate of *this* spec
    other = replay(_gate(on_home["spec"], margin=0.5), _ctx(DAYS[0]), DAYS[0], DAYS[0])
    assert other["days"][0]["status"] == "no_candidate" and "hash" in other["days"][0]["note"]
    with pytest.raises(ValueError, match="before"):
        replay(on_home["spec"], _ctx(DAYS[0]), DAYS[1], DAYS[0])


def _state(s) -> dict:
    cl = registry.client(_ctx(DAYS[0]))
    versions = {mv.version: (dict(mv.tags), sorted(cl.get_model_version(s.model.name, mv.version).aliases))
                for mv in registry.versions(cl, s.model.name)}
    experiments = [e.experiment_id for e in cl.search_experiments(view_type=3)]
    runs = sum(len(cl.search_runs([e], run_view_type=3, max_results=10_000)) for e in experiments)
    model = cl.get_registered_model(s.model.name)
    return {"versions": versions, "aliases": {k: str(v) for k, v in model.aliases.items()},
            "tags": dict(model.tags), "runs": runs, "experiments": experiments}


def test_replay_writes_nothing_and_loads_no_model(on_home: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    s = on_home["spec"]
    before = _state(s)
    assert len(before["versions"]) == 3 and before["aliases"] == {"champion": "3", "previous": "2"}
    assert before["runs"] > 3
    files = sorted(p.relative_to(on_home["home"]) for p in on_home["home"].rglob("*") if ".db" not in p.name)

    def refuse(*a, **k):
        raise AssertionError("replay loaded a model")

    monkeypatch.setattr(registry, "load_model", refuse)
    monkeypatch.setattr(mlflow.pyfunc, "load_model", refuse)
    replay(s, _ctx(DAYS[0]), DAYS[0], DAYS[-1])
    replay(s, _ctx(DAYS[0]), DAYS[0], DAYS[-1], policy=str(on_home["strict"]))
    assert _state(s) == before
    assert sorted(p.relative_to(on_home["home"]) for p in on_home["home"].rglob("*") if ".db" not in p.name) == files


def test_a_bad_policy_names_the_field(on_home: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate:\n  floor: high\n")
    with pytest.raises(SpecError, match=r"gate\.floor"):
        replay(on_home["spec"], _ctx(DAYS[0]), DAYS[0], DAYS[0], policy=str(bad))
    bad.write_text("floor: 0.9\n")
    with pytest.raises(SpecError, match="top-level 'gate:'"):
        replay(on_home["spec"], _ctx(DAYS[0]), DAYS[0], DAYS[0], policy=str(bad))
    bad.write_text("gate: {floor: 0.9}\nmodel: {name: other}\n")
    with pytest.raises(SpecError, match="only 'gate'"):
        replay(on_home["spec"], _ctx(DAYS[0]), DAYS[0], DAYS[0], policy=str(bad))


def _cli(on_home: dict, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DAYBREAK_HOME": str(on_home["home"])}
    return subprocess.run([sys.executable, "-m", "daybreak.cli", "replay", "--spec", str(on_home["spec_file"]),
                           *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli(on_home: dict, tmp_path: Path) -> None:
    got = _cli(on_home, "--start", DAYS[0], "--end", DAYS[-1], "--policy", str(on_home["strict"]), "--json")
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert [d["replayed_decision"] for d in out["days"]] == [Decision.REJECT] * 3
    assert out["summary"]["changed"] == 3

    table = _cli(on_home, "--start", DAYS[0], "--end", DAYS[-1])
    assert table.returncode == 0, table.stderr
    assert "0 decisions changed" in table.stdout and "2013-01-03  v2" in table.stdout, table.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text("gate:\n  margin: -1\n")
    refused = _cli(on_home, "--start", DAYS[0], "--end", DAYS[0], "--policy", str(bad))
    assert refused.returncode == 3 and "gate.margin" in refused.stderr, refused.stderr
    backwards = _cli(on_home, "--start", DAYS[1], "--end", DAYS[0])
    assert backwards.returncode == 3 and "before" in backwards.stderr, backwards.stderr


def test_the_step_the_airflow_operator_and_the_prefect_task(on_home: dict) -> None:
    from daybreak.airflow import ReplayGateOperator
    from daybreak.prefect import replay_gate
    from daybreak.steps import CYCLE, STEPS

    step = STEPS["replay"]
    assert step.function == "daybreak.gate:replay" and step.options == ("start", "end", "policy")
    assert not step.cacheable and step not in CYCLE

    spec_file, strict = str(on_home["spec_file"]), str(on_home["strict"])
    assert ReplayGateOperator.step == "replay"
    assert {"spec", "start", "end", "policy"} <= set(ReplayGateOperator.template_fields)
    op = ReplayGateOperator(task_id="replay", spec=spec_file, start=DAYS[0], end=DAYS[-1], policy=strict)
    result = op.execute({"run_id": "manual__replay-test", "logical_date": None, "dag_run": None})
    assert [d["replayed_decision"] for d in result["days"]] == [Decision.REJECT] * 3
    # templated empties fall back to the run's date
    op = ReplayGateOperator(task_id="replay", spec=spec_file, logical_date=DAYS[1], start="", end="None", policy="")
    result = op.execute({"run_id": "manual__replay-test", "logical_date": None, "dag_run": None})
    assert [d["date"] for d in result["days"]] == [DAYS[1]] and not result["days"][0]["changed"]

    assert replay_gate.name == "replay_gate" and replay_gate.cache_policy.__class__.__name__ == "ThisRun"
    out = replay_gate.fn(spec_file, DAYS[0], DAYS[-1])
    assert [d["replayed_decision"] for d in out["days"]] == [PROMOTE] * 3
