"""`daybreak serve` as a real process: the MLflow scoring protocol, parity, and hot swaps."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import BIN, free_port, wait_http

from daybreak.deploy import deploy_model
from daybreak.deploy._deploy import DeployError
from daybreak.gate import holdout
from daybreak.infra import registry
from daybreak.infra.context import RunContext


@pytest.fixture(scope="module")
def server(cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("serve")
    port = free_port()
    fast = spec.model_dump(mode="json")
    fast["serving"].update(port=port, poll_seconds=0.3)
    fast["monitoring"]["log"]["flush_seconds"] = 0.5  # the log's test reads it soon
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(fast))
    env = {**os.environ, "DAYBREAK_HOME": str(cycled["home"])}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - the server's log, closed after it stops
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
    records = [dict(zip(cols, r, strict=False)) for r in _jsonable(X)]
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
        r = httpx.post(f"{url}/invocations", json=body, timeout=30)
        assert r.headers["x-model-version"] == other
        np.testing.assert_allclose(r.json()["predictions"], _offline(spec, other, X), rtol=1e-6)
    finally:
        stop.set()
        for t in threads:
            t.join()
        cl.set_registered_model_alias(spec.model.name, "champion", champ)
        deadline = time.monotonic() + 30  # the next tests expect the champion served again
        while httpx.get(f"{url}/version").json()["version"] != champ and time.monotonic() < deadline:
            time.sleep(0.1)
    assert failures == []
    assert seen == {champ, other}


def _mlflow_answer(model, body: dict) -> tuple[int, np.ndarray | None]:
    """What MLflow's own parser and the model make of a body: (200, predictions) or (400, None)."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc.scoring_server import infer_and_parse_data

    try:
        frame = infer_and_parse_data(body, model.metadata.get_input_schema())
        return 200, np.asarray(model.predict(frame), dtype=np.float64)
    except (MlflowException, ValueError, KeyError, TypeError):
        return 400, None


def test_bodies_answer_as_mlflow_parses_them(server: dict, use_cycled: dict, spec) -> None:
    """The fast path (columns built directly, requests batched) answers exactly what MLflow's parser
    and the model answer, and every other body goes to MLflow's parser: same predictions, same 400s."""
    from daybreak.deploy._serve import fast_columns, fast_fields

    url = server["url"]
    ctx = RunContext.create("2013-01-04")
    champ = str(registry.alias_version(registry.client(ctx), spec.model.name, "champion").version)
    model = registry.load_model(ctx, spec.model.name, champ)
    X = _rows(spec, 6)
    cols, rows = list(X.columns), _jsonable(X)
    records = [dict(zip(cols, r, strict=False)) for r in rows]
    num = cols.index("distance")

    def split(data, columns=cols, **extra):
        return {"dataframe_split": {"columns": columns, "data": data, **extra}}

    def with_value(value, at=num):
        return [[*r[:at], value, *r[at + 1:]] for r in rows]

    fast = {
        "split": split(rows),
        "split, columns in another order": split([r[::-1] for r in rows], cols[::-1]),
        "split, whole numbers in a double column": split(with_value(700)),
        "split, None in a double column": split(with_value(None)),
        "split, None in a string column": split(with_value(None, cols.index("carrier_code"))),
        "records": {"dataframe_records": records},
        "inputs as records": {"inputs": records},
        "inputs as columns": {"inputs": {c: [r[i] for r in rows] for i, c in enumerate(cols)}},
    }
    other = {
        "split, a boolean in a double column": split(with_value(True)),
        "split, numbers as text": split(with_value("700")),
        "split, text in a double column": split(with_value("far")),
        "split, a number in a string column": split(with_value(7, cols.index("carrier_code"))),
        "split, an extra column": split([[*r, 1.0] for r in rows], [*cols, "extra"]),
        "split, a column missing": split([r[1:] for r in rows], cols[1:]),
        "split, a short row": split([rows[0][:-1], *rows[1:]]),
        "split, with an index": split(rows, index=list(range(len(rows)))),
        "split, no rows": split([]),
        "records, a key missing": {"dataframe_records": [records[0],
                                                         {k: v for k, v in records[1].items() if k != "distance"}]},
        "with params": {**split(rows), "params": {"x": 1}},
        "no format key": {"rows": rows},
        "two format keys": {**split(rows), "dataframe_records": records},
    }
    fields = fast_fields(model)
    assert fields is not None
    assert all(fast_columns(b, fields) is not None for b in fast.values())
    assert all(fast_columns(b, fields) is None for b in other.values())
    statuses = set()
    for name, body in {**fast, **other}.items():
        status, expected = _mlflow_answer(model, body)
        r = httpx.post(f"{url}/invocations", json=body, timeout=30)
        assert r.status_code == status, (name, r.text)
        statuses.add(status)
        if status == 200:
            assert r.headers["x-model-version"] == champ
            np.testing.assert_array_equal(np.asarray(r.json()["predictions"], dtype=np.float64), expected, err_msg=name)
        else:
            assert set(r.json()) == {"error_code", "message"}  # MLflow's error body
    assert statuses == {200, 400}
    json_type = {"Content-Type": "application/json"}
    assert httpx.post(f"{url}/invocations", content=b"{not json", headers=json_type, timeout=10).status_code == 400
    assert httpx.post(f"{url}/invocations", json=[1, 2], timeout=10).status_code == 400
    deep = httpx.post(f"{url}/invocations", content=b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                      headers=json_type, timeout=10)
    assert deep.status_code == 400  # not a 500 from a RecursionError
    from daybreak.deploy._serve import MAX_BODY_BYTES

    huge = httpx.post(f"{url}/invocations", content=b" " * (MAX_BODY_BYTES + 1), headers=json_type, timeout=60)
    assert huge.status_code == 413
    assert httpx.get(f"{url}/ping", timeout=10).status_code == 200  # and it still serves


