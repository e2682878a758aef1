"""daybreak's steps in one table, the daily cycle declared once, and one entry point per step.

``STEPS`` holds one record per step: its function, whether an orchestrator may cache it (and how
its recorded lineage is read) and, for a step of the cycle, when it runs. ``CYCLE`` is the daily
cycle in order; ``run_cycle``, the Prefect flow ``daily_retrain`` and the Airflow DAG factory
``daily_retrain_dag`` are each built by iterating over it. Reading them imports no step (a DAG file
parses light): a step's module is imported when it runs.

A step that reads the base source's date (all but approve and replay) runs nothing on a day its
calendar (``sources.<base>.calendar``) expects no drop: ``Step.run`` returns
:func:`not_expected` instead, a small result every caller passes on as it is (not an error, no
model version). A step the spec must turn on (``Step.opt_in``: online, by ``online.materialize``)
runs nothing without it either: its result is :func:`not_enabled`, and its module is never
imported.

Airflow operators and Prefect tasks call ``run_step``: spec path + date in, small dict out; it
loads and validates the spec, builds the run context and calls the step, so the adapters stay a
few lines of argument mapping.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

from daybreak.infra.errors import MissingInputError
from daybreak.spec import Spec, load_spec

if TYPE_CHECKING:  # at run time imported where used: reading the table (to parse a DAG) stays light
    from daybreak.infra.context import RunContext


@dataclass(frozen=True)
class CycleOptions:
    """What a person chooses for one run of the cycle."""

    force: bool = False  # train although the date's lineage has a version
    dry_run: bool = False  # promote says what it would do; nothing is promoted or deployed
    deploy: bool = True


Results = dict[str, Any]  # the results of the cycle's steps so far, by step name


def _always(done: Results, options: CycleOptions) -> bool:
    return True


def _gate_said_promote(done: Results, options: CycleOptions) -> bool:
    from daybreak.gate import should_promote

    return should_promote(done["gate"])


def _champion_moved(done: Results, options: CycleOptions) -> bool:
    """Deploy after a promotion only: not in a dry run, nor while the version waits for approval."""
    from daybreak.promote import should_deploy

    return (_gate_said_promote(done, options) and options.deploy and not options.dry_run
            and should_deploy(done["promote"]))


def _lineage_key(r: dict[str, Any]) -> Any:
    return r.get("lineage_key")


def _stage_lineage(r: dict[str, Any]) -> Any:
    return {name: s["lineage_key"] for name, s in r["sources"].items()}


def _train_lineage(r: dict[str, Any]) -> Any:
    return [r["lineage_key"], r["model_version"]] if r.get("model_version") else None


def _gate_lineage(r: dict[str, Any]) -> Any:
    if not r.get("candidate_version") or not r.get("decision"):
        return None
    return [str(r["candidate_version"]), r["decision"], str(r.get("champion_version") or "none")]


def _load(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return fn


@dataclass(frozen=True)
class Step:
    """One daybreak step. Functions are named ``"module:function"`` and imported when called."""

    name: str
    function: str  # step(spec, ctx, **options) -> small dict
    # Cacheable steps: their output is a pure function of their recorded inputs. `recorded(spec,
    # ctx)` reads the lineage of the output recorded for the date (None: nothing recorded);
    # `lineage(result)` reads the same from what the step returned. Steps without it (monitor,
    # promote, approve, deploy) act on the registry, the log and the endpoint as they stand.
    recorded: str | None = None
    lineage: Callable[[dict[str, Any]], Any] = _lineage_key
    in_registry: bool = False  # its recorded output lives in the registry (the cache key names it)
    # In the cycle: which CycleOptions it is called with, whether it runs given the results so
    # far, and else `otherwise(spec, ctx, done)`, its result when it does not run (None: none).
    options: tuple[str, ...] = ()
    runs_if: Callable[[Results, CycleOptions], bool] = _always
    otherwise: str | None = None
    # It works on the base source's date, so it runs only on days the base's calendar expects a
    # drop (approve and replay act on versions and ranges, whatever the day).
    dated: bool = True
    # A boolean of the spec ("section.field") that turns it on; off: it runs nothing and its result
    # says so (:func:`not_enabled`), so a pipeline that does not use it pays nothing.
    opt_in: str | None = None
    # Nothing later in the cycle needs its output: a DAG hangs it off the step before it, so its
    # skip or failure stops no other step (run_cycle and the flow still run it in order).
    side: bool = False

    @property
    def cacheable(self) -> bool:
        return self.recorded is not None

    def skipped(self, spec: Spec, day: date) -> dict[str, Any] | None:
        """Its result when it runs nothing: on a day with no expected drop, or when the spec does
        not turn it on (``opt_in``); None when it runs."""
        if self.opt_in is not None and not opted_in(spec, self.opt_in):
            return not_enabled(self.name, self.opt_in, day)
        return not_expected(self.name, spec, day) if self.dated else None

    def run(self, spec: Spec, ctx: RunContext, **options: Any) -> dict[str, Any]:
        from daybreak.infra.cluster import check_shared_nothing

        check_shared_nothing(ctx)  # a local store with a remote cluster: refused before any work
        # batch_score of the champion's own date (a run without a date): the run's date is no drop's
        skipped = None if options.get("champion_date") else self.skipped(spec, ctx.logical_date)
        if skipped is not None:
            return skipped
        result: dict[str, Any] = _load(self.function)(spec, ctx, **options)
        return result

    def not_run(self, spec: Spec, ctx: RunContext, done: Results) -> dict[str, Any]:
        if self.otherwise is None:
            raise ValueError(f"{self.name} has no result when it does not run")
        result: dict[str, Any] = _load(self.otherwise)(spec, ctx, done)
        return result

    def options_from(self, options: CycleOptions) -> dict[str, Any]:
        return {k: getattr(options, k) for k in self.options}


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("stage", "daybreak.stage:stage", recorded="daybreak.stage:recorded_lineage", lineage=_stage_lineage),
    Step("features", "daybreak.features:build_features", recorded="daybreak.features:recorded_lineage"),
    # only for a spec with online.materialize: true; serving does not wait for it, nor does training
    Step("online", "daybreak.online:materialize_online", opt_in="online.materialize", side=True),
    Step("monitor", "daybreak.monitor:monitor_model"),
    Step("train", "daybreak.train:train_model", recorded="daybreak.train:recorded_lineage", lineage=_train_lineage,
         in_registry=True, options=("force",)),
    Step("gate", "daybreak.gate:evaluate_gate", recorded="daybreak.gate:recorded_gate", lineage=_gate_lineage,
         in_registry=True),
    Step("promote", "daybreak.promote:promote_model", options=("dry_run",), runs_if=_gate_said_promote,
         otherwise="daybreak.promote:not_promoted"),
    Step("deploy", "daybreak.deploy:deploy_model", runs_if=_champion_moved),
    Step("approve", "daybreak.promote:approve_model", dated=False),
    Step("batch_score", "daybreak.score:batch_score", recorded="daybreak.score:recorded_lineage", in_registry=True),
    # not in the cycle (its options are its own, given by its adapters); read-only, never cached
    Step("replay", "daybreak.gate:replay", options=("start", "end", "policy"), dated=False),
)}

# The daily cycle, in order. The online store is materialized from the date's staged data once its
# features are built (when the spec opts in). Monitoring runs before retraining: the date's labels
# have just arrived with its staged data, so the model in service is judged on what it served (and
# rolled back if it must be) before the new candidate is gated against it. run_cycle, the Prefect
# flow and the Airflow DAG factory all iterate over this.
CYCLE: tuple[Step, ...] = tuple(STEPS[n] for n in ("stage", "features", "online", "monitor", "train", "gate",
                                                   "promote", "deploy"))

STEP_NAMES = tuple(STEPS)
CACHEABLE = tuple(s.name for s in STEPS.values() if s.cacheable)


def not_expected(step: str, spec: Spec, day: date) -> dict[str, Any] | None:
    """A step's result on a day the base source's calendar expects no drop (None on other days):
    ``expected`` false, ``skipped`` true and the reason. Not an error, and nothing is recorded in
    the store or the registry; a missing *expected* drop still fails the stage step."""
    if spec.expects(day):
        return None
    return {"step": step, "date": day.isoformat(), "expected": False, "skipped": True,
            "reason": spec.calendar().reason(day)}


def opted_in(spec: Spec, field: str) -> bool:
    """The spec's boolean `field` ("section.field")."""
    value: Any = spec
    for part in field.split("."):
        value = getattr(value, part)
    return bool(value)


