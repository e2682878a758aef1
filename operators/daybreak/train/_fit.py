"""Fitting a model on a window of features: encoders, the estimator (xgboost or scikit-learn),
early stopping, partitioned models. Pure compute: no store, no registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from daybreak.features import EVENT_TIME
from daybreak.infra.context import RunContext
from daybreak.infra.errors import SpecError
from daybreak.spec import Spec, build_estimator, xgb_params
from daybreak.train.model_code import column, predict_matrix

log = logging.getLogger(__name__)

def fit_encoders(frame: Any, spec: Spec) -> dict[str, dict[str, Any]]:
    """Fit each column's encoder on the training rows only (never validation or holdout rows),
    deterministically: categories sorted, ties in frequency broken by value. `frame`: a DataFrame
    or an Arrow table."""
    stats = {name: encoder_stats(column(frame, name), enc) for name, enc in spec.features.encoders().items()}
    return encoders_from_stats(spec, stats)


def encoder_stats(col: pd.Series, enc: dict[str, Any]) -> Any:
    """What fitting an encoder needs from some rows: category counts, or the numbers to bin.
    Stats of successive batches combine with ``merge_stats``."""
    if enc["kind"] == "quantile":
        return pd.to_numeric(col, errors="coerce").dropna().to_numpy(dtype=np.float64)
    return col.dropna().astype(str).value_counts()


def merge_stats(a: Any, b: Any) -> Any:
    if isinstance(a, np.ndarray):
        return np.concatenate([a, b])
    return a.add(b, fill_value=0)


def encoders_from_stats(spec: Spec, stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fitted: dict[str, dict[str, Any]] = {}
    for name, enc in spec.features.encoders().items():
        st = stats[name]
        if enc["kind"] == "quantile":
            qs = np.quantile(st, np.linspace(0, 1, enc["bins"] + 1)[1:-1]) if len(st) else np.array([])
            fitted[name] = {"kind": "quantile", "edges": [float(x) for x in np.unique(qs)]}
            continue
        ranked = sorted(st.items(), key=lambda kv: (-kv[1], kv[0]))
        if enc.get("max_categories"):
            ranked = ranked[: enc["max_categories"]]
        cats = sorted(k for k, _ in ranked)
        fitted[name] = {"kind": enc["kind"], "categories": cats}
        if enc["kind"] == "frequency":
            total = max(1.0, float(st.sum()))
            fitted[name]["frequencies"] = [float(st[c]) / total for c in cats]
    return fitted


def split_window(table: Any, spec: Spec) -> tuple[Any, Any]:
    """(fit rows, validation rows) as Arrow tables: in time order, the last
    ``validation_fraction`` validates. The window never becomes one DataFrame."""
    table = table.sort_by([(c, "ascending") for c in [EVENT_TIME, *spec.features.keys]])
    n_val = max(1, int(table.num_rows * spec.training.validation_fraction))
    return table.slice(0, table.num_rows - n_val), table.slice(table.num_rows - n_val)


def label_array(table: Any, spec: Spec) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.cast(table.column(spec.features.label.name), pa.float32()).to_numpy(zero_copy_only=False)


def _xgb_params(spec: Spec) -> dict[str, Any]:
    return xgb_params(spec.model)


@dataclass
class Fitted:
    """A trained estimator and what MLflow records about it."""
    model: Any
    metric_name: str
    val_metric: float
    params: dict[str, Any]
    importance: dict[str, float]


@dataclass
class TrainData:
    X_fit: np.ndarray
    y_fit: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    weight: np.ndarray | None
    names: list[str]


def sample_weight(spec: Spec, y: np.ndarray) -> np.ndarray | None:
    """``class_weight: balanced``: each class weighs n / (classes * its count) on the fit rows."""
    if spec.model.class_weight != "balanced":
        return None
    from sklearn.utils.class_weight import compute_sample_weight

    return compute_sample_weight("balanced", y).astype(np.float32)


def fit_model(spec: Spec, data: TrainData, overrides: dict[str, Any] | None = None) -> Fitted:
    """Train the spec's estimator (with `overrides` on top of its params) and score it on the
    validation rows. Deterministic: the same data, params and seed give the same model bytes."""
    if spec.model.flavor == "xgboost":
        return _fit_xgb(spec, data, overrides or {})
    return _fit_sklearn(spec, data, overrides or {})


def _fit_xgb(spec: Spec, data: TrainData, overrides: dict[str, Any]) -> Fitted:
    import xgboost as xgb

    max_bin = int((dict(spec.model.params) | overrides).get("max_bin", 256))  # the matrix and training must agree
    dfit = xgb.QuantileDMatrix(data.X_fit, data.y_fit, weight=data.weight, feature_names=data.names, missing=np.nan,
                               max_bin=max_bin)
    dval = xgb.QuantileDMatrix(data.X_val, data.y_val, feature_names=data.names, missing=np.nan, ref=dfit)
    return train_booster(spec, dfit, dval, overrides, data.names)


def train_booster(spec: Spec, dfit: Any, dval: Any, overrides: dict[str, Any], names: list[str],
                  extra: dict[str, Any] | None = None) -> Fitted:
    """xgb.train with early stopping on `dval`, cut back to the best iteration."""
    import xgboost as xgb

    params = _xgb_params(spec) | overrides
    params.setdefault("nthread", 0)
    rounds = int(params.pop("num_boost_round", spec.model.num_boost_round))
    evals_result: dict[str, Any] = {}
    booster = xgb.train(params, dfit, num_boost_round=rounds, evals=[(dval, "val")],
                        early_stopping_rounds=spec.model.early_stopping_rounds, evals_result=evals_result,
                        verbose_eval=False)
    metric_name = params["eval_metric"]
    val_metric = float(evals_result["val"][metric_name][booster.best_iteration])
    booster = booster[: booster.best_iteration + 1]
    importance = booster.get_score(importance_type="gain")
    return Fitted(booster, metric_name, val_metric,
                  {"best_iteration": booster.num_boosted_rounds(), **(extra or {}),
                   **{f"xgb.{k}": v for k, v in params.items()}},
                  {k: _gain(importance.get(k, 0.0)) for k in names})


def _gain(v: float | list[float]) -> float:
    """A feature's gain from ``Booster.get_score``: one number for the single-output models daybreak
    trains (xgboost lists one per target only for vector-leaf trees)."""
    if isinstance(v, list):
        raise TypeError(f"expected one gain per feature, got {len(v)} (a multi-output model?)")
    return float(v)


def _fit_sklearn(spec: Spec, data: TrainData, overrides: dict[str, Any]) -> Fitted:
    from sklearn.pipeline import Pipeline

    from daybreak.infra.metrics import evaluate

    classification = spec.model.task == "classification"
    if classification:
        for rows, y in (("fit", data.y_fit), ("validation", data.y_val)):
            if len(np.unique(y)) < 2:
                raise ValueError(f"train: the {rows} rows hold one class only ({np.unique(y).tolist()}); "
                                 "a classifier needs both")
    est = build_estimator(spec, overrides)
    fit_kw: dict[str, Any] = {}
    if data.weight is not None:
        key = f"{est.steps[-1][0]}__sample_weight" if isinstance(est, Pipeline) else "sample_weight"
        fit_kw[key] = data.weight
    est.fit(data.X_fit, data.y_fit, **fit_kw)
    pred = predict_matrix(est, data.X_val, spec.model.flavor, spec.model.task, data.names)
    metric_name = "auc" if classification else "rmse"
    val_metric = evaluate(_METRIC[metric_name], data.y_val, pred)
    final = est.steps[-1][1] if isinstance(est, Pipeline) else est
    raw = getattr(final, "feature_importances_", None)
    if raw is None and getattr(final, "coef_", None) is not None:
        raw = np.abs(np.ravel(final.coef_))
    if raw is None or len(raw) != len(data.names):
        # no native importance (HistGradientBoosting, most Pipelines): permutation importance
        # on (at most 5,000) validation rows
        from sklearn.inspection import permutation_importance

        n = min(len(data.y_val), 5000)
        raw = permutation_importance(est, data.X_val[:n], data.y_val[:n], n_repeats=3, random_state=spec.model.seed,
                                     scoring="roc_auc" if classification else "neg_root_mean_squared_error"
                                     ).importances_mean
    importance = {n: float(v) for n, v in zip(data.names, raw, strict=False)}
    params = {f"sklearn.{k}": v for k, v in est.get_params(deep=False).items() if not hasattr(v, "get_params")}
    return Fitted(est, metric_name, val_metric, {"estimator": spec.model.estimator, **params}, importance)


_METRIC = {"auc": "roc_auc", "rmse": "rmse", "logloss": "log_loss", "mae": "mae"}


def fit_many(spec: Spec, fit: Any, val: Any, data: TrainData, overrides: dict[str, Any],
             ctx: RunContext) -> Fitted:
    """One model per value of ``model.partition_by``, trained in parallel on Ray, plus a fallback
    trained on every row for keys that are unseen or too small. The validation metric is that of
    the routed predictions, as served."""
    import ray

    from daybreak.infra.compute import ensure_ray
    from daybreak.infra.metrics import evaluate
    from daybreak.train.model_code import partition_keys

    by = spec.model.partition_by
    metric = _xgb_params(spec).get("eval_metric") if spec.model.flavor == "xgboost" else "auc"
    if spec.model.flavor == "xgboost" and metric not in _METRIC:
        raise SpecError(f"model.partition_by: the routed validation metric must be one of {sorted(_METRIC)}, "
                        f"not eval_metric={metric!r}")
    k_fit, k_val = partition_keys(fit.select(by).to_pandas(), by), partition_keys(val.select(by).to_pandas(), by)
    ensure_ray(ctx.ray_address)
    remote = ray.remote(num_cpus=1)(fit_model)
    per_task = overrides | ({"nthread": 1} if spec.model.flavor == "xgboost" else {})
    jobs: dict[str, Any] = {}
    for key in sorted(set(k_fit)):
        fr, vr = k_fit == key, k_val == key
        enough = fr.sum() >= spec.model.min_partition_rows and vr.sum() >= 2
        if enough and spec.model.task == "classification":  # both classes, or no AUC/early stopping
            enough = len(np.unique(data.y_fit[fr])) == 2 and len(np.unique(data.y_val[vr])) == 2
        if enough:
            part = TrainData(data.X_fit[fr], data.y_fit[fr], data.X_val[vr], data.y_val[vr],
                             sample_weight(spec, data.y_fit[fr]), data.names)  # balanced within the partition
            jobs[key] = remote.remote(spec, part, per_task)
    fallback = fit_model(spec, data, overrides)
    models = dict(zip(jobs, ray.get(list(jobs.values())), strict=False))
    log.info("train: %d partition model(s) by %s and a fallback (%d key(s) use it)", len(models), by,
             len(set(k_fit)) - len(models))
    pred = np.empty(len(data.y_val))
    for key in np.unique(k_val):
        rows = k_val == key
        pred[rows] = predict_matrix(models.get(key, fallback).model, data.X_val[rows], spec.model.flavor,
                                    spec.model.task, data.names)
    val_metric = evaluate(_METRIC[fallback.metric_name], data.y_val, pred)
    return Fitted({"fallback": fallback, "partitions": models}, fallback.metric_name, val_metric,
                  {**fallback.params, "partition_by": ",".join(by), "partitions": len(models)}, fallback.importance)
