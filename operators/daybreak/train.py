"""Train: the look-back window of feature partitions -> an xgboost model version in the registry.

For logical date D the training window is the ``training.window_days`` days before D; day D is
held out for the gate. Rows are put in time order; the last ``validation_fraction`` of them is
the early-stopping set. A rerun for the same lineage (spec, input hashes, date) returns the
version already registered instead of registering a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daybreak import registry
from daybreak.context import RunContext
from daybreak.features import EVENT_TIME, read_features
from daybreak.model_code import encode, encoded_names
from daybreak.spec import Spec

log = logging.getLogger(__name__)

MODEL_CODE = str(Path(__file__).with_name("model_code.py"))


def training_days(spec: Spec, ctx: RunContext) -> list:
    d = ctx.logical_date
    return [d - timedelta(days=k) for k in range(spec.training.window_days, 0, -1)]


def fit_encoders(frame: pd.DataFrame, spec: Spec) -> dict[str, dict[str, Any]]:
    """Fit each column's encoder on the training rows only (never validation or holdout rows),
    deterministically: categories sorted, ties in frequency broken by value."""
    fitted: dict[str, dict[str, Any]] = {}
    for name, enc in spec.features.encoders().items():
        col = frame[name]
        if enc["kind"] == "quantile":
            values = pd.to_numeric(col, errors="coerce").dropna().to_numpy(dtype=np.float64)
            qs = np.quantile(values, np.linspace(0, 1, enc["bins"] + 1)[1:-1]) if len(values) else np.array([])
            fitted[name] = {"kind": "quantile", "edges": [float(x) for x in np.unique(qs)]}
            continue
        counts = col.dropna().astype(str).value_counts()
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if enc.get("max_categories"):
            ranked = ranked[: enc["max_categories"]]
        cats = sorted(k for k, _ in ranked)
        fitted[name] = {"kind": enc["kind"], "categories": cats}
        if enc["kind"] == "frequency":
            total = max(1, int(col.notna().sum()))
            fitted[name]["frequencies"] = [float(counts[c]) / total for c in cats]
    return fitted


def _xgb_params(spec: Spec) -> dict[str, Any]:
    m = spec.model
    defaults: dict[str, Any] = {"tree_method": "hist", "seed": m.seed}
    if m.task == "classification":
        defaults |= {"objective": "binary:logistic", "eval_metric": "auc"}
    else:
        defaults |= {"objective": "reg:squarederror", "eval_metric": "rmse"}
    return defaults | dict(m.params)


def train_model(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    import mlflow
    import xgboost as xgb

    f = spec.features
    days = training_days(spec, ctx)
    table, hashes, missing = read_features(spec, ctx, days)
    base = {"step": "train", "date": ctx.logical_date.isoformat(), "window": [days[0].isoformat(), days[-1].isoformat()],
            "missing_days": missing}
    rows = 0 if table is None else table.num_rows
    if rows < spec.training.min_rows:
        log.warning("train %s: %d rows in the window (< training.min_rows=%d); no model trained",
                    ctx.logical_date, rows, spec.training.min_rows)
        return base | {"status": "skipped", "reason": f"{rows} training rows < training.min_rows={spec.training.min_rows}",
                       "rows": rows, "model_version": None}

    lineage = {"spec_hash": spec.spec_hash(), "feature_version": spec.feature_version(), "inputs": hashes,
               "date": ctx.logical_date.isoformat()}
    lineage_key = hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    existing = registry.versions(cl, spec.model.name, {registry.LINEAGE_TAG: lineage_key})
    if existing:
        mv = existing[-1]
        log.info("train %s: version %s already registered for this lineage", ctx.logical_date, str(mv.version))
        return base | {"status": "exists", "rows": rows, "model_version": str(mv.version), "run_id": mv.run_id,
                       "lineage_key": lineage_key, "val_metric": _float(mv.tags.get("daybreak.val_metric"))}

    df = table.to_pandas()
    df = df.sort_values([EVENT_TIME, *f.keys], kind="stable").reset_index(drop=True)
    n_val = max(1, int(len(df) * spec.training.validation_fraction))
    fit, val = df.iloc[:-n_val], df.iloc[-n_val:]
    features = f.feature_names()
    encoders = fit_encoders(fit, spec)
    label = f.label.name
    X_fit, X_val = encode(fit, features, encoders), encode(val, features, encoders)
    y_fit, y_val = fit[label].to_numpy(np.float32), val[label].to_numpy(np.float32)
    model_inputs = encoded_names(features, encoders)
    dfit = xgb.QuantileDMatrix(X_fit, y_fit, feature_names=model_inputs, missing=np.nan)
    dval = xgb.QuantileDMatrix(X_val, y_val, feature_names=model_inputs, missing=np.nan, ref=dfit)
    params = _xgb_params(spec)
    evals_result: dict[str, Any] = {}
    booster = xgb.train(params, dfit, num_boost_round=spec.model.num_boost_round, evals=[(dval, "val")],
                        early_stopping_rounds=spec.model.early_stopping_rounds, evals_result=evals_result,
                        verbose_eval=False)
    metric_name = params["eval_metric"]
    val_metric = float(evals_result["val"][metric_name][booster.best_iteration])
    booster = booster[: booster.best_iteration + 1]

    tags = {
        registry.DATE_TAG: ctx.logical_date.isoformat(),
        registry.SPEC_TAG: spec.spec_hash(),
        registry.LINEAGE_TAG: lineage_key,
        "daybreak.window_start": days[0].isoformat(),
        "daybreak.window_end": days[-1].isoformat(),
        "daybreak.input_hashes": json.dumps(hashes, sort_keys=True),
        "daybreak.feature_version": spec.feature_version(),
        "daybreak.code_version": registry.code_version(),
        "daybreak.train_rows": str(len(fit)),
        "daybreak.val_metric": repr(val_metric),
        "daybreak.run_context": ctx.run_id,
    }
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"train-{ctx.logical_date}") as run:
        model_path = Path(tmp) / "model.ubj"
        booster.save_model(model_path)
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps({"features": features, "encoders": encoders, "task": spec.model.task,
                                         "label": label}, indent=2))
        mlflow.log_params({"window_days": spec.training.window_days, "rows_fit": len(fit), "rows_val": len(val),
                           "best_iteration": booster.num_boosted_rounds(),
                           **{f"xgb.{k}": v for k, v in params.items()}})
        mlflow.log_metric(f"val_{metric_name}", val_metric)
        mlflow.set_tags(tags)
        importance = booster.get_score(importance_type="gain")
        mlflow.log_dict({k: importance.get(k, 0.0) for k in model_inputs}, "feature_importance.json")
        mlflow.log_dict(encoders, "encoders.json")
        example = fit[features].head(5)
        signature = _signature(features, set(f.categorical_names()))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=MODEL_CODE, artifacts={"model": str(model_path), "meta": str(meta_path)},
            signature=signature, input_example=example, registered_model_name=spec.model.name,
            pip_requirements=[f"xgboost=={xgb.__version__}", f"mlflow=={mlflow.__version__}",
                              f"pandas=={pd.__version__}", f"numpy=={np.__version__}"],
        )
        version = str(info.registered_model_version)
    registry.set_tags(cl, spec.model.name, version, tags)
    log.info("train %s: registered %s version %s (val %s=%.4f, %d rows)", ctx.logical_date, spec.model.name,
             version, metric_name, val_metric, len(fit))
    return base | {"status": "trained", "rows": rows, "model_version": version, "run_id": run.info.run_id,
                   "lineage_key": lineage_key, "val_metric": val_metric}


def _signature(features: list[str], categorical: set[str]) -> Any:
    """Every input optional: any feature may be missing for a row (no plane record, no recent
    flights), and the model handles missing values itself."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string" if n in categorical else "double", n, required=False) for n in features])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double")]))


def _float(v: str | None) -> float | None:
    return None if v is None else float(v)
