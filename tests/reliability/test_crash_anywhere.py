"""Crash anywhere: SIGKILL the daily cycle at random points of stage, features, train, gate and
promote, walking forward one date per trial; after each kill a rerun of the date completes, no
reader ever sees a partial partition, and the champion is always a version gated PROMOTE.

Each trial runs ``daybreak.cycle.run_cycle`` for the next date in a real process (forked from
crash_worker.py, which holds the imports; all runs share one Ray head started here) and kills it
with SIGKILL inside a target step (round robin over the steps): at a random moment within the
step's duration as measured on earlier runs, or, every other time for the steps that write to
the registry (train, gate, promote), right after a random one of the step's registry writes
(narrow windows such as "alias moved, history not yet written" that a timer seldom hits). The
worker writes a line as each step begins and ends and after each registry write, so the test
knows where the kill landed. Then:

- right after the kill: ``invariants.check`` against the store and registry as they were before
  the trial (nothing published is partial or lost; the champion carries a PROMOTE decision);
- the date is run again and must complete within RERUN_TIMEOUT_S, after which the same
  invariants hold, the date is whole (staged and feature partitions, one version gated), a
  version gated PROMOTE on the latest date is the champion, the champion's promotion is in the
  audit history, no version is left without lineage, and no registry lock is left that blocks the next taker;
- all along, a reader thread reads the trial date's partitions and reports any it finds partial.

Full mode asserts every step was hit at least once, CI mode at least three different steps.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import invariants
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import BIN, SPEC, free_port, make_home
from ray_nodes import stop_family  # terminate a process and its children, by PID
from ray_nodes import wait_started as _wait_started
from tally import FULL, tally, trials

from daybreak.gate import PROMOTE
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.store import sha256_files

HERE = Path(__file__).resolve().parent
STEPS = ["stage", "features", "train", "gate", "promote"]
# Round robin in this order (CI's three trials: features, train, promote; test_stage_crash.py
# already kills the stage step at random moments of publishing, in CI).
ORDER = ["features", "train", "promote", "gate", "stage"]
FIRST_DAY = date(2013, 1, 1)
# Before a step has been seen whole: its duration on a loaded 2-core machine (seconds).
DEFAULT_SECONDS = {"stage": 0.25, "features": 7.0, "train": 7.0, "gate": 5.0, "promote": 0.8}
RERUN_TIMEOUT_S = 90.0  # a whole cycle takes 15-50 s on a loaded 2-core machine
KILL_RUN_TIMEOUT_S = 240.0
PLANNED = trials(3, 32)
EXTRA_TRIALS = 8  # at most, aimed at steps no kill has hit yet
LOCK_SUFFIX = ".daybreak-lock"


# --- processes -----------------------------------------------------------------------------------

@dataclass
class Run:
    """One cycle in a child of the fork server."""
    day: str
    pid: int
    markers: Path
    started: float = field(default_factory=time.monotonic)

    def events(self) -> list[tuple[float, str, str]]:
        """(time, kind, detail) per whole line (see crash_worker.py)."""
        try:
            text = self.markers.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            t, kind, *rest = line.split(" ", 2)
            out.append((float(t), kind, rest[0] if rest else ""))
        return out


class Worker:
    """crash_worker.py: forks one child per cycle; the test kills children by PID."""

    def __init__(self, spec_file: Path, env: dict[str, str], folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.proc = subprocess.Popen([str(BIN / "python"), str(HERE / "crash_worker.py"), str(spec_file)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     cwd=folder)
        self.child: Run | None = None

    def ready(self) -> float:
        line = self.proc.stdout.readline()
        assert line.startswith("READY"), f"crash_worker did not start: {line!r}"
        return float(line.split()[1])

    def start(self, day: str, kill_step: str = "-", kill_at: int = 0) -> Run:
        """Run `day`'s cycle; with `kill_at` > 0 it kills itself right after that registry write of
        `kill_step`."""
        self.count += 1
        markers = self.folder / f"{self.count:03d}-{day}.markers"
        log = self.folder / f"{self.count:03d}-{day}.log"
        self.proc.stdin.write(f"{day} {markers} {log} {kill_step} {kill_at}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line.startswith("PID "), f"crash_worker: {line!r}"
        self.child = Run(day, int(line.split()[1]), markers)
        return self.child

    def exit_code(self) -> int:
        """Block until the child is gone; its exit code (-9: SIGKILL)."""
        line = self.proc.stdout.readline()
        assert line.startswith("EXIT "), f"crash_worker: {line!r}"
        self.child = None
        return int(line.split()[1])

    def wait(self, run: Run, timeout: float) -> int | None:
        """The child's exit code, or None if it ran past `timeout` (it is then killed)."""
        deadline = run.started + timeout
        while time.monotonic() < deadline:
            if any(kind in ("DONE", "FAIL") for _, kind, _ in run.events()):
                return self.exit_code()
            try:
                gone = psutil.Process(run.pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                return self.exit_code()
            time.sleep(0.1)
        os.kill(run.pid, signal.SIGKILL)
        self.exit_code()
        return None

    def close(self) -> None:
        if self.child is not None:
            try:
                os.kill(self.child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            stop_family(self.proc)


def _ray_head(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A one-node Ray cluster for every run of the test (token auth, as DESIGN.md says a host that
    ever ran a local Ray needs), stopped by PID."""
    port = free_port()
    log = tmp / "head.log"
    head = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--head", f"--port={port}", f"--temp-dir={tmp}",
                             "--include-dashboard=false", "--num-cpus=2", "--node-ip-address=127.0.0.1",
                             "--object-store-memory=200000000", "--disable-usage-stats"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"127.0.0.1:{port}"


# --- what readers see ----------------------------------------------------------------------------

def partition_state(ctx: RunContext, zone: str, day: date) -> str:
    """'ok', 'absent', 'stale' (republished while we read), or what is wrong with it."""
    part = ctx.store.partition(zone, day)
    if part is None:
        return "absent"
    try:
        if sha256_files(part.files, ctx.store.fs) != part.manifest["content_hash"]:
            raise ValueError("files do not match the manifest's content hash")
        rows = sum(pq.ParquetFile(ctx.store.fs.open_input_file(f)).metadata.num_rows for f in part.files)
        if rows != part.manifest["rows"]:
            return f"{rows} rows, the manifest says {part.manifest['rows']}"
        return "ok"
    except (OSError, ValueError) as e:
        now = ctx.store.partition(zone, day)
        if now is not None and now.manifest["run"] != part.manifest["run"]:
            return "stale"
        return f"partial: {type(e).__name__}: {e}"


class Reader(threading.Thread):
    """Reads the current trial date's partitions over and over while the cycle runs and dies."""

    def __init__(self, spec: Any, home: Path) -> None:
        super().__init__(daemon=True)
        self.spec, self.home = spec, home
        self.day: date | None = None
        self.bad: list[str] = []
        self.reads = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        ctx = RunContext.create(FIRST_DAY, store=str(self.home / "store"), tracking_uri="sqlite:///unused")
        while not self.stop.is_set():
            day = self.day
            if day is not None:
                for zone in invariants.zones(self.spec):
                    state = partition_state(ctx, zone, day)
                    self.reads[state if state in ("ok", "absent", "stale") else "bad"] += 1
                    if state not in ("ok", "absent", "stale"):
                        self.bad.append(f"reader saw {zone}/date={day}: {state}")
            self.stop.wait(0.2)  # a 2-core machine: leave the cycle its CPU

    def take(self) -> list[str]:
        bad, self.bad = self.bad, []
        return bad


# --- what must hold after a rerun ----------------------------------------------------------------

def lock_state(spec: Any, ctx: RunContext) -> str | None:
    """The registry lock on the model's aliases, if one is held: who and for how long."""
    from mlflow.exceptions import MlflowException

    try:
        held = registry.client(ctx).get_registered_model(spec.model.name + LOCK_SUFFIX)
    except MlflowException:
        return None
    left = float(held.tags.get("daybreak.lock_expires", 0)) - time.time()
    return f"held by {held.tags.get('daybreak.lock_owner')}, lease ends in {left:.0f} s"


def day_problems(spec: Any, ctx: RunContext, day: date, summary: dict[str, Any]) -> list[str]:
    """After a rerun completed `day`, the newest date: is everything the day should leave there?"""
    from daybreak.infra.audit import audit_events

    out = []
    for zone in invariants.zones(spec)[:-1]:  # staged sources and features (predictions: batch scoring)
        if ctx.store.partition(zone, day) is None:
            out.append(f"{zone}/date={day} missing after the rerun")
    versions = invariants.versions(spec, ctx)
    orphans = sorted((v for v, t in versions.items() if registry.DATE_TAG not in t), key=int)
    if orphans:
        out.append(f"versions without lineage tags (registered by a killed run, never usable): {orphans}")
    mine = sorted((v for v, t in versions.items() if t.get(registry.DATE_TAG) == day.isoformat()), key=int)
    if day > FIRST_DAY and len(mine) != 1:
        out.append(f"{len(mine)} versions registered for {day} ({mine}), expected 1")
    for v in mine:
        if registry.DECISION_TAG not in versions[v]:
            out.append(f"v{v} ({day}) has no gate decision after the rerun")
    cl = registry.client(ctx)
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    champ_v = None if champ is None else str(champ.version)
    gated = [v for v in mine if versions[v].get(registry.DECISION_TAG) == PROMOTE]
    if gated and champ_v != gated[-1]:
        out.append(f"v{gated[-1]} ({day}) was gated PROMOTE but the champion is v{champ_v}: promotion lost")
    if summary.get("champion_version") != champ_v:
        out.append(f"the rerun reported champion v{summary.get('champion_version')}, the registry says v{champ_v}")
    if champ_v in mine:  # promoted by this date's runs
        promoted = [e for e in audit_events(spec, ctx) if e["event"] == "promote" and e["version"] == champ_v]
        if not promoted:
            out.append(f"champion v{champ_v} has no promote event in the audit history "
                       f"(promoted_at tag: {champ.tags.get('daybreak.promoted_at', 'missing')})")
    lock = lock_state(spec, ctx)
    if lock:  # left by the killed run: harmless only if the next one takes it over at once
        from daybreak.infra.errors import PromotionConflict

        try:
            with registry.model_lock(registry.client(ctx), spec.model.name, owner="crash-check", wait_s=5):
                pass
        except PromotionConflict:
            out.append(f"registry lock left behind after the rerun blocks the next taker: {lock}")
            _release_stale_lock(spec, ctx)  # recorded; the next trial starts without it
    return out


# --- the scenario --------------------------------------------------------------------------------

@dataclass
class Trial:
    day: str
    target: str
    how: str = "timer"  # "timer": killed by the test, `delay` s into the step; "write": after write `k`
    delay: float | None = None
    k: int = 0
    hit: str = "-"  # the step running when the kill landed
    where: str = ""  # within it: the last registry write before the kill
    kill_exit: int | None = None
    kill_run_s: float | None = None
    lock_after_kill: str | None = None
    rerun_s: float | None = None
    decision: str | None = None
    problems: list[str] = field(default_factory=list)
    data_lost: int = 0
    wrong: int = 0

    def row(self) -> str:
        how = f"+{self.delay:.2f}s" if self.how == "timer" and self.delay is not None else (
            f"write {self.k}" if self.how == "write" else "-")
        rerun = "-" if self.rerun_s is None else f"{self.rerun_s:.1f}s"
        return (f"{self.day} {self.target:<8} {how:<9} hit={self.hit:<14} {self.where:<34} exit={self.kill_exit} "
                f"at {self.kill_run_s or 0:.1f}s rerun={rerun} {self.decision} lock={self.lock_after_kill or '-'} "
                f"problems={len(self.problems)}")


@dataclass
class Learned:
    """What complete steps took on earlier runs: seconds (new dates only) and registry writes."""
    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STEPS})
    writes: dict[str, int] = field(default_factory=lambda: {s: 0 for s in STEPS})

    def seconds_of(self, step: str) -> float:
        seen = sorted(self.seconds[step])
        return seen[len(seen) // 2] if seen else DEFAULT_SECONDS[step]

    def learn(self, events: list[tuple[float, str, str]], timing: set[str]) -> None:
        """Writes of every step that ended; seconds of the `timing` ones (those that did real work)."""
        begun: dict[str, float] = {}
        n: dict[str, int] = {}
        for ts, kind, detail in events:
            if kind == "BEGIN":
                begun[detail], n[detail] = ts, 0
            elif kind == "W":
                step = detail.split()[0]
                n[step] = n.get(step, 0) + 1
            elif kind == "END" and detail in begun and detail in self.writes:
                if detail in timing:
                    self.seconds[detail].append(ts - begun[detail])
                self.writes[detail] = max(self.writes[detail], n.get(detail, 0))


def step_at_kill(events: list[tuple[float, str, str]]) -> tuple[str, str]:
    """(the step running when the process died, its last registry write before that)."""
    running: list[str] = []
    last, write = "start-up", ""
    for _, kind, detail in events:
        if kind == "BEGIN":
            running.append(detail)
            write = ""
        elif kind == "W":
            _, k, method = detail.split()
            write = f"after write {k} ({method})"
        elif kind == "END" and running:
            last = f"after {running.pop()}"
            write = ""
        elif kind in ("DONE", "FAIL"):
            return ("finished" if kind == "DONE" else "failed"), ""
    return (running[-1], write) if running else (last, "")


def spec_file(folder: Path) -> Path:
    """The demo spec with a lenient gate (no worse than the champion, overall and per slice, by 0.5;
    the floor and the data checks still apply), so that most days promote and the promote step
    has real work to do (the demo spec rejects two days in three)."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["gate"]["margin"] = 0.5
    raw["gate"]["slices"]["tolerance"] = 0.5
    out = folder / "flights-crash.yaml"
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@pytest.fixture
def crash_rig(tmp_path: Path, landing: Path, monkeypatch: pytest.MonkeyPatch):
    """A home, the lenient spec, one Ray head and the fork server (both stopped by PID)."""
    import secrets
    import shutil
    import tempfile

    from daybreak.demo import build_flights_landing
    from daybreak.spec import load_spec

    last = FIRST_DAY + timedelta(days=PLANNED + EXTRA_TRIALS)
    if last > date(2013, 1, 12):  # the session's landing ends there
        landing = tmp_path / "landing"
        build_flights_landing(landing, start=FIRST_DAY, end=last)
    home = make_home(tmp_path, landing)
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    spec_path = spec_file(tmp_path)
    # The registry's SQLite store is created (and migrated) here, once, under daybreak's file lock,
    # so the first forked child and this process's readers never race to create it.
    registry.setup_tracking(RunContext.create(FIRST_DAY), load_spec(spec_path).name)
    ray_tmp = Path(tempfile.mkdtemp(prefix="dbcrash", dir="/tmp"))  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DAYBREAK_HOME": str(home),
            "DAYBREAK_SHARED_FS": "1"}  # a Ray cluster on this host: its nodes see the local store
    runs = tmp_path / "runs"
    runs.mkdir()
    t0 = time.monotonic()
    head, address = _ray_head(ray_tmp, env)
    worker = None
    try:
        worker = Worker(spec_path, env | {"RAY_ADDRESS": address}, runs)  # imports while Ray starts
        _wait_started(head, ray_tmp / "head.log")
        imports = worker.ready()
        yield {"spec": load_spec(spec_path), "home": home, "worker": worker, "runs": runs,
               "setup_s": time.monotonic() - t0, "imports_s": imports}
    finally:
        if worker is not None:
            worker.close()
        stop_family(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sigkill_anywhere_in_the_cycle(crash_rig: dict) -> None:
    spec, home, worker = crash_rig["spec"], crash_rig["home"], crash_rig["worker"]
    seed = int(os.environ.get("DAYBREAK_CRASH_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    t = tally("Crash anywhere")
    need = len(STEPS) if FULL else 3
    learned = Learned()
    reader = Reader(spec, home)
    reader.start()
    log: list[Trial] = []
    before = {"problems": [], "partitions": {}, "versions": set()}  # a new home: nothing yet
    t_start = time.monotonic()
    try:
        for i in range(PLANNED + EXTRA_TRIALS):
            hits = {tr.hit for tr in log} & set(STEPS)
            if i >= PLANNED and len(hits) >= need:
                break
            day = FIRST_DAY + timedelta(days=i)
            # in turn, then extra trials go to steps no kill has hit yet
            target = ORDER[i % len(ORDER)] if i < PLANNED else next(s for s in ORDER[::-1] if s not in hits)
            if day == FIRST_DAY and target not in ("stage", "features"):
                target = "features"  # the first day trains nothing
            trial = Trial(day.isoformat(), target)
            # Steps that write to the registry are killed alternately at a random moment and right
            # after a random one of their writes (narrow windows a timer rarely hits).
            if target in ("train", "gate", "promote") and learned.writes[target] and \
                    sum(tr.target == target for tr in log) % 2 == 0:
                trial.how, trial.k = "write", rng.randint(1, learned.writes[target])
            log.append(trial)
            reader.day = day
            before = run_trial(trial, worker, spec, rng, learned, before)
            trial.problems += reader.take()  # partial partitions seen while the run died and the rerun ran
            t.record(trial.problems, data_lost=trial.data_lost, wrong_promotions=trial.wrong)
    finally:
        reader.stop.set()
        reader.join()

    wall = time.monotonic() - t_start
    hits = Counter(tr.hit for tr in log)
    report = "\n".join([f"seed {seed} (DAYBREAK_CRASH_SEED), set-up {crash_rig['setup_s']:.1f} s "
                        f"(imports {crash_rig['imports_s']:.1f} s), {len(log)} trials in {wall:.0f} s, "
                        f"kills landed in {dict(hits)}, reader: {dict(reader.reads)}",
                        *(tr.row() for tr in log), *(p for tr in log for p in tr.problems)])
    print(report)
    (crash_rig["runs"] / "report.txt").write_text(report + "\n")
    t.check()
    assert len(set(hits) & set(STEPS)) >= need, f"kills hit fewer than {need} different steps:\n{report}"
    assert reader.reads["ok"] > 0, f"the reader never read a whole partition:\n{report}"


def kill_run(trial: Trial, worker: Worker, rng: random.Random, learned: Learned) -> Run:
    """Run the date and kill it as the trial says; the run, once it is gone."""
    run = worker.start(trial.day, trial.target, trial.k) if trial.how == "write" else worker.start(trial.day)
    killed, began = trial.how == "write", None
    while time.monotonic() - run.started < KILL_RUN_TIMEOUT_S:
        events = run.events()
        if any(kind in ("DONE", "FAIL") for _, kind, _ in events) or not psutil.pid_exists(run.pid):
            break
        if trial.how == "write":
            pass  # the child kills itself
        elif began is None:
            began = next((ts for ts, kind, step in events if kind == "BEGIN" and step == trial.target), None)
            if began is not None:
                trial.delay = rng.uniform(0, 0.9 * learned.seconds_of(trial.target))
        elif time.time() >= began + trial.delay:
            os.kill(run.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    else:
        os.kill(run.pid, signal.SIGKILL)
        trial.problems.append(f"the cycle ran past {KILL_RUN_TIMEOUT_S:.0f} s; killed")
        killed = True
    trial.kill_exit = worker.exit_code()
    trial.kill_run_s = time.monotonic() - run.started
    events = run.events()
    trial.hit, trial.where = step_at_kill(events)
    learned.learn(events, set(STEPS) if trial.day != FIRST_DAY.isoformat() else set())  # day one trains nothing
    fail = [json.loads(d) for _, k, d in events if k == "FAIL"]
    if fail:
        trial.problems.append(f"the cycle failed before any kill: {fail[0][-1500:]}")
    elif killed and trial.hit not in ("finished",) and trial.kill_exit != -signal.SIGKILL:
        trial.problems.append(f"the killed run exited with {trial.kill_exit}")
    return run


def run_trial(trial: Trial, worker: Worker, spec: Any, rng: random.Random, learned: Learned,
              before: dict[str, Any]) -> dict[str, Any]:
    """Kill the date's cycle inside `trial.target`, check, rerun, check. Returns the new snapshot."""
    ctx = RunContext.create(trial.day)
    run = kill_run(trial, worker, rng, learned)

    # Right after the kill: what is published is whole, nothing is lost, the champion was gated PROMOTE.
    trial.lock_after_kill = lock_state(spec, ctx)
    killed_run = next((d for _, k, d in run.events() if k == "RUNID"), None)
    if trial.lock_after_kill and killed_run and f"by {killed_run}/" in trial.lock_after_kill:
        trial.lock_after_kill += " (the killed run's)"
    add(trial, invariants.check(spec, ctx, before=before), "after the kill")

    # A rerun completes.
    t0 = time.monotonic()
    rerun = worker.start(trial.day)
    code = worker.wait(rerun, RERUN_TIMEOUT_S)
    trial.rerun_s = time.monotonic() - t0
    events = rerun.events()
    if trial.hit in STEPS and trial.day != FIRST_DAY.isoformat():  # the steps after the killed one were new work
        learned.learn(events, set(STEPS[STEPS.index(trial.hit) + 1:]))
    done = [json.loads(d) for _, k, d in events if k == "DONE"]
    if code != 0 or not done:
        why = next((json.loads(d)[-1200:] for _, k, d in events if k == "FAIL"), None)
        state = f"exit {code}" if code is not None else \
            f"still running after {RERUN_TIMEOUT_S:.0f} s, in {step_at_kill(events)[0]}"
        trial.problems.append(f"{trial.day}: the rerun did not complete ({state}); registry lock after the kill: "
                              f"{trial.lock_after_kill or 'none'}, now: {lock_state(spec, ctx) or 'none'}"
                              + (f"; {why}" if why else ""))
        # Go on as an operator would: remove the lock its dead holder cannot release, run the day again.
        _release_stale_lock(spec, ctx)
        again = worker.start(trial.day)
        if worker.wait(again, RERUN_TIMEOUT_S) != 0:
            raise AssertionError(f"{trial.day} does not complete even with no registry lock held: "
                                 f"{again.markers.read_text()[-3000:]}")
        done = [json.loads(d) for _, k, d in again.events() if k == "DONE"]
    trial.decision = done[-1].get("decision")
    check = invariants.check(spec, ctx, before=before)
    add(trial, check, "after the rerun")
    trial.problems += [f"{trial.day}: {p}" for p in day_problems(spec, ctx, ctx.logical_date, done[-1])]
    return check["snapshot"]


def add(trial: Trial, check: dict[str, Any], when: str) -> None:
    trial.problems += [f"{trial.day} {when} (killed in {trial.hit} {trial.where}): {p}" for p in check["problems"]]
    trial.data_lost += check["data_lost"]
    trial.wrong += check["wrong_promotions"]


def _release_stale_lock(spec: Any, ctx: RunContext) -> None:
    from mlflow.exceptions import MlflowException

    try:
        registry.client(ctx).delete_registered_model(spec.model.name + LOCK_SUFFIX)
    except MlflowException:
        pass
