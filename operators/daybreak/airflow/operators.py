from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from airflow.sdk import BaseOperator, SkipMixin


def storage_options(conn_id: str | None) -> Any:
    """S3 settings from an Airflow Connection; None: from the environment (see ``daybreak.airflow.hooks``)."""
    from daybreak.airflow.hooks import storage_options as from_connection

    return from_connection(conn_id)


def ray_cluster_address(conn_id: str | None) -> str | None:
    """A Ray cluster address from an Airflow Connection; None: ``$RAY_ADDRESS`` or a local Ray
    (see ``daybreak.airflow.hooks.RayHook``)."""
    from daybreak.airflow.hooks import ray_cluster_address as from_connection

    return from_connection(conn_id)


def mlflow_tracking_uri(conn_id: str | None) -> str | None:
    """The tracking URI of an MLflow Connection, its credentials exported for this process;
    None: ``$MLFLOW_TRACKING_URI`` or the embedded SQLite (see ``daybreak.airflow.hooks.MlflowHook``)."""
    from daybreak.airflow.hooks import mlflow_tracking_uri as from_connection

    return from_connection(conn_id)


def default_deferrable() -> bool:
    """What ``deferrable=None`` means: True (wait in the triggerer, free the worker slot), unless
    the deployment turns deferral off by environment, ``AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE``
    (or its ``_CMD`` / ``_SECRET`` forms) false, as Airflow's own deferrable operators read
    ``operators.default_deferrable``. Airflow writes that option's default (false) into every
    airflow.cfg it generates, so a false there is not read as a choice; true there is True anyway."""
    import os

    if not any(os.environ.get(f"AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE{suffix}") for suffix in ("", "_CMD", "_SECRET")):
        return True
    from airflow.sdk.configuration import conf

    return conf.getboolean("operators", "default_deferrable", fallback=True)


def partition_date(context: Any) -> Any:
    """The run's partition key when it is a date (``YYYY-MM-DD``, or a datetime key such as
    ``CronPartitionTimetable``'s), else None: a partitioned run processes its partition's date."""
    from daybreak.infra.context import parse_date

    key = context.get("partition_key") or getattr(context.get("dag_run"), "partition_key", None)
    if not key or not isinstance(key, str):
        return None
    try:
        return parse_date(key[:10])
    except ValueError:
        return None


# Executors that run every task on the scheduler's machine; any other (Celery, Kubernetes, Edge,
# ECS, ...) may run the next task elsewhere, so local paths cannot carry data between tasks.
LOCAL_EXECUTORS = ("LocalExecutor", "SequentialExecutor", "DebugExecutor")


def distributed_executor(task_executor: str | None = None) -> str | None:
    """"Airflow's <Executor>" when the task's executor (its own, else the first configured) may
    run tasks on several machines; None for a local one."""
    from airflow.sdk.configuration import conf

    name = task_executor or (conf.get("core", "executor", fallback="") or "LocalExecutor").split(",")[0]
    cls = name.strip().rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    return None if not cls or cls in LOCAL_EXECUTORS else f"Airflow's {cls}"


