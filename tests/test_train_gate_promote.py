"""Train, gate and promote against a real (sqlite) MLflow registry."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from daybreak.cycle import run_cycle
from daybreak.gate import PROMOTE, SKIPPED, evaluate_gate
from daybreak.gate._gating import REJECT
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import PromotionConflict
from daybreak.promote import promote_model
from daybreak.train import train_model


def test_three_day_run_ends_with_a_gated_champion(use_cycled: dict, spec) -> None:
    results = use_cycled["results"]
    assert results[0]["gate"]["decision"] == SKIPPED  # 2013-01-01: nothing before it to train on
    assert results[0]["train"]["status"] == "skipped"
    ctx = RunContext.create("2013-01-04")
    cl = registry.client(ctx)
    versions = registry.versions(cl, spec.model.name)
    assert len(versions) == 3
    for mv in versions:
        t = mv.tags
        assert t[registry.DECISION_TAG] in (PROMOTE, REJECT)
        for tag in ("daybreak.window_start", "daybreak.window_end", "daybreak.input_hashes", registry.SPEC_TAG,
                    "daybreak.code_version", "daybreak.feature_version", registry.LINEAGE_TAG):
            assert t.get(tag), f"v{mv.version} lacks lineage tag {tag}"
    champ = registry.alias_version(cl, spec.model.name, "champion")
    assert champ is not None and champ.tags[registry.DECISION_TAG] == PROMOTE
    # the gate scored both models on the same day and recorded what it compared against
    day4 = results[3]["gate"]
    if day4["champion_version"] is not None:
        assert day4["champion_metric"] is not None and day4["holdout_rows"] > 500
    assert (day4["decision"] == PROMOTE) == (results[3]["promote"]["champion_version"] == day4["candidate_version"])


def test_rerun_of_a_day_registers_and_promotes_nothing_new(use_cycled: dict, spec) -> None:
    ctx = RunContext.create("2013-01-04")
    cl = registry.client(ctx)
    before = [(mv.version, dict(mv.tags)) for mv in registry.versions(cl, spec.model.name)]
    champ_before = registry.alias_version(cl, spec.model.name, "champion").version
    again = run_cycle(spec, ctx, deploy=False)
    assert again["train"]["status"] == "exists"
    assert again["promote"]["promoted"] is False
    after = [(mv.version, dict(mv.tags)) for mv in registry.versions(cl, spec.model.name)]
    assert after == before
    assert registry.alias_version(cl, spec.model.name, "champion").version == champ_before


def _train_gate_promote(spec, day: str) -> dict:
    ctx = RunContext.create(day)
    return {"train": train_model(spec, ctx), "gate": evaluate_gate(spec, ctx), "promote": promote_model(spec, ctx)}


def test_first_model_is_decided_by_the_floor_alone(fresh: Path, spec) -> None:
    out = _train_gate_promote(spec, "2013-01-02")
    assert out["gate"]["champion_version"] is None
    # no champion: the size, absolute and baseline rules decide (the floor on its interval's lower
    # end); the data checks that need a champion are skipped
    assert [r["rule"] for r in out["gate"]["rules"] if r["kind"] != "data"] == [
        "min_rows", "min_class_rows", "min_clusters", "finite_predictions", "floor", "baseline:prior"]
    floor = next(r for r in out["gate"]["rules"] if r["rule"] == "floor")
    assert floor["bound"] < floor["value"] and floor["verdict"] == "pass"
    assert {r["rule"]: r["verdict"] for r in out["gate"]["rules"] if r["kind"] == "data"} == {
        "row_count": "skip", "label_shift": "skip", "drift": "skip"}
    assert out["gate"]["decision"] == PROMOTE and out["promote"]["promoted"] is True

    strict = spec.model_copy(update={"gate": spec.gate.model_copy(update={"floor": 0.99})})
    out = _train_gate_promote(strict, "2013-01-03")
    assert out["gate"]["decision"] == REJECT
    floor = next(r for r in out["gate"]["rules"] if r["rule"] == "floor")  # with a champion: the point estimate
    assert floor == {"rule": "floor", "kind": "absolute", "metric": "roc_auc",
                     "value": out["gate"]["candidate_metric"], "threshold": 0.99, "verdict": "fail"}
    assert out["promote"]["promoted"] is False
    cl = registry.client(RunContext.create("2013-01-03"))
    assert str(registry.alias_version(cl, spec.model.name, "champion").version) == out["gate"]["champion_version"]
    rejected = cl.get_model_version(spec.model.name, out["gate"]["candidate_version"])
    assert rejected.tags[registry.DECISION_TAG] == REJECT
    assert "champion" not in rejected.aliases


def test_candidate_must_beat_the_champion_by_the_margin(fresh: Path, spec) -> None:
    _train_gate_promote(spec, "2013-01-02")
    picky = spec.model_copy(update={"gate": spec.gate.model_copy(update={"compare": "improve", "margin": 0.5})})
    out = _train_gate_promote(picky, "2013-01-03")
    assert out["gate"]["decision"] == REJECT
    assert "promote" not in out or out["promote"]["promoted"] is False
    rule = next(r for r in out["gate"]["rules"] if r["rule"] == "improve")
    assert rule["value"] == pytest.approx(out["gate"]["candidate_metric"] - out["gate"]["champion_metric"])
    assert rule["verdict"] == "fail" and rule["threshold"] == 0.5


def test_promotion_is_compare_and_set(fresh: Path, spec) -> None:
    _train_gate_promote(spec, "2013-01-02")
    ctx = RunContext.create("2013-01-03")
    lenient = spec.model_copy(update={"gate": spec.gate.model_copy(update={"compare": "no_worse", "margin": 1.0,
                                                                               "floor": 0.0})})
    train_model(lenient, ctx)
    gate = evaluate_gate(lenient, ctx)
    assert gate["decision"] == PROMOTE and gate["champion_version"] == "1"
    # another run moves the champion after the gate looked at it
    cl = registry.client(ctx)
    cl.set_registered_model_alias(spec.model.name, "champion", gate["candidate_version"])
    cl.set_registered_model_alias(spec.model.name, "champion", "1")
    mlflow.set_tracking_uri(ctx.tracking_uri)
    cl.delete_registered_model_alias(spec.model.name, "champion")
    with pytest.raises(PromotionConflict, match="champion is now no champion but the gate evaluated v2 against v1"):
        promote_model(lenient, ctx)
    assert registry.alias_version(cl, spec.model.name, "champion") is None
