"""One daily cycle in process: stage -> features -> (online) -> monitor -> train -> gate -> promote -> deploy.

The steps, their order and when each runs are declared once, in ``daybreak.steps.CYCLE``
(monitoring runs before retraining: see there). This is what ``daybreak run`` and ``daybreak
backfill`` execute; the Airflow DAG and the Prefect flow run the same declaration as separate tasks
(and retry them with their own settings).

A step that fails with a passing error (S3 or MLflow unreachable for a while, a lost Ray node) is
run again after an exponentially growing wait; steps are idempotent per date, so a retry redoes
only what did not finish. Errors that retrying cannot fix (``errors.is_retryable``) fail at once.

On a day the base source's calendar expects no drop every step's result says so (``expected``
false) and nothing runs. ``history_plan`` and ``warm_history`` stage and featurise the days before a
backfill's first date that its windows and training window read, or refuse naming the days that
cannot be staged.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from daybreak.infra.context import RunContext
from daybreak.infra.errors import MissingInputError, is_retryable
from daybreak.spec import Spec
from daybreak.steps import CYCLE, CycleOptions, Step, is_expected

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
        skipped = step.skipped(spec, ctx.logical_date)
        if skipped is not None:  # no drop expected, or not turned on in the spec: nothing runs, that is the result
            out[step.name] = skipped
        elif step.runs_if(out, options):
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
    """The one line a person wants per day (``expected`` false and the reason on a day with no
    expected drop: not a failure, and no decision)."""
    gate = result.get("gate", {})
    promote = result.get("promote", {})
    not_expected = next((r for r in result.values() if isinstance(r, dict) and not is_expected(r)), None)
    return {
        "date": result.get("date"),
        "expected": not_expected is None,
        "note": not_expected["reason"] if not_expected else None,
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
    if not spec.expects(ctx.logical_date):
        return {"date": day, "expected": False, "note": spec.calendar().reason(ctx.logical_date),
                "rows_staged": None, "candidate_version": None, "candidate_metric": None, "champion_metric": None,
                "decision": None, "champion_version": None, "approval": None}
    part = ctx.store.partition(f"staged/{spec.features.base}", ctx.logical_date)
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    cand = registry.candidate_for(cl, spec.model.name, day, spec.spec_hash())
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    rec = recorded_decision(cand.tags) if cand is not None else {}
    return {
        "date": day,
        "expected": True,
        "note": None,
        "rows_staged": part.manifest["rows"] if part else None,
        "candidate_version": str(cand.version) if cand is not None else None,
        "candidate_metric": rec.get("candidate_metric"),
        "champion_metric": rec.get("champion_metric"),
        "decision": rec.get("decision") or ("SKIPPED" if cand is None else None),
        "champion_version": str(champ.version) if champ is not None else None,
        "approval": cand.tags.get(APPROVAL_TAG) if cand is not None else None,
    }


# --- history-aware backfill -----------------------------------------------------------------------

@dataclass(frozen=True)
class HistoryPlan:
    """What a backfill's first date reads from before it: the expected days to stage and
    featurise (its features' look-back, and that of every day it trains on), oldest first;
    ``missing``: those that are neither staged nor have landing files."""

    first: date
    days: list[date] = field(default_factory=list)
    missing: list[date] = field(default_factory=list)
    staged: list[date] = field(default_factory=list)  # days already staged (not staged again)

    def todo(self, spec: Spec) -> list[tuple[date, list[str]]]:
        """Each day and the steps it needs (stage unless staged, then features), oldest first;
        a MissingInputError naming the days that cannot be staged."""
        if self.missing:
            raise MissingInputError(self.refusal(spec))
        return [(d, ["features"] if d in self.staged else ["stage", "features"]) for d in self.days]

    def refusal(self, spec: Spec) -> str:
        days = ", ".join(d.isoformat() for d in self.missing)
        return (f"backfill {self.first}: the look-back needs {days} staged but "
                f"{'it has' if len(self.missing) == 1 else 'they have'} no landing file; stage them, start later, "
                f"or declare the data's first day with sources.{spec.features.base}.calendar.start "
                "(or skip this, windows truncated: --no-history; in the Prefect flow history=False)")


def lookback_days(spec: Spec) -> int:
    """Whole days before a date that its features read of any source: the longest window over
    each events source (with its max_delay) and the longest as-of join (tolerance and delay)."""
    f = spec.features
    return max([*(f.lookback_days(name) for name in spec.sources), *(j.lookback_days() for j in f.asof), 0])


def history_plan(spec: Spec, context: Callable[[date], RunContext], first: date,
                 steps: Sequence[str] | None = None) -> HistoryPlan:
    """The history `first` needs for the cycle `steps` (default all): its windows' look-back and,
    with training (train and after), its training window and holdout with their own look-back.
    Those days are staged and featurised (a look-back day's features are cheap, and a store so
    warmed can backfill from any of its days). Only days the base source's calendar expects
    count; a day counts as staged when the base's partition exists."""
    from daybreak.stage import unlanded

    names = [s.name for s in cycle_steps(steps)]
    trains = any(n in names for n in ("train", "gate", "promote", "deploy"))
    if not trains and "features" not in names:
        return HistoryPlan(first)
    window = [*spec.train_days(first), *spec.holdout_days(first)] if trains else []
    oldest = min([first, *window]) - timedelta(days=lookback_days(spec))
    days = spec.calendar().expected_days(oldest, first - timedelta(days=1)) if oldest < first else []
    base = f"staged/{spec.features.base}"
    staged, missing = [], []
    for d in days:
        ctx = context(d)
        if ctx.store.partition(base, d) is not None:
            staged.append(d)
        elif unlanded(spec, ctx):
            missing.append(d)
    return HistoryPlan(first, days, missing, staged)


def warm_history(spec: Spec, context: Callable[[date], RunContext], plan: HistoryPlan,
                 retry: Retry | None = None) -> list[dict[str, Any]]:
    """Stage the plan's days not staged yet and featurise its feature days, oldest first; refuse
    up front (MissingInputError naming the days) when some cannot be staged. The results of the
    steps run, one entry per day."""
    return [run_cycle(spec, context(d), deploy=False, retry=retry, steps=steps) for d, steps in plan.todo(spec)]
