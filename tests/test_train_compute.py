"""Fitting is a pure function of a loaded window: tested on an in-memory Arrow table with no
store, registry, Ray or MLflow (train_model's load and publish halves are in test_train.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from daybreak.features import EVENT_TIME
from daybreak.infra import metrics
from daybreak.train._training import fit_window
from daybreak.train.model_code import encode, predict_matrix


def _window(spec, n: int = 3000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    f = spec.features
    cats = set(f.categorical_names())
    signal = rng.normal(size=n)
    cols: dict[str, pa.Array] = {}
    for i, name in enumerate(f.feature_names()):
        if name in cats:
            cols[name] = pa.array(rng.choice(["a", "b", "c"], n))
        else:
            cols[name] = pa.array(signal + rng.normal(0, 0.3, n) if i == 0 else rng.normal(size=n))
    cols[f.label.name] = pa.array((signal + rng.normal(0, 0.5, n) > 0).astype(np.int64))
    cols[EVENT_TIME] = pa.array(np.datetime64("2013-01-01T00:00:00", "us") + np.arange(n) * np.timedelta64(60, "s"))
    for k in f.keys:
        cols.setdefault(k, pa.array(rng.choice(["k1", "k2"], n)))
    return pa.table(cols)


def test_fit_window_learns_the_signal_with_encoders_from_training_rows_only(spec) -> None:
    window = _window(spec)
    trained = fit_window(spec, window)
    n_val = max(1, int(window.num_rows * spec.training.validation_fraction))
    assert (trained.n_fit, trained.n_val) == (window.num_rows - n_val, n_val)
    assert trained.fitted.val_metric > 0.75 and not trained.trials
    held = _window(spec, n=1000, seed=1)
    features = spec.features.feature_names()
    X = encode(held, features, trained.encoders)
    p = predict_matrix(trained.fitted.model, X, spec.model.flavor, spec.model.task, trained.names)
    y = held.column(spec.features.label.name).to_numpy().astype(float)
    assert metrics.evaluate("roc_auc", y, np.asarray(p, float), 0.5) > 0.75
