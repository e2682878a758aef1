"""Deploy: make sure the serving endpoint serves the champion, and serves it faithfully.

``daybreak serve`` watches the champion alias and hot-swaps by itself; this step first asks it to
check the alias now (``POST /refresh``, with the token when ``DAYBREAK_SERVE_TOKEN`` is set; a
server without it answers 404 and its poll is waited for), waits until the endpoint reports the
champion's version, then sends a sample of the holdout and requires the served predictions to
equal offline predictions of the same version.

A replicated server (``daybreak serve --replicas N``) reports on ``/version`` the committed
version and each registered replica's: the step waits until every replica (as many as the server
expects, or `replicas`) serves the champion, and checks parity on each replica's own model
through ``POST /replicas/invocations``, besides once through the proxy.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TypedDict

import numpy as np

from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import DaybreakError
from daybreak.spec import Spec

log = logging.getLogger(__name__)


class DeployError(DaybreakError):
    """The endpoint did not pick up the champion in time, or its predictions differ from offline ones."""

    retryable = True


def endpoint_url(spec: Spec, url: str | None = None) -> str:
    return (url or os.environ.get("DAYBREAK_SERVE_URL") or f"http://{spec.serving.host}:{spec.serving.port}").rstrip("/")


class DeployResult(TypedDict, total=False):
    """What ``deploy_model`` returns (and the orchestrators pass on)."""

    step: str
    date: str
    url: str  # the serving endpoint
    champion_version: str | None
    deployed: bool  # the endpoint serves the champion and passed the parity check
    reason: str  # not deployed: why
    parity_rows: int  # deployed: holdout rows whose served and offline predictions were compared
    replicas: int  # deployed on a replicated server: replicas that serve the champion and passed parity


def _replicas_serve(info: dict, champ: str, expected: int | None) -> bool:
    """A replicated server's /version: every replica serves `champ`, as many as expected."""
    reps = info.get("replicas") or {}
    want = expected or info.get("expected_replicas") or 1
    return info.get("committed") == champ and len(reps) == want and all(v == champ for v in reps.values())


def _same(served: np.ndarray, offline: np.ndarray) -> bool:
    return served.shape == offline.shape and bool(np.allclose(served, offline, rtol=1e-6, atol=1e-7))


def _ask_refresh(base: str, headers: dict[str, str] | None, timeout: float) -> None:
    """Ask the server to check the alias now (``POST /refresh``) rather than wait for its poll.
    Best effort: a server from before /refresh (404), replicas (their coordinator polls: 404), a
    missing token (401) or a failed check leave the wait to the poll."""
    import httpx

    try:
        r = httpx.post(f"{base}/refresh", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        log.warning("deploy: %s/refresh failed (%s); waiting for the server's poll", base, type(e).__name__)
        return
    if r.status_code == 404:
        log.info("deploy: %s has no /refresh (an older server, or replicas); waiting for its poll", base)
    elif r.status_code != 200:
        log.warning("deploy: %s/refresh answered %d; waiting for the server's poll", base, r.status_code)


def deploy_model(spec: Spec, ctx: RunContext, url: str | None = None, timeout: float | None = None,
                 require_endpoint: bool = False, sample_rows: int = 50, replicas: int | None = None) -> DeployResult:
    """Wait until the endpoint serves the champion, then check parity (see the module docstring).
    `replicas`: how many replicas a replicated server must have serving it (default: as many as
    it was started with)."""
    import httpx

    name = spec.model.name
    registry.setup_tracking(ctx, spec.name)
    champ = registry.alias_version(registry.client(ctx), name, spec.promotion.alias)
    base = endpoint_url(spec, url)
    result: DeployResult = {"step": "deploy", "date": ctx.logical_date.isoformat(), "url": base,
                            "champion_version": str(champ.version) if champ else None}
    if champ is None:
        return result | {"deployed": False, "reason": "no champion yet"}
    try:
        httpx.get(f"{base}/ping", timeout=2.0)
    except httpx.HTTPError:
        if require_endpoint:
            raise DeployError(f"no serving endpoint at {base}: start it with 'daybreak serve --spec ...'") from None
        log.warning("deploy: no serving endpoint at %s; champion v%s will be served when one starts",
                    base, str(champ.version))
        return result | {"deployed": False, "reason": f"no serving endpoint at {base}"}

    deadline = time.monotonic() + (timeout if timeout is not None else 3 * spec.serving.poll_seconds + 60)
    served, info = None, {}
    want = str(champ.version)
    token = os.environ.get("DAYBREAK_SERVE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    _ask_refresh(base, headers, max(deadline - time.monotonic(), 1.0))
    while time.monotonic() < deadline:
        try:
            info = httpx.get(f"{base}/version", timeout=5.0).json()
            served = info.get("version")
        except (httpx.HTTPError, ValueError, AttributeError):
            served, info = None, {}
        if _replicas_serve(info, want, replicas) if "replicas" in info else served == want:
            break
        time.sleep(0.5)
    else:
        if "replicas" in info:
            raise DeployError(f"endpoint {base}: not every replica serves champion v{want} (committed "
                              f"v{info.get('committed')}, replicas {info.get('replicas')}, expected "
                              f"{replicas or info.get('expected_replicas')})")
        raise DeployError(f"endpoint {base} still serves v{served}, not champion v{champ.version!s}")

    from daybreak.gate import holdout

    df = holdout(spec, ctx).head(sample_rows)
    features = spec.features.feature_names()
    rows = df[features].astype(object).where(df[features].notna(), None).values.tolist()
    payload = {"dataframe_split": {"columns": features, "data": rows}}
    resp = httpx.post(f"{base}/invocations", json=payload, headers=headers, timeout=30.0)
    if resp.status_code != 200:
        raise DeployError(f"endpoint {base}/invocations answered {resp.status_code}: {resp.text[:300]}")
    served_pred = np.asarray(resp.json()["predictions"], dtype=np.float64)
    offline = np.asarray(registry.load_model(ctx, name, str(champ.version)).predict(df[features]), dtype=np.float64)
    if not _same(served_pred, offline):
        worst = float(np.max(np.abs(served_pred - offline))) if served_pred.shape == offline.shape else float("nan")
        raise DeployError(f"parity check failed: served predictions differ from offline ones (max diff {worst})")
    if "replicas" not in info:
        log.info("deploy: %s serves champion v%s; parity on %d rows ok", base, want, len(df))
        return result | {"deployed": True, "parity_rows": len(df)}

    # every replica, each through its own model
    resp = httpx.post(f"{base}/replicas/invocations", json=payload, headers=headers, timeout=120.0)
    if resp.status_code != 200:
        raise DeployError(f"endpoint {base}/replicas/invocations answered {resp.status_code}: {resp.text[:300]}")
    each = resp.json().get("replicas") or {}
    expected = replicas or info.get("expected_replicas") or 1
    bad = {rid: (a.get("version"), a.get("status"), a.get("message") or a.get("error"))
           for rid, a in each.items()
           if a.get("status") != 200 or a.get("version") != want
           or not _same(np.asarray(a.get("predictions"), dtype=np.float64), offline)}
    if bad or len(each) != expected:
        raise DeployError(f"endpoint {base}: {len(each)} replica(s) answered of {expected} expected; not serving "
                          f"champion v{want} faithfully: {bad}"[:1000])
    log.info("deploy: %s serves champion v%s on %d replicas; parity on %d rows ok on each", base, want, len(each),
             len(df))
    return result | {"deployed": True, "parity_rows": len(df), "replicas": len(each)}
