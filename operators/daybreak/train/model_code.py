"""The served model, logged to MLflow as code (no pickle): an xgboost booster or a scikit-learn
estimator saved with skops, plus its encoders.

MLflow executes this file to rebuild the model, so it depends only on numpy, pandas, mlflow and
xgboost (or scikit-learn and skops), never on daybreak itself: ``mlflow models serve`` can load
it too. Training imports ``encode`` from here so that training and serving turn rows into
numbers the same way.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Mapping
from itertools import repeat
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel  # mlflow.pyfunc is a LazyLoader attribute to type checkers

_UNSAFE = re.compile(r"[\[\]<]")


def encoded_names(features: list[str], encoders: dict[str, dict[str, Any]]) -> list[str]:
    """The model's input columns: one per feature, except one-hot features (one per category)."""
    names: list[str] = []
    for name in features:
        enc = encoders.get(name)
        if enc is not None and enc["kind"] == "onehot":
            # xgboost rejects '[', ']' and '<' in feature names.
            names += [f"{name}={_UNSAFE.sub('_', str(c))}" for c in enc["categories"]]
        else:
            names.append(name)
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # categories that differ only in those characters
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}#{seen[n]}"
    return names


def column(frame: Any, name: str) -> pd.Series:
    """A DataFrame's column, or an Arrow table's converted alone (never the whole table)."""
    return frame.column(name).to_pandas() if hasattr(frame, "column_names") else frame[name]


def encode(frame: Any, features: list[str], encoders: dict[str, dict[str, Any]]) -> np.ndarray:
    """Feature rows (a DataFrame, or an Arrow table: its columns are converted one at a time,
    never the whole table) -> float32 matrix, applying the encoders fitted on the training window.

    * ordinal: the index in the training categories; unseen or missing -> NaN (xgboost's missing);
    * onehot: one 0/1 column per training category; unseen -> all 0, missing -> all NaN;
    * frequency: the category's share of the training rows; unseen -> 0, missing -> NaN;
    * quantile: the index of the training-quantile bin a number falls in; missing -> NaN.
    """
    arrow = hasattr(frame, "column_names")
    missing = [c for c in features if c not in (frame.column_names if arrow else frame.columns)]
    if missing:
        raise ValueError(f"input is missing feature column(s) {missing}")
    out = np.empty((len(frame), len(encoded_names(features, encoders))), dtype=np.float32)
    j = 0
    for name in features:
        col, enc = column(frame, name), encoders.get(name)
        kind = None if enc is None else enc["kind"]
        if enc is not None and kind in ("ordinal", "onehot", "frequency"):
            cats = enc["categories"]
            present = col.notna().to_numpy()
            text = col.astype("object").where(col.notna(), None)
            if not pd.api.types.is_string_dtype(col):
                text = text.map(_text)
            # -1 for a value not among the categories (unseen, or missing); pd.Categorical gave the same
            # but warns (pandas 3.1) that such values will raise
            codes = pd.Index(cats).get_indexer(text)
            freq = (np.append(np.asarray(enc["frequencies"], dtype=np.float64), 0.0)  # code -1: unseen
                    if kind == "frequency" else None)
            j = _place_codes(out, j, kind, codes, present, freq, len(cats))
            continue
        else:
            values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            if enc is not None and kind == "quantile":
                bins = np.searchsorted(np.asarray(enc["edges"], dtype=np.float64), values, side="right")
                values = np.where(np.isnan(values), np.nan, bins)
            out[:, j] = values
        j += 1
    return out


