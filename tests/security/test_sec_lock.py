"""Attacks on the registry lock (issue 20, medium).

On the code before this fix:
- the dead-holder takeover compared host name and PID: a process with the same host name in
  another PID namespace (containers with host networking, pods) removed a *live* lock while its
  holder was inside its critical section;
- the stale-lock check read, then deleted: two processes that both judged a lock stale could each
  delete it, the later delete removing the lock the other had just taken, so both held it;
- alias writes were not fenced: a holder whose lock was taken over kept moving aliases.

Real parts: a sqlite registry, a holder process in its own PID namespace (``unshare``), threads
with their own MLflow clients. The stale-lock race needs the two reapers to interleave; a client
whose deletes reach the registry 0.5 s late (as over a slow network) makes that happen every time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import BIN
from test_model_integrity import _wait

from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import PromotionConflict

OWNER_TAG, EXPIRES_TAG = "daybreak.lock_owner", "daybreak.lock_expires"  # the lock's record in the registry

NAME = "locked_model"

HOLDER = """
import os, sys, time
from pathlib import Path
from daybreak.infra import registry
from daybreak.infra.context import RunContext
cl = registry.client(RunContext.create("2013-01-02"))
out, release = Path(sys.argv[1]), Path(sys.argv[2])
with registry.model_lock(cl, sys.argv[3], owner="ns-holder"):
    out.write_text(f"HELD {os.getpid()}")
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
out.write_text("RELEASED")
"""


def _host_free_pid() -> int:
    """The smallest PID above 1 that no process on this host has (the holder gets it in its namespace)."""
    return next(p for p in range(2, 4096) if not os.path.exists(f"/proc/{p}"))


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
def test_a_live_holder_in_another_pid_namespace_keeps_its_lock(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAYBREAK_HOME", str(tmp_path / "home"))
    ctx = RunContext.create("2013-01-02")
    registry.setup_tracking(ctx, "lock-test")  # the sqlite store exists before two processes use it
    cl = registry.client(ctx)
    out, release = tmp_path / "held", tmp_path / "release"
    pid = _host_free_pid()
    # In the new namespace sh is PID 1 and each /bin/true takes the next PID, so python gets `pid`:
    # a PID that, seen from this host, belongs to no process.
    # (python runs as a child, not exec'd, so it does not become PID 1; the trailing builtin keeps
    # the shell from exec'ing its last command).
    script = "".join(["/bin/true; "] * (pid - 2)) + f'"{BIN / "python"}" -c "$0" "$1" "$2" "$3"; true'
    cmd = ["unshare", "--pid", "--fork", "sh", "-c", script, HOLDER, str(out), str(release), NAME]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        held = _wait(lambda: out.exists() and out.read_text(), timeout=120)
        assert held == f"HELD {pid}", (held, pid)
        assert not os.path.exists(f"/proc/{pid}"), "the holder's namespace PID is in use on the host"
        t0 = time.monotonic()
        with (pytest.raises(PromotionConflict, match="locked by ns-holder"),
              registry.model_lock(cl, NAME, owner="host-contender", wait_s=3)):
            pytest.fail(f"took over a live holder's lock after {time.monotonic() - t0:.1f} s")
        release.touch()
        assert _wait(lambda: out.read_text() == "RELEASED", timeout=60), "the holder did not release"
        with registry.model_lock(cl, NAME, owner="host-contender", wait_s=10):
            pass  # once released, the lock is free
    finally:
        release.touch()
        proc.wait(timeout=60)


class SlowDeletes:
    """A real MlflowClient whose registered-model deletes arrive 0.5 s after they are sent."""

    def __init__(self, cl):
        self._cl = cl

    def __getattr__(self, name):
        return getattr(self._cl, name)

    def delete_registered_model(self, name):
        time.sleep(0.5)
        return self._cl.delete_registered_model(name)


def test_two_reapers_of_one_stale_lock_never_both_hold_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAYBREAK_HOME", str(tmp_path / "home"))
    ctx = RunContext.create("2013-01-02")
    registry.setup_tracking(ctx, "lock-test")
    cl = registry.client(ctx)

    def contender(who: str, start: threading.Barrier, inside: list[str], overlaps: list[list[str]],
                  errors: list[str]) -> None:
        mine = SlowDeletes(registry.client(ctx))
        start.wait()
        try:
            with registry.model_lock(mine, NAME, owner=who, wait_s=30):
                inside.append(who)
                if len(inside) > 1:
                    overlaps.append(list(inside))
                time.sleep(1.5)
                inside.remove(who)
        except Exception as e:
            errors.append(f"{who}: {type(e).__name__}: {e}")

    for trial in range(3):
        # a lock whose lease ran out a minute ago, left by a holder on another machine
        cl.create_registered_model(f"{NAME}.daybreak-lock", tags={OWNER_TAG: f"gone/{trial}",
                                                                   EXPIRES_TAG: str(time.time() - 60)})
        inside, overlaps, errors = [], [], []
        start = threading.Barrier(2)
        threads = [threading.Thread(target=contender, args=(w, start, inside, overlaps, errors)) for w in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        assert not errors, errors
        assert not overlaps, f"trial {trial}: both reapers held the lock at once: {overlaps}"
    names = [m.name for m in cl.search_registered_models()]
    assert not [n for n in names if "daybreak-lock" in n], names  # no lock or reap marker left


def test_a_holder_that_lost_its_lock_writes_no_alias(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DAYBREAK_HOME", str(tmp_path / "home"))
    ctx = RunContext.create("2013-01-02")
    registry.setup_tracking(ctx, "lock-test")
    cl = registry.client(ctx)
    cl.create_registered_model(NAME)
    with registry.model_lock(cl, NAME, owner="paused") as held:
        # the holder stalls past its lease; another run removes the lock and takes it
        cl.delete_registered_model(f"{NAME}.daybreak-lock")
        cl.create_registered_model(f"{NAME}.daybreak-lock", tags={OWNER_TAG: "next/1",
                                                                   EXPIRES_TAG: str(time.time() + 60)})
        with pytest.raises(PromotionConflict, match="taken over"):
            held.set_alias("champion", "1")
    assert "champion" not in cl.get_registered_model(NAME).aliases
    assert cl.get_registered_model(f"{NAME}.daybreak-lock").tags[OWNER_TAG] == "next/1"  # not released by "paused"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