def test_concurrent_requests_each_get_their_own_rows(server: dict, use_cycled: dict, spec) -> None:
    """Requests batched together are answered with their own slice of the batch's predictions."""
    from concurrent.futures import ThreadPoolExecutor

    url = server["url"]
    ctx = RunContext.create("2013-01-04")
    champ = str(registry.alias_version(registry.client(ctx), spec.model.name, "champion").version)
    X = holdout(spec, ctx)[spec.features.feature_names()]
    slices = [X.iloc[k * 7:k * 7 + 1 + k % 5] for k in range(48)]
    expected = _offline(spec, champ, X)

    def ask(k: int) -> list[float]:
        body = {"dataframe_split": {"columns": list(X.columns), "data": _jsonable(slices[k])}}
        r = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["predictions"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(len(slices))))
    for k, got in enumerate(answers):
        np.testing.assert_array_equal(np.asarray(got, dtype=np.float64),
                                      np.asarray(expected[k * 7:k * 7 + 1 + k % 5], dtype=np.float64))
    # a body bigger than one read (uvicorn hands it over in parts)
    big = {"dataframe_split": {"columns": list(X.columns), "data": _jsonable(X)}}
    r = httpx.post(f"{url}/invocations", json=big, timeout=60)
    assert r.status_code == 200 and len(r.content) > 0 and len(httpx.Request("POST", url, json=big).content) > 65536
    np.testing.assert_array_equal(np.asarray(r.json()["predictions"], dtype=np.float64),
                                  np.asarray(expected, np.float64))


def test_the_servers_log_holds_what_it_answered(server: dict, use_cycled: dict, spec) -> None:
    """``daybreak serve`` logs through a child process that reads the bodies again: each logged
    row is the row sent, in order, with the prediction and version answered. (Identity columns
    need the token: ``tests/test_predlog_process.py`` checks them.)"""
    from concurrent.futures import ThreadPoolExecutor

    from daybreak.deploy import read_log
    from daybreak.deploy._predlog import log_files, log_zone

    url = server["url"]
    ctx = RunContext.create("2013-01-04")
    X = _rows(spec, 60)
    cols = list(X.columns)
    tag = os.urandom(4).hex()

    def ask(k: int) -> tuple[str, list[float], str]:
        part = X.iloc[k * 3:k * 3 + 1 + k % 3]
        body = {"dataframe_split": {"columns": cols, "data": _jsonable(part)}}
        r = httpx.post(f"{url}/invocations", json=body, headers={"x-request-id": f"{tag}-{k}"}, timeout=60)
        assert r.status_code == 200, r.text
        return f"{tag}-{k}", r.json()["predictions"], r.headers["x-model-version"]

    def today() -> set:
        now = pd.Timestamp.now(tz="UTC")
        return {now.date(), now.tz_convert("America/New_York").date()}

    days = today()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(20)))
    days = sorted(days | today())  # (served around midnight: either day)
    want = sum(len(p) for _, p, _ in answers)
    deadline = time.monotonic() + 60
    while True:  # until the log's files hold every row (it writes every 0.5 s)
        t = read_log(spec, ctx.store, days)  # no event time sent: the day it was served
        got = t.to_pandas() if t is not None else None
        if got is not None:
            got = got[got["request_id"].str.startswith(f"{tag}-")]
            if len(got) >= want or time.monotonic() > deadline:
                break
        assert time.monotonic() < deadline, "the log did not hold the requests within 60 s"
        time.sleep(0.2)
    assert len(got) == want
    # written by the server's log process (its files' names end in -w<its pid>)
    import pyarrow.parquet as pq

    def ours(f: str) -> bool:
        return any(r.startswith(f"{tag}-") for r in pq.read_table(f, columns=["request_id"])["request_id"].to_pylist())

    files = [f for d in days for f in log_files(ctx.store, log_zone(spec), d) if ours(f)]
    assert files and all(re.search(r"-w\d+-\d{6}\.parquet$", f) for f in files), files
    for rid, preds, version in answers:
        k = int(rid.rsplit("-", 1)[1])
        rows = got[got["request_id"] == rid]
        part = X.iloc[k * 3:k * 3 + 1 + k % 3]
        assert len(rows) == len(part)
        assert (rows["model_version"] == version).all()
        np.testing.assert_array_equal(rows["prediction"].to_numpy(), np.asarray(preds, np.float64))
        for c in cols:
            sent = part[c].to_numpy()
            if sent.dtype.kind == "f":
                np.testing.assert_array_equal(rows[c].to_numpy(np.float64), sent)
            else:
                assert rows[c].tolist() == sent.tolist(), c


