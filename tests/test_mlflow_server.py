"""The same cycle against a real `mlflow server` on loopback instead of the embedded sqlite store."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, SPEC, free_port, wait_http

from daybreak.cycle import run_cycle
from daybreak.gate import PROMOTE, holdout
from daybreak.infra import registry
from daybreak.infra.context import RunContext


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(d / "server.log", "w")  # noqa: SIM115 - the server's log, closed after it stops
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination", str(d / "artifacts"),
         "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=d)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_cycle_against_mlflow_server(mlflow_server: str, home: Path, ray_local, spec) -> None:
    results = [run_cycle(spec, RunContext.create(d, tracking_uri=mlflow_server), deploy=False)
               for d in ("2013-01-01", "2013-01-02", "2013-01-03")]
    assert [r["gate"]["decision"] for r in results][:2] == ["SKIPPED", PROMOTE]
    ctx = RunContext.create("2013-01-03", tracking_uri=mlflow_server)
    assert not (home / "mlflow.db").exists()  # nothing went to the embedded store
    cl = registry.client(ctx)
    champ = registry.alias_version(cl, spec.model.name, "champion")
    assert champ.tags[registry.DECISION_TAG] == PROMOTE
    assert champ.source.startswith("models:/") or "mlflow-artifacts" in champ.source
    X = holdout(spec, ctx)[spec.features.feature_names()].head(20)
    preds = registry.load_model(ctx, spec.model.name, str(champ.version)).predict(X)
    assert np.all((np.asarray(preds) >= 0) & (np.asarray(preds) <= 1))
    # the CLI against the server: MLflow prints "View run ... at: URL" for a tracking server, to
    # stdout; with --json stdout carries the JSON alone and that line goes to stderr
    out = subprocess.run([str(BIN / "daybreak"), "run", "--spec", str(SPEC), "--date", "2013-01-04", "--no-deploy",
                          "--json", "--tracking-uri", mlflow_server], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "DAYBREAK_HOME": str(home)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["summary"]["date"] == "2013-01-04"
    assert "View run" in out.stderr
