"""`daybreak serve` as a real process: the MLflow scoring protocol, parity, and hot swaps."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
import yaml

from conftest import BIN, free_port, wait_http
from daybreak import registry
from daybreak.context import RunContext
from daybreak.deploy import DeployError, deploy_model
from daybreak.gate import holdout


@pytest.fixture(scope="module")
def server(cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("serve")
    port = free_port()
    fast = spec.model_dump(mode="json")
    fast["serving"].update(port=port, poll_seconds=0.3)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(fast))
    env = {**os.environ, "DAYBREAK_HOME": str(cycled["home"])}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(BIN / "daybreak"), "serve", "--spec", str(spec_file)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=90, proc=proc)
        yield {"url": f"http://127.0.0.1:{port}", "spec_file": spec_file, "port": port}
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _rows(spec, n: int = 40):
    df = holdout(spec, RunContext.create("2013-01-04")).head(n)
    return df[spec.features.feature_names()]


def _offline(spec, version: str, X) -> np.ndarray:
    return np.asarray(registry.load_model(RunContext.create("2013-01-04"), spec.model.name, version).predict(X))


def _jsonable(X) -> list:
    return X.astype(object).where(X.notna(), None).values.tolist()


def test_scoring_protocol_and_parity(server: dict, use_cycled: dict, spec) -> None:
    url = server["url"]
    cl = registry.client(RunContext.create("2013-01-04"))
    champ = str(registry.alias_version(cl, spec.model.name, "champion").version)
    assert httpx.get(f"{url}/version").json()["version"] == champ
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    X = _rows(spec)
    expected = _offline(spec, champ, X)
    cols = list(X.columns)
    records = [dict(zip(cols, r)) for r in _jsonable(X)]
    for body in ({"dataframe_split": {"columns": cols, "data": _jsonable(X)}},
                 {"dataframe_records": records},
                 {"inputs": records}):
        r = httpx.post(f"{url}/invocations", json=body, timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == champ
        np.testing.assert_allclose(r.json()["predictions"], expected, rtol=1e-6)

    bad = httpx.post(f"{url}/invocations", json={"rows": []}, timeout=10)
    assert bad.status_code == 400 and "dataframe_split" in bad.text
    missing = httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["distance"], "data": [[1.0]]}})
    assert missing.status_code == 400

    # the deploy step checks the same thing, through the public endpoint
    out = deploy_model(spec, RunContext.create("2013-01-04"), url=url, timeout=20)
    assert out["deployed"] is True and out["champion_version"] == champ and out["parity_rows"] == 50


def test_hot_swap_without_failed_requests(server: dict, use_cycled: dict, spec) -> None:
    url = server["url"]
    cl = registry.client(RunContext.create("2013-01-04"))
    champ = str(registry.alias_version(cl, spec.model.name, "champion").version)
    other = next(str(mv.version) for mv in registry.versions(cl, spec.model.name) if str(mv.version) != champ)
    X = _rows(spec, 5)
    body = {"dataframe_split": {"columns": list(X.columns), "data": _jsonable(X)}}
    failures, seen, stop = [], set(), threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{url}/invocations", json=body)
                if r.status_code != 200:
                    failures.append(r.status_code)
                else:
                    seen.add(r.headers["x-model-version"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        cl.set_registered_model_alias(spec.model.name, "champion", other)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/version").json()["version"] != other:
            assert time.monotonic() < deadline, "server never picked up the new champion"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
        cl.set_registered_model_alias(spec.model.name, "champion", champ)
    assert failures == []
    assert seen == {champ, other}
    r = httpx.post(f"{url}/invocations", json=body, timeout=30)
    np.testing.assert_allclose(r.json()["predictions"], _offline(spec, other, X), rtol=1e-6) if \
        r.headers["x-model-version"] == other else None


def test_deploy_without_endpoint(use_cycled: dict, spec) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = deploy_model(spec, RunContext.create("2013-01-04"), url=url)
    assert out["deployed"] is False and "no serving endpoint" in out["reason"]
    with pytest.raises(DeployError, match="no serving endpoint"):
        deploy_model(spec, RunContext.create("2013-01-04"), url=url, require_endpoint=True)