def test_a_big_request_is_predicted_in_slices_between_small_ones(server: dict, use_cycled: dict, spec) -> None:
    """A request of many batches' rows is predicted a slice at a time, small requests answered
    between its slices: every answer is still exactly the model's, from one version."""
    from daybreak.deploy._serve import MAX_BATCH_ROWS

    url = server["url"]
    X = _rows(spec, 200)
    cols, data = list(X.columns), _jsonable(X)
    picks = [k % len(X) for k in range(3 * MAX_BATCH_ROWS + 17)]
    big = [data[k] for k in picks]
    version = httpx.get(f"{url}/version", timeout=10).json()["version"]
    expected = np.asarray(_offline(spec, version, X.iloc[picks]), dtype=np.float64)
    small: list[httpx.Response] = []

    def _split_body(columns: list, rows: list) -> dict:
        return {"dataframe_split": {"columns": columns, "data": rows}}

    def smalls() -> None:
        with httpx.Client(timeout=60) as c:
            for k in range(30):
                small.append(c.post(f"{url}/invocations", json=_split_body(cols, data[k:k + 3])))

    t = threading.Thread(target=smalls)
    t.start()
    r = httpx.post(f"{url}/invocations", json=_split_body(cols, big), timeout=120)
    t.join(timeout=120)
    assert r.status_code == 200 and r.headers["x-model-version"] == version, r.text[:300]
    np.testing.assert_array_equal(np.asarray(r.json()["predictions"], dtype=np.float64), expected)
    assert [s.status_code for s in small] == [200] * 30
    for k, s in enumerate(small):
        np.testing.assert_array_equal(np.asarray(s.json()["predictions"], dtype=np.float64), expected[k:k + 3])


