"""Tuning: trials of the spec's search space run in parallel on Ray Tune, within a trial count and
a time budget; the best parameters by validation metric come back to the train step, which
trains and registers the final model with them. Every trial becomes an MLflow child run there.

The search is random (Ray Tune's basic variant generator) with the model's seed, so the same
spec samples the same trials.
"""

from __future__ import annotations

import logging
import tempfile
from typing import TYPE_CHECKING, Any

from daybreak.infra.compute import ensure_ray, hidden_from_ray
from daybreak.infra.context import RunContext
from daybreak.spec import SearchParam, Spec

if TYPE_CHECKING:
    from daybreak.train._fit import TrainData

log = logging.getLogger(__name__)

def _maximised(metric: str) -> bool:
    """xgboost's ranking and AUC metrics grow with quality; its errors and losses shrink."""
    return metric in ("auc", "aucpr") or metric.startswith(("map", "ndcg"))


def search_space(space: dict[str, SearchParam]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.choices is not None:
            out[name] = tune.choice(p.choices)
            continue
        low, high = p.low, p.high
        assert low is not None and high is not None  # SearchParam's validator: a range without choices
        if p.integer:
            lo, hi = int(low), int(high) + 1  # the spec's high is inclusive
            out[name] = tune.lograndint(lo, hi) if p.log else tune.randint(lo, hi)
        else:
            out[name] = tune.loguniform(low, high) if p.log else tune.uniform(low, high)
    return out


def _trial(config: dict[str, Any], spec: Spec, data: TrainData) -> dict[str, Any]:
    from daybreak.train._fit import fit_model

    overrides = dict(config)
    if spec.model.flavor == "xgboost":
        overrides.setdefault("nthread", 1)  # one CPU per trial: trials are the parallelism
    fitted = fit_model(spec, data, overrides)
    return {"val_metric": fitted.val_metric}


def tune(spec: Spec, data: TrainData, ctx: RunContext) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(best parameter overrides, every trial's params, status and validation metric)."""
    import ray
    from ray import tune as rt
    from ray.tune.search import BasicVariantGenerator

    t = spec.model.tuning
    assert t is not None
    ensure_ray(ctx.ray_address)
    metric = "auc" if spec.model.task == "classification" else "rmse"
    if spec.model.flavor == "xgboost":
        metric = str(spec.model.params.get("eval_metric", metric))
    mode = "max" if _maximised(metric) else "min"
    parallel = t.parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
    log.info("tuning %s: up to %d trials, %d at once, %.0f s budget", spec.model.name, t.trials, parallel,
             t.time_budget_s)
    with tempfile.TemporaryDirectory(prefix="daybreak-tune-") as storage:
        tuner = rt.Tuner(
            rt.with_parameters(_trial, spec=spec, data=data),
            param_space=search_space(t.space),
            tune_config=rt.TuneConfig(metric="val_metric", mode=mode, num_samples=t.trials,
                                      max_concurrent_trials=parallel, time_budget_s=t.time_budget_s,
                                      search_alg=BasicVariantGenerator(random_state=spec.model.seed)),
            run_config=rt.RunConfig(storage_path=storage, name="trials", verbose=0),
        )
        with hidden_from_ray():  # Tune would put the driver's AWS keys in each trial's logged runtime_env
            grid = tuner.fit()
    results = [grid[i] for i in range(len(grid))]  # ResultGrid indexes; it does not declare __iter__
    trials: list[dict[str, Any]] = []
    for r in results:
        value = (r.metrics or {}).get("val_metric")
        status = "error" if r.error else ("done" if value is not None else "incomplete")  # cut by the budget
        trials.append({"params": dict(r.config or {}), "status": status,
                       "val_metric": None if value is None else float(value)})
    done = [x for x in trials if x["val_metric"] is not None]
    if not done:
        errors = [str(r.error) for r in results if r.error][:1]
        raise RuntimeError(f"tuning {spec.model.name}: no trial finished within the budget"
                           f"{': ' + errors[0] if errors else ''}")
    best = (min if mode == "min" else max)(done, key=lambda x: x["val_metric"])
    log.info("tuning %s: %d trial(s) finished; best val %s=%.4f with %s", spec.model.name, len(done), metric,
             best["val_metric"], best["params"])
    return best["params"], trials