class DaybreakStepOperator(BaseOperator):
    """Run one daybreak step for a logical date.

    :param spec: path to the pipeline spec (templated).
    :param logical_date: date to process, YYYY-MM-DD (templated). Empty: the run's partition key
        when it is a date (a partitioned run: ``PartitionedAssetTimetable``, ``CronPartitionTimetable``),
        else its logical date, or its run-after date for runs without one (asset-triggered).
    :param store: store root; default ``$DAYBREAK_STORE`` / ``$DAYBREAK_HOME/store``.
    :param tracking_uri: MLflow tracking URI; default ``$MLFLOW_TRACKING_URI``.
    :param ray_address: Ray cluster address; default ``$RAY_ADDRESS`` or a local Ray.
    :param ray_conn_id: Airflow Connection naming the Ray cluster (host and GCS port, or extra
        ``address``; password = auth token); used when ``ray_address`` is not given.
    :param mlflow_conn_id: Airflow Connection (type ``mlflow``) naming the tracking server (host =
        tracking URI, password = token); used when ``tracking_uri`` is not given.
    :param aws_conn_id: Airflow Connection with S3 credentials (login = access key, password =
        secret key, extra ``endpoint_url`` / ``region_name``); default: the environment.
    """

    step: ClassVar[str] = ""
    template_fields: Sequence[str] = ("spec", "logical_date", "store", "tracking_uri", "ray_address", "aws_conn_id",
                                      "ray_conn_id", "mlflow_conn_id")
    ui_color = "#fde9c4"

    def __init__(self, *, spec: str, logical_date: str | None = None, store: str | None = None,
                 tracking_uri: str | None = None, ray_address: str | None = None, aws_conn_id: str | None = None,
                 ray_conn_id: str | None = None, mlflow_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id
        self.aws_conn_id = aws_conn_id
        self.ray_conn_id = ray_conn_id
        self.spec = spec
        self.logical_date = logical_date
        self.store = store
        self.tracking_uri = tracking_uri
        self.ray_address = ray_address

    def step_options(self, context: Any) -> dict[str, Any]:
        return {}

    def fallback_dates(self, context: Any) -> list[Any]:
        """Dates to try after the explicit one and the run's logical date, before its run-after."""
        return []

    def execute(self, context: Any) -> dict[str, Any]:
        result = self.call_step(context, self.step, **self.step_options(context))
        self.emit_asset_events(context, result)
        return result

    def call_step(self, context: Any, step: str, **options: Any) -> dict[str, Any]:
        """The step's result; on a day the spec's calendar expects no drop the task is skipped
        (its XCom holds the step's ``expected: false`` result) and so, by trigger rule, are the
        tasks after it: nothing runs, and nothing fails. A step the spec does not turn on
        (``enabled: false``, e.g. online without ``online.materialize``) is skipped the same way."""
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from daybreak.infra.errors import is_retryable
        from daybreak.steps import is_enabled, is_expected, run_step

        try:
            day = self.resolve_day(context)
            result = run_step(step, self.spec, day, run_id=context.get("run_id"), store=self.store,
                              tracking_uri=self.tracking_uri or mlflow_tracking_uri(self.mlflow_conn_id),
                              ray_address=self.ray_address or ray_cluster_address(self.ray_conn_id),
                              storage=storage_options(self.aws_conn_id),
                              distributed=distributed_executor(getattr(self, "executor", None)), **options)
        except Exception as e:
            if is_retryable(e):
                raise
            # A bad spec or bad data will not get better on retry: fail the task now.
            raise AirflowFailException(f"{type(e).__name__}: {e}") from e
        if not is_expected(result) or not is_enabled(result):
            context["ti"].xcom_push(key="return_value", value=result)
            raise AirflowSkipException(f"{step}: {result.get('reason')}")
        return result

    def resolve_day(self, context: Any) -> Any:
        """The date this task processes: the explicit one, the run's partition (a date), its
        logical date, the operator's fallbacks, its run-after time."""
        from daybreak.steps import resolve_date

        return resolve_date(self.logical_date, partition_date(context), context.get("logical_date"),
                            *self.fallback_dates(context), getattr(context.get("dag_run"), "run_after", None))

    def spec_and_context(self, context: Any) -> tuple[Any, Any]:
        """The spec and the run context of this task's date (as the step gets them), for the
        checks a deferrable task makes before it defers."""
        from daybreak.steps import spec_and_context

        return spec_and_context(self.spec, self.resolve_day(context), run_id=context.get("run_id"), store=self.store,
                                tracking_uri=self.tracking_uri or mlflow_tracking_uri(self.mlflow_conn_id),
                                storage=storage_options(self.aws_conn_id))

    def emit_asset_events(self, context: Any, result: dict[str, Any]) -> None:
        """Which date and how much on each outlet Asset's event, the date being the event's
        partition key too (Airflow 3.2+: a ``PartitionedAssetTimetable`` DAG runs for that date);
        through an AssetAlias outlet (promote, approve) a ``champion_asset`` event only when the
        champion moved."""
        from airflow.sdk import AssetAlias

        for outlet in self.outlets or []:
            if isinstance(outlet, AssetAlias):
                champion = getattr(self, "champion_asset", None)
                if champion is not None and result.get("promoted"):
                    context["outlet_events"][outlet].add(champion, extra={
                        "version": result.get("champion_version"), "previous_version": result.get("previous_version"),
                        "date": result.get("date"), "step": self.step})
            else:
                event = context["outlet_events"][outlet]
                event.extra = {"date": result.get("date"), "step": self.step, "rows": result.get("rows")} | (
                    {"model_version": result["model_version"]} if result.get("model_version") else {})
                if result.get("date") and hasattr(event, "add_partitions"):  # Airflow 3.2+
                    event.add_partitions(str(result["date"]))


class StageDataOperator(DaybreakStepOperator):
    """Stage the day's landing files into validated Parquet partitions."""

    step = "stage"


class BuildFeaturesOperator(DaybreakStepOperator):
    """Build the day's point-in-time feature partition on Ray."""

    step = "features"


class MaterializeOnlineOperator(DaybreakStepOperator):
    """Materialize the online store (what ``daybreak serve`` computes raw rows' features from) as of
    the end of the date, from its staged data; skipped unless the spec sets ``online.materialize``.

    The store is ``DAYBREAK_ONLINE_URL`` in the worker's environment (a Redis server), else the
    embedded SQLite file in ``$DAYBREAK_HOME/online/``; the XCom names the backend, never the URL.
    """

    step = "online"
    ui_color = "#dff2e1"


class MonitorModelOperator(DaybreakStepOperator):
    """Judge the model in service on the day's logged predictions once its labels are staged:
    live metrics per version and slice, drift against its training data, and an automatic
    rollback to ``previous`` when it is below the floor or clearly worse (see ``daybreak.monitor``).

    :param on_rollback: called as ``on_rollback(context, result)`` after an automatic rollback
        (an Airflow-side notification: Slack, email, a page), like a task callback.
    :param on_alert: called as ``on_alert(context, result)`` when monitoring raised an alert it did
        not act on (the champion below its floor with nothing better to roll back to).

    A blocking drift fails the task (``monitoring.drift.block_psi``), so the day's training and
    promotion do not run; everything is recorded first.
    """

    step = "monitor"
    ui_color = "#d4e6f9"

    def __init__(self, *, on_rollback: Any = None, on_alert: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_rollback, self.on_alert = on_rollback, on_alert

    def execute(self, context: Any) -> dict[str, Any]:
        result = super().execute(context)
        hook = {"rollback": self.on_rollback, "alert": self.on_alert}.get(result.get("action", ""))
        if hook is not None:
            hook(context, result)
        return result


def flag(value: Any) -> bool:
    """A templated boolean: templates render ``True``/``False`` as strings."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v not in ("true", "false", "1", "0", "", "none", "yes", "no"):
            raise ValueError(f"{value!r} is not a boolean (true or false)")
        return v in ("true", "1", "yes")
    return bool(value)


def _with_champion_alias(outlets: Any, champion_asset: Any) -> list[Any]:
    from daybreak.airflow.assets import CHAMPION_CHANGES

    outlets = list(outlets or [])
    if champion_asset is not None and CHAMPION_CHANGES not in outlets:
        outlets.append(CHAMPION_CHANGES)
    return outlets


class TrainModelOperator(DaybreakStepOperator):
    """Train on the look-back window and register a model version with lineage.

    :param force: retrain and register a new version even if this date's lineage has one
        (templated; ``"True"``/``"False"`` accepted).
    """

    step = "train"
    template_fields: Sequence[str] = (*DaybreakStepOperator.template_fields, "force")

    def __init__(self, *, force: bool | str = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.force = force

    def step_options(self, context: Any) -> dict[str, Any]:
        return {"force": flag(self.force)}


class EvaluateGateOperator(DaybreakStepOperator, SkipMixin):
    """Score candidate and champion on the same holdout and record the decision.

    After anything but PROMOTE the tasks downstream do not run: with ``on_reject="skip"`` the tasks
    right after it are skipped and the skip spreads by trigger rule (this task succeeds, its XCom
    holds the decision), with ``"fail"`` this task fails.
    No candidate for the date (SKIPPED) always skips.

    :param on_reject: ``skip`` or ``fail``; default: the spec's ``gate.on_reject``.
    :param override: ``promote`` or ``reject`` to replace the computed decision (templated).
    :param override_reason: required with ``override``; recorded with the decision (templated).
    """

    step = "gate"
    template_fields: Sequence[str] = (*DaybreakStepOperator.template_fields, "on_reject", "override",
                                      "override_reason")

    def __init__(self, *, on_reject: str | None = None, override: str | None = None,
                 override_reason: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.on_reject = on_reject
        self.override = override
        self.override_reason = override_reason

    def step_options(self, context: Any) -> dict[str, Any]:
        return {"override": self.override or None, "reason": self.override_reason or None}

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowFailException

        from daybreak.gate import SKIPPED, should_promote
        from daybreak.spec import load_spec

        result = super().execute(context)
        if should_promote(result):
            return result
        decision = result.get("decision")
        policy = self.on_reject or load_spec(self.spec).gate.on_reject
        if policy not in ("skip", "fail"):
            raise AirflowFailException(f"on_reject must be 'skip' or 'fail', not {policy!r}")
        failed = [f"{r['rule']}={r.get('value')} (threshold {r.get('threshold')})"
                  for r in result.get("rules", []) if r.get("verdict") == "fail"]
        message = f"gate {result.get('date')}: {decision} candidate v{result.get('candidate_version')}" + (
            f"; failed: {', '.join(failed)}" if failed else f" ({result.get('reason', '')})")
        if policy == "fail" and decision != SKIPPED:
            raise AirflowFailException(message)
        return skip_downstream(self, context, result, message)


def skip_downstream(op: Any, context: Any, result: dict[str, Any], message: str) -> dict[str, Any]:
    """Skip the direct downstream tasks of `op` (a SkipMixin); the scheduler carries the skip on
    by each task's trigger rule (an all_done alert or cleanup task still runs). The task succeeds
    and its XCom holds `result`."""
    op.log.info("%s; skipping the tasks downstream", message)
    context["ti"].xcom_push(key="return_value", value=result)
    op.skip(ti=context["ti"], tasks=context["task"].downstream_list)
    return result  # not reached when there are tasks to skip


class PromoteModelOperator(DaybreakStepOperator, SkipMixin):
    """Move the champion alias to the gated version (compare-and-set).

    Under ``promotion.approval: manual`` the version is tagged pending instead and the tasks
    downstream (deploy) are skipped: nothing moved. Approve it with the ``daybreak_approve`` DAG
    (``ApproveModelOperator``) or ``daybreak approve``, or here with ``approve_pending``.

    :param dry_run: check everything and say what would happen (XCom ``would``), move nothing;
        the task is skipped, and so are the tasks after it (templated).
    :param approve_pending: approve the version this task tags pending, as the user who triggered
        the run (templated).
    :param champion_asset: an Asset that gets an event (extra: version, previous_version, date)
        each time the champion moves, through the ``daybreak.champion.changes`` alias outlet.
    """

    step = "promote"
    template_fields: Sequence[str] = (*DaybreakStepOperator.template_fields, "dry_run", "approve_pending")

    def __init__(self, *, dry_run: bool | str = False, approve_pending: bool | str = False,
                 champion_asset: Any = None, **kwargs: Any) -> None:
        kwargs["outlets"] = _with_champion_alias(kwargs.get("outlets"), champion_asset)
        super().__init__(**kwargs)
        # the templated parameter shadows BaseOperator.dry_run(), a debugging helper Airflow never calls
        self.dry_run = dry_run  # type: ignore[method-assign,assignment]
        self.approve_pending = approve_pending
        self.champion_asset = champion_asset

    def step_options(self, context: Any) -> dict[str, Any]:
        return {"dry_run": flag(self.dry_run)}

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from daybreak.promote import PENDING, should_deploy

        result = self.call_step(context, self.step, **self.step_options(context))
        if result.get("dry_run"):
            context["ti"].xcom_push(key="return_value", value=result)
            raise AirflowSkipException(f"promote {result.get('date')}: {result.get('reason')}")
        if result.get("approval") == PENDING and flag(self.approve_pending):
            user = getattr(context.get("dag_run"), "triggering_user_name", None)
            approved = self.call_step(context, "approve", version=result["candidate_version"], decision="approve",
                                      reason=f"approve_pending set when run {context.get('run_id')} was triggered",
                                      by=user or None)
            result = result | {k: approved.get(k) for k in ("approval", "promoted", "champion_version",
                                                            "previous_version", "by", "reason")}
        self.emit_asset_events(context, result)
        if should_deploy(result):
            return result
        return skip_downstream(self, context, result, f"promote {result.get('date')}: {result.get('reason')}")


class ApproveModelOperator(DaybreakStepOperator):
    """Approve (promote) or reject a version waiting for approval (``promotion.approval: manual``).

    Approving moves the champion only if it is still the version the gate compared against;
    otherwise the task fails saying the version must be re-gated, and nothing changes. Recorded in
    the audit history with the reason and the user who triggered the DAG run.

    :param version: the model version (templated).
    :param reason: why; required (templated).
    :param decision: ``approve`` or ``reject`` (templated).
    :param champion_asset: an Asset that gets an event when the approval moves the champion.
    """

    step = "approve"
    template_fields: Sequence[str] = (*DaybreakStepOperator.template_fields, "version", "reason", "decision")

    def __init__(self, *, version: str | int, reason: str, decision: str = "approve", champion_asset: Any = None,
                 **kwargs: Any) -> None:
        kwargs["outlets"] = _with_champion_alias(kwargs.get("outlets"), champion_asset)
        super().__init__(**kwargs)
        self.version = version
        self.reason = reason
        self.decision = decision
        self.champion_asset = champion_asset

    def step_options(self, context: Any) -> dict[str, Any]:
        user = getattr(context.get("dag_run"), "triggering_user_name", None)
        return {"version": self.version, "reason": self.reason, "decision": self.decision, "by": user or None}


class DeployWaitTimeout(Exception):
    """The endpoint did not report the champion before the deploy's deadline (the task retries)."""


class DeployModelOperator(DaybreakStepOperator):
    """Wait for the serving endpoint to serve the champion and check parity.

    Deferrable (the default): the task asks the endpoint to check the alias now (``POST
    /refresh``) and, unless it already serves the champion, defers: the wait runs in Airflow's
    triggerer (:class:`~daybreak.airflow.triggers.ServedVersionTrigger` polls ``GET /version``),
    the worker slot and the pool slot are free meanwhile. Once the endpoint reports the champion
    the task resumes on a worker and runs the deploy step, which checks parity at once. Without an
    endpoint, or without a champion, there is nothing to wait for: the step runs and says so.

    :param serve_url: endpoint; default ``$DAYBREAK_SERVE_URL`` or the spec's serving host/port.
    :param require_endpoint: fail when no endpoint answers (default: report and succeed).
    :param deferrable: wait in the triggerer; None: True unless
        ``AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE`` is false (:func:`default_deferrable`). False:
        the step waits in the worker, as before.
    :param poll_interval: seconds between two ``/version`` requests of the trigger.
    :param wait_timeout: seconds to wait for the endpoint; default the step's own
        (3 x ``serving.poll_seconds`` + 60). Past it the task fails and retries.
    :param replicas: a replicated server: how many replicas must serve the champion (default: as
        many as it was started with).
    """

    step = "deploy"
    template_fields: Sequence[str] = (*DaybreakStepOperator.template_fields, "serve_url", "dry_run")

    def __init__(self, *, serve_url: str | None = None, require_endpoint: bool = False, dry_run: bool | str = False,
                 deferrable: bool | None = None, poll_interval: float = 1.0, wait_timeout: float | None = None,
                 replicas: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.serve_url = serve_url
        self.require_endpoint = require_endpoint
        # the templated parameter shadows BaseOperator.dry_run(), a debugging helper Airflow never calls
        self.dry_run = dry_run  # type: ignore[method-assign,assignment]
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self.poll_interval = poll_interval
        self.wait_timeout = wait_timeout
        self.replicas = replicas

    def step_options(self, context: Any) -> dict[str, Any]:
        options: dict[str, Any] = {"url": self.serve_url or None, "require_endpoint": self.require_endpoint}
        if self.replicas:
            options["replicas"] = self.replicas
        return options

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        if flag(self.dry_run):
            raise AirflowSkipException(f"dry run: would wait for {self.serve_url or 'the endpoint'} to serve the "
                                       "champion and check parity")
        if self.deferrable:
            try:
                wait = self.wait_for(context)
            except Exception as e:  # the step makes the same calls and says (and classifies) what fails
                self.log.warning("deploy: could not tell whether to wait in the triggerer (%s: %s); running the step",
                                 type(e).__name__, e)
                wait = None
            if wait is not None:
                from datetime import timedelta

                from daybreak.airflow.triggers import ServedVersionTrigger

                self.log.info("deploy: %s does not serve champion v%s yet; waiting in the triggerer (up to %.0f s)",
                              wait["url"], wait["version"], wait["timeout"])
                self.defer(trigger=ServedVersionTrigger(url=wait["url"], version=wait["version"],
                                                        replicas=self.replicas, poll_interval=self.poll_interval,
                                                        timeout=wait["timeout"]),
                           method_name="execute_complete", timeout=timedelta(seconds=wait["timeout"] + 120))
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Back from the triggerer: the endpoint serves the champion (run the step: parity), or
        the wait timed out (fail; the task retries)."""
        event = event or {}
        if event.get("status") != "served":
            info = event.get("info") or {}
            seen = info.get("committed", info.get("version")) if info else event.get("error")
            raise DeployWaitTimeout(f"endpoint {event.get('url')} did not serve champion v{event.get('version')} in "
                                    f"time (last seen: {seen}; replicas: {info.get('replicas')})")
        self.log.info("deploy: %s serves champion v%s; checking parity", event.get("url"), event.get("version"))
        return super().execute(context)

    def wait_for(self, context: Any) -> dict[str, Any] | None:
        """What to wait for (url, version, timeout), or None when there is nothing to wait for:
        no champion, no endpoint (the step reports it, or fails with ``require_endpoint``), or the
        endpoint serves the champion already."""
        import os

        import httpx

        from daybreak.airflow.triggers import serves
        from daybreak.infra import registry

        spec, ctx = self.spec_and_context(context)
        registry.setup_tracking(ctx, spec.name)
        champ = registry.alias_version(registry.client(ctx), spec.model.name, spec.promotion.alias)
        if champ is None:
            return None
        url = (self.serve_url or os.environ.get("DAYBREAK_SERVE_URL")
               or f"http://{spec.serving.host}:{spec.serving.port}").rstrip("/")
        want = str(champ.version)
        token = os.environ.get("DAYBREAK_SERVE_TOKEN")
        try:
            httpx.get(f"{url}/ping", timeout=2.0)
            # ask for a check now (best effort: the step says why when it is refused); then look
            httpx.post(f"{url}/refresh", headers={"Authorization": f"Bearer {token}"} if token else None,
                       timeout=30.0)
            info = httpx.get(f"{url}/version", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return None
        if isinstance(info, dict) and serves(info, want, self.replicas):
            return None
        timeout = self.wait_timeout if self.wait_timeout is not None else 3 * spec.serving.poll_seconds + 60
        return {"url": url, "version": want, "timeout": float(timeout)}


class BatchScoreOperator(DaybreakStepOperator):
    """Score the date's feature partition with the champion on Ray; publish the predictions.

    Without ``logical_date``: in a partitioned run (``daybreak_partition_score``, scheduled on the
    partitioned ``daybreak.features`` Asset) the partition's date; in a run that has neither
    (asset-triggered on the champion) the ``date`` in the extra of the newest triggering asset
    event (a ``champion_asset`` event carries the date the promoting run processed), else the date
    the champion was trained for. An outlet Asset gets an event for the date (its partition key).

    :param skip_without_champion: skip (rather than fail) when there is no champion to score with
        yet (the first days of a new pipeline, scored as their features are built).
    """

    step = "batch_score"

    def __init__(self, *, skip_without_champion: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skip_without_champion = skip_without_champion

    def fallback_dates(self, context: Any) -> list[Any]:
        events = [e for evs in (context.get("triggering_asset_events") or {}).values() for e in evs
                  if (getattr(e, "extra", None) or {}).get("date")]
        events.sort(key=lambda e: str(getattr(e, "timestamp", "")))
        return [events[-1].extra["date"]] if events else []

    def step_options(self, context: Any) -> dict[str, Any]:
        from daybreak.steps import resolve_date

        try:
            resolve_date(self.logical_date, partition_date(context), context.get("logical_date"),
                         *self.fallback_dates(context))
            return {}
        except ValueError:  # no date anywhere: the run-after date is a placeholder, the champion's date wins
            return {"champion_date": True}

    def execute(self, context: Any) -> dict[str, Any]:
        if self.skip_without_champion:
            from airflow.sdk.exceptions import AirflowSkipException

            from daybreak.infra import registry

            spec, ctx = self.spec_and_context(context)
            registry.setup_tracking(ctx, spec.name)
            if registry.alias_version(registry.client(ctx), spec.model.name, spec.promotion.alias) is None:
                raise AirflowSkipException(f"batch_score {ctx.logical_date}: {spec.model.name} has no "
                                           f"{spec.promotion.alias!r} to score with yet")
        return super().execute(context)


class ReplayGateOperator(DaybreakStepOperator):
    """Re-judge the recorded gate decisions of a date range under another gate policy, from the
    gate runs' records alone (``daybreak.gate.replay``): read-only, nothing is tagged, logged or
    promoted. The XCom holds every day's recorded and replayed decision and the summary.

    :param start: first date (templated); default: the run's logical date.
    :param end: last date (templated); default: ``start``, or the run's logical date.
    :param policy: a YAML file with a top-level ``gate:`` section replacing the spec's (templated);
        default: the spec's own gate.
    """

    step = "replay"
    template_fields: Sequence[str] = (*DaybreakStepOperator.template_fields, "start", "end", "policy")
    ui_color = "#e8e0f5"

    def __init__(self, *, start: str | None = None, end: str | None = None, policy: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start = start
        self.end = end
        self.policy = policy

    @staticmethod
    def _given(v: Any) -> Any:
        return None if v is None or (isinstance(v, str) and v.strip() in ("", "None", "null")) else v

    def fallback_dates(self, context: Any) -> list[Any]:
        """Without a logical date (a manual run with only start and end): the range's end."""
        return [d for d in (self._given(self.end), self._given(self.start)) if d is not None]

    def step_options(self, context: Any) -> dict[str, Any]:
        return {"start": self._given(self.start), "end": self._given(self.end), "policy": self._given(self.policy)}