def test_bearer_token(use_cycled: dict, spec) -> None:
    from fastapi.testclient import TestClient

    from daybreak.deploy._serve import create_app

    X = _rows(spec, 2)
    body = {"dataframe_split": {"columns": list(X.columns), "data": _jsonable(X)}}
    with TestClient(create_app(spec, RunContext.create("2013-01-04"), token="s3cret")) as c:
        assert c.post("/invocations", json=body).status_code == 401
        assert c.post("/invocations", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/invocations", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
        assert c.get("/ping").status_code == 200  # health checks need no token


def test_deploy_without_endpoint(use_cycled: dict, spec) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = deploy_model(spec, RunContext.create("2013-01-04"), url=url)
    assert out["deployed"] is False and "no serving endpoint" in out["reason"]
    with pytest.raises(DeployError, match="no serving endpoint"):
        deploy_model(spec, RunContext.create("2013-01-04"), url=url, require_endpoint=True)


def _fast(model, X) -> np.ndarray:
    """The server's fast predict (rows as a client's JSON, through the fast path's columns)."""
    from daybreak.deploy._serve import batch_columns, fast_columns, fast_fields, fast_predict

    fields = fast_fields(model)
    fast = fast_predict(model, fields)
    assert fields is not None and fast is not None  # the model code has predict_columns, and it passed at load
    body = {"dataframe_split": {"columns": list(X.columns), "data": _jsonable(X)}}
    cols = fast_columns(body, fields)
    assert cols is not None
    return np.asarray(fast(batch_columns([cols], fields)))


def _fast_vs_pyfunc(model, X) -> tuple[np.ndarray, np.ndarray]:
    """The server's fast predict and the pyfunc's predict on the same rows."""
    return _fast(model, X), np.asarray(model.predict(X))


def _with_gaps(X):
    """Rows with missing numbers, missing and unseen categories."""
    X = X.copy()
    X.iloc[::3, X.columns.get_loc("distance")] = np.nan
    X.iloc[1::4, X.columns.get_loc("carrier_code")] = None
    X.iloc[2::5, X.columns.get_loc("origin_code")] = "NEVER-SEEN"
    return X


def test_fast_predict_equals_the_pyfunc_xgboost(use_cycled: dict, spec) -> None:
    """The fast path's predict (the model code's predict_columns: numpy encoding, xgboost's
    inplace_predict) gives the pyfunc's floats to the bit, with nulls and unseen categories."""
    ctx = RunContext.create("2013-01-04")
    champ = str(registry.alias_version(registry.client(ctx), spec.model.name, "champion").version)
    model = registry.load_model(ctx, spec.model.name, champ)
    X = _with_gaps(holdout(spec, ctx)[spec.features.feature_names()].head(500))
    got, want = _fast_vs_pyfunc(model, X)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    # A double beyond float32 (review finding): the pyfunc's DMatrix refuses the infinity it becomes,
    # so the fast predict must refuse it too, never answer a made-up prediction.
    X.iloc[0, X.columns.get_loc("distance")] = 1e39
    with pytest.raises(Exception, match="inf"):
        model.predict(X)
    with pytest.raises(Exception, match="inf"):
        _fast(model, X)


def test_fast_predict_equals_the_pyfunc_sklearn(fresh, spec) -> None:
    from daybreak.train import train_model

    raw = spec.model_dump(mode="json")
    raw["model"].update(flavor="sklearn", estimator="sklearn.ensemble.HistGradientBoostingClassifier",
                        params={"max_iter": 20})
    from daybreak.spec._model import parse_spec

    sk = parse_spec(raw)
    ctx = RunContext.create("2013-01-02")
    out = train_model(sk, ctx)
    assert out["status"] == "trained"
    model = registry.load_model(ctx, sk.model.name, out["model_version"])
    X = _with_gaps(holdout(sk, ctx)[sk.features.feature_names()].head(500))
    got, want = _fast_vs_pyfunc(model, X)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_column_encoder_equals_encode_for_every_kind() -> None:
    """``ColumnEncoder`` (numpy, the serving fast path) makes ``encode``'s matrix (pandas, what the
    pyfunc runs) to the bit, for every encoder kind, with missing and unseen values."""
    import pandas as pd

    from daybreak.train.model_code import ColumnEncoder, encode

    rng = np.random.default_rng(7)
    n = 300
    cats = ["a", "b", "c[1]", "d<2"]
    text = np.array([None if k % 7 == 0 else ("zz" if k % 11 == 0 else cats[k % 4]) for k in range(n)], dtype=object)
    num = rng.normal(size=n)
    num[::5] = np.nan
    cols = {"ord": text, "hot": text.copy(), "freq": text.copy(), "q": num, "plain": num * 3}
    encoders = {"ord": {"kind": "ordinal", "categories": cats},
                "hot": {"kind": "onehot", "categories": cats},
                "freq": {"kind": "frequency", "categories": cats, "frequencies": [0.4, 0.3, 0.2, 0.1]},
                "q": {"kind": "quantile", "edges": [-1.0, 0.0, 1.0]}}
    features = list(cols)
    want = encode(pd.DataFrame(cols), features, encoders)
    got = ColumnEncoder(features, encoders)(cols)
    assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True)
    # categories that are not all text go through pandas, as encode does
    encoders["ord"] = {"kind": "ordinal", "categories": [1, "a"]}
    assert np.array_equal(ColumnEncoder(features, encoders)(cols), encode(pd.DataFrame(cols), features, encoders),
                          equal_nan=True)


