"""Serving on several replicas: one Ray Serve deployment, and one version at a time for all of them.

Each replica is the single process's server (``_serve``: the same parsing, limits, batching,
errors and prediction log) behind Ray Serve's HTTP proxy. What changes is who decides the version:
replicas polling the alias each on its own would let a client see v2 from one replica, then v1
from another. Here one ``Coordinator`` (a Ray actor) polls the alias, and a promotion is a barrier
over every registered replica:

1. PREPARE: each replica loads and warms the new version while serving the old one, and acks (or
   says it could not load it).
2. PAUSE: each replica starts no new predict batch, lets the batch in flight be answered, and
   acks. Requests arriving meanwhile queue (answered after; 503 only past ``PAUSED_WAIT``).
3. COMMIT: every replica swaps and resumes.

So no answer from the new version leaves before every replica has stopped answering with the old
one, and a client sending its requests one after another never sees the version go back (unless
the alias itself goes back: a rollback). A replica that cannot load the new version, or does not
ack within the timeout, aborts the switch: everyone resumes on the old version, the error is on
/health, and the next poll tries again (backing off while it fails).

Replicas learn of every change by long-polling the coordinator (an awaitable actor call, from the
replica's event loop; one at a time, given up after ``POLL_HOLD + 2 * EVICT_AFTER``); each poll is
also a heartbeat. A replica starts by loading the committed version and registering with it (never
during a switch), so a new or restarted one joins the version everyone serves.

Membership is a lease, and the lease is what makes a cut-off replica safe:

* The coordinator records a poll's *arrival* and drops a replica whose last poll arrived more than
  ``EVICT_AFTER`` ago; only then may a switch commit without it.
* The replica's ``Batcher`` starts no batch at or after ``lease_until`` (a synchronous check of
  ``time.monotonic()`` before each batch: a stalled event loop cannot miss it). ``lease_until`` is
  the *send* time of the last call whose answer was fresh (this replica a member, from the
  coordinator incarnation it registered with, an epoch no older than one already taken) plus
  ``FENCE_AFTER``; the send time of ``register`` starts it. Errors (fail-fast or not), hung calls
  and answers that are not fresh never extend it.
* So for any answer taken, send < arrival, and the lease (at most send + FENCE_AFTER) ends before
  the coordinator can drop the replica (at least arrival + EVICT_AFTER), whatever the delays: a
  late answer brings a lease that ended already. Once dropped, the replica sees ``member: False``
  and rejoins on the committed version before its batches start again. (Assumed: a batch started
  within the lease is answered within ``EVICT_AFTER - FENCE_AFTER`` plus a switch's prepare and
  pause, and clocks run at the same rate.)

If the coordinator dies, Ray restarts it (``max_restarts=-1``: same handle, state lost). The new
incarnation reads the alias as committed and takes no member for ``EVICT_AFTER`` after it starts:
every lease the old one granted was sent before it died, so has ended by then. Every replica sees
``member: False`` (or a new incarnation), rejoins on the committed version, and is released
through the normal path (its ``switch`` hold included). A replica paused in a switch whose
outcome it did not learn never resumes on the old version on its own. Meanwhile requests wait;
one that waited ``PAUSED_WAIT`` gets 503 with Retry-After, and Serve's health check
(``check_health``) fails on a replica that started no batch for ``UNHEALTHY_AFTER``, so Serve
replaces it. The proxy's ``request_timeout_s`` is ``REQUEST_TIMEOUT``.

``/version`` (anyone) shows the committed version, the versions served and the expected count,
from the replica's last poll answer (no actor call per request); replica ids, phase and errors
are on ``/health`` for the token's holder. ``POST /replicas/invocations`` runs one body through
every registered replica's own ``/invocations`` path and model (the deploy step's parity check on
each replica): with a token only for its holder, without one for bodies up to
``PROBE_MAX_BYTES``; one probe at a time; the polls carry only its id and each replica fetches
the body once.

Credentials reach the replicas and the coordinator as a ``WorkerEnv`` argument (Ray's object
store), never through a ``runtime_env``, whose variables Ray logs in clear.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from daybreak.deploy._metrics import PUBLIC_ENV
from daybreak.deploy._predlog import use_system_allocator
from daybreak.deploy._serve import (
    CONTENT_TYPES,
    Batcher,
    Hooks,
    Invocations,
    Limits,
    Loaded,
    ModelHolder,
    build_app,
    content_type,
    error,
)
from daybreak.infra import registry
from daybreak.infra.cluster import check_shared_nothing
from daybreak.infra.compute import WorkerEnv
from daybreak.infra.context import RunContext
from daybreak.infra.errors import DaybreakError, redact
from daybreak.spec import Spec

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

POLL_HOLD = 1.0
"""A long poll returns after this many seconds at the latest (so it is a heartbeat too)."""
FENCE_AFTER = 5.0
"""A replica that has not heard from the coordinator for this long starts no batch until it has."""
EVICT_AFTER = 12.0
"""The coordinator drops a replica not heard from for this long: more than FENCE_AFTER plus a poll
and its round trip, so the replica has fenced itself before."""
PREPARE_TIMEOUT = 180.0
"""Seconds every replica has to load and warm up a new version."""
PAUSE_TIMEOUT = 30.0
"""Seconds every replica has to finish the batch it is predicting."""
PAUSED_WAIT = 60.0
"""A request waiting this long while batches are held (paused or fenced) is answered 503 with
Retry-After: far above a normal switch's pause (the batch in flight), and below the proxy's timeout."""
UNHEALTHY_AFTER = PAUSE_TIMEOUT + EVICT_AFTER
"""Serve's health check fails on a replica that has started no batch (paused or fenced) this long,
so Serve replaces it: a normal pause ends within PAUSE_TIMEOUT, and a restarted coordinator takes
members again EVICT_AFTER after it starts."""
REQUEST_TIMEOUT = 2 * PAUSED_WAIT
"""Serve's HTTP proxy gives up on a request after this many seconds (HTTPOptions.request_timeout_s)."""
PROBE_TIMEOUT = 60.0
PROBE_MAX_BYTES = 1 << 20
"""Without a token, ``POST /replicas/invocations`` takes bodies up to this size (1 MiB)."""
MAX_BACKOFF = 300.0
TOKEN_ENV = "DAYBREAK_SERVE_TOKEN"
APP_NAME = "daybreak"

