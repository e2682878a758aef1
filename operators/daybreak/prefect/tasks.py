"""Prefect tasks: each maps its arguments onto one daybreak step and returns the step's small dict.

- **Retries.** Transient failures (network, a registry restarting) retry twice, after 10 s and
  60 s; a bad spec or bad data fails at once. Steps are idempotent per date, so a retry after a
  crash is always safe.
- **Cache.** ``stage_data``, ``build_features``, ``train_model``, ``evaluate_gate`` and
  ``batch_score`` are cached by daybreak's lineage key (:func:`daybreak.steps.cache_key`): a
  rerun of a date whose outputs are recorded and whose inputs are unchanged is ``Cached`` and
  returns the persisted result without calling the step. A changed input, a deleted partition or
  model version, or ``force`` misses the cache. ``materialize_online``, ``monitor_model``, ``promote_model``,
  ``approve_model`` and ``deploy_model`` act on the registry (and the log) as it stands and always run;
  ``replay_gate`` only reads, and always runs.
- **Results** are persisted as JSON where Prefect's settings say (``PREFECT_LOCAL_STORAGE_PATH``, or a
  storage block in ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``); share it between workers for the
  cache to be shared.
- **Credentials** come from Prefect blocks named by ``storage_secret`` (S3: a Secret holding JSON,
  or prefect-aws's AwsCredentials or S3Bucket, which also gives the store; see
  :mod:`daybreak.prefect.storage`) and ``mlflow_secret`` (MLflow, a Secret); only the block names
  are task parameters, so values never reach Prefect's run records, logs or results. S3 refusing
  a block's keys fails the task at once (not retried) with an error naming the block.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from datetime import date as Date
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy

from daybreak.infra.errors import is_retryable
from daybreak.infra.records import Tag
from daybreak.prefect.storage import Storage, explain, resolve
from daybreak.prefect.storage import load_secret as _secret
from daybreak.steps import STEPS, cache_key, run_step, spec_and_context

log = logging.getLogger(__name__)

CACHE_FOR = timedelta(days=30)  # a cached result older than this is recomputed (the step's own skip then applies)


def storage_options(secret_block: str | None, store: str | None = None) -> Any:
    """S3 settings from the block named `secret_block`: a Secret holding JSON (endpoint_url,
    region, access_key, secret_key, session_token, all optional), an AwsCredentials or an S3Bucket
    block (:mod:`daybreak.prefect.storage`). None: from the environment."""
    return resolve(secret_block, store).options


def use_mlflow_secret(secret_block: str | None) -> None:
    """Export the MLflow credentials in a Secret block to this process's environment, which the
    MLflow client reads: a bare token, or JSON with ``token``, or ``username`` and ``password``
    (and optionally ``insecure_tls``)."""
    if not secret_block:
        return
    from daybreak.infra.registry import credential_env

    data = _secret(secret_block)
    creds = {"token": data} if isinstance(data, str) else data
    if not isinstance(creds, dict) or not (creds.get("token") or creds.get("password")):
        raise ValueError(f"Secret block {secret_block!r} must hold an MLflow token, or JSON with 'token', or "
                         "'username' and 'password'")
    os.environ.update(credential_env(**{k: creds.get(k) for k in ("token", "username", "password", "insecure_tls")}))


def _storage(inputs: dict[str, Any]) -> Storage:
    return resolve(inputs.get("storage_secret"), inputs.get("store"))


def _context(inputs: dict[str, Any], storage: Storage | None = None) -> dict[str, Any]:
    """The step's store, registry and S3 settings; an S3Bucket block gives the store."""
    use_mlflow_secret(inputs.get("mlflow_secret"))
    storage = storage or _storage(inputs)
    return {"store": storage.store, "tracking_uri": inputs.get("tracking_uri"), "storage": storage.options}


def _own_key(task_ctx: Any) -> str | None:
    """A key no other task run computes: Prefect persists a result only under a key known before
    the run, so this keeps every result readable (in the UI, by ``state.result()``) without
    making anything cacheable."""
    run = getattr(task_ctx, "task_run", None)
    return None if run is None else f"daybreak-task-run-{run.id}"


@dataclass
class ThisRun(CachePolicy):
    """Prefect cache policy that never reuses a result but persists each one."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return _own_key(task_ctx)


@dataclass
class Lineage(CachePolicy):
    """Prefect cache policy keyed by daybreak's lineage of what `step` recorded for the date
    (:func:`daybreak.steps.cache_key`); with nothing recorded yet, the run's own key."""

    step: str = ""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return self.lineage_key(inputs) or _own_key(task_ctx)

    def lineage_key(self, inputs: dict[str, Any]) -> str | None:
        if inputs.get("force") or inputs.get("override"):
            return None
        try:
            return cache_key(self.step, inputs["spec"], inputs["date"], **_context(inputs))
        except Exception as e:  # the step will run and report the problem properly
            log.warning("%s: no cache key (%s: %s); the step runs", self.step, type(e).__name__, e)
            return None