def test_refresh_needs_the_token_and_answers_the_version(use_cycled: dict, spec) -> None:
    from fastapi.testclient import TestClient

    from daybreak.deploy._serve import create_app

    ctx = RunContext.create("2013-01-04")
    champ = str(registry.alias_version(registry.client(ctx), spec.model.name, "champion").version)
    with TestClient(create_app(spec, ctx, token="s3cret")) as c:
        assert c.post("/refresh").status_code == 401
        assert c.post("/refresh", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/refresh", headers={"Authorization": "Bearer s3cret"}).status_code == 405
        ok = c.post("/refresh", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["version"] == champ, ok.text
        # a burst of calls shares checks, and every one answers
        assert {c.post("/refresh", headers={"Authorization": "Bearer s3cret"}).status_code for _ in range(5)} == {200}


def test_deploy_asks_the_server_to_check_now(use_cycled: dict, spec, tmp_path) -> None:
    """With a poll interval of an hour, deploy still finds the new champion served: it asks the
    server to check the alias (POST /refresh) before it waits."""
    port = free_port()
    slow = spec.model_dump(mode="json")
    slow["serving"].update(port=port, poll_seconds=3600)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(slow))
    ctx = RunContext.create("2013-01-04")
    cl = registry.client(ctx)
    champ = str(registry.alias_version(cl, spec.model.name, "champion").version)
    other = next(str(mv.version) for mv in registry.versions(cl, spec.model.name) if str(mv.version) != champ)
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "daybreak"), "serve", "--spec", str(spec_file)], env=dict(os.environ),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"{url}/ping", timeout=90, proc=proc)
            assert httpx.get(f"{url}/version").json()["version"] == champ
            cl.set_registered_model_alias(spec.model.name, "champion", other)
            out = deploy_model(spec, ctx, url=url, timeout=60)  # far less than the poll interval
            assert out["deployed"] is True and out["champion_version"] == other, out
            assert httpx.get(f"{url}/version").json()["version"] == other
        finally:
            cl.set_registered_model_alias(spec.model.name, "champion", champ)
            proc.terminate()
            proc.wait(timeout=20)


def test_big_split_bodies_convert_doubles_only_when_every_string_is_accounted_for() -> None:
    """A ``dataframe_split`` body of CONVERT_ROWS rows or more has its double columns converted at
    once when the body's strings are all in its text columns; a string, boolean or container in a
    double column still sends the body to MLflow's parser (None), as the per-value check does."""
    import orjson

    from daybreak.deploy._serve import CONVERT_ROWS, fast_columns, parse_fast

    fields = (("a", "double", True), ("b", "double", True), ("s", "string", True))
    n = CONVERT_ROWS + 3
    rows = [[k + 0.5, k if k % 3 else None, None if k % 4 == 0 else f"t{k}"] for k in range(n)]

    def parsed(cell: object, text: object = "x") -> object:
        body = {"dataframe_split": {"columns": ["a", "b", "s"], "data": [*rows[:-1], [1.0, cell, text]]}}
        raw = orjson.dumps(body) + b" " * 8 * n * 3  # (long enough for the strings to be counted)
        got = parse_fast(raw, fields, frozenset(), 10**6)
        assert (got is None) == (fast_columns(orjson.loads(raw), fields) is None)  # the per-value check agrees
        return got

    ok = parsed(7)
    assert ok is not None and isinstance(ok.columns["b"], np.ndarray) and ok.columns["b"].dtype == np.float64
    np.testing.assert_array_equal(ok.columns["b"], np.array([r[1] for r in rows[:-1]] + [7], dtype=np.float64))
    assert list(ok.columns["s"]) == [r[2] for r in rows[:-1]] + ["x"]
    for bad in ("700", True, [1.0], {}, {"k": 1}, [[1.0]]):
        assert parsed(bad) is None, bad
    assert parsed(2.0, 'with "quotes"') is not None  # an escaped quote: the values are checked one by one
    assert parsed(2.0, 5) is None  # a number in a text column


