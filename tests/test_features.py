"""The Ray feature step: correct against an independent pandas computation, leak-free, reproducible."""

from __future__ import annotations

import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from daybreak.features import build_features, feature_zone
from daybreak.infra.context import RunContext
from daybreak.infra.errors import MissingInputError
from daybreak.stage import stage

DAY = date(2013, 1, 9)


def _stage_days(spec, days) -> None:
    for d in days:
        stage(spec, RunContext.create(d))


def _flights(landing: Path, days) -> pd.DataFrame:
    df = pd.concat([pd.read_csv(landing / "flights" / f"{d}.csv") for d in days], ignore_index=True)
    df["event_time"] = pd.to_datetime(df["time_hour"], utc=True) + pd.to_timedelta(df["minute"], unit="m")
    return df


@pytest.fixture
def built(home: Path, spec, ray_local) -> pd.DataFrame:
    days = [DAY - timedelta(days=k) for k in range(8, -1, -1)]
    _stage_days(spec, days)
    res = build_features(spec, RunContext.create(DAY))
    assert res["rows"] > 800 and not res["skipped"] and res["missing_history"] == []
    # the flights demo's features do not trip the run-time target-leak check
    assert res["leak_check"]["mode"] == "block" and res["leak_check"]["suspects"] == {}
    assert res["missing_history_sources"] == {}
    return pq.read_table(res["uri"]).to_pandas()


def test_features_match_an_independent_pandas_computation(built: pd.DataFrame, home: Path, spec) -> None:
    landing = home / "store" / "landing"
    hist = _flights(landing, [DAY - timedelta(days=k) for k in range(8, -1, -1)])
    hist = hist[hist["dep_delay"].notna()].copy()
    hist["known_at"] = hist["event_time"] + pd.to_timedelta(hist["dep_delay"].clip(0, 1440), unit="m")
    wx = pd.concat([pd.read_csv(landing / "weather" / f"{d}.csv") for d in (DAY - timedelta(days=1), DAY)])
    wx["time_hour"] = pd.to_datetime(wx["time_hour"], utc=True)
    planes = pd.read_csv(landing / "dims" / "planes.csv").set_index("tailnum")
    today = _flights(landing, [DAY]).set_index(["carrier", "flight", "origin", "dest", "event_time"])

    sample = built.sample(60, random_state=0)
    for _, row in sample.iterrows():
        t = row["event_time"]
        for key, win, prefix in (("carrier", "1d", "carrier_dep_delay_"), ("carrier", "7d", "carrier_dep_delay_"),
                                 ("origin", "3h", "origin_dep_delay_")):
            span = pd.Timedelta(win.replace("d", "D"))  # the spec's "1d"; pandas 3.1 deprecates lower-case "d"
            w = hist[(hist[key] == row[key]) & (hist["known_at"] < t) & (hist["known_at"] > t - span)]
            if f"{prefix}count_{win}" in built.columns:
                assert row[f"{prefix}count_{win}"] == len(w)
            mean = row[f"{prefix}mean_{win}"]
            assert (np.isnan(mean) and len(w) == 0) or mean == pytest.approx(w["dep_delay"].mean(), rel=1e-9)
        obs = wx[(wx["origin"] == row["origin"]) & (wx["time_hour"] <= t) & (wx["time_hour"] >= t - pd.Timedelta("3h"))]
        expected_temp = obs.sort_values("time_hour", kind="stable")["temp"].iloc[-1] if len(obs) else np.nan
        assert row["wx_temp"] == pytest.approx(expected_temp, nan_ok=True)
        src = today.loc[(row["carrier"], row["flight"], row["origin"], row["dest"], t)]
        src = src.iloc[0] if isinstance(src, pd.DataFrame) else src
        assert row["delayed"] == int(src["arr_delay"] > 15)
        tail = src["tailnum"]
        if isinstance(tail, str) and tail in planes.index:
            assert row["plane_seats"] == planes.loc[tail, "seats"]
        else:
            assert np.isnan(row["plane_seats"])


