"""Gate: candidate vs champion, both scored now on the same holdout (the logical date's features).

The decision is PROMOTE or REJECT (SKIPPED when there is no candidate) with every rule's value,
threshold and verdict. It is written onto the candidate version as tags, so promotion and
anyone auditing later read the same record.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

import numpy as np

from daybreak import registry
from daybreak.context import RunContext
from daybreak.errors import GateError, MissingInputError
from daybreak.features import read_features
from daybreak.spec import Spec

log = logging.getLogger(__name__)

PROMOTE, REJECT, SKIPPED = "PROMOTE", "REJECT", "SKIPPED"
HIGHER_IS_BETTER = {"roc_auc": True, "log_loss": False, "rmse": False, "mae": False}


def score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn import metrics

    if metric == "roc_auc":
        if len(np.unique(y)) < 2:
            raise GateError("roc_auc needs both classes in the holdout; it has one")
        return float(metrics.roc_auc_score(y, pred))
    if metric == "log_loss":
        return float(metrics.log_loss(y, np.clip(pred, 1e-15, 1 - 1e-15), labels=[0, 1]))
    if metric == "rmse":
        return float(np.sqrt(metrics.mean_squared_error(y, pred)))
    if metric == "mae":
        return float(metrics.mean_absolute_error(y, pred))
    raise GateError(f"gate.metric: unknown metric {metric!r}")


def holdout(spec: Spec, ctx: RunContext) -> Any:
    """The holdout rows: features of the spec's holdout days (the logical date and the
    ``training.holdout_days - 1`` days before it), which training never reads."""
    table, _, missing = read_features(spec, ctx, spec.training.holdout(ctx.logical_date))
    if table is None or ctx.logical_date.isoformat() in missing:
        raise MissingInputError(f"gate: no feature partition for {ctx.logical_date}; run the features step first")
    if missing:
        log.warning("gate %s: holdout days without features %s", ctx.logical_date, missing)
    return table.to_pandas()


def decide(spec: Spec, candidate: float, champion: float | None) -> tuple[str, list[dict[str, Any]]]:
    """Apply the spec's rules. With no champion, only the absolute floor decides."""
    g = spec.gate
    hib = HIGHER_IS_BETTER[g.metric]
    rules: list[dict[str, Any]] = []
    if g.floor is not None:
        ok = candidate >= g.floor if hib else candidate <= g.floor
        rules.append({"rule": "floor" if hib else "ceiling", "metric": g.metric, "value": candidate,
                      "threshold": g.floor, "passed": bool(ok)})
    if champion is not None:
        gain = candidate - champion if hib else champion - candidate
        rules.append({"rule": "min_improvement", "metric": g.metric, "value": gain,
                      "threshold": g.min_improvement, "passed": bool(gain >= g.min_improvement)})
    decision = PROMOTE if all(r["passed"] for r in rules) else REJECT
    return decision, rules


def evaluate_gate(spec: Spec, ctx: RunContext, force: bool = False) -> dict[str, Any]:
    import mlflow

    name = spec.model.name
    day = ctx.logical_date.isoformat()
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    cand = registry.candidate_for(cl, name, day, spec.spec_hash())
    base: dict[str, Any] = {"step": "gate", "date": day, "metric": spec.gate.metric}
    if cand is None:
        log.warning("gate %s: no candidate version trained for this date; nothing to decide", day)
        return base | {"decision": SKIPPED, "reason": "no candidate trained for this date",
                       "candidate_version": None, "champion_version": None}
    if registry.DECISION_TAG in cand.tags and not force:
        # A rerun: the decision was made against the champion of that moment; keep it.
        log.info("gate %s: version %s was already gated (%s); keeping that decision", day, cand.version,
                 cand.tags[registry.DECISION_TAG])
        return base | recorded_decision(cand.tags) | {"candidate_version": str(cand.version), "recorded": True}
    champ = registry.alias_version(cl, name, spec.promotion.alias)
    df = holdout(spec, ctx)
    if len(df) < spec.gate.min_rows:
        raise GateError(f"gate {day}: holdout has {len(df)} rows < gate.min_rows={spec.gate.min_rows}")
    y = df[spec.features.label.name].to_numpy(np.float64)
    X = df[spec.features.feature_names()]
    cand_pred = registry.load_model(ctx, name, str(cand.version)).predict(X)
    cand_metric = score(spec.gate.metric, y, np.asarray(cand_pred))
    champ_metric = None
    champ_version = None
    if champ is not None:
        champ_version = str(champ.version)
        champ_pred = registry.load_model(ctx, name, str(champ.version)).predict(X)
        champ_metric = score(spec.gate.metric, y, np.asarray(champ_pred))
    decision, rules = decide(spec, cand_metric, champ_metric)
    record = {
        registry.DECISION_TAG: decision,
        registry.AGAINST_TAG: champ_version or "none",
        "daybreak.gate.metric": spec.gate.metric,
        "daybreak.gate.candidate_metric": repr(cand_metric),
        "daybreak.gate.champion_metric": "none" if champ_metric is None else repr(champ_metric),
        "daybreak.gate.holdout_date": day,
        "daybreak.gate.holdout_rows": str(len(df)),
        "daybreak.gate.rules": json.dumps(rules),
        "daybreak.gate.decided_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with mlflow.start_run(run_name=f"gate-{day}"):
        mlflow.set_tags({**record, "daybreak.candidate_version": str(cand.version)})
        mlflow.log_metric(f"candidate_{spec.gate.metric}", cand_metric)
        if champ_metric is not None:
            mlflow.log_metric(f"champion_{spec.gate.metric}", champ_metric)
    registry.set_tags(cl, name, str(cand.version), record)
    log.info("gate %s: %s candidate v%s %s=%.4f vs champion %s %s", day, decision, str(cand.version),
             spec.gate.metric, cand_metric, f"v{champ_version}" if champ_version else "(none)",
             "" if champ_metric is None else f"{champ_metric:.4f}")
    return base | {"decision": decision, "candidate_version": str(cand.version), "champion_version": champ_version,
                   "candidate_metric": cand_metric, "champion_metric": champ_metric, "holdout_rows": len(df),
                   "rules": rules}


def recorded_decision(tags: dict[str, str]) -> dict[str, Any]:
    """A version's gate record, read back from its tags."""
    against = tags.get(registry.AGAINST_TAG)
    return {
        "decision": tags.get(registry.DECISION_TAG),
        "champion_version": None if against in (None, "none") else against,
        "candidate_metric": _float(tags.get("daybreak.gate.candidate_metric")),
        "champion_metric": _float(tags.get("daybreak.gate.champion_metric")),
        "rules": json.loads(tags.get("daybreak.gate.rules", "[]")),
    }


def _float(v: str | None) -> float | None:
    return None if v in (None, "none") else float(v)
