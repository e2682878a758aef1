"""The train step: calendar windows and holdout, xgboost and scikit-learn, determinism, tuning on
Ray, and safe model files, against a real (sqlite) MLflow registry."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from daybreak.features import read_features
from daybreak.gate import evaluate_gate, holdout
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import SpecError
from daybreak.spec._model import TrainingSpec
from daybreak.train import train_model
from daybreak.train._fit import TrainData, fit_model, split_window
from daybreak.train._training import save_model


@pytest.fixture
def allow_pipelines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The factories in tests/pipelines.py are user code: an operator allows their module out of
    band (the environment, inherited by any subprocess), never the spec."""
    monkeypatch.setenv("DAYBREAK_ALLOWED_ESTIMATOR_MODULES", "pipelines")


def _with(spec, model: dict | None = None, training: dict | None = None):
    """The spec with some model and training fields replaced (and validated)."""
    return spec.model_copy(update={
        "model": type(spec.model).model_validate({**spec.model.model_dump(exclude_none=True), **(model or {})}),
        "training": type(spec.training).model_validate({**spec.training.model_dump(), **(training or {})})})


@pytest.mark.parametrize(("day", "window", "hold", "first", "last", "holdout_days"), [
    (date(2013, 3, 2), 7, 2, date(2013, 2, 22), date(2013, 2, 28), [date(2013, 3, 1), date(2013, 3, 2)]),
    (date(2024, 3, 1), 3, 1, date(2024, 2, 27), date(2024, 2, 29), [date(2024, 3, 1)]),  # leap day
    (date(2014, 1, 1), 2, 1, date(2013, 12, 30), date(2013, 12, 31), [date(2014, 1, 1)]),
])
def test_window_arithmetic(day, window, hold, first, last, holdout_days) -> None:
    t = TrainingSpec(window_days=window, holdout_days=hold)
    days = t.window(day)
    assert (days[0], days[-1], len(days)) == (first, last, window)
    assert t.holdout(day) == holdout_days
    assert not set(days) & set(holdout_days)
    assert all((b - a).days == 1 for a, b in zip([*days, *holdout_days], [*days, *holdout_days][1:], strict=False))


def test_missing_days_and_no_overlap(fresh: Path, spec) -> None:
    s = _with(spec, training={"window_days": 3, "holdout_days": 2, "min_rows": 10})
    ctx = RunContext.create("2013-01-03")
    out = train_model(s, ctx)
    # window 2012-12-30 .. 2013-01-01: only Jan 1 has features; the holdout is Jan 2 and 3
    assert out["status"] == "trained" and out["window"] == ["2012-12-30", "2013-01-01"]
    assert out["missing_days"] == ["2012-12-30", "2012-12-31"]
    mv = registry.client(ctx).get_model_version(s.model.name, out["model_version"])
    assert json.loads(mv.tags["daybreak.holdout"]) == ["2013-01-02", "2013-01-03"]
    assert list(json.loads(mv.tags["daybreak.input_hashes"])) == ["2013-01-01"]

    table, _, _ = read_features(s, ctx, s.training.window(ctx.logical_date))
    fit, val = (t.to_pandas() for t in split_window(table, s))
    hold = holdout(s, ctx)
    ident = ["event_time", *s.features.keys]
    rows = [set(map(tuple, x[ident].astype(str).to_numpy())) for x in (fit, val, hold)]
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]
    assert fit["event_time"].max() <= val["event_time"].min()  # validation comes after fitting in time
    assert hold["event_time"].min() > val["event_time"].max() - pd.Timedelta("1D")
    assert len(hold) > 1000  # two days of flights


def test_sklearn_estimators_train_register_and_gate(fresh: Path, spec, allow_pipelines) -> None:
    hgb = _with(spec, model={"flavor": "sklearn", "estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
                             "params": {"max_iter": 30}, "class_weight": "balanced"})
    ctx = RunContext.create("2013-01-02")
    out = train_model(hgb, ctx)
    assert out["status"] == "trained" and 0.5 < out["val_metric"] <= 1
    model = registry.load_model(ctx, hgb.model.name, out["model_version"])
    pred = model.predict(holdout(hgb, ctx)[hgb.features.feature_names()])
    assert ((pred >= 0) & (pred <= 1)).all() and len(np.unique(pred)) > 10
    gate = evaluate_gate(hgb, ctx)
    assert gate["candidate_metric"] > 0.5
    files = mlflow.artifacts.list_artifacts(run_id=out["run_id"])
    assert {"feature_importance.png", "feature_importance.json", "encoders.json"} <= {f.path for f in files}

    # a Pipeline from a factory function, with sample weights routed to its last step
    pipe = _with(spec, model={"flavor": "sklearn", "estimator": "pipelines.scaled_logistic",
                              "params": {"C": 0.5}, "class_weight": "balanced"})
    out = train_model(pipe, RunContext.create("2013-01-03"))
    assert out["status"] == "trained" and 0.5 < out["val_metric"] <= 1

    bad = _with(spec, model={"flavor": "sklearn", "estimator": "sklearn.ensemble.NoSuchForest"})
    with pytest.raises(SpecError, match=re.escape("model.estimator: cannot import 'sklearn.ensemble.NoSuchForest'")):
        train_model(bad, RunContext.create("2013-01-03"))


