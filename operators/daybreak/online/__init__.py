"""Online features: the spec's features for raw rows at request time, proved equal to the offline ones.

* ``OnlineStore``: where the state lives; ``SQLiteStore`` (embedded, one file) or ``RedisStore``
  (``open_store`` picks one from a URL);
* ``materialize(spec, ctx, store)``: the state as of the end of ``ctx.logical_date``, from the
  staged partitions, atomically per date; ``materialize_online(spec, ctx)``, the daily cycle's
  ``online`` step, does it in the spec's own store when the spec opts in (``online.materialize``);
* ``push(spec, store, source, rows)``: events as they arrive;
* ``features_for(spec, store, raw_rows, at)``: the features, in the model's order, with a reason
  per row for what could not be computed;
* ``OnlineServing``: the store as ``daybreak serve`` uses it (raw rows and events from request
  bodies, on one thread of its own; freshness for /health and /metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from daybreak.online._online import (
    MaterializeResult,
    OnlineError,
    OnlineFeatures,
    check_supported,
    features_for,
    freshness,
    materialize,
    push,
)
from daybreak.online._serving import BodyError, OnlineServing, blocked_message, date_seconds
from daybreak.online._step import materialize_online, spec_store
from daybreak.online._store import URL_ENV, OnlineStore, SQLiteStore, is_redis
from daybreak.spec import DEFAULT_MAX_STALENESS

if TYPE_CHECKING:
    from daybreak.online._redis import RedisStore

__all__ = [
    "DEFAULT_MAX_STALENESS",
    "URL_ENV",
    "BodyError",
    "MaterializeResult",
    "OnlineError",
    "OnlineFeatures",
    "OnlineServing",
    "OnlineStore",
    "RedisStore",
    "SQLiteStore",
    "blocked_message",
    "check_supported",
    "date_seconds",
    "features_for",
    "freshness",
    "is_redis",
    "materialize",
    "materialize_online",
    "open_store",
    "push",
    "spec_store",
]


def open_store(url: str | None, name: str, home: str | Path | None = None) -> OnlineStore:
    """The online store of feature table `name`: Redis for a ``redis://`` or ``rediss://`` URL
    (namespace ``daybreak:<name>``), else SQLite at the path given (default
    ``<home>/online/<name>.sqlite``)."""
    if is_redis(url):
        from daybreak.online._redis import RedisStore

        return RedisStore(url, f"daybreak:{name}")
    if url:
        return SQLiteStore(url.removeprefix("sqlite:///"))
    if home is None:
        raise ValueError("open_store needs a URL or a home folder")
    return SQLiteStore(Path(home) / "online" / f"{name}.sqlite")


def __getattr__(name: str) -> object:
    """RedisStore imports the redis client only when used."""
    if name == "RedisStore":
        from daybreak.online._redis import RedisStore

        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
