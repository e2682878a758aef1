"""One daily cycle in process: stage -> features -> monitor -> train -> gate -> promote -> deploy.

Monitoring runs before retraining: the date's labels have just arrived with its staged data, so
the model in service is judged on what it served (and rolled back if it must be) before the new
candidate is gated against it.

This is what ``daybreak run`` and ``daybreak backfill`` execute; the Airflow DAG and the Prefect
flow run the same steps as separate tasks (and retry them with their own settings).

A step that fails with a passing error (S3 or MLflow unreachable for a while, a lost Ray node) is
run again after an exponentially growing wait; steps are idempotent per date, so a retry redoes
only what did not finish. Errors that retrying cannot fix (``errors.is_retryable``) fail at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from daybreak.deploy import deploy_model
from daybreak.features import build_features
from daybreak.gate import evaluate_gate, should_promote
from daybreak.infra.context import RunContext
from daybreak.infra.errors import is_retryable
from daybreak.monitor import monitor_model
from daybreak.promote import promote_model, should_deploy
from daybreak.spec import Spec
from daybreak.stage import stage
from daybreak.train import train_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retry:
    """How often a step is tried and how long to wait in between: ``backoff_s``, then twice
    that, ... at most ``max_wait_s``. Defaults ride out an outage of about half a minute;
    ``DAYBREAK_STEP_ATTEMPTS`` and ``DAYBREAK_STEP_BACKOFF_S`` change them."""

    attempts: int = 4
    backoff_s: float = 5.0
    max_wait_s: float = 60.0

    @classmethod
    def from_env(cls) -> Retry:
        env = os.environ.get
        return cls(attempts=max(1, int(env("DAYBREAK_STEP_ATTEMPTS") or cls.attempts)),
                   backoff_s=float(env("DAYBREAK_STEP_BACKOFF_S") or cls.backoff_s))

    def wait(self, attempt: int) -> float:
        return min(self.max_wait_s, self.backoff_s * 2 ** (attempt - 1))


def with_retry(name: str, fn: Callable[..., Mapping[str, Any]], spec: Spec, ctx: RunContext, retry: Retry,
               **options: Any) -> dict[str, Any]:
    """``fn(spec, ctx, **options)``, tried again after a passing error."""
    attempt = 1
    while True:
        try:
            return dict(fn(spec, ctx, **options))
        except Exception as e:
            if attempt >= retry.attempts or not is_retryable(e):
                raise
            wait = retry.wait(attempt)
            log.warning("%s %s: attempt %d of %d failed (%s: %s); retrying in %.1f s", name, ctx.logical_date,
                        attempt, retry.attempts, type(e).__name__, str(e)[:300], wait)
            time.sleep(wait)
            attempt += 1


def run_cycle(spec: Spec, ctx: RunContext, deploy: bool = True, force: bool = False,
              dry_run: bool = False, retry: Retry | None = None) -> dict[str, Any]:
    """``force`` retrains even if the date's lineage has a version; ``dry_run`` stops after the
    gate: promote says what it would do, nothing is promoted or deployed. ``retry`` (default
    ``Retry.from_env()``) says how each step is retried after a passing error."""
    r = retry or Retry.from_env()
    out: dict[str, Any] = {"date": ctx.logical_date.isoformat(), "run_id": ctx.run_id}
    out["stage"] = with_retry("stage", stage, spec, ctx, r)
    out["features"] = with_retry("features", build_features, spec, ctx, r)
    out["monitor"] = with_retry("monitor", monitor_model, spec, ctx, r)
    out["train"] = with_retry("train", train_model, spec, ctx, r, force=force)
    out["gate"] = with_retry("gate", evaluate_gate, spec, ctx, r)
    if should_promote(out["gate"]):
        out["promote"] = with_retry("promote", promote_model, spec, ctx, r, dry_run=dry_run)
        if deploy and should_deploy(out["promote"]):  # not while the version waits for approval
            out["deploy"] = with_retry("deploy", deploy_model, spec, ctx, r)
    else:  # after a reject promotion (and so deployment) never runs, as in the DAG and the flow
        out["promote"] = with_retry("promote", lambda s, c: not_promoted(s, c, out["gate"]), spec, ctx, r)
    out["summary"] = summarize(out)
    return out


def not_promoted(spec: Spec, ctx: RunContext, gate: dict[str, Any]) -> dict[str, Any]:
    """The promote step's result when the gate said no (the champion as it stands)."""
    from daybreak.infra import registry

    cl = registry.client(ctx)
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    return {"step": "promote", "date": ctx.logical_date.isoformat(), "promoted": False,
            "reason": f"gate decision is {gate.get('decision')}", "candidate_version": gate.get("candidate_version"),
            "champion_version": None if champ is None else str(champ.version)}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The one line a person wants per day."""
    gate = result.get("gate", {})
    promote = result.get("promote", {})
    return {
        "date": result.get("date"),
        "rows_staged": result.get("stage", {}).get("rows"),
        "candidate_version": gate.get("candidate_version"),
        "candidate_metric": gate.get("candidate_metric"),
        "champion_metric": gate.get("champion_metric"),
        "decision": gate.get("decision"),
        "champion_version": promote.get("champion_version"),
        "approval": promote.get("approval"),
        "monitor": result.get("monitor", {}).get("action"),
    }


def date_range(start: date, end: date) -> list[date]:
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return [start + timedelta(days=k) for k in range((end - start).days + 1)]


def day_summary(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """The per-day line rebuilt from the store and the registry, whichever orchestrator ran the day."""
    from daybreak.gate import recorded_decision
    from daybreak.infra import registry
    from daybreak.promote import APPROVAL_TAG

    day = ctx.logical_date.isoformat()
    part = ctx.store.partition(f"staged/{spec.features.base}", ctx.logical_date)
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    cand = registry.candidate_for(cl, spec.model.name, day, spec.spec_hash())
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    rec = recorded_decision(cand.tags) if cand is not None else {}
    return {
        "date": day,
        "rows_staged": part.manifest["rows"] if part else None,
        "candidate_version": str(cand.version) if cand is not None else None,
        "candidate_metric": rec.get("candidate_metric"),
        "champion_metric": rec.get("champion_metric"),
        "decision": rec.get("decision") or ("SKIPPED" if cand is None else None),
        "champion_version": str(champ.version) if champ is not None else None,
        "approval": cand.tags.get(APPROVAL_TAG) if cand is not None else None,
    }
