"""One entry point per step for the orchestrator adapters: spec path + date in, small dict out.

Airflow operators and Prefect tasks call ``run_step``; it loads and validates the spec, builds the
run context and calls the step, so the adapters stay a few lines of argument mapping.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from datetime import date, datetime
from typing import Any

from daybreak.infra.context import RunContext, parse_date
from daybreak.infra.errors import MissingInputError
from daybreak.spec import Spec, load_spec


def _registry() -> dict[str, Callable[..., Mapping[str, Any]]]:
    from daybreak.deploy import deploy_model
    from daybreak.features import build_features
    from daybreak.gate import evaluate_gate
    from daybreak.monitor import monitor_model
    from daybreak.promote import approve_model, promote_model
    from daybreak.score import batch_score
    from daybreak.stage import stage
    from daybreak.train import train_model

    return {
        "stage": stage,
        "features": build_features,
        "monitor": monitor_model,
        "train": train_model,
        "gate": evaluate_gate,
        "promote": promote_model,
        "approve": approve_model,
        "deploy": deploy_model,
        "batch_score": batch_score,
    }


STEP_NAMES = ("stage", "features", "monitor", "train", "gate", "promote", "approve", "deploy", "batch_score")


def resolve_date(*candidates: Any) -> date:
    """The first usable date among an explicit override, the run's logical date and its run-after time.

    Asset-triggered Airflow runs have no logical date and templated empty values render as
    '' or 'None', so those count as absent.
    """
    for c in candidates:
        if c is None or (isinstance(c, str) and c.strip() in ("", "None", "null")):
            continue
        if isinstance(c, (date, datetime, str)):
            return parse_date(c)
    raise ValueError("no logical date: pass a date (YYYY-MM-DD)")


def run_step(step: str, spec: str | Spec, day: str | date | datetime, *, run_id: str | None = None,
             store: str | None = None, tracking_uri: str | None = None, ray_address: str | None = None,
             storage: Any = None, **options: Any) -> dict[str, Any]:
    if step not in STEP_NAMES:
        raise ValueError(f"unknown step {step!r}; steps are {list(STEP_NAMES)}")
    s = spec if isinstance(spec, Spec) else load_spec(spec)
    ctx = RunContext.create(day, store=store or None, tracking_uri=tracking_uri or None, run_id=run_id,
                            ray_address=ray_address or None, storage=storage)
    return dict(_registry()[step](s, ctx, **options))


# Steps whose output is a pure function of their recorded inputs. monitor, promote, approve and
# deploy act on the registry, the log and the endpoint as they stand, so they always run.
CACHEABLE = ("stage", "features", "train", "gate", "batch_score")


def _recorded(step: str, spec: Spec, ctx: RunContext) -> Any:
    recorded: Callable[[Spec, RunContext], object]  # each step's own lineage type; None: nothing recorded
    if step == "stage":
        from daybreak.stage import recorded_lineage as recorded
    elif step == "features":
        from daybreak.features import recorded_lineage as recorded
    elif step == "train":
        from daybreak.train import recorded_lineage as recorded
    elif step == "gate":
        from daybreak.gate import recorded_gate as recorded
    else:
        from daybreak.score import recorded_lineage as recorded
    return recorded(spec, ctx)


def _from_result(step: str, r: dict[str, Any]) -> Any:
    if step == "stage":
        return {name: s["lineage_key"] for name, s in r["sources"].items()}
    if step == "train":
        return [r["lineage_key"], r["model_version"]] if r.get("model_version") else None
    if step == "gate":
        if not r.get("candidate_version") or not r.get("decision"):
            return None
        return [str(r["candidate_version"]), r["decision"], str(r.get("champion_version") or "none")]
    return r.get("lineage_key")


def cache_key(step: str, spec: str | Spec, day: str | date | datetime, *, result: dict[str, Any] | None = None,
              store: str | None = None, tracking_uri: str | None = None, storage: Any = None) -> str | None:
    """A key for what `step` recorded for the date, for an orchestrator's result cache (Prefect's).

    Without `result` it is read from the store and the registry: the lineage of the step's recorded
    output, when that output exists and was made from the inputs as they are now. None means the
    step has work to do (or acts on live state: promote, approve, deploy), so it must run. With
    `result`, what the step returned, the same key is read from it: a result cached under it is
    found by the next run of the date, and missed once an input changes or the output is gone.
    The key names the spec, the step and the date, and depends on the store and registry used.
    """
    if step not in CACHEABLE:
        return None
    s = spec if isinstance(spec, Spec) else load_spec(spec)
    ctx = RunContext.create(day, store=store or None, tracking_uri=tracking_uri or None, storage=storage)
    try:
        ident = _recorded(step, s, ctx) if result is None else _from_result(step, result)
    except MissingInputError:  # the step will say what is missing
        return None
    if ident is None:
        return None
    where = [ctx.store.uri(""), ctx.tracking_uri if step in ("train", "gate", "batch_score") else None]
    blob = json.dumps({"spec": s.spec_hash(), "step": step, "where": where, "recorded": ident}, sort_keys=True)
    return f"daybreak-{s.name}-{step}-{ctx.logical_date.isoformat()}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
