"""Ray: a local instance by default, an existing cluster when ``RAY_ADDRESS`` (or an address) is given."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None) -> None:
    """Connect once per process. ``address="local"`` never attaches to a stray cluster."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if target == "local":
        kwargs["num_cpus"] = int(os.environ.get("DAYBREAK_RAY_CPUS", os.cpu_count() or 2))
    log.info("starting Ray (%s)", "local" if target == "local" else "cluster")
    ray.init(address=target, **kwargs)
    from ray.data import DataContext

    dctx = DataContext.get_current()
    # Progress bars help at a terminal but flood Airflow/Prefect task logs.
    dctx.enable_progress_bars = sys.stderr.isatty()
    # Task-based sort shuffle: for daily-sized inputs it is several times faster than the
    # actor-based hash shuffle, which pays to start its aggregators on every groupby.
    dctx.shuffle_strategy = os.environ.get("DAYBREAK_RAY_SHUFFLE", "sort_shuffle_pull_based")
    # Blocks leave each stage in input order, however the tasks happened to finish: the feature
    # step's window history (and so its float sums) and its sorted output are the same each run.
    dctx.execution_options.preserve_order = True
