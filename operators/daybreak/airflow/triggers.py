"""Triggers the deferrable daybreak tasks wait on, in Airflow's triggerer instead of a worker slot.

- :class:`ServedVersionTrigger`: the serving endpoint's ``GET /version`` reports the wanted model
  version (on every replica of a replicated server); ``DeployModelOperator`` defers to it.
- :class:`LandingFileTrigger`: a source's landing file for a date is in the store (local or S3);
  ``LandingFileSensor`` defers to it.

Neither fires in its first ``settle`` seconds (default :data:`SETTLE`), even when what it waits
for is there: Airflow 3.3 fails a deferred task whose trigger fires before the scheduler has
processed the worker's exit from deferring (the resumed attempt is marked failed on a stale
"success" of the first one: apache/airflow#71580, #72716, fix proposed in #71579). A few seconds
of a wait that is about a rollout or a file drop keep it clear of that race.

Both poll on the triggerer's event loop (HTTP with ``httpx.AsyncClient``; the store's listing, a
blocking call, in a thread) and fire one event: ``status`` ``served`` / ``landed`` when the wait is
over, ``timeout`` (with what was last seen) when their own deadline passed first. Their arguments
are plain JSON (Airflow stores them with the deferred task): no credentials; the landing trigger
reads an S3 Connection by its id in the triggerer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

SETTLE = 20.0
"""Seconds a trigger waits at least before it fires (see the module docstring)."""


async def _settled(start: float, settle: float) -> None:
    """Sleep until `settle` seconds after `start` (monotonic)."""
    left = start + settle - time.monotonic()
    if left > 0:
        await asyncio.sleep(left)


def serves(info: dict[str, Any], want: str, replicas: int | None = None) -> bool:
    """Whether a ``/version`` answer says `want` is served: the version of a single server, or the
    committed version and every replica's (as many as expected) of a replicated one."""
    if "replicas" not in info:
        return str(info.get("version")) == want
    reps = info.get("replicas") or {}
    expected = replicas or info.get("expected_replicas") or 1
    return (str(info.get("committed")) == want and len(reps) == expected
            and all(str(v) == want for v in reps.values()))


class ServedVersionTrigger(BaseTrigger):
    """Fires when `url`'s ``GET /version`` reports `version` (see :func:`serves`).

    :param url: the serving endpoint (no trailing slash).
    :param version: the model version to wait for.
    :param replicas: a replicated server: how many replicas must serve it (default: as many as the
        server expects).
    :param poll_interval: seconds between two requests.
    :param timeout: seconds from the first request until a ``timeout`` event.
    :param settle: seconds before it fires at the earliest (:data:`SETTLE`).
    """

    def __init__(self, url: str, version: str, replicas: int | None = None, poll_interval: float = 1.0,
                 timeout: float = 120.0, settle: float = SETTLE) -> None:
        super().__init__()
        self.url, self.version, self.replicas = url.rstrip("/"), str(version), replicas
        self.poll_interval, self.timeout, self.settle = float(poll_interval), float(timeout), float(settle)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__name__}",
                {"url": self.url, "version": self.version, "replicas": self.replicas,
                 "poll_interval": self.poll_interval, "timeout": self.timeout, "settle": self.settle})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        start = time.monotonic()
        deadline = start + max(self.timeout, self.settle)
        info: dict[str, Any] = {}
        error = None
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                try:
                    answer = (await client.get(f"{self.url}/version")).json()
                    info, error = (answer if isinstance(answer, dict) else {}), None
                except (httpx.HTTPError, ValueError) as e:
                    info, error = {}, f"{type(e).__name__}: {e}"
                if serves(info, self.version, self.replicas):
                    await _settled(start, self.settle)
                    yield TriggerEvent({"status": "served", "url": self.url, "version": self.version, "info": info})
                    return
                if time.monotonic() >= deadline:
                    yield TriggerEvent({"status": "timeout", "url": self.url, "version": self.version,
                                        "info": info, "error": error})
                    return
                await asyncio.sleep(self.poll_interval)


def landed(store: str, patterns: list[str], aws_conn_id: str | None = None) -> dict[str, list[str]]:
    """Each pattern's landing files in the store (blocking: a listing, local or S3)."""
    from daybreak.infra.store import Store

    options = None
    if aws_conn_id:
        from daybreak.airflow.hooks import storage_options

        options = storage_options(aws_conn_id)
    st = Store(store, options)
    out = {}
    for pattern in patterns:
        fs, infos = st.glob(pattern)
        s3 = fs.type_name == "s3"
        out[pattern] = [f"s3://{i.path}" if s3 else i.path for i in infos]
    return out


class LandingFileTrigger(BaseTrigger):
    """Fires when every pattern (a source's landing path for a date, as the spec writes it:
    relative to the store, absolute, or ``s3://``; wildcards in the file name) has a file.

    :param store: the store root (a folder or ``s3://bucket/prefix``).
    :param patterns: the landing paths to wait for.
    :param aws_conn_id: a Connection with S3 credentials, read in the triggerer; default: the
        triggerer's environment.
    :param poll_interval: seconds between two listings.
    :param timeout: seconds until a ``timeout`` event; None: no deadline of its own (the task's
        deferral timeout ends the wait).
    :param settle: seconds before it fires at the earliest (:data:`SETTLE`).
    """

    def __init__(self, store: str, patterns: list[str], aws_conn_id: str | None = None, poll_interval: float = 30.0,
                 timeout: float | None = None, settle: float = SETTLE) -> None:
        super().__init__()
        self.store, self.patterns, self.aws_conn_id = store, list(patterns), aws_conn_id
        self.poll_interval, self.timeout, self.settle = float(poll_interval), timeout, float(settle)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__name__}",
                {"store": self.store, "patterns": self.patterns, "aws_conn_id": self.aws_conn_id,
                 "poll_interval": self.poll_interval, "timeout": self.timeout, "settle": self.settle})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        start = time.monotonic()
        deadline = None if self.timeout is None else start + max(float(self.timeout), self.settle)
        found: dict[str, list[str]] = {}
        while True:
            try:
                found = await asyncio.to_thread(landed, self.store, self.patterns, self.aws_conn_id)
                error = None
            except OSError as e:  # the store did not answer this time (S3 down, throttled): try again
                error = f"{type(e).__name__}: {e}"
                self.log.warning("listing the landing files failed, trying again: %s", error)
            if found and all(found.get(p) for p in self.patterns):
                await _settled(start, self.settle)
                yield TriggerEvent({"status": "landed", "files": found})
                return
            if deadline is not None and time.monotonic() >= deadline:
                yield TriggerEvent({"status": "timeout", "files": found, "error": error,
                                    "missing": [p for p in self.patterns if not found.get(p)]})
                return
            await asyncio.sleep(self.poll_interval)
