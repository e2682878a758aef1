"""The run context every step receives: which day, which run, and where things live.

Embedded defaults need no configuration: everything lives under ``$DAYBREAK_HOME`` (default
``./.daybreak``): the store in ``store/``, MLflow in ``mlflow.db`` plus ``mlartifacts/``.
``DAYBREAK_STORE``, ``MLFLOW_TRACKING_URI`` and ``RAY_ADDRESS`` point the same code at real
services.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

from daybreak.infra.store import StorageOptions, Store


def daybreak_home() -> Path:
    """``$DAYBREAK_HOME``, or ``.daybreak`` when it is unset or empty (an empty value would
    otherwise put the store and the registry in whatever the current directory is)."""
    return Path(os.environ.get("DAYBREAK_HOME") or ".daybreak").expanduser().resolve()


def parse_date(value: str | date | datetime) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip()[:10])
    except ValueError:
        raise ValueError(f"invalid date {value!r}: expected YYYY-MM-DD") from None


@dataclass(frozen=True)
class RunContext:
    logical_date: date
    store: Store
    tracking_uri: str
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ray_address: str | None = None
    artifact_root: str | None = None
    # What runs the steps' tasks on several machines besides Ray, in words (e.g. "Airflow's
    # CeleryExecutor"): with it, local paths are refused as with a Ray cluster (infra.cluster).
    distributed: str | None = None

    @classmethod
    def create(
        cls,
        logical_date: str | date | datetime,
        *,
        store: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        ray_address: str | None = None,
        storage: StorageOptions | dict | None = None,
        distributed: str | None = None,
    ) -> RunContext:
        home = daybreak_home()
        store_root = store or os.environ.get("DAYBREAK_STORE") or str(home / "store")
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
        artifacts = None
        if uri.startswith("sqlite:") or "://" not in uri:
            artifacts = (home / "mlartifacts").as_uri()
        return cls(
            logical_date=parse_date(logical_date),
            store=Store(store_root, StorageOptions(**storage) if isinstance(storage, dict) else storage),
            tracking_uri=uri,
            run_id=run_id or uuid.uuid4().hex[:12],
            ray_address=ray_address or os.environ.get("RAY_ADDRESS") or None,
            artifact_root=artifacts,
            distributed=distributed,
        )


def date_range(start: date, end: date) -> list[date]:
    """Every date from `start` to `end`, both included (ValueError if `end` is before `start`)."""
    if end < start:
        raise ValueError(f"end {end} is before start {start}")
    return [start + timedelta(days=k) for k in range((end - start).days + 1)]