def _run(step: str, spec: str, date: str | Date, *, store: str | None = None, tracking_uri: str | None = None,
         storage_secret: str | None = None, mlflow_secret: str | None = None, **options: Any) -> dict[str, Any]:
    where = {"store": store, "tracking_uri": tracking_uri, "storage_secret": storage_secret,
             "mlflow_secret": mlflow_secret}
    storage = _storage(where)
    ctx = _context(where, storage)
    try:
        result = run_step(step, spec, date, store=ctx["store"], tracking_uri=tracking_uri, storage=ctx["storage"],
                          **options)
    except Exception as e:
        named = explain(e, storage)  # S3 refusing a block's keys: say which block
        if named is e:
            raise
        raise named from e
    _remember(step, spec, date, result, ctx)
    return result


def not_run(step: str, spec: str, date: str | Date, done: dict[str, Any], **where: Any) -> dict[str, Any]:
    """A cycle step's result when its condition says it does not run (promote after the gate said
    no: the champion in service), from the core function run_cycle reports it with. Not a task:
    no step runs. `where` as the step's task is told (store, tracking_uri, the Secret block names)."""
    ctx = _context(where)
    s, run_ctx = spec_and_context(spec, date, store=ctx["store"], tracking_uri=where.get("tracking_uri"),
                                  storage=ctx["storage"])
    return STEPS[step].not_run(s, run_ctx, done)


