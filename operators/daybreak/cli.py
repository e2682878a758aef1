"""The ``daybreak`` command line: the same steps as the Airflow operators and Prefect tasks."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import date
from enum import IntEnum
from pathlib import Path
from typing import Any

import typer

from daybreak.infra.errors import DaybreakError, RedactFilter, credentials_refused, is_retryable, redact


class ExitCode(IntEnum):
    """What ``daybreak`` exits with (docs: reference/cli). Scripts and orchestrators branch on these."""

    OK = 0  # done (a gate REJECT too, unless --fail-on-reject)
    ERROR = 1  # unexpected: a bug (DAYBREAK_DEBUG=1 prints the redacted traceback); please report it
    USAGE = 2  # the command line: unknown command or option, missing or malformed argument
    BAD_INPUT = 3  # the spec, a landing file, the data or the registry's state refuses the run; nothing published
    REJECTED = 4  # the gate rejected the candidate (only with --fail-on-reject)
    INFRASTRUCTURE = 5  # the store, MLflow, Ray or the model server could not be reached or refused the credentials
    INTERRUPTED = 130  # Ctrl-C


app = typer.Typer(no_args_is_help=True,
                  help="daybreak: stage, build features, retrain, gate, promote and serve a model every day.")
datasets_app = typer.Typer(no_args_is_help=True, help="Demo data sets.")
app.add_typer(datasets_app, name="datasets")
prefect_app = typer.Typer(no_args_is_help=True, help="Prefect deployments of the daybreak flows.")
app.add_typer(prefect_app, name="prefect")
online_app = typer.Typer(no_args_is_help=True, help="Online features: the state daybreak serve computes raw rows' "
                                                       "features from (DAYBREAK_ONLINE_URL: redis://..., else SQLite).")
app.add_typer(online_app, name="online")


def _version(value: bool) -> None:
    if value:
        from daybreak import __version__

        typer.echo(f"daybreak {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print daybreak's version and exit.")) -> None:
    """daybreak: stage, build features, retrain, gate, promote and serve a model every day."""

def _check_date(value: str | None) -> str | None:
    """A malformed --date/--start/--end is a usage error (exit 2), found before anything loads."""
    from daybreak.infra.context import parse_date

    if value is not None:
        try:
            parse_date(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return value


# Options a deployment sets once are bound to environment variables (shown in --help); a flag on
# the command line wins over the variable.
SpecOpt = typer.Option(..., "--spec", "-s", help="Pipeline spec (YAML).", envvar="DAYBREAK_SPEC")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout.", envvar="DAYBREAK_JSON")
StoreOpt = typer.Option(None, "--store", help="Store root (default: $DAYBREAK_HOME/store).",
                        envvar="DAYBREAK_STORE")
TrackingOpt = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite in $DAYBREAK_HOME).",
                           envvar=["DAYBREAK_TRACKING_URI", "MLFLOW_TRACKING_URI"])
DayOpt = typer.Option(..., "--date", "-d", help="Logical date, YYYY-MM-DD.", callback=_check_date)
StartOpt = typer.Option(..., "--start", help="First date, YYYY-MM-DD.", callback=_check_date)
EndOpt = typer.Option(..., "--end", help="Last date (inclusive), YYYY-MM-DD.", callback=_check_date)
FailOnRejectOpt = typer.Option(False, "--fail-on-reject", envvar="DAYBREAK_FAIL_ON_REJECT",
                               help=f"Exit {ExitCode.REJECTED.value} when the gate rejects the candidate "
                                    "(for scripts; default: exit 0, a rejection is a normal outcome).")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:  # no URI's user:password in any line
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
    for noisy in ("ray", "mlflow", "alembic", "urllib3", "httpx", "filelock", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


# With --json, stdout carries the JSON alone: main() points sys.stdout at stderr for the run (MLflow
# prints "View run ... at: URL" to stdout for a tracking server) and the JSON goes here.
_JSON_OUT: Any = None


def _emit(obj: Any, as_json: bool, human: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(obj, indent=2, default=str), file=_JSON_OUT or sys.stdout)
    elif human is not None:
        typer.echo(human)


def _load(spec: str, try_model: bool = True) -> Any:
    """The spec; `try_model` false for the commands that only read the registry (history, versions,
    live, report): the model check imports xgboost or scikit-learn, most of a listing's time."""
    from daybreak.spec import load_spec

    return load_spec(spec, try_model=try_model)


