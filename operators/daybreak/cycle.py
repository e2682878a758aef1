"""One daily cycle in process: stage -> features -> monitor -> train -> gate -> promote -> deploy.

The steps, their order and when each runs are declared once, in ``daybreak.steps.CYCLE``
(monitoring runs before retraining: see there). This is what ``daybreak run`` and ``daybreak
backfill`` execute; the Airflow DAG and the Prefect flow run the same declaration as separate tasks
(and retry them with their own settings).

A step that fails with a passing error (S3 or MLflow unreachable for a while, a lost Ray node) is
run again after an exponentially growing wait; steps are idempotent per date, so a retry redoes
only what did not finish. Errors that retrying cannot fix (``errors.is_retryable``) fail at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from daybreak.infra.context import RunContext
from daybreak.infra.errors import is_retryable
from daybreak.spec import Spec
from daybreak.steps import CYCLE, CycleOptions, Step

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


def with_retry(name: str, fn: Callable[..., dict[str, Any]], spec: Spec, ctx: RunContext, retry: Retry,
               **options: Any) -> dict[str, Any]:
    """``fn(spec, ctx, **options)``, tried again after a passing error."""
    attempt = 1
    while True:
        try:
            return fn(spec, ctx, **options)
        except Exception as e:
            if attempt >= retry.attempts or not is_retryable(e):
                raise
            wait = retry.wait(attempt)
            log.warning("%s %s: attempt %d of %d failed (%s: %s); retrying in %.1f s", name, ctx.logical_date,
                        attempt, retry.attempts, type(e).__name__, str(e)[:300], wait)
            time.sleep(wait)
            attempt += 1


def run_cycle(spec: Spec, ctx: RunContext, deploy: bool = True, force: bool = False,
              dry_run: bool = False, retry: Retry | None = None,
              steps: Sequence[str] | None = None) -> dict[str, Any]:
    """``force`` retrains even if the date's lineage has a version; ``dry_run`` stops after the
    gate: promote says what it would do, nothing is promoted or deployed. ``retry`` (default
    ``Retry.from_env()``) says how each step is retried after a passing error. ``steps`` (names
    of the cycle's steps; default all) runs only those, in the cycle's order: e.g. stage and
    features to warm a store's history up before the first training date."""
    chosen = cycle_steps(steps)
    r = retry or Retry.from_env()
    options = CycleOptions(force=force, dry_run=dry_run, deploy=deploy)
    out: dict[str, Any] = {"date": ctx.logical_date.isoformat(), "run_id": ctx.run_id}
    for step in chosen:
        if step.runs_if(out, options):
            out[step.name] = with_retry(step.name, step.run, spec, ctx, r, **step.options_from(options))
        elif step.otherwise is not None:  # promote after the gate said no: the champion as it stands
            out[step.name] = with_retry(step.name, step.not_run, spec, ctx, r, done=out)
    out["summary"] = summarize(out)
    return out


def cycle_steps(names: Sequence[str] | None) -> tuple[Step, ...]:
    """The cycle's steps named in `names` (all when None), in the cycle's order; a ValueError
    naming the unknown ones and the choices."""
    if names is None:
        return CYCLE
    known = [s.name for s in CYCLE]
    wanted = [n.strip() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"steps: {', '.join(unknown) or '(none)'} not in the cycle; choose from {', '.join(known)}")
    return tuple(s for s in CYCLE if s.name in wanted)


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
