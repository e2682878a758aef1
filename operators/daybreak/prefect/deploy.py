"""Serve daybreak's flows as Prefect deployments (``daybreak prefect deploy``).

One process serves three deployments, named after the spec by default:

- ``daily_retrain/<name>`` on a ``Cron`` schedule (each scheduled run processes its scheduled
  date, UTC);
- ``backfill/<name>`` and ``approve/<name>``, run on demand (UI, ``prefect deployment run`` or
  ``run_deployment``).

Their parameters default to the spec and settings given here; a run may override them. For
deployments on a work pool instead (workers pull the flows), see the README's Prefect section.
``storage_secret`` names a Secret, AwsCredentials or S3Bucket block (prefect-aws's; an S3Bucket
block is also the store), read by each run (:mod:`daybreak.prefect.storage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daybreak.spec import load_spec


def deployments(spec: str, cron: str, *, timezone: str = "UTC", name: str | None = None,
                settings: dict[str, Any] | None = None) -> list[Any]:
    """The three deployments; the spec and the cron string are checked first."""
    from prefect.schedules import Cron

    from daybreak.prefect.flows import SETTINGS, approve, backfill, daily_retrain

    s = load_spec(spec)  # a bad spec fails here, naming the field
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as e:
        raise ValueError(f"--cron {cron!r} / --timezone {timezone!r}: {e}") from None
    name = name or f"daybreak-{s.name}"
    spec_ref = spec if "://" in spec else str(Path(spec).resolve())
    params = {"spec": spec_ref, **{k: v for k, v in (settings or {}).items() if k in SETTINGS and v not in (None, "")}}
    tags = ["daybreak", s.name]
    return [
        daily_retrain.to_deployment(name, schedules=[schedule], parameters=params, tags=tags,
                                    description=f"daybreak daily cycle for {s.name}, {cron} ({timezone})"),
        backfill.to_deployment(name, parameters={k: v for k, v in params.items() if k != "serve_url"}, tags=tags,
                               description=f"daybreak backfill of a date range for {s.name}"),
        approve.to_deployment(name, parameters={k: v for k, v in params.items()
                                                if k in ("spec", "tracking_uri", "mlflow_secret")},
                              tags=tags, description=f"approve or reject a pending {s.model.name} version"),
    ]


def serve(spec: str, cron: str, *, timezone: str = "UTC", name: str | None = None,
          settings: dict[str, Any] | None = None, limit: int | None = None) -> None:
    """Serve the deployments until interrupted (Ctrl-C or SIGTERM); runs execute in this process's
    runner, each in its own subprocess."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(spec, cron, timezone=timezone, name=name, settings=settings), limit=limit)
