"""Stages one date over and over, alternating between two versions of its landing file, until killed.

Used by test_stage_crash.py, which SIGKILLs it at random moments while readers watch. A fork
server: it imports once (a few seconds on a busy machine), says ``READY``, then for each line on
stdin (a file name) forks a child that stages in a loop and appends the number of each finished
publish to that file; it prints ``PID <pid>`` and, once the child is gone, ``EXIT <code>``. The
test kills children by PID. Nothing here touches a store before the fork (no filesystem or
thread is created in this process), so each child starts as a fresh process would.
"""

from __future__ import annotations

import os
import sys
import traceback

from daybreak.infra.context import RunContext
from daybreak.spec import load_spec
from daybreak.stage import stage


def publish_forever(specs: list, day: str, counts: str) -> None:
    """The child: stage, alternating the two landing files; one line per finished publish."""
    code = 1
    try:
        fd = os.open(counts, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        i = 0
        while True:
            stage(specs[i % 2], RunContext.create(day))
            i += 1
            os.write(fd, f"{i}\n".encode())
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
    os._exit(code)


def main() -> None:
    base = load_spec(sys.argv[1])
    day = sys.argv[2]
    specs = []
    for variant in ("a", "b"):
        src = base.sources["flights"].model_copy(update={"path": f"landing/{variant}/flights/{{date}}.csv"})
        specs.append(base.model_copy(update={"sources": {"flights": src}}))
    print("READY", flush=True)
    for line in sys.stdin:
        counts = line.strip()
        if not counts:
            continue
        pid = os.fork()
        if pid == 0:
            publish_forever(specs, day, counts)
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
