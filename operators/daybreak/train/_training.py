"""Train: the look-back window of feature partitions -> an xgboost model version in the registry.

For logical date D the holdout is the ``training.holdout_days`` days ending at D (the gate scores
on them) and the training window the ``training.window_days`` calendar days before the holdout.
Rows are put in time order; the last ``validation_fraction`` of them is the validation set
(early stopping, tuning). The estimator is xgboost, or any scikit-learn estimator named by
import path (saved with skops, never as a pickle). With ``model.tuning``, trials run in parallel
on Ray and the best parameters are trained and registered. A rerun for the same lineage (spec,
input hashes, date) returns the version already registered instead of registering a duplicate;
two runs that train the same lineage at once register one version (the check and the registration
happen under the model's registry lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pandas as pd

from daybreak.features import mature_rows, read_features
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import SpecError
from daybreak.infra.records import Lineage, Tag
from daybreak.spec import Spec
from daybreak.train._fit import (
    Fitted,
    TrainData,
    fit_encoders,
    fit_many,
    fit_model,
    label_array,
    sample_weight,
    split_window,
)
from daybreak.train.model_code import encode, encoded_names
from daybreak.train.native import PyfuncWithNative, native_flavor

log = logging.getLogger(__name__)

MODEL_CODE = str(Path(__file__).with_name("model_code.py"))


def save_model(fitted: Fitted, spec: Spec, folder: Path) -> tuple[Path, dict[str, Any]]:
    """Write the model in a safe format; return its path and what meta.json must add. A
    many-model version is a folder: one file per partition and the fallback."""
    if isinstance(fitted.model, dict):
        root = folder / "models"
        root.mkdir()
        meta: dict[str, Any] = {"partition_by": spec.model.partition_by, "partitions": {}, "trusted_types": []}
        items = [("fallback", fitted.model["fallback"]),
                 *[(f"p{i}", f) for i, f in enumerate(fitted.model["partitions"].values())]]
        for (stem, f), key in zip(items, [None, *fitted.model["partitions"]], strict=False):
            path, m = _save_one(f.model, spec, root, stem)
            if key is None:
                meta["fallback"] = path.name
            else:
                meta["partitions"][key] = path.name
            meta["trusted_types"] = sorted(set(meta["trusted_types"]) | set(m.get("trusted_types", [])))
            meta["flavor"] = m["flavor"]
        return root, meta
    return _save_one(fitted.model, spec, folder, "model")


def _save_one(model: Any, spec: Spec, folder: Path, stem: str) -> tuple[Path, dict[str, Any]]:
    if spec.model.flavor == "xgboost":
        path = folder / f"{stem}.ubj"
        model.save_model(path)
        return path, {"flavor": "xgboost"}
    import skops.io as sio

    path = folder / f"{stem}.skops"
    path.write_bytes(_canonical_skops(sio.dumps(model)))
    # The types the loader may trust: exactly those this file holds, recorded beside it in the
    # registry, so a file swapped in later with other types is refused.
    return path, {"flavor": "sklearn", "trusted_types": sorted(sio.get_untrusted_types(file=path))}


def _canonical_skops(data: bytes) -> bytes:
    """The same skops file with reproducible bytes: skops names arrays and references objects by
    their memory address (``id()``) and stamps entries with the time; number them in order of
    appearance instead, and stamp every entry 1980-01-01."""
    import io
    import re
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    schema = src.read("schema.json").decode()
    ids = set(re.findall(r'"__id__": (\d+)', schema)) | set(re.findall(r'"file": "(\d+)\.npy"', schema))
    order: dict[str, str] = {}
    for m in re.finditer(r"\d+", schema):
        if m.group() in ids and m.group() not in order:
            order[m.group()] = str(len(order) + 1)
    schema = re.sub(r"\d+", lambda m: order.get(m.group(), m.group()), schema)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        entries = {"schema.json": schema.encode()}
        for info in src.infolist():
            if info.filename != "schema.json":
                stem, dot, ext = info.filename.partition(".")
                entries[f"{order.get(stem, stem)}{dot}{ext}"] = src.read(info)
        for name in sorted(entries):
            dst.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), entries[name])
    return out.getvalue()


def _importance_plot(importance: dict[str, float], path: Path) -> bool:
    if not importance:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = sorted(importance.items(), key=lambda kv: kv[1], reverse=True)[:20][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(top) + 1.2))
    ax.barh([k for k, _ in top], [v for _, v in top])
    ax.set_xlabel("importance")
    ax.set_title("feature importance (top 20)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _lineage_key(spec: Spec, ctx: RunContext, hashes: dict[str, str]) -> str:
    lineage = {"spec_hash": spec.spec_hash(), "feature_version": spec.feature_version(), "inputs": hashes,
               "date": ctx.logical_date.isoformat()}
    return hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]


def recorded_lineage(spec: Spec, ctx: RunContext) -> tuple[str, str] | None:
    """(lineage key, version) of the date's registered candidate for the feature partitions as they
    are now (the newest, as ``train_model`` picks); None when there is none."""
    from daybreak.train._outofcore import window_files

    days, _ = training_days(spec, ctx)
    _, rows = window_files(spec, ctx, days)
    if rows < spec.training.min_rows:
        return None
    _, hashes, _ = read_features(spec, ctx, days, load=False)
    key = _lineage_key(spec, ctx, hashes)
    existing = registry.versions(registry.client(ctx), spec.model.name, {registry.LINEAGE_TAG: key})
    return (key, str(existing[0].version)) if existing else None


def training_days(spec: Spec, ctx: RunContext) -> tuple[list[date], list[str]]:
    """The training window's days to read, and those left out because their feature partition
    was built without the history its windows need (``missing_history``, unless
    ``training.incomplete_history`` is 'include')."""
    from daybreak.features import feature_zone

    days = spec.train_days(ctx.logical_date)
    if spec.training.incomplete_history == "include":
        return days, []
    kept, left_out = [], []
    for d in days:
        part = ctx.store.partition(feature_zone(spec), d)
        if part is not None and part.manifest.get("missing_history"):
            left_out.append(d.isoformat())
        else:
            kept.append(d)
    return kept, left_out


class TrainResult(TypedDict, total=False):
    """What ``train_model`` returns (and the orchestrators pass on)."""

    step: str
    date: str
    window: list[str]
    missing_days: list[str]
    incomplete_days: list[str]  # left out: built without their windows' full history
    immature_rows: int  # left out: labels known only after the date
    out_of_core: bool
    status: str  # trained | exists | skipped
    reason: str
    rows: int
    model_version: str | None
    run_id: str
    lineage_key: str
    val_metric: float | None
    trials: int
    forced: bool
    discarded_run_id: str


@dataclass
class Trained:
    """A fitted candidate and what publishing it needs."""

    fitted: Fitted
    encoders: dict[str, dict[str, Any]]
    names: list[str]  # encoded feature names, as the model sees them
    n_fit: int
    n_val: int
    example: Any  # a few raw rows: the model's input example
    trials: list[dict[str, Any]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)  # tuned parameters
    label_mean: float | None = None  # of the fit rows (the gate's prior baseline); None out of core


def train_model(spec: Spec, ctx: RunContext, force: bool = False) -> TrainResult:
    """Train the date's candidate; with the same lineage already registered, return that version.

    ``force`` trains and registers a new version even then (the newest is the date's candidate the
    gate sees); a person asked for it, e.g. after changing something the lineage does not cover.
    Load the window, fit (``fit_window``, or streamed out of core), publish (``publish``).
    """
    from daybreak.train._outofcore import estimated_bytes, window_files

    window = spec.train_days(ctx.logical_date)
    days, incomplete = training_days(spec, ctx)
    files, rows = window_files(spec, ctx, days)
    budget = spec.training.memory_budget_mb
    out_of_core = budget is not None and estimated_bytes(spec, rows) > budget * 2**20
    if out_of_core and (spec.model.flavor != "xgboost" or spec.model.partition_by or spec.model.tuning):
        raise SpecError(f"train {ctx.logical_date}: the window ({rows} rows) exceeds training.memory_budget_mb="
                        f"{budget}, and out-of-core training is for single xgboost models without tuning")
    if out_of_core and spec.features.label.known_at is not None:
        raise SpecError(f"train {ctx.logical_date}: the window ({rows} rows) exceeds training.memory_budget_mb="
                        f"{budget}, and out-of-core training does not yet leave out immature labels "
                        "(features.label.known_at): raise the budget")
    table, hashes, missing = read_features(spec, ctx, days, load=not out_of_core)
    table, immature = mature_rows(spec, table, ctx.logical_date)
    if table is not None and immature:
        rows = table.num_rows
        log.info("train %s: %d row(s) left out: their labels are known only after %s (features.label.known_at)",
                 ctx.logical_date, immature, spec.label_cut(ctx.logical_date).isoformat())
    if incomplete:
        log.warning("train %s: left out day(s) %s: their windows lacked staged history (missing_history); "
                    "stage those days and rebuild their features to train on them", ctx.logical_date, incomplete)
    base: TrainResult = {"step": "train", "date": ctx.logical_date.isoformat(),
                         "window": [window[0].isoformat(), window[-1].isoformat()],
                         "missing_days": missing,
                         "incomplete_days": incomplete, "immature_rows": immature, "out_of_core": out_of_core}
    if rows < spec.training.min_rows:
        log.warning("train %s: %d rows in the window (< training.min_rows=%d); no model trained",
                    ctx.logical_date, rows, spec.training.min_rows)
        return base | {"status": "skipped",
                       "reason": f"{rows} training rows < training.min_rows={spec.training.min_rows}",
                       "rows": rows, "model_version": None}

    lineage_key = _lineage_key(spec, ctx, hashes)
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    existing = registry.versions(cl, spec.model.name, {registry.LINEAGE_TAG: lineage_key})
    if existing and force:
        log.warning("train %s: retraining although version %s has this lineage (force)", ctx.logical_date,
                    str(existing[0].version))
    elif existing:
        mv = existing[0]  # newest: after a forced retrain, the one candidate_for picks
        log.info("train %s: version %s already registered for this lineage", ctx.logical_date, str(mv.version))
        return base | {"status": "exists", "rows": rows, "model_version": str(mv.version), "run_id": mv.run_id,
                       "lineage_key": lineage_key, "val_metric": _float(mv.tags.get(Tag.VAL_METRIC))}

    if out_of_core:
        from daybreak.train._outofcore import first_rows, fit_out_of_core

        fitted, encoders, n_fit, n_val = fit_out_of_core(spec, ctx, files, rows, {})
        features = spec.features.feature_names()
        trained = Trained(fitted, encoders, encoded_names(features, encoders), n_fit, n_val,
                          first_rows(files, ctx.store.fs, features, 5))
    else:
        trained = fit_window(spec, table, ctx)
        del table
    lineage = Lineage(
        logical_date=ctx.logical_date.isoformat(), spec_hash=spec.spec_hash(), lineage_key=lineage_key,
        window_start=window[0].isoformat(), window_end=window[-1].isoformat(),
        holdout=[d.isoformat() for d in spec.holdout_days(ctx.logical_date)],
        input_hashes=input_hashes_tag(hashes), feature_version=spec.feature_version(),
        code_version=registry.code_version(), flavor=spec.model.flavor, train_rows=trained.n_fit,
        val_metric=trained.fitted.val_metric, run_context=ctx.run_id, forced=force, label_mean=trained.label_mean)
    mv, registered, run_id = publish(spec, ctx, cl, trained, lineage, hashes)
    version = str(mv.version)
    if not registered:
        log.warning("train %s: another run registered version %s for this lineage while this one trained; "
                    "keeping it (this run %s is a discarded duplicate)", ctx.logical_date, version, run_id)
        return base | {"status": "exists", "rows": rows, "model_version": version, "run_id": mv.run_id,
                       "lineage_key": lineage_key, "val_metric": _float(mv.tags.get(Tag.VAL_METRIC)),
                       "discarded_run_id": run_id}
    log.info("train %s: registered %s version %s (val %s=%.4f, %d rows)", ctx.logical_date, spec.model.name,
             version, trained.fitted.metric_name, trained.fitted.val_metric, trained.n_fit)
    return base | {"status": "trained", "rows": rows, "model_version": version, "run_id": run_id,
                   "lineage_key": lineage_key, "val_metric": trained.fitted.val_metric,
                   "trials": len(trained.trials), "forced": force}


def fit_window(spec: Spec, table: Any, ctx: RunContext | None = None) -> Trained:
    """Fit the candidate on a loaded window (an Arrow table of features): split, encoders fitted on
    the training rows only, tuning and partitioned models (on Ray, through ``ctx``) when the spec
    asks. No store or registry."""
    features = spec.features.feature_names()
    fit, val = split_window(table, spec)
    encoders = fit_encoders(fit, spec)
    y_fit = label_array(fit, spec)
    data = TrainData(encode(fit, features, encoders), y_fit, encode(val, features, encoders),
                     label_array(val, spec), sample_weight(spec, y_fit), encoded_names(features, encoders))
    trials: list[dict[str, Any]] = []
    overrides: dict[str, Any] = {}
    if spec.model.tuning is not None:
        from daybreak.train._tuning import tune

        overrides, trials = tune(spec, data, _need(ctx, "tuning"))
    if spec.model.partition_by:
        fitted = fit_many(spec, fit, val, data, overrides, _need(ctx, "partition_by"))
    else:
        fitted = fit_model(spec, data, overrides)
    return Trained(fitted, encoders, data.names, fit.num_rows, val.num_rows,
                   fit.slice(0, 5).select(features).to_pandas(), trials, overrides,
                   float(np.mean(y_fit)) if len(y_fit) else None)


def _need(ctx: RunContext | None, what: str) -> RunContext:
    if ctx is None:
        raise ValueError(f"fit_window: model.{what} runs on Ray and needs the run context")
    return ctx


def publish(spec: Spec, ctx: RunContext, cl: Any, trained: Trained, lineage: Lineage,
            hashes: dict[str, Any]) -> tuple[Any, bool, str]:
    """Log the training run (params, metrics, importance, encoders, the model with its sealed
    digest) and register the version with its lineage. (version, whether this run registered it,
    this run's id)."""
    import mlflow
    from mlflow.models import Model

    f, fitted, trials = spec.features, trained.fitted, trained.trials
    features, metric_name = f.feature_names(), fitted.metric_name
    tags = lineage.to_tags()
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"train-{lineage.logical_date}") as run:
        for i, t in enumerate(trials):  # one child run per tuning trial
            with mlflow.start_run(run_name=f"trial-{i}", nested=True):
                mlflow.log_params(t["params"])
                mlflow.set_tag(Tag.TRIAL_STATUS, t["status"])
                if t.get("val_metric") is not None:
                    mlflow.log_metric(f"val_{metric_name}", t["val_metric"])
        model_path, flavor_meta = save_model(fitted, spec, Path(tmp))
        meta_path = Path(tmp) / "meta.json"
        meta_path.write_text(json.dumps({"features": features, "encoders": trained.encoders, "task": spec.model.task,
                                         "label": f.label.name, **flavor_meta}, indent=2))
        mlflow.log_params({"window_days": spec.training.window_days, "holdout_days": spec.training.holdout_days,
                           "rows_fit": trained.n_fit, "rows_val": trained.n_val,
                           "class_weight": spec.model.class_weight,
                           **({"tuning.trials": len(trials), **{f"tuned.{k}": v for k, v in trained.overrides.items()}}
                              if trials else {}),
                           **fitted.params})
        mlflow.log_metric(f"val_{metric_name}", fitted.val_metric)
        mlflow.set_tags(tags)
        mlflow.log_dict({k: fitted.importance.get(k, 0.0) for k in trained.names}, "feature_importance.json")
        if _importance_plot(fitted.importance, Path(tmp) / "feature_importance.png"):
            mlflow.log_artifact(str(Path(tmp) / "feature_importance.png"))
        mlflow.log_dict(trained.encoders, "encoders.json")
        mlflow.log_dict(hashes, INPUT_HASHES_ARTIFACT)  # in full; the tag may only say where
        signature = _signature(features, set(f.categorical_names()))
        # The loader's configuration, logged so that the registry's copy can replace it at load
        # (MLflow only overrides keys the logged model_config has).
        loader = {"flavor": spec.model.flavor, "trusted_types": flavor_meta.get("trusted_types", [])}
        # The pyfunc, and in the same MLmodel the native flavor over the same model file, so that
        # mlflow.xgboost/sklearn.load_model open the version too (a many-model version has none).
        native = {} if isinstance(fitted.model, dict) else native_flavor(
            spec.model.flavor, f"artifacts/{model_path.name}", loader["trusted_types"])
        info = Model.log(
            # (flavor_name: what mlflow.pyfunc.log_model records for a model from code)
            artifact_path=None, name="model", flavor=PyfuncWithNative(native), flavor_name="pyfunc.ModelFromCode",
            python_model=MODEL_CODE, artifacts={"model": str(model_path), "meta": str(meta_path)},
            signature=signature, input_example=trained.example, pip_requirements=_requirements(spec),
            model_config=loader,
        )
        # What loading will check, in the registry where the artifact store cannot change it: every
        # file as stored, and the types skops may build.
        tags[registry.MODEL_DIGEST_TAG] = registry.stored_digest(info.model_uri, tmp)
        tags[registry.TRUSTED_TYPES_TAG] = json.dumps(loader["trusted_types"])
        mv, registered = _register(spec, ctx, cl, info.model_uri, lineage.lineage_key, tags, lineage.forced)
        if not registered:
            mlflow.set_tag(Tag.DISCARDED_DUPLICATE_OF, str(mv.version))
    return mv, registered, run.info.run_id


