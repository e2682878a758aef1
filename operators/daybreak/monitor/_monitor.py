"""Monitor: the model in service, judged on what it actually served, once the labels are in.

For a logical date D (run after D's data was staged and its features built, before retraining):

1. **Live quality.** The prediction log's rows for D (``predlog.py``; partitions D-1..D+1, so a
   client's clock or time zone cannot hide a row) and the date's batch predictions (``score.py``) are
   joined with D's labels, which arrived with D's staged data (the feature partition holds them),
   on the row identity (``monitoring.log.id_columns``). The gate's metrics are computed per
   source (online, batch) and model version, and per slice.
2. **Drift.** The population stability index of every feature, served inputs (the log's days
   ``monitoring.drift.window_days`` up to D, default the training window's length) against the
   champion's training window, on seeded samples of at most
   ``monitoring.drift.sample_rows`` rows a side (the PSI of 10 bins is stable far below that).
   Above ``warn_psi``: a warning; above ``block_psi``: the step fails after recording, so nothing
   is trained or promoted on inputs the model never saw until a person looks.
3. **Automatic rollback.** On the champion's labelled rows of the last
   ``monitoring.rollback.window_days`` days (rows of one day share its weather and traffic, so one
   day alone overstates the confidence), ``previous`` scores the very inputs the champion was
   given, and the gate's intervals (``metrics.interval``: analytic or bootstrap, by gate.bootstrap.cluster_by)
   give the bounds. The champion is
   rolled back when its whole interval is past the floor (``monitoring.rollback.floor``, default
   ``gate.floor``) and ``previous`` does not share the problem on those rows (if it does, the
   inputs are at fault: an alert), or when the interval of its gain over ``previous`` lies below
   ``-margin`` (clearly worse).
   The rollback is the ordinary one (lock, audit event, the server follows the alias), and only
   if the champion is still the version judged.

Everything is recorded: an MLflow run per monitoring (experiment ``<spec>-monitor``: metrics per
version and slice, drift, ``monitor.json``), an audit event (``monitor``; ``rollback`` when it
acted), and a notification (``monitoring.notify``) for a rollback, a champion below its floor that
could not be rolled back, or a blocking drift.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

from daybreak.deploy import ONLINE
from daybreak.infra import metrics, registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import DaybreakError, MissingInputError
from daybreak.infra.records import Tag
from daybreak.spec import Spec

if TYPE_CHECKING:
    from daybreak.promote import RollbackResult

log = logging.getLogger(__name__)

BATCH = "batch"
MAX_BOOTSTRAP_ROWS = 200_000  # a seeded subsample beyond this: the interval only widens (more cautious)


class DriftBlocked(DaybreakError):
    """Served inputs drifted past ``monitoring.drift.block_psi``; recorded, nothing else runs."""


def monitor_experiment(spec: Spec) -> str:
    return f"{spec.name}-monitor"


# --- reading and joining ------------------------------------------------------------------------

def _canonical(s: Any, like: Any) -> Any:
    """Values of an identity column in one comparable form: numbers as float, times as UTC
    nanoseconds, everything else as text (the log keeps what the client sent, as text)."""
    import pandas as pd

    if isinstance(like.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(like.dtype):
        if pd.api.types.is_datetime64_any_dtype(s.dtype):
            out = pd.to_datetime(s, utc=True)
        else:
            out = pd.to_datetime(s.astype("string"), utc=True, errors="coerce", format="ISO8601")
        return out.astype("datetime64[ns, UTC]")
    if pd.api.types.is_numeric_dtype(like.dtype):
        return pd.to_numeric(s, errors="coerce").astype("float64")
    return s.astype("string")


def _labelled(spec: Spec, ctx: RunContext, cut: date | None = None) -> Any:
    """D's feature rows whose label is known by the end of `cut` (default D): identity, label,
    features (the labels arrived with D's staged data, or later: ``features.label.known_at``).
    The frame's ``attrs["immature_rows"]`` counts the rows left out."""
    from daybreak.features import mature_rows, read_features

    t, _, _ = read_features(spec, ctx, [ctx.logical_date])
    if t is None:
        raise MissingInputError(f"monitor: no feature partition for {ctx.logical_date} (it holds the labels); "
                                "run the stage and features steps first")
    t, immature = mature_rows(spec, t, cut or ctx.logical_date)
    assert t is not None
    frame = t.to_pandas()
    frame.attrs["immature_rows"] = immature
    return frame


def _online(spec: Spec, ctx: RunContext, judged: date | None = None) -> tuple[Any, Any]:
    """The log's rows around the judged day (default D; for the join), and the served inputs of
    the drift window ending on D."""
    from daybreak.deploy import read_log

    d = ctx.logical_date
    j = judged or d
    near = read_log(spec, ctx.store, [j - timedelta(days=1), j, j + timedelta(days=1)])
    c = spec.monitoring.drift
    served = None
    if c is not None:
        n = c.window_days or spec.training.window_days
        names = c.features or spec.features.feature_names()
        served = read_log(spec, ctx.store, [d - timedelta(days=k) for k in range(n - 1, -1, -1)], columns=names)
    return (None if near is None else near.to_pandas()), (None if served is None else served.to_pandas())


def _batch(spec: Spec, ctx: RunContext) -> Any:
    from daybreak.score import prediction_zone

    part = ctx.store.partition(prediction_zone(spec), ctx.logical_date)
    if part is None:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(f, filesystem=ctx.store.fs) for f in part.files])
    return t.to_pandas()


