"""Categorical encodings and quantile bins: fitted on the training rows only, stored with the model,
applied identically when the model is served."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SPEC

from daybreak.features import EVENT_TIME, build_features, feature_zone
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.spec import load_spec
from daybreak.spec._model import SpecError, parse_spec
from daybreak.stage import stage
from daybreak.train import train_model
from daybreak.train._fit import fit_encoders
from daybreak.train.model_code import encode, encoded_names


def _spec_with(columns: list[dict]):
    import yaml

    raw = yaml.safe_load(Path(SPEC).read_text())
    raw["features"]["columns"] = columns
    return parse_spec(raw)


COLUMNS = [
    {"name": "sched_hour", "expr": "hour", "bins": 4},
    {"name": "distance", "expr": "distance"},
    {"name": "carrier_code", "expr": "carrier", "encoding": "onehot", "max_categories": 5},
    {"name": "origin_code", "expr": "origin", "encoding": "frequency"},
    {"name": "dest_code", "expr": "dest", "encoding": "ordinal"},
    {"name": "route", "expr": "cross(origin, dest)", "encoding": "frequency"},
]


def test_encode_each_kind_handles_unseen_and_missing() -> None:
    spec = _spec_with(COLUMNS)
    fit = pd.DataFrame({
        "sched_hour": [1.0, 2, 3, 4, 5, 6, 7, 8],
        "distance": [100.0] * 8,
        "carrier_code": ["AA", "AA", "AA", "UA", "UA", "B6", "DL", "9E"],
        "origin_code": ["JFK", "JFK", "JFK", "LGA", "LGA", "EWR", "EWR", None],
        "dest_code": ["LAX", "SFO", "LAX", "ORD", "ORD", "ATL", "BOS", "BOS"],
        "route": ["JFK|LAX"] * 8,
    })
    enc = fit_encoders(fit, spec)
    assert enc["carrier_code"]["categories"] == ["9E", "AA", "B6", "DL", "UA"]  # 5 most frequent, sorted
    assert enc["origin_code"] == {"kind": "frequency", "categories": ["EWR", "JFK", "LGA"],
                                  "frequencies": [2 / 7, 3 / 7, 2 / 7]}
    assert enc["dest_code"]["categories"] == ["ATL", "BOS", "LAX", "ORD", "SFO"]
    assert len(enc["sched_hour"]["edges"]) == 3

    features = [c["name"] for c in COLUMNS]
    names = encoded_names(features, enc)
    assert names[:2] == ["sched_hour", "distance"]
    assert names[2:7] == [f"carrier_code={c}" for c in ["9E", "AA", "B6", "DL", "UA"]]
    new = pd.DataFrame({"sched_hour": [0.0, 9.0, None], "distance": [1.0, 2.0, 3.0],
                        "carrier_code": ["AA", "ZZ", None], "origin_code": ["JFK", "XXX", None],
                        "dest_code": ["SFO", "XXX", None], "route": ["JFK|LAX", "a|b", None]})
    X = encode(new, features, enc)
    assert X.shape == (3, len(names))
    assert X[0, 0] == 0 and X[1, 0] == 3 and np.isnan(X[2, 0])  # quantile bins of 1..8
    onehot = X[:, 2:7]
    assert onehot[0].tolist() == [0, 1, 0, 0, 0]
    assert onehot[1].tolist() == [0, 0, 0, 0, 0]  # unseen: no category
    assert np.isnan(onehot[2]).all()  # missing
    origin, dest, route = X[:, 7], X[:, 8], X[:, 9]
    assert origin[0] == pytest.approx(3 / 7) and origin[1] == 0 and np.isnan(origin[2])
    assert dest[0] == 4 and np.isnan(dest[1]) and np.isnan(dest[2])
    assert route[0] == 1.0 and route[1] == 0.0


def test_spec_rejects_inconsistent_encodings() -> None:
    for col, msg in [
        ({"name": "x", "expr": "distance", "categorical": False, "encoding": "onehot"}, "needs a categorical"),
        ({"name": "x", "expr": "carrier", "categorical": True, "bins": 4}, "numeric"),
        ({"name": "x", "expr": "carrier", "encoding": "frequency", "max_categories": 3}, "max_categories"),
        ({"name": "x", "expr": "carrier", "encoding": "hashing"}, "encoding"),
    ]:
        with pytest.raises(SpecError, match=msg):
            _spec_with([col])


def test_encodings_do_not_change_the_feature_version() -> None:
    plain = load_spec(SPEC)
    encoded = _spec_with([{**c, "categorical": c.get("categorical", False)} for c in
                          [{"name": "sched_hour", "expr": "hour"}, {"name": "day_of_week",
                           "expr": "dayofweek(local(event_time, 'America/New_York'))"},
                           {"name": "distance", "expr": "distance", "bins": 10},
                           {"name": "carrier_code", "expr": "carrier", "categorical": True, "encoding": "onehot"},
                           {"name": "origin_code", "expr": "origin", "categorical": True, "encoding": "frequency"},
                           {"name": "dest_code", "expr": "dest", "categorical": True, "max_categories": 20}]])
    assert encoded.feature_version() == plain.feature_version()
    assert encoded.spec_hash() != plain.spec_hash()


def test_trained_model_stores_encoders_fitted_on_the_training_rows_only(home: Path, ray_local) -> None:
    spec = _spec_with(COLUMNS)
    day = date(2013, 1, 5)
    for k in range(6, -1, -1):  # the 7d windows of 01-05 reach back to 12-29; stage what exists
        d = day - timedelta(days=k)
        if d >= date(2013, 1, 1):
            stage(spec, RunContext.create(d))
    for d in (date(2013, 1, 3), date(2013, 1, 4)):
        build_features(spec, RunContext.create(d))
    ctx = RunContext.create(day)
    res = train_model(spec.model_copy(update={"training": spec.training.model_copy(update={"window_days": 2})}), ctx)
    assert res["status"] == "trained", res

    # The rows the encoders may see: the window in time order, minus the validation tail.
    zone = feature_zone(spec)
    rows = pd.concat([pq.read_table(ctx.store.partition(zone, d).files[0]).to_pandas()
                      for d in (date(2013, 1, 3), date(2013, 1, 4))])
    rows = rows.sort_values([EVENT_TIME, *spec.features.keys], kind="stable")
    n_val = max(1, int(len(rows) * spec.training.validation_fraction))
    fit, val = rows.iloc[:-n_val], rows.iloc[-n_val:]

    registry.use_uri(ctx.tracking_uri)
    enc = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=res["run_id"], artifact_path="encoders.json",
                                                              tracking_uri=ctx.tracking_uri)).read_text())
    assert enc["dest_code"]["categories"] == sorted(fit["dest_code"].dropna().unique())
    only_in_val = set(val["dest_code"].dropna()) - set(fit["dest_code"].dropna())
    assert not only_in_val & set(enc["dest_code"]["categories"])
    counts = fit["carrier_code"].value_counts()
    assert len(enc["carrier_code"]["categories"]) == 5
    assert min(counts[c] for c in enc["carrier_code"]["categories"]) >= counts.iloc[5]
    freq = fit["origin_code"].value_counts(normalize=True)
    assert enc["origin_code"]["frequencies"] == pytest.approx([freq[c] for c in enc["origin_code"]["categories"]])

    # The registered model applies them itself: raw categorical strings in, probabilities out.
    model = registry.load_model(ctx, spec.model.name, res["model_version"])
    features = spec.features.feature_names()
    pred = model.predict(val[features].head(50))
    assert len(pred) == 50 and np.all((pred >= 0) & (pred <= 1))
