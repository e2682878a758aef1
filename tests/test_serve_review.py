"""Review findings of issue 25's serving: the prediction log of multi-output models, the in-flight
gauge of requests that raise, and the rate of registry checks ``POST /refresh`` may cause."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from daybreak.deploy import read_log
from daybreak.deploy._predlog import PredictionLog
from daybreak.infra.store import Store


def _plog(spec, store: Store) -> PredictionLog:
    s = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(
        update={"log": spec.monitoring.log.model_copy(update={"flush_seconds": 3600})})})
    return PredictionLog(s, store)


def test_the_log_keeps_one_row_per_request_row_for_multi_output_predictions(spec, tmp_path: Path) -> None:
    """A model answering several scores a row (class probabilities) is logged one row per request
    row, the scores kept in ``prediction_scores``; ``prediction`` stays a number (null for such rows,
    the single score for an (n, 1) output), so the monitor's reading of it does not change."""
    store = Store(tmp_path / "store")
    plog = _plog(spec, store)
    frame = pd.DataFrame({"distance": [1.0, 2.0, 3.0], "carrier_code": np.array(["UA", "AA", "UA"], dtype=object)})
    try:
        plog.record("7", frame, np.array([[0.1, 0.9], [0.6, 0.4], [0.3, 0.7]]), [("r1", 3, None)])
        plog.record("7", frame.iloc[:2].reset_index(drop=True), np.array([[0.25], [0.5]]), [("r2", 2, None)])
        plog.record("8", frame.iloc[:1], np.array([0.75]), [("r3", 1, None)])
        assert plog.flush() == 6
    finally:
        plog.close()
    day = pd.Timestamp.now(tz="UTC").tz_convert("America/New_York").date()
    got = read_log(spec, store, [day]).to_pandas().sort_values(["request_id", "distance"])
    assert got["request_id"].tolist() == ["r1"] * 3 + ["r2"] * 2 + ["r3"]
    assert got["distance"].tolist() == [1.0, 2.0, 3.0, 1.0, 2.0, 1.0]
    assert got["prediction"].isna().tolist() == [True] * 3 + [False] * 3
    assert got["prediction"].tolist()[3:] == [0.25, 0.5, 0.75]
    assert [list(s) for s in got["prediction_scores"].tolist()[:3]] == [[0.1, 0.9], [0.6, 0.4], [0.3, 0.7]]
    assert all(s is None for s in got["prediction_scores"].tolist()[3:])
    # a log of single outputs has no scores column (what the monitor has always read)
    plain = tmp_path / "plain"
    plog = _plog(spec, Store(plain))
    try:
        plog.record("7", frame, np.array([0.1, 0.2, 0.3]), [("r1", 3, None)])
        assert plog.flush() == 3
    finally:
        plog.close()
    assert "prediction_scores" not in read_log(spec, Store(plain), [day]).column_names


def _invocations(answer):
    """An /invocations app around a stub holder, its `answer` replaced."""
    from fastapi import FastAPI

    from daybreak.deploy._metrics import ServerMetrics
    from daybreak.deploy._serve import Invocations, Limits

    holder = SimpleNamespace(current=None, swaps=0, swap_failures=0, poll_errors=0)
    api = FastAPI()
    api.state.metrics = ServerMetrics("m", "champion", holder, runtime=False)
    app = Invocations(api, holder, None, Limits(), None)  # type: ignore[arg-type]
    app.answer = answer  # type: ignore[method-assign]
    return app


def _in_flight(app) -> float:
    from daybreak.deploy._metrics import ServerCollector

    for family in ServerCollector(app.metrics).collect():
        if family.name == "daybreak_invocations_in_flight":
            return family.samples[0].value
    raise AssertionError("no in-flight gauge")