def test_no_leakage_from_rows_at_or_after_the_event(built: pd.DataFrame, home: Path, spec, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Scramble every flight and weather row from noon on: features of earlier events must not move."""
    cut = pd.Timestamp(f"{DAY} 17:00", tz="UTC")  # noon in New York
    src = home / "store" / "landing"
    other = tmp_path / "other"
    (other / "store" / "landing").mkdir(parents=True)
    shutil.copytree(src / "dims", other / "store" / "landing" / "dims")
    rng = np.random.default_rng(1)
    for sub in ("flights", "weather"):
        (other / "store" / "landing" / sub).mkdir()
        for f in (src / sub).glob("*.csv"):
            df = pd.read_csv(f, keep_default_na=False, dtype=str)
            if f.stem == DAY.isoformat():
                t = pd.to_datetime(df["time_hour"], utc=True)
                if sub == "flights":
                    t = t + pd.to_timedelta(df["minute"].astype(int), unit="m")
                    late = (t >= cut) & (df["dep_delay"] != "NA")
                    df.loc[late, "dep_delay"] = rng.integers(-20, 300, late.sum()).astype(str)
                else:
                    late = t > cut
                    df.loc[late, "temp"] = rng.uniform(-40, 110, late.sum()).round(2).astype(str)
            df.to_csv(other / "store" / "landing" / sub / f.name, index=False)
    monkeypatch.setenv("DAYBREAK_HOME", str(other))
    _stage_days(spec, [DAY - timedelta(days=k) for k in range(8, -1, -1)])
    res = build_features(spec, RunContext.create(DAY))
    scrambled = pq.read_table(res["uri"]).to_pandas()
    feats = spec.features.feature_names()
    before = built[built["event_time"] <= cut].reset_index(drop=True)
    after = scrambled[scrambled["event_time"] <= cut].reset_index(drop=True)
    assert len(before) > 300
    pd.testing.assert_frame_equal(before[feats], after[feats])
    # ...and the scrambling did reach later events, so the test can fail
    assert not built[built["event_time"] > cut][feats].equals(scrambled[scrambled["event_time"] > cut][feats])


def test_rebuild_is_byte_identical_and_rerun_is_skipped(built: pd.DataFrame, home: Path, spec) -> None:
    ctx = RunContext.create(DAY)
    part = ctx.store.partition(feature_zone(spec), DAY)
    again = build_features(spec, ctx)
    assert again["skipped"] is True
    shutil.rmtree(part.path)
    rebuilt = build_features(spec, RunContext.create(DAY))
    assert rebuilt["skipped"] is False
    assert rebuilt["content_hash"] == part.manifest["content_hash"][:16]


def test_missing_staged_day_is_a_clear_error(home: Path, spec, ray_local) -> None:
    with pytest.raises(MissingInputError, match="no staged partition of 'flights' for 2013-01-09; run the stage step"):
        build_features(spec, RunContext.create(DAY))


def test_features_on_s3_equal_the_local_ones(built: pd.DataFrame, spec, s3_server, landing: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The same step against an S3 API: Ray tasks read the staged row groups and the driver writes
    the partition through pyarrow's S3 filesystem."""
    import uuid

    import pyarrow as pa
    from s3 import apply_env

    apply_env(monkeypatch, s3_server.env())
    bucket = f"f-{uuid.uuid4().hex[:10]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    days = [DAY - timedelta(days=k) for k in range(8, -1, -1)]
    for d in days:
        for sub in ("flights", "weather"):
            client.upload_file(str(landing / sub / f"{d}.csv"), bucket, f"store/landing/{sub}/{d}.csv")
    for p in (landing / "dims").iterdir():
        client.upload_file(str(p), bucket, f"store/landing/dims/{p.name}")
    monkeypatch.setenv("DAYBREAK_STORE", f"s3://{bucket}/store")
    _stage_days(spec, days)
    ctx = RunContext.create(DAY)
    res = build_features(spec, ctx, in_process=False)  # on Ray: its tasks read S3 (a small day would stay here)
    assert res["uri"].startswith("s3://") and not res["skipped"]
    part = ctx.store.partition(feature_zone(spec), DAY)
    got = pa.concat_tables([pq.read_table(f, filesystem=ctx.store.fs) for f in part.files]).to_pandas()
    pd.testing.assert_frame_equal(got, built)


@pytest.mark.parametrize("wide", [False, True])
def test_window_index_matches_brute_force(wide: bool) -> None:
    """The index on its own, without Ray: slices sorted and folded separately, some folded
    together first (as the step does past FOLD_FANIN slices), then merged; two key columns, and
    (wide) keys x times too many to pack, which takes the time-rank path."""
    import pyarrow as pa

    from daybreak.features import EVENT_TIME
    from daybreak.features._build import apply_windows, build_window_index, fold_tables, window_inputs
    from daybreak.spec import parse_spec

    spec = parse_spec({
        "name": "t", "sources": {"ev": {"path": "x/{date}.csv", "columns": {
            "a": "string", "b": "int64", "ts": "timestamp[us, UTC]", "v": "float64"}}},
        "features": {"name": "t", "base": "ev", "event_time": "ts", "keys": ["a", "b"],
                     "label": {"name": "y", "expr": "b > 2"},  # not v: the window reads v
                     "windows": [{"by": ["a", "b"], "value": "v", "aggs": ["count", "sum", "std", "min", "max"],
                                  "windows": ["1h", "3000d"], "prefix": "w_"}]},
        "model": {"name": "t"}})
    f = spec.features
    rng = np.random.default_rng(1)
    n = 3000
    keys_a = [f"k{i}" for i in range(400 if wide else 3)]
    base = pd.Timestamp("2000-01-01", tz="UTC")
    minutes = rng.integers(0, (5_000_000 if wide else 3000), n) // 7 * 7  # ties
    if wide:  # a few rows centuries apart: times no longer pack beside 400 x 5 keys
        minutes[:3] = [-60_000_000, 90_000_000, 100_000_000]
    df = pd.DataFrame({"a": rng.choice(keys_a, n), "b": rng.integers(0, 5, n),
                       "ts": base + pd.to_timedelta(minutes, unit="m"),
                       "v": np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n).round(2))})
    df.loc[rng.random(n) < 0.05, "a"] = None
    table = pa.Table.from_pandas(df, preserve_index=False)
    slices = [window_inputs(table.slice(o, 700), f, 0) for o in range(0, n, 700)]
    aggs = ["count", "sum", "std", "min", "max"]
    index = build_window_index(["a", "b"], aggs, fold_tables(["a", "b"], aggs, *slices[:3]), *slices[3:])
    assert len(index["comp"]) == len(np.unique(index["comp"])) < sum(s.num_rows for s in slices) + 1
    events = table.append_column(EVENT_TIME, table.column("ts"))
    got = apply_windows(events, f, [index]).to_pandas()
    known = df[df["v"].notna() & df["a"].notna()]
    for i in rng.choice(n, 150, replace=False):
        ev = df.iloc[i]
        for span in ("1h", "3000d"):
            sel = known[(known["a"] == ev["a"]) & (known["b"] == ev["b"]) & (known["ts"] < ev["ts"])
                        & (known["ts"] > ev["ts"] - pd.Timedelta(span.replace("d", "D")))]["v"]  # "D": see above
            row = got.iloc[i]
            assert row[f"w_count_{span}"] == (len(sel) if pd.notna(ev["a"]) else 0)
            if pd.isna(ev["a"]) or sel.empty:
                assert np.isnan(row[f"w_min_{span}"]) and np.isnan(row[f"w_max_{span}"])
                continue
            assert row[f"w_sum_{span}"] == pytest.approx(sel.sum(), abs=1e-9)
            assert row[f"w_min_{span}"] == sel.min() and row[f"w_max_{span}"] == sel.max()
            assert row[f"w_std_{span}"] == pytest.approx(sel.std(ddof=1), abs=1e-9, nan_ok=True)
