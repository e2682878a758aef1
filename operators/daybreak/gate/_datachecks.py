"""Data checks on the candidate's training window, for the gate.

* row count: the window's newest expected day against the median of its other expected days (the
  base source's calendar: a weekend of a weekday feed is no zero-row day, and no newest day);
* label shift: the window's label rate (classification) or mean (regression, in the champion's
  standard deviations) against the champion's training window;
* drift: the population stability index (PSI) of every feature, on a bounded seeded sample of each
  window, with the champion's window as the expected distribution;
* unseen holdout (always a warning): the champion's training window must end before the holdout,
  or the comparison favours it (a backfill gating an old date against a newer champion; a spec
  whose ``holdout_days`` grew).

The windows come from the versions' lineage tags, and the rows from the published feature
partitions, read one day and only the needed columns at a time. Each check's verdict is pass,
fail (severity block), warn (severity warn) or skip (not computable, e.g. no champion yet).
"""

from __future__ import annotations

import hashlib
import logging
import math
from datetime import date, timedelta
from typing import Any

import numpy as np

from daybreak.features import feature_zone, mature_rows
from daybreak.infra.context import RunContext
from daybreak.infra.records import Lineage
from daybreak.spec import LABEL_KNOWN_AT, Spec

log = logging.getLogger(__name__)
_EPS = 1e-4


def window_days(tags: dict[str, str]) -> list[date]:
    lineage = Lineage.from_tags(tags)
    start, end = lineage.window_start, lineage.window_end
    if not start or not end:
        return []
    a, b = date.fromisoformat(start), date.fromisoformat(end)
    return [a + timedelta(days=k) for k in range((b - a).days + 1)]


def verdict(ok: bool | None, severity: str) -> str:
    if ok is None:
        return "skip"
    return "pass" if ok else ("fail" if severity == "block" else "warn")


def psi(expected: Any, actual: Any, bins: int = 10, categorical: bool = False) -> float:
    """Population stability index of `actual` against `expected` (nulls are a bucket of their own)."""
    import pandas as pd

    e, a = pd.Series(expected), pd.Series(actual)
    if categorical or not pd.api.types.is_numeric_dtype(e.dtype):
        keys = e.astype("string").fillna("\x00null")
        pe = keys.value_counts(normalize=True)
        pa_ = a.astype("string").fillna("\x00null").value_counts(normalize=True)
        cats = pe.index.union(pa_.index)
        pe, pa_ = pe.reindex(cats, fill_value=0).to_numpy(), pa_.reindex(cats, fill_value=0).to_numpy()
    else:
        ev, av = e.to_numpy(np.float64, na_value=np.nan), a.to_numpy(np.float64, na_value=np.nan)
        finite = ev[np.isfinite(ev)]
        edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])) if len(finite) else np.array([])

        def shares(v: np.ndarray) -> np.ndarray:
            idx = np.where(np.isfinite(v), np.searchsorted(edges, v, side="right"), len(edges) + 1)
            return np.bincount(idx, minlength=len(edges) + 2) / max(len(v), 1)

        pe, pa_ = shares(ev), shares(av)
    pe, pa_ = np.clip(pe, _EPS, None), np.clip(pa_, _EPS, None)
    return float(np.sum((pa_ - pe) * np.log(pa_ / pe)))