def not_enabled(step: str, field: str, day: date) -> dict[str, Any]:
    """A step's result when the spec does not turn it on: ``enabled`` false, ``skipped`` true and
    the reason. Nothing runs and nothing is opened or written."""
    return {"step": step, "date": day.isoformat(), "enabled": False, "skipped": True,
            "reason": f"{field} is not true in the spec"}


def is_enabled(result: dict[str, Any] | None) -> bool:
    """False for the result of a step the spec does not turn on (:func:`not_enabled`)."""
    return (result or {}).get("enabled", True) is not False


def is_expected(result: dict[str, Any] | None) -> bool:
    """False for a step's result on a day with no expected drop (:func:`not_expected`)."""
    return (result or {}).get("expected", True) is not False


def resolve_date(*candidates: Any) -> date:
    """The first usable date among an explicit override, the run's logical date and its run-after time.

    Asset-triggered Airflow runs have no logical date and templated empty values render as
    '' or 'None', so those count as absent.
    """
    from daybreak.infra.context import parse_date

    for c in candidates:
        if c is None or (isinstance(c, str) and c.strip() in ("", "None", "null")):
            continue
        if isinstance(c, (date, datetime, str)):
            return parse_date(c)
    raise ValueError("no logical date: pass a date (YYYY-MM-DD)")


