"""Run by tests/test_ray_cluster.py in its own process: the Airflow operator, pointed at a Ray
cluster through an Airflow Connection (AIRFLOW_CONN_RAY_CLUSTER), builds one day's features."""

from __future__ import annotations

import json
import sys
from datetime import date, timedelta


def main(spec: str, day: str) -> None:
    from daybreak.airflow import BuildFeaturesOperator
    from daybreak.infra.context import RunContext
    from daybreak.spec import load_spec
    from daybreak.stage import stage

    d = date.fromisoformat(day)
    s = load_spec(spec)
    for k in range(8, -1, -1):
        stage(s, RunContext.create(d - timedelta(days=k)))
    from daybreak.airflow.operators import ray_cluster_address
    from daybreak.infra.compute import ensure_ray

    # A cluster that has been up a while has worker processes on every node; a fresh one has
    # none, and tasks this small would all finish on the head before the other node starts one.
    ensure_ray(ray_cluster_address("ray_cluster"))  # (the token must be set before Ray is imported)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote
    def warm() -> None:
        import daybreak.features._build  # noqa: F401

    ray.get([warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
             for n in ray.nodes() if n["Alive"]])
    op = BuildFeaturesOperator(task_id="features", spec=spec, logical_date=day, ray_conn_id="ray_cluster")
    result = op.execute({"run_id": "cluster-test"})

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps({"result": result, "cluster_nodes": nodes,
                                  "address": ray.get_runtime_context().gcs_address}))


if __name__ == "__main__":
    main(*sys.argv[1:])
