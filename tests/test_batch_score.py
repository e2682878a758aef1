"""Batch scoring on Ray with the champion, against the cycled store and registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from daybreak.features import read_features
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.score import batch_score, prediction_zone
from daybreak.steps import run_step


def test_batch_score_writes_champion_predictions_idempotently(use_cycled: dict, spec) -> None:
    ctx = RunContext.create("2013-01-04")
    out = batch_score(spec, ctx)
    cl = registry.client(ctx)
    champ = str(registry.alias_version(cl, spec.model.name, "champion").version)
    assert out["model_version"] == champ and not out["skipped"]
    part = ctx.store.partition(prediction_zone(spec), ctx.logical_date)
    got = pd.concat([pq.read_table(f, filesystem=ctx.store.fs).to_pandas() for f in part.files], ignore_index=True)
    features = read_features(spec, ctx, [ctx.logical_date])[0].to_pandas()
    assert len(got) == len(features) == out["rows"]
    want = registry.load_model(ctx, spec.model.name, champ).predict(features[spec.features.feature_names()])
    np.testing.assert_allclose(got["prediction"], want, rtol=1e-6)
    assert (got["event_time"] == features["event_time"]).all() and (got["flight"] == features["flight"]).all()
    assert set(got["model_version"]) == {champ}
    np.testing.assert_allclose(got["confidence"], np.maximum(want, 1 - want), rtol=1e-6)
    # a rerun keeps the partition; after the champion moves, a rerun replaces it whole
    again = run_step("batch_score", spec, "2013-01-04")
    assert again["skipped"] and ctx.store.partition(prediction_zone(spec), ctx.logical_date).manifest == part.manifest
    other = next(str(mv.version) for mv in registry.versions(cl, spec.model.name) if str(mv.version) != champ)
    cl.set_registered_model_alias(spec.model.name, "champion", other)
    try:
        moved = batch_score(spec, ctx)
        assert moved["model_version"] == other and not moved["skipped"] and moved["rows"] == out["rows"]
        newer = ctx.store.partition(prediction_zone(spec), ctx.logical_date)
        assert newer.manifest["version"] == other
    finally:
        cl.set_registered_model_alias(spec.model.name, "champion", champ)
