"""Prefect flows: the daily cycle, a backfill of a date range, and a person's approval.

Where things live is a flow parameter, else a key of the Prefect Variable ``daybreak`` (a JSON
object), else the environment (``DAYBREAK_SPEC``, ``DAYBREAK_STORE``, ``MLFLOW_TRACKING_URI``,
``RAY_ADDRESS``, ``DAYBREAK_SERVE_URL``) and daybreak's embedded defaults. Keys: spec, store,
tracking_uri, ray_address, serve_url, and the names of the blocks holding credentials:
storage_secret (S3) and mlflow_secret (MLflow, a Secret block).

``storage_secret`` takes the name of a block of any of three types, told apart by the block's
type in Prefect (:mod:`daybreak.prefect.storage`): a Secret holding JSON (endpoint_url, region,
access_key, secret_key, session_token), a prefect-aws AwsCredentials block (keys, session token,
region, profile, ``aws_client_parameters.endpoint_url``), or a prefect-aws S3Bucket block, whose
credentials reach S3 and whose bucket and folder are the store (``store`` may then be left out).
prefect-aws is needed only for its blocks.

The `flows/` folder of the repository re-exports these flows as deployment entry points.
"""

from __future__ import annotations

import os
from datetime import UTC
from typing import Any, Literal, TypedDict

from prefect import flow, get_run_logger

from daybreak.cycle import summarize
from daybreak.infra.context import date_range, parse_date
from daybreak.prefect.tasks import (
    approve_model,
    build_features,
    deploy_model,
    evaluate_gate,
    materialize_online,
    monitor_model,
    not_run,
    promote_model,
    stage_data,
    train_model,
)
from daybreak.spec import load_spec
from daybreak.steps import CYCLE, CycleOptions

SETTINGS = ("spec", "store", "tracking_uri", "ray_address", "serve_url", "storage_secret", "mlflow_secret")
VARIABLE = "daybreak"


def settings(**given: Any) -> dict[str, Any]:
    """Each setting from the flow's parameters, else the ``daybreak`` Variable, else None (the
    steps then read the environment); the spec is checked here, before any task runs."""
    from prefect.variables import Variable

    var: object = Variable.get(VARIABLE, default=None) or {}
    if not isinstance(var, dict):
        raise ValueError(f"Prefect Variable {VARIABLE!r} must be a JSON object with keys among {list(SETTINGS)}")
    unknown = sorted(set(var) - set(SETTINGS))
    if unknown:
        raise ValueError(f"Prefect Variable {VARIABLE!r} has unknown keys {unknown}; known: {list(SETTINGS)}")
    out = {k: given[k] if given.get(k) not in (None, "") else var.get(k) for k in SETTINGS}
    out["spec"] = out["spec"] or os.environ.get("DAYBREAK_SPEC")
    if not out["spec"]:
        raise ValueError(f"no spec: pass spec=, or set 'spec' in the Prefect Variable {VARIABLE!r} or DAYBREAK_SPEC")
    load_spec(out["spec"])  # a bad spec fails here, naming the field
    return out


def run_date(date: str | None) -> str:
    """The date to process: the given one, else the run's scheduled date (UTC; a run started by
    hand is scheduled now)."""
    if date not in (None, ""):
        return parse_date(date).isoformat()
    from prefect.runtime import flow_run

    return flow_run.scheduled_start_time.astimezone(UTC).date().isoformat()


def _report(key: str, title: str, rows: list[dict[str, Any]]) -> None:
    """The per-day lines as a table artifact on the run's page."""
    import re

    from prefect.artifacts import create_table_artifact

    create_table_artifact(key=re.sub(r"[^a-z0-9-]+", "-", key.lower())[:100], table=rows, description=title)


# The task that runs each step of the cycle (daybreak.steps.CYCLE, which says in what order and when).
TASKS: dict[str, Any] = {"stage": stage_data, "features": build_features, "online": materialize_online,
                         "monitor": monitor_model,
                         "train": train_model, "gate": evaluate_gate, "promote": promote_model, "deploy": deploy_model}


