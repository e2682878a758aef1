from __future__ import annotations

from typing import Any

from prefect import task

from daybreak.errors import is_retryable
from daybreak.steps import run_step


def storage_options(secret_block: str | None) -> Any:
    """S3 settings from a Prefect Secret block holding JSON: endpoint_url, region, access_key,
    secret_key (all optional). None: from the environment."""
    if not secret_block:
        return None
    import json

    from prefect.blocks.system import Secret

    value = Secret.load(secret_block).get()
    data = json.loads(value) if isinstance(value, str) else dict(value)
    from daybreak.store import StorageOptions

    return StorageOptions(**{k: data.get(k) for k in ("endpoint_url", "region", "access_key", "secret_key",
                                                      "session_token")})


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    return is_retryable(state.data) if isinstance(state.data, BaseException) else True


# Steps are idempotent per logical date, so a retry after a crash is always safe; a bad spec or
# bad data fails at once instead.
_OPTS: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": _retry_if_transient,
                         "log_prints": True}


@task(name="stage_data", task_run_name="stage {date}", **_OPTS)
def stage_data(spec: str, date: str, store: str | None = None, storage_secret: str | None = None) -> dict[str, Any]:
    """Stage the day's landing files into validated Parquet partitions.

    `storage_secret` names a Secret block with the S3 settings (never printed)."""
    return run_step("stage", spec, date, store=store, storage=storage_options(storage_secret))


@task(name="build_features", task_run_name="features {date}", **_OPTS)
def build_features(spec: str, date: str, store: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Build the day's point-in-time feature partition on Ray."""
    return run_step("features", spec, date, store=store, ray_address=ray_address)


@task(name="train_model", task_run_name="train {date}", **_OPTS)
def train_model(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Train on the look-back window and register a model version with lineage."""
    return run_step("train", spec, date, store=store, tracking_uri=tracking_uri)


@task(name="evaluate_gate", task_run_name="gate {date}", **_OPTS)
def evaluate_gate(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                  override: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Score candidate and champion on the same holdout and record the decision (PROMOTE, REJECT,
    BLOCKED_BY_DATA or SKIPPED); the flow promotes only after PROMOTE. `override` ('promote' or
    'reject') needs a `reason`; both are recorded."""
    return run_step("gate", spec, date, store=store, tracking_uri=tracking_uri, override=override, reason=reason)


@task(name="promote_model", task_run_name="promote {date}", **_OPTS)
def promote_model(spec: str, date: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """Move the champion alias to the gated version (compare-and-set); under
    ``promotion.approval: manual``, tag it pending (result ``approval: pending``) instead."""
    return run_step("promote", spec, date, tracking_uri=tracking_uri)


@task(name="approve_model", task_run_name="{decision} v{version}", **(_OPTS | {"retries": 0}))
def approve_model(spec: str, version: str | int, reason: str, decision: str = "approve", by: str | None = None,
                  tracking_uri: str | None = None) -> dict[str, Any]:
    """Approve (promote, compare-and-set against the champion the gate saw) or reject a version
    waiting for approval (``promotion.approval: manual``); `reason` is required and recorded with
    `by` (default: the OS user). Not retried: a person is waiting for the answer."""
    from datetime import date

    return run_step("approve", spec, date.today(), tracking_uri=tracking_uri, version=version, reason=reason,
                    decision=decision, by=by)


@task(name="deploy_model", task_run_name="deploy {date}", **_OPTS)
def deploy_model(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                 url: str | None = None, require_endpoint: bool = False) -> dict[str, Any]:
    """Wait for the serving endpoint to serve the champion and check parity."""
    return run_step("deploy", spec, date, store=store, tracking_uri=tracking_uri, url=url,
                    require_endpoint=require_endpoint)


@task(name="batch_score", task_run_name="batch_score {date}", **_OPTS)
def batch_score(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                ray_address: str | None = None) -> dict[str, Any]:
    """Score the date's feature partition with the champion on Ray; publish the predictions."""
    return run_step("batch_score", spec, date, store=store, tracking_uri=tracking_uri, ray_address=ray_address)