def test_a_request_that_raises_leaves_the_in_flight_gauge() -> None:
    """The gauge is begun - answered: a request whose handling raises is answered with a 500 (and
    counted), and one cancelled (the server stopping) is no longer in flight either."""
    scope = {"type": "http", "path": "/invocations", "method": "POST", "headers": []}
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    app = _invocations(boom)
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 500 and b"internal error" in sent[1]["body"]
    assert _in_flight(app) == 0 and app.metrics.codes.get(500) == 1

    async def forever(*args, **kwargs):
        await asyncio.sleep(3600)

    app = _invocations(forever)

    async def cancelled() -> None:
        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.sleep(0.01)
        assert _in_flight(app) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert _in_flight(app) == 0 and app.metrics.codes == {200: 0}


def _watched_holder(spec, poll_seconds: float = 3600):
    from daybreak.deploy._serve import Loaded, ModelHolder

    s = spec.model_copy(update={"serving": spec.serving.model_copy(update={"poll_seconds": poll_seconds})})
    holder = ModelHolder(s, None)  # type: ignore[arg-type]
    looked: list[float] = []
    loads: list[str] = []
    version = ["1"]

    def champion_version() -> str:
        looked.append(time.monotonic())
        return version[0]

    def load(v: str) -> Loaded:
        loads.append(v)
        if v == "bad":
            raise RuntimeError("cannot load")
        return Loaded(v, object(), time.time(), None)

    holder.champion_version = champion_version  # type: ignore[method-assign]
    holder.load = load  # type: ignore[method-assign]
    return holder, looked, loads, version


def test_refresh_checks_the_registry_at_most_once_a_second(spec) -> None:
    """A burst of /refresh calls shares one check; calls within a second of a check join the next
    one, which starts a second after it (every caller is answered by a check that started after
    its call, so a deploy still sees the alias it just moved)."""
    holder, looked, _, version = _watched_holder(spec)
    watch = threading.Thread(target=holder.watch, daemon=True)
    watch.start()
    try:
        assert holder.check_soon().result(10) is True  # the first check: at once
        assert holder.current.version == "1"
        version[0] = "2"
        futures = [holder.check_soon() for _ in range(20)]
        assert all(f.result(10) is True for f in futures)
        assert holder.current.version == "2"  # the check they joined started after the alias moved
        assert len(looked) == 2 and looked[1] - looked[0] >= 0.99, looked
        for _ in range(3):
            holder.check_soon().result(10)
        gaps = np.diff(looked)
        assert len(looked) == 5 and (gaps >= 0.99).all(), gaps
    finally:
        holder.stop()
        watch.join(10)


def test_a_version_that_failed_to_load_is_not_reloaded_by_every_refresh(spec) -> None:
    """A champion version that failed to load is retried after ``serving.poll_seconds``, not at
    each check a /refresh asks for; the version being served keeps serving meanwhile."""
    holder, _, loads, version = _watched_holder(spec, poll_seconds=60)
    assert holder.refresh() and holder.current.version == "1"
    version[0] = "bad"
    with pytest.raises(RuntimeError, match="cannot load"):
        holder.refresh()
    for _ in range(2):
        with pytest.raises(RuntimeError, match="failed to load"):
            holder.refresh()
    assert loads == ["1", "bad"] and holder.swap_failures == 1 and holder.current.version == "1"
    assert not holder.check() and "cannot load" in (holder.last_error or "")
    version[0] = "2"  # another version is loaded at once
    assert holder.refresh() and holder.current.version == "2" and loads == ["1", "bad", "2"]
    version[0] = "bad"
    with pytest.raises(RuntimeError):
        holder.refresh()  # (remembered only as the last failed version: tried again once it is new)
    assert loads[-1] == "bad" and len(loads) == 4
    holder._failed = ("bad", time.monotonic() - 61, "RuntimeError: cannot load")  # a poll interval later
    with pytest.raises(RuntimeError):
        holder.refresh()
    assert len(loads) == 5