def _where(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Where things live, as each step's task is told."""
    io = {"store": cfg["store"], "storage_secret": cfg["storage_secret"]}
    ml = {"tracking_uri": cfg["tracking_uri"], "mlflow_secret": cfg["mlflow_secret"]}
    return {"stage": io, "features": io | {"ray_address": cfg["ray_address"]}, "online": io, "monitor": io | ml,
            "train": io | ml,
            "gate": io | ml, "promote": ml, "deploy": io | ml | {"url": cfg["serve_url"]}}


class _Persist(TypedDict):
    persist_result: bool
    result_serializer: str


# Results persisted as JSON (readable, no pickle), where Prefect's result storage settings say.
_PERSIST: _Persist = {"persist_result": True, "result_serializer": "json"}


@flow(name="daily_retrain", flow_run_name="daily_retrain {date}", log_prints=True, **_PERSIST)
def daily_retrain(date: str | None = None, spec: str | None = None, force: bool = False, dry_run: bool = False,
                  deploy: bool = True, store: str | None = None, tracking_uri: str | None = None,
                  ray_address: str | None = None, serve_url: str | None = None, storage_secret: str | None = None,
                  mlflow_secret: str | None = None) -> dict[str, Any]:
    """Stage, build features, materialize the online store (when the spec sets
    ``online.materialize``), monitor the model in service (rolling it back if it must), train,
    gate, promote and deploy for one date (default: the run's scheduled date), as declared in
    ``daybreak.steps.CYCLE``. The gate's decision decides: promote runs only after PROMOTE (else the
    result reports the champion in service, as ``daybreak run`` does), deploy only when the champion
    moved. `force` retrains although the date's lineage has a version; `dry_run` stops at promote,
    which says what it would do."""
    cfg = settings(spec=spec, store=store, tracking_uri=tracking_uri, ray_address=ray_address, serve_url=serve_url,
                   storage_secret=storage_secret, mlflow_secret=mlflow_secret)
    s, day, where = cfg["spec"], run_date(date), _where(cfg)
    options = CycleOptions(force=force, dry_run=dry_run, deploy=deploy)
    out: dict[str, Any] = {"date": day, "deploy": None}
    calendar_of = load_spec(s, try_model=False)  # (checked by settings) for the days with no drop
    for step in CYCLE:
        skipped = step.skipped(calendar_of, parse_date(day))
        if skipped is not None:  # no drop expected, or not turned on in the spec: no task runs, that is its result
            out[step.name] = skipped
        elif step.runs_if(out, options):
            out[step.name] = TASKS[step.name](s, day, **step.options_from(options), **where[step.name])
        elif step.otherwise is not None:  # promote after the gate said no: the champion as it stands
            out[step.name] = not_run(step.name, s, day, out, **where[step.name])
    out["summary"] = summarize(out)
    get_run_logger().info("daily_retrain %s: %s", day, out["summary"])
    _report(f"daybreak-{day}", f"daybreak daily cycle {day}", [out["summary"]])
    return out


@flow(name="backfill", flow_run_name="backfill {start}..{end}", log_prints=True, **_PERSIST)
def backfill(start: str, end: str, spec: str | None = None, force: bool = False, store: str | None = None,
             tracking_uri: str | None = None, ray_address: str | None = None, storage_secret: str | None = None,
             mlflow_secret: str | None = None, history: bool = True) -> list[dict[str, Any]]:
    """Run the daily cycle for every date from `start` to `end` (inclusive), in order, each as a
    `daily_retrain` subflow (no deploy; each day trains on the days before it). A failed day stops
    the backfill: a rerun starts again and the days already done are served from the cache.

    With `history` (default), the days before `start` that its windows and training window read
    are staged and featurised first (``daybreak.cycle.history_plan``), or the flow fails at once
    naming the days that have no landing file. Days with no expected drop run nothing."""
    days = date_range(parse_date(start), parse_date(end))
    cfg = settings(spec=spec, store=store, tracking_uri=tracking_uri, ray_address=ray_address,
                   storage_secret=storage_secret, mlflow_secret=mlflow_secret)
    cfg.pop("serve_url")
    logger = get_run_logger()
    if history:
        _warm_history(cfg, days[0])
    lines = []
    for i, d in enumerate(days, 1):
        r = daily_retrain(date=d.isoformat(), force=force, deploy=False, **cfg)
        lines.append(r["summary"])
        logger.info("[%d/%d] %s: decision %s, champion v%s", i, len(days), d, r["summary"]["decision"],
                    r["summary"]["champion_version"])
    _report(f"daybreak-backfill-{days[0]}-{days[-1]}", f"daybreak backfill {days[0]}..{days[-1]}", lines)
    return lines


def _warm_history(cfg: dict[str, Any], first: Any) -> None:
    """Stage (and featurise) the history `first` needs, as tasks; refuse naming the days that
    cannot be staged."""
    from daybreak.cycle import history_plan
    from daybreak.prefect.storage import resolve
    from daybreak.steps import spec_and_context

    s, where = load_spec(cfg["spec"], try_model=False), _where(cfg | {"serve_url": None})
    storage = resolve(cfg["storage_secret"], cfg["store"])  # an S3Bucket block gives the store

    def context(d: Any) -> Any:
        return spec_and_context(s, d, store=storage.store, storage=storage.options)[1]

    plan = history_plan(s, context, first)
    tasks: dict[str, Any] = {"stage": stage_data, "features": build_features}
    for d, steps in plan.todo(s):
        for name in steps:
            tasks[name](cfg["spec"], d.isoformat(), **where[name])
    get_run_logger().info("backfill %s: history staged and featurised for %d day(s)", first, len(plan.days))


@flow(name="approve", flow_run_name="{decision} v{version}", **_PERSIST)
def approve(version: int, reason: str, decision: Literal["approve", "reject"] = "approve", spec: str | None = None,
            by: str | None = None, tracking_uri: str | None = None, mlflow_secret: str | None = None) -> dict[str, Any]:
    """Approve (promote) or reject a model version waiting for approval, with a reason. `by` names
    who answers in the history (fill it in the run form: the worker's OS user is recorded
    otherwise)."""
    cfg = settings(spec=spec, tracking_uri=tracking_uri, mlflow_secret=mlflow_secret)
    return approve_model(cfg["spec"], version, reason, decision=decision, by=by, tracking_uri=cfg["tracking_uri"],
                         mlflow_secret=cfg["mlflow_secret"])
