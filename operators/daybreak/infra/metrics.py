"""Gate metrics, evaluated under many row weightings at once, and a paired bootstrap.

Every metric is written as a function of per-row weights: plain evaluation is weight 1 on every
row, and a bootstrap resample is the number of times each row was drawn. Evaluating a
(resamples x rows) weight matrix in one pass is what makes the bootstrap vectorised:

* mean-like metrics (log loss, Brier, MAE, RMSE, MAPE, R², F1 at a threshold) are matrix-vector
  products of the weights with per-row terms;
* ranking metrics (ROC AUC, PR AUC) sort the scores once; each resample is then two cumulative
  sums down the ranking, read at the end of every group of tied scores.

The resamples are Poisson(1) counts (the Poisson bootstrap: each row drawn independently, as in
a multinomial resample of a large holdout), drawn from a seeded generator through a 16-bit
lookup table, so the same seed gives the same intervals. The tests check every metric against
scikit-learn with the same ``sample_weight``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

# metric -> higher is better
DIRECTION: dict[str, bool] = {
    "roc_auc": True, "pr_auc": True, "log_loss": False, "brier": False, "f1": True,
    "rmse": False, "mae": False, "r2": True, "mape": False,
}
CLASSIFICATION = ("roc_auc", "pr_auc", "log_loss", "brier", "f1")
REGRESSION = ("rmse", "mae", "r2", "mape")
RANKING = ("roc_auc", "pr_auc")
_EPS = np.finfo(np.float64).eps


def metrics_for(task: str) -> tuple[str, ...]:
    return CLASSIFICATION if task == "classification" else REGRESSION


def _poisson_table(bits: int = 16) -> np.ndarray:
    """Inverse CDF of Poisson(1) on a 2**bits grid: table[u] is the count for uniform u."""
    size = 1 << bits
    cdf, k, p = [], 0, math.exp(-1.0)
    total = p
    while total < 1 - 0.5 / size and k < 20:
        cdf.append(total)
        k += 1
        p /= k
        total += p
    u = (np.arange(size) + 0.5) / size
    return np.searchsorted(np.array(cdf), u).astype(np.uint8)


_POISSON = _poisson_table()


def poisson_counts(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """(k, n) bootstrap counts, each row an independent Poisson(1) draw."""
    return _POISSON[rng.integers(0, 1 << 16, size=(k, n), dtype=np.uint16)]


class Scorer:
    """One metric of one model's predictions, evaluated for a (k, n) weight matrix at once.

    For ranking metrics the weights must be laid out in ``layout`` order (rows sorted by some
    score); the scorer keeps the permutation from that layout to its own descending-score order.
    """

    def __init__(self, metric: str, y: np.ndarray, pred: np.ndarray, threshold: float = 0.5,
                 layout: np.ndarray | None = None) -> None:
        if metric not in DIRECTION:
            raise ValueError(f"unknown metric {metric!r}; known: {sorted(DIRECTION)}")
        self.metric = metric
        y = np.asarray(y, np.float64)
        p = np.asarray(pred, np.float64)
        if metric in RANKING:
            layout = np.arange(len(y)) if layout is None else layout
            p_l = p[layout]
            own = np.argsort(-p_l, kind="stable")  # positions in the layout, best score first
            self.perm = None if np.array_equal(own, np.arange(len(own))) else own
            ps = p_l[own]
            last = np.flatnonzero(np.r_[ps[1:] != ps[:-1], True]) if len(ps) else np.zeros(0, np.int64)
            self.ends = None if len(last) == len(ps) else last  # last row of each group of tied scores
            self.y = y[layout][own]
            return
        self.y = y
        if metric == "log_loss":
            q = np.clip(p, 1e-15, 1 - 1e-15)
            self.terms = -(y * np.log(q) + (1 - y) * np.log1p(-q))
        elif metric == "brier":
            self.terms = (p - y) ** 2
        elif metric == "mae":
            self.terms = np.abs(p - y)
        elif metric == "rmse":
            self.terms = (p - y) ** 2
        elif metric == "r2":
            self.terms = (p - y) ** 2
            self.centred = y - y.mean()  # the variance from centred labels: no cancellation at large means
        elif metric == "mape":
            self.terms = np.abs(p - y) / np.maximum(np.abs(y), _EPS)
        elif metric == "f1":
            hit = (p >= threshold).astype(np.float64)
            self.tp, self.fp, self.fn = y * hit, (1 - y) * hit, y * (1 - hit)

    def __call__(self, w: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(w)
        m = self.metric
        with np.errstate(divide="ignore", invalid="ignore"):
            if m in RANKING:
                ws = w if self.perm is None else w[:, self.perm]
                if ws.shape[1] == 0:
                    return np.full(ws.shape[0], np.nan)
                # cumulative weight of all and of positive rows down the ranking, read at the end of
                # each group of tied scores: one pass each, no per-group reduction
                seen = np.cumsum(ws, axis=1, dtype=np.float64)
                tp = np.cumsum(ws * self.y, axis=1)
                if self.ends is not None:
                    seen, tp = seen[:, self.ends], tp[:, self.ends]
                fp = seen - tp
                pos, neg = tp[:, -1], fp[:, -1]
                gp = np.diff(tp, axis=1, prepend=0.0)
                if m == "roc_auc":  # each positive beats the negatives ranked below it, half the tied ones
                    gn = np.diff(fp, axis=1, prepend=0.0)
                    return (gp * (neg[:, None] - fp + 0.5 * gn)).sum(axis=1) / (pos * neg)
                return (gp * np.where(seen > 0, tp / seen, 0.0)).sum(axis=1) / pos
            wf = w.astype(np.float64) if w.dtype != np.float64 else w
            total = wf.sum(axis=1)
            if m == "f1":
                tp, fp, fn = wf @ self.tp, wf @ self.fp, wf @ self.fn
                den = 2 * tp + fp + fn
                return np.where(den > 0, 2 * tp / den, 0.0)
            mean = (wf @ self.terms) / total
            if m == "rmse":
                return np.sqrt(mean)
            if m == "r2":
                shift = (wf @ self.centred) / total
                var = (wf @ (self.centred ** 2)) / total - shift ** 2
                return 1 - mean / var
            return mean


def evaluate(metric: str, y: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> float:
    """The metric on all rows once (nan where undefined, e.g. AUC with one class)."""
    return float(Scorer(metric, y, pred, threshold)(np.ones((1, len(y))))[0])


def gain(metric: str, candidate: Any, champion: Any) -> Any:
    """Candidate minus champion, signed so that positive means the candidate is better."""
    return candidate - champion if DIRECTION[metric] else champion - candidate


def paired_bootstrap(metric: str, y: np.ndarray, candidate: np.ndarray, champion: np.ndarray, *,
                     resamples: int = 1000, level: float = 0.95, seed: int = 0, threshold: float = 0.5,
                     max_cells: int = 2_000_000) -> dict[str, Any]:
    """Paired bootstrap of the gain (candidate vs champion) in `metric` on the same rows.

    Both models are scored on the same resampled rows in every resample. Returns the percentile
    interval of the gain at `level`, the point gain and each model's own interval. The draws depend
    only on (seed, resamples, rows): chunking is a function of the row count, and each chunk
    draws from its own stream of the seed.
    """
    y = np.asarray(y, np.float64)
    candidate, champion = np.asarray(candidate, np.float64), np.asarray(champion, np.float64)
    n = len(y)
    layout = np.argsort(-candidate, kind="stable") if metric in RANKING else None
    sc = Scorer(metric, y, candidate, threshold, layout)
    sh = Scorer(metric, y, champion, threshold, layout)
    chunk = max(1, min(resamples, max_cells // max(n, 1)))
    starts = list(range(0, resamples, chunk))
    # one seeded stream per chunk, so the threads (numpy releases the GIL) cannot change the draws
    streams = np.random.SeedSequence(seed).spawn(len(starts))
    cand, champ = np.empty(resamples), np.empty(resamples)

    def run(i: int) -> None:
        k = min(chunk, resamples - starts[i])
        w = poisson_counts(np.random.default_rng(streams[i]), k, n)
        cand[starts[i]:starts[i] + k], champ[starts[i]:starts[i] + k] = sc(w), sh(w)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(run, range(len(starts))))
    gains = gain(metric, cand, champ)
    alpha = (1 - level) / 2

    def interval(v: np.ndarray) -> list[float]:
        ok = v[np.isfinite(v)]
        return [float("nan")] * 2 if not len(ok) else [float(q) for q in np.quantile(ok, [alpha, 1 - alpha])]

    ones = np.ones((1, n))
    point = float(gain(metric, sc(ones)[0], sh(ones)[0]))
    lo, hi = interval(gains)
    return {"metric": metric, "gain": point, "low": lo, "high": hi, "level": level, "resamples": resamples,
            "seed": seed, "undefined": int((~np.isfinite(gains)).sum()),
            "candidate_interval": interval(cand), "champion_interval": interval(champ), "gains": gains}