_PARENT = """
import os, signal, sys, time
from daybreak.deploy._serve import ParseWorkers
w = ParseWorkers(1)
if sys.argv[1] == "early":  # the server gone while its worker still imports
    w.procs().submit(os.getpid)
    print(list(w.procs()._processes), flush=True)
    os._exit(0)
w.procs().submit(os.getpid).result(timeout=120)  # the worker is up
print(list(w.procs()._processes), flush=True)
if sys.argv[1] == "close":  # what `daybreak serve` does on SIGTERM: the lifespan closes, uvicorn re-raises it
    w.close()
    os.kill(os.getpid(), signal.SIGTERM)
time.sleep(600)
"""


_GRACEFUL = """
import signal, sys, time
from concurrent.futures.process import BrokenProcessPool
from daybreak.deploy._serve import ParseWorkers
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))  # uvicorn's: finish what is in flight
w = ParseWorkers(1)
w.procs().submit(time.sleep, 0).result(timeout=120)  # the worker is up
parse = w.procs().submit(time.sleep, 3)  # (a big body being parsed)
print("busy", flush=True)
try:
    parse.result(timeout=60)
    print("answered" if stopping else "no signal", flush=True)
except BrokenProcessPool:
    print("worker died", flush=True)
w.close()
"""


def test_a_parse_in_flight_survives_a_sigterm_to_the_servers_group() -> None:
    """A SIGTERM to the server's process group (a service manager's stop, Ctrl-C's SIGINT alike)
    starts uvicorn's graceful shutdown, which answers the requests in flight; it also killed the
    parse workers, so a big body being parsed failed. Workers now leave signals to the server and
    end with it."""
    import os
    import signal
    import subprocess
    import sys

    parent = subprocess.Popen([sys.executable, "-c", _GRACEFUL], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert parent.stdout.readline().strip() == "busy"
        os.killpg(parent.pid, signal.SIGTERM)
        assert parent.stdout.readline().strip() == "answered"
        assert parent.wait(timeout=60) == 0
    finally:
        parent.kill()


_TASKS = """
import os, signal, time


def big_parse(seconds, started=None):
    # a big body's parse: busy a while, then a result bigger than a pipe's buffer
    if started:
        open(started, "w").close()
    time.sleep(seconds)
    return b"x" * (4 << 20)


def oom():
    # a worker the kernel's OOM killer ends mid-parse
    os.kill(os.getpid(), signal.SIGKILL)
"""

_BROKEN = """
import faulthandler, os, sys, time
from concurrent.futures.process import BrokenProcessPool
import tasks
from daybreak.deploy._serve import ParseWorkers
w = ParseWorkers(2)
pool = w.procs()
[f.result(timeout=120) for f in [pool.submit(tasks.big_parse, 0.5) for _ in range(2)]]  # both workers up
started = sys.argv[1]
slow = pool.submit(tasks.big_parse, 20, started)  # one worker parses a big body
deadline = time.monotonic() + 60
while not os.path.exists(started) and time.monotonic() < deadline:
    time.sleep(0.01)
try:
    pool.submit(tasks.oom).result(timeout=120)  # the other dies
except BrokenProcessPool:
    print("broken", flush=True)
w.close()
faulthandler.dump_traceback_later(15, exit=True)  # a hung exit ends here, with exit code 1
sys.exit(0)
"""


def test_a_server_whose_parse_worker_died_still_exits(tmp_path) -> None:
    """A broken pool ends its other workers with SIGTERM, which they ignore (they leave it to the
    server): one parsing a big body then blocked for ever writing its result, and the server's
    exit with it, waiting on the pool's thread. Closing (or replacing) a pool kills its workers."""
    import os
    import subprocess
    import sys

    (tmp_path / "tasks.py").write_text(_TASKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", _BROKEN, str(tmp_path / "started")], capture_output=True, text=True,
                       timeout=180, env=env, cwd=tmp_path)
    assert "broken" in p.stdout
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.monotonic() - t0 < 60


@pytest.mark.parametrize("how", ["close", "kill", "early"])
def test_parse_workers_end_with_the_server(how: str) -> None:
    """A parse worker held both ends of its pool's task pipe, so it outlived a server that was
    killed, or stopped by SIGTERM (uvicorn re-raises it after the lifespan's close, before the pool
    told its workers to stop): one 130 MB process left behind per server stop."""
    import subprocess
    import sys

    import psutil

    parent = subprocess.Popen([sys.executable, "-c", _PARENT, how], stdout=subprocess.PIPE, text=True)
    try:
        workers = [psutil.Process(int(p)) for p in parent.stdout.readline().strip("[]\n").split(",")]
        assert workers
        if how == "kill":
            parent.kill()
        parent.wait(timeout=60)
        _, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"parse workers still running after the server ended ({how})"
    finally:
        parent.kill()
        for w in locals().get("workers", []):
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass


def _split_parsed(rows: int, fields: tuple) -> object:
    import orjson

    from daybreak.deploy import _serve

    raw = orjson.dumps({"dataframe_split": {"columns": ["a", "b"], "data": [[float(k), None] for k in range(rows)]}})
    parsed = _serve.parse_fast(raw, fields, frozenset(), 10**7)
    assert parsed is not None
    parsed.raw = raw
    return parsed


def test_a_reply_that_raises_costs_only_its_request() -> None:
    """A fast-path request's answer goes straight to its reply (``Direct``): a reply that raises
    is logged, and the batch's other requests, a big one's slices included, are answered once
    each (found in review: the error escaped the batch and left the rest unanswered)."""
    import orjson

    from daybreak.deploy import _serve

    fields = (("a", "double", False), ("b", "double", True))

    class Model:
        def predict(self, frame: pd.DataFrame) -> np.ndarray:
            return np.asarray(frame["a"], dtype=float) * 2

    async def main() -> dict[int, list]:
        holder = SimpleNamespace(current=_serve.Loaded("7", Model(), time.time(), fields, lambda d: d["a"] * 2))
        batcher = _serve.Batcher(holder)
        got: dict[int, list] = {}

        def reply(i: int):
            def fn(result: tuple) -> None:
                got.setdefault(i, []).append(result)
                if i == 2:
                    raise RuntimeError("the reply failed")
            return fn

        for i, rows in enumerate([1, 3, 1, _serve.MAX_BATCH_ROWS + 500, 5]):
            batcher.enqueue(_split_parsed(rows, fields), fields, f"r{i}", True, _serve.Direct(reply(i)))
        loop, last = asyncio.get_running_loop(), (0, 0.0)
        while batcher.pending or batcher.big is not None:
            last = await batcher._batch(loop, *last)
        batcher.close()
        return got

    got = asyncio.run(main())
    assert sorted(got) == [0, 1, 2, 3, 4] and all(len(v) == 1 for v in got.values())
    for i, rows in enumerate([1, 3, 1, _serve.MAX_BATCH_ROWS + 500, 5]):
        (status, body), version = got[i][0]
        assert status == 200 and version == "7"
        assert len(orjson.loads(body)["predictions"]) == rows
    direct = _serve.Direct(lambda result: None)
    direct.set_result(((200, b"{}"), "7"))
    calls: list = []
    direct.fn = calls.append
    direct.set_result(((200, b"{}"), "7"))
    assert calls == []  # once only


def test_an_identity_column_that_is_also_an_input_is_carried_in_every_format() -> None:
    """``Parsed.ids`` says a body carries identity columns whichever format and column type
    (found in review: a one-row split body whose identity column is a double input said no)."""
    import orjson

    from daybreak.deploy._serve import parse_fast

    ids = frozenset({"carrier"})
    for kind, value in (("double", 1.0), ("string", "AA")):
        fields = (("carrier", kind, False), ("x", "double", False))
        for body in ({"dataframe_split": {"columns": ["carrier", "x"], "data": [[value, 2.0]]}},
                     {"dataframe_split": {"columns": ["carrier", "x"], "data": [[value, 2.0]] * 2}},
                     {"dataframe_records": [{"carrier": value, "x": 2.0}]}):
            parsed = parse_fast(orjson.dumps(body), fields, ids, 100)
            assert parsed is not None and parsed.ids, (kind, body)
