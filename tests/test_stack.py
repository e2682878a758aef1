"""The stack: `make up` (scripts/up.py) run for real on free ports, and the docker/ compose file.

The compose file is checked with `docker compose config` where a compose client exists, and always
structurally: no container engine runs on the project's machines, so it is never started here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
UP = ROOT / "scripts" / "up.py"
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
READY = "Ctrl-C stops everything."


# --------------------------------------------------------------------------------------------
# make up
# --------------------------------------------------------------------------------------------

def _procs_of(home: Path) -> list[psutil.Process]:
    """Every live process started for this DAYBREAK_HOME (up.py passes it to all it starts)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("DAYBREAK_HOME") == str(home) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class Up:
    """scripts/up.py as a user runs it, with its output collected line by line."""

    def __init__(self, home: Path, ports: dict[str, int], *args: str) -> None:
        self.home = home
        self.ports = ports
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}  # no stray Airflow config
        env.update({
            "DAYBREAK_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow"),
            "AIRFLOW_PORT": str(ports["airflow"]), "MLFLOW_PORT": str(ports["mlflow"]),
            "SERVE_PORT": str(ports["serve"]),
            # the scheduler's and triggerer's log servers must not collide with another Airflow here
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "UP_TIMEOUT": "170",
        })
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, str(UP), *args], env=env, cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None:
                self.reader.join(5)
                if any(text in line for line in self.lines):
                    return
                pytest.fail(f"up.py exited with {self.proc.returncode} before {text!r}:\n{self.output}\n"
                            + self.logs())
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout}s:\n{self.output}\n" + self.logs())
            time.sleep(0.2)

    def logs(self) -> str:
        out = []
        for log in sorted((self.home / "logs").glob("*.log")):
            out.append(f"--- {log.name} (tail)\n" + "\n".join(log.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    def close(self) -> None:
        """Stop up.py if a test left it running, then sweep anything of this home that survived."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for p in _procs_of(self.home):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.reader.join(5)


@pytest.fixture
def up_home(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    started: list[Up] = []

    def start(*args: str, ports: dict[str, int] | None = None) -> Up:
        ports = ports or {"airflow": free_port(), "mlflow": free_port(), "serve": free_port()}
        up = Up(home, ports, *args)
        started.append(up)
        return up

    yield home, start
    for up in started:
        up.close()
    assert _procs_of(home) == []


@pytest.fixture(scope="module")
def stack_without_airflow(tmp_path_factory: pytest.TempPathFactory):
    """`make up` without Airflow (the MLflow server and daybreak serve) in a home of its own, for
    the test that kills one of its services. Requested by the first test too, so that it boots
    while that test's Airflow does (about 40 s saved; the two stacks share nothing)."""
    home = tmp_path_factory.mktemp("up-without-airflow") / "home"
    home.mkdir()
    up = Up(home, {"airflow": free_port(), "mlflow": free_port(), "serve": free_port()}, "--without", "airflow")
    yield up
    up.close()
    assert _procs_of(home) == []


def _assert_all_stopped(up: Up) -> None:
    assert _procs_of(up.home) == [], [p.cmdline() for p in _procs_of(up.home)]
    for port in up.ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


@pytest.mark.slow
@pytest.mark.usefixtures("stack_without_airflow")  # (boots alongside; used by the next test)
def test_make_up_starts_airflow_mlflow_and_serve_and_ctrl_c_stops_them(up_home) -> None:
    home, start = up_home
    t0 = time.monotonic()
    up = start()
    up.wait_for(READY, timeout=190)
    started_in = time.monotonic() - t0
    a, m, s = (f"http://127.0.0.1:{up.ports[k]}" for k in ("airflow", "mlflow", "serve"))
    out = up.output
    for url in (a, m, s):
        assert url in out, out
    password_file = home / "airflow" / "simple_auth_manager_passwords.json.generated"
    assert str(password_file) in out
    assert "make demo" in out  # no champion yet: says how to get one

    # Airflow: healthy, the printed password works, and it parsed the repo's DAGs.
    health = httpx.get(f"{a}/api/v2/monitor/health", timeout=10).json()
    assert health["metadatabase"]["status"] == "healthy", health
    password = json.loads(password_file.read_text())["admin"]
    token = httpx.post(f"{a}/auth/token", json={"username": "admin", "password": password}, timeout=10)
    assert token.status_code in (200, 201), token.text
    auth = {"Authorization": f"Bearer {token.json()['access_token']}"}
    assert httpx.get(f"{a}/api/v2/version", headers=auth, timeout=10).json()["version"].startswith("3.")
    deadline = time.monotonic() + 90
    while True:
        dags = httpx.get(f"{a}/api/v2/dags", params={"dag_id_pattern": "daybreak"}, headers=auth, timeout=10).json()
        ids = {d["dag_id"] for d in dags["dags"]}
        if "daybreak_daily_retrain" in ids:
            break
        assert time.monotonic() < deadline, f"repo DAGs never showed up: {dags}\n{up.logs()}"
        time.sleep(1)

    # MLflow: the server on daybreak's sqlite registry.
    assert httpx.get(f"{m}/health", timeout=10).status_code == 200
    assert httpx.get(f"{m}/api/2.0/mlflow/registered-models/search", timeout=10).status_code == 200
    assert (home / "mlflow.db").exists()

    # daybreak serve: up, with no champion yet (the documented 503).
    r = httpx.get(f"{s}/health", timeout=10)
    assert r.status_code == 503 and r.json()["status"] == "no model", r.text
    assert httpx.get(f"{s}/ping", timeout=10).status_code == 503

    for name in ("airflow", "mlflow", "serve"):
        assert (home / "logs" / f"{name}.log").stat().st_size > 0

    # Ctrl-C: everything stops, nothing is left behind.
    t1 = time.monotonic()
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=60) == 0, up.output
    up.reader.join(5)
    assert "up: stopped" in up.output
    _assert_all_stopped(up)
    print(f"\nstack ready in {started_in:.0f}s, stopped in {time.monotonic() - t1:.1f}s")


@pytest.mark.slow
def test_when_one_service_dies_the_others_are_stopped_and_it_is_named(stack_without_airflow: Up) -> None:
    up = stack_without_airflow
    home = up.home
    up.wait_for(READY, timeout=120)
    serve = next(p for p in psutil.Process(up.proc.pid).children(recursive=True)
                 if "serve" in p.cmdline() and any(c.endswith("daybreak") for c in p.cmdline()))
    serve.kill()
    assert up.proc.wait(timeout=60) == 1, up.output
    up.reader.join(5)
    out = up.output
    assert "daybreak serve exited" in out and str(home / "logs" / "serve.log") in out, out
    _assert_all_stopped(up)


def test_a_busy_port_is_refused_before_anything_starts(up_home) -> None:
    home, start = up_home
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        up = start(ports={"airflow": free_port(), "mlflow": port, "serve": free_port()})
        assert up.proc.wait(timeout=60) == 2
        up.reader.join(5)
    assert f"port {port}" in up.output and "MLFLOW_PORT" in up.output, up.output
    assert not (home / "logs").exists()


# --------------------------------------------------------------------------------------------
# docker/
# --------------------------------------------------------------------------------------------

def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
        if ok:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _example_env(tmp_path: Path) -> Path:
    env = tmp_path / ".env"
    shutil.copy(DOCKER / ".env.example", env)
    return env


def test_compose_config_validates_with_the_docker_client(tmp_path: Path) -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose client here (neither `docker compose` nor `docker-compose`); "
                    "the compose file is checked structurally by the next test")
    env = _example_env(tmp_path)
    r = subprocess.run([*cli, "--env-file", str(env), "-f", str(COMPOSE), "config", "-q"],
                       capture_output=True, text=True, cwd=DOCKER)
    assert r.returncode == 0, r.stderr + r.stdout