def joined_rows(spec: Spec, ctx: RunContext, labelled: Any, online: Any, batch: Any) -> Any:
    """Every logged prediction of D that has its label: identity, label, source, model_version,
    prediction, the features the model was given, and the slice columns."""
    import pandas as pd

    f = spec.features
    label, names = f.label.name, f.feature_names()
    ids = [c for c in spec.id_columns() if c in labelled.columns]
    slices = [c for c in _slice_columns(spec) if c in labelled.columns]
    frames = []
    conflicting = 0
    if online is not None and ids and all(c in online.columns for c in ids):
        left = online.copy()
        right = labelled[list(dict.fromkeys([*ids, label, *[c for c in slices if c not in online.columns]]))].copy()
        for c in ids:
            left[c], right[c] = _canonical(left[c], labelled[c]), _canonical(right[c], labelled[c])
        # on the canonical identity: the same row spelled another way is the same identity
        left, conflicting = _without_conflicts(left, ids, names)
        if conflicting:
            log.warning("monitor %s: %d row identities were logged more than once with different inputs or "
                        "predictions (forged or mixed-up identities); none of their rows is judged",
                        ctx.logical_date, conflicting)
        m = left.dropna(subset=ids).merge(right, on=ids, how="inner")
        m["source"] = m["source"].fillna(ONLINE)
        frames.append(m)
    elif online is not None:
        log.warning("monitor %s: the logged requests carry no %s; labels cannot be joined (drift only)",
                    ctx.logical_date, ids or spec.id_columns())
    if batch is not None:
        keys = [c for c in [*f.keys, "event_time"] if c in batch.columns and c in labelled.columns]
        right = labelled[list(dict.fromkeys([*keys, label, *names, *slices]))]
        m = batch[[*keys, "prediction", "model_version"]].merge(right, on=keys, how="inner")
        m["source"] = BATCH
        frames.append(m)
    if not frames:
        return None
    out = pd.concat(frames, ignore_index=True)
    key = [c for c in ids if c in out.columns] or [c for c in f.keys if c in out.columns]
    # a request sent twice (a client's retry: same inputs, same answer) counts once per version and source
    out = out.drop_duplicates(subset=[*key, "source", "model_version"], keep="last").reset_index(drop=True)
    out.attrs["conflicting_identities"] = conflicting
    return out


def _without_conflicts(online: Any, ids: list[str], features: list[str]) -> tuple[Any, int]:
    """The log's rows less every identity logged with more than one set of inputs or predictions
    for one version, and how many such identities there were. A retry repeats its row exactly;
    two different rows under one identity are a forgery or a client's mix-up, and neither may be
    judged against the label (keeping the last one let forged rows drive a rollback)."""
    key = [*ids, "model_version"]
    content = [c for c in [*features, "prediction"] if c in online.columns]
    counts = online.drop_duplicates(subset=[*key, *content]).groupby(key, dropna=False, sort=False).size()
    bad = counts[counts > 1]
    if bad.empty:
        return online, 0
    return online[~online.set_index(key).index.isin(bad.index)], len(bad)