def test_split_rows_read_as_one_matrix_give_the_columns_of_the_general_reading() -> None:
    """A ``dataframe_split`` body's double columns are read into one float64 matrix per request (a
    ``Block``): its batches are the same numpy columns as the general reading gives, slices and
    the identity columns included, and every body the general checks refuse is refused."""
    from itertools import chain

    from daybreak.deploy._serve import Block, batch_columns, fast_columns

    fields = (("a", "double", True), ("s", "string", False), ("b", "double", False), ("t", "string", True))
    ids = frozenset({"flight"})
    columns = ["t", "b", "flight", "a", "s"]
    rows = [[None if k % 3 else f"t{k}", k * 1.5, 1500 + k, k if k % 2 else None, f"s{k}"] for k in range(7)]

    def general(cols: list, data: list) -> dict:
        return dict(zip(cols, zip(*data, strict=True), strict=True))

    def split(data: list, cols: list = columns) -> object:
        return fast_columns({"dataframe_split": {"columns": cols, "data": data}}, fields, ids)

    block = split(rows)
    assert type(block) is Block and "flight" in block and "nope" not in block
    assert set(block) == set(columns) and block["flight"] == tuple(1500 + k for k in range(7))
    for got, want in ((batch_columns([block], fields), batch_columns([general(columns, rows)], fields)),
                      (batch_columns([block, split(rows[:2]), block.cut(2, 5)], fields),
                       batch_columns([general(columns, r) for r in (rows, rows[:2], rows[2:5])], fields))):
        assert got.keys() == want.keys()
        for name in got:
            assert got[name].dtype == want[name].dtype, name
            np.testing.assert_array_equal(got[name], want[name])
    for row in rows:  # one row at a time (a path of its own): the same columns
        one, want = batch_columns([split([row])], fields), batch_columns([general(columns, [row])], fields)
        assert one.keys() == want.keys() and type(split([row])) is Block
        for name in one:
            assert one[name].dtype == want[name].dtype, name
            np.testing.assert_array_equal(one[name], want[name])
    other = split([[r[k] for k in (3, 0, 4, 1, 2)] for r in rows], ["a", "t", "s", "b", "flight"])  # another order
    np.testing.assert_array_equal(batch_columns([other], fields)["a"], batch_columns([block], fields)["a"])
    # what the general checks refuse, the matrix refuses
    for bad in ([3, 1.0, 1, 2.0, "s"],       # a number in a text column
                [None, None, 1, 2.0, "s"],   # null in a required double column
                [None, 1.0, 1, 2.0, None],   # null in a required text column
                [None, "1.0", 1, 2.0, "s"],  # text in a double column
                [None, True, 1, 2.0, "s"],   # a boolean
                [None, [1.0], 1, 2.0, "s"],  # a container
                [None, 1.0, 1, 2.0]):        # a short row
        assert split([*rows, bad]) is None, bad
        assert split([bad]) is None, bad  # a one-row body has a path of its own
        assert fast_columns({"dataframe_split": {"columns": columns, "data": [*rows, bad]}}, fields, ids,
                            json_strings=None) is None
    assert split(rows, ["t", "b", "other", "a", "s"]) is None  # not an identity column
    assert split(rows, ["t", "b", "flight", "a", "a"]) is None  # a repeated column
    # a number beyond a double is left to the general reading (its check names the column)
    huge = split([[None, 10**400, 1, 1.0, "s"]])
    assert huge is not None and type(huge) is not Block and list(chain(huge["b"])) == [10**400]
    huge = split([*rows, [None, 10**400, 1, 1.0, "s"]])  # among other rows (read column by column)
    assert huge is not None and type(huge) is not Block and list(huge["b"])[-1] == 10**400
    assert batch_columns([split([*rows, [None, 2**64, 1, 1.0, "s"]])], fields)["b"][-1] == float(2**64)


def test_json_strings_counts_quotes_and_sees_every_boolean() -> None:
    """``_json_strings`` (the vectorized scan behind the fast conversion of double columns) agrees
    with the plain byte search on random texts, few and many ``t``/``f`` bytes alike."""
    import random

    from daybreak.deploy._serve import _json_strings

    def plain(raw: bytes) -> int | None:
        if b"true" in raw or b"false" in raw:
            return None
        quotes = raw.count(b'"')
        return quotes // 2 if quotes % 2 == 0 else None

    rng = random.Random(7)
    pieces = [b'"', b"t", b"r", b"u", b"e", b"f", b"a", b"l", b"s", b"1.5", b",", b"true", b"false", b"null"]
    for _ in range(3000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.choice((0, 5, 50, 400))))
        assert _json_strings(raw) == plain(raw), raw
    assert _json_strings(b'{"a": [1.0, 2.0], "b": "x"}') == 3
    assert _json_strings(b'{"a": [1.0, true]}') is None
    assert _json_strings(b'{"a": ["' + b"t" * 500 + b'", false]}') is None


