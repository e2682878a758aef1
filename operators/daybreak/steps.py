"""One entry point per step for the orchestrator adapters: spec path + date in, small dict out.

Airflow operators and Prefect tasks call ``run_step``; it loads and validates the spec, builds the
run context and calls the step, so the adapters stay a few lines of argument mapping.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from typing import Any

from daybreak.context import RunContext, parse_date
from daybreak.spec import Spec, load_spec


def _registry() -> dict[str, Callable[..., dict[str, Any]]]:
    from daybreak.deploy import deploy_model
    from daybreak.features import build_features
    from daybreak.gate import evaluate_gate
    from daybreak.promote import approve_model, promote_model
    from daybreak.score import batch_score
    from daybreak.stage import stage
    from daybreak.train import train_model

    return {
        "stage": stage,
        "features": build_features,
        "train": train_model,
        "gate": evaluate_gate,
        "promote": promote_model,
        "approve": approve_model,
        "deploy": deploy_model,
        "batch_score": batch_score,
    }


STEP_NAMES = ("stage", "features", "train", "gate", "promote", "approve", "deploy", "batch_score")


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
    return _registry()[step](s, ctx, **options)