def _load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _services() -> dict:
    return _load_compose()["services"]


def test_compose_has_the_multi_service_stack() -> None:
    services = _services()
    for name in ("postgres", "redis", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver",
                 "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
                 "ray-head", "ray-worker", "daybreak-serve"):
        assert name in services, f"service {name} missing"
    commands = {n: " ".join(map(str, s["command"])) if isinstance(s.get("command"), list) else str(s.get("command", ""))
                for n, s in services.items()}
    assert commands["airflow-apiserver"] == "airflow api-server"
    assert commands["airflow-scheduler"] == "airflow scheduler"
    assert commands["airflow-dag-processor"] == "airflow dag-processor"
    assert commands["airflow-triggerer"] == "airflow triggerer"
    assert "exec airflow celery worker" in commands["airflow-worker"]
    assert "airflow db migrate" in commands["airflow-init"]
    assert "ray start --head" in commands["ray-head"] and "--address=ray-head:6379" in commands["ray-worker"]
    assert commands["daybreak-serve"].startswith("daybreak serve")
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    assert "--artifacts-destination=s3://" in commands["mlflow"] and "postgresql" in commands["mlflow"]
    # scalable: no fixed container name or host port on the workers
    for name in ("airflow-worker", "ray-worker"):
        assert "container_name" not in services[name] and "ports" not in services[name]
    # the image: the package with constraints.txt, the stack's pins on top, a non-root user
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "constraints" in dockerfile and "requirements-stack.txt" in dockerfile
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    pins = (DOCKER / "requirements-stack.txt").read_text()
    for pkg in ("apache-airflow-providers-celery==", "apache-airflow-providers-postgres==", "psycopg2-binary==",
                "redis=="):
        assert pkg in pins


