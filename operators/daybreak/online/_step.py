"""The daily cycle's ``online`` step: materialize the date in the spec's online store.

It runs after the features step, only for a spec with ``online.materialize: true``
(``daybreak.steps`` skips it otherwise, without importing this module: no Redis client, no SQLite
file). The store is where ``daybreak serve`` reads it: ``DAYBREAK_ONLINE_URL``, else the
embedded SQLite file under ``$DAYBREAK_HOME/online/``. The URL is never part of the result (a
Redis URL may carry a password): the result names the backend only.
"""

from __future__ import annotations

import os
from typing import Any

from daybreak.infra.context import RunContext, daybreak_home
from daybreak.online._online import materialize
from daybreak.online._store import URL_ENV, OnlineStore, is_redis
from daybreak.spec import Spec


def spec_store(spec: Spec, url: str | None = None) -> OnlineStore:
    """The online store of the spec's feature table: `url`, else ``DAYBREAK_ONLINE_URL``, else the
    embedded SQLite file ``$DAYBREAK_HOME/online/<feature table>.sqlite``."""
    from daybreak.online import open_store

    return open_store(url or os.environ.get(URL_ENV) or None, spec.features.name, home=daybreak_home())


def materialize_online(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Materialize the online state as of the end of the logical date (``materialize``).

    A state already materialized for a later date is kept (a backfill or a rerun of an older day
    must not turn the served state back); ``daybreak online materialize`` does as it is told.
    Embedded SQLite with tasks on several machines is refused: the server would never see the file.

    Returns:
        ``step``, ``date``, ``backend`` (sqlite or redis), ``status`` (materialized, unchanged or
        kept_newer), ``generation``, ``materialized_date``, ``entries`` per part, their total
        ``rows`` and ``seconds``.
    """
    from daybreak.infra.cluster import ClusterConfigError, shared_fs_declared

    url = os.environ.get(URL_ENV) or None
    backend = "redis" if is_redis(url) else "sqlite"
    day = ctx.logical_date.isoformat()
    if backend == "sqlite" and getattr(ctx, "distributed", None) and not shared_fs_declared():
        raise ClusterConfigError(f"online: {ctx.distributed} may run the server and this task on different "
                                 f"machines, where an embedded SQLite store is another file; set {URL_ENV} to a "
                                 "Redis server")
    store = spec_store(spec, url)
    try:
        cur = store.current()
        if cur and str(cur.get("date") or "") > day:
            entries = dict(cur.get("entries") or {})
            return {"step": "online", "date": day, "backend": backend, "status": "kept_newer",
                    "generation": cur.get("area"), "materialized_date": cur["date"], "entries": entries,
                    "rows": sum(entries.values()), "seconds": 0.0}
        res = materialize(spec, ctx, store)
    finally:
        store.close()
    return {"step": "online", "date": day, "backend": backend, "status": "unchanged" if res.skipped else "materialized",
            "generation": res.generation, "materialized_date": res.date, "entries": res.entries,
            "rows": sum(res.entries.values()), "seconds": round(res.seconds, 3)}
