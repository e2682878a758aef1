"""What the registry says happened: versions, their lineage and their gate decisions, and the
audit history of promotions, rejections and rollbacks.

The audit history is an MLflow experiment ``<spec name>-audit``: one run per event, tagged with
what happened, to which version, why, and which run (DAG run, flow run) did it. Runs are never
edited, so the history only grows; it lives with the registry, wherever that is.
"""

from __future__ import annotations

import json
from typing import Any

from daybreak.infra import registry
from daybreak.infra.audit import no_sqlite_registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import DaybreakError
from daybreak.infra.records import GateRecord, Lineage, Promotion, Tag
from daybreak.spec import Spec


def version_row(mv: Any, aliases: list[str] | None = None) -> dict[str, Any]:
    """One version's line in the history: its lineage, gate record and promotion marks. `aliases`
    given when `mv` is a search result (which carries none)."""
    t = mv.tags
    rec, lineage, promo = GateRecord.from_tags(t), Lineage.from_tags(t), Promotion.from_tags(t)
    return {
        "version": str(mv.version),
        "logical_date": lineage.logical_date or None,
        "window": lineage.window,
        "decision": rec.decision,
        "candidate_metric": rec.candidate_metric,
        "champion_metric": rec.champion_metric,
        "gated_against": rec.champion_version,
        "promoted_at": promo.promoted_at,
        "approval": promo.approval,  # manual approval: pending | approved | rejected
        "approval_by": promo.approval_by,
        "approval_reason": promo.approval_reason,
        "aliases": sorted(aliases if aliases is not None else getattr(mv, "aliases", []) or []),
        "spec_hash": lineage.spec_hash or None,
        "run_id": mv.run_id,
    }


def model_history(spec: Spec, ctx: RunContext) -> list[dict[str, Any]]:
    """Every version, newest first. Two registry reads whatever the number of versions: the search,
    and the model's aliases (search results carry none), not a read per version. Reads only: no
    experiment and no registry database is created."""
    if no_sqlite_registry(ctx):
        return []
    cl = registry.client(ctx)
    found = registry.versions(cl, spec.model.name)
    if not found:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in (cl.get_registered_model(spec.model.name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    return [version_row(mv, by_version.get(str(mv.version), [])) for mv in found]


def _version(spec: Spec, ctx: RunContext, version: str | None) -> Any:
    """The version (default: the champion). Reads only: no experiment is created."""
    cl = registry.client(ctx)
    if version is None:
        mv = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
        if mv is None:
            raise DaybreakError(f"{spec.model.name} has no {spec.promotion.alias!r} yet; pass --version")
        return mv
    try:
        return cl.get_model_version(spec.model.name, version)
    except Exception as e:
        raise DaybreakError(f"{spec.model.name} has no version {version!r}") from e


def gate_report_html(spec: Spec, ctx: RunContext, version: str | None = None) -> str:
    """The HTML report the gate logged for a version."""
    import mlflow

    from daybreak.gate import REPORT

    mv = _version(spec, ctx, version)
    run_id = mv.tags.get(Tag.GATE_RUN_ID)
    if not run_id:
        raise DaybreakError(f"{spec.model.name} v{mv.version} has no gate report "
                            "(not gated, or gated by an older daybreak)")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REPORT, dst_path=tmp,
                                                   tracking_uri=ctx.tracking_uri)
        return Path(path).read_text()


def version_report(spec: Spec, ctx: RunContext, version: str | None = None) -> dict[str, Any]:
    mv = _version(spec, ctx, version)
    row = version_row(mv)
    t = mv.tags
    row["input_hashes"] = json.loads(t.get(Tag.INPUT_HASHES, "{}"))
    row["feature_version"] = t.get(Tag.FEATURE_VERSION)
    row["code_version"] = t.get(Tag.CODE_VERSION)
    rec = GateRecord.from_tags(t)
    row["computed_decision"] = rec.computed_decision
    row["override_reason"] = rec.override_reason
    row["gate_run_id"] = rec.gate_run_id
    row["interval"] = rec.interval
    row["baselines"] = [f"{r['rule'].removeprefix('baseline:')}: {r['verdict']} ({r.get('detail') or r['value']})"
                        for r in rec.rules if r.get("kind") == "baseline"]
    row["rules"] = rec.rules
    row["source"] = mv.source
    return row