def _slice_columns(spec: Spec) -> list[str]:
    return list(spec.monitoring.slices if spec.monitoring.slices is not None else spec.gate.slices.columns)


def _window_rows(spec: Spec, ctx: RunContext, today: Any, champion: str, cut: date | None = None) -> Any:
    """The champion's labelled rows of the rollback window: today's, and those of the days before
    it (``monitoring.rollback.window_days``) whose labels are in."""
    import pandas as pd

    from daybreak.deploy import read_log

    parts = [today[today["model_version"].astype(str) == champion]]
    n = spec.monitoring.rollback.window_days
    # the log of the whole window read once: the identity (event time) ties each row to its day
    logged = read_log(spec, ctx.store, [ctx.logical_date - timedelta(days=k) for k in range(n, -1, -1)]) \
        if n > 1 else None
    online = None if logged is None else logged.to_pandas()
    for k in range(1, n):
        day = replace(ctx, logical_date=ctx.logical_date - timedelta(days=k))
        batch = _batch(spec, day)
        if online is None and batch is None:
            continue
        try:
            labelled = _labelled(spec, day, cut=cut or ctx.logical_date)
        except MissingInputError:
            continue
        rows = joined_rows(spec, day, labelled, online, batch)
        if rows is not None and len(rows):
            rows = rows[rows["model_version"].astype(str) == champion]
            parts.append(rows.assign(monitor_date=day.logical_date.isoformat()))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


# --- live quality ---------------------------------------------------------------------------