def test_regression_with_sklearn_and_xgboost(fresh: Path, spec) -> None:
    for model in ({"flavor": "sklearn", "task": "regression",
                   "estimator": "sklearn.ensemble.HistGradientBoostingRegressor", "params": {"max_iter": 20}},
                  {"task": "regression", "params": {"max_depth": 3}}):
        s = _with(spec, model=model).model_copy(
            update={"gate": spec.gate.model_copy(update={"metric": "rmse", "floor": None})})
        out = train_model(s, RunContext.create("2013-01-02"))
        assert out["status"] == "trained" and 0 < out["val_metric"] < 0.6, out  # rmse of a 0/1 label
        assert evaluate_gate(s, RunContext.create("2013-01-02"))["candidate_metric"] < 0.6


def _data(rng: np.random.Generator, n: int = 2000) -> TrainData:
    X = rng.normal(size=(n, 4)).astype(np.float32)
    X[rng.random((n, 4)) < 0.05] = np.nan
    y = (np.nan_to_num(X[:, 0]) + rng.normal(scale=0.5, size=n) > 0).astype(np.float32)
    return TrainData(X[:1500], y[:1500], X[1500:], y[1500:], None, ["a", "b", "c", "d"])


@pytest.mark.parametrize("model", [{"params": {"subsample": 0.8, "colsample_bytree": 0.8}},
                                   {"flavor": "sklearn", "estimator": "sklearn.ensemble.RandomForestClassifier",
                                    "params": {"n_estimators": 20, "max_features": 2}},
                                   {"flavor": "sklearn", "estimator": "pipelines.imputed_forest", "params": {}}])
def test_same_inputs_and_seed_give_the_same_model_bytes(spec, tmp_path: Path, model: dict,
                                                        allow_pipelines) -> None:
    s = _with(spec, model=model)
    data = _data(np.random.default_rng(0))
    paths = []
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        paths.append(save_model(fit_model(s, data), s, tmp_path / run)[0])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = _with(spec, model={**model, "seed": 1})
    (tmp_path / "seed1").mkdir()
    assert save_model(fit_model(other, data), other, tmp_path / "seed1")[0].read_bytes() != paths[0].read_bytes()


def test_tuning_runs_trials_on_ray_as_child_runs(fresh: Path, spec, ray_local) -> None:
    tuned = _with(spec, model={"tuning": {"space": {"max_depth": {"low": 2, "high": 6, "integer": True},
                                                    "eta": {"low": 0.05, "high": 0.4, "log": True}},
                                          "trials": 3, "time_budget_s": 300}})
    ctx = RunContext.create("2013-01-02")
    out = train_model(tuned, ctx)
    assert out["status"] == "trained" and out["trials"] == 3
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{out['run_id']}'",
                                  search_all_experiments=True, output_format="list")
    assert len(children) == 3
    metrics = [c.data.metrics["val_auc"] for c in children]
    depths = {c.data.params["max_depth"] for c in children}
    assert all(2 <= int(d) <= 6 for d in depths)
    parent = mlflow.get_run(out["run_id"])
    assert parent.data.metrics["val_auc"] == pytest.approx(max(metrics), abs=1e-9)  # the best, retrained
    assert parent.data.params["tuned.max_depth"] in depths


