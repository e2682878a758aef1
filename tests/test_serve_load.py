"""`daybreak serve` under continuous load while the champion is promoted 5 times.

Real components only: a sqlite registry, six versions trained and gated by daybreak, five
promotions through ``promote_model``, the server as its own process, and client threads sending
requests the whole time. Every answer must be a 200, the version a client sees must never go
back, every promoted version must be seen, and every answer must equal the offline predictions
of the version its X-Model-Version header names (a batch never mixes versions).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from conftest import BIN, free_port, wait_http

from daybreak.gate import PROMOTE, evaluate_gate, holdout
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.promote import promote_model
from daybreak.train import train_model

PROMOTIONS = 5


def _lenient(spec, seed: int):
    """The demo spec with a gate every candidate passes; each seed is a distinct candidate."""
    return spec.model_copy(update={
        "gate": spec.gate.model_copy(update={"compare": "no_worse", "margin": 1.0, "floor": 0.0}),
        "model": spec.model.model_copy(update={"seed": seed})})


def _jsonable(X) -> list:
    return X.astype(object).where(X.notna(), None).values.tolist()


class Client(threading.Thread):
    """Sends one body again and again; keeps (version, predictions) of every answer."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.answers: list[tuple[int, list[float]]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self.stop.is_set():
                try:
                    r = c.post(f"{self.url}/invocations", json=self.body)
                except httpx.HTTPError as e:
                    self.failures.append(f"{type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    self.answers.append((int(r.headers["x-model-version"]), r.json()["predictions"]))

    def seen(self) -> set[int]:
        return {v for v, _ in list(self.answers)}


def test_five_promotions_under_load(fresh: Path, spec, tmp_path: Path) -> None:
    specs = [_lenient(spec, seed) for seed in range(13, 14 + PROMOTIONS)]
    day2, day3 = RunContext.create("2013-01-02"), RunContext.create("2013-01-03")
    train_model(specs[0], day2)
    assert evaluate_gate(specs[0], day2)["decision"] == PROMOTE
    assert promote_model(specs[0], day2)["promoted"]
    candidates = [train_model(s, day3)["model_version"] for s in specs[1:]]  # trained up front, gated one by one
    assert len(set(candidates)) == PROMOTIONS

    port = free_port()
    served = specs[0].model_dump(mode="json")
    served["serving"].update(port=port, poll_seconds=0.3)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(served))
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the server's log, closed after it stops
    proc = subprocess.Popen([str(BIN / "daybreak"), "serve", "--spec", str(spec_file)], env=dict(os.environ),
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    X = holdout(spec, day3)[spec.features.feature_names()]
    cols = list(X.columns)
    frames = [X.head(1), X.iloc[100:200], X.iloc[300:310], X.iloc[400:405]]
    bodies = [
        {"dataframe_split": {"columns": cols, "data": _jsonable(frames[0])}},
        {"dataframe_split": {"columns": cols, "data": _jsonable(frames[1])}},
        {"dataframe_records": [dict(zip(cols, r, strict=False)) for r in _jsonable(frames[2])]},
        # an index: not the fast path, MLflow's parser answers it
        {"dataframe_split": {"columns": cols, "data": _jsonable(frames[3]), "index": list(range(5))}},
    ]
    clients = [Client(url, b) for b in bodies]
    try:
        wait_http(f"{url}/ping", timeout=90, proc=proc)
        for c in clients:
            c.start()
        versions = ["1"]
        for s in specs[1:]:
            gate = evaluate_gate(s, day3)
            assert gate["decision"] == PROMOTE and gate["champion_version"] == versions[-1], gate
            out = promote_model(s, day3)
            assert out["promoted"] and out["previous_version"] == versions[-1], out
            versions.append(out["champion_version"])
            deadline = time.monotonic() + 90
            while not all(int(versions[-1]) in c.seen() for c in clients):  # every client saw it
                assert time.monotonic() < deadline, f"clients never saw v{versions[-1]}: {[c.seen() for c in clients]}"
                assert all(c.is_alive() for c in clients)
                time.sleep(0.1)
    finally:
        for c in clients:
            c.stop.set()
        for c in clients:
            c.join(timeout=60)
        proc.terminate()
        proc.wait(timeout=20)
        log.close()

    assert versions == sorted(versions, key=int) and len(set(versions)) == PROMOTIONS + 1
    for c in clients:
        assert c.failures == [], c.failures[:5]
        seen = [v for v, _ in c.answers]
        assert seen == sorted(seen), "a client saw the version go back"
        assert set(seen) == {int(v) for v in versions}
    # every answer is the offline prediction of the version that its header names
    for v in versions:
        model = registry.load_model(day3, spec.model.name, v)
        for c, frame in zip(clients, frames, strict=False):
            expected = np.asarray(model.predict(frame), dtype=np.float64)
            for got in {tuple(p) for version, p in c.answers if version == int(v)}:
                np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"v{v}")
