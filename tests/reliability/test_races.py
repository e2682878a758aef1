"""Races: two `daybreak run` for the same date at once, two promotions at once and a rollback during
a promotion, as real processes on one DAYBREAK_HOME. One coherent outcome, recorded.

Every trial starts from the same registry and store: a template home is built once (champion v2,
previous v1, and two more candidates for 2013-01-03 gated PROMOTE against v2) and copied back to
the same path before each trial (MLflow keeps absolute artifact paths, so the path must not move;
the test reads the registry with SQLAlchemy's NullPool so no pooled connection outlives a copy).
Three racer processes, kept for the whole module, import everything once; each trial hands some of
them one daybreak command (run through the real CLI entry point) and starts them on one signal, so
the commands really overlap. The runs' feature step uses the session's Ray (RAY_ADDRESS).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import invariants
import pytest
import yaml
from conftest import BIN, SPEC
from tally import FULL, tally, trials
from test_bad_input import RUN_CLI

from daybreak.features import build_features
from daybreak.gate import PROMOTE, evaluate_gate
from daybreak.infra import registry
from daybreak.infra.audit import audit_events
from daybreak.infra.context import RunContext
from daybreak.promote import promote_model
from daybreak.spec import load_spec
from daybreak.stage import stage
from daybreak.train import train_model

DAY = "2013-01-04"  # raced from scratch: stage, features, train, gate, promote
GATED = "2013-01-03"  # the template's candidates A and B were gated for this date
SEEDS = {"main": 13, "a": 1001, "b": 1002}

# A racer: one process that runs daybreak commands through the real entry point (daybreak.cli.main),
# one per trial: it waits for its job file, then for the trial's go file, runs the command and writes
# the exit code and what it printed. One process serves every trial of a test, so the imports (a few
# CPU seconds each) are paid once. With when=promotion it waits, after the go file, until a promotion
# is under way (the promotion lock is held, or the champion has moved already).
RACER = RUN_CLI + r"""
import json, os, sys, time
ctl, me = sys.argv[1:3]
import mlflow, ray, xgboost
import daybreak.cli, daybreak.cycle, daybreak.promote
from daybreak.infra import registry
from daybreak.infra.context import RunContext
daybreak.cli.setup_logging()
ORIGINAL_PROMOTE = daybreak.promote.promote_model
open(f"{ctl}/ready-{me}", "w").close()

def wait(path, until=None):
    while not os.path.exists(path):
        if os.path.exists(f"{ctl}/stop") or (until and time.monotonic() > until):
            return False
        time.sleep(0.002)
    return True

for k in range(10**6):
    if not wait(f"{ctl}/job-{me}-{k}.json"):
        break
    job = json.load(open(f"{ctl}/job-{me}-{k}.json"))
    cl = registry.client(RunContext.create("2013-01-01"))
    first = registry.alias_version(cl, "flights_delay", "champion")
    open(f"{ctl}/armed-{me}-{k}", "w").close()
    if not wait(f"{ctl}/{job['go']}", time.monotonic() + 900):
        break
    until = time.monotonic() + 600
    while job["when"] == "promotion" and time.monotonic() < until:
        if any(m.name == "flights_delay.daybreak-lock" for m in cl.search_registered_models()):
            break
        now = registry.alias_version(cl, "flights_delay", "champion")
        if (now and now.version) != (first and first.version):
            break
        time.sleep(0.005)
    # the cycle looks its steps up by name when it runs them (daybreak.steps.STEPS): the promote
    # step is daybreak.promote.promote_model at call time
    step = ORIGINAL_PROMOTE
    if job.get("sync"):  # meet the other racers at the start of the promote step
        def step(*a, **kw):
            open(f"{ctl}/{job['go']}-sync-{me}", "w").close()
            while sum(f.startswith(f"{job['go']}-sync-") for f in os.listdir(ctl)) < job["sync"]:
                time.sleep(0.002)
            return ORIGINAL_PROMOTE(*a, **kw)
    daybreak.promote.promote_model = step
    code, out, err = run_cli(job["argv"])
    with open(f"{ctl}/res-{me}-{k}.tmp", "w") as fh:
        json.dump({"rc": code, "stdout": out, "stderr": err}, fh)
    os.replace(f"{ctl}/res-{me}-{k}.tmp", f"{ctl}/res-{me}-{k}.json")
