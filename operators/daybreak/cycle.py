"""One daily cycle in process: stage -> features -> train -> gate -> promote -> deploy.

This is what ``daybreak run`` and ``daybreak backfill`` execute; the Airflow DAG and the Prefect
flow run the same steps as separate tasks.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta
from typing import Any

from daybreak.context import RunContext
from daybreak.deploy import deploy_model
from daybreak.features import build_features
from daybreak.gate import evaluate_gate, should_promote
from daybreak.promote import promote_model, should_deploy
from daybreak.spec import Spec
from daybreak.stage import stage
from daybreak.train import train_model

log = logging.getLogger(__name__)

def run_cycle(spec: Spec, ctx: RunContext, deploy: bool = True, force: bool = False,
              dry_run: bool = False) -> dict[str, Any]:
    """``force`` retrains even if the date's lineage has a version; ``dry_run`` stops after the
    gate: promote says what it would do, nothing is promoted or deployed."""
    out: dict[str, Any] = {"date": ctx.logical_date.isoformat(), "run_id": ctx.run_id}
    out["stage"] = stage(spec, ctx)
    out["features"] = build_features(spec, ctx)
    out["train"] = train_model(spec, ctx, force=force)
    out["gate"] = evaluate_gate(spec, ctx)
    if should_promote(out["gate"]):
        out["promote"] = promote_model(spec, ctx, dry_run=dry_run)
        if deploy and should_deploy(out["promote"]):  # not while the version waits for approval
            out["deploy"] = deploy_model(spec, ctx)
    else:  # after a reject promotion (and so deployment) never runs, as in the DAG and the flow
        out["promote"] = not_promoted(spec, ctx, out["gate"])
    out["summary"] = summarize(out)
    return out


def not_promoted(spec: Spec, ctx: RunContext, gate: dict[str, Any]) -> dict[str, Any]:
    """The promote step's result when the gate said no (the champion as it stands)."""
    from daybreak import registry

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
    }


def date_range(start: date, end: date) -> list[date]:
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return [start + timedelta(days=k) for k in range((end - start).days + 1)]


def day_summary(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """The per-day line rebuilt from the store and the registry, whichever orchestrator ran the day."""
    from daybreak import registry
    from daybreak.gate import recorded_decision
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