class Days:
    """Per-day label sums and feature samples, each day read once for both windows."""

    def __init__(self, spec: Spec, ctx: RunContext, columns: list[str], per_day: int, seed: int) -> None:
        self.spec, self.ctx, self.columns, self.per_day, self.seed = spec, ctx, columns, per_day, seed
        self.zone = feature_zone(spec)
        self.cache: dict[tuple[date, date | None], dict[str, Any] | None] = {}

    def rows(self, d: date) -> int | None:
        part = self.ctx.store.partition(self.zone, d)
        return None if part is None else int(part.manifest["rows"])

    def day(self, d: date, cut: date | None = None) -> dict[str, Any] | None:
        if (d, cut) not in self.cache:
            self.cache[(d, cut)] = self._read(d, cut)
        return self.cache[(d, cut)]

    def _read(self, d: date, cut: date | None = None) -> dict[str, Any] | None:
        """Day `d`'s label sums (of the labels known by the end of `cut`, as training on that
        date saw them: ``features.label.known_at``) and a sample of its features."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        part = self.ctx.store.partition(self.zone, d)
        if part is None:
            return None
        label = self.spec.features.label.name
        timed = [LABEL_KNOWN_AT] if cut is not None and self.spec.features.label.known_at is not None else []
        try:
            t = pa.concat_tables([pq.read_table(f, columns=[label, *self.columns, *timed],
                                                filesystem=self.ctx.store.fs) for f in part.files])
        except (pa.ArrowInvalid, KeyError) as e:  # a partition without a column: the checks skip this day
            log.warning("data checks: cannot read %s features for %s: %s", self.zone, d, e)
            return None
        if timed:
            mature, _ = mature_rows(self.spec, t, cut) if cut is not None else (t, 0)
            y = (mature if mature is not None else t).column(label).to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            y = t.column(label).to_numpy(zero_copy_only=False).astype(np.float64)
        y = y[np.isfinite(y)]
        n = t.num_rows
        if n > self.per_day:
            digest = hashlib.sha256(f"{self.seed}:{d.isoformat()}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            t = t.take(np.sort(rng.choice(n, self.per_day, replace=False)))
        return {"n": len(y), "sum": float(y.sum()), "sq": float((y ** 2).sum()), "sample": t.select(self.columns)}

    def window(self, days: list[date], cut: date | None = None) -> dict[str, Any] | None:
        import pyarrow as pa

        parts = [p for p in (self.day(d, cut) for d in days) if p is not None]
        if not parts:
            return None
        n = sum(p["n"] for p in parts)
        s, sq = sum(p["sum"] for p in parts), sum(p["sq"] for p in parts)
        mean = s / n if n else math.nan
        var = sq / n - mean ** 2 if n else math.nan
        return {"n": n, "mean": mean, "std": math.sqrt(max(var, 0.0)),
                "sample": pa.concat_tables([p["sample"] for p in parts]).to_pandas()}


def run_data_checks(spec: Spec, ctx: RunContext, candidate_tags: dict[str, str],
                    champion_tags: dict[str, str] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The data rules, and the drift table (one row per feature) for the report."""
    dc = spec.gate.data_checks
    rules: list[dict[str, Any]] = []
    drift_rows: list[dict[str, Any]] = []
    cand_days = window_days(candidate_tags)
    champ_days = window_days(champion_tags or {})
    features = (dc.drift.features if dc.drift else None) or spec.features.feature_names()
    per_day = max(100, (dc.drift.sample_rows if dc.drift else 1000) // max(len(cand_days), 1))
    seed = spec.gate.bootstrap.seed if spec.gate.bootstrap else 0
    days = Days(spec, ctx, features if dc.drift else [], per_day, seed)

    if champion_tags is not None:
        first = spec.holdout_days(ctx.logical_date)[0]
        seen = [d for d in champ_days if d >= first]
        rules.append({"rule": "unseen_holdout", "kind": "data", "metric": None,
                      "value": champ_days[-1].isoformat() if champ_days else None, "threshold": first.isoformat(),
                      "severity": "warn", "verdict": "skip" if not champ_days else ("warn" if seen else "pass"),
                      "detail": (f"the champion trained on {len(seen)} holdout day(s) ({seen[0]} ..): the comparison "
                                 "favours it" if seen else "the champion's window ends before the holdout")})

    if dc.row_count:
        rc = dc.row_count
        expected = [d for d in cand_days if spec.expects(d)]  # like with like: days a drop was due
        counts = {d: days.rows(d) for d in expected}
        newest = expected[-1] if expected else None
        newest_rows = None if newest is None else counts.get(newest)
        others = [v for d, v in counts.items() if d != newest and v]
        ok = ratio = None
        detail = "fewer than 2 earlier expected days in the window"
        if newest_rows is not None and len(others) >= 2:
            med = float(np.median(others))
            ratio = newest_rows / med if med else math.inf
            ok = rc.min_ratio <= ratio <= rc.max_ratio
            detail = f"{newest}: {newest_rows} rows vs median {med:g} of {len(others)} earlier expected days"
        rules.append({"rule": "row_count", "kind": "data", "metric": None, "value": ratio,
                      "threshold": [rc.min_ratio, rc.max_ratio], "severity": rc.severity,
                      "verdict": verdict(ok, rc.severity), "detail": detail})

    cand = champ = None
    if (dc.label_shift or dc.drift) and champ_days:
        # label rates as each model's training saw them: labels known by the end of its date
        try:
            champ_cut: date | None = date.fromisoformat(Lineage.from_tags(champion_tags or {}).logical_date)
        except ValueError:  # an older or edited version without its date: all its rows
            champ_cut = None
        cand, champ = days.window(cand_days, ctx.logical_date), days.window(champ_days, champ_cut)
    no_champ = ("no champion yet" if champion_tags is None else
                "the champion has no training window tags" if not champ_days else "no feature rows for a window")

    if dc.label_shift:
        ls = dc.label_shift
        ok = shift = None
        detail = no_champ
        if cand and champ and cand["n"] and champ["n"]:
            if spec.model.task == "classification":
                shift = abs(cand["mean"] - champ["mean"])
                detail = f"label rate {cand['mean']:.4f} vs champion's window {champ['mean']:.4f}"
            else:
                shift = abs(cand["mean"] - champ["mean"]) / (champ["std"] or 1.0)
                detail = f"label mean {cand['mean']:.4g} vs {champ['mean']:.4g} (champion std {champ['std']:.4g})"
            ok = shift <= ls.max_shift
        rules.append({"rule": "label_shift", "kind": "data", "metric": None, "value": shift,
                      "threshold": ls.max_shift, "severity": ls.severity, "verdict": verdict(ok, ls.severity),
                      "detail": detail})

    if dc.drift:
        dr = dc.drift
        ok = worst = None
        detail = no_champ
        if cand and champ and len(cand["sample"]) and len(champ["sample"]):
            categorical = set(spec.features.categorical_names())
            for name in features:
                v = psi(champ["sample"][name], cand["sample"][name], dr.bins, name in categorical)
                drift_rows.append({"feature": name, "psi": v, "verdict": "pass" if v <= dr.max_psi else
                                   ("fail" if dr.severity == "block" else "warn")})
            drift_rows.sort(key=lambda r: -r["psi"])
            worst = drift_rows[0]["psi"]
            above = [r["feature"] for r in drift_rows if r["psi"] > dr.max_psi]
            ok = not above
            detail = (f"highest: {drift_rows[0]['feature']}; {len(above)} of {len(features)} features above "
                      f"{dr.max_psi} ({len(cand['sample'])} vs {len(champ['sample'])} sampled rows)")
        rules.append({"rule": "drift", "kind": "data", "metric": "psi", "value": worst, "threshold": dr.max_psi,
                      "severity": dr.severity, "verdict": verdict(ok, dr.severity), "detail": detail})
    return rules, drift_rows
