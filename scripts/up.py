"""`make up`: the whole daybreak stack on this machine, without Docker.

Starts, each in its own process group with its log under ``$DAYBREAK_HOME/logs``:

- ``mlflow server`` on the registry daybreak uses by default (``sqlite:///$DAYBREAK_HOME/mlflow.db``,
  artifacts in ``$DAYBREAK_HOME/mlartifacts``); ``daybreak serve`` starts only once it answers, so
  the server alone creates a fresh database (several processes initialising one SQLite file at
  once corrupt it);
- ``airflow standalone`` (scheduler, dag-processor, triggerer, api-server) with the repo's dags/
  and plugins/, examples off, ``AIRFLOW_HOME`` under ``DAYBREAK_HOME``;
- ``daybreak serve`` for the spec (``DAYBREAK_SPEC``, default specs/flights.yaml).

Prints where each one answers and where Airflow keeps the admin password. Ctrl-C (SIGINT) or
SIGTERM stops all of them; if one dies, the others are stopped and the script says which one died
and where its log is. Ports: ``AIRFLOW_PORT`` (8080), ``MLFLOW_PORT`` (5000), ``SERVE_PORT`` (5055);
``UP_HOST`` (127.0.0.1) is the address all three bind to.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVICES = ("mlflow", "airflow", "serve")


class Stop(Exception):
    """Raised by the signal handlers so every wait loop unwinds into the one shutdown path."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Service:
    name: str           # what the messages call it
    key: str            # mlflow | airflow | serve
    argv: list[str]
    port: int
    health: str         # a path that answers once the service is up
    log: Path
    stop_signal: int = signal.SIGTERM
    proc: subprocess.Popen | None = None
    log_file: IO | None = field(default=None, repr=False)

    def url(self, host: str) -> str:
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"


def say(msg: str = "") -> None:
    print(msg, flush=True)


