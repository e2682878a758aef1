"""The README's second example (card payments, specs/payments.yaml) end to end on generated data:
staged, features on Ray equal to the reference, then a model trained with its encoders."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT
from reference import reference_features

from daybreak.features import build_features
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.spec import parse_spec
from daybreak.stage import stage
from daybreak.train import train_model

SPEC = ROOT / "specs" / "payments.yaml"
DAYS = [date(2024, 5, 1) + timedelta(days=k) for k in range(4)]


def _generate(landing: Path, rng: np.random.Generator) -> None:
    (landing / "payments").mkdir(parents=True)
    (landing / "fx").mkdir()
    pid = 0
    for d in DAYS:
        n = 250
        start = datetime(d.year, d.month, d.day, tzinfo=UTC)
        created = [start + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 86400, n))]
        settle = rng.choice([None, 0.5, 20, 60, 90], n, p=[0.1, 0.4, 0.3, 0.15, 0.05])  # hours; 90h > max_delay
        pq.write_table(pa.table({
            "payment_id": pa.array(np.arange(pid, pid + n), pa.int64()),
            "card_id": [f"card{c}" for c in rng.integers(0, 25, n)],
            "merchant_id": [f"m{m}" for m in rng.integers(0, 8, n)],
            "channel": rng.choice(["web", "app", "pos", None], n, p=[0.4, 0.3, 0.25, 0.05]).tolist(),
            "country": rng.choice(["US", "GB", "DE", "FR"], n).tolist(),
            "currency": rng.choice(["USD", "EUR", "GBP"], n).tolist(),
            "amount": np.round(rng.lognormal(3.5, 1.2, n), 2),
            "created_at": pa.array(created, pa.timestamp("us", tz="UTC")),
            "settled_at": pa.array([None if h is None else c + timedelta(hours=h)
                                    for c, h in zip(created, settle, strict=False)],
                                   pa.timestamp("us", tz="UTC")),
            "charged_back": (rng.random(n) < 0.08).tolist(),
        }), landing / "payments" / f"{d}.parquet")
        pid += n
        stamps = [start + timedelta(hours=h) for h in (0, 6, 12, 18)]
        pq.write_table(pa.table({
            "currency": [c for c in ("EUR", "GBP") for _ in stamps],
            "published_at": pa.array(stamps * 2, pa.timestamp("us", tz="UTC")),
            "usd_rate": np.round(rng.normal(1.1, 0.02, 2 * len(stamps)), 4),
        }), landing / "fx" / f"{d}.parquet")
    pq.write_table(pa.table({"merchant_id": [f"m{m}" for m in range(8)],
                             "category": ["food", "travel"] * 4, "risk_tier": list(range(8))}),
                   landing / "merchants.parquet")


def test_payments_example_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_local) -> None:
    home = tmp_path / "home"
    _generate(home / "store" / "landing", np.random.default_rng(7))
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    raw = yaml.safe_load(SPEC.read_text())
    # the generated data begins on DAYS[0]: declared, its first days' windows miss no history
    raw["sources"]["payments"]["calendar"] = {"start": DAYS[0].isoformat()}
    spec = parse_spec(raw)
    for d in DAYS:
        res = stage(spec, RunContext.create(d))
        assert res["rows"] == 250, res

    for d in DAYS:
        built = build_features(spec, RunContext.create(d))
    got = pq.read_table(built["uri"]).to_pandas()
    want = reference_features(spec, RunContext.create(DAYS[-1]))
    pd.testing.assert_frame_equal(got, want, check_dtype=False, rtol=1e-9, atol=1e-9)
    assert got["usd_rate"].notna().any() and got["usd_rate"].isna().any()  # USD has no rate: null
    assert (got["card_amount_count_24h"] > 0).any()
    assert (got["merchant_chargeback_count_30d"] == 0).all()  # nothing is 30 days old yet

    ctx = RunContext.create(DAYS[-1] + timedelta(days=1))
    res = train_model(spec, ctx)
    assert res["status"] == "trained" and res["rows"] == 1000, res
    model = registry.load_model(ctx, spec.model.name, res["model_version"])
    pred = model.predict(got[spec.features.feature_names()])
    assert len(pred) == len(got) and np.all((pred >= 0) & (pred <= 1))


def test_readme_shows_the_example_spec() -> None:
    readme = (ROOT / "README.md").read_text()
    text = SPEC.read_text()
    features = text[text.index("features:"):text.index("\nmodel:")]
    assert features in readme
