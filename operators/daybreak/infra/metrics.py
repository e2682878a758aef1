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
scikit-learn with the same ``sample_weight``. With ``clusters`` (one id per row: event day-hour, an
entity) the counts are drawn per cluster and shared by its rows (cluster bootstrap), for rows that
are dependent within a cluster and independent across clusters.

`interval` is the one entry point for an interval of a metric or of a paired gain. Besides the
bootstrap it has analytic intervals from influence functions (`influence`: DeLong's structural
components for ROC AUC, the per-row terms for the mean metrics, the delta method for RMSE) with a
cluster-robust variance (`influence_variance`): normal intervals at the cost of a few evaluations,
where the bootstrap costs hundreds.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from statistics import NormalDist
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


def cluster_index(clusters: Any, n: int) -> tuple[np.ndarray, int]:
    """Dense cluster index (0..G-1, in sorted order of the ids) of each of `n` rows, and G.

    Small non-negative integer ids (the usual day-hour or entity codes) are factorised in O(n) by
    counting; anything else through ``np.unique``. Both give the same index for the same ids.
    """
    ids = np.asarray(clusters)
    if ids.ndim != 1 or len(ids) != n:
        raise ValueError(f"clusters must be one id per row: got shape {ids.shape} for {n} rows")
    if n == 0:
        return np.zeros(0, np.int64), 0
    if np.issubdtype(ids.dtype, np.integer):
        lo, hi = int(ids.min()), int(ids.max())
        if hi - lo <= 4 * n:
            shifted = (ids - lo).astype(np.intp)
            present = np.bincount(shifted) > 0
            dense = np.cumsum(present) - 1
            return dense[shifted], int(present.sum())
    uniq, index = np.unique(ids, return_inverse=True)
    return index.reshape(-1).astype(np.intp), len(uniq)