def _register(spec: Spec, ctx: RunContext, cl: Any, model_uri: str, lineage_key: str, tags: dict[str, str],
              force: bool) -> tuple[Any, bool]:
    """(version, whether this run registered it). The check for the lineage and the registration,
    with every lineage tag at once, happen under the model's lock: two runs of one date at once
    (a retry overlapping the run, two schedulers) train twice but register one version; the later
    one gets the version the other registered. A forced retrain registers regardless."""
    import mlflow

    with registry.model_lock(cl, spec.model.name, owner=ctx.run_id) as held:
        if not force:
            existing = registry.versions(cl, spec.model.name, {registry.LINEAGE_TAG: lineage_key})
            if existing:
                return existing[0], False
        held.check()
        return mlflow.register_model(model_uri, spec.model.name, tags=tags), True


INPUT_HASHES_TAG = Tag.INPUT_HASHES
INPUT_HASHES_ARTIFACT = "input_hashes.json"
# MLflow truncates run tags at 8,000 characters (to invalid JSON): longer lineages go in the artifact.
_HASHES_TAG_LIMIT = 4000


def input_hashes_tag(hashes: dict[str, Any]) -> str:
    """The input hashes as tag text: the JSON itself when short, else its digest, its size and
    the training run's artifact that holds it in full (always valid JSON)."""
    import hashlib

    text = json.dumps(hashes, sort_keys=True)
    if len(text) <= _HASHES_TAG_LIMIT:
        return text
    return json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "entries": len(hashes),
                       "artifact": INPUT_HASHES_ARTIFACT})


def _requirements(spec: Spec) -> list[str]:
    import mlflow
    import xgboost as xgb

    reqs = [f"mlflow=={mlflow.__version__}", f"pandas=={pd.__version__}", f"numpy=={np.__version__}",
            f"xgboost=={xgb.__version__}"]
    if spec.model.flavor == "sklearn":
        import sklearn
        import skops

        reqs += [f"scikit-learn=={sklearn.__version__}", f"skops=={skops.__version__}"]
    return reqs


def _signature(features: list[str], categorical: set[str]) -> Any:
    """Every input optional: any feature may be missing for a row (no plane record, no recent
    flights), and the model handles missing values itself."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string" if n in categorical else "double", n, required=False) for n in features])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double")]))


def _float(v: str | None) -> float | None:
    return None if v is None else float(v)