def test_skops_file_with_unrecorded_types_is_refused(spec, tmp_path: Path, allow_pipelines) -> None:
    from types import SimpleNamespace

    from daybreak.train.model_code import DaybreakModel

    s = _with(spec, model={"flavor": "sklearn", "estimator": "pipelines.scaled_logistic", "params": {}})
    path, meta = save_model(fit_model(s, _data(np.random.default_rng(1))), s, tmp_path)
    meta_path = tmp_path / "meta.json"
    ctx = SimpleNamespace(artifacts={"model": str(path), "meta": str(meta_path)}, model_config=None)
    meta_path.write_text(json.dumps({"features": ["a", "b", "c", "d"], "task": "classification", **meta}))
    m = DaybreakModel()
    m.load_context(ctx)  # the recorded types load
    meta_path.write_text(json.dumps({"features": ["a", "b", "c", "d"], "task": "classification",
                                     **meta, "trusted_types": []}))
    assert meta["trusted_types"]  # a Pipeline holds types beyond skops' defaults
    with pytest.raises(ValueError, match="types not recorded at training"):
        DaybreakModel().load_context(ctx)
    # the loader's configuration (daybreak passes the registry's record) wins over meta.json
    ctx.model_config = {"flavor": "sklearn", "trusted_types": meta["trusted_types"]}
    DaybreakModel().load_context(ctx)
    ctx.model_config = {"flavor": "sklearn", "trusted_types": []}
    meta_path.write_text(json.dumps({"features": ["a", "b", "c", "d"], "task": "classification", **meta}))
    with pytest.raises(ValueError, match="types not recorded at training"):
        DaybreakModel().load_context(ctx)


def test_many_models_route_each_row_with_a_fallback_for_unseen_keys(fresh: Path, spec, ray_local) -> None:
    from daybreak.train.model_code import encode

    s = _with(spec, model={"partition_by": ["origin_code"], "min_partition_rows": 100})
    ctx = RunContext.create("2013-01-02")
    out = train_model(s, ctx)
    assert out["status"] == "trained" and 0.5 < out["val_metric"] <= 1
    model = registry.load_model(ctx, s.model.name, out["model_version"])  # ONE version
    inner = model.unwrap_python_model()
    assert set(inner.models) == {"EWR", "JFK", "LGA"}
    rows = holdout(s, ctx)[s.features.feature_names()]
    pred = model.predict(rows)
    X = encode(rows, inner.features, inner.encoders)
    for key, m in inner.models.items():
        sel = (rows["origin_code"] == key).to_numpy()
        assert np.allclose(pred[sel], inner._predict(m, X[sel]))
        assert not np.allclose(pred[sel], inner._predict(inner.model, X[sel]))  # not the fallback's
    unseen = rows.head(25).assign(origin_code="SFO")
    fallback = inner._predict(inner.model, encode(unseen, inner.features, inner.encoders))
    assert np.allclose(model.predict(unseen), fallback)
    assert evaluate_gate(s, ctx)["candidate_metric"] > 0.5


def test_partition_by_must_name_a_feature(spec) -> None:
    from daybreak.spec import parse_spec

    raw = spec.model_dump(exclude_none=True)
    raw["model"]["partition_by"] = ["origin"]
    with pytest.raises(SpecError, match=re.escape("model.partition_by: 'origin' is not a feature")):
        parse_spec(raw)


def test_out_of_core_training_streams_a_window_bigger_than_the_budget(fresh: Path, spec,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import daybreak.train._outofcore as ooc

    monkeypatch.setattr(ooc, "BATCH_ROWS", 256)  # many batches, pages and resets
    day = RunContext.create("2013-01-03")
    in_memory = train_model(spec, day)
    assert in_memory["out_of_core"] is False
    s = _with(spec, training={"memory_budget_mb": 0.05}, model={"class_weight": "balanced"})
    assert ooc.estimated_bytes(s, in_memory["rows"]) > 5 * 0.05 * 2**20  # the data is over 5x the budget
    out = train_model(s, day)
    assert out["status"] == "trained" and out["out_of_core"] is True
    assert out["val_metric"] == pytest.approx(in_memory["val_metric"], abs=0.05)
    model = registry.load_model(day, s.model.name, out["model_version"])
    pred = model.predict(holdout(s, day)[s.features.feature_names()])
    assert ((pred > 0) & (pred < 1)).all()
    # sklearn cannot stream: a clear error, nothing registered
    sk = _with(s, model={"flavor": "sklearn", "estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
                         "params": {}})
    with pytest.raises(SpecError, match="out-of-core training is for single xgboost models"):
        train_model(sk, day)


def test_a_model_whose_files_changed_after_training_is_refused(fresh: Path, spec) -> None:
    ctx = RunContext.create("2013-01-02")
    out = train_model(spec, ctx)
    mv = registry.client(ctx).get_model_version(spec.model.name, out["model_version"])
    assert len(mv.tags[registry.MODEL_DIGEST_TAG]) == 64
    registry.load_model(ctx, spec.model.name, out["model_version"])  # as trained: loads
    metas = list(fresh.rglob("artifacts/artifacts/meta.json"))
    assert len(metas) == 1
    meta = json.loads(metas[0].read_text())
    meta["trusted_types"] = ["builtins.eval"]  # what swapping in another model would need
    metas[0].write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="differ from what training recorded"):
        registry.load_model(ctx, spec.model.name, out["model_version"])