def test_dense_predict_equals_inplace_predict() -> None:
    """The model code's direct C call gives xgboost's inplace_predict floats to the bit: binary,
    regression and multi-class models, missing values, one row and many, float32 and float64,
    a view that is not C-ordered (inplace_predict itself), and two threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    import xgboost as xgb

    from daybreak.train.model_code import _dense_predict

    rng = np.random.default_rng(3)
    X = rng.normal(size=(600, 6)).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan
    y = rng.normal(size=600)
    models = [xgb.train({"objective": "binary:logistic"}, xgb.DMatrix(X, (y > 0).astype(int)), 12),
              xgb.train({"objective": "reg:squarederror"}, xgb.DMatrix(X, y), 12),
              xgb.train({"objective": "multi:softprob", "num_class": 3}, xgb.DMatrix(X, (y > 0) + (y > 1)), 12)]
    for model in models:
        for rows in (X[:1], X[:37], X, X.astype(np.float64), X[::2], X[:, :6].T.copy().T):
            want = model.inplace_predict(rows, missing=np.nan)
            got = _dense_predict(model, rows)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
        with ThreadPoolExecutor(2) as pool:  # one proxy per thread: no thread sees another's rows
            parts = [X[k:k + 50] for k in range(0, 600, 50)] * 4
            for part, got in zip(parts, pool.map(lambda p, m=model: _dense_predict(m, p), parts), strict=True):
                np.testing.assert_array_equal(got, model.inplace_predict(part, missing=np.nan))


def test_an_idle_server_answers_a_lone_request_at_once_after_a_long_batch(spec) -> None:
    """The batcher gathers the last batch's clients only under load: a request after an idle
    spell is predicted at once, not after up to twice the last (long) batch's time (review
    finding: a 1-row request waited 2.3 s after a 1.2 s batch and 3 s of idleness)."""
    import asyncio

    import pandas as pd

    from daybreak.deploy._serve import Batcher, Loaded, ModelHolder, Parsed

    class Slow:  # a big body MLflow's parser read is predicted whole: here it takes 0.6 s
        def predict(self, frame):
            if len(frame) > 1000:
                time.sleep(0.6)
            return np.zeros(len(frame))

    async def scenario() -> float:
        holder = ModelHolder(spec, RunContext.create("2013-01-04"))
        holder.current = Loaded("1", Slow(), time.time(), None)
        batcher = Batcher(holder)
        task = asyncio.create_task(batcher.run())
        try:
            await batcher.submit(Parsed(50_000, frame=pd.DataFrame({"x": np.zeros(50_000)})), None)
            await asyncio.sleep(1.5)  # idle for longer than two of those batches
            started = time.monotonic()
            (status, _), _ = await batcher.submit(Parsed(1, frame=pd.DataFrame({"x": [1.0]})), None)
            assert status == 200
            return time.monotonic() - started
        finally:
            task.cancel()
            batcher.close()

    assert asyncio.run(scenario()) < 0.3


def test_a_batch_measured_fast_is_predicted_on_the_loop_a_slow_one_on_the_thread(spec) -> None:
    """Batches over INLINE_PREDICT_ROWS rows go to the predict thread until this version's batches
    are measured: then on the loop when as many rows took at most INLINE_SECONDS (GIL hand-offs
    cost more), on the thread otherwise, so a slow model never holds the loop that serves everyone."""
    import asyncio
    import json
    import threading

    from daybreak.deploy import _serve
    from daybreak.deploy._serve import Batcher, Loaded, ModelHolder, Parsed

    fields = (("x", "double", False),)
    rows = _serve.INLINE_PREDICT_ROWS * 4

    def model(seconds_per_row: float, seen: list[str]):
        def fast(data: dict) -> np.ndarray:
            seen.append(threading.current_thread().name)
            busy_until = time.thread_time() + seconds_per_row * len(data["x"])  # CPU, as the batcher measures
            while time.thread_time() < busy_until:
                pass
            return data["x"] * 2
        return fast

    async def scenario(seconds_per_row: float) -> list[str]:
        seen: list[str] = []
        holder = ModelHolder(spec, RunContext.create("2013-01-04"))
        holder.current = Loaded("1", None, time.time(), fields, model(seconds_per_row, seen))
        batcher = Batcher(holder)
        task = asyncio.create_task(batcher.run())
        try:
            for _ in range(3):
                x = np.arange(rows, dtype=np.float64)
                (status, body), _ = await batcher.submit(Parsed(rows, columns={"x": x}), fields)
                assert status == 200 and json.loads(body)["predictions"] == (x * 2).tolist()
            return seen
        finally:
            task.cancel()
            batcher.close()

    loop_thread = threading.current_thread().name
    cheap = asyncio.run(scenario(0.0))
    assert cheap[0] != loop_thread and cheap[1:] == [loop_thread, loop_thread], cheap
    slow = asyncio.run(scenario(2 * _serve.INLINE_SECONDS / rows))
    assert loop_thread not in slow, slow


def test_serve_makes_arrow_allocate_with_malloc_before_pyarrow_loads() -> None:
    """``daybreak serve`` sets ARROW_DEFAULT_MEMORY_POOL before pyarrow loads (run through the
    command itself, stopped where it loads the spec): the Parquet writer's buffers, which
    ``pyarrow.set_memory_pool`` does not reach, then come from malloc, not from mimalloc, which
    re-faulted huge pages after every prediction-log flush."""
    import subprocess
    import sys

    code = """