def _remember(step: str, spec: str, date: str | Date, result: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Persist the result under the key the next run of the date will compute (before this run
    the output did not exist, so this run had its own key), so that run finds it."""
    from prefect.context import TaskRunContext

    run = TaskRunContext.get()
    if run is None or not getattr(run.task, "cache_policy", None) or not isinstance(run.task.cache_policy, Lineage):
        return  # called as a plain function (task.fn) or with caching turned off
    try:
        key = cache_key(step, spec, date, result=result, **ctx)
        if key:
            # typed as Prefect's pendulum DateTime before Python 3.13; its metadata model converts a datetime
            run.result_store.write(result, key=key, expiration=datetime.now(UTC) + CACHE_FOR)  # type: ignore[arg-type]
    except Exception as e:  # a cache is an optimisation: the step's result stands
        log.warning("%s: result not cached (%s: %s)", step, type(e).__name__, e)


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    return is_retryable(state.data) if isinstance(state.data, BaseException) else True


def _opts(step: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [10, 60], "retry_condition_fn": _retry_if_transient,
                            "log_prints": True, "persist_result": True, "result_serializer": "json"}
    if step:
        opts |= {"cache_policy": Lineage(step=step), "cache_expiration": CACHE_FOR}
    else:
        opts["cache_policy"] = ThisRun()
    return opts


@task(name="stage_data", task_run_name="stage {date}", **_opts("stage"))
def stage_data(spec: str, date: str, store: str | None = None, storage_secret: str | None = None) -> dict[str, Any]:
    """Stage the day's landing files into validated Parquet partitions.

    `storage_secret` names a Secret, AwsCredentials or S3Bucket block with the S3 settings (never
    printed); an S3Bucket block's bucket and folder are the store."""
    return _run("stage", spec, date, store=store, storage_secret=storage_secret)


@task(name="build_features", task_run_name="features {date}", **_opts("features"))
def build_features(spec: str, date: str, store: str | None = None, ray_address: str | None = None,
                   storage_secret: str | None = None) -> dict[str, Any]:
    """Build the day's point-in-time feature partition on Ray."""
    return _run("features", spec, date, store=store, ray_address=ray_address, storage_secret=storage_secret)


@task(name="materialize_online", task_run_name="online {date}", **_opts(None))
def materialize_online(spec: str, date: str, store: str | None = None,
                       storage_secret: str | None = None) -> dict[str, Any]:
    """Materialize the online store as of the end of the date from its staged data, when the spec
    sets ``online.materialize`` (else it returns ``enabled: false`` and opens nothing). The store
    is ``DAYBREAK_ONLINE_URL`` in the worker's environment, else the embedded SQLite file; the
    result names the backend, never the URL. Always runs: the store is live state, not an output
    recorded with a lineage."""
    return _run("online", spec, date, store=store, storage_secret=storage_secret)


@task(name="monitor_model", task_run_name="monitor {date}", **_opts(None))
def monitor_model(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                  storage_secret: str | None = None, mlflow_secret: str | None = None) -> dict[str, Any]:
    """Judge the model in service on the day's logged predictions and labels; roll it back when it
    must (see ``daybreak.monitor``). A rollback or an alert is also a Prefect event,
    ``daybreak.model.rolled_back`` / ``daybreak.model.alert`` on resource ``daybreak.model.<name>``,
    for an Automation to act on (notify, page, pause a deployment)."""
    result = _run("monitor", spec, date, store=store, tracking_uri=tracking_uri, storage_secret=storage_secret,
                  mlflow_secret=mlflow_secret)
    if result.get("notification"):
        from prefect.events import emit_event

        n = result["notification"]
        emit_event(event=n["event"], resource={"prefect.resource.id": f"{Tag.EVENT_PREFIX}{result['model']}",
                                               "prefect.resource.name": result["model"]},
                   payload={k: v for k, v in n.items() if k != "event"})
    return result


@task(name="train_model", task_run_name="train {date}", **_opts("train"))
def train_model(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                force: bool = False, storage_secret: str | None = None,
                mlflow_secret: str | None = None) -> dict[str, Any]:
    """Train on the look-back window and register a model version with lineage; `force` trains a
    new version even if this lineage has one (and bypasses the cache)."""
    return _run("train", spec, date, store=store, tracking_uri=tracking_uri, storage_secret=storage_secret,
                mlflow_secret=mlflow_secret, force=force)


@task(name="evaluate_gate", task_run_name="gate {date}", **_opts("gate"))
def evaluate_gate(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                  override: str | None = None, reason: str | None = None, storage_secret: str | None = None,
                  mlflow_secret: str | None = None) -> dict[str, Any]:
    """Score candidate and champion on the same holdout and record the decision (PROMOTE, REJECT,
    BLOCKED_BY_DATA or SKIPPED); the flow promotes only after PROMOTE. `override` ('promote' or
    'reject') needs a `reason`; both are recorded."""
    return _run("gate", spec, date, store=store, tracking_uri=tracking_uri, storage_secret=storage_secret,
                mlflow_secret=mlflow_secret, override=override, reason=reason)


@task(name="promote_model", task_run_name="promote {date}", **_opts(None))
def promote_model(spec: str, date: str, tracking_uri: str | None = None, dry_run: bool = False,
                  mlflow_secret: str | None = None) -> dict[str, Any]:
    """Move the champion alias to the gated version (compare-and-set); under
    ``promotion.approval: manual``, tag it pending (result ``approval: pending``) instead.
    `dry_run` runs every check and says what it would do."""
    return _run("promote", spec, date, tracking_uri=tracking_uri, mlflow_secret=mlflow_secret, dry_run=dry_run)


@task(name="approve_model", task_run_name="{decision} v{version}", **(_opts(None) | {"retries": 0}))
def approve_model(spec: str, version: str | int, reason: str, decision: str = "approve", by: str | None = None,
                  tracking_uri: str | None = None, mlflow_secret: str | None = None) -> dict[str, Any]:
    """Approve (promote, compare-and-set against the champion the gate saw) or reject a version
    waiting for approval (``promotion.approval: manual``); `reason` is required and recorded with
    `by` (default: the OS user). Not retried: a person is waiting for the answer."""
    return _run("approve", spec, Date.today(), tracking_uri=tracking_uri, mlflow_secret=mlflow_secret,
                version=version, reason=reason, decision=decision, by=by)


@task(name="deploy_model", task_run_name="deploy {date}", **_opts(None))
def deploy_model(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                 url: str | None = None, require_endpoint: bool = False, storage_secret: str | None = None,
                 mlflow_secret: str | None = None) -> dict[str, Any]:
    """Wait for the serving endpoint to serve the champion and check parity."""
    return _run("deploy", spec, date, store=store, tracking_uri=tracking_uri, storage_secret=storage_secret,
                mlflow_secret=mlflow_secret, url=url, require_endpoint=require_endpoint)


@task(name="batch_score", task_run_name="batch_score {date}", **_opts("batch_score"))
def batch_score(spec: str, date: str, store: str | None = None, tracking_uri: str | None = None,
                ray_address: str | None = None, storage_secret: str | None = None,
                mlflow_secret: str | None = None) -> dict[str, Any]:
    """Score the date's feature partition with the champion on Ray; publish the predictions."""
    return _run("batch_score", spec, date, store=store, tracking_uri=tracking_uri, ray_address=ray_address,
                storage_secret=storage_secret, mlflow_secret=mlflow_secret)


@task(name="replay_gate", task_run_name="replay gate {start}..{end}", **_opts(None))
def replay_gate(spec: str, start: str, end: str, policy: str | None = None, tracking_uri: str | None = None,
                mlflow_secret: str | None = None) -> dict[str, Any]:
    """Re-judge the recorded gate decisions from `start` to `end` under `policy` (a YAML file with
    a top-level ``gate:``; default: the spec's own gate), from the gate runs' records alone.
    Read-only: nothing is tagged, logged or promoted. Never cached (the registry may change)."""
    return _run("replay", spec, end, tracking_uri=tracking_uri, mlflow_secret=mlflow_secret, start=start, end=end,
                policy=policy)