class ColumnEncoder:
    """``encode`` for columns already typed as a model signature makes them (float64 arrays for
    numbers, object arrays of ``str``/``None`` for text), without pandas: the serving fast path's
    encoding. Same matrix as ``encode`` gives for a frame of those columns, to the bit: the same
    numpy operations, and category codes from a dict built once (a category's index, -1 when
    unseen or missing, as ``Index.get_indexer`` gives for text). Where the categories are not all
    text (a dict and pandas could then disagree on equality), those columns go through pandas."""

    def __init__(self, features: list[str], encoders: dict[str, dict[str, Any]]) -> None:
        self.features, self.encoders = features, encoders
        self.names = encoded_names(features, encoders)
        self.width = len(self.names)
        self.codes: dict[str, dict[str, int] | None] = {}
        for name, enc in encoders.items():
            if enc["kind"] in ("ordinal", "onehot", "frequency"):
                cats = enc["categories"]
                text = all(type(c) is str for c in cats) and len(set(cats)) == len(cats)
                self.codes[name] = {c: i for i, c in enumerate(cats)} if text else None
        self.freqs = {n: np.append(np.asarray(e["frequencies"], dtype=np.float64), 0.0)
                      for n, e in encoders.items() if e["kind"] == "frequency"}
        self.edges = {n: np.asarray(e["edges"], dtype=np.float64)
                      for n, e in encoders.items() if e["kind"] == "quantile"}

    def __call__(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        missing = [c for c in self.features if c not in columns]
        if missing:
            raise ValueError(f"input is missing feature column(s) {missing}")
        rows = len(columns[self.features[0]]) if self.features else 0
        out = np.empty((rows, self.width), dtype=np.float32)
        j = 0
        for name in self.features:
            col, enc = columns[name], self.encoders.get(name)
            kind = None if enc is None else enc["kind"]
            if enc is not None and kind in ("ordinal", "onehot", "frequency"):
                lookup = self.codes[name]
                if lookup is None or col.dtype != object:
                    series = pd.Series(col)
                    present = series.notna().to_numpy()
                    text = series.astype("object").where(series.notna(), None)
                    if not pd.api.types.is_string_dtype(series):
                        text = text.map(_text)
                    codes = pd.Index(enc["categories"]).get_indexer(text)
                else:
                    # (missing values matter to onehot and frequency only; pandas' isna on text is slow)
                    present = ~pd.isna(col) if kind != "ordinal" else None
                    values = col.tolist()
                    try:  # (keys are all text: None, numbers and the like find nothing, as in encode)
                        found = list(map(lookup.get, values, repeat(-1)))
                    except TypeError:  # an unhashable value
                        found = [lookup.get(v, -1) if type(v) is str else -1 for v in values]
                    codes = np.fromiter(found, dtype=np.intp, count=rows)
                j = _place_codes(out, j, kind, codes, present, self.freqs.get(name), len(enc["categories"]))
                continue
            else:
                if col.dtype == np.float64:
                    values = col
                else:
                    values = pd.to_numeric(pd.Series(col), errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
                if enc is not None and kind == "quantile":
                    bins = np.searchsorted(self.edges[name], values, side="right")
                    values = np.where(np.isnan(values), np.nan, bins)
                out[:, j] = values
            j += 1
        return out


def _place_codes(out: np.ndarray, j: int, kind: str, codes: np.ndarray, present: Any, freq: Any, n: int) -> int:
    """A categorical column's codes (-1: unseen or missing) into the matrix at column j, as its
    encoder kind wants them (``encode`` and ``ColumnEncoder`` share it); the next column."""
    if kind == "ordinal":
        out[:, j] = np.where(codes < 0, np.nan, codes)
        return j + 1
    if kind == "frequency":
        out[:, j] = np.where(present, freq[codes], np.nan)
        return j + 1
    block = (codes[:, None] == np.arange(n)[None, :]).astype(np.float32)
    block[~present] = np.nan
    out[:, j:j + n] = block
    return j + n


def partition_keys(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Each row's many-model key: its values of the partition columns as text, joined by '|'
    (missing: '<NA>'). Training and serving route rows with this same function."""
    parts = [frame[c].astype("object").where(frame[c].notna(), "<NA>").map(str) for c in columns]
    key = parts[0]
    for p in parts[1:]:
        key = key + "|" + p
    return key.to_numpy(dtype=object)


def _text(v: Any) -> Any:
    return v if v is None or isinstance(v, str) else str(v)


def legacy_encoders(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Encoders of a model logged before encoders had kinds: ``categories`` were all ordinal."""
    if "encoders" in meta:
        return meta["encoders"]
    return {n: {"kind": "ordinal", "categories": c} for n, c in meta.get("categories", {}).items()}


class DaybreakModel(PythonModel):
    """An xgboost booster (UBJ) or a scikit-learn estimator (skops), behind the same encoders.
    A many-model version holds one model per partition key and a fallback for unseen keys."""

    def load_context(self, context: Any) -> None:
        import os

        with open(context.artifacts["meta"]) as f:
            meta = json.load(f)
        self.features: list[str] = meta["features"]
        self.encoders: dict[str, dict[str, Any]] = legacy_encoders(meta)
        self.task: str = meta["task"]
        # daybreak's loader passes the flavor and the types skops may build from the registry,
        # which the artifact store cannot change; meta.json's copies serve tools that load the
        # folder as it is (``mlflow models serve``).
        config = context.model_config or {}
        self.flavor: str = config.get("flavor") or meta.get("flavor", "xgboost")
        self.partition_by: list[str] = meta.get("partition_by", [])
        listed = config.get("trusted_types")
        trusted = set(meta.get("trusted_types", []) if listed is None else listed)
        path = context.artifacts["model"]
        if not self.partition_by:
            self.model = self._load(path, trusted)
            return
        self.models = {k: self._load(os.path.join(path, name), trusted) for k, name in meta["partitions"].items()}
        self.model = self._load(os.path.join(path, meta["fallback"]), trusted)

    def _load(self, path: str, trusted: set[str]) -> Any:
        if self.flavor == "xgboost":
            import xgboost as xgb

            booster = xgb.Booster()
            booster.load_model(path)
            return booster
        import skops.io as sio

        # Trust exactly the types recorded when the model was saved; a file holding anything else
        # is refused rather than loaded.
        found = set(sio.get_untrusted_types(file=path))
        unexpected = sorted(found - trusted)
        if unexpected:
            raise ValueError(f"model file holds types not recorded at training: {unexpected}")
        return sio.load(path, trusted=sorted(found))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        X = encode(model_input, self.features, self.encoders)
        if not self.partition_by:
            return self._predict(self.model, X)
        keys = partition_keys(model_input, self.partition_by)
        out = np.empty(len(X), dtype=np.float64)
        for key in np.unique(keys):
            rows = keys == key
            out[rows] = self._predict(self.models.get(key, self.model), X[rows])
        return out

    def _predict(self, model: Any, X: np.ndarray) -> np.ndarray:
        return predict_matrix(model, X, self.flavor, self.task, encoded_names(self.features, self.encoders))

    def predict_columns(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """``predict`` for rows given as columns that MLflow's schema check already passed (float64
        arrays for double columns, object arrays of ``str``/``None`` for string ones): the same
        predictions, without pandas or the pyfunc's schema enforcement (``daybreak serve``'s fast
        path checks the signature itself). A many-model version goes through ``predict``."""
        if self.partition_by:
            return np.asarray(self.predict(None, pd.DataFrame(dict(columns))))
        encoder = getattr(self, "_column_encoder", None)
        if encoder is None:
            encoder = self._column_encoder = ColumnEncoder(self.features, self.encoders)
            if self.flavor == "xgboost":
                # One thread per predict: a server's batch is a few rows to a few thousand, where
                # xgboost's thread pool costs more than it saves (2x on 32 rows) and its threads
                # compete with the server's. (The same floats: each row is summed the same way.)
                self.model.set_param({"nthread": 1})
        return predict_encoded(self.model, encoder(columns), self.flavor, self.task, encoder.names)


def predict_matrix(model: Any, X: np.ndarray, flavor: str, task: str, names: list[str]) -> np.ndarray:
    """One model's predictions for encoded rows: the positive class's probability for
    classifiers. Training scores its validation rows with this too."""
    if flavor == "xgboost":
        import xgboost as xgb

        return model.predict(xgb.DMatrix(X, missing=np.nan, feature_names=names))
    if task == "classification":
        return model.predict_proba(X)[:, list(model.classes_).index(1)]
    return np.asarray(model.predict(X), dtype=np.float64)


def predict_encoded(model: Any, X: np.ndarray, flavor: str, task: str, names: list[str]) -> np.ndarray:
    """``predict_matrix`` with xgboost's dense predict (``_dense_predict``, inplace_predict's C call:
    no DMatrix, a tenth of the fixed cost; the same trees on the same float32 matrix, so the same
    floats)."""
    if flavor == "xgboost" and not np.isinf(X).any():
        return _dense_predict(model, X)
    # An infinity (a double beyond float32 becomes one): the DMatrix refuses it, as the pyfunc does;
    # inplace_predict would answer a made-up prediction.
    return predict_matrix(model, X, flavor, task, names)


_CONFIG = json.dumps({"type": 0, "training": False, "iteration_begin": 0, "iteration_end": 0, "missing": float("nan"),
                      "strict_shape": False, "cache_id": 0}).encode()  # inplace_predict's, by default
_local = threading.local()  # a proxy matrix per thread: xgboost sets the rows of a call into it


@functools.cache
def _c_api() -> tuple[Any, ...] | None:
    """xgboost's C entry point and the names around it, or None: XGBoosterPredictFromDense's
    arguments read the same in xgboost 2.1 to 3.4 (checked); ctypes cannot check them, so
    another major version (or one without these names) gets inplace_predict."""
    try:
        import xgboost
        from xgboost.core import _LIB, _check_call, _ProxyDMatrix, c_bst_ulong
    except ImportError:
        return None
    return (_LIB, _check_call, _ProxyDMatrix, c_bst_ulong) if xgboost.__version__.split(".")[0] in ("2", "3") else None


def _dense_predict(model: Any, X: np.ndarray) -> np.ndarray:
    """``model.inplace_predict(X, missing=np.nan)``: the same C call with the same arguments, made
    directly, with one reused proxy matrix per thread. On 16 rows inplace_predict took 98.5 us:
    about 52 us its Python (argument checks, JSON, ctypes type building) and 10 us a new proxy
    matrix, whose set-up reads the cgroup's CPU quota files (11 system calls); this takes 36.4 us.
    Any input other than an aligned, C-ordered float matrix: inplace_predict itself (which copies
    it). (A served version's ``predict_columns`` is checked against its pyfunc at load: any
    difference and it is not used.)"""
    api = _c_api()
    if (api is None or X.ndim != 2 or X.dtype.kind != "f" or not X.flags.c_contiguous or not X.flags.aligned
            or not len(X)):
        return model.inplace_predict(X, missing=np.nan)
    import ctypes

    lib, check, proxy_type, ulong = api
    proxy = getattr(_local, "proxy", None)
    if proxy is None:
        proxy = _local.proxy = proxy_type()
    rows = b'{"data": [%d, true], "shape": [%d, %d], "strides": null, "typestr": "%s", "version": 3}' % (
        X.ctypes.data, X.shape[0], X.shape[1], X.dtype.str.encode())
    shape, dims, out = ctypes.POINTER(ulong)(), ulong(), ctypes.POINTER(ctypes.c_float)()
    check(lib.XGBoosterPredictFromDense(model.handle, rows, _CONFIG, proxy.handle, ctypes.byref(shape),
                                        ctypes.byref(dims), ctypes.byref(out)))
    dims_ = tuple(int(shape[i]) for i in range(dims.value))
    size = int(np.prod(dims_)) if dims_ else 0
    # xgboost's buffer is reused by the thread's next predict: copied now
    return np.ctypeslib.as_array(out, (size,)).copy().reshape(dims_) if size else np.empty(dims_, np.float32)


mlflow.models.set_model(DaybreakModel())
