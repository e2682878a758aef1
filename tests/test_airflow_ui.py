"""The DAGs the way users run them: `airflow standalone` (scheduler, API server, DAG processor,
triggerer; LocalExecutor on SQLite), driven through its REST API and its UI in headless Chromium.

One server for the module. The tests run in file order and build on each other (a day trains on
the days before it): the form refuses bad values; a 3-day backfill through the scheduler; a run
triggered from the UI's form with a date override that promotes a new champion; the champion
Asset's events trigger daybreak_batch_score, which scores the promoted dates.

The spec is flights.yaml with a lenient gate (no worse than the champion, margin 1), so every
trained day is promoted and the champion Asset changes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import BIN, ROOT, free_port, make_home

DAILY, BATCH = "daybreak_daily_retrain", "daybreak_batch_score"
POLL = 1.0


class Airflow:
    def __init__(self, url: str, home: Path, daybreak_home: Path, spec: Path, log: Path) -> None:
        self.url, self.home, self.daybreak_home, self.spec, self.log = url, home, daybreak_home, spec, log
        self.token = ""

    def login(self) -> None:
        r = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.password()}, timeout=30)
        r.raise_for_status()
        self.token = r.json()["access_token"]

    def password(self) -> str:
        return json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]

    def api(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.url}/api/v2{path}", headers={"Authorization": f"Bearer {self.token}"},
                             timeout=60, **kwargs)

    def wait(self, what: str, check, timeout: float) -> object:
        """Poll `check` until it returns something truthy; fail naming `what` and the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = check()
            if got:
                return got
            time.sleep(POLL)
        raise AssertionError(f"{what}: not within {timeout:.0f}s\n{self.diagnosis()}")

    def diagnosis(self) -> str:
        """The components' health and the scheduler's last lines (the API server's are noise)."""
        try:
            health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).text
        except httpx.HTTPError as e:
            health = f"no answer: {e}"
        lines = self.log.read_text(errors="replace").splitlines()
        sched = [ln for ln in lines if ln.startswith(("scheduler", "standalone"))][-40:]
        return f"health: {health}\n--- scheduler log tail ---\n" + "\n".join(sched)

    def runs(self, dag_id: str) -> list[dict]:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})
        r.raise_for_status()
        return r.json()["dag_runs"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        r.raise_for_status()
        return r.json()["state"]

    def wait_runs_done(self, dag_id: str, run_ids: list[str], timeout: float) -> None:
        def done() -> bool:
            states = {rid: self.run_state(dag_id, rid) for rid in run_ids}
            failed = {rid: s for rid, s in states.items() if s == "failed"}
            assert not failed, f"{dag_id} runs failed: {failed}; tasks: {self.task_states(dag_id, list(failed))}"
            return all(s == "success" for s in states.values())

        self.wait(f"{dag_id} runs {run_ids} to succeed", done, timeout)

    def task_states(self, dag_id: str, run_ids: list[str]) -> dict:
        out = {}
        for rid in run_ids:
            r = self.api("GET", f"/dags/{dag_id}/dagRuns/{rid}/taskInstances")
            out[rid] = {t["task_id"]: t["state"] for t in r.json().get("task_instances", [])}
        return out

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> dict:
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value")
        r.raise_for_status()
        value = r.json()["value"]
        return json.loads(value) if isinstance(value, str) else value


def _env(base: Path, home: Path, spec: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "AWS_"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # standalone starts its parts as `airflow ...`
        "AIRFLOW_HOME": str(base / "airflow"),
        # SQLite: wait for the write lock (30 s) instead of failing at once when the scheduler, the
        # API server and the task processes write together
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{base / 'airflow' / 'airflow.db'}?timeout=30",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        # a quick loop: the scheduler picks up queued runs and finished tasks within a second
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "DAYBREAK_HOME": str(home),
        "DAYBREAK_SPEC": str(spec),  # the Params form's default
    })
    return env


def _lenient_spec(base: Path) -> Path:
    from test_airflow import lenient_spec

    from daybreak.spec import load_spec

    return lenient_spec(load_spec(ROOT / "specs" / "flights.yaml"), base)


