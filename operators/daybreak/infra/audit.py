"""The audit history: promotions, rejections, rollbacks, approvals, as an MLflow experiment.

The audit history is an MLflow experiment ``<spec name>-audit``: one run per event, tagged with
what happened, to which version, why, and which run (DAG run, flow run) did it. Runs are never
edited, so the history only grows; it lives with the registry, wherever that is.
"""

from __future__ import annotations

from datetime import UTC
from typing import TYPE_CHECKING, Any

from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.records import Tag

if TYPE_CHECKING:
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
    if no_sqlite_registry(ctx):
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


def no_sqlite_registry(ctx: RunContext) -> bool:
    """The tracking URI is a SQLite file that does not exist yet: nothing to list, and a listing
    must not create (migrate) the database, which the first run does under a lock."""
    from pathlib import Path

    uri = ctx.tracking_uri
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()
