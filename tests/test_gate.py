"""The gate: metrics against scikit-learn, the paired bootstrap, the rules on real models, the
record in a real (sqlite) MLflow registry, and the HTML report in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from daybreak.cycle import run_cycle
from daybreak.features import read_features
from daybreak.gate import PROMOTE, evaluate_gate
from daybreak.gate._gating import BLOCKED, INSUFFICIENT, REJECT, decide, judge
from daybreak.infra import metrics, registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import GateError
from daybreak.promote import promote_model
from daybreak.train import train_model
from daybreak.train._fit import TrainData, fit_encoders, fit_model, label_array, sample_weight, split_window
from daybreak.train.model_code import encode, encoded_names, predict_matrix

ROOT = Path(__file__).resolve().parent.parent

SKLEARN = {
    "roc_auc": lambda y, p, w: skm.roc_auc_score(y, p, sample_weight=w),
    "pr_auc": lambda y, p, w: skm.average_precision_score(y, p, sample_weight=w),
    "log_loss": lambda y, p, w: skm.log_loss(y, p, sample_weight=w),
    "brier": lambda y, p, w: skm.brier_score_loss(y, p, sample_weight=w),
    "f1": lambda y, p, w: skm.f1_score(y, p >= 0.5, sample_weight=w),
    "rmse": lambda y, p, w: np.sqrt(skm.mean_squared_error(y, p, sample_weight=w)),
    "mae": lambda y, p, w: skm.mean_absolute_error(y, p, sample_weight=w),
    "r2": lambda y, p, w: skm.r2_score(y, p, sample_weight=w),
    "mape": lambda y, p, w: skm.mean_absolute_percentage_error(y, p, sample_weight=w),
}


@pytest.mark.parametrize("metric", sorted(SKLEARN))
def test_weighted_metrics_equal_sklearn(metric: str) -> None:
    rng = np.random.default_rng(7)
    n = 3000
    if metric in metrics.CLASSIFICATION:
        y = (rng.random(n) < 0.3).astype(float)
        p = np.round(np.clip(0.6 * rng.random(n) + 0.3 * y, 0.001, 0.999), 2)  # many ties
    else:
        y = rng.normal(5, 2, n)
        p = y + rng.normal(0, 1, n)
    w = rng.poisson(1.0, (4, n)).astype(float)  # what a bootstrap resample looks like
    got = metrics.Scorer(metric, y, p)(w)
    want = [SKLEARN[metric](y, p, row) for row in w]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert metrics.evaluate(metric, y, p) == pytest.approx(SKLEARN[metric](y, p, None), rel=1e-9)


def test_paired_bootstrap_is_seeded_and_paired() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.2).astype(float)
    a = rng.random(20_000) + 0.3 * y
    b = a - 0.05 * y * rng.random(20_000) + 0.05 * rng.random(20_000)  # a close rival, as champions are
    one = metrics.paired_bootstrap("roc_auc", y, a, b, resamples=300, seed=5)
    two = metrics.paired_bootstrap("roc_auc", y, a, b, resamples=300, seed=5)
    other = metrics.paired_bootstrap("roc_auc", y, a, b, resamples=300, seed=6)
    np.testing.assert_array_equal(one["gains"], two["gains"])
    assert not np.array_equal(one["gains"], other["gains"])
    assert one["low"] < one["gain"] < one["high"]
    # chunking (memory) does not change the draws' meaning: same model twice -> every gain is 0
    same = metrics.paired_bootstrap("log_loss", y, np.clip(a / 2, 0.01, 0.99), np.clip(a / 2, 0.01, 0.99),
                                    resamples=200, max_cells=50_000)
    assert np.all(same["gains"] == 0)
    # pairing: the interval of the gain is narrower than either model's own interval
    width = one["high"] - one["low"]
    assert width < (one["candidate_interval"][1] - one["candidate_interval"][0])


# --- real models on the flights features -------------------------------------------------

@pytest.fixture(scope="module")
def window(featured: Path, spec):
    """Training rows (2013-01-01..02) and holdout rows (2013-01-03) of the flights features."""
    old = os.environ.get("DAYBREAK_HOME")
    os.environ["DAYBREAK_HOME"] = str(featured)
    try:
        ctx = RunContext.create("2013-01-03")
        train, _, _ = read_features(spec, ctx, [date(2013, 1, 1), date(2013, 1, 2)])
        hold, _, _ = read_features(spec, ctx, [date(2013, 1, 3)])
    finally:
        os.environ["DAYBREAK_HOME"] = old or ""
    return train, hold.to_pandas()


def _fit_predict(spec, window, *, seed: int = 13, shuffle: int | None = None, blind: tuple[str, ...] = ()):
    """Train with the spec's estimator (labels shuffled with seed `shuffle`, features in `blind`
    hidden) and predict the holdout."""
    table, hold = window
    features = spec.features.feature_names()
    fit, val = split_window(table, spec)
    enc = fit_encoders(fit, spec)
    y_fit, y_val = label_array(fit, spec), label_array(val, spec)
    if shuffle is not None:
        rng = np.random.default_rng(shuffle)
        y_fit, y_val = rng.permutation(y_fit), rng.permutation(y_val)
    names = encoded_names(features, enc)
    X_fit, X_val, X_hold = encode(fit, features, enc), encode(val, features, enc), encode(hold, features, enc)
    for i, n in enumerate(names):
        if n.split("=")[0] in blind:
            X_fit[:, i], X_val[:, i], X_hold[:, i] = np.nan, np.nan, np.nan
    s = spec.model_copy(update={"model": spec.model.model_copy(update={"seed": seed})})
    fitted = fit_model(s, TrainData(X_fit, y_fit, X_val, y_val, sample_weight(s, y_fit), names))
    return predict_matrix(fitted.model, X_hold, s.model.flavor, s.model.task, names)


def _gate(spec, **update):
    return spec.model_copy(update={"gate": spec.gate.model_copy(update=update)})


def test_label_shuffled_models_are_rejected_for_20_seeds(spec, window) -> None:
    hold = window[1]
    y = hold[spec.features.label.name].to_numpy(float)
    champion = _fit_predict(spec, window)
    lenient = _gate(spec, floor=None, compare="no_worse", margin=0.02)  # no floor: the comparison must catch it
    decisions = []
    for seed in range(20):
        shuffled = _fit_predict(spec, window, seed=seed, shuffle=seed)
        out = judge(lenient, y, shuffled, champion, hold)
        rules = {r["rule"]: r for r in out["rules"]}
        decisions.append(decide(out["rules"]))
        assert rules["confidence"]["verdict"] == "fail", (seed, rules["confidence"])
    assert decisions == [REJECT] * 20


@pytest.fixture(scope="module")
def synthetic():
    """A table with a known signal: 6 informative features of 10, 30k rows to train, 8k holdout."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=38_000, n_features=10, n_informative=6, n_redundant=0, flip_y=0.25,
                               class_sep=0.5, shuffle=False, random_state=4)  # informative features first
    rows = np.random.default_rng(4).permutation(len(y))  # (unshuffled, the rows come sorted by class)
    X, y = X[rows], y[rows]
    return X[:30_000].astype(np.float32), y[:30_000].astype(np.float32), X[30_000:].astype(np.float32), y[30_000:]