CLUSTER_EXTRA = "serving on several replicas needs Ray Serve: pip install 'daybreak[cluster]'"


class ReplicasError(DaybreakError):
    """The replicated server could not start."""


class _Signal:
    """Wakes every waiter once per ``fire`` (an event that is replaced, never cleared under a waiter)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._event.wait(), max(timeout, 0.0))
        except TimeoutError:
            pass


@dataclass
class _Member:
    version: str | None
    seen: float  # loop time of its last poll's arrival


@dataclass
class _Probe:
    payload: tuple[bytes, str]
    members: set[str]
    results: dict[str, Any] = field(default_factory=dict)


class Coordinator:
    """The one decider of the version every replica serves (run as a Ray actor; plain asyncio
    otherwise, which the tests use). See the module docstring for the protocol."""

    def __init__(self, spec: Spec, ctx: RunContext, replicas: int, env: WorkerEnv | None = None,
                 prepare_timeout: float = PREPARE_TIMEOUT, pause_timeout: float = PAUSE_TIMEOUT,
                 evict_after: float = EVICT_AFTER, restarted: bool | None = None) -> None:
        if env is not None:
            env.apply()
        if restarted is None:
            restarted = False
            try:
                import ray

                in_actor = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
            except Exception:
                in_actor = False  # (not under Ray: plain asyncio, as the tests run it)
            if in_actor:  # Ray restarted it (its state is gone)?
                try:
                    restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
                except Exception:  # cannot tell: wait out the leases a previous incarnation may have granted
                    restarted = True
        self.restarted = bool(restarted)
        self.incarnation = uuid.uuid4().hex
        self._ready_at = 0.0  # register accepts no one before (loop time): set in start()
        self._probe_lock = asyncio.Lock()
        self._start_lock, self._switch_lock = asyncio.Lock(), asyncio.Lock()
        self.spec, self.ctx, self.expected = spec, ctx, replicas
        self.prepare_timeout, self.pause_timeout, self.evict_after = prepare_timeout, pause_timeout, evict_after
        self.committed: str | None = None
        self.phase, self.target, self.switch, self.epoch = "serving", None, 0, 0
        self.members: dict[str, _Member] = {}
        self.acks: dict[str, tuple[str, str | None]] = {}  # replica -> (step, error) in the current switch
        self.probes: dict[str, _Probe] = {}
        self.last_error: str | None = None
        self.switches: list[dict[str, Any]] = []  # committed and aborted switches, newest last (at most 20)
        self._changed, self._acked = _Signal(), _Signal()
        self._idle = asyncio.Event()
        self._idle.set()
        self._failures: dict[str, tuple[int, float]] = {}  # target -> (aborted switches, retry after)
        self._client: Any = None
        self._task: asyncio.Task | None = None

    # -- the registry ------------------------------------------------------------------------
    def champion(self) -> str | None:
        self._client = self._client or registry.client(self.ctx)
        mv = registry.alias_version(self._client, self.spec.model.name, self.spec.promotion.alias)
        return None if mv is None else str(mv.version)

    async def start(self) -> str | None:
        """Read the champion once (committed at once: no replica serves yet), then watch it."""
        # One watch, however many first calls arrive while the lookup runs (after a restart every
        # replica's poll and register calls start() at once): two watches would run overlapping
        # switches on shared state.
        async with self._start_lock:
            if self._task is None:
                if self.restarted:  # every lease the previous incarnation granted has ended by then
                    self._ready_at = asyncio.get_running_loop().time() + self.evict_after
                try:
                    self.committed = await asyncio.to_thread(self.champion)
                except Exception as e:
                    self.last_error = redact(f"champion lookup failed: {type(e).__name__}: {e}")
                    log.warning("%s", self.last_error)
                self._task = asyncio.create_task(self._watch())
        return self.committed

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.spec.serving.poll_seconds)
            try:
                await self._check()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the watch (replicas keep their version)
                log.exception("coordinator: checking the champion failed")

    async def _check(self) -> None:
        """One poll of the alias; a switch when it moved (with back-off while switches to it fail)."""
        loop = asyncio.get_running_loop()
        self._evict()
        try:
            target = await asyncio.to_thread(self.champion)
        except Exception as e:  # keep serving; try again next poll
            self.last_error = redact(f"champion lookup failed: {type(e).__name__}: {e}")
            return
        if target is None or target == self.committed:
            if target is not None:  # nothing pending (the alias may have come back from a bad version)
                self._failures.clear()
                self.last_error = None
            return
        fails, retry_at = self._failures.get(target, (0, 0.0))
        if loop.time() < retry_at:
            return
        if await self.switch_to(target):
            self._failures.clear()
        else:
            backoff = min(self.spec.serving.poll_seconds * 2 ** (fails + 1), MAX_BACKOFF)
            self._failures = {target: (fails + 1, loop.time() + backoff)}

    # -- the switch ----------------------------------------------------------------------------
    async def switch_to(self, target: str) -> bool:
        """Prepare, pause, commit: every registered replica serves `target`, or (aborted) every one
        keeps serving the committed version. Returns whether it committed. One switch at a time."""
        async with self._switch_lock:
            return await self._switch_to(target)

    async def _switch_to(self, target: str) -> bool:
        loop = asyncio.get_running_loop()
        started, old = loop.time(), self.committed
        self.switch += 1
        self.acks = {}
        members = set(self.members)
        self._idle.clear()
        why: str | None = None
        try:
            self._publish(phase="prepare", target=target)
            why = await self._barrier(members, "prepared", self.prepare_timeout)
            if why is None:
                self._publish(phase="pause")
                why = await self._barrier(members, "paused", self.pause_timeout)
            if why is None:
                self.committed = target
                self.last_error = None
                log.info("switched %d replicas from v%s to v%s", len(members), old, target)
            else:
                self.last_error = f"switch from v{old} to v{target} aborted: {why}; every replica still serves v{old}"
                log.warning("%s", self.last_error)
        finally:
            self._publish(phase="serving", target=None)
            self._idle.set()
        self.switches = [*self.switches[-19:], {"from": old, "to": target, "committed": why is None,
                                                  "replicas": len(members), "seconds": round(loop.time() - started, 3),
                                                  "error": why}]
        return why is None

    async def _barrier(self, members: set[str], step: str, timeout: float) -> str | None:
        """None once every member still registered acked `step`; else why the switch aborts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            failed = {r: e for r, (s, e) in self.acks.items() if s == "failed" and r in members}
            if failed:
                return "; ".join(f"replica {r} could not load v{self.target}: {e}" for r, e in sorted(failed.items()))
            waiting = sorted(r for r in members if r in self.members and self.acks.get(r, ("", None))[0] != step)
            if not waiting:
                return None
            if loop.time() >= deadline:
                return f"replica(s) {', '.join(waiting)} did not ack {step} within {timeout:g} s"
            await self._acked.wait(min(deadline - loop.time(), POLL_HOLD))
            self._evict()

    def _publish(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self, k, v)
        self.epoch += 1
        self._changed.fire()

    def _state(self) -> dict[str, Any]:
        return {"member": True, "incarnation": self.incarnation, "epoch": self.epoch, "committed": self.committed,
                "phase": self.phase, "target": self.target, "switch": self.switch, "probes": list(self.probes),
                "status": self._status()}

    def _evict(self) -> None:
        now = asyncio.get_running_loop().time()
        for rid, m in list(self.members.items()):
            if now - m.seen > self.evict_after:
                del self.members[rid]
                log.warning("replica %s not heard from for %.0f s: dropped (it fenced itself before)",
                            rid, now - m.seen)
                self._acked.fire()

    # -- what replicas call ----------------------------------------------------------------------
    async def register(self, rid: str, version: str | None) -> dict[str, Any]:
        """Join with `version` loaded: accepted when it is the committed one and no switch runs
        (a switch in progress is waited for); else the version to load before asking again."""
        await self.start()  # a restarted incarnation starts itself here
        loop = asyncio.get_running_loop()
        while loop.time() < self._ready_at:
            await asyncio.sleep(self._ready_at - loop.time())
        while not self._idle.is_set():
            await self._idle.wait()
        if version != self.committed:
            return {"member": False, "committed": self.committed}
        self.members[rid] = _Member(version, asyncio.get_running_loop().time())
        log.info("replica %s joined, serving v%s", rid, version)
        return self._state()

    async def poll(self, rid: str, epoch: int, version: str | None) -> dict[str, Any]:
        """The state once it is newer than `epoch`, or after POLL_HOLD seconds (a heartbeat)."""
        await self.start()
        m = self.members.get(rid)
        if m is None:
            return {"member": False, "committed": self.committed}
        m.seen, m.version = asyncio.get_running_loop().time(), version
        if epoch == self.epoch:
            await self._changed.wait(POLL_HOLD)
        if rid not in self.members:
            return {"member": False, "committed": self.committed}
        return self._state()

    async def ack(self, rid: str, switch: int, step: str, err: str | None = None) -> None:
        if switch == self.switch and rid in self.members:
            self.acks[rid] = (step, err)
            self._acked.fire()

    async def probe_body(self, pid: str) -> tuple[bytes, str] | None:
        """The body of probe `pid` (each replica fetches it once), None once it is over."""
        probe = self.probes.get(pid)
        return None if probe is None else probe.payload

    async def answer(self, rid: str, pid: str, result: dict[str, Any]) -> None:
        probe = self.probes.get(pid)
        if probe is not None:
            probe.results[rid] = result
            self._acked.fire()

    async def leave(self, rid: str) -> None:
        if self.members.pop(rid, None) is not None:
            log.info("replica %s left", rid)
            self._acked.fire()

    # -- what the deploy step and /version read ------------------------------------------------
    async def probe(self, body: bytes, mime: str, timeout: float = PROBE_TIMEOUT) -> dict[str, Any]:
        """`body` through every registered replica's /invocations; each one's answer and version.
        One probe at a time: {"busy": True} while another runs."""
        if self._probe_lock.locked():
            return {"busy": True}
        async with self._probe_lock:
            return await self._probe(body, mime, timeout)

    async def _probe(self, body: bytes, mime: str, timeout: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        pid = uuid.uuid4().hex
        probe = self.probes[pid] = _Probe((body, mime), set(self.members))
        self._publish()
        deadline = loop.time() + timeout
        try:
            while (waiting := [r for r in probe.members if r in self.members and r not in probe.results]) \
                    and loop.time() < deadline:
                await self._acked.wait(min(deadline - loop.time(), POLL_HOLD))
        finally:
            del self.probes[pid]
        replicas = {r: probe.results.get(r, {"status": None, "version": None,
                                             "error": f"no answer within {timeout:g} s"}) for r in waiting} \
            | probe.results
        return {**await self.status(), "replicas": replicas}

    async def status(self) -> dict[str, Any]:
        return self._status()

    def _status(self) -> dict[str, Any]:
        return {"committed": self.committed, "phase": self.phase, "target": self.target,
                "expected_replicas": self.expected,
                "replicas": {r: m.version for r, m in sorted(self.members.items())},
                "switch_error": self.last_error}

    async def history(self) -> list[dict[str, Any]]:
        return list(self.switches)


class ReplicaSync(Hooks):
    """A replica's side of the protocol: joins, follows the coordinator, answers probes."""

    def __init__(self, coordinator: Any, holder: ModelHolder, rid: str, credentials: list[str] | None = None) -> None:
        self.coord, self.holder, self.rid = coordinator, holder, rid
        self.credentials = credentials or []  # the names of the variables its WorkerEnv set, never their values
        self.epoch = -1
        self.incarnation: str | None = None  # the coordinator's (a restarted one has a new one)
        self.lease_until = 0.0  # time.monotonic(): no batch starts at or after (see the module docstring)
        self.holds: set[str] = set()  # why batches are paused: "switch", "rejoin"
        self.held_since: float | None = None  # time.monotonic() since when `holds` is not empty
        self.prepared: Loaded | None = None
        self.failed: tuple[int, str] | None = None  # (switch, version) this replica could not load
        self.coord_error: str | None = None
        self.answered: deque[str] = deque(maxlen=16)  # the probes this replica answered, newest last
        self._latest: dict[str, Any] | None = None
        self._new = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._probing: set[asyncio.Task] = set()
        self.app: Invocations | None = None
        self.batcher: Batcher | None = None

    def _version(self) -> str | None:
        cur = self.holder.current
        return cur.version if cur else None

    async def _call(self, method: str, *args: Any) -> Any:
        return await getattr(self.coord, method).remote(*args)

    def _lease(self, sent: float, state: dict[str, Any]) -> bool:
        """Take a coordinator's answer to a call sent at `sent`: whether it is fresh (this replica a
        member, the coordinator's incarnation it registered with, no older than what it has seen).
        A fresh answer extends the lease to `sent` + FENCE_AFTER; nothing else ever does."""
        if not state.get("member") or state.get("incarnation") != self.incarnation or state["epoch"] < self.epoch:
            return False
        self.epoch = state["epoch"]
        self.lease_until = max(self.lease_until, sent + FENCE_AFTER)
        if self.batcher is not None:
            self.batcher.extend_lease(self.lease_until)
        return True

    async def join(self) -> None:
        """Load the committed version and register with it (before this replica takes requests)."""
        while True:
            sent = time.monotonic()
            res = await self._call("register", self.rid, self._version())
            if res["member"]:
                break
            self.holder.install(await asyncio.to_thread(self.holder.load, res["committed"]), refreeze=False)
        self.incarnation, self.epoch = res["incarnation"], -1
        self._lease(sent, res)
        self._latest = res

    # -- Hooks ---------------------------------------------------------------------------------
    def bind(self, app: Invocations) -> None:
        self.app = app

    async def start(self, batcher: Batcher) -> None:
        self.batcher = batcher
        batcher.max_wait = PAUSED_WAIT
        batcher.extend_lease(self.lease_until)
        self._tasks = [asyncio.create_task(self._poll(), name="coordinator-poll"),
                       asyncio.create_task(self._follow(), name="coordinator-follow")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        try:
            await asyncio.wait_for(self._call("leave", self.rid), 5)
        except Exception:  # the coordinator may be gone first
            pass

    async def status(self, details: bool) -> dict[str, Any]:
        """From the last poll's answer (no call to the coordinator per request). Without `details`
        (/version, anyone): the committed version, the versions served and how many are expected."""
        st = (self._latest or {}).get("status") or {}
        versions = sorted(st.get("replicas", {}).values(), key=str)
        out: dict[str, Any] = {"committed": st.get("committed"), "expected_replicas": st.get("expected_replicas"),
                               "replicas": {str(k + 1): v for k, v in enumerate(versions)}}
        if details:
            out.update(replica=self.rid, phase=st.get("phase"), target=st.get("target"),
                       members=st.get("replicas"), switch_error=st.get("switch_error"),
                       coordinator_error=self.coord_error, credentials=self.credentials,
                       serving=self.batcher.may_start() if self.batcher is not None else False)
        return out

    def check_health(self) -> None:
        """Serve's health check: fails on a replica that has started no batch for UNHEALTHY_AFTER
        seconds (paused, or fenced with no word from the coordinator), so Serve replaces it."""
        now = time.monotonic()
        if self.held_since is not None and now - self.held_since > UNHEALTHY_AFTER:
            raise RuntimeError(f"replica {self.rid} paused for {now - self.held_since:.0f} s")
        if now - self.lease_until > UNHEALTHY_AFTER - FENCE_AFTER:
            raise RuntimeError(f"replica {self.rid} has had no word from the coordinator for "
                               f"{now - self.lease_until + FENCE_AFTER:.0f} s")

    def routes(self, api: FastAPI, app: Invocations) -> None:
        def answer(status: int, message: str) -> Any:
            headers = {"Retry-After": "1"} if status == 503 else None
            return JSONResponse(json.loads(error(status, message)[1]), status_code=status, headers=headers)

        @api.post("/replicas/invocations")
        async def each_replica(request: Request) -> Any:
            """The body through every registered replica's /invocations (and model). With a token,
            only for its holder; without one, bodies up to PROBE_MAX_BYTES. One at a time."""
            if app.expected and not app.authorized(request.scope["headers"]):
                return answer(401, "missing or wrong bearer token")
            limit = app.lim.max_body_bytes if app.expected else min(app.lim.max_body_bytes, PROBE_MAX_BYTES)
            mime = content_type(request.headers.get("content-type", "").encode("latin-1"))
            if mime is None:
                return answer(415, f"Content-Type must be one of {', '.join(CONTENT_TYPES)}")
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return answer(413, f"body over {limit} bytes")
                chunks.append(chunk)
            try:
                out = await self._call("probe", b"".join(chunks), mime)
            except Exception as e:
                log.warning("probe failed: %s", redact(e))
                return answer(503, "the replicas' coordinator did not answer; retry shortly")
            if out.get("busy"):
                return answer(503, "another probe of every replica is running; retry shortly")
            return JSONResponse(out)

    # -- following the coordinator ------------------------------------------------------------
    async def _hold(self, why: str) -> None:
        assert self.batcher is not None
        if not self.holds:
            self.held_since = time.monotonic()
        self.holds.add(why)
        await self.batcher.pause()

    def _release(self, why: str) -> None:
        assert self.batcher is not None
        if why in self.holds:
            self.holds.discard(why)
            if not self.holds:
                self.held_since = None
                self.batcher.resume()

    async def _poll(self) -> None:
        """Long-poll the coordinator, one call at a time. Errors and answers that are not fresh
        never extend the lease: the batcher stops starting batches FENCE_AFTER after the send time
        of the last fresh answer, whatever happens to the calls (fail fast, hang, arrive late)."""
        while True:
            sent = time.monotonic()
            try:
                fut = asyncio.wrap_future(self.coord.poll.remote(self.rid, self.epoch, self._version()).future())
                state = await asyncio.wait_for(fut, POLL_HOLD + 2 * EVICT_AFTER)  # a hung call is given up
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.coord_error = redact(f"coordinator poll failed: {type(e).__name__}: {e}")[:300]
                log.warning("replica %s: %s", self.rid, self.coord_error)
                await asyncio.sleep(POLL_HOLD / 5)
                continue
            if not state["member"] or state.get("incarnation") != self.incarnation:
                await self._rejoin()
                continue
            if not self._lease(sent, state):
                continue  # an older answer than one already taken
            self.coord_error = None
            self._latest = state
            self._new.set()
            for pid in state["probes"]:
                if pid not in self.answered:
                    self.answered.append(pid)
                    task = asyncio.create_task(self._probe(pid))
                    self._probing.add(task)
                    task.add_done_callback(self._probing.discard)

    async def _rejoin(self) -> None:
        """Dropped by the coordinator (not heard from), or a restarted coordinator: serve nothing
        until this replica serves the committed version again and is registered with it. (Its
        lease ended before the coordinator dropped it; a restarted coordinator takes members
        only once every lease the previous one granted has ended.)"""
        log.warning("replica %s is not a member of the coordinator: rejoining", self.rid)
        await self._hold("rejoin")
        self.prepared, self.failed = None, None
        while True:
            try:
                await self.join()
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.coord_error = redact(f"rejoining failed: {type(e).__name__}: {e}")[:300]
                log.warning("replica %s: %s", self.rid, self.coord_error)
                await asyncio.sleep(POLL_HOLD)
        self.coord_error = None
        self.holds.discard("switch")  # registered on the committed version: whatever switch it was in is over
        self._release("rejoin")

    async def _follow(self) -> None:
        while True:
            await self._new.wait()
            self._new.clear()
            state = self._latest
            if state is None:
                continue
            try:
                await self._apply(state)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replica %s: following the coordinator failed", self.rid)

    async def _apply(self, state: dict[str, Any]) -> None:
        phase, target, sid, committed = state["phase"], state["target"], state["switch"], state["committed"]
        if state.get("incarnation") != self.incarnation:
            return  # from a coordinator since restarted (this replica rejoined the new one)
        if phase in ("prepare", "pause"):
            if self.failed == (sid, target):
                return  # said so already
            if self.prepared is None or self.prepared.version != target:
                try:
                    self.prepared = await asyncio.to_thread(self.holder.load, target)
                except Exception as e:
                    err = redact(f"{type(e).__name__}: {e}")[:500]
                    self.holder.last_error = f"could not load v{target}: {err}"
                    self.failed = (sid, target)
                    log.warning("replica %s %s", self.rid, self.holder.last_error)
                    await self._call("ack", self.rid, sid, "failed", err)
                    return
            if state.get("incarnation") != self.incarnation:
                return  # a coordinator since restarted: its switch is over
            if phase == "prepare":
                await self._call("ack", self.rid, sid, "prepared")
            else:
                await self._hold("switch")
                await self._call("ack", self.rid, sid, "paused")
            return
        # serving: committed (a switch done) or the old version (a switch aborted)
        if self._version() != committed and committed is not None:
            if self.prepared is not None and self.prepared.version == committed:
                self.holder.install(self.prepared, refreeze=False)
            else:  # not for a member that acked the pause; a safety net
                await self._hold("switch")
                loaded = await asyncio.to_thread(self.holder.load, committed)
                if state.get("incarnation") != self.incarnation:
                    return  # rejoined meanwhile (on what the new coordinator committed)
                self.holder.install(loaded, refreeze=False)
            self.holder.last_error = None
        if self.prepared is not None and self.prepared.version == committed:
            self.prepared = None
        switched = "switch" in self.holds
        self._release("switch")
        if switched and self.holder.freeze_gc:
            self.holder.refreeze()  # after the others resumed too: not inside the pause

    async def _probe(self, pid: str) -> None:
        """The coordinator's body (fetched once) through this replica's own /invocations path and model."""
        import orjson

        assert self.app is not None
        try:
            payload = await self._call("probe_body", pid)
        except Exception:
            log.warning("replica %s: could not fetch probe %s", self.rid, pid[:12])
            return
        if payload is None:
            return  # over already
        body, mime = payload
        headers = [(b"content-type", mime.encode()), (b"content-length", b"%d" % len(body))]
        if self.app.expected:
            headers.append((b"authorization", self.app.expected))
        scope = {"type": "http", "method": "POST", "path": "/invocations", "headers": headers}

        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            # (not logged: a check through every replica is no traffic, and would be logged N times)
            status, raw, served = await self.app.answer(scope, receive, f"probe-{pid[:12]}", logged=False)
            result = {"status": status, "version": served or self._version(), **orjson.loads(raw)}
        except Exception as e:
            result = {"status": 500, "version": self._version(), "error": redact(f"{type(e).__name__}: {e}")[:300]}
        try:
            await self._call("answer", self.rid, pid, result)
        except Exception:
            log.warning("replica %s: could not hand its probe answer to the coordinator", self.rid)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return uuid.uuid4().hex[:8]


def _deployment() -> Any:
    """The Serve deployment class (built here: Ray Serve is an optional extra)."""
    from ray import serve

    @serve.ingress()
    class Replica:
        async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
                self, spec: Spec, ctx: RunContext, coordinator: Any, env: WorkerEnv, limits: dict[str, Any],
                freeze_gc: bool = True) -> None:
            env.apply()
            use_system_allocator()
            token = os.environ.get(TOKEN_ENV) or None
            holder = ModelHolder(spec, ctx, freeze_gc)
            await asyncio.to_thread(registry.setup_tracking, ctx, spec.name)
            self.sync = ReplicaSync(coordinator, holder, _replica_id(), env.names())
            await self.sync.join()
            self._app = build_app(spec, ctx, holder, Limits.resolve(**limits), token, freeze_gc, hooks=self.sync)

        def __serve_build_asgi_app__(self) -> Any:
            return self._app

        def check_health(self) -> None:
            self.sync.check_health()

    return Replica


def require_serve() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        raise ReplicasError(CLUSTER_EXTRA) from None


@dataclass
class Replicated:
    """A running replicated server (``serve_replicated``): its URL, coordinator and app."""

    url: str
    app_name: str
    coordinator: Any

    def stop(self) -> None:
        """Delete the Serve app and the coordinator (Serve itself and Ray stay up)."""
        import ray
        from ray import serve

        try:
            serve.delete(self.app_name)
        finally:
            ray.kill(self.coordinator)


def serve_replicated(spec: Spec, ctx: RunContext, replicas: int, host: str | None = None, port: int | None = None,
                     token: str | None = None, address: str | None = None, replica_cpus: float = 1.0,
                     block: bool = True, app_name: str = APP_NAME, coordinator_options: dict | None = None,
                     **limits: Any) -> Replicated:
    """Serve the champion on `replicas` Ray Serve replicas behind Serve's HTTP proxy on
    `host`:`port`, on the Ray cluster at `address` (``RAY_ADDRESS``; default a local Ray). With
    `block`, serve until interrupted, then delete the app. Serve's proxy listens where Serve was
    first started on the cluster: an existing Serve keeps its host and port."""
    if replicas < 2:
        raise ValueError("serve_replicated needs at least 2 replicas (one is 'daybreak serve' alone)")
    require_serve()
    import ray
    from ray import serve

    from daybreak.infra.compute import ensure_ray

    lim = Limits.resolve(**limits)  # a bad limit fails here, not in every replica
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # The token, and whether /metrics is open without it (each replica answers /metrics itself)
    public = {PUBLIC_ENV: v} if (v := os.environ.get(PUBLIC_ENV)) else {}
    env = WorkerEnv.capture(({TOKEN_ENV: token} if token else {}) | public)
    # Replicas on other nodes read the registry and write the prediction log: no local paths.
    ctx = replace(ctx, ray_address=address or ctx.ray_address)
    check_shared_nothing(ctx)
    ensure_ray(address)
    registry.setup_tracking(ctx, spec.name)
    host, port = host or spec.serving.host, port or spec.serving.port
    coordinator: Any = ray.remote(Coordinator).options(num_cpus=0, max_restarts=-1).remote(
        spec, ctx, replicas, env, **(coordinator_options or {}))
    ray.get(coordinator.start.remote())
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": REQUEST_TIMEOUT})
    deployment = serve.deployment(name="replica", num_replicas=replicas,
                                  max_ongoing_requests=max(lim.max_connections, 16),
                                  ray_actor_options={"num_cpus": replica_cpus})(_deployment())
    running = Replicated(f"http://{host}:{port}", app_name, coordinator)
    try:
        serve.run(deployment.bind(spec, ctx, coordinator, env, {k: getattr(lim, k) for k in lim.__dataclass_fields__}),
                  name=app_name, route_prefix="/")
    except BaseException:
        running.stop()
        raise
    log.info("serving %s on %d replicas at %s", spec.model.name, replicas, running.url)
    if not block:
        return running
    def _interrupt(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
    return running
