"""Features: staged partitions -> a point-in-time correct feature partition, computed on Ray Data.

For logical date D the step reads the base events of D and of the days its windows need before
D, and writes one row per base event of D to ``features/<name>/v=<feature-version>/date=D/``.
No feature of an event may depend on anything known at or after the event's time:

* trailing windows count a row only if its ``known_at`` time lies in ``(t - window, t)``;
* as-of joins take the latest dimension row with time ``<= t`` and ``>= t - tolerance``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from daybreak.compute import ensure_ray
from daybreak.context import RunContext
from daybreak.errors import MissingInputError
from daybreak.expr import evaluate, names_in
from daybreak.spec import FeatureSpec, Spec, parse_duration, window_feature_names

log = logging.getLogger(__name__)

EVENT_TIME = "event_time"
_TARGET = "__target"
_US = 1_000_000


def feature_zone(spec: Spec) -> str:
    return f"features/{spec.features.name}/v={spec.feature_version()}"


# --- pure, per-batch transforms (run inside Ray tasks; also usable without Ray) ----------------

def read_events(items: pa.Table, f: FeatureSpec, fs: Any) -> pa.Table:
    """Read the row groups named by `items` (one task each) and prepare them for the windows."""
    import pyarrow.parquet as pq

    tables = []
    for item in items.to_pylist():
        pf = pq.ParquetFile(fs.open_input_file(item["path"]))
        tables.append(prepare_events(pf.read_row_groups(item["row_groups"]), f, item["target"]))
    return pa.concat_tables(tables)


def prepare_events(batch: pa.Table, f: FeatureSpec, target: bool) -> pa.Table:
    """Add the event time, the target flag (rows of the logical date, not history) and each
    window's value / known-at columns."""
    et = evaluate(f.event_time, batch)
    if not pa.types.is_timestamp(et.type):
        raise TypeError(f"features.event_time must give a timestamp, got {et.type}")
    batch = batch.append_column(EVENT_TIME, et.cast(pa.timestamp("us", tz="UTC")))
    batch = batch.append_column(_TARGET, pa.repeat(pa.scalar(target), batch.num_rows))
    for i, w in enumerate(f.windows):
        value = pc.cast(evaluate(w.value, batch), pa.float64())
        known = evaluate(w.known_at, batch).cast(pa.timestamp("us", tz="UTC"))
        # A row known later than max_delay after its event might lie beyond the history read
        # for some events; leave it out for every event, so results never depend on what was read.
        late = pc.fill_null(pc.greater(known, pc.add(batch.column(EVENT_TIME), _delay(w.max_delay))), False)
        if pc.any(late).as_py():
            log.warning("features.windows[%d]: %d row(s) known more than max_delay=%s after their event are "
                        "left out", i, pc.sum(late).as_py(), w.max_delay)
            value = pc.if_else(late, pa.scalar(None, pa.float64()), value)
        batch = batch.append_column(f"__wv{i}", value)
        batch = batch.append_column(f"__wk{i}", known)
    # Only what later stages read travels through the shuffles; history rows carry only what
    # the windows group by.
    keep = carried_columns(f)
    batch = batch.select([c for c in batch.column_names if c in keep or c.startswith("__")])
    if not target:
        group_keys = {c for w in f.windows for c in w.by} | {EVENT_TIME}
        for j, name in enumerate(batch.column_names):
            if not name.startswith("__") and name not in group_keys:
                batch = batch.set_column(j, name, pa.nulls(batch.num_rows, batch.column(name).type))
    return batch


def _delay(text: str) -> pa.Scalar:
    return pa.scalar(int(parse_duration(text).total_seconds() * _US), pa.duration("us"))


def carried_columns(f: FeatureSpec) -> set[str]:
    """Base columns read after the window stage: keys, join and group keys, expression inputs."""
    cols = {EVENT_TIME, *f.keys, *names_in(f.label.expr)}
    for c in f.columns:
        cols |= names_in(c.expr)
    for j in f.asof:
        cols |= set(j.by)
    for lk in f.lookups:
        cols |= set(lk.by)
    for w in f.windows:
        cols |= set(w.by)
    return cols