def _fit_synthetic(spec, synthetic, *, seed: int = 13, blind: tuple[int, ...] = ()):
    X, y, X_hold, _ = synthetic
    X, X_hold = X.copy(), X_hold.copy()
    X[:, list(blind)], X_hold[:, list(blind)] = np.nan, np.nan
    s = spec.model_copy(update={"model": spec.model.model_copy(update={"seed": seed})})
    names = [f"x{i}" for i in range(X.shape[1])]
    fitted = fit_model(s, TrainData(X[:24_000], y[:24_000], X[24_000:], y[24_000:], None, names))
    return predict_matrix(fitted.model, X_hold, s.model.flavor, s.model.task, names)


def test_a_better_model_is_promoted(spec, synthetic) -> None:
    y = synthetic[3].astype(float)
    strong = _fit_synthetic(spec, synthetic)
    weak = _fit_synthetic(spec, synthetic, blind=(0, 1))  # the champion lacks two informative features
    out = judge(_gate(spec, compare="improve", margin=0.0), y, strong, weak)
    assert decide(out["rules"]) == PROMOTE, out["rules"]
    assert out["bootstrap"]["low"] > 0


def test_a_tie_is_rejected_under_improve_and_accepted_under_no_worse(spec, synthetic) -> None:
    y = synthetic[3].astype(float)
    champion = _fit_synthetic(spec, synthetic)
    twin = _fit_synthetic(spec, synthetic, seed=99)  # same data and features, another seed (subsample)
    assert not np.array_equal(twin, champion)
    improve = judge(_gate(spec, compare="improve", margin=0.0), y, twin, champion)
    no_worse = judge(_gate(spec, compare="no_worse", margin=0.01), y, twin, champion)
    assert improve["bootstrap"]["low"] < 0 < improve["bootstrap"]["high"]  # within noise
    assert decide(improve["rules"]) == REJECT
    assert decide(no_worse["rules"]) == PROMOTE, no_worse["rules"]