os._exit(0)  # no exit handlers: this process has nothing to flush, and Ray's take seconds
"""


def race_spec(path: Path, seed: int) -> Path:
    """The demo spec, cheaper where a race does not care (a small model, no bootstrap, slices or
    data checks) and with a gate every candidate passes, so every race reaches promotion."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["model"] |= {"num_boost_round": 20, "seed": seed}
    raw["gate"] |= {"compare": "no_worse", "margin": 1.0, "floor": 0.0, "bootstrap": None,
                    "slices": {"columns": []}, "data_checks": {"row_count": None, "label_shift": None, "drift": None}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def race_home(tmp_path_factory: pytest.TempPathFactory, featured: Path, ray_local: None) -> Iterator[dict[str, Any]]:
    """The template homes, and the module's three racers (started first: they import while the
    templates are built, and touch the home only once a trial hands them a command)."""
    import ray

    base = tmp_path_factory.mktemp("races")
    home = base / "home"
    gcs = ray.get_runtime_context().gcs_address
    racers = Racers(home, gcs, 3, tmp_path_factory.mktemp("racers") / "ctl")
    try:
        yield _build_templates(base, home, featured) | {"ray": gcs, "racers": racers.ready()}
    finally:
        racers.stop()


def _build_templates(base: Path, home: Path, featured: Path) -> dict[str, Any]:
    shutil.copytree(featured / "store", home / "store", symlinks=True)
    files = {k: race_spec(base / f"{k}.yaml", seed) for k, seed in SEEDS.items()}
    specs = {k: load_spec(f) for k, f in files.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAYBREAK_HOME", str(home))
        mp.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        for day in ("2013-01-02", GATED):  # v1, then v2 replacing it
            train_model(specs["main"], RunContext.create(day))
            assert evaluate_gate(specs["main"], RunContext.create(day))["decision"] == PROMOTE
            assert promote_model(specs["main"], RunContext.create(day))["promoted"]
        for k in ("a", "b"):  # v3 and v4, both gated against v2
            assert train_model(specs[k], RunContext.create(GATED))["model_version"] == {"a": "3", "b": "4"}[k]
            g = evaluate_gate(specs[k], RunContext.create(GATED))
            assert g["decision"] == PROMOTE and g["champion_version"] == "2", g
    template = base / "template"
    shutil.copytree(home, template, symlinks=True)
    featured_day = None
    if "featured" in kinds():
        with pytest.MonkeyPatch.context() as mp:  # the same, with DAY staged and its features built
            mp.setenv("DAYBREAK_HOME", str(home))
            mp.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
            stage(specs["main"], RunContext.create(DAY))
            build_features(specs["main"], RunContext.create(DAY))
        featured_day = base / "template-featured"
        shutil.copytree(home, featured_day, symlinks=True)
    return {"home": home, "template": template, "featured_day": featured_day, "files": files, "specs": specs}


@pytest.fixture
def at_home(race_home: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("DAYBREAK_HOME", str(race_home["home"]))
    monkeypatch.setenv("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
    return race_home


def restore(rh: dict[str, Any], template: str = "template") -> None:
    """The home exactly as the template left it (at the same path)."""
    shutil.rmtree(rh["home"])
    shutil.copytree(rh[template], rh["home"], symlinks=True)


class Racers:
    """Racer processes on the home (see RACER); `trial` hands some of them a command each and
    starts them on one signal."""

    def __init__(self, home: Path, ray_address: str, n: int, ctl: Path, timeout: float = 600) -> None:
        self.ctl, self.timeout, self.trials = ctl, timeout, 0
        self.jobs = [0] * n  # jobs handed to each racer so far
        ctl.mkdir()
        env = {**os.environ, "DAYBREAK_HOME": str(home), "RAY_ADDRESS": ray_address,
               "DAYBREAK_SHARED_FS": "1",  # the session's Ray, on this host: it sees the local store
               "MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"}
        self.procs = [subprocess.Popen([str(BIN / "python"), "-c", RACER, str(ctl), str(i)], env=env,
                                       stdout=(ctl / f"out-{i}.log").open("w"), stderr=subprocess.STDOUT,
                                       start_new_session=True) for i in range(n)]

    def ready(self) -> Racers:
        """Once every racer has done its imports."""
        n = len(self.procs)
        self._until(lambda: all((self.ctl / f"ready-{i}").exists() for i in range(n)), "start")
        return self

    def _until(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            dead = [i for i, p in enumerate(self.procs) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join((self.ctl / f"out-{i}.log").read_text()[-3000:] for i in dead)
                raise AssertionError(f"racers {dead or 'timed out'} during {what}:\n{logs}")
            time.sleep(0.02)

    def trial(self, jobs: list[tuple[str, list[str]]], sync: bool = False) -> list[dict[str, Any]]:
        """[(when, argv)], one per racer (the first len(jobs) racers) -> [{"rc", "json", "stdout", "stderr"}].
        `sync`: the racers also wait for each other at the start of the promote step."""
        go = f"go-{self.trials}"
        self.trials += 1
        names = []
        for i, (when, argv) in enumerate(jobs):
            names.append(f"{i}-{self.jobs[i]}")
            self.jobs[i] += 1
            (self.ctl / "job.tmp").write_text(json.dumps({"when": when, "argv": argv, "go": go,
                                                          "sync": len(jobs) if sync else 0}))
            os.replace(self.ctl / "job.tmp", self.ctl / f"job-{names[-1]}.json")
        self._until(lambda: all((self.ctl / f"armed-{n}").exists() for n in names), go)
        (self.ctl / go).touch()
        self._until(lambda: all((self.ctl / f"res-{n}.json").exists() for n in names), go)
        out = []
        for n in names:
            r = json.loads((self.ctl / f"res-{n}.json").read_text())
            try:
                r["json"] = json.loads(r["stdout"]) if r["stdout"].strip() else None
            except json.JSONDecodeError:
                r["json"] = None
            out.append(r)
        return out

    def stop(self) -> None:
        (self.ctl / "stop").touch()
        for p in self.procs:  # only ours, by process group
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture(scope="module")
def racers(race_home: dict[str, Any]) -> Racers:
    """Three racers, shared by the tests of this module."""
    return race_home["racers"]


def error_line(r: dict[str, Any]) -> str:
    lines = [ln for ln in r["stderr"].splitlines() if ln.startswith("error:")]
    return lines[-1] if lines else (r["stderr"].strip().splitlines() or ["(no output)"])[-1][:500]


def new_events(spec, ctx: RunContext, before: set[str]) -> list[dict[str, Any]]:
    """Audit events recorded since `before` (audit run ids), oldest first."""
    return [e for e in reversed(audit_events(spec, ctx)) if e["audit_run_id"] not in before]


def aliases(spec, ctx: RunContext) -> tuple[str | None, str | None]:
    cl = registry.client(ctx)
    found = [registry.alias_version(cl, spec.model.name, a)
             for a in (spec.promotion.alias, spec.promotion.previous_alias)]
    return tuple(None if mv is None else str(mv.version) for mv in found)  # type: ignore[return-value]


def common_problems(spec, ctx: RunContext, before: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The suite's invariants, one version per lineage, and no lock left behind."""
    inv = invariants.check(spec, ctx, before)
    problems = list(inv["problems"])
    cl = registry.client(ctx)
    lineages: dict[str, list[str]] = {}
    for mv in registry.versions(cl, spec.model.name):
        key = mv.tags.get(registry.LINEAGE_TAG)
        if key and mv.tags.get("daybreak.forced_retrain") != "true":
            lineages.setdefault(key, []).append(str(mv.version))
    problems += [f"lineage {k} has versions {v}" for k, v in lineages.items() if len(v) > 1]
    if any(m.name.endswith(".daybreak-lock") for m in cl.search_registered_models()):
        problems.append("the promotion lock was left behind")
    return problems, inv


# What the two runs of a trial start from: scratch (both stage and build features at once, on the
# session's Ray, then train...), featured (DAY staged and featured: both train at once), gated
# (candidate A of GATED trained and gated: both go straight to promoting it, as a retry of the
# promote step overlapping the first attempt does; the two also meet at the start of the promote
# step, so both read the candidate before either moves the champion).
KINDS = ("scratch", "featured", "gated")


def kinds() -> tuple[str, ...]:
    """``make test`` races from scratch and gated: the scratch race reaches train with both runs
    too, so the featured start (both runs straight to training) is left to ``make reliability``."""
    return KINDS if FULL else ("scratch", "gated")


def test_two_runs_for_the_same_date_at_once(at_home: dict[str, Any], racers: Racers) -> None:
    """Two `daybreak run` of one spec and date at once (a retry overlapping the scheduled run):
    one partition per zone, one model version, one promotion, and both runs say so."""
    t = tally("race: two runs of one date")
    collided = 0
    took: list[str] = []
    for i in range(trials(2, 10)):
        kind = kinds()[i % len(kinds())]
        key, day = ("a", GATED) if kind == "gated" else ("main", DAY)
        spec, file = at_home["specs"][key], str(at_home["files"][key])
        started = time.monotonic()
        restore(at_home, "featured_day" if kind == "featured" else "template")
        ctx = RunContext.create(day)
        before = invariants.snapshot(spec, ctx)
        events_before = {e["audit_run_id"] for e in audit_events(spec, ctx)}
        runs = racers.trial([("go", ["run", "--spec", file, "--date", day, "--no-deploy", "--json"])] * 2,
                            sync=kind == "gated")
        problems, inv = common_problems(spec, ctx, before)
        ok = [r for r in runs if r["rc"] == 0 and r["json"]]
        cl = registry.client(ctx)
        made = registry.versions(cl, spec.model.name, {registry.DATE_TAG: day, registry.SPEC_TAG: spec.spec_hash()})
        if len(made) != 1:
            problems.append(f"{len(made)} versions for {day} (want 1): {[str(m.version) for m in made]}")
        version = str(made[0].version) if made else None
        for r in runs:
            if r in ok:
                continue
            if "changed while waiting for the lock" in r["stderr"] and aliases(spec, ctx)[0] == version:
                problems.append(f"the run that reached the lock second failed (exit {r['rc']}) although its "
                                f"candidate v{version} is champion, promoted by its twin: {error_line(r)} "
                                "(promote_model re-checks under the lock and raises PromotionConflict on "
                                "promoted_at; it should answer 'already champion', as before the lock)")
            else:
                problems.append(f"run exited {r['rc']}: {error_line(r)}")
        for zone in invariants.zones(spec)[:-1]:  # staged sources and features (nothing scored)
            if ctx.store.partition(zone, ctx.logical_date) is None:
                problems.append(f"{zone}/date={day} not published")
        for r in ok:
            res = r["json"]
            if res["train"].get("model_version") != version:
                problems.append(f"a run reports candidate v{res['train'].get('model_version')}, "
                                f"the registry v{version}")
            if res["summary"]["champion_version"] != version:
                problems.append(f"a run reports champion v{res['summary']['champion_version']}, want v{version}")
        hashes = {json.dumps({k: v.get("content_hash") for k, v in r["json"]["stage"]["sources"].items()})
                  for r in ok}
        if len(hashes) > 1:
            problems.append(f"the runs staged different content: {hashes}")
        promoted = [r for r in ok if r["json"]["promote"].get("promoted")]
        if len(promoted) != 1:
            problems.append(f"{len(promoted)} runs say they promoted (want 1)")
        events = new_events(spec, ctx, events_before)
        if [(e["event"], e["version"], e["from_version"]) for e in events] != [("promote", version, "2")]:
            problems.append(f"history: {[(e['event'], e['version'], e['from_version']) for e in events]}, "
                            f"want one promote of v{version} from v2")
        if aliases(spec, ctx) != (version, "2"):
            problems.append(f"champion/previous are {aliases(spec, ctx)}, want ({version}, 2)")
        collided += sum(1 for r in ok if r["json"]["train"].get("discarded_run_id"))
        took.append(f"{kind} {time.monotonic() - started:.0f}s")
        t.record(problems, data_lost=inv["data_lost"], wrong_promotions=inv["wrong_promotions"]
                 + max(0, len([e for e in events if e["event"] == "promote"]) - 1))
    print(f"two runs of one date: {t.trials} trials; in {collided} both trained and one discarded its duplicate; "
          f"trials took {took}")
    t.check()


def replay(events: list[dict[str, Any]], champion: str, previous: str | None,
           replaced: dict[str, str | None]) -> tuple[str, str | None, list[str]]:
    """Apply promote and rollback events in order from (champion, previous): the aliases the
    history implies, and every step that the compare-and-set should have refused."""
    bad = []
    for e in events:
        v, f = e["version"], e["from_version"]
        if e["event"] == "promote":
            if f != champion:
                bad.append(f"promote v{v} from v{f} while v{champion} was champion")
            champion, previous = v, champion
        elif e["event"] == "rollback":
            if f != champion or v != previous:
                bad.append(f"rollback to v{v} from v{f} while the aliases were ({champion}, {previous})")
            champion, previous = v, replaced.get(v)
            if previous == f:
                previous = None
        else:
            bad.append(f"unexpected event {e['event']} v{v}")
    return champion, previous, bad


def test_two_promotions_and_a_rollback_at_once(at_home: dict[str, Any], racers: Racers) -> None:
    """Two runs whose candidates (v3, v4) were both gated against the champion v2 promote at the
    same moment a person rolls back. Whatever the order, the compare-and-set lets each move happen
    only against the champion it was decided against, the history replays to the aliases, and each
    process's answer matches what the history says it did."""
    t = tally("race: two promotions + a rollback")
    files, spec = at_home["files"], at_home["specs"]["main"]
    outcomes: dict[str, int] = {}
    started = time.monotonic()
    for i in range(trials(2, 10)):
        restore(at_home)
        ctx = RunContext.create(GATED)
        before = invariants.snapshot(spec, ctx)
        events_before = {e["audit_run_id"] for e in audit_events(spec, ctx)}
        # the rollback starts with the runs, or (odd trials) once a promotion is under way
        when = "promotion" if i % 2 else "go"
        runs = racers.trial([("go", ["run", "--spec", str(files["a"]), "--date", GATED, "--no-deploy", "--json"]),
                            ("go", ["run", "--spec", str(files["b"]), "--date", GATED, "--no-deploy", "--json"]),
                            (when, ["rollback", "--spec", str(files["main"]), "--reason", "race trial", "--json"])])
        problems, inv = common_problems(spec, ctx, before)
        events = new_events(spec, ctx, events_before)
        cl = registry.client(ctx)
        tags = {v: cl.get_model_version(spec.model.name, v).tags for v in ("1", "2", "3", "4")}
        replaced = {v: tg.get("daybreak.replaced_version") for v, tg in tags.items()}
        replaced = {v: None if r in (None, "none") else r for v, r in replaced.items()}
        champ, prev, bad = replay(events, "2", "1", replaced)
        problems += bad
        if (champ, prev) != aliases(spec, ctx):
            problems.append(f"the history replays to ({champ}, {prev}) but the aliases are {aliases(spec, ctx)}")
        promotes = [e["version"] for e in events if e["event"] == "promote"]
        rollbacks = [e for e in events if e["event"] == "rollback"]
        for (r, v) in zip(runs[:2], ("3", "4"), strict=False):
            said = bool(r["rc"] == 0 and r["json"] and r["json"]["promote"].get("promoted"))
            if said != (v in promotes):
                problems.append(f"run of v{v}: exit {r['rc']}, promoted={said}, but the history has "
                                f"{promotes.count(v)} promotion(s) of v{v}: {error_line(r)}")
            if r["rc"] not in (0, 3) or (r["rc"] == 3 and "champion is now" not in r["stderr"]):  # a lost race: exit 3
                problems.append(f"run of v{v} failed unexpectedly (exit {r['rc']}): {error_line(r)}")
            if ("daybreak.promoted_at" in tags[v]) != (v in promotes):
                problems.append(f"v{v}: promoted_at tag and history disagree")
        rb = runs[2]
        if (rb["rc"] == 0) != (len(rollbacks) == 1) or len(rollbacks) > 1:
            problems.append(f"rollback exited {rb['rc']} and the history has {len(rollbacks)} rollback(s): "
                            f"{error_line(rb)}")
        if rb["rc"] == 0 and rollbacks and rb["json"]["rolled_back_version"] != rollbacks[0]["from_version"]:
            problems.append(f"rollback says it rolled back v{rb['json']['rolled_back_version']}, the history "
                            f"v{rollbacks[0]['from_version']}")
        if any(promotes.count(v) > 1 for v in promotes):
            problems.append(f"a version was promoted twice: {promotes}")
        for r in rollbacks:
            if "daybreak.rolled_back_at" not in tags[r["from_version"]]:
                problems.append(f"v{r['from_version']} was rolled back but carries no rolled_back_at tag")
        order = " -> ".join(f"{e['event']} v{e['version']}" for e in events) or "nothing"
        outcomes[order] = outcomes.get(order, 0) + 1
        t.record(problems, data_lost=inv["data_lost"], wrong_promotions=inv["wrong_promotions"] + len(bad))
    print(f"two promotions + a rollback: {(time.monotonic() - started) / t.trials:.0f}s a trial; outcomes: {outcomes}")
    t.check()