def _ctx(day: str | date, store: str | None, tracking_uri: str | None) -> Any:
    from daybreak.infra.context import RunContext

    return RunContext.create(day, store=store, tracking_uri=tracking_uri)


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def _listing(rows: list[dict[str, Any]], as_json: bool, empty: str, line: Any) -> None:
    if as_json:
        _emit(rows, True)
        return
    typer.echo("\n".join(map(line, rows)) if rows else empty)


def _rule_line(r: dict[str, Any]) -> str:
    return (f"  {r.get('verdict', '-'):<5} {r['rule']:<16} value={_fmt(r.get('value'))}  "
            f"threshold={_fmt(r.get('threshold'))}" + (f"  {r['detail']}" if r.get("detail") else ""))


def summary_line(s: dict[str, Any]) -> str:
    if s.get("expected") is False:  # a day with no expected drop: nothing ran
        return f"{s['date']}  {s.get('note') or 'no drop expected'}"
    return (f"{s['date']}  staged={_fmt(s['rows_staged']):>5}  candidate=v{_fmt(s['candidate_version'])} "
            f"{_fmt(s['candidate_metric'])}  champion_metric={_fmt(s['champion_metric'])}  "
            f"decision={_fmt(s['decision']):<8}  champion=v{_fmt(s['champion_version'])}"
            + (f"  approval={s['approval']}" if s.get("approval") else ""))