def test_slices_catch_a_regression_hidden_in_the_average(spec) -> None:
    rng = np.random.default_rng(3)
    n = 4000
    lga = rng.random(n) < 0.2
    frame = pd.DataFrame({"origin": np.where(lga, "LGA", "JFK")})
    y = (rng.random(n) < 0.3).astype(float)
    champion = rng.random(n) + 0.5 * y
    candidate = champion.copy()
    candidate[~lga] += 0.3 * y[~lga]                                    # better on JFK (80% of rows)
    candidate[lga] = champion[lga] + 1.2 * rng.random(lga.sum())         # much noisier on LGA
    s = _gate(spec, compare="no_worse", margin=0.05, bootstrap=None,
              slices=spec.gate.slices.model_copy(update={"columns": ["origin"], "min_rows": 100, "tolerance": 0.05}))
    out = judge(s, y, candidate, champion, frame)
    rules = {r["rule"]: r for r in out["rules"]}
    assert rules["no_worse"]["verdict"] == "pass"
    assert rules["slice:origin"]["verdict"] == "fail" and "LGA" in rules["slice:origin"]["detail"]
    assert {r["value"]: r["verdict"] for r in out["slices"]} == {"JFK": "pass", "LGA": "fail"}


# --- the whole gate against a registry ----------------------------------------------------

def _ctx(day: str) -> RunContext:
    return RunContext.create(day)


