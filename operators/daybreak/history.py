"""What the registry says happened: versions, their lineage and their gate decisions, and the
audit history of promotions, rejections and rollbacks.

The audit history is an MLflow experiment ``<spec name>-audit``: one run per event, tagged with
what happened, to which version, why, and which run (DAG run, flow run) did it. Runs are never
edited, so the history only grows; it lives with the registry, wherever that is.
"""

from __future__ import annotations

import json
from datetime import UTC
from typing import Any

from daybreak import registry
from daybreak.context import RunContext
from daybreak.errors import DaybreakError
from daybreak.gate import recorded_decision
from daybreak.records import Tag
from daybreak.spec import Spec

EVENT_TAGS = ("event", "model", "version", "from_version", "reason", "run_context", "logical_date", "by")


def who() -> str:
    """The OS user running this process: recorded with overrides, rollbacks and approvals."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def record_event(spec: Spec, ctx: RunContext, event: str, version: str | None, *, from_version: str | None = None,
                 reason: str = "", by: str | None = None) -> None:
    """Append one event (promote, reject, blocked, rollback, override, pending_approval, approved,
    approval_rejected, retire) to the audit history. `by` defaults to the OS user."""
    from datetime import datetime

    cl = registry.client(ctx)
    name = f"{spec.name}-audit"
    exp = cl.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp is not None else _create_experiment(cl, name)
    tags = {"event": event, "model": spec.model.name, "version": version or "none",
            "from_version": from_version or "none",
            "reason": reason[:4000] or "-", "run_context": ctx.run_id, "logical_date": ctx.logical_date.isoformat(),
            "by": by or who(), "at": datetime.now(UTC).isoformat(timespec="seconds")}
    run = cl.create_run(exp_id, run_name=f"{event}-v{version or 'none'}",
                        tags={f"{Tag.AUDIT_PREFIX}{k}": v for k, v in tags.items()})
    cl.set_terminated(run.info.run_id)


def _create_experiment(cl: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return cl.create_experiment(name)
    except MlflowException as e:  # created by another process in between
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return cl.get_experiment_by_name(name).experiment_id


def has_event(spec: Spec, ctx: RunContext, event: str, version: str) -> bool:
    """Whether the audit history holds `event` for `version`."""
    cl = registry.client(ctx)
    exp = cl.get_experiment_by_name(f"{spec.name}-audit")
    if exp is None:
        return False
    found = cl.search_runs([exp.experiment_id], max_results=1, filter_string=(
        f"tags.`{Tag.AUDIT_PREFIX}event` = '{event}' and tags.`{Tag.AUDIT_PREFIX}version` = '{version}'"))
    return bool(found)


def audit_events(spec: Spec, ctx: RunContext, limit: int = 1000) -> list[dict[str, Any]]:
    """The audit history, newest first."""
    if _no_sqlite_registry(ctx):
        return []
    registry.use_uri(ctx.tracking_uri)
    cl = registry.client(ctx)
    exp = cl.get_experiment_by_name(f"{spec.name}-audit")
    if exp is None:
        return []
    runs = cl.search_runs([exp.experiment_id], max_results=limit, order_by=["attributes.start_time DESC"])
    out = []
    for r in runs:
        t = r.data.tags
        row = {k: t.get(f"{Tag.AUDIT_PREFIX}{k}") for k in (*EVENT_TAGS, "at")}
        row["audit_run_id"] = r.info.run_id
        out.append({k: (None if v == "none" else v) for k, v in row.items()})
    return out


def _row(mv: Any, aliases: list[str] | None = None) -> dict[str, Any]:
    """One version's listing row; `aliases` given when `mv` is a search result (which has none)."""
    t = mv.tags
    rec = recorded_decision(t)
    start, end = t.get(Tag.WINDOW_START), t.get(Tag.WINDOW_END)
    return {
        "version": str(mv.version),
        "logical_date": t.get(registry.DATE_TAG),
        "window": f"{start}..{end}" if start else None,
        "decision": rec["decision"],
        "candidate_metric": rec["candidate_metric"],
        "champion_metric": rec["champion_metric"],
        "gated_against": rec["champion_version"],
        "promoted_at": t.get(Tag.PROMOTED_AT),
        "approval": t.get(Tag.APPROVAL),  # manual approval: pending | approved | rejected
        "approval_by": t.get(Tag.APPROVAL_BY),
        "approval_reason": t.get(Tag.APPROVAL_REASON),
        "aliases": sorted(aliases if aliases is not None else getattr(mv, "aliases", []) or []),
        "spec_hash": t.get(registry.SPEC_TAG),
        "run_id": mv.run_id,
    }


def model_history(spec: Spec, ctx: RunContext) -> list[dict[str, Any]]:
    """Every version, newest first. Two registry reads whatever the number of versions: the search,
    and the model's aliases (search results carry none), not a read per version. Reads only: no
    experiment and no registry database is created."""
    if _no_sqlite_registry(ctx):
        return []
    cl = registry.client(ctx)
    found = registry.versions(cl, spec.model.name)
    if not found:
        return []
    by_version: dict[str, list[str]] = {}
    for alias, version in (cl.get_registered_model(spec.model.name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    return [_row(mv, by_version.get(str(mv.version), [])) for mv in found]


def _no_sqlite_registry(ctx: RunContext) -> bool:
    """The tracking URI is a SQLite file that does not exist yet: nothing to list, and a listing
    must not create (migrate) the database, which the first run does under a lock."""
    from pathlib import Path

    uri = ctx.tracking_uri
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


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
    row = _row(mv)
    t = mv.tags
    row["input_hashes"] = json.loads(t.get(Tag.INPUT_HASHES, "{}"))
    row["feature_version"] = t.get(Tag.FEATURE_VERSION)
    row["code_version"] = t.get(Tag.CODE_VERSION)
    rec = recorded_decision(t)
    row["computed_decision"] = rec["computed_decision"]
    row["override_reason"] = rec["override_reason"]
    row["gate_run_id"] = rec["gate_run_id"]
    row["rules"] = rec["rules"]
    row["source"] = mv.source
    return row