def _stop(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM the server's process group, then SIGKILL it and anything else still running with our
    DAYBREAK_HOME in its environment (task processes' local Ray)."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (pid_dir / "environ").read_bytes() and int(pid_dir.name) != os.getpid():
                os.kill(int(pid_dir.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@contextmanager
def standalone(base: Path, home: Path, spec: Path, env: dict, dag_ids: tuple[str, ...]) -> Iterator[Airflow]:
    """`airflow standalone` with `env` (from `_env`), healthy (the triggerer too), logged in, once
    `dag_ids` are parsed; stopped with everything it started on the way out."""
    log = base / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "airflow"), "standalone"], env=env, cwd=base, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    af = Airflow(env["AIRFLOW__API__BASE_URL"], base / "airflow", home, spec, log)
    try:
        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"airflow standalone exited with {proc.returncode}:\n"
                                     + log.read_text(errors="replace")[-4000:])
            try:
                h = httpx.get(f"{af.url}/api/v2/monitor/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            return all(h.get(k, {}).get("status") == "healthy" for k in ("metadatabase", "scheduler",
                                                                          "dag_processor", "triggerer"))

        af.wait("airflow standalone healthy", healthy, 300)
        passwords = af.home / "simple_auth_manager_passwords.json.generated"
        af.wait("admin password written", passwords.exists, 60)
        af.login()
        af.wait("the DAGs parsed", lambda: all(af.api("GET", f"/dags/{d}").status_code == 200 for d in dag_ids), 120)
        yield af
    finally:
        _stop(proc, f"DAYBREAK_HOME={home}")


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, landing: Path) -> Iterator[Airflow]:
    base = tmp_path_factory.mktemp("standalone")
    home = make_home(base, landing)
    spec = _lenient_spec(base)
    port = free_port()
    env = _env(base, home, spec, port)
    # one process creates the tracking DB before the task processes share it
    subprocess.run([str(BIN / "python"), "-c", "from daybreak.infra import registry; from daybreak.infra.context "
                    "import RunContext; registry.client(RunContext.create('2013-01-01'))"], env=env, check=True,
                   timeout=300)
    with standalone(base, home, spec, env, (DAILY, BATCH)) as af:
        # the batch DAG follows the champion Asset: it must be unpaused to be triggered by it
        assert af.api("PATCH", f"/dags/{BATCH}", json={"is_paused": False}).status_code == 200
        yield af


def test_trigger_refuses_invalid_params(airflow: Airflow) -> None:
    for conf, param, words in (({"date": "2013-13-45"}, "date", "is not a 'date'"),
                               ({"spec": ""}, "spec", "non-empty"),
                               ({"force": "yes"}, "force", "is not of type 'boolean'")):
        r = airflow.api("POST", f"/dags/{DAILY}/dagRuns", json={"logical_date": None, "conf": conf})
        assert r.status_code == 400, (conf, r.status_code, r.text)
        detail = r.json()["detail"]
        assert f"Invalid input for param {param}" in detail and words in detail, detail
    assert airflow.runs(DAILY) == []  # nothing was created


def test_backfill_three_days_through_the_scheduler(airflow: Airflow) -> None:
    """What `airflow backfill create --dag-id daybreak_daily_retrain --from-date 2013-01-01
    --to-date 2013-01-03 --max-active-runs 1` does, through the REST API."""
    # The backfill is created while the DAG is still paused, then the DAG is unpaused. Created
    # while the scheduler works on the DAG's runs, it races on SQLite: the scheduler died of a
    # StaleDataError on dag_run (airflow standalone does not restart it), twice.
    assert airflow.api("PATCH", f"/dags/{DAILY}", json={"is_paused": True}).status_code == 200
    body = {"dag_id": DAILY, "from_date": "2013-01-01T00:00:00Z", "to_date": "2013-01-03T00:00:00Z",
            "max_active_runs": 1, "run_backwards": False, "dag_run_conf": {}, "reprocess_behavior": "none"}

    def create() -> httpx.Response | None:
        r = airflow.api("POST", "/backfills", json=body)
        # On SQLite, Airflow refuses a backfill while the scheduler holds the write lock (503): again
        return None if r.status_code == 503 and "locked" in r.text else r

    r = airflow.wait("backfill created (SQLite write lock free)", create, 120)
    assert r.status_code == 200, r.text
    backfill_id = r.json()["id"]

    def created() -> list[str]:
        ids = [d["dag_run_id"] for d in airflow.runs(DAILY) if d["run_type"] == "backfill"]
        return ids if len(ids) == 3 else []

    run_ids = airflow.wait("3 backfill runs created", created, 60)
    assert airflow.api("PATCH", f"/dags/{DAILY}", json={"is_paused": False}).status_code == 200
    airflow.wait_runs_done(DAILY, run_ids, 420)
    by_date = {airflow.xcom(DAILY, rid, "stage")["date"]: rid for rid in run_ids}
    assert sorted(by_date) == ["2013-01-01", "2013-01-02", "2013-01-03"]
    # day 1 has no history to train on; day 2 is the first champion, day 3 replaces it
    assert airflow.xcom(DAILY, by_date["2013-01-01"], "train")["status"] == "skipped"
    promoted = airflow.xcom(DAILY, by_date["2013-01-03"], "promote")
    assert promoted["promoted"] is True and promoted["champion_version"] == "2", promoted
    assert airflow.api("GET", f"/backfills/{backfill_id}").status_code == 200