def test_gate_record_same_rows_report_and_override(fresh: Path, spec) -> None:
    s = _gate(spec, compare="no_worse", margin=1.0, floor=0.0)  # lenient: the record is under test here
    for day in ("2013-01-02", "2013-01-03"):
        train_model(s, _ctx(day))
        out = evaluate_gate(s, _ctx(day))
        assert out["decision"] == PROMOTE, out["rules"]
        promote_model(s, _ctx(day))
    ctx = _ctx("2013-01-03")
    cl = registry.client(ctx)
    cand = cl.get_model_version(s.model.name, out["candidate_version"])
    assert out["champion_version"] == "1" and out["candidate_version"] == "2"
    kinds = {r["rule"]: r["kind"] for r in out["rules"]}
    assert kinds == {"min_rows": "size", "min_class_rows": "size", "min_clusters": "size",
                     "finite_predictions": "absolute",
                     "floor": "absolute", "baseline:prior": "baseline", "no_worse": "relative",
                     "confidence": "confidence", "slice:origin": "slice",
                     "unseen_holdout": "data", "row_count": "data", "label_shift": "data", "drift": "data"}
    assert next(r for r in out["rules"] if r["rule"] == "unseen_holdout")["verdict"] == "pass"
    assert [r["rule"] for r in json.loads(cand.tags["daybreak.gate.rules"])] == list(kinds)
    run_id = cand.tags["daybreak.gate.run_id"]
    assert mlflow.get_run(run_id).data.tags[registry.DECISION_TAG] == PROMOTE

    # both models were scored on exactly the holdout rows: recompute everything independently
    scores = pd.read_parquet(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/scores.parquet"))
    table, hashes, _ = read_features(s, ctx, [date(2013, 1, 3)])
    hold = table.to_pandas()
    assert len(scores) == len(hold) == out["holdout_rows"]
    pd.testing.assert_series_equal(scores["event_time"], hold["event_time"], check_names=False)
    np.testing.assert_array_equal(scores["label"], hold[s.features.label.name].to_numpy(float))
    X = hold[s.features.feature_names()]
    for col, version in (("candidate", "2"), ("champion", "1")):
        np.testing.assert_allclose(scores[col], registry.load_model(ctx, s.model.name, version).predict(X), rtol=1e-6)
    import hashlib

    holdout_hash = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    assert cand.tags["daybreak.gate.holdout_hash"] == holdout_hash
    assert out["candidate_metric"] == pytest.approx(skm.roc_auc_score(scores["label"], scores["candidate"]))
    assert out["champion_metric"] == pytest.approx(skm.roc_auc_score(scores["label"], scores["champion"]))

    # the report: from the CLI, then rendered in headless Chromium
    env = {**os.environ, "DAYBREAK_HOME": str(fresh)}
    spec_file = fresh / "spec.yaml"
    spec_file.write_text(json.dumps(s.model_dump(mode="json")))
    page = fresh / "report.html"
    cli = subprocess.run([sys.executable, "-m", "daybreak.cli", "report", "--spec", str(spec_file), "--version", "2",
                          "--html", str(page)], capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 0, cli.stderr
    text = page.read_text()
    assert "PROMOTE" in text and "confidence" in text and "http" not in text.replace("http-equiv", "")
    _check_report_in_chromium(page, {"ROC curve", "Precision-recall curve", "Calibration",
                                     "Distribution of the gain", "Slices by origin"})

    # gating an older date against a newer champion (as in a backfill): the champion saw the holdout
    old = evaluate_gate(s, _ctx("2013-01-02"), force=True)
    assert old["champion_version"] == "2"
    assert next(r for r in old["rules"] if r["rule"] == "unseen_holdout")["verdict"] == "warn"

    # a manual override needs a reason, and is recorded next to the computed decision
    with pytest.raises(GateError, match="reason is required"):
        evaluate_gate(s, ctx, override="reject")
    cl.set_registered_model_alias(s.model.name, "champion", "1")  # as before the promotion
    forced = evaluate_gate(s, ctx, override="reject", reason="holiday traffic: wait a day")
    assert forced["decision"] == REJECT and forced["computed_decision"] == PROMOTE and forced["overridden"]
    tags = cl.get_model_version(s.model.name, "2").tags
    assert tags["daybreak.gate.override_reason"] == "holiday traffic: wait a day"
    assert tags["daybreak.gate.computed_decision"] == PROMOTE and tags[registry.DECISION_TAG] == REJECT
    assert promote_model(s, ctx)["promoted"] is False
    again = evaluate_gate(s, ctx, force=True)  # decided afresh: the earlier override is not carried over
    tags = cl.get_model_version(s.model.name, "2").tags
    assert again["decision"] == PROMOTE and tags["daybreak.gate.override_reason"] == "none"
    with pytest.raises(GateError, match="reason is required"):
        evaluate_gate(s, ctx, override="promote", reason="  ")


def test_legacy_min_improvement_keeps_its_meaning(spec) -> None:
    from daybreak.infra.errors import SpecError
    from daybreak.spec import parse_spec

    raw = spec.model_dump(mode="json")
    for m, compare, margin in [(0.0, "no_worse", 0.0), (-0.01, "no_worse", 0.01), (0.02, "improve", 0.02)]:
        g = {k: v for k, v in raw["gate"].items() if k not in ("compare", "margin")} | {"min_improvement": m}
        s = parse_spec({**raw, "gate": g})
        assert (s.gate.compare, s.gate.margin) == (compare, margin)
    with pytest.raises(SpecError, match=r"gate: .*min_improvement"):
        parse_spec({**raw, "gate": {**raw["gate"], "min_improvement": 0.0}})


def test_blocking_data_check_stops_promotion(fresh: Path, spec) -> None:
    s = _gate(spec, compare="no_worse", margin=1.0, floor=0.0,
              data_checks=spec.gate.data_checks.model_copy(update={
                  "row_count": None,
                  "label_shift": spec.gate.data_checks.label_shift.model_copy(update={"max_shift": 1e-9,
                                                                                      "severity": "block"}),
                  "drift": spec.gate.data_checks.drift.model_copy(update={"max_psi": 1e-9, "severity": "warn"})}))
    run_cycle(s, _ctx("2013-01-02"), deploy=False)
    out = run_cycle(s, _ctx("2013-01-03"), deploy=False)
    gate = out["gate"]
    rules = {r["rule"]: r for r in gate["rules"]}
    assert gate["decision"] == BLOCKED, rules
    assert rules["label_shift"]["verdict"] == "fail" and rules["drift"]["verdict"] == "warn"
    assert all(r["verdict"] == "pass" for r in gate["rules"] if r["kind"] != "data")
    assert out["promote"] == {"step": "promote", "date": "2013-01-03", "promoted": False,
                              "reason": "gate decision is BLOCKED_BY_DATA", "candidate_version": "2",
                              "champion_version": "1"}


def test_too_few_holdout_rows_is_a_recorded_decision_and_the_cycle_goes_on(fresh: Path, spec) -> None:
    """A holdout under gate.min_rows used to raise (exit 2, now 3) and stop a backfill: it is now the
    decision INSUFFICIENT_DATA, recorded like any other, and nothing is promoted."""
    from daybreak.infra.audit import audit_events
    from daybreak.promote import model_history

    s = _gate(spec, min_rows=100_000)
    days = [run_cycle(s, _ctx(d), deploy=False) for d in ("2013-01-02", "2013-01-03")]
    for out in days:
        gate = out["gate"]
        assert gate["decision"] == INSUFFICIENT, gate
        rule = next(r for r in gate["rules"] if r["rule"] == "min_rows")
        assert rule["verdict"] == "fail" and "100000" in rule["detail"]
        assert out["promote"]["promoted"] is False and out["promote"]["champion_version"] is None
    history = model_history(s, _ctx("2013-01-03"))
    assert [r["decision"] for r in history] == [INSUFFICIENT, INSUFFICIENT]
    assert {e["event"] for e in audit_events(s, _ctx("2013-01-03"))} == {"insufficient_data"}


def _check_report_in_chromium(page: Path, titles: set[str]) -> None:
    """Open the report in headless Chromium: every expected plot is there and decoded."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed (make test installs it with apt)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            tab = browser.new_page()
            tab.goto(page.as_uri())
            images = tab.eval_on_selector_all(
                "figure img",
                "els => els.map(e => [e.alt, e.complete && e.naturalWidth > 100 && e.naturalHeight > 100])")
            shot = page.with_suffix(".png")
            tab.screenshot(path=str(shot), full_page=True)
            rules = tab.eval_on_selector_all("table.rules tbody tr", "rows => rows.length")
        finally:
            browser.close()
    assert titles <= {alt for alt, ok in images if ok}, images
    assert rules >= 5 and shot.stat().st_size > 10_000


def test_nan_predictions_are_rejected(spec) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(2000) < 0.3).astype(float)
    good = rng.random(2000) + 0.5 * y
    broken = good.copy()
    broken[::50] = np.nan  # ranks would still give a finite AUC
    out = judge(_gate(spec, floor=0.5), y, broken, None)
    rules = {r["rule"]: r for r in out["rules"]}
    assert rules["finite_predictions"]["verdict"] == "fail" and rules["finite_predictions"]["value"] == 40
    assert decide(out["rules"]) == REJECT