def _scores(spec: Spec, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    return {m: metrics.evaluate(m, y, pred, spec.gate.threshold) for m in metrics.metrics_for(spec.model.task)}


def live_quality(spec: Spec, rows: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Metrics per (source, version), and per slice of each."""
    label = spec.features.label.name
    min_rows = spec.gate.slices.min_rows
    per_version, per_slice = [], []
    for (source, version), g in rows.groupby(["source", "model_version"], sort=True):
        y, p = g[label].to_numpy(np.float64), g["prediction"].to_numpy(np.float64)
        per_version.append({"source": source, "version": str(version), "rows": len(g),
                            "label_mean": float(y.mean()) if len(y) else math.nan, "metrics": _scores(spec, y, p)})
        for col in _slice_columns(spec):
            if col not in g.columns:
                continue
            for value, s in g.groupby(g[col].astype("string").fillna("(null)"), sort=True):
                if len(s) < min_rows:
                    continue
                per_slice.append({"source": source, "version": str(version), "column": col, "value": str(value),
                                  "rows": len(s), "metrics": _scores(spec, s[label].to_numpy(np.float64),
                                                                     s["prediction"].to_numpy(np.float64))})
    return per_version, per_slice


# --- drift ------------------------------------------------------------------------------------

def served_drift(spec: Spec, ctx: RunContext, served: Any,
                 champion_tags: dict[str, str]) -> tuple[str, list[dict[str, Any]]]:
    """PSI per feature, served inputs vs the champion's training window; ('pass'|'warn'|'block'|'skip', rows)."""
    from daybreak.gate import Days, psi, window_days

    c = spec.monitoring.drift
    if c is None or served is None or not len(served):
        return "skip", []
    days = window_days(champion_tags)
    names = [n for n in (c.features or spec.features.feature_names()) if n in served.columns]
    if not days or not names:
        return "skip", []
    expected = Days(spec, ctx, names, max(100, c.sample_rows // len(days)), c.bins).window(days)
    if expected is None or not len(expected["sample"]):
        return "skip", []
    if len(served) > c.sample_rows:
        served = served.sample(n=c.sample_rows, random_state=0)
    categorical = set(spec.features.categorical_names())
    out: list[dict[str, Any]] = []
    for n in names:
        v = psi(expected["sample"][n], served[n], c.bins, n in categorical)
        out.append({"feature": n, "psi": v, "verdict": "block" if c.block_psi is not None and v > c.block_psi
                    else "warn" if v > c.warn_psi else "pass"})
    out.sort(key=lambda r: -r["psi"])
    worst = "block" if any(r["verdict"] == "block" for r in out) else "warn" if any(
        r["verdict"] == "warn" for r in out) else "pass"
    return worst, out


# --- rollback -------------------------------------------------------------------------------

def _past(metric: str, value: float, bound: float) -> bool:
    """Whether `value` is on the wrong side of `bound` (below a floor, above a ceiling)."""
    return math.isfinite(value) and (value < bound if metrics.DIRECTION[metric] else value > bound)


def judge_champion(spec: Spec, ctx: RunContext, rows: Any, champion: str, previous: str | None) -> dict[str, Any]:
    """Whether the champion's labelled live rows (of the rollback window) call for a rollback to
    `previous` (see the module docstring).

    * floor: the champion's whole interval (bootstrap, ``rollback.level``) is past the floor, and
      ``previous`` is not past it on the same rows; if it is, the inputs are at fault: an alert;
    * clearly worse: the interval of the champion's gain over ``previous`` on the same rows lies
      below ``-rollback.margin``.
    """
    r = spec.monitoring.rollback
    metric, floor = spec.live_metric(), spec.live_floor()
    mine = rows[rows["model_version"].astype(str) == champion]
    days = sorted({str(d) for d in mine["monitor_date"]}) if "monitor_date" in mine.columns else []
    out: dict[str, Any] = {"metric": metric, "champion_version": champion, "previous_version": previous,
                           "rows": len(mine), "days": days, "floor": floor, "rollback": False, "reasons": [],
                           "alerts": []}
    if len(mine) < r.min_rows:
        out["reasons"].append(f"{len(mine)} labelled live rows of v{champion} < monitoring.rollback.min_rows="
                              f"{r.min_rows}: not judged")
        return out
    if spec.model.task == "classification":
        labels = mine[spec.features.label.name].to_numpy(np.float64)
        least = int(min((labels == 1).sum(), (labels == 0).sum()))
        if least < spec.gate.min_class_rows:  # the gate's minimum: intervals run narrow below it
            out["reasons"].append(f"{least} labelled live rows of the rarer class < gate.min_class_rows="
                                  f"{spec.gate.min_class_rows}: not judged")
            return out
    if len(mine) > MAX_BOOTSTRAP_ROWS:
        mine = mine.sample(n=MAX_BOOTSTRAP_ROWS, random_state=r.seed)
    y = mine[spec.features.label.name].to_numpy(np.float64)
    served = mine["prediction"].to_numpy(np.float64)
    theirs = None
    if previous is not None:
        model = registry.load_model(ctx, spec.model.name, previous)
        theirs = np.asarray(model.predict(mine[spec.features.feature_names()].reset_index(drop=True)), np.float64)
    # the gate's interval machinery and resampling unit (gate.bootstrap: method, cluster_by)
    from daybreak.gate import clusters_for

    clusters, unit = clusters_for(spec, mine.reset_index(drop=True))
    conf = spec.gate.bootstrap
    method = conf.method if conf is not None else "auto"

    def interval(other: np.ndarray | None) -> dict[str, Any]:
        return metrics.interval(metric, y, served, other, clusters=clusters, level=r.level, method=method,
                                resamples=r.resamples, seed=r.seed, threshold=spec.gate.threshold)

    own = interval(None)
    value = metrics.evaluate(metric, y, served, spec.gate.threshold)
    low, high = own["low"], own["high"]
    out |= {"champion_metric": value, "champion_interval": [low, high], "interval_method": own["method"],
            "interval_unit": unit}
    span = f"{len(mine)} rows of {len(days) or 1} day(s)"
    below = floor is not None and _past(metric, high if metrics.DIRECTION[metric] else low, floor)
    if theirs is None:
        if below:
            out["alerts"].append(f"live {metric} of v{champion} {value:.4f} (interval [{low:.4f}, {high:.4f}], {span}) "
                                 f"is past the floor {floor:g}; there is no {spec.promotion.previous_alias!r} "
                                 "version to roll back to")
        return out
    prev_value = metrics.evaluate(metric, y, theirs, spec.gate.threshold)
    iv = interval(theirs)
    boot = {"metric": metric, "gain": iv["value"], "low": iv["low"], "high": iv["high"], "level": iv["level"],
            "method": iv["method"], "unit": unit, "clusters": iv.get("clusters"), "resamples": iv.get("resamples"),
            "seed": iv.get("seed"), "undefined": iv["undefined"]}
    out |= {"previous_metric": prev_value, "bootstrap": boot}
    clearly_worse = math.isfinite(boot["high"]) and boot["high"] < -r.margin
    prev_below = floor is not None and _past(metric, prev_value, floor)
    if clearly_worse:
        out["reasons"].append(
            f"live {metric} of v{champion} {value:.4f} vs {prev_value:.4f} for v{previous} on the same {span}: "
            f"the {r.level:.0%} interval of the gain [{boot['low']:.4f}, {boot['high']:.4f}] lies below -{r.margin:g}")
    if below and not prev_below:
        out["reasons"].append(f"live {metric} of v{champion} {value:.4f} (interval [{low:.4f}, {high:.4f}], {span}) "
                              f"is past the floor {floor:g}; v{previous} has {prev_value:.4f}")
    elif below:
        out["alerts"].append(f"live {metric} of v{champion} {value:.4f} is past the floor {floor:g}, and so is "
                             f"v{previous} on the same {span} ({prev_value:.4f}): the inputs, not the model, look "
                             "at fault; not rolled back")
    act = clearly_worse or (below and not prev_below)
    out["rollback"] = bool(r.enabled and act)
    if act and not r.enabled:
        out["alerts"].append("monitoring.rollback.enabled is false: not rolled back")
    return out


# --- recording and notifying ---------------------------------------------------------------

def _key(*parts: str) -> str:
    """An MLflow metric key (letters, digits, _ - . / space and : only)."""
    return "/".join(re.sub(r"[^\w\-. :]", "_", str(p)) for p in parts)


def _record_run(spec: Spec, ctx: RunContext, result: MonitorResult) -> str:
    import mlflow

    registry.setup_tracking(ctx, monitor_experiment(spec))
    day = ctx.logical_date.isoformat()
    values: dict[str, float] = {}
    for v in result["versions"]:
        values[_key("live", v["source"], f"v{v['version']}", "rows")] = v["rows"]
        for m, x in v["metrics"].items():
            values[_key("live", v["source"], f"v{v['version']}", m)] = x
    for s in result["slices"]:
        for m, x in s["metrics"].items():
            values[_key("slice", s["source"], f"v{s['version']}", s["column"], s["value"], m)] = x
    for d in result["drift"]:
        values[_key("drift", "psi", d["feature"])] = d["psi"]
    with mlflow.start_run(run_name=f"monitor-{day}") as run:
        mlflow.set_tags({Tag.MONITOR_DATE: day, Tag.MONITOR_ACTION: result["action"],
                         Tag.MONITOR_CHAMPION_VERSION: result["champion_version"] or "none",
                         Tag.MONITOR_DRIFT: result["drift_verdict"],
                         Tag.MONITOR_REASONS: "; ".join(result["reasons"] + result["alerts"])[:4000] or "-",
                         Tag.RUN_CONTEXT: ctx.run_id})
        finite = {k: float(x) for k, x in values.items() if x is not None and math.isfinite(x)}
        for i in range(0, len(finite), 500):
            mlflow.log_metrics(dict(list(finite.items())[i:i + 500]))
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "monitor.json"
            p.write_text(json.dumps(result, indent=2, default=str))
            mlflow.log_artifact(str(p))
        return run.info.run_id


def notify(spec: Spec, event: dict[str, Any]) -> bool:
    """POST `event` as JSON to the spec's webhook; True if it answered 2xx. Never raises: a
    notification that fails is logged, and what it reports is recorded anyway."""
    import urllib.request

    n = spec.monitoring.notify
    url = n.webhook or (os.environ.get(n.webhook_env) if n.webhook_env else None)
    if not url:
        return False
    req = urllib.request.Request(url, data=json.dumps(event, default=str).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "daybreak"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            ok = 200 <= resp.status < 300
    except Exception as e:  # the URL may hold a token: name only the host
        from urllib.parse import urlsplit

        log.warning("monitor: notification to %s failed: %s", urlsplit(url).hostname, type(e).__name__)
        return False
    return ok


# --- the step -------------------------------------------------------------------------------

class MonitorResult(TypedDict, total=False):
    """What ``monitor_model`` returns (and the orchestrators pass on)."""

    step: str
    date: str
    model: str
    action: str  # none | alert | rollback
    reason: str  # nothing to judge: why
    champion_version: str | None
    previous_version: str | None
    metric: str  # the live metric judged
    rows_logged: int
    rows_batch: int
    rows_labelled: int
    rows_immature: int  # rows of the date whose labels are not known yet (left out)
    labels_of: str  # the day whose labels are judged (label.known_at delays it)
    versions: list[dict[str, Any]]  # per (source, version): rows, label_mean, metrics
    slices: list[dict[str, Any]]  # per (source, version, slice column, value)
    drift_verdict: str  # pass | warn | block | skip
    drift: list[dict[str, Any]]  # per feature: psi, verdict
    judgement: dict[str, Any]  # judge_champion's
    reasons: list[str]  # for a rollback
    alerts: list[str]
    warnings: list[str]
    pruned: list[str]  # prediction log partitions deleted (retention)
    rollback: RollbackResult | None  # rollback_model's, when it rolled back
    conflicting_identities: int
    run_id: str  # the monitoring's MLflow run
    notification: dict[str, Any]  # the event sent to monitoring.notify
    notified: bool


def monitor_model(spec: Spec, ctx: RunContext) -> MonitorResult:
    """Live quality, drift and (when called for) an automatic rollback for the logical date."""
    from daybreak.deploy import prune
    from daybreak.infra.audit import record_event
    from daybreak.promote import rollback_model

    name, day = spec.model.name, ctx.logical_date.isoformat()
    base: MonitorResult = {"step": "monitor", "date": day, "model": name}
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    champ = registry.alias_version(cl, name, spec.promotion.alias)
    prev = registry.alias_version(cl, name, spec.promotion.previous_alias)
    champion, previous = (None if champ is None else str(champ.version)), (None if prev is None else str(prev.version))
    pruned = prune(spec, ctx.store, ctx.logical_date)
    # Labels that take days to be known are judged on the newest day whose labels are in (the
    # predictions served then); drift is judged on the date's own inputs.
    judged = ctx if spec.label_lag_days() == 0 else replace(ctx, logical_date=spec.labelled_day(ctx.logical_date))
    online, served = _online(spec, ctx, judged.logical_date)
    batch = _batch(spec, judged)
    if online is None and batch is None:
        log.info("monitor %s: no predictions logged or batch-scored for this date; nothing to judge", day)
        return base | {"action": "none", "champion_version": champion, "rows_logged": 0, "rows_labelled": 0,
                       "reason": "no predictions logged or batch-scored for this date", "pruned": pruned}
    labelled = _labelled(spec, judged, cut=ctx.logical_date)
    rows = joined_rows(spec, judged, labelled, online, batch)
    conflicting = 0 if rows is None else rows.attrs.get("conflicting_identities", 0)
    if rows is not None:
        rows["monitor_date"] = day
    versions, slices = live_quality(spec, rows) if rows is not None and len(rows) else ([], [])
    drift_verdict, drift = ("skip", []) if champ is None else served_drift(spec, ctx, served, dict(champ.tags))
    verdict: dict[str, Any] = {"rollback": False, "reasons": [], "alerts": []}
    if champion is not None and rows is not None and len(rows):
        window = _window_rows(spec, judged, rows, champion, cut=ctx.logical_date)
        verdict = judge_champion(spec, ctx, window, champion, previous)
    result = base | {
        "champion_version": champion, "previous_version": previous, "metric": spec.live_metric(),
        "rows_logged": 0 if online is None else len(online), "rows_batch": 0 if batch is None else len(batch),
        "rows_labelled": 0 if rows is None else len(rows), "versions": versions, "slices": slices,
        "rows_immature": int(labelled.attrs.get("immature_rows", 0)),
        "labels_of": judged.logical_date.isoformat(),  # the day judged: its labels are in by the date's end
        "drift_verdict": drift_verdict, "drift": drift, "judgement": dict(verdict),
        "reasons": list(verdict["reasons"]), "alerts": list(verdict["alerts"]), "warnings": [], "pruned": pruned,
        "action": "none", "rollback": None, "conflicting_identities": conflicting}
    if result["rows_immature"]:
        log.info("monitor %s: %d row(s) of the date have labels not known yet (features.label.known_at); "
                 "they are left out of live quality", day, result["rows_immature"])
    if conflicting:
        result["warnings"].append(f"{conflicting} row identities were logged more than once with different inputs "
                                  "or predictions; their rows were left out (forged or mixed-up identities)")
    if drift_verdict in ("warn", "block"):
        bad = [f"{d['feature']} {d['psi']:.3f}" for d in drift if d["verdict"] in ("warn", "block")]
        msg = f"served inputs drifted from v{champion}'s training data ({drift_verdict}): PSI {', '.join(bad[:10])}"
        if drift_verdict == "block":
            result["alerts"].append(msg)
        else:
            result["warnings"].append(msg)
            log.warning("monitor %s: %s", day, msg)
    if verdict["rollback"]:
        reason = "automatic, live quality on " + day + ": " + "; ".join(verdict["reasons"])
        try:
            result["rollback"] = rollback_model(spec, ctx, reason, expect=champion)
            result["action"] = "rollback"
        except DaybreakError as e:  # moved meanwhile (a promotion, a person's rollback): theirs stands
            result["alerts"].append(f"not rolled back: {e}")
            log.warning("monitor %s: %s", day, e)
    elif result["alerts"]:
        result["action"] = "alert"
    for v in versions:
        log.info("monitor %s: %s v%s on %d labelled rows: %s", day, v["source"], v["version"], v["rows"],
                 ", ".join(f"{m}={x:.4f}" for m, x in v["metrics"].items() if math.isfinite(x)))
    result["run_id"] = _record_run(spec, ctx, result)
    summary = "; ".join(f"{v['source']} v{v['version']} {spec.live_metric()}="
                        f"{v['metrics'].get(spec.live_metric(), math.nan):.4f} ({v['rows']} rows)" for v in versions)
    record_event(spec, ctx, "monitor", champion, reason=(summary or "no labelled live rows") + (
        f"; action: {result['action']}" + (": " + "; ".join(result["alerts"]) if result["alerts"] else "")))
    if result["action"] != "none" or drift_verdict == "block":
        event = {"event": Tag.EVENT_PREFIX + {"rollback": "rolled_back"}.get(result["action"], "alert"),
                 "model": name, "date": day, "champion_version": champion,
                 "rolled_back_version": champion if result["action"] == "rollback" else None,
                 "now_serving": (result["rollback"] or {}).get("champion_version", champion),
                 "reasons": result["reasons"], "alerts": result["alerts"], "drift": drift_verdict,
                 "monitor_run_id": result["run_id"]}
        result["notification"] = event
        result["notified"] = notify(spec, event)
    if drift_verdict == "block":
        block_psi = spec.monitoring.drift.block_psi if spec.monitoring.drift else None  # set, or no block verdict
        raise DriftBlocked(f"monitor {day}: " + "; ".join(a for a in result["alerts"] if "drifted" in a)
                           + f" (above monitoring.drift.block_psi={block_psi}); recorded in "
                           f"run {result['run_id']}. Nothing after monitoring runs today.")
    log.log(logging.WARNING if result["action"] != "none" else logging.INFO, "monitor %s: action %s%s", day,
            result["action"],
            (": " + "; ".join(result["reasons"] + result["alerts"])) if result["action"] != "none" else "")
    return result


def live_history(spec: Spec, ctx: RunContext, limit: int = 365) -> list[dict[str, Any]]:
    """Live quality over time: one row per (date, source, version) from the latest monitoring of
    each date, oldest first (the Models page's chart and ``daybreak live``)."""
    registry.use_uri(ctx.tracking_uri)
    cl = registry.client(ctx)
    exp = cl.get_experiment_by_name(monitor_experiment(spec))
    if exp is None:
        return []
    runs = cl.search_runs([exp.experiment_id], max_results=limit * 3, order_by=["attributes.start_time DESC"])
    seen, out = set(), []
    metric = spec.live_metric()
    for r in runs:
        day = r.data.tags.get(Tag.MONITOR_DATE)
        if not day or day in seen:
            continue
        seen.add(day)
        for k, v in r.data.metrics.items():
            parts = k.split("/")
            if len(parts) == 4 and parts[0] == "live" and parts[3] == metric:
                rows = r.data.metrics.get("/".join([*parts[:3], "rows"]))
                out.append({"date": day, "source": parts[1], "version": parts[2].removeprefix("v"), "metric": metric,
                            "value": v, "rows": None if rows is None else int(rows),
                            "action": r.data.tags.get(Tag.MONITOR_ACTION),
                            "champion": r.data.tags.get(Tag.MONITOR_CHAMPION_VERSION)})
    return sorted(out, key=lambda x: (x["date"], x["source"], int(x["version"]) if x["version"].isdigit() else 0))
