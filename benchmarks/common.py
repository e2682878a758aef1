"""What every benchmark prints first: the machine, the versions and the number of repeats.

Figures are medians of the repeats; `median_of` keeps every sample too, so the JSON shows the
spread. Machines here are shared and noisy: the load average is recorded with the header, and
the ratio to a baseline measured in the same run is the figure to quote, not the seconds.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from importlib import metadata

VERSIONS = ("daybreak", "pyarrow", "pandas", "polars", "numpy", "ray", "xgboost", "scikit-learn", "mlflow",
            "apache-airflow", "prefect", "matplotlib")


def machine() -> dict:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for dist in VERSIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cores": os.cpu_count(), "memory_gib": round(mem, 1), "cpu": _cpu_model(),
            "python": platform.python_version(), "platform": platform.platform(terse=True),
            "load_average_1m": round(os.getloadavg()[0], 2), "versions": versions}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def header(title: str, repeats: int | str) -> str:
    """One line: what runs, on what, how many times. Printed by every benchmark before its figures."""
    m = machine()
    vers = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return (f"== {title} | {m['cores']} cores, {m['memory_gib']} GiB, load {m['load_average_1m']} | "
            f"Python {m['python']}, {vers} | repeats: {repeats}; figures are medians")


def print_header(title: str, repeats: int | str) -> None:
    print(header(title, repeats), flush=True)


def median_of(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `repeats` calls of `fn`, and every sample."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def median_dict(samples: list[dict], keys: list[str] | None = None) -> dict:
    """Per key, the median over samples (numeric keys only)."""
    keys = keys or [k for k, v in samples[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.median(s[k] for s in samples) for k in keys}