def _ts_us(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as int64 microseconds; nulls become the minimum int64 (callers mask them)."""
    arr = pc.cast(col.cast(pa.timestamp("us", tz="UTC")), pa.int64())
    return arr.fill_null(np.iinfo(np.int64).min).to_numpy()


def window_aggregates(group: pa.Table, i: int, windows_us: list[int], aggs: list[str], names: list[str]) -> pa.Table:
    """Trailing aggregates for one entity's rows, using only values known strictly before each row."""
    v = group.column(f"__wv{i}").to_numpy(zero_copy_only=False).astype(np.float64)
    k_col = group.column(f"__wk{i}")
    k = _ts_us(k_col)
    ok = ~np.isnan(v) & k_col.is_valid().to_numpy(zero_copy_only=False)
    # Ties in time are ordered by value so the sums (and their float rounding) never depend on
    # the order rows arrived in from the shuffle.
    order = np.lexsort((v[ok], k[ok]))
    ks, vs = k[ok][order], v[ok][order]
    cs = np.concatenate([[0.0], np.cumsum(vs)])
    cs2 = np.concatenate([[0.0], np.cumsum(vs * vs)])
    # History rows (days before D) only feed the sums; features are computed for D's events.
    target = group.column(_TARGET).to_numpy(zero_copy_only=False)
    t = _ts_us(group.column(EVENT_TIME))[target]
    hi = np.searchsorted(ks, t, side="left")  # known strictly before t
    mins = _RangeExtreme(vs, np.minimum) if "min" in aggs else None
    maxs = _RangeExtreme(vs, np.maximum) if "max" in aggs else None
    out: dict[str, np.ndarray] = {}
    n = 0
    for w in windows_us:
        lo = np.searchsorted(ks, t - w, side="right")  # known strictly after t - w
        count = (hi - lo).astype(np.float64)
        s = cs[hi] - cs[lo]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, s / count, np.nan)
            var = np.where(count > 1, (cs2[hi] - cs2[lo] - count * mean * mean) / (count - 1), np.nan)
        for agg in aggs:
            if agg == "min":
                out[names[n]] = mins.query(lo, hi)
            elif agg == "max":
                out[names[n]] = maxs.query(lo, hi)
            else:
                out[names[n]] = {"count": count, "sum": s, "mean": mean, "std": np.sqrt(np.maximum(var, 0.0))}[agg]
            n += 1
    group = group.drop_columns([f"__wv{i}", f"__wk{i}"])
    for name, values in out.items():
        full = np.full(len(target), np.nan)
        full[target] = values
        group = group.append_column(name, pa.array(full, pa.float64()))
    return group


