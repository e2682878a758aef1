"""Prefect flow: the daybreak daily cycle, one task per step."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow

from daybreak.gate import should_promote
from daybreak.promote import should_deploy
from daybreak.prefect import build_features, deploy_model, evaluate_gate, promote_model, stage_data, train_model

DEFAULT_SPEC = os.environ.get("DAYBREAK_SPEC") or str(Path(__file__).resolve().parent.parent / "specs" / "flights.yaml")


@flow(name="daily_retrain", flow_run_name="daily_retrain {date}")
def daily_retrain(date: str | None = None, spec: str = DEFAULT_SPEC) -> dict[str, Any]:
    """Stage, build features, train, gate, promote and deploy for one date (default: today, UTC)."""
    day = date or datetime.now(timezone.utc).date().isoformat()
    staged = stage_data(spec, day)
    features = build_features(spec, day, wait_for=[staged])
    trained = train_model(spec, day, wait_for=[features])
    gate = evaluate_gate(spec, day, wait_for=[trained])
    if not should_promote(gate):  # after a reject (or no candidate) promotion never runs
        return {"date": day, "stage": staged, "features": features, "train": trained, "gate": gate,
                "promote": {"promoted": False, "reason": f"gate decision is {gate['decision']}"}}
    promoted = promote_model(spec, day, wait_for=[gate])
    if not should_deploy(promoted):  # promotion.approval: manual: pending, nothing moved (flows/approve.py)
        return {"date": day, "stage": staged, "features": features, "train": trained, "gate": gate,
                "promote": promoted, "deploy": None}
    deployed = deploy_model(spec, day, wait_for=[promoted])
    return {"date": day, "stage": staged, "features": features, "train": trained, "gate": gate,
            "promote": promoted, "deploy": deployed}


if __name__ == "__main__":
    import sys

    print(daily_retrain(date=sys.argv[1] if len(sys.argv) > 1 else None))