def run_step(step: str, spec: str | Spec, day: str | date | datetime, *, run_id: str | None = None,
             store: str | None = None, tracking_uri: str | None = None, ray_address: str | None = None,
             storage: Any = None, distributed: str | None = None, **options: Any) -> dict[str, Any]:
    if step not in STEP_NAMES:
        raise ValueError(f"unknown step {step!r}; steps are {list(STEP_NAMES)}")
    s, ctx = spec_and_context(spec, day, run_id=run_id, store=store, tracking_uri=tracking_uri,
                              ray_address=ray_address, storage=storage, distributed=distributed)
    return STEPS[step].run(s, ctx, **options)


def spec_and_context(spec: str | Spec, day: str | date | datetime, *, run_id: str | None = None,
                     store: str | None = None, tracking_uri: str | None = None, ray_address: str | None = None,
                     storage: Any = None, distributed: str | None = None) -> tuple[Spec, RunContext]:
    """The loaded spec and the run context for a date, as every adapter's step call starts."""
    from daybreak.infra.context import RunContext

    s = spec if isinstance(spec, Spec) else load_spec(spec)
    return s, RunContext.create(day, store=store or None, tracking_uri=tracking_uri or None, run_id=run_id,
                                ray_address=ray_address or None, storage=storage, distributed=distributed)


def cache_key(step: str, spec: str | Spec, day: str | date | datetime, *, result: dict[str, Any] | None = None,
              store: str | None = None, tracking_uri: str | None = None, storage: Any = None) -> str | None:
    """A key for what `step` recorded for the date, for an orchestrator's result cache (Prefect's).

    Without `result` it is read from the store and the registry: the lineage of the step's recorded
    output, when that output exists and was made from the inputs as they are now. None means the
    step has work to do (or acts on live state: promote, approve, deploy), so it must run. With
    `result`, what the step returned, the same key is read from it: a result cached under it is
    found by the next run of the date, and missed once an input changes or the output is gone.
    The key names the spec, the step and the date, and depends on the store and registry used.
    """
    the_step = STEPS.get(step)
    if the_step is None or the_step.recorded is None or not is_expected(result):
        return None
    s, ctx = spec_and_context(spec, day, store=store, tracking_uri=tracking_uri, storage=storage)
    if the_step.skipped(s, ctx.logical_date) is not None:  # nothing to record: the step says so at once
        return None
    try:
        ident = _load(the_step.recorded)(s, ctx) if result is None else the_step.lineage(result)
    except MissingInputError:  # the step will say what is missing
        return None
    if ident is None:
        return None
    where = [ctx.store.uri(""), ctx.tracking_uri if the_step.in_registry else None]
    blob = json.dumps({"spec": s.spec_hash(), "step": step, "where": where, "recorded": ident}, sort_keys=True)
    return f"daybreak-{s.name}-{step}-{ctx.logical_date.isoformat()}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
