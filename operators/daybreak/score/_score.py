"""Batch scoring: the champion scores a date's feature partition, in process or on Ray.

Writes ``predictions/<model>/date=D/`` with one row per feature row: the row's keys and event
time, the prediction, a confidence (classification: the probability of the predicted class;
regression: null), the model version, the scoring run's id (``request_id``) and when it was
scored. This partition is batch scoring's prediction log: the monitor step joins it with the
date's labels like the online log (the features are the feature partition it scored). The partition is published
atomically and idempotently: a rerun with the same champion and features keeps it, and a rerun
after the champion moved replaces it whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa

from daybreak.features import EVENT_TIME, feature_zone
from daybreak.infra import registry
from daybreak.infra.compute import WorkerEnv, choose_compute, ensure_ray
from daybreak.infra.context import RunContext
from daybreak.infra.errors import MissingInputError
from daybreak.infra.store import ROW_GROUP_ROWS
from daybreak.spec import Spec

log = logging.getLogger(__name__)


SCORE_SLICE_ROWS = ROW_GROUP_ROWS  # feature rows per scoring call (whole row groups of the partition)


def prediction_zone(spec: Spec) -> str:
    return f"predictions/{spec.model.name}"


class SliceScorer:
    """A Ray Data actor (or, in process, a plain object called on each slice in order): loads the
    model once (checking its artifacts' hash) on its first batch, then scores the feature row
    groups it is given. A pyfunc model logged as code cannot be pickled to workers.
    On a cluster it may run where the driver's environment is not: the MLflow credentials come
    as an argument (`worker_env`), the store's as its filesystem (`fs`)."""

    def __init__(self, spec: Spec, tracking_uri: str, version: str, fs: Any, scored_at: str, run_id: str = "",
                 worker_env: WorkerEnv | None = None) -> None:
        from daybreak.infra.context import RunContext

        if worker_env is not None:  # the driver's MLflow credentials: this actor owns its process
            worker_env.apply()
        self._ctx = RunContext.create(datetime.now(UTC).date(), tracking_uri=tracking_uri)
        self.model: Any = None
        self.spec, self.version, self.fs, self.scored_at, self.run_id = spec, version, fs, scored_at, run_id

    def __call__(self, items: pa.Table) -> pa.Table:
        import pyarrow.parquet as pq

        if self.model is None:
            # Loaded on the first batch, not in __init__: an actor whose constructor fails dies
            # with an ActorDiedError that hides the cause (a 401, a tampered artifact), so the
            # retry policy could not tell it from a lost node.
            self.model = registry.load_model(self._ctx, self.spec.model.name, self.version)

        t = pa.concat_tables([pq.ParquetFile(self.fs.open_input_file(i["path"])).read_row_groups(i["row_groups"])
                              for i in items.to_pylist()])
        f = self.spec.features
        pred = (np.asarray(self.model.predict(t.select(f.feature_names()).to_pandas()), np.float64) if t.num_rows
                else np.zeros(0))
        conf = np.maximum(pred, 1 - pred) if self.spec.model.task == "classification" else np.full(len(pred), np.nan)
        ids = [c for c in [*f.keys, EVENT_TIME] if c in t.column_names]
        n = len(pred)
        return pa.table({**{c: t.column(c) for c in ids}, "prediction": pa.array(pred),
                         "confidence": pa.array(conf, from_pandas=True),
                         "model_version": pa.array([self.version] * n, pa.string()),
                         "request_id": pa.array([self.run_id] * n, pa.string()),  # the scoring run
                         "scored_at": pa.array([self.scored_at] * n, pa.string()).cast(pa.timestamp("s", tz="UTC"))})


def _lineage(spec: Spec, version: str, features: Any, day: Any) -> tuple[dict[str, Any], str]:
    lineage = {"model": spec.model.name, "version": version, "features": features.manifest["content_hash"],
               "date": day.isoformat()}
    return lineage, hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]


def recorded_lineage(spec: Spec, ctx: RunContext) -> str | None:
    """The lineage key of the date's published predictions, when the champion as it stands scored
    the feature partition as it is now; None otherwise."""
    champ = registry.alias_version(registry.client(ctx), spec.model.name, spec.promotion.alias)
    part = ctx.store.partition(feature_zone(spec), ctx.logical_date)
    current = ctx.store.partition(prediction_zone(spec), ctx.logical_date)
    if champ is None or part is None or current is None:
        return None
    _, key = _lineage(spec, str(champ.version), part, ctx.logical_date)
    return key if current.manifest.get("lineage_key") == key else None