def test_trigger_from_the_ui_form(airflow: Airflow, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    from daybreak.infra import registry
    from daybreak.infra.context import RunContext

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed (make test installs it with apt)"
    # Unpausing the DAG (catchup off) made the scheduler create today's run, whose landing task
    # waits (deferred) for today's drop, which never comes here; one run at a time: fail it, or
    # the form's run would queue behind it for the landing timeout.
    for run in airflow.runs(DAILY):
        if run["run_type"] == "scheduled" and run["state"] in ("queued", "running"):
            r = airflow.api("PATCH", f"/dags/{DAILY}/dagRuns/{run['dag_run_id']}", json={"state": "failed"})
            assert r.status_code == 200, r.text
    run_id = "ui_2013_01_04"
    shot = tmp_path / "daybreak_daily_retrain_ui.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{airflow.url}/")
            page.locator("input[name=username]").fill("admin")
            page.locator("input[name=password]").fill(airflow.password())
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(re.compile(r"^(?!.*/auth/login)"), timeout=60_000)
            page.goto(f"{airflow.url}/dags/{DAILY}")
            page.get_by_test_id("trigger-dag-button").click()
            dialog = page.get_by_role("dialog")
            dialog.locator("input[name=element_spec]").wait_for(timeout=30_000)
            assert dialog.locator("input[name=element_spec]").input_value() == str(airflow.spec)
            dialog.locator("input[name=element_date]").fill("2013-01-04")
            dialog.locator("[id$=':trigger:advancedOptions']").click()
            dialog.locator("input[name=dagRunId]").fill(run_id)
            dialog.get_by_test_id("trigger-dag-submit").click()
            airflow.wait(f"run {run_id} created from the UI",
                         lambda: airflow.api("GET", f"/dags/{DAILY}/dagRuns/{run_id}").status_code == 200, 60)
            airflow.wait_runs_done(DAILY, [run_id], 300)
            page.goto(f"{airflow.url}/dags/{DAILY}/runs/{run_id}")
            page.get_by_text(run_id).first.wait_for(timeout=30_000)
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    conf = airflow.api("GET", f"/dags/{DAILY}/dagRuns/{run_id}").json()["conf"]
    assert conf["date"] == "2013-01-04" and conf["force"] is False and conf["dry_run"] is False, conf
    promoted = airflow.xcom(DAILY, run_id, "promote")
    assert promoted["date"] == "2013-01-04" and promoted["promoted"] is True, promoted
    assert airflow.task_states(DAILY, [run_id])[run_id]["deploy"] == "success"
    os.environ["DAYBREAK_HOME"] = str(airflow.daybreak_home)
    try:
        cl = registry.client(RunContext.create("2013-01-04"))
        champ = registry.alias_version(cl, "flights_delay", "champion")
        assert str(champ.version) == promoted["champion_version"] == "3"
        assert champ.tags[registry.DATE_TAG] == "2013-01-04"
    finally:
        os.environ.pop("DAYBREAK_HOME", None)


def test_champion_asset_triggers_batch_score(airflow: Airflow) -> None:
    """Each promotion's champion event queues daybreak_batch_score; its runs have no logical date
    and score the date in the event's extra."""
    events = airflow.api("GET", "/assets/events", params={"limit": 50, "order_by": "timestamp"}).json()["asset_events"]
    champion = [e for e in events if e["uri"] == "x-daybreak://champion"]
    assert [(e["extra"]["date"], e["extra"]["version"]) for e in champion] == [
        ("2013-01-02", "1"), ("2013-01-03", "2"), ("2013-01-04", "3")], champion
    assert {e["uri"] for e in events} >= {"x-daybreak://staged", "x-daybreak://features"}
    # staged data and features are partitioned by date: each event's partition key is its date
    dated = [e for e in events if e["uri"] in ("x-daybreak://staged", "x-daybreak://features")]
    assert all(e["partition_key"] == e["extra"]["date"] for e in dated), dated
    assert {e["partition_key"] for e in dated} == {"2013-01-01", "2013-01-02", "2013-01-03", "2013-01-04"}

    def scored_latest() -> list[dict]:
        runs = airflow.runs(BATCH)
        failed = [r["dag_run_id"] for r in runs if r["state"] == "failed"]
        assert not failed, f"{BATCH} runs failed: {airflow.task_states(BATCH, failed)}"
        done = [r for r in runs if r["state"] == "success"]
        dates = {airflow.xcom(BATCH, r["dag_run_id"], "score")["date"] for r in done}
        return done if "2013-01-04" in dates and not [r for r in runs if r["state"] in ("queued", "running")] else []

    done = airflow.wait(f"{BATCH} to score the newest champion's date", scored_latest, 300)
    assert all(r["run_type"] == "asset_triggered" and r["logical_date"] is None for r in done), done
    last = airflow.xcom(BATCH, done[-1]["dag_run_id"], "score")
    assert last["date"] == "2013-01-04" and last["model_version"] == "3" and last["rows"] > 0, last
    part = airflow.daybreak_home / "store" / "predictions" / "flights_delay" / "date=2013-01-04"
    assert part.exists(), f"no predictions partition at {part}"
