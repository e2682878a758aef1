"""Fork server for test_crash_anywhere.py: imports daybreak, MLflow, xgboost and Ray once, then
runs one daily cycle per request in a forked child, which the test SIGKILLs at a moment of its
choosing.

Importing all that takes 5-10 s on a busy machine; a fork takes milliseconds. Nothing here
connects to Ray or opens the registry (neither survives a fork): each child does that itself,
on the Ray cluster named by RAY_ADDRESS.

Protocol, one line each way: the test writes ``<date> <markers file> <log file> <step> <k>``;
the server answers ``PID <pid>`` once the child runs, and ``EXIT <code>`` when it is gone (-9:
killed). The child appends to the markers file (one write(2) per line, so whatever a kill
interrupts, every line there is whole) ``<time> RUNID <run id>``, ``<time> BEGIN <step>`` and
``<time> END <step>`` around each step of daybreak.cycle.run_cycle, ``<time> W <step> <n>
<method>`` after each registry write, then ``DONE <summary json>`` or ``FAIL <traceback json>``.
With k > 0 the child SIGKILLs itself right after the k-th registry write of <step> (a crash point
at a write boundary); otherwise the test kills it whenever it likes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback

# MlflowClient methods that write (the fluent API and daybreak's registry code go through them).
WRITES = ("create_experiment", "create_run", "set_terminated", "update_run", "log_batch", "log_param", "log_metric",
          "set_tag", "log_artifact", "log_artifacts", "log_dict", "log_text", "log_figure", "log_inputs",
          "log_outputs", "create_logged_model", "finalize_logged_model", "set_logged_model_tags",
          "log_model_params", "create_registered_model", "delete_registered_model", "create_model_version",
          "update_model_version", "set_model_version_tag", "delete_model_version_tag", "delete_model_version",
          "set_registered_model_alias", "delete_registered_model_alias", "set_registered_model_tag")



def marked_functions() -> dict[str, str]:
    """The functions run_cycle calls that get BEGIN/END markers, by marker name, as the cycle's
    declaration names them ("module:function"; run_cycle finds them there when it calls them)."""
    from daybreak.steps import STEPS

    refs = {step: STEPS[step].function for step in ("stage", "features", "train", "gate", "promote")}
    return refs | {"not_promoted": str(STEPS["promote"].otherwise)}


def count_writes(mark, kill_step: str, kill_at: int) -> dict:
    """Mark every registry write a step makes (``W <step> <n> <method>``, after it returned); with
    `kill_at` > 0, SIGKILL this process right after the `kill_at`-th write of `kill_step`."""
    import signal

    from mlflow.tracking import MlflowClient

    state = {"step": None, "n": 0, "depth": 0}

    def wrap(name, fn):
        def write(self, *args, **kwargs):
            state["depth"] += 1
            try:
                out = fn(self, *args, **kwargs)
            finally:
                state["depth"] -= 1
            if state["depth"] == 0 and state["step"]:
                state["n"] += 1
                mark(f"W {state['step']} {state['n']} {name}")
                if state["step"] == kill_step and state["n"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return out
        return write

    for name in WRITES:
        if hasattr(MlflowClient, name):
            setattr(MlflowClient, name, wrap(name, getattr(MlflowClient, name)))
    return state


def child(spec_path: str, day: str, markers: str, log_file: str, kill_step: str, kill_at: int) -> None:
    fd = os.open(markers, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def mark(text: str) -> None:
        os.write(fd, f"{time.time():.3f} {text}\n".encode())

    try:
        logfd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(logfd, 1)
        os.dup2(logfd, 2)
        sys.stdin.close()
        from daybreak import cycle
        from daybreak.cli import setup_logging
        from daybreak.infra.context import RunContext
        from daybreak.spec import load_spec

        setup_logging()
        writes = count_writes(mark, kill_step, kill_at)

        def wrap(fn, step):
            def run(*args, **kwargs):
                mark(f"BEGIN {step}")
                writes["step"], writes["n"] = step, 0
                out = fn(*args, **kwargs)
                writes["step"] = None
                mark(f"END {step}")
                return out
            return run

        for step, ref in marked_functions().items():
            module, _, attr = ref.partition(":")
            mod = importlib.import_module(module)
            setattr(mod, attr, wrap(getattr(mod, attr), step))
        ctx = RunContext.create(day)
        mark(f"RUNID {ctx.run_id}")
        result = cycle.run_cycle(load_spec(spec_path), ctx, deploy=False)
        mark("DONE " + json.dumps(result["summary"], default=str))
        code = 0
    except BaseException:
        mark("FAIL " + json.dumps(traceback.format_exc()))
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def warm_up() -> None:
    """What every child would otherwise compute again: MLflow's map of installed packages (read
    from every package's metadata, about 2 s) and matplotlib's fonts."""
    import io

    import matplotlib.pyplot as plt
    from mlflow.utils import requirements_utils

    requirements_utils._init_packages_to_modules_map()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    ax.set_title("warm-up")
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)


def main() -> None:
    spec_path = sys.argv[1]
    t0 = time.monotonic()
    # What the cycle imports, up front (no connection, no database: see above).
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import mlflow.artifacts
    import mlflow.models
    import mlflow.pyfunc
    import mlflow.store.model_registry.sqlalchemy_store
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import ray.data  # noqa: F401
    import scipy.stats  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import xgboost  # noqa: F401

    from daybreak.steps import CYCLE

    for step in CYCLE:  # the steps' modules (run_cycle imports each when it first runs it)
        importlib.import_module(step.function.partition(":")[0])

    warm_up()
    print(f"READY {time.monotonic() - t0:.1f}", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        day, markers, log_file, kill_step, kill_at = line.split()
        pid = os.fork()
        if pid == 0:
            child(spec_path, day, markers, log_file, kill_step, int(kill_at))
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    main()