@app.command()
def run(spec: str = SpecOpt, day: str = DayOpt,
        store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
        no_deploy: bool = typer.Option(False, "--no-deploy", help="Skip the deploy check."),
        force: bool = typer.Option(False, "--force", help="Retrain even if the date already has a candidate."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Stop after the gate: report, never promote or deploy."),
        fail_on_reject: bool = FailOnRejectOpt, as_json: bool = JsonOpt) -> None:
    """Run one full daily cycle (stage, features, online when the spec opts in, monitor, train, gate,
    promote, deploy) in process."""
    from daybreak.cycle import run_cycle

    s = _load(spec)
    result = run_cycle(s, _ctx(day, store, tracking_uri), deploy=not no_deploy, force=force, dry_run=dry_run)
    _emit(result, as_json, summary_line(result["summary"]))
    _exit_if_rejected(result["summary"].get("decision"), fail_on_reject)


def _exit_if_rejected(decision: str | None, fail_on_reject: bool) -> None:
    if fail_on_reject and decision == "REJECT":
        raise typer.Exit(ExitCode.REJECTED)


@app.command()
def backfill(spec: str = SpecOpt, start: str = StartOpt,
             end: str = EndOpt,
             store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
             steps: str | None = typer.Option(
                 None, "--steps", help="Comma-separated cycle steps to run, in the cycle's order (default all), "
                                       "e.g. stage,features to warm history up."),
             no_history: bool = typer.Option(
                 False, "--no-history", help="Do not stage and featurise the days before --start that its windows "
                                             "and training window read (their windows are then truncated)."),
             as_json: bool = JsonOpt) -> None:
    """Run the daily cycle (or --steps of it) for every date from --start to --end, in order.

    First the history --start needs: the days its feature windows look back over and, when the
    steps train, its training window and holdout, are staged (and featurised) if they are not
    yet; if any of them has no landing file, nothing runs and the error names the days. Days the
    base source's calendar expects no drop on (weekends of a weekday feed, holidays) run nothing.
    """
    from daybreak.cycle import cycle_steps, history_plan, run_cycle, warm_history
    from daybreak.infra.context import date_range, parse_date

    chosen = None if steps is None else steps.split(",")
    try:
        names = [st.name for st in cycle_steps(chosen)]
    except ValueError as e:  # naming the choices: a usage error
        raise typer.BadParameter(str(e), param_hint="'--steps'") from None
    s = _load(spec)
    days = date_range(parse_date(start), parse_date(end))

    def context(d: date) -> Any:
        return _ctx(d, store, tracking_uri)

    if not no_history:
        plan = history_plan(s, context, days[0], chosen)
        for r in warm_history(s, context, plan):
            typer.echo(f"[history] {r['date']}  " + "  ".join(step_line(n, r[n]) for n in names if n in r), err=True)
    results = []
    for i, d in enumerate(days, 1):
        r = run_cycle(s, context(d), deploy=False, steps=chosen)
        results.append(r["summary"] if "gate" in names else {n: r.get(n) for n in ("date", *names)})
        if not as_json:
            typer.echo(f"[{i}/{len(days)}] {_day_line(r, names)}")
    _emit(results, as_json)


def _day_line(r: dict[str, Any], names: list[str]) -> str:
    """A backfill day in a line: the summary with the gate, else each step's fields."""
    if "gate" in names or r["summary"]["expected"] is False:
        return summary_line(r["summary"])
    return "  ".join([str(r["date"]), *(step_line(n, r[n]) for n in names if n in r)])


def step_line(name: str, result: dict[str, Any]) -> str:
    """A step's result in a line: its name and its scalar fields."""
    skip = {"step", "date", "run_id"}
    parts = [f"{k}={_fmt(v)}" for k, v in result.items() if k not in skip and (v is None or isinstance(v, str | int
                                                                                                       | float))]
    return f"{name}: " + " ".join(parts)


def _run_step(name: str, spec: str, day: str, store: str | None, tracking_uri: str | None, as_json: bool,
              **options: Any) -> None:
    """One step of the cycle for one date, as the cycle would call it (no retries: run it again)."""
    from daybreak.steps import STEPS

    res = STEPS[name].run(_load(spec), _ctx(day, store, tracking_uri), **options)
    if _not_expected(res, as_json):
        return
    _emit(res, as_json, f"{res.get('date', day)}  {step_line(name, res)}")


def _not_expected(res: dict[str, Any], as_json: bool) -> bool:
    """Print a step's result on a day with no expected drop (and say it was one)."""
    if res.get("expected") is not False:
        return False
    _emit(res, as_json, f"{res['date']}  {res['step']}: {res['reason']}")
    return True


@app.command("stage")
def stage_cmd(spec: str = SpecOpt, day: str = DayOpt,
              store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Stage the date's landing files: validate, publish the day's Parquet partition atomically."""
    _run_step("stage", spec, day, store, tracking_uri, as_json)


@app.command("features")
def features_cmd(spec: str = SpecOpt, day: str = DayOpt,
                 store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
                 as_json: bool = JsonOpt) -> None:
    """Build the date's feature partition from the staged data (after the stage step)."""
    _run_step("features", spec, day, store, tracking_uri, as_json)


@app.command("train")
def train_cmd(spec: str = SpecOpt, day: str = DayOpt,
              store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
              force: bool = typer.Option(False, "--force", help="Retrain even if the date already has a candidate."),
              as_json: bool = JsonOpt) -> None:
    """Train the date's candidate on its window's features and register it (after the features step)."""
    _run_step("train", spec, day, store, tracking_uri, as_json, force=force)


@app.command("promote")
def promote_cmd(spec: str = SpecOpt, day: str = DayOpt,
                store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
                dry_run: bool = typer.Option(False, "--dry-run", help="Say what would happen; change nothing."),
                as_json: bool = JsonOpt) -> None:
    """Move the champion alias to the date's candidate if the gate passed it (after the gate step)."""
    _run_step("promote", spec, day, store, tracking_uri, as_json, dry_run=dry_run)


@app.command("deploy")
def deploy_cmd(spec: str = SpecOpt, day: str = DayOpt,
               store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
               as_json: bool = JsonOpt) -> None:
    """Check that the server answers with the champion (hot swap); after a promotion."""
    _run_step("deploy", spec, day, store, tracking_uri, as_json)


@app.command()
def history(spec: str = SpecOpt, tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """The audit history: every promotion, rejection, override, approval and rollback, newest first."""
    from daybreak.infra.audit import audit_events

    s = _load(spec, try_model=False)
    _listing(audit_events(s, _ctx(date.today(), None, tracking_uri)), as_json,
             f"no promotions, rejections or rollbacks of {s.model.name} yet",
             lambda r: f"{r['at']}  {r['event']:<17} v{r['version'] or '-':<4} "
                       f"(champion was v{r['from_version'] or '-'})  date={r['logical_date']}  by={r['by']}  "
                       f"run={r['run_context']}  {r['reason']}")


@app.command()
def versions(spec: str = SpecOpt, tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Every registered version with its lineage and gate decision, newest first."""
    from daybreak.promote import model_history

    s = _load(spec, try_model=False)
    _listing(model_history(s, _ctx(date.today(), None, tracking_uri)), as_json, f"no versions of {s.model.name} yet",
             lambda r: f"v{r['version']:<4} date={r['logical_date'] or '-'}  window={r['window'] or '-'}  "
                       f"decision={r['decision'] or '-':<8} candidate={_fmt(r['candidate_metric'])} "
                       f"vs champion v{r['gated_against'] or '-'} {_fmt(r['champion_metric'])}  "
                       f"aliases={','.join(r['aliases']) or '-'}"
                       + (f"  approval={r['approval']}" + (f" by {r['approval_by']}" if r["approval_by"] else "")
                          if r["approval"] else ""))


@app.command()
def rollback(spec: str = SpecOpt, reason: str = typer.Option(..., "--reason", help="Why (recorded in the history)."),
             tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Put the previous champion back in service (the current one is never promoted again)."""
    from daybreak.promote import rollback_model

    res = rollback_model(_load(spec), _ctx(date.today(), None, tracking_uri), reason)
    _emit(res, as_json, f"champion: v{res['rolled_back_version']} -> v{res['champion_version']}  ({reason})")


@app.command()
def approve(spec: str = SpecOpt,
            version: str = typer.Option(..., "--version", help="The model version waiting for approval."),
            reason: str = typer.Option(..., "--reason", help="Why (required; recorded in the history)."),
            reject: bool = typer.Option(False, "--reject", help="Decline it instead: it is never promoted."),
            tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Approve (or --reject) a version the gate passed under promotion.approval: manual.

    Approving promotes it if the champion is still the version it was gated against; otherwise
    nothing changes and it must be re-gated.
    """
    from daybreak.promote import approve_model

    res = approve_model(_load(spec), _ctx(date.today(), None, tracking_uri), version, reason,
                        decision="reject" if reject else "approve")
    human = (f"rejected v{res['version']}; champion stays v{_fmt(res['champion_version'])}  ({reason})" if reject else
             f"approved v{res['version']}: champion v{_fmt(res['previous_version'])} -> v{res['champion_version']}  "
             f"({reason})")
    _emit(res, as_json, human)


def _system_allocator() -> None:
    """Arrow C++ allocates with the C library's malloc in this process: its default pool is chosen
    from ARROW_DEFAULT_MEMORY_POOL once, when pyarrow loads (``daybreak.cli`` does not load it), and
    ``pyarrow.set_memory_pool`` (``use_system_allocator``) does not reach the buffers the Parquet
    writer's encoders take from it. With mimalloc, the server's prediction log re-faulted (and the
    kernel zeroed) huge pages after every flush: at 100 rows a request, 5 page faults and 12-21 us
    of system CPU a request in its thread, against none and 1-2 us with malloc."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


@app.command()
def serve(spec: str = SpecOpt,
          host: str | None = typer.Option(None, help="Bind address (default from spec: 127.0.0.1).",
                                          envvar="DAYBREAK_SERVE_HOST"),
          port: int | None = typer.Option(None, help="Port (default from spec).", envvar="DAYBREAK_SERVE_PORT"),
          tracking_uri: str | None = TrackingOpt,
          replicas: int = typer.Option(1, "--replicas", min=1,
                                       help="Replicas on Ray Serve (2 or more need the cluster extra); 1 serves "
                                            "in this process."),
          ray_address: str | None = typer.Option(None, "--ray-address",
                                                 help="Ray cluster for --replicas (default: a local Ray).",
                                                 envvar="RAY_ADDRESS"),
          replica_cpus: float = typer.Option(1.0, "--replica-cpus", min=0.0, help="CPUs Ray reserves per replica.")
          ) -> None:
    """Serve the champion over HTTP (MLflow scoring protocol); follows the champion alias.

    Set DAYBREAK_SERVE_TOKEN to require 'Authorization: Bearer <token>' on /invocations (and on
    /metrics, Prometheus' metrics, unless DAYBREAK_METRICS_PUBLIC=1). With
    --replicas N (N >= 2), N Ray Serve replicas switch versions together: no client sees the
    version go back after a promotion.
    """
    token = os.environ.get("DAYBREAK_SERVE_TOKEN") or None
    if replicas == 1:
        _system_allocator()
        from daybreak.deploy import serve as _serve

        _serve(_load(spec), _ctx(date.today(), None, tracking_uri), host=host, port=port, token=token)
        return
    from daybreak.deploy import require_serve, serve_replicated

    require_serve()  # before loading anything: the cluster extra is missing
    serve_replicated(_load(spec), _ctx(date.today(), None, tracking_uri), replicas, host=host, port=port,
                     token=token, address=ray_address, replica_cpus=replica_cpus)


@app.command()
def gate(spec: str = SpecOpt, day: str = DayOpt,
         store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
         force: bool = typer.Option(False, "--force", help="Decide again even if this version was gated."),
         override: str | None = typer.Option(None, "--override",
                                             help="promote or reject, replacing the computed decision."),
         reason: str | None = typer.Option(None, "--reason", help="Why (required with --override; recorded)."),
         fail_on_reject: bool = FailOnRejectOpt, as_json: bool = JsonOpt) -> None:
    """Gate the date's candidate against the champion (after the train step) and record the decision."""
    from daybreak.steps import STEPS

    res = STEPS["gate"].run(_load(spec), _ctx(day, store, tracking_uri), force=force, override=override,
                            reason=reason)
    if _not_expected(res, as_json):
        return
    lines = [f"{res['date']}  {res['decision']}  candidate=v{res.get('candidate_version') or '-'}  "
             f"champion=v{res.get('champion_version') or '-'}", *map(_rule_line, res.get("rules", []))]
    _emit(res, as_json, "\n".join(lines))
    _exit_if_rejected(res.get("decision"), fail_on_reject)


@app.command()
def replay(spec: str = SpecOpt, start: str = StartOpt,
           end: str = EndOpt,
           policy: Path | None = typer.Option(None, "--policy",
                                              help="YAML with a top-level gate: section to judge by instead of "
                                                   "the spec's."),
           tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Re-judge the recorded gate decisions of a date range under another policy (read-only).

    From each date's gate run (decision.json, scores.parquet) alone: no model is loaded and
    nothing is written. Per day: the recorded and replayed decision, and the gate metric on the
    following days of the model each decision keeps in service, where a later gate scored it.
    """
    from daybreak.gate import replay as replay_gate
    from daybreak.infra.context import parse_date

    if parse_date(end) < parse_date(start):
        raise ValueError(f"--end {end} is before --start {start}")
    res = replay_gate(_load(spec, try_model=False), _ctx(start, None, tracking_uri), start, end,
                      policy=None if policy is None else str(policy))
    _emit(res, as_json, _replay_table(res))


def _replay_table(res: Any) -> str:
    def fwd(version: Any, value: Any) -> str:
        return "-" if version is None else f"v{version} {_fmt(value)}"

    lines = [f"replay of {res['model']} {res['start']}..{res['end']} under "
             f"{res['policy'] or 'the recorded policy'} (forward: {res['metric']} on the following days of the "
             "model each decision keeps in service)",
             f"{'date':<10}  {'cand':<5} {'recorded':<17} {'replayed':<17} {'changed':<7}  "
             f"{'forward (replayed)':<20} {'forward (recorded)':<20} note"]
    for d in res["days"]:
        if d["status"] != "replayed":
            lines.append(f"{d['date']:<10}  {'v' + d['candidate_version'] if d.get('candidate_version') else '-':<5} "
                         f"{d['status']}: {d.get('note') or ''}")
            continue
        notes = [n for n in (d.get("note"), d.get("forward_note")) if n]
        lines.append(f"{d['date']:<10}  {'v' + d['candidate_version']:<5} {d['recorded_computed_decision']:<17} "
                     f"{d['replayed_decision']:<17} {'CHANGED' if d['changed'] else 'same':<7}  "
                     f"{fwd(d['forward_version'], d['forward_metric']):<20} "
                     f"{fwd(d['recorded_forward_version'], d['recorded_forward_metric']):<20} "
                     + "; ".join(notes)
                     + (f"  failed: {', '.join(d['failed_rules'])}" if d["changed"] and d["failed_rules"] else ""))
    s = res["summary"]
    lines += [f"{s['replayed']} of {s['days']} days replayed; {s['changed']} decisions changed; promotions: "
              f"{s['promotions_recorded']} recorded, {s['promotions_replayed']} replayed",
              f"mean forward {res['metric']}: recorded {_fmt(s['mean_forward_recorded'])} "
              f"({s['forward_days_recorded']} days), replayed {_fmt(s['mean_forward_replayed'])} "
              f"({s['forward_days_replayed']} days)",
              *(f"limit: {x}" for x in res["limits"])]
    return "\n".join(lines)


@app.command()
def score(spec: str = SpecOpt, day: str = DayOpt,
          store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Score the date's feature partition with the champion on Ray (predictions/<model>/date=D/)."""
    from daybreak.steps import STEPS

    res = STEPS["batch_score"].run(_load(spec), _ctx(day, store, tracking_uri))
    if _not_expected(res, as_json):
        return
    _emit(res, as_json, f"{res['date']}: {res['rows']} rows scored by v{res['model_version']} -> {res['uri']}"
                        + (" (unchanged)" if res["skipped"] else ""))


@app.command()
def monitor(spec: str = SpecOpt, day: str = DayOpt,
            store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Judge the model in service on the date's logged predictions and labels; roll back if it must."""
    from daybreak.steps import STEPS

    res = STEPS["monitor"].run(_load(spec), _ctx(day, store, tracking_uri))
    if _not_expected(res, as_json):
        return
    lines = [f"{res['date']}: action {res['action']}  champion=v{_fmt(res.get('champion_version'))}  "
             f"logged={res.get('rows_logged', 0)}  labelled={res.get('rows_labelled', 0)}"]
    lines += [f"  {v['source']:<6} v{v['version']:<4} rows={v['rows']:<6} "
              + "  ".join(f"{m}={_fmt(x)}" for m, x in v["metrics"].items()) for v in res.get("versions", [])]
    if res.get("drift"):
        top = ", ".join(f"{d['feature']}={d['psi']:.3f}" for d in res["drift"][:5])
        lines.append(f"  drift {res.get('drift_verdict')}: {top}")
    lines += [f"  {w}" for w in (res.get("reasons") or []) + (res.get("alerts") or []) + (res.get("warnings") or [])]
    rb = res.get("rollback")
    if rb:
        lines.append(f"  rolled back: v{rb['rolled_back_version']} -> v{rb['champion_version']}")
    _emit(res, as_json, "\n".join(lines))


@app.command()
def live(spec: str = SpecOpt, tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Live quality over time: the monitoring metric per date, source and version."""
    from daybreak.monitor import live_history

    s = _load(spec, try_model=False)
    _listing(live_history(s, _ctx(date.today(), None, tracking_uri)), as_json, f"no monitoring of {s.model.name} yet",
             lambda r: f"{r['date']}  {r['source']:<6} v{r['version']:<4} {r['metric']}={_fmt(r['value'])}  "
                       f"rows={r['rows']}  action={r['action']}")


@app.command()
def report(spec: str = SpecOpt, version: str | None = typer.Option(None, help="Model version (default: champion)."),
           html: str | None = typer.Option(None, "--html",
                                           help="Write the gate's HTML report to this file ('-': stdout)."),
           tracking_uri: str | None = TrackingOpt, as_json: bool = JsonOpt) -> None:
    """Print the gate record and lineage of one model version, or save its HTML gate report."""
    from daybreak.promote import gate_report_html, version_report

    s = _load(spec, try_model=False)
    ctx = _ctx(date.today(), None, tracking_uri)
    if html is not None:
        page = gate_report_html(s, ctx, version)
        if html == "-":
            typer.echo(page)
        else:
            Path(html).write_text(page)
            typer.echo(f"wrote {html}", err=True)
        return
    rep = version_report(s, ctx, version)
    if as_json:
        _emit(rep, True)
        return
    for k, v in rep.items():
        if k == "rules":
            continue
        text = str(v)
        typer.echo(f"{k:<28} {text if len(text) <= 300 else text[:300] + f'... ({len(text):,} characters; --json)'}")
    for r in rep["rules"]:
        typer.echo(_rule_line(r))


@app.command()
def validate(spec: str = SpecOpt, as_json: bool = JsonOpt) -> None:
    """Check a spec and print its hashes; exits 3 naming the bad field if invalid."""
    s = _load(spec)
    info = {"name": s.name, "spec_hash": s.spec_hash(), "feature_version": s.feature_version(),
            "features": s.features.feature_names()}
    _emit(info, as_json, f"{spec}: ok (spec {info['spec_hash']}, features v={info['feature_version']}, "
                          f"{len(info['features'])} features)")


OnlineUrlOpt = typer.Option(None, "--online-url", envvar="DAYBREAK_ONLINE_URL",
                            help="The online store: redis://... (or rediss://); default: SQLite in "
                                 "$DAYBREAK_HOME/online.")


@online_app.command("materialize")
def online_materialize(spec: str = SpecOpt, day: str = DayOpt, store: str | None = StoreOpt,
                       online_url: str | None = OnlineUrlOpt, as_json: bool = JsonOpt) -> None:
    """Load the online state as of the end of --date from the staged partitions (after the
    features step), atomically: a failed run leaves the previous state in service."""
    from daybreak.online import materialize, spec_store

    s = _load(spec, try_model=False)
    res = materialize(s, _ctx(day, store, None), spec_store(s, online_url)).to_dict()
    _emit(res, as_json, f"{res['date']}  online state {'unchanged' if res['skipped'] else 'materialized'}: "
                        f"generation {res['generation']}, entries {res['entries']}")


@online_app.command("push")
def online_push(spec: str = SpecOpt,
                source: str = typer.Option(..., "--source", help="The spec source the events belong to."),
                file: Path = typer.Option(..., "--file", "-f", help="The events: JSON lines, or a JSON list of objects "
                                                                     "('-': stdin)."),
                online_url: str | None = OnlineUrlOpt, as_json: bool = JsonOpt) -> None:
    """Add events as they arrive, as POST /events does: each counts in a window once its known_at
    has passed, as offline. Timestamps are ISO 8601 with a zone offset."""
    from daybreak.online import OnlineServing

    text = sys.stdin.read() if str(file) == "-" else file.read_text()
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(ln) for ln in text.splitlines()
                                                                         if ln.strip()]
    except json.JSONDecodeError as e:
        raise typer.BadParameter(f"not JSON lines nor a JSON list: {e}", param_hint="'--file'") from None
    online = OnlineServing(_load(spec, try_model=False), url=online_url)
    try:
        res = online.push({"source": source, "rows": rows}, max_rows=max(1, len(rows)))
    finally:
        online.close()
    _emit(res, as_json, f"pushed {res['rows']} {source} event(s), newest {res['newest_event']}; "
                        f"entries {res['entries']}"
                        + (f"; {res['already_materialized']} already materialized (left out)"
                           if res.get("already_materialized") else ""))


@datasets_app.command("flights")
def datasets_flights(out: Path = typer.Option(..., "--out", "-o", help="Landing folder to write."),
                     start: str | None = typer.Option(None, help="First day to write (default: all of 2013).",
                                                      callback=_check_date),
                     end: str | None = typer.Option(None, help="Last day to write.", callback=_check_date),
                     as_json: bool = JsonOpt) -> None:
    """Write the real 2013 NYC flights as daily landing drops plus dimension tables."""
    from daybreak.demo import build_flights_landing
    from daybreak.infra.context import parse_date

    res = build_flights_landing(out, start=parse_date(start) if start else None, end=parse_date(end) if end else None)
    _emit(res, as_json, f"wrote {res['flights']} flights in {res['flight_days']} daily files, "
                        f"{res['weather_days']} weather files and {len(res['dims'])} dimension tables to {out}")


@prefect_app.command("deploy")
def prefect_deploy(spec: str = SpecOpt,
                   cron: str = typer.Option("0 3 * * *", "--cron", help="When the daily cycle runs (cron, 5 fields)."),
                   timezone: str = typer.Option("UTC", "--timezone", help="Time zone of the cron schedule (IANA)."),
                   name: str | None = typer.Option(None, "--name",
                                                   help="Deployment name (default: daybreak-<spec name>)."),
                   store: str | None = StoreOpt, tracking_uri: str | None = TrackingOpt,
                   ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster to run on."),
                   serve_url: str | None = typer.Option(None, "--serve-url", help="Endpoint the deploy step checks."),
                   storage_secret: str | None = typer.Option(
                       None, "--storage-secret", help="Block with the S3 settings: a Secret (JSON), or a prefect-aws "
                                                      "AwsCredentials or S3Bucket (an S3Bucket is also the store)."),
                   mlflow_secret: str | None = typer.Option(None, "--mlflow-secret",
                                                               help="Secret block with the MLflow token or login."),
                   limit: int | None = typer.Option(None, "--limit", help="At most this many runs at once.")) -> None:
    """Serve the daily_retrain (on the cron schedule), backfill and approve flows as deployments
    against the Prefect API in PREFECT_API_URL, until Ctrl-C. Settings given here become the
    deployments' parameter defaults; unset ones come from the Prefect Variable 'daybreak' or the
    environment at run time."""
    from daybreak.prefect.deploy import serve as serve_flows

    serve_flows(str(spec), cron, timezone=timezone, name=name, limit=limit,
                settings={"store": store, "tracking_uri": tracking_uri, "ray_address": ray_address,
                          "serve_url": serve_url, "storage_secret": storage_secret, "mlflow_secret": mlflow_secret})


def _leave(code: int, hard: bool) -> None:
    """Exit after an error; `hard`: without the interpreter's shutdown, where native thread pools
    (xgboost's OpenMP, pyarrow's) were seen to abort it under load (SIGABRT) after the message was
    out, turning exit 2 into -6."""
    if not hard:
        sys.exit(code)
    for out in (_JSON_OUT, sys.stdout):
        if out is not None:
            out.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def main(hard_exit: bool = True) -> None:
    """The console script. ``hard_exit=False`` raises SystemExit instead (for callers in process)."""
    global _JSON_OUT
    setup_logging(verbose=os.environ.get("DAYBREAK_DEBUG") == "1")
    if "--json" in sys.argv[1:]:
        _JSON_OUT, sys.stdout = sys.stdout, sys.stderr
    try:
        _main(hard_exit)
    finally:
        if _JSON_OUT is not None:
            sys.stdout, _JSON_OUT = _JSON_OUT, None


def _main(hard_exit: bool) -> None:
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code here (commands return None)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as e:
        try:  # typer 0.2x carries its own copy of click
            from typer._click.exceptions import ClickException, UsageError
        except ImportError:
            from click import ClickException, UsageError  # type: ignore[assignment]

        if isinstance(e, ClickException):  # usage: exit code 2, one "error:" line like the others
            typer.echo(f"error: {e.format_message()}", err=True)
            if isinstance(e, UsageError) and e.ctx is not None:
                typer.echo(f"{e.ctx.get_usage()}\nTry '{e.ctx.command_path} --help' for help.", err=True)
            sys.exit(e.exit_code)
        _leave(_report(e), hard_exit)


def exit_code_for(e: BaseException) -> ExitCode:
    """The exit code of an error (the table in ExitCode): bad input when daybreak refused the input,
    infrastructure when a service failed or refused us (what an orchestrator would retry), else a bug."""
    if isinstance(e, DaybreakError):
        return ExitCode.INFRASTRUCTURE if e.retryable else ExitCode.BAD_INPUT
    if isinstance(e, ValueError):  # values the steps refuse (an --override that is not promote/reject)
        return ExitCode.BAD_INPUT
    if credentials_refused(e) or is_retryable(e):
        return ExitCode.INFRASTRUCTURE
    return ExitCode.ERROR


def _report(e: Exception) -> ExitCode:
    """Print one redacted line for `e` (a redacted traceback with DAYBREAK_DEBUG=1), never the
    interpreter's or rich's traceback, which would print URIs with their passwords (and locals)."""
    code = exit_code_for(e)
    if isinstance(e, (DaybreakError, ValueError)):
        typer.echo(f"error: {redact(e)}", err=True)
        return code
    refused = credentials_refused(e)
    if refused:
        typer.echo(f"error: the MLflow tracking server refused the credentials ({refused}): "
                   f"{redact(str(e).splitlines()[0][:300])}\nSet MLFLOW_TRACKING_USERNAME and "
                   "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for it.", err=True)
        return code
    if os.environ.get("DAYBREAK_DEBUG") == "1":
        import traceback

        typer.echo(redact("".join(traceback.format_exception(e))), err=True)
    typer.echo(f"error: {type(e).__name__}: {redact(e)}", err=True)
    return code


if __name__ == "__main__":
    main()