class _RangeExtreme:
    """Min (or max) of ``values[lo:hi]`` for many ranges at once: a sparse table, O(n log n) to
    build and O(1) per query, all in numpy (no Python loop over rows)."""

    def __init__(self, values: np.ndarray, op: np.ufunc) -> None:
        self.op = op
        self.levels = [values]
        width = 1
        while 2 * width <= len(values):
            prev = self.levels[-1]
            self.levels.append(op(prev[:-width], prev[width:]))
            width *= 2

    def query(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        length = hi - lo
        out = np.full(len(lo), np.nan)
        ok = length > 0
        if not ok.any():
            return out
        level = np.floor(np.log2(length[ok])).astype(np.int64)
        a, b = lo[ok], hi[ok] - (1 << level)
        res = np.empty(len(a))
        for j in np.unique(level):
            sel = level == j
            res[sel] = self.op(self.levels[j][a[sel]], self.levels[j][b[sel]])
        out[ok] = res
        return out


def keep_targets(batch: pa.Table) -> pa.Table:
    return batch.filter(batch.column(_TARGET))


def asof_join(batch: pa.Table, right: pa.Table, by: list[str], time: str, tolerance_us: int, columns: dict[str, str]) -> pa.Table:
    """Attach the latest `right` row per `by` with time in [event_time - tolerance, event_time]."""
    left = batch.select(by + [EVENT_TIME]).to_pandas()
    left["__pos"] = np.arange(len(left))
    left = left.sort_values(EVENT_TIME, kind="stable")
    rdf = right.select(by + [time] + sorted(set(columns.values()))).to_pandas()
    rdf = rdf.dropna(subset=[time, *by]).rename(columns={time: "__rtime"}).sort_values("__rtime", kind="stable")
    rdf = rdf.rename(columns={src: f"__r_{src}" for src in set(columns.values())})
    if len(left) and left[EVENT_TIME].isna().any():
        raise ValueError("features.event_time is null for some rows; as-of joins need a time for every event")
    merged = pd.merge_asof(
        left, rdf, left_on=EVENT_TIME, right_on="__rtime", by=by or None,
        direction="backward", tolerance=pd.Timedelta(microseconds=tolerance_us), allow_exact_matches=True,
    ).sort_values("__pos")
    for out_name, src in columns.items():
        batch = batch.append_column(out_name, pa.array(merged[f"__r_{src}"].to_numpy(), from_pandas=True))
    return batch


def lookup_join(batch: pa.Table, right: pa.Table, by: list[str], columns: dict[str, str]) -> pa.Table:
    """Left join to a snapshot table; duplicate keys keep the last row so events are never multiplied."""
    rdf = right.select(by + sorted(set(columns.values()))).to_pandas().drop_duplicates(subset=by, keep="last")
    rdf = rdf.rename(columns={src: f"__r_{src}" for src in set(columns.values())})
    left = batch.select(by).to_pandas()
    merged = left.merge(rdf, on=by, how="left", sort=False)
    for out_name, src in columns.items():
        batch = batch.append_column(out_name, pa.array(merged[f"__r_{src}"].to_numpy(), from_pandas=True))
    return batch


def finalize(batch: pa.Table, f: FeatureSpec, task: str) -> pa.Table:
    """Evaluate row-level features and the label; keep keys, event time, features and label."""
    cols: dict[str, Any] = {k: batch.column(k) for k in f.keys}
    cols[EVENT_TIME] = batch.column(EVENT_TIME)
    for c in f.columns:
        v = evaluate(c.expr, batch)
        cols[c.name] = pc.cast(v, pa.string()) if c.categorical else pc.cast(v, pa.float64())
    for name in f.feature_names():
        if name not in cols:
            cols[name] = pc.cast(batch.column(name), pa.float64())
    label = evaluate(f.label.expr, batch)
    cols[f.label.name] = pc.cast(label, pa.int64() if task == "classification" else pa.float64())
    out = pa.table(cols)
    return out.filter(pc.is_valid(out.column(f.label.name)))


# --- the step ----------------------------------------------------------------------------

def _staged_files(ctx: RunContext, source: str, days: list[date]) -> tuple[list[str], dict[str, str], list[str]]:
    files, hashes, missing = [], {}, []
    for d in days:
        part = ctx.store.partition(f"staged/{source}", d)
        if part is None:
            missing.append(d.isoformat())
            continue
        files += part.files
        hashes[d.isoformat()] = part.manifest["content_hash"]
    return files, hashes, missing


def _read_table(files: list[str], fs: Any) -> pa.Table:
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in files])