class ScoreResult(TypedDict, total=False):
    """What ``batch_score`` returns (and the orchestrators pass on)."""

    step: str
    date: str  # the date scored (the champion's own with ``champion_date``)
    model_version: str  # the champion that scored it
    lineage_key: str
    uri: str
    rows: int
    skipped: bool  # the partition was kept as is (this version already scored these features)


def batch_score(spec: Spec, ctx: RunContext, champion_date: bool = False, *,
                in_process: bool | None = None) -> ScoreResult:
    """Score the logical date's features with the champion; publish the predictions.

    ``champion_date``: score the date the champion was trained for instead (a run that has no date
    of its own, e.g. one triggered by a promotion). `in_process`: score in this process (True),
    on Ray (False), or (None) as ``infra.compute.choose_compute`` decides from the configured
    cluster and the feature rows; the same scorer on the same slices either way, the same bytes."""
    from daybreak.features import day_slices, write_sorted
    from daybreak.infra.context import parse_date

    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    if champ is None:
        raise MissingInputError(f"batch_score: {spec.model.name} has no {spec.promotion.alias!r} to score with yet")
    if champion_date and champ.tags.get(registry.DATE_TAG):
        ctx = replace(ctx, logical_date=parse_date(champ.tags[registry.DATE_TAG]))
    day = ctx.logical_date
    part = ctx.store.partition(feature_zone(spec), day)
    if part is None:
        raise MissingInputError(f"batch_score: no feature partition for {day}; run the features step first")
    version = str(champ.version)
    lineage, key = _lineage(spec, version, part, day)
    zone = prediction_zone(spec)
    current = ctx.store.partition(zone, day)
    base: ScoreResult = {"step": "batch_score", "date": day.isoformat(), "model_version": version, "lineage_key": key}
    if current is not None and current.manifest.get("lineage_key") == key:
        log.info("batch_score %s: v%s already scored these features; keeping %s", day, version, current.uri)
        return base | {"uri": current.uri, "rows": current.manifest["rows"], "skipped": True}
    rows_in = part.manifest["rows"]
    if in_process is None:
        choice = choose_compute(ctx.ray_address, ctx.distributed, rows_in)
        in_process = not choice.ray
        log.info("batch_score %s: %s rows, %s (%s)", day, f"{rows_in:,}", choice.where, choice.why)
    # Slices of a fixed size (whole row groups), never the CPUs': the same slices everywhere.
    slices = day_slices(part.files, ctx.store.fs, SCORE_SLICE_ROWS)
    scored_at = datetime.now(UTC).isoformat(timespec="seconds")
    scorer_kwargs = {"spec": spec, "tracking_uri": ctx.tracking_uri, "version": version, "fs": ctx.store.fs,
                     "scored_at": scored_at, "run_id": ctx.run_id}
    sort_keys = [EVENT_TIME, *spec.features.keys]  # the features' own order: same rows, same file
    if in_process:
        # The same scorer on the same slices, in order; then the stable sort Ray's gives (each
        # block sorted, then merged in block order: ties keep the input order; nulls last).
        scorer = SliceScorer(**scorer_kwargs)
        scored = [scorer(pa.Table.from_pylist([{"path": p, "row_groups": g}])) for p, g in slices]
        out: Any = pa.concat_tables(scored).sort_by([(c, "ascending") for c in sort_keys])
        del scored
    else:
        out = _score_on_ray(ctx, slices, scorer_kwargs, sort_keys)

    def write(fs: Any, folder: str) -> dict[str, Any]:
        rows = write_sorted(out, fs, folder)
        return {**lineage, "lineage_key": key, "rows": rows, "run_id": ctx.run_id}

    published = ctx.store.publish(zone, day, write, run=ctx.run_id)
    log.info("batch_score %s: %d rows scored by v%s -> %s", day, published.manifest["rows"], version, published.uri)
    return base | {"uri": published.uri, "rows": published.manifest["rows"], "skipped": False}


def _score_on_ray(ctx: RunContext, slices: list[tuple[str, list[int]]], scorer_kwargs: dict[str, Any],
                  sort_keys: list[str]) -> Any:
    """The slices scored by ``SliceScorer`` actors on Ray (the driver's MLflow credentials as an
    argument), sorted: a lazy Ray dataset."""
    import ray

    ensure_ray(ctx.ray_address)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ds: ray.data.Dataset = ray.data.from_items([{"path": p, "row_groups": g} for p, g in slices],
                                               override_num_blocks=len(slices))
    ds = ds.map_batches(SliceScorer, fn_constructor_kwargs={**scorer_kwargs, "worker_env": WorkerEnv.capture()},
                        concurrency=(1, min(cpus, len(slices))), batch_size=1, batch_format="pyarrow")
    return ds.sort(sort_keys)