def _resample(scorers: list[Scorer], n: int, *, resamples: int, seed: int, max_cells: int,
              index: np.ndarray | None = None, groups: int = 0) -> list[np.ndarray]:
    """Each scorer under the same `resamples` Poisson(1) weightings of the rows.

    With ``index`` (the cluster of each row, in the scorers' row layout) the counts are drawn per
    cluster, (k, groups), and every row gets its cluster's count; without it, per row. The draws
    depend only on (seed, resamples, rows, groups): chunking is a function of the row count, and
    each chunk draws from its own stream of the seed, so threads cannot change them.
    """
    chunk = max(1, min(resamples, max_cells // max(n, 1)))
    starts = list(range(0, resamples, chunk))
    streams = np.random.SeedSequence(seed).spawn(len(starts))
    outs = [np.empty(resamples) for _ in scorers]

    def run(i: int) -> None:
        k = min(chunk, resamples - starts[i])
        rng = np.random.default_rng(streams[i])
        w = poisson_counts(rng, k, n) if index is None else np.take(poisson_counts(rng, k, groups), index, axis=1)
        for out, sc in zip(outs, scorers, strict=True):
            out[starts[i]:starts[i] + k] = sc(w)

    # numpy releases the GIL in the sums and sorts
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        list(pool.map(run, range(len(starts))))
    return outs


def _percentile(v: np.ndarray, level: float) -> list[float]:
    """Percentile interval of the finite draws at `level` (nan, nan if none is finite)."""
    alpha = (1 - level) / 2
    ok = v[np.isfinite(v)]
    return [float("nan")] * 2 if not len(ok) else [float(q) for q in np.quantile(ok, [alpha, 1 - alpha])]


def paired_bootstrap(metric: str, y: np.ndarray, candidate: np.ndarray, champion: np.ndarray, *,
                     resamples: int = 1000, level: float = 0.95, seed: int = 0, threshold: float = 0.5,
                     max_cells: int = 2_000_000, clusters: Any = None) -> dict[str, Any]:
    """Paired bootstrap of the gain (candidate vs champion) in `metric` on the same rows.

    Both models are scored on the same resampled rows in every resample. Returns the percentile
    interval of the gain at `level`, the point gain and each model's own interval. The draws depend
    only on (seed, resamples, rows): chunking is a function of the row count, and each chunk
    draws from its own stream of the seed.

    ``clusters`` (one id per row, e.g. the event's day-hour or an entity) makes it a cluster
    (block) bootstrap: one Poisson(1) count per cluster and resample, shared by all its rows, so
    rows that share a shock are resampled together. The assumption is then independence between
    clusters, not between rows; with few clusters (under about 30) the interval is rough. None:
    rows independent, and the draws are exactly those of the row-level bootstrap.
    """
    y = np.asarray(y, np.float64)
    candidate, champion = np.asarray(candidate, np.float64), np.asarray(champion, np.float64)
    n = len(y)
    layout = np.argsort(-candidate, kind="stable") if metric in RANKING else None
    sc = Scorer(metric, y, candidate, threshold, layout)
    sh = Scorer(metric, y, champion, threshold, layout)
    index, groups = _layout_clusters(clusters, n, layout)
    cand, champ = _resample([sc, sh], n, resamples=resamples, seed=seed, max_cells=max_cells,
                            index=index, groups=groups)
    gains = gain(metric, cand, champ)
    ones = np.ones((1, n))
    point = float(gain(metric, sc(ones)[0], sh(ones)[0]))
    lo, hi = _percentile(gains, level)
    return {"metric": metric, "gain": point, "low": lo, "high": hi, "level": level, "resamples": resamples,
            "seed": seed, "undefined": int((~np.isfinite(gains)).sum()),
            "candidate_interval": _percentile(cand, level), "champion_interval": _percentile(champ, level),
            "gains": gains, "clusters": None if index is None else groups}


def bootstrap(metric: str, y: np.ndarray, pred: np.ndarray, *, resamples: int = 1000, level: float = 0.95,
              seed: int = 0, threshold: float = 0.5, max_cells: int = 2_000_000,
              clusters: Any = None) -> dict[str, Any]:
    """One-sample bootstrap of `metric` of `pred`: its percentile interval at `level`.

    The same Poisson(1) resampling as `paired_bootstrap` (per row, or per cluster with
    ``clusters``), for one model. Returns the point value, the interval, the draws ("values") and
    how many resamples left the metric undefined (e.g. no positive drawn).
    """
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    n = len(y)
    layout = np.argsort(-pred, kind="stable") if metric in RANKING else None  # the scorer's own order
    sc = Scorer(metric, y, pred, threshold, layout)
    index, groups = _layout_clusters(clusters, n, layout)
    (values,) = _resample([sc], n, resamples=resamples, seed=seed, max_cells=max_cells, index=index, groups=groups)
    lo, hi = _percentile(values, level)
    return {"metric": metric, "value": float(sc(np.ones((1, n)))[0]), "low": lo, "high": hi, "level": level,
            "resamples": resamples, "seed": seed, "undefined": int((~np.isfinite(values)).sum()),
            "values": values, "clusters": None if index is None else groups}


def _layout_clusters(clusters: Any, n: int, layout: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """The cluster index in the scorers' row layout (a ranking metric's weights are laid out in
    score order, so row j of the weights is row layout[j] of the data), and G."""
    if clusters is None:
        return None, 0
    index, groups = cluster_index(clusters, n)
    return (index if layout is None else index[layout]), groups


# --- analytic intervals: influence functions ------------------------------------------------

ANALYTIC = ("roc_auc", "log_loss", "brier", "mae", "mape", "rmse")
MIN_CLUSTERS = 30  # below this many rows (without clusters) "auto" uses the bootstrap


def influence(metric: str, y: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> tuple[float, np.ndarray]:
    """The metric's value T and its per-row influence values psi_i, so that T - E[T] ~ sum_i psi_i.

    * mean metrics (log_loss, brier, mae, mape): T = (1/n) sum_i t_i with the per-row terms t_i
      of `Scorer`; psi_i = (t_i - T) / n.
    * rmse = sqrt(MSE): delta method, psi_i = psi_i(MSE) / (2 rmse) (psi = 0 when rmse = 0).
    * roc_auc, with m positives and k negatives (labels 0/1): DeLong's structural components,
      V10(i) = (#negatives scored below positive i + half the tied ones) / k and
      V01(j) = (#positives scored above negative j + half the tied ones) / m; T = mean of V10 over
      the positives = the AUC; psi_i = (V10(i) - T) / m for a positive, (V01(j) - T) / k for a
      negative. This is the Hajek projection of the two-sample U-statistic (and the influence
      function of AUC as a functional of the row distribution). The components come from one sort
      of the scores and counts per group of tied scores (equivalent to midranks): O(n log n).

    Other metrics raise ValueError. The sum of psi is 0 by construction.
    """
    if metric not in DIRECTION:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(DIRECTION)}")
    if metric not in ANALYTIC:
        raise ValueError(f"no analytic interval for {metric!r} (supported: {', '.join(ANALYTIC)}); "
                         "use the bootstrap")
    y, p = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    n = len(y)
    if n == 0:
        return float("nan"), np.zeros(0)
    if metric == "roc_auc":
        return _auc_influence(y, p)
    terms = Scorer(metric, y, p, threshold).terms
    mean = float(terms.mean())
    psi = (terms - mean) / n
    if metric == "rmse":
        rmse = math.sqrt(mean)
        return rmse, (psi / (2 * rmse) if rmse > 0 else np.zeros(n))
    return mean, psi


def _auc_influence(y: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """DeLong components per row (see `influence`); nan and psi = 0 when a class is missing."""
    n = len(y)
    pos = y > 0.5
    m = int(pos.sum())
    k = n - m
    if m == 0 or k == 0:
        return float("nan"), np.zeros(n)
    order = np.argsort(p)  # ascending; ties are handled by groups, so the sort need not be stable
    ps, pos_s = p[order], pos[order]
    new = np.empty(n, bool)
    new[0] = True
    np.not_equal(ps[1:], ps[:-1], out=new[1:])
    neg_upto: np.ndarray = np.cumsum(~pos_s)  # negatives up to and including each row
    pos_upto: np.ndarray = np.cumsum(pos_s)  # positives likewise
    v10: np.ndarray
    v01: np.ndarray
    if new.all():  # no tied scores: the counts of each row
        v10 = (neg_upto - ~pos_s) / k  # negatives strictly below
        v01 = (m - pos_upto) / m  # positives strictly above
    else:  # per group of tied scores: negatives below the group + half of the group's, and so on
        gid = np.cumsum(new) - 1
        first = np.flatnonzero(new)
        last = np.r_[first[1:], n] - 1
        neg_before = neg_upto[first] - ~pos_s[first]
        pos_before = pos_upto[first] - pos_s[first]
        neg_g, pos_g = neg_upto[last] - neg_before, pos_upto[last] - pos_before
        v10 = ((neg_before + 0.5 * neg_g) / k)[gid]
        v01 = ((m - pos_upto[last] + 0.5 * pos_g) / m)[gid]
    auc = float(v10[pos_s].sum() / m)
    psi_s = np.where(pos_s, (v10 - auc) / m, (v01 - auc) / k)
    psi = np.empty(n)
    psi[order] = psi_s
    return auc, psi


def influence_variance(psi: np.ndarray, index: np.ndarray | None = None, groups: int = 0,
                       strata: np.ndarray | None = None) -> float:
    """Variance of sum_i psi_i, robust to dependence within clusters.

    With clusters (``index`` of each row, G = ``groups``): G/(G-1) * sum_c (sum_{i in c} psi_i)^2,
    the cluster-robust (CR1-type) sandwich; it assumes independent clusters, any dependence within
    one. Without: each row its own cluster, n/(n-1) * sum_i psi_i^2; with ``strata`` (a boolean
    per row, the AUC's classes) the factor is per stratum, n_s/(n_s-1) * sum_{i in s} psi_i^2,
    which for the AUC is exactly DeLong's S10/m + S01/k. nan when there are fewer than 2 clusters
    (or rows in a stratum).
    """
    if index is not None:
        if groups < 2:
            return float("nan")
        sums = np.bincount(index, weights=psi, minlength=groups)
        return float(groups / (groups - 1) * (sums @ sums))
    parts = [psi] if strata is None else [psi[strata], psi[~strata]]
    total = 0.0
    for part in parts:
        if len(part) < 2:
            return float("nan")
        total += len(part) / (len(part) - 1) * float(part @ part)
    return total


MIN_VALID_CLUSTERS = 10  # fewer clusters: no interval (the cluster-robust variance and bootstrap break down)


def _quantile(level: float, clusters: int | None) -> float:
    """The two-sided critical value: Student's t with G-1 degrees of freedom for G clusters (the
    normal quantile undercovers at a few dozen clusters), the normal one for independent rows."""
    if clusters is None:
        return NormalDist().inv_cdf(0.5 + level / 2)
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, clusters - 1))


def interval(metric: str, y: np.ndarray, pred: np.ndarray, other: np.ndarray | None = None, *,
             clusters: Any = None, level: float = 0.95, method: str = "auto", resamples: int = 1000,
             seed: int = 0, threshold: float = 0.5) -> dict[str, Any]:
    """Two-sided interval at `level` for `metric` of `pred`, or, with `other`, for the paired gain
    of `pred` over `other` on the same rows (signed as `gain`: positive = `pred` better).

    method:
      * "analytic": value +- q * sqrt(V), q the normal quantile (Student's t with G-1 degrees of
        freedom with G clusters), V = `influence_variance` of the
        influence values (`influence`; paired: psi = gain(psi_pred, psi_other), i.e. psi_pred -
        psi_other if higher is better, else psi_other - psi_pred). Supported: ANALYTIC (roc_auc by
        DeLong, the mean metrics by the CLT, rmse by the delta method); assumes enough clusters
        (or rows) for the normal approximation. ValueError for other metrics.
      * "bootstrap": percentile interval of `resamples` Poisson(1) resamples (`paired_bootstrap`
        or `bootstrap`), per cluster when `clusters` is given.
      * "auto": analytic when the metric supports it, there are at least MIN_VALID_CLUSTERS clusters
        (MIN_CLUSTERS rows, without clusters) and, for roc_auc, both classes are present; else the
        bootstrap. (With clusters the t quantile makes the analytic interval the better of the two
        at a few dozen clusters; the cluster bootstrap undercovers there as well.)

    ``clusters``: one id per row (day-hour, entity, ...); rows of a cluster may be dependent,
    clusters are assumed independent. None: rows independent.

    Returns {"metric", "value", "low", "high", "level", "method", "rows", "clusters" (G or None),
    "undefined" (bootstrap resamples where the statistic is undefined; 0 for analytic), "gains"
    (the bootstrap draws of the statistic, None for analytic), "resamples" (None for analytic),
    "seed", "se" (the standard error: sqrt(V), or the draws' sd), "df" (G-1 with clusters, else
    None)}. Undefined cases (0 rows, one class for the AUC, fewer than MIN_VALID_CLUSTERS clusters,
    non-finite labels or predictions) give nan bounds (and a "reason"), never an exception.
    """
    if metric not in DIRECTION:
        raise ValueError(f"unknown metric {metric!r}; known: {sorted(DIRECTION)}")
    if method not in ("auto", "analytic", "bootstrap"):
        raise ValueError(f"method must be 'auto', 'analytic' or 'bootstrap', not {method!r}")
    if method == "analytic" and metric not in ANALYTIC:
        raise ValueError(f"no analytic interval for {metric!r} (supported: {', '.join(ANALYTIC)}); "
                         "use method='bootstrap' or 'auto'")
    y, pred = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    n = len(y)
    index, groups = (None, 0) if clusters is None else cluster_index(clusters, n)
    finite = np.isfinite(y).all() and np.isfinite(pred).all() and (other is None or np.isfinite(other).all())
    if not finite or (index is not None and groups < MIN_VALID_CLUSTERS):
        # Non-finite labels or predictions have no honest interval (the two paths would even order
        # them differently); too few clusters give a degenerate one (one cluster: every resample is
        # the point estimate). Either way: nan, which no rule passes.
        nan = float("nan")
        return {"metric": metric, "level": level, "method": "none", "rows": n, "se": nan, "df": None,
                "clusters": None if index is None else groups, "seed": seed, "value": nan, "low": nan, "high": nan,
                "undefined": 0, "gains": None, "resamples": None,
                "reason": ("non-finite labels or predictions" if not finite else
                           f"{groups} clusters; at least {MIN_VALID_CLUSTERS} are needed")}
    if method == "auto":
        enough = groups >= MIN_VALID_CLUSTERS if index is not None else n >= MIN_CLUSTERS
        both = metric != "roc_auc" or 0 < int((y > 0.5).sum()) < n
        method = "analytic" if metric in ANALYTIC and enough and both else "bootstrap"
    out: dict[str, Any] = {"metric": metric, "level": level, "method": method, "rows": n,
                           "clusters": None if index is None else groups, "seed": seed}
    if method == "bootstrap":
        if other is None:
            b = bootstrap(metric, y, pred, resamples=resamples, level=level, seed=seed, threshold=threshold,
                          clusters=clusters)
            value, draws = b["value"], b["values"]
        else:
            b = paired_bootstrap(metric, y, pred, other, resamples=resamples, level=level, seed=seed,
                                 threshold=threshold, clusters=clusters)
            value, draws = b["gain"], b["gains"]
        ok = draws[np.isfinite(draws)]
        se = float(ok.std(ddof=1)) if len(ok) > 1 else float("nan")
        return out | {"value": value, "low": b["low"], "high": b["high"], "undefined": b["undefined"],
                      "gains": draws, "resamples": resamples, "se": se, "df": None if index is None else groups - 1}
    value, psi = influence(metric, y, pred, threshold)
    if other is not None:
        value_o, psi_o = influence(metric, y, other, threshold)
        value, psi = float(gain(metric, value, value_o)), gain(metric, psi, psi_o)
    strata = (y > 0.5) if metric == "roc_auc" and index is None else None
    var = influence_variance(psi, index, groups, strata) if n else float("nan")
    half = _quantile(level, groups if index is not None else None) * math.sqrt(var) if math.isfinite(var) \
        else float("nan")
    low, high = (value - half, value + half) if math.isfinite(value) else (float("nan"),) * 2
    return out | {"value": value, "low": float(low), "high": float(high), "undefined": 0, "gains": None,
                  "resamples": None, "se": math.sqrt(var) if math.isfinite(var) else float("nan"),
                  "df": None if index is None else groups - 1}


MIN_HISTORY_DAYS = 10  # recorded days before the day-to-day spread is estimated rather than assumed
ASSUMED_SPREAD = 2.0  # before then: the spread's variance taken as this many times the holdout's own


def day_spread(values: Any, ses: Any, days: Any = None, lag: int = 1) -> tuple[float, int]:
    """How much a daily quantity (a gain, a metric) varies from gate to gate beyond its own error:
    tau^2 = max(0, MSSD/2 - median(se^2)), from its estimates oldest first and their standard
    errors. MSSD/2 (von Neumann: the mean squared successive difference, halved) estimates the
    variance of one estimate around its local level; successive differences cancel a slow drift of
    that level (a champion aging, a trend). With holdouts of k days, successive gates share k-1
    days and move less than disjoint ones: differences are then taken `lag` = k days apart (by
    `days`, ISO dates; by position without them), between holdouts that share none. The median
    keeps one wild se (a corrupt record) from cancelling the spread. Returns (tau^2, differences
    + 1); tau^2 is nan below MIN_HISTORY_DAYS."""
    v, s = np.asarray(values, np.float64), np.asarray(ses, np.float64)
    ok = np.isfinite(v) & np.isfinite(s) & (s >= 0)
    if days is None:
        at = np.arange(len(v))
    else:
        from datetime import date

        at = np.array([date.fromisoformat(str(d)[:10]).toordinal() for d in days], np.int64)
    v, s, at = v[ok], s[ok], at[ok]
    where = {int(a): i for i, a in enumerate(at)}
    pairs = [(i, where[int(a) + lag]) for i, a in enumerate(at) if int(a) + lag in where]
    n = len(pairs) + 1
    if n < MIN_HISTORY_DAYS:
        return float("nan"), n
    diffs = np.array([v[j] - v[i] for i, j in pairs])
    mssd = float(np.mean(diffs**2)) / 2
    return max(0.0, mssd - float(np.median(s**2))), n


def spread_df(n: int, tau2: float, se2: float) -> float:
    """Effective degrees of freedom of `day_spread`'s tau^2 from n days: MSSD/2 has about
    2(n-1)^2/(3n-4) (von Neumann's ratio), and subtracting se2 keeps its noise, that of
    tau^2 + se2, while shrinking its size to tau^2."""
    base = 2 * (n - 1) ** 2 / (3 * n - 4)
    return base * (tau2 / (tau2 + se2)) ** 2 if tau2 + se2 > 0 else base


def added_variance(values: Any, ses: Any, se: float, df: float | None, days: Any = None,
                   lag: int = 1) -> dict[str, Any]:
    """What the day-to-day spread adds to a holdout interval of standard error `se` (with `df`
    degrees of freedom, None: normal), from earlier gates' estimates of the same quantity on
    holdouts of the same size (`values`, `ses`, oldest first): `day_spread`, the variance of one
    gate's estimate from gate to gate beyond its own error. It holds the day effects (averaged over
    the holdout's days, as this estimate's are) and the models' own difference (a seed, a sample),
    which no holdout averages away; `days` and `lag` (the holdout's days) as `day_spread` takes
    them. Below MIN_HISTORY_DAYS gates: ASSUMED_SPREAD * se^2, with the
    holdout's own df. Returns {"source": "history" | "assumed", "extra", "df" (of the widened
    interval: Welch-Satterthwaite with `spread_df`), "sd", "days"}."""
    total, n = day_spread(values, ses, days, lag)
    if not math.isfinite(total):
        return {"source": "assumed", "extra": ASSUMED_SPREAD * se * se, "df": df, "sd": None, "days": n}
    s = np.asarray(ses, np.float64)
    se2 = float(np.median(s[np.isfinite(s) & (s >= 0)] ** 2))
    parts = [(se * se, df), (total, spread_df(n, total, se2))]
    both = se * se + total
    denom = sum((a / both) ** 2 / d for a, d in parts if d is not None and d > 0)  # scaled: no overflow
    return {"source": "history", "extra": total, "df": 1 / denom if denom > 0 else None, "sd": math.sqrt(total),
            "days": n}


def widen(iv: dict[str, Any], extra: float, df: float | None) -> dict[str, Any]:
    """`iv` (from `interval`) with `extra` variance added to its own se^2 (e.g. from
    `added_variance`), its quantile Student's t with `df` degrees of freedom (None: normal).
    Analytic: value +- q * sqrt(se^2 + extra); bootstrap: each percentile end moved away from the
    point by sqrt(se^2 + extra) / se * q / z, which keeps the interval's asymmetry. Unchanged when
    extra is 0 or not finite, or the interval has no standard error."""
    se = iv.get("se", float("nan"))
    if not (extra > 0 and math.isfinite(extra) and math.isfinite(se) and se > 0) or iv["method"] == "none":
        return iv
    from scipy.stats import t

    total = se * se + extra
    v = iv["value"]
    z = NormalDist().inv_cdf(0.5 + iv["level"] / 2)
    q = float(t.ppf(0.5 + iv["level"] / 2, df)) if df is not None else z
    if iv["method"] == "bootstrap":
        f = math.sqrt(total) / se * q / z
        low, high = v - (v - iv["low"]) * f, v + (iv["high"] - v) * f
    else:
        half = q * math.sqrt(total)
        low, high = v - half, v + half
    # never narrower than the holdout's own (a t of more df could otherwise shave a few clusters' worth)
    return iv | {"low": min(low, iv["low"]), "high": max(high, iv["high"]), "se": math.sqrt(total), "df": df}