import os, sys
os.environ.pop("ARROW_DEFAULT_MEMORY_POOL", None)
from daybreak import cli
assert "pyarrow" not in sys.modules  # the CLI loads it only in a command
def stop(spec):
    import io, numpy as np, pyarrow as pa, pyarrow.parquet as pq
    from daybreak.deploy._predlog import _parquet_options
    try:
        mimalloc = pa.mimalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without it: nothing to check
        print("system", 0); sys.exit(0)
    t = pa.table({"x": np.random.default_rng(0).random(100_000), "s": ["abc"] * 100_000})
    pq.write_table(t, io.BytesIO(), **_parquet_options(t.schema))
    print(pa.default_memory_pool().backend_name, mimalloc.max_memory())
    sys.exit(0)
cli._load = stop
cli.app(["serve", "--spec", "unused.yaml"])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["system", "0"]


def test_clients_back_within_the_load_window_share_a_batch(spec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load, the clients of the last batch come back over the time the loop takes to write
    its answers and read their requests, longer than two predicts of a small batch: a request
    within LOAD_SECONDS of the last batch waits (GATHER_PER_REQUEST_SECONDS for each one missing)
    for as many as the last batch answered, instead of starting a batch of its own. (The windows
    are widened here so a slow machine cannot change the outcome.)"""
    import asyncio

    from daybreak.deploy import _serve
    from daybreak.deploy._serve import Batcher, Loaded, ModelHolder, Parsed

    monkeypatch.setattr(_serve, "LOAD_SECONDS", 2.0)
    monkeypatch.setattr(_serve, "GATHER_PER_REQUEST_SECONDS", 0.5)
    monkeypatch.setattr(_serve, "GATHER_MISSING_SECONDS", 1.0)
    monkeypatch.setattr(_serve, "GATHER_SECONDS", 1.0)
    fields = (("x", "double", False),)
    batches: list[int] = []

    def fast(data: dict) -> np.ndarray:
        batches.append(len(data["x"]))
        return data["x"]

    async def scenario() -> None:
        holder = ModelHolder(spec, RunContext.create("2013-01-04"))
        holder.current = Loaded("1", None, time.time(), fields, fast)
        batcher = Batcher(holder)
        task = asyncio.create_task(batcher.run())

        def one() -> asyncio.Future:
            return batcher.enqueue(Parsed(1, columns={"x": np.ones(1)}), fields)

        try:
            await asyncio.gather(*[one() for _ in range(4)])  # a batch of 4
            await asyncio.sleep(0.05)  # far past two predicts of 4 rows, within the load window
            first = one()
            await asyncio.sleep(0.05)
            await asyncio.gather(first, *[one() for _ in range(3)])
        finally:
            task.cancel()
            batcher.close()

    asyncio.run(scenario())
    assert batches == [4, 4], batches


def test_big_inline_batches_let_the_loop_run_between_them(spec) -> None:
    """A big request in slices on a model measured cheap is predicted on the loop slice after
    slice: the loop runs its other work (reads, health checks, answers already set) between them
    instead of being held for the whole request (review finding: 50 slices back to back)."""
    import asyncio
    import itertools
    import json

    from daybreak.deploy import _serve
    from daybreak.deploy._serve import Batcher, Loaded, ModelHolder, Parsed

    fields = (("x", "double", False),)
    rows = _serve.MAX_BATCH_ROWS * 6
    events: list[str] = []

    def fast(data: dict) -> np.ndarray:
        events.append("slice")
        return data["x"]

    async def scenario() -> None:
        holder = ModelHolder(spec, RunContext.create("2013-01-04"))
        holder.current = Loaded("1", None, time.time(), fields, fast)
        batcher = Batcher(holder)
        batcher._row_seconds = ("1", 1e-9)  # measured cheap: every batch on the loop
        task = asyncio.create_task(batcher.run())

        async def other_work() -> None:
            while True:
                events.append("loop")
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other_work())
        try:
            x = np.arange(rows, dtype=np.float64)
            (status, body), _ = await batcher.submit(Parsed(rows, columns={"x": x}), fields)
            assert status == 200 and len(json.loads(body)["predictions"]) == rows
        finally:
            ticker.cancel()
            task.cancel()
            batcher.close()

    asyncio.run(scenario())
    slices = [i for i, e in enumerate(events) if e == "slice"]
    assert len(slices) == 6, events
    assert all("loop" in events[a + 1:b] for a, b in itertools.pairwise(slices)), events
