"""Ray nodes for the tests: started with ``ray start --block`` and stopped by PID (never ``ray
stop``, which kills every Ray on the host)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
from conftest import BIN


def start_node(args: list[str], env: dict, log: Path, wrap: list[str] | None = None) -> subprocess.Popen:
    """`ray start --block *args`, its output to `log`, in a session of its own. ``wrap`` prefixes
    the command (e.g. ``unshare ... sh -c '...; exec "$@"'``: the wrapper must exec Ray, so the
    PID stays that of ``ray start``)."""
    # --block keeps `ray start` in the foreground as the parent of the node's processes, so the
    # test can stop exactly this node.
    return subprocess.Popen([*(wrap or []), str(BIN / "ray"), "start", "--block", *args], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_family(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM a process (a node: `ray start --block`) and every process under it; SIGKILL what is
    left after `grace` seconds. (Some of a throwaway node's processes outlast a SIGTERM by 20 s or
    more; nothing of it is kept.)"""
    stop_families([proc], grace)


def stop_families(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """`stop_family` for several processes at once: one grace period for all of them."""
    family: list[psutil.Process] = []
    for proc in procs:
        try:
            family += [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for p in family:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    for proc in procs:
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


def wait_started(node: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until `ray start` says the node runs ("Ray runtime started")."""
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if node.poll() is not None:
            raise RuntimeError(f"ray start exited with {node.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no Ray node within {timeout} s: {log.read_text()[-2000:]}")
        time.sleep(0.2)
