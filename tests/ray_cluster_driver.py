"""Run by tests/test_ray_cluster.py in its own process: the Airflow operator, pointed at a Ray
cluster through an Airflow Connection (AIRFLOW_CONN_RAY_CLUSTER), builds one day's features."""

from __future__ import annotations

import json
import sys
from datetime import date, timedelta


def main(spec: str, day: str) -> None:
    from daybreak.airflow import BuildFeaturesOperator
    from daybreak.context import RunContext
    from daybreak.spec import load_spec
    from daybreak.stage import stage

    d = date.fromisoformat(day)
    s = load_spec(spec)
    for k in range(8, -1, -1):
        stage(s, RunContext.create(d - timedelta(days=k)))
    op = BuildFeaturesOperator(task_id="features", spec=spec, logical_date=day, ray_conn_id="ray_cluster")
    result = op.execute({"run_id": "cluster-test"})
    import ray

    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    print("RESULT " + json.dumps({"result": result, "cluster_nodes": nodes, "address": ray.get_runtime_context().gcs_address}))


if __name__ == "__main__":
    main(*sys.argv[1:])