def env_port(var: str, default: int) -> int:
    raw = os.environ.get(var, "").strip() or str(default)
    try:
        port = int(raw)
    except ValueError:
        raise SystemExit(f"up: {var}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise SystemExit(f"up: {var}={port} is out of range (1-65535)")
    return port


def port_busy(host: str, port: int) -> bool:
    """True if something already listens there (a bind test also catches a wildcard listener)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1" if host in ("0.0.0.0", "") else host, port)) == 0


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET, or None if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Stack:
    def __init__(self, services: list[Service], host: str) -> None:
        self.services = services
        self.host = host

    def start(self, svc: Service, env: dict[str, str]) -> None:
        svc.log.parent.mkdir(parents=True, exist_ok=True)
        svc.log_file = open(svc.log, "a", buffering=1)  # noqa: SIM115 - the service's log, closed when it stops
        svc.log_file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} up: {' '.join(svc.argv)}\n")
        # A session of its own: Ctrl-C in the terminal reaches only this script, which then stops
        # each group in order; and killpg reaches every process a service forked.
        svc.proc = subprocess.Popen(svc.argv, env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=svc.log_file, stderr=subprocess.STDOUT, start_new_session=True)

    def dead(self) -> Service | None:
        return next((s for s in self.services if s.proc is not None and s.proc.poll() is not None), None)

    def wait_healthy(self, svc: Service, timeout: float, ok: tuple[int, ...] = (200,)) -> int:
        """Wait until svc's health path answers; fail (naming who) if any service dies meanwhile."""
        deadline = time.monotonic() + timeout
        url = svc.url(self.host) + svc.health
        while True:
            if (gone := self.dead()) is not None:
                raise Died(gone)
            status = http_status(url)
            if status in ok:
                return status
            if time.monotonic() > deadline:
                raise SystemExit(f"up: {svc.name} did not answer {url} within {timeout:.0f}s "
                                 f"(last status {status}); log: {svc.log}\n{tail(svc.log)}")
            time.sleep(0.3)

    def stop_all(self, grace: float = 30.0) -> None:
        """Stop every started group: its own signal first, SIGTERM to what is left after a third of
        the grace period, SIGKILL to what is left at its end."""
        started = [s for s in self.services if s.proc is not None]

        def alive(svc: Service) -> bool:
            return svc.proc.poll() is None or group_alive(svc.proc.pid)

        for svc in reversed(started):
            signal_group(svc.proc.pid, svc.stop_signal)
        t0, termed, orphaned = time.monotonic(), False, {}
        while any(alive(s) for s in started) and time.monotonic() - t0 < grace:
            now = time.monotonic()
            if not termed and now - t0 > grace / 3:
                for svc in started:
                    if alive(svc) and svc.stop_signal != signal.SIGTERM:
                        signal_group(svc.proc.pid, signal.SIGTERM)
                termed = True
            for svc in started:
                # The service itself has exited but left children (the LocalExecutor's idle workers
                # ignore SIGINT and SIGTERM): once it is gone, what remains of its group is debris,
                # killed 3 s after the service was first seen gone.
                if (svc.proc.poll() is not None and group_alive(svc.proc.pid)
                        and now - orphaned.setdefault(svc.key, now) > 3):
                    signal_group(svc.proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        for svc in started:
            if alive(svc):
                say(f"up: {svc.name} did not stop within {grace:.0f}s; killing what is left of it")
                signal_group(svc.proc.pid, signal.SIGKILL)
                try:
                    svc.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if svc.log_file is not None:
                svc.log_file.close()


class Died(Exception):
    def __init__(self, svc: Service) -> None:
        super().__init__(svc.name)
        self.svc = svc


def build_services(args: argparse.Namespace, home: Path, logs: Path, env: dict[str, str]) -> list[Service]:
    out = {
        "mlflow": Service(
            "MLflow server", "mlflow",
            [str(BIN / "mlflow"), "server", "--host", args.host, "--port", str(args.mlflow_port), "--workers", "1",
             "--backend-store-uri", env["UP_TRACKING_URI"], "--default-artifact-root", (home / "mlartifacts").as_uri()],
            args.mlflow_port, "/health", logs / "mlflow.log"),
        "airflow": Service(
            # standalone stops its components only on KeyboardInterrupt, so it gets SIGINT.
            "Airflow standalone", "airflow", [str(BIN / "airflow"), "standalone"],
            args.airflow_port, "/api/v2/monitor/health", logs / "airflow.log", stop_signal=signal.SIGINT),
        "serve": Service(
            "daybreak serve", "serve",
            [str(BIN / "daybreak"), "serve", "--spec", str(args.spec), "--host", args.host,
             "--port", str(args.serve_port)],
            args.serve_port, "/health", logs / "serve.log"),
    }
    return [out[k] for k in SERVICES if k not in args.without]


def child_env(args: argparse.Namespace, home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # standalone runs `airflow <component>` from PATH
    env["DAYBREAK_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    airflow_home = Path(env.get("AIRFLOW_HOME") or home / "airflow")
    env["AIRFLOW_HOME"] = str(airflow_home)
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env["AIRFLOW__API__HOST"] = args.host
    env["AIRFLOW__API__PORT"] = str(args.airflow_port)
    api = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.airflow_port}"
    env.setdefault("AIRFLOW__API__BASE_URL", api)
    # Task workers reach the api-server here; its default assumes port 8080.
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{api}/execution/")
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # the server is up in seconds, not a minute
    env["UP_TRACKING_URI"] = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    return env


def password_file(env: dict[str, str]) -> Path:
    configured = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    if configured:
        return Path(configured)
    return Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path,
                    default=Path(os.environ.get("DAYBREAK_SPEC") or ROOT / "specs" / "flights.yaml"),
                    help="spec that `daybreak serve` serves (default: $DAYBREAK_SPEC or specs/flights.yaml)")
    ap.add_argument("--without", action="append", default=[], choices=SERVICES,
                    help="leave one service out (repeatable)")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("UP_TIMEOUT", 180)),
                    help="seconds each service may take to answer (default 180)")
    args = ap.parse_args(argv)
    args.host = os.environ.get("UP_HOST", "127.0.0.1")
    args.airflow_port = env_port("AIRFLOW_PORT", 8080)
    args.mlflow_port = env_port("MLFLOW_PORT", 5000)
    args.serve_port = env_port("SERVE_PORT", 5055)
    args.spec = args.spec.resolve()

    wanted = {"airflow": ("AIRFLOW_PORT", args.airflow_port), "mlflow": ("MLFLOW_PORT", args.mlflow_port),
              "serve": ("SERVE_PORT", args.serve_port)}
    wanted = {k: v for k, v in wanted.items() if k not in args.without}
    ports = [p for _, p in wanted.values()]
    if len(set(ports)) != len(ports):
        return fail("the ports must differ: " + ", ".join(f"{var}={p}" for var, p in wanted.values()))
    for key, (var, port) in wanted.items():
        if port_busy(args.host, port):
            return fail(f"port {port} on {args.host} is already in use, so {key} cannot start there. "
                        f"Stop whatever listens there (is `make up` already running?) or choose another "
                        f"port, e.g. `{var}={port + 1} make up`.")

    if "serve" not in args.without:
        try:
            from daybreak.spec import load_spec

            spec = load_spec(args.spec)
        except Exception as e:  # a bad spec should stop us before anything starts
            return fail(f"spec {args.spec}: {e}")

    home = Path(os.environ.get("DAYBREAK_HOME") or ROOT / ".daybreak").expanduser().resolve()
    logs = home / "logs"
    env = child_env(args, home)
    services = build_services(args, home, logs, env)
    stack = Stack(services, args.host)
    by_key = {s.key: s for s in services}

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        if not stopping:  # once shutting down, a second Ctrl-C must not cut the shutdown short
            raise Stop(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    say(f"up: DAYBREAK_HOME={home}; logs in {logs}")
    code = 0
    try:
        # Airflow has a database of its own, so it starts alongside MLflow; daybreak serve reads the
        # registry, so it waits until the MLflow server has created it.
        for key in ("mlflow", "airflow"):
            if key in by_key:
                say(f"up: starting {by_key[key].name} (log: {by_key[key].log})")
                stack.start(by_key[key], env)
        if "mlflow" in by_key:
            stack.wait_healthy(by_key["mlflow"], args.timeout)
        if "serve" in by_key:
            say(f"up: starting {by_key['serve'].name} (log: {by_key['serve'].log})")
            stack.start(by_key["serve"], env)
        if "serve" in by_key:
            # 503 is the documented answer while there is no champion yet.
            serve_status = stack.wait_healthy(by_key["serve"], args.timeout, ok=(200, 503))
        if "airflow" in by_key:
            stack.wait_healthy(by_key["airflow"], args.timeout)

        say("")
        say("daybreak is up:")
        if "airflow" in by_key:
            pw = password_file(env)
            deadline = time.monotonic() + 15
            while not pw.exists() and time.monotonic() < deadline and stack.dead() is None:
                time.sleep(0.2)
            say(f"  Airflow UI + API   {by_key['airflow'].url(args.host)}   (user admin; password in {pw})")
        if "mlflow" in by_key:
            say(f"  MLflow UI          {by_key['mlflow'].url(args.host)}   (registry {env['UP_TRACKING_URI']})")
        if "serve" in by_key:
            state = "serving the champion" if serve_status == 200 else (
                f"no champion of {spec.model.name} yet: /ping answers 503 until one is promoted "
                "(run `make demo` first, or trigger daybreak_daily_retrain in Airflow)")
            say(f"  daybreak serve     {by_key['serve'].url(args.host)}   ({state})")
        say("  logs               " + "  ".join(str(s.log) for s in services))
        say("Ctrl-C stops everything.")
        while True:
            if (gone := stack.dead()) is not None:
                raise Died(gone)
            time.sleep(0.5)
    except Died as d:
        stopping = True
        svc = d.svc
        say(f"\nup: {svc.name} exited with code {svc.proc.returncode}; stopping the others. "
            f"Its log: {svc.log}\n{tail(svc.log)}")
        code = 1
    except Stop as s:
        stopping = True
        say(f"\nup: {s} received, stopping " + ", ".join(x.name for x in services if x.proc is not None))
        code = 0
    except SystemExit as e:
        stopping = True
        say(str(e.code))
        code = 1
    finally:
        stopping = True
        stack.stop_all()
        say("up: stopped")
    return code


def fail(msg: str) -> int:
    print(f"up: {msg}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