def test_compose_dependencies_health_and_images_resolve() -> None:
    services = _services()
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
            if isinstance(deps, dict):
                cond = deps[dep].get("condition", "service_started")
                assert cond in ("service_started", "service_healthy", "service_completed_successfully")
                if cond == "service_healthy":
                    assert "healthcheck" in services[dep], f"{name} waits for {dep} healthy; {dep} has no healthcheck"
        assert "image" in svc or "build" in svc, f"{name} has neither image nor build"
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = (DOCKER / build.get("context", ".")).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"
        image = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", str(svc.get("image", "")))  # ${VAR:-default}
        if image:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: image {image!r} has no explicit tag"
        for volume in svc.get("volumes", []):
            src = str(volume).split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name}: bind mount {src} missing"
    for name, svc in services.items():
        if svc.get("restart") != "no":  # every long-running service says when it is healthy
            assert "healthcheck" in svc or name == "ray-worker", f"{name} has no healthcheck"
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
                 "airflow-worker"):
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    assert services["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"


SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|FERNET|_KEY$")


def test_compose_commits_no_secrets() -> None:
    """Every secret comes from docker/.env as a ${VAR}; the example file holds placeholders only."""
    text = COMPOSE.read_text()
    for creds in re.findall(r"://([^@/\s]+)@", text):  # user:password in a URL
        assert re.fullmatch(r"(\$\{[A-Z_]+(:[-?][^}]*)?\})?(:\$\{[A-Z_]+(:[-?][^}]*)?\})?", creds), creds
    checked = 0
    for name, svc in _services().items():
        env = svc.get("environment", {})
        env = dict(e.split("=", 1) for e in env) if isinstance(env, list) else env
        for key, value in env.items():
            if SECRET.search(key) and not key.endswith("_FILE"):  # a path to a secret is no secret
                checked += 1
                assert value in ("", None) or re.fullmatch(r"\$\{[A-Z_]+(:[-?][^}]*)?\}", str(value)), \
                    f"{name}: {key}={value!r} is a literal; take it from docker/.env"
    assert checked >= 8
    example = (DOCKER / ".env.example").read_text()
    defined = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", example, re.M))
    required = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert required and required <= set(defined), f"{required - set(defined)} missing from .env.example"
    for key, value in defined.items():
        if SECRET.search(key):
            assert value == "" or value.startswith("change-me"), f".env.example: {key} must be a placeholder"
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / ".env")], cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"
