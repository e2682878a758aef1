"""`daybreak serve --replicas N`: Ray Serve replicas that switch versions together.

A real Serve app (2 replicas on the session's local Ray) under continuous load from several
clients across 5 promotions: no failed request, no client ever sees the version go back, every
replica reaches every promotion, and the deploy step verifies each replica. Then a switch that
cannot happen (a version no replica can load) is aborted: everyone keeps the old version, the
error is on /health. Credentials reach the replicas as a WorkerEnv, never in a Ray log.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from daybreak.deploy import deploy_model
from daybreak.deploy._deploy import DeployError
from daybreak.gate import holdout
from daybreak.infra import registry
from daybreak.infra.context import RunContext

pytest.importorskip("ray.serve")

REPLICAS = 2
CLIENTS = 4
TOKEN = "tok-" + secrets.token_hex(12)
PASSWORD = "pw-" + secrets.token_hex(12)


def _wait(what: str, cond, timeout: float = 120.0, every: float = 0.05):  # generous: CI's 2 cores are shared
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@pytest.fixture(scope="module")
def replicated(cycled: dict, spec, tmp_path_factory: pytest.TempPathFactory):
    """A private copy of the cycled home (its registry gets new versions), served on 2 replicas."""
    from ray import serve

    from daybreak.deploy import serve_replicated

    home = tmp_path_factory.mktemp("replicas") / "home"
    shutil.copytree(cycled["home"], home, symlinks=True)
    saved = {k: os.environ.get(k) for k in ("DAYBREAK_HOME", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                            "DAYBREAK_SERVE_TOKEN", "DAYBREAK_METRICS_PUBLIC")}
    # The credentials a replica needs travel in a WorkerEnv (the SQLite registry ignores them here;
    # the test checks they arrive and never reach a Ray log).
    os.environ.update(DAYBREAK_HOME=str(home), MLFLOW_TRACKING_USERNAME="daybreak", MLFLOW_TRACKING_PASSWORD=PASSWORD,
                      DAYBREAK_SERVE_TOKEN=TOKEN, DAYBREAK_METRICS_PUBLIC="1")
    fast = spec.model_copy(update={"serving": spec.serving.model_copy(update={"port": free_port(),
                                                                               "poll_seconds": 0.3})})
    ctx = RunContext.create("2013-01-04")
    started = time.monotonic()
    running = serve_replicated(fast, ctx, REPLICAS, token=TOKEN, block=False, replica_cpus=0.5,
                               coordinator_options={"prepare_timeout": 60.0, "pause_timeout": 10.0})
    try:
        yield {"url": running.url, "spec": fast, "ctx": ctx, "coordinator": running.coordinator,
               "started_in": time.monotonic() - started}
    finally:
        running.stop()
        serve.shutdown()  # this module started Serve on the session's Ray; nothing else uses it
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _copy_version(cl, name: str, of: str, **tags: str) -> str:
    """A new version of the same files (and digest) as `of`: a promotion target of its own number."""
    mv = cl.get_model_version(name, of)
    return str(cl.create_model_version(name, source=mv.source, run_id=mv.run_id, tags={**mv.tags, **tags}).version)


def _body(spec, ctx, rows: int = 3) -> dict:
    X = holdout(spec, ctx).head(rows)[spec.features.feature_names()]
    return {"dataframe_split": {"columns": list(X.columns),
                                "data": X.astype(object).where(X.notna(), None).values.tolist()}}


def test_promotions_under_load_never_go_back(replicated: dict) -> None:
    url, spec, ctx = replicated["url"], replicated["spec"], replicated["ctx"]
    cl = registry.client(ctx)
    name = spec.model.name
    first = str(registry.alias_version(cl, name, "champion").version)
    info = httpx.get(f"{url}/version").json()
    assert info["committed"] == first and info["replicas"] == dict.fromkeys(info["replicas"], first)
    assert len(info["replicas"]) == REPLICAS and info["expected_replicas"] == REPLICAS
    health = httpx.get(f"{url}/health", headers=AUTH).json()
    assert {"MLFLOW_TRACKING_PASSWORD", "DAYBREAK_SERVE_TOKEN"} <= set(health["credentials"])
    assert httpx.get(f"{url}/ping").status_code == 200
    body = _body(spec, ctx)
    assert httpx.post(f"{url}/invocations", json=body).status_code == 401  # the token, as in one process
    assert httpx.post(f"{url}/replicas/invocations", json=body).status_code == 401
    # DAYBREAK_METRICS_PUBLIC reaches the replicas as the token does: /metrics open to a scraper
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.status_code == 200 and "daybreak_" in metrics.text, metrics.text[:300]

    targets = [_copy_version(cl, name, first) for _ in range(5)]
    assert [int(v) for v in targets] == sorted(int(v) for v in targets)
    order = {v: k for k, v in enumerate([first, *targets])}  # promotion order
    seen: list[list[str]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=60, headers=AUTH) as c:
            while not stop.is_set():
                try:
                    r = c.post(f"{url}/invocations", json=body)
                except httpx.HTTPError as e:
                    failures.append(f"client {k}: {type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    failures.append(f"client {k}: {r.status_code} {r.text[:200]}")
                else:
                    seen[k].append(r.headers["x-model-version"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    deployed = []
    try:
        _wait("every client answered", lambda: all(seen))
        for target in targets:
            cl.set_registered_model_alias(name, "champion", target)
            out = deploy_model(spec, ctx, url=url, timeout=120)
            deployed.append(out)
            assert out["deployed"] is True and out["champion_version"] == target, out
            assert out["replicas"] == REPLICAS and out["parity_rows"] == 50
            # every client gets an answer of the new version before the next promotion
            _wait(f"every client on v{target}", lambda target=target: all(s and s[-1] == target for s in seen))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert failures == []
    for k, versions in enumerate(seen):
        ranks = [order[v] for v in versions]
        assert ranks == sorted(ranks), f"client {k} saw the version go back: {versions}"
        assert set(versions) == set(order), f"client {k} missed a version: {set(order) - set(versions)}"
    import ray

    history = ray.get(replicated["coordinator"].history.remote())
    assert [(h["to"], h["committed"], h["replicas"]) for h in history] == [(v, True, REPLICAS) for v in targets]
    info = httpx.get(f"{url}/version").json()
    assert info["committed"] == targets[-1] and set(info["replicas"].values()) == {targets[-1]}
    print(f"\nreplicated server up in {replicated['started_in']:.1f} s; {sum(map(len, seen))} requests; "
          f"switches took {[h['seconds'] for h in history]} s")


def test_a_version_no_replica_can_load_aborts_the_switch(replicated: dict) -> None:
    """A version whose files do not match its digest: every replica refuses it, the switch is
    aborted, every replica keeps answering with the committed version, /health says why; the
    next good promotion goes through."""
    from daybreak.infra.registry import MODEL_DIGEST_TAG

    url, spec, ctx = replicated["url"], replicated["spec"], replicated["ctx"]
    cl = registry.client(ctx)
    name = spec.model.name
    served = str(registry.alias_version(cl, name, "champion").version)
    _wait(f"v{served} committed", lambda: httpx.get(f"{url}/version").json()["committed"] == served)
    bad = _copy_version(cl, name, served, **{MODEL_DIGEST_TAG: "0" * 64})
    body = _body(spec, ctx)
    cl.set_registered_model_alias(name, "champion", bad)

    def aborted() -> dict | None:
        h = httpx.get(f"{url}/health", headers=AUTH).json()
        return h if h.get("switch_error") and f"v{bad}" in h["switch_error"] else None

    health = _wait("the aborted switch on /health", aborted)
    assert "aborted" in health["switch_error"] and "could not load" in health["switch_error"]
    assert "digest" not in health["switch_error"] or "<path>" not in health["switch_error"]
    info = httpx.get(f"{url}/version").json()
    assert info["committed"] == served and set(info["replicas"].values()) == {served}, info
    for _ in range(10):  # both replicas (the proxy spreads them) answer with the committed version
        r = httpx.post(f"{url}/invocations", json=body, headers=AUTH)
        assert r.status_code == 200 and r.headers["x-model-version"] == served
    each = httpx.post(f"{url}/replicas/invocations", json=body, headers=AUTH).json()["replicas"]
    assert len(each) == REPLICAS and {a["version"] for a in each.values()} == {served}
    with pytest.raises(DeployError, match="not every replica serves"):
        deploy_model(spec, ctx, url=url, timeout=2)

    good = _copy_version(cl, name, served)
    cl.set_registered_model_alias(name, "champion", good)
    out = deploy_model(spec, ctx, url=url, timeout=120)
    assert out["deployed"] is True and out["replicas"] == REPLICAS and out["champion_version"] == good
    assert httpx.get(f"{url}/health", headers=AUTH).json()["switch_error"] is None


def test_no_credential_in_any_ray_file(replicated: dict) -> None:
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaks = []
    for path in session.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if PASSWORD.encode() in data or TOKEN.encode() in data:
                leaks.append(str(path.relative_to(session)))
    assert leaks == []


# -- the protocol in one process: the coordinator and replicas' followers, with fake models --------


class _Ref:
    """What a Ray actor call returns, for an in-process coordinator: awaitable, ``future()``."""

    def __init__(self, coro) -> None:
        import asyncio

        self.task = asyncio.ensure_future(coro)

    def __await__(self):
        return self.task.__await__()

    def future(self):
        return self.task  # asyncio.wrap_future passes an asyncio future through


class _Handle:
    def __init__(self, obj) -> None:
        self.obj = obj

    def __getattr__(self, name: str):
        fn = getattr(self.obj, name)
        return type("M", (), {"remote": staticmethod(lambda *a: _Ref(fn(*a)))})()


def test_one_replica_that_cannot_load_aborts_for_all_and_a_silent_one_times_out(spec) -> None:
    """Three replicas; one cannot load v2: the two others prepared it, yet every one keeps
    serving v1 and answers. v3 loads everywhere: committed. A replica that stops following
    (alive, polling, never acking) aborts the next switch on the timeout instead of stalling it."""
    import asyncio

    import numpy as np
    import pandas as pd

    from daybreak.deploy._replicas import Coordinator, ReplicaSync
    from daybreak.deploy._serve import Batcher, Loaded, ModelHolder, Parsed
    from daybreak.infra.errors import IntegrityError

    fast = spec.model_copy(update={"serving": spec.serving.model_copy(update={"poll_seconds": 0.05})})

    class Model:
        def __init__(self, version: str) -> None:
            self.version = version

        def predict(self, frame):
            return np.full(len(frame), float(self.version))

    class Holder(ModelHolder):
        def __init__(self, refuse: set[str]) -> None:
            super().__init__(fast, None)  # type: ignore[arg-type]
            self.refuse = refuse

        def load(self, version: str) -> Loaded:
            if version in self.refuse:
                raise IntegrityError(f"model version {version}: refusing to load")
            return Loaded(version, Model(version), time.time(), None)

    class Coord(Coordinator):
        alias = "1"

        def champion(self) -> str | None:
            return self.alias

    async def until(cond, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)

    async def ask(batcher: Batcher) -> str:
        (status, _), version = await asyncio.wait_for(
            batcher.submit(Parsed(1, frame=pd.DataFrame({"x": [1.0]})), None), 5)
        assert status == 200
        return version

    async def scenario() -> None:
        coord = Coord(fast, None, 3, prepare_timeout=1.0, pause_timeout=1.0)  # type: ignore[arg-type]
        await coord.start()
        handle = _Handle(coord)
        replicas = []
        for k in range(3):
            holder = Holder({"2"} if k == 1 else set())
            sync = ReplicaSync(handle, holder, f"r{k}")
            await sync.join()
            batcher = Batcher(holder)
            task = asyncio.create_task(batcher.run())
            await sync.start(batcher)
            replicas.append((sync, holder, batcher, task))
        assert [await ask(b) for _, _, b, _ in replicas] == ["1"] * 3

        Coord.alias = "2"
        await until(lambda: coord.switches and coord.switches[-1]["to"] == "2")
        assert coord.switches[-1]["committed"] is False and "replica r1 could not load v2" in coord.last_error
        assert coord.committed == "1" and [h.current.version for _, h, _, _ in replicas] == ["1"] * 3
        assert "could not load v2" in replicas[1][1].last_error
        assert [await ask(b) for _, _, b, _ in replicas] == ["1"] * 3  # nobody left paused

        Coord.alias = "3"
        await until(lambda: coord.committed == "3")
        await until(lambda: [h.current.version for _, h, _, _ in replicas] == ["3"] * 3)
        assert [await ask(b) for _, _, b, _ in replicas] == ["3"] * 3
        assert coord.last_error is None

        replicas[2][0]._tasks[1].cancel()  # r2 still polls (a heartbeat) but no longer follows
        Coord.alias = "4"
        await until(lambda: coord.switches[-1]["to"] == "4")
        assert coord.switches[-1]["committed"] is False
        assert "r2" in coord.last_error and "did not ack" in coord.last_error
        assert coord.committed == "3"
        assert [await ask(b) for _, _, b, _ in replicas[:2]] == ["3"] * 2
        for sync, _, batcher, task in replicas:
            await sync.stop()
            task.cancel()
            batcher.close()
        coord._task.cancel()

    asyncio.run(scenario())


def test_a_missing_cluster_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from daybreak.deploy._replicas import ReplicasError, require_serve

    monkeypatch.setitem(sys.modules, "ray.serve", None)  # import ray.serve now raises ImportError
    with pytest.raises(ReplicasError, match=r"pip install 'daybreak\[cluster\]'"):
        require_serve()


# -- the lease, in one process, with lease timings scaled down 10x ----------------------------------


class _Fleet:
    """An in-process coordinator and replicas (fake models: a model answers its version number),
    each replica behind a handle whose calls `fault(name, args, call)` may replace."""

    def __init__(self, spec, monkeypatch: pytest.MonkeyPatch, evict: float = 1.2) -> None:
        import daybreak.deploy._replicas as R

        for k, v in {"FENCE_AFTER": 0.5, "POLL_HOLD": 0.1, "EVICT_AFTER": evict, "PAUSED_WAIT": 60.0,
                     "UNHEALTHY_AFTER": 60.0}.items():
            monkeypatch.setattr(R, k, v, raising=False)
        self.R, self.evict = R, evict
        self.spec = spec.model_copy(update={"serving": spec.serving.model_copy(update={"poll_seconds": 0.05})})
        self.alias = "1"
        self.coord = self.coordinator()
        self.tasks: list = []

    def coordinator(self, restarted: bool = False):
        fleet = self

        class Coord(self.R.Coordinator):
            def champion(self) -> str | None:
                return fleet.alias

        more = {"restarted": True} if restarted else {}
        return Coord(self.spec, None, 2, prepare_timeout=5.0, pause_timeout=5.0, evict_after=self.evict, **more)

    async def replica(self, rid: str, fault=None):
        import asyncio

        import numpy as np

        from daybreak.deploy._serve import Batcher, Loaded, ModelHolder

        spec = self.spec

        class Model:
            def __init__(self, version: str) -> None:
                self.version = version

            def predict(self, frame):
                return np.full(len(frame), float(self.version))

        class Holder(ModelHolder):
            def __init__(self) -> None:
                super().__init__(spec, None)  # type: ignore[arg-type]

            def load(self, version: str) -> Loaded:
                return Loaded(version, Model(version), time.time(), None)

        fleet = self

        class Faulty:
            def __getattr__(self, name: str):
                def remote(*a):
                    fn = getattr(fleet.coord, name)
                    alt = fault(name, a, fn) if fault is not None else None
                    return _Ref(alt if alt is not None else fn(*a))

                return type("M", (), {"remote": staticmethod(remote)})()

        holder = Holder()
        sync = self.R.ReplicaSync(Faulty(), holder, rid)
        await sync.join()
        batcher = Batcher(holder)
        self.tasks.append(asyncio.create_task(batcher.run()))
        await sync.start(batcher)
        return sync, batcher

    async def a_and_b(self, fault=None) -> tuple:
        """The coordinator started, replica A (its calls through `fault`) and replica B, both on v1."""
        await self.coord.start()
        a = await self.replica("A", fault)
        b = await self.replica("B")
        assert [await _ask(a[1]), await _ask(b[1])] == ["1", "1"]
        return a, b

    async def b_commits_v2_without_a(self) -> None:
        """Once the coordinator dropped A, the alias moves to v2 and B alone commits it."""
        coord = self.coord
        await _until(lambda: "A" not in coord.members)
        self.alias = "2"
        await _until(lambda: coord.committed == "2")

    def close(self, *replicas) -> None:
        for sync, batcher in replicas:
            for t in sync._tasks:
                t.cancel()
            batcher.close()
        for t in self.tasks:
            t.cancel()
        if self.coord._task is not None:
            self.coord._task.cancel()


def _submit(batcher):
    import asyncio

    import pandas as pd

    from daybreak.deploy._serve import Parsed

    return asyncio.ensure_future(batcher.submit(Parsed(1, frame=pd.DataFrame({"x": [1.0]})), None))


async def _until(cond, timeout: float = 20.0) -> None:
    import asyncio

    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def _ask(batcher) -> str:
    import asyncio

    (status, _), version = await asyncio.wait_for(_submit(batcher), 10)
    assert status == 200
    return version


def test_a_replica_whose_polls_fail_fast_stops_answering_before_it_is_dropped(spec, monkeypatch) -> None:
    """A's calls fail at once (Ray's ActorUnavailableError: its link is down): its lease ends, the
    coordinator drops it and commits v2 with B. B answers v2; a request sent to A then is never
    answered with v1: it waits, and once the link is back A rejoins on v2 and answers it."""
    import asyncio

    from ray.exceptions import ActorUnavailableError

    down = [False]

    def fault(name, args, call):
        if down[0] and name in ("poll", "ack", "register"):
            async def fail():
                raise ActorUnavailableError("connection to the actor's node failed", None)
            return fail()
        return None

    async def scenario() -> None:
        fleet = _Fleet(spec, monkeypatch)
        a, b = await fleet.a_and_b(fault)
        down[0] = True
        await fleet.b_commits_v2_without_a()
        await _until(lambda: b[0].holder.current.version == "2")
        assert await _ask(b[1]) == "2"
        late = _submit(a[1])  # answered only once A is back, on v2
        down[0] = False
        (status, _), version = await asyncio.wait_for(late, 10)
        assert (status, version) == (200, "2")
        fleet.close(a, b)

    asyncio.run(scenario())


def test_an_answer_that_arrives_after_the_eviction_does_not_lift_the_fence(spec, monkeypatch) -> None:
    """A poll the coordinator answered (A a member, v1) reaches A only after the coordinator
    dropped A and committed v2 with B: the lease it brings ended long ago, so A answers nothing
    with v1; it rejoins on v2."""
    import asyncio

    late = [False]

    def fault(name, args, call):
        if late[0] and name == "poll":
            async def slow():
                state = await call(*args)  # answered now ...
                await asyncio.sleep(2.0)  # ... delivered later than the eviction (1.2 s)
                return state
            late[0] = False
            return slow()
        return None

    async def scenario() -> None:
        fleet = _Fleet(spec, monkeypatch)
        a, b = await fleet.a_and_b(fault)
        late[0] = True
        await _until(lambda: "A" not in fleet.coord.members)
        queued = _submit(a[1])
        await fleet.b_commits_v2_without_a()
        await _until(lambda: b[0].holder.current.version == "2")
        assert await _ask(b[1]) == "2"
        (status, _), version = await asyncio.wait_for(queued, 10)
        assert (status, version) == (200, "2")
        fleet.close(a, b)

    asyncio.run(scenario())


def test_a_coordinator_that_dies_in_a_switch_never_splits_the_versions(spec, monkeypatch) -> None:
    """The coordinator dies once B has the commit and before A has it. A (paused, holding the
    switch) never resumes on v1: its requests get 503 after PAUSED_WAIT, its health check fails.
    Ray restarts the coordinator: after the old leases ended, both rejoin on the alias's version,
    and A answers again (through the normal release)."""
    import asyncio

    from ray.exceptions import ActorDiedError

    dead = [False]

    def fault(name, args, call):
        async def died():
            raise ActorDiedError()

        if dead[0]:
            return died()
        if name == "poll":
            async def poll():
                state = await call(*args)
                if state.get("phase") == "serving" and state.get("committed") == "2":
                    dead[0] = True  # the coordinator dies before A's answer leaves
                    raise ActorDiedError()
                return state
            return poll()
        return None

    async def scenario() -> None:
        fleet = _Fleet(spec, monkeypatch)
        monkeypatch.setattr(fleet.R, "PAUSED_WAIT", 1.0, raising=False)
        monkeypatch.setattr(fleet.R, "UNHEALTHY_AFTER", 1.0, raising=False)
        await fleet.coord.start()
        a = await fleet.replica("A", fault)
        b = await fleet.replica("B")
        a[1].max_wait = 1.0
        assert [await _ask(a[1]), await _ask(b[1])] == ["1", "1"]
        fleet.alias = "2"
        await _until(lambda: dead[0] and b[0].holder.current.version == "2")
        assert await _ask(b[1]) == "2"
        (status, _), version = await asyncio.wait_for(_submit(a[1]), 10)
        assert status == 503 and version != "1"
        await _until(lambda: a[0].held_since is not None and time.monotonic() - a[0].held_since > 1.0)
        with pytest.raises(RuntimeError):
            a[0].check_health()
        fleet.coord._task.cancel()
        fleet.coord = fleet.coordinator(restarted=True)  # Ray's restart: same handle, new state
        dead[0] = False
        await _until(lambda: a[1].may_start() and a[0].holder.current.version == "2", 20)
        assert await _ask(a[1]) == "2" and await _ask(b[1]) == "2"
        a[0].check_health()
        fleet.close(a, b)

    asyncio.run(scenario())


def test_probes_one_at_a_time_and_not_in_every_poll(spec, monkeypatch) -> None:
    """A probe's body is fetched once by each replica, never carried in the polls; a second
    probe while one runs is refused; /version shows no replica id, phase or error."""
    import asyncio
    import pickle

    async def scenario() -> None:
        fleet = _Fleet(spec, monkeypatch, evict=60.0)
        await fleet.coord.start()
        for r in ("A", "B"):
            await fleet.coord.register(r, "1")
        body = b"x" * (4 << 20)
        first = asyncio.ensure_future(fleet.coord.probe(body, "application/json", 5.0))
        await _until(lambda: fleet.coord.probes)
        assert await fleet.coord.probe(body, "application/json", 5.0) == {"busy": True}
        state = await fleet.coord.poll("A", -1, "1")
        assert len(pickle.dumps(state)) < 10_000
        (pid,) = state["probes"]
        assert (await fleet.coord.probe_body(pid))[0] == body
        first.cancel()

        a = await fleet.replica("C")
        info = await a[0].status(details=False)
        assert set(info) == {"committed", "expected_replicas", "replicas"}
        assert "C" not in info["replicas"] and list(info["replicas"].values()) == ["1", "1", "1"]
        assert a[0].answered.maxlen is not None
        fleet.close(a)

    asyncio.run(scenario())


class _Rows:
    """A prediction log that keeps (version, request id, rows) of what it is given."""

    remote = False

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, int]] = []

    def sampled(self) -> bool:
        return True

    def record(self, version, data, preds, parts) -> None:
        self.rows += [(version, rid, n) for rid, n, _ in parts]


def test_a_big_request_started_over_on_the_new_version_is_logged_once(spec) -> None:
    """A request predicted in slices is paused after its first slice and started over on v2: the
    prediction log gets its rows once, all of v2 (what was answered)."""
    import asyncio
    import threading as th

    import numpy as np

    from daybreak.deploy._serve import MAX_BATCH_ROWS, Batcher, Loaded, ModelHolder, Parsed

    gate = th.Event()

    class Model:
        def __init__(self, version: str) -> None:
            self.version = version

        def predict(self, frame):
            if self.version == "1":
                gate.wait(10)
            return np.full(len(frame), float(self.version))

    fields = (("x", "double", False),)

    async def scenario() -> None:
        holder = ModelHolder(spec, None)  # type: ignore[arg-type]
        holder.current = Loaded("1", Model("1"), time.time(), fields)  # type: ignore[arg-type]
        plog = _Rows()
        batcher = Batcher(holder, plog)  # type: ignore[arg-type]
        task = asyncio.create_task(batcher.run())
        rows = 2 * MAX_BATCH_ROWS + 5
        job = asyncio.ensure_future(batcher.submit(Parsed(rows, columns={"x": np.ones(rows)}), fields))
        await _until(lambda: not batcher._idle.is_set())  # the first slice is being predicted
        paused = asyncio.ensure_future(batcher.pause())
        await asyncio.sleep(0)
        gate.set()
        await paused
        holder.current = Loaded("2", Model("2"), time.time(), fields)  # type: ignore[arg-type]
        batcher.resume()
        (status, _), version = await asyncio.wait_for(job, 10)
        assert (status, version) == (200, "2")
        assert {v for v, _, _ in plog.rows} == {"2"} and sum(n for _, _, n in plog.rows) == rows
        task.cancel()
        batcher.close()

    asyncio.run(scenario())


class _Poisoned:
    """A model whose prediction for a negative x is no JSON value: that request's answer cannot be
    written, and its batch is answered request by request."""

    def predict(self, frame):
        out = frame["x"].to_numpy().astype(object)
        out[out < 0] = object()
        return out


def test_a_big_requests_last_slice_retried_alone_is_answered_once(spec) -> None:
    """A batch holding a big request's last slice and a request whose answer cannot be written
    fails as a batch and is answered request by request: the big request's answer has its rows
    once (its last slice's predictions were kept by the failed batch, then again by the retry)."""
    import numpy as np

    from daybreak.deploy._serve import Batcher, Job, Loaded, ModelHolder

    fields = (("x", "double", False),)
    holder = ModelHolder(spec, None)  # type: ignore[arg-type]
    cur = Loaded("1", _Poisoned(), time.time(), fields)
    batcher = Batcher(holder)  # type: ignore[arg-type]
    try:
        big = Job(fields, {"x": np.arange(10.0)}, None, 10, None, "big")  # type: ignore[arg-type]
        poison = Job(fields, {"x": np.array([-1.0])}, None, 1, None, "poison")  # type: ignore[arg-type]
        assert batcher._predict(cur, [(big, 0, 5)]) == [None]  # its first slice: kept for the answer
        answers = batcher._predict(cur, [(big, 5, 10), (poison, 0, 1)])
        assert answers[0] is not None and answers[0][0] == 200
        assert json.loads(answers[0][1])["predictions"] == list(range(10))
        assert answers[1] is not None and answers[1][0] == 400
    finally:
        batcher.close()


@pytest.mark.parametrize("retried", ["middle", "last"])
def test_a_big_request_whose_slice_was_retried_alone_is_logged_whole(spec, retried: str) -> None:
    """The slices a batch retried request by request answered were not logged: a big request
    answered with 15 rows was logged with 10, and one whose last slice was retried not at all."""
    import numpy as np

    from daybreak.deploy._serve import Batcher, Job, Loaded, ModelHolder

    fields = (("x", "double", False),)
    cur = Loaded("1", _Poisoned(), time.time(), fields)
    plog = _Rows()
    batcher = Batcher(ModelHolder(spec, None), plog)  # type: ignore[arg-type]
    try:
        rows = 15 if retried == "middle" else 10
        big = Job(fields, {"x": np.arange(float(rows))}, None, rows, None, "big", logged=True)  # type: ignore[arg-type]
        poison = Job(fields, {"x": np.array([-1.0])}, None, 1, None, "poison", logged=True)  # type: ignore[arg-type]
        assert batcher._predict(cur, [(big, 0, 5)]) == [None]
        answer = batcher._predict(cur, [(big, 5, 10), (poison, 0, 1)])[0]
        if retried == "middle":
            assert answer is None
            answer = batcher._predict(cur, [(big, 10, 15)])[0]
        assert answer is not None and json.loads(answer[1])["predictions"] == list(range(rows))
        assert sum(n for _, rid, n in plog.rows if rid == "big") == rows and not big.unlogged
    finally:
        batcher.close()


def test_a_lease_that_ended_while_the_loop_was_stalled_starts_no_batch(spec) -> None:
    """The lease is checked before each batch, not by a timer: a replica whose event loop was
    stalled past its lease (no timer could run) starts no batch; the request that waited gets 503
    after max_wait, and a fresh lease lets batches start again."""
    import asyncio

    import numpy as np

    from daybreak.deploy._serve import Batcher, Loaded, ModelHolder

    class Model:
        def predict(self, frame):
            return np.ones(len(frame))

    async def scenario() -> None:
        holder = ModelHolder(spec, None)  # type: ignore[arg-type]
        holder.current = Loaded("1", Model(), time.time(), None)  # type: ignore[arg-type]
        batcher = Batcher(holder)
        batcher.max_wait = 0.3
        task = asyncio.create_task(batcher.run())
        batcher.extend_lease(time.monotonic() + 0.2)
        assert await _ask(batcher) == "1"
        time.sleep(0.3)  # the stall itself: the loop runs nothing meanwhile
        (status, _), _ = await asyncio.wait_for(_submit(batcher), 10)
        assert status == 503
        batcher.extend_lease(time.monotonic() + 5)
        assert await _ask(batcher) == "1"
        task.cancel()
        batcher.close()

    asyncio.run(scenario())


def test_the_probe_route_without_a_token_takes_small_bodies_only(spec, monkeypatch) -> None:
    """Without a token, POST /replicas/invocations takes bodies up to 1 MiB (the deploy step's
    parity rows), with one only for its holder; /version gives no replica id, phase or error."""
    import asyncio

    from daybreak.deploy._serve import Limits, build_app

    quiet = spec.model_copy(update={"monitoring": spec.monitoring.model_copy(
        update={"log": spec.monitoring.log.model_copy(update={"sample_rate": 0.0})})})

    async def scenario() -> None:
        fleet = _Fleet(spec, monkeypatch, evict=60.0)
        await fleet.coord.start()
        sync, batcher = await fleet.replica("A")
        for token, auth, size, want in [(None, None, 2 << 20, 413), (None, None, 1000, 200),
                                        ("t", None, 1000, 401), ("t", "Bearer t", 2 << 20, 200)]:
            app = build_app(quiet, None, sync.holder, Limits.resolve(), token, False, hooks=sync)  # type: ignore[arg-type]
            sync.bind(app)
            sync.app.state.batcher = batcher
            headers = {"content-type": "application/json", **({"authorization": auth} if auth else {})}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
                body = b'{"dataframe_split": {"columns": ["x"], "data": [[1]]}}'.ljust(size)
                r = await c.post("/replicas/invocations", content=body, headers=headers, timeout=10)
                assert r.status_code == want, (token, auth, size, r.text[:200])
                info = (await c.get("/version")).json()
                assert "replica" not in info and "phase" not in info and "A" not in info["replicas"]
                assert info["committed"] == "1" and list(info["replicas"].values()) == ["1"]
        fleet.close((sync, batcher))

    asyncio.run(scenario())


def test_a_restarted_coordinator_runs_one_watch_however_many_first_calls(spec, monkeypatch) -> None:
    """After Ray restarts the coordinator, every replica's poll and register call start() at once,
    while the first champion lookup is still running: each created a watch of its own, so two
    switches ran overlapping on shared state (a reviewer saw v3 committed, then v2)."""
    import asyncio
    import time

    fleet = _Fleet(spec, monkeypatch)
    base = fleet.coordinator(restarted=True)

    class Slow(type(base)):  # an MLflow round trip per lookup
        def champion(self) -> str | None:
            time.sleep(0.2)
            return fleet.alias

    coord = Slow(fleet.spec, None, 2, prepare_timeout=5.0, pause_timeout=5.0, evict_after=fleet.evict, restarted=True)

    async def scenario() -> int:
        await asyncio.gather(*(coord.start() for _ in range(4)))
        watches = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "").endswith("._watch")]
        for t in watches:
            t.cancel()
        return len(watches)

    assert asyncio.run(scenario()) == 1