def build_features(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Compute the feature partition for ``ctx.logical_date`` on Ray Data."""
    f = spec.features
    day = ctx.logical_date
    lookback_days = math.ceil(f.lookback() / timedelta(days=1))
    history = [day - timedelta(days=k) for k in range(lookback_days, 0, -1)]
    today_part = ctx.store.partition(f"staged/{f.base}", day)
    if today_part is None:
        raise MissingInputError(f"features: no staged partition of {f.base!r} for {day}; run the stage step first")
    base_files, base_hashes, missing = _staged_files(ctx, f.base, [*history, day])
    if missing:
        log.warning("features %s: history days not staged %s; windows near them see fewer rows", day, missing)

    dims: dict[str, tuple[list[str], dict[str, str]]] = {}
    for j in f.asof:
        tol_days = math.ceil(parse_duration(j.tolerance) / timedelta(days=1))
        fl, hs, _ = _staged_files(ctx, j.source, [day - timedelta(days=k) for k in range(tol_days, -1, -1)])
        dims[j.source] = (fl, hs)
    for lk in f.lookups:
        part = ctx.store.partition(f"staged/{lk.source}", day)
        if part is None:
            raise MissingInputError(f"features: no staged snapshot of {lk.source!r} for {day}")
        dims[lk.source] = (part.files, {day.isoformat(): part.manifest["content_hash"]})

    lineage = {
        "feature_version": spec.feature_version(),
        "date": day.isoformat(),
        "inputs": {f.base: base_hashes, **{k: v[1] for k, v in dims.items()}},
    }
    lineage_key = hashlib.sha256(json.dumps(lineage, sort_keys=True).encode()).hexdigest()[:16]
    zone = feature_zone(spec)
    current = ctx.store.partition(zone, day)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        log.info("features %s: inputs unchanged, keeping %s", day, current.path)
        return _result(spec, current.uri, current.manifest, skipped=True)

    import ray

    ensure_ray(ctx.ray_address)
    rows_in = sum(ctx.store.partition(f"staged/{f.base}", date.fromisoformat(d)).manifest["rows"] for d in base_hashes)
    # One read task per slice of whole row groups. The number of blocks sets the parallelism of
    # every later stage, shuffles included, and each shuffle moves blocks x blocks pieces: about
    # four blocks per CPU balances the two.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    slice_rows = max(100_000, rows_in // (4 * cpus))
    today = set(today_part.files)
    items = [{"path": p, "row_groups": g, "target": p in today}
             for p, g in _slices(base_files, ctx.store.fs, slice_rows)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(read_events, fn_kwargs={"f": f, "fs": ctx.store.fs}, batch_size=1, batch_format="pyarrow")
    for i, w in enumerate(f.windows):
        ds = ds.groupby(w.by, num_partitions=len(items)).map_groups(
            window_aggregates,
            fn_kwargs={"i": i, "windows_us": [int(parse_duration(x).total_seconds() * _US) for x in w.windows],
                       "aggs": list(w.aggs), "names": window_feature_names(w)},
            batch_format="pyarrow",
        )
    ds = ds.map_batches(keep_targets, batch_format="pyarrow", batch_size=None)
    for j in f.asof:
        right = _read_table(dims[j.source][0], ctx.store.fs).select([*j.by, j.time, *sorted(set(j.columns.values()))])
        ds = ds.map_batches(
            asof_join, fn_args=(right,),
            fn_kwargs={"by": j.by, "time": j.time, "tolerance_us": int(parse_duration(j.tolerance).total_seconds() * _US),
                       "columns": j.columns},
            batch_format="pyarrow", batch_size=None,
        )
    for lk in f.lookups:
        right = _read_table(dims[lk.source][0], ctx.store.fs).select([*lk.by, *sorted(set(lk.columns.values()))])
        ds = ds.map_batches(lookup_join, fn_args=(right,), fn_kwargs={"by": lk.by, "columns": lk.columns},
                            batch_format="pyarrow", batch_size=None)
    ds = ds.map_batches(finalize, fn_kwargs={"f": f, "task": spec.model.task}, batch_format="pyarrow",
                        batch_size=None)
    # A total order makes the published bytes (and so the lineage hashes) reproducible.
    ds = ds.sort([EVENT_TIME, *f.keys])

    def write(fs: Any, folder: str) -> dict[str, Any]:
        rows = write_sorted(ds, fs, folder)
        return {**lineage, "lineage_key": lineage_key, "rows": rows, "run_id": ctx.run_id,
                "missing_history": missing, "features": f.feature_names(), "label": f.label.name,
                "categorical": f.categorical_names()}

    part = ctx.store.publish(zone, day, write, run=ctx.run_id)
    nodes = nodes_used(ds)
    log.info("features %s: %d rows -> %s (on %d Ray node(s))", day, part.manifest["rows"], part.uri, len(nodes))
    return _result(spec, part.uri, part.manifest, skipped=False) | {"ray_nodes": nodes}


def nodes_used(ds: Any) -> list[str]:
    """Ids of the Ray nodes that ran the dataset's tasks, from Ray Data's own per-block stats
    (empty when this Ray version does not expose them)."""
    found: set[str] = set()
    seen: set[int] = set()

    def walk(stats: Any) -> None:
        if stats is None or id(stats) in seen:
            return
        seen.add(id(stats))
        for blocks in (getattr(stats, "metadata", None) or {}).values():
            for b in blocks:
                node = getattr(getattr(b, "exec_stats", None), "node_id", None)
                if node:
                    found.add(node)
        for parent in getattr(stats, "parents", None) or []:
            walk(parent)

    for d in (getattr(ds, "_write_ds", None), ds):
        try:
            executor = getattr(d, "_current_executor", None)
            walk(executor.get_stats() if executor else d._raw_stats())
        except Exception:  # a developer API: never fail a published step over it
            log.debug("no Ray Data stats for %r", d, exc_info=True)
    return sorted(found)


def _slices(files: list[str], fs: Any, slice_rows: int) -> list[tuple[str, list[int]]]:
    """(file, row groups) slices of about `slice_rows` rows, from the Parquet footers."""
    import pyarrow.parquet as pq

    out = []
    for path in files:
        meta = pq.ParquetFile(fs.open_input_file(path)).metadata
        groups: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            groups.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= slice_rows:
                out.append((path, groups))
                groups, rows = [], 0
        if groups or meta.num_row_groups == 0:
            out.append((path, groups))
    return out


ROW_GROUP_ROWS = 128 * 1024  # also what stage writes
FILE_ROWS = 32 * ROW_GROUP_ROWS


def write_sorted(ds: Any, fs: Any, folder: str) -> int:
    """Stream the sorted dataset into part-00000.parquet, part-00001.parquet, ... in order.

    Ray's own writer may concatenate blocks out of order within a file. Here batches of exactly
    ROW_GROUP_ROWS rows arrive in dataset order (whatever the block boundaries), one row group
    each, FILE_ROWS per file: the same rows always give the same bytes, on one node or many.
    Memory is a few batches, not the partition.
    """
    import posixpath

    import pyarrow.parquet as pq

    writer, index, in_file, total = None, 0, 0, 0
    try:
        for batch in ds.iter_batches(batch_size=ROW_GROUP_ROWS, batch_format="pyarrow"):
            if writer is None or in_file >= FILE_ROWS:
                if writer is not None:
                    writer.close()
                path = posixpath.join(folder, f"part-{index:05d}.parquet")
                writer = pq.ParquetWriter(path, batch.schema, filesystem=fs, compression="zstd")
                index, in_file = index + 1, 0
            writer.write_table(batch, row_group_size=ROW_GROUP_ROWS)
            in_file += batch.num_rows
            total += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:  # no rows: still one (empty) file, so readers find the schema
        schema = ds.schema()
        schema = getattr(schema, "base_schema", schema)
        pq.write_table(schema.empty_table(), posixpath.join(folder, "part-00000.parquet"), filesystem=fs)
    return total


def _result(spec: Spec, path: str, manifest: dict[str, Any], skipped: bool) -> dict[str, Any]:
    return {
        "step": "features",
        "date": manifest["date"],
        "uri": str(path),
        "rows": manifest["rows"],
        "feature_version": spec.feature_version(),
        "content_hash": manifest["content_hash"][:16],
        "lineage_key": manifest["lineage_key"],
        "missing_history": manifest.get("missing_history", []),
        "skipped": skipped,
        "ray_nodes": [],
    }


def read_features(spec: Spec, ctx: RunContext, days: list[date]) -> tuple[pa.Table | None, dict[str, str], list[str]]:
    """Published feature rows for `days` (in order), their content hashes, and the days missing."""
    zone = feature_zone(spec)
    tables, hashes, missing = [], {}, []
    for d in days:
        part = ctx.store.partition(zone, d)
        if part is None:
            missing.append(d.isoformat())
            continue
        hashes[d.isoformat()] = part.manifest["content_hash"]
        tables.append(_read_table(part.files, ctx.store.fs))
    if not tables:
        return None, hashes, missing
    return pa.concat_tables(tables, promote_options="default"), hashes, missing

