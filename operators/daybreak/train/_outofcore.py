"""Out-of-core training: when a window's rows would not fit ``training.memory_budget_mb``, they
stream from the feature Parquet files in batches into xgboost's ``ExtMemQuantileDMatrix``, which
keeps its quantised pages on disk. Memory is a few batches and the pages being read, not the
window.

Rows keep the order of the feature partitions (day by day, each sorted by event time); the last
``validation_fraction`` of them validate, as in memory. Encoders are fitted on the fit rows in a
first streaming pass.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from daybreak.features import feature_zone
from daybreak.infra.context import RunContext
from daybreak.spec import Spec
from daybreak.train.model_code import encode, encoded_names

log = logging.getLogger(__name__)

BATCH_ROWS = 65_536
QUANTILE_SAMPLE = 1_000_000  # values kept per binned column to place its quantile edges


def window_files(spec: Spec, ctx: RunContext, days: list) -> tuple[list[str], int]:
    """The window's feature files in row order, and their row count."""
    files, rows = [], 0
    for d in days:
        part = ctx.store.partition(feature_zone(spec), d)
        if part is not None:
            files += part.files
            rows += int(part.manifest["rows"])
    return files, rows


def estimated_bytes(spec: Spec, rows: int) -> int:
    """What the in-memory path holds at once: the window as a DataFrame (about 8 bytes a value)
    plus its encoded float32 matrix."""
    return rows * (8 * (len(spec.features.feature_names()) + 2) + 4 * len(spec.features.feature_names()))


def _batches(files: list[str], fs: Any, columns: list[str], lo: int, hi: int) -> Iterator[pd.DataFrame]:
    """DataFrames of the rows at positions [lo, hi) of the files taken in order."""
    pos = 0
    for path in files:
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            n = pf.metadata.num_rows
            if pos + n <= lo or pos >= hi:
                pos += n
                continue
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                a, b = max(lo - pos, 0), min(hi - pos, batch.num_rows)
                if a < b:
                    yield batch.slice(a, b - a).to_pandas()
                pos += batch.num_rows
                if pos >= hi:
                    return


def first_rows(files: list[str], fs: Any, columns: list[str], n: int) -> pd.DataFrame:
    """The window's first n rows (the model's input example)."""
    return next(_batches(files, fs, columns, 0, n), pd.DataFrame(columns=columns))


def _data_iter(make: Callable[[], Iterator[pd.DataFrame]], to_xy: Callable[[pd.DataFrame], dict[str, Any]],
               cache: str) -> Any:
    """An xgboost DataIter over the frames `make()` yields, each encoded with `to_xy`."""
    import xgboost as xgb

    class Rows(xgb.DataIter):
        def __init__(self) -> None:
            super().__init__(cache_prefix=cache)
            self._it: Iterator[pd.DataFrame] | None = None

        def next(self, input_data: Callable) -> bool:
            if self._it is None:
                self._it = make()
            frame = next(self._it, None)
            if frame is None:
                return False
            input_data(**to_xy(frame))
            return True

        def reset(self) -> None:
            self._it = None

    return Rows()


def fit_out_of_core(spec: Spec, ctx: RunContext, files: list[str], rows: int,
                    overrides: dict[str, Any]) -> tuple[Any, dict[str, Any], int, int]:
    """Train xgboost on the window without holding it: (the fitted model, its encoders, fit rows,
    validation rows)."""
    import xgboost as xgb

    from daybreak.train._fit import encoder_stats, encoders_from_stats, merge_stats, train_booster

    f = spec.features
    features, label = f.feature_names(), f.label.name
    n_val = max(1, int(rows * spec.training.validation_fraction))
    n_fit = rows - n_val
    fs = ctx.store.fs
    cols = [*features, label]
    # pass 1: encoder statistics and class counts of the fit rows
    specs = f.encoders()
    stats: dict[str, Any] = {}
    classes: pd.Series = pd.Series(dtype=float)
    stride = dict.fromkeys(specs, 1)  # bins come from every stride-th value: a bounded sample
    for frame in _batches(files, fs, cols, 0, n_fit):
        for name, enc in specs.items():
            st = encoder_stats(frame[name], enc)
            if isinstance(st, np.ndarray):
                st = st[::stride[name]]
            stats[name] = st if name not in stats else merge_stats(stats[name], st)
            if isinstance(st, np.ndarray) and len(stats[name]) > QUANTILE_SAMPLE:
                stats[name], stride[name] = stats[name][::2], stride[name] * 2
        classes = classes.add(frame[label].value_counts(), fill_value=0)
    for name, enc in specs.items():
        stats.setdefault(name, encoder_stats(pd.Series([], dtype=object), enc))
    encoders = encoders_from_stats(spec, stats)
    weights = None
    if spec.model.class_weight == "balanced":
        weights = {k: n_fit / (len(classes) * v) for k, v in classes.items()}
    names = encoded_names(features, encoders)

    def to_xy(frame: pd.DataFrame, weighted: bool) -> dict[str, Any]:
        y = frame[label].to_numpy(np.float32)
        out = {"data": encode(frame, features, encoders), "label": y, "feature_names": names}
        if weighted and weights is not None:
            out["weight"] = np.vectorize(lambda v: weights.get(v, 1.0))(y).astype(np.float32)
        return out

    with tempfile.TemporaryDirectory(prefix="daybreak-extmem-") as tmp:
        fit_it = _data_iter(lambda: _batches(files, fs, cols, 0, n_fit), lambda fr: to_xy(fr, True), f"{tmp}/fit")
        val_it = _data_iter(lambda: _batches(files, fs, cols, n_fit, rows), lambda fr: to_xy(fr, False), f"{tmp}/val")
        dfit = xgb.ExtMemQuantileDMatrix(fit_it, missing=np.nan, max_bin=spec.model.params.get("max_bin"))
        dval = xgb.ExtMemQuantileDMatrix(val_it, missing=np.nan, ref=dfit)
        fitted = train_booster(spec, dfit, dval, overrides, names, {"out_of_core": True})
        del dfit, dval, fit_it, val_it  # xgboost removes its cache pages itself, before the folder goes
        gc.collect()
    log.info("train %s: out of core, %d fit and %d validation rows in batches of %d", ctx.logical_date, n_fit,
             n_val, BATCH_ROWS)
    return fitted, encoders, n_fit, n_val
