"""Gate: candidate vs champion, both scored now on the same holdout rows.

The holdout is the spec's holdout days of published features, which training never reads. Both
models predict on the same frame in the same run; a metric stored when the champion was trained
is never used. The rules (all in the spec's ``gate``):

* absolute: a floor (a ceiling for lower-is-better metrics) on any metric;
* relative: improve on the champion by more than ``margin``, or be no worse than ``margin``;
* confidence: the lower end of the paired bootstrap interval of the gain must clear that margin;
* slices: no slice with at least ``min_rows`` rows may be worse than the champion by more than
  ``tolerance``;
* data checks on the training window (``datachecks.py``), each ``warn`` or ``block``.

With no champion only the absolute rules and the row count check apply. The decision is
BLOCKED_BY_DATA if a blocking data check failed, else REJECT if any rule failed, else PROMOTE
(SKIPPED when there is no candidate). A manual override needs a reason and is recorded next to
the computed decision. The record goes on the candidate version as tags and into an MLflow run,
with ``decision.json``, ``scores.parquet`` (every holdout row with both predictions) and
``gate_report.html``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from daybreak.features import EVENT_TIME, read_features
from daybreak.infra import metrics, registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import GateError, MissingInputError
from daybreak.infra.records import Decision, Tag
from daybreak.spec import Spec

log = logging.getLogger(__name__)

PROMOTE, REJECT, BLOCKED, SKIPPED = Decision.PROMOTE, Decision.REJECT, Decision.BLOCKED, Decision.SKIPPED
DECISIONS = (PROMOTE, REJECT, BLOCKED)
REPORT = "gate_report.html"
_TAG_LIMIT = 7000  # MLflow keeps tag values up to 8000 characters


def holdout(spec: Spec, ctx: RunContext) -> Any:
    """The holdout rows as a DataFrame (see ``holdout_with_hash``)."""
    return holdout_with_hash(spec, ctx)[0]


def holdout_with_hash(spec: Spec, ctx: RunContext) -> tuple[Any, str]:
    """The holdout rows (features of the spec's holdout days: the logical date and the
    ``training.holdout_days - 1`` days before it, which training never reads) and a hash of the
    partitions they came from."""
    table, hashes, missing = read_features(spec, ctx, spec.training.holdout(ctx.logical_date))
    if table is None or ctx.logical_date.isoformat() in missing:
        raise MissingInputError(f"gate: no feature partition for {ctx.logical_date}; run the features step first")
    if missing:
        log.warning("gate %s: holdout days without features %s", ctx.logical_date, missing)
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    return table.to_pandas(), digest


def _bound_rule(metric: str, value: float, threshold: float) -> dict[str, Any]:
    hib = metrics.DIRECTION[metric]
    ok = math.isfinite(value) and (value >= threshold if hib else value <= threshold)
    return {"rule": "floor" if hib else "ceiling", "kind": "absolute", "metric": metric, "value": value,
            "threshold": threshold, "verdict": "pass" if ok else "fail"}


def judge(spec: Spec, y: np.ndarray, candidate: np.ndarray, champion: np.ndarray | None,
          frame: Any = None) -> dict[str, Any]:
    """Score both models on the same rows and apply the model rules (everything but data checks).

    Pure: arrays in, record out. `frame` holds the slice columns, row-aligned with `y`.
    """
    g = spec.gate
    names = list(dict.fromkeys([g.metric, *(g.report_metrics or metrics.metrics_for(spec.model.task)), *g.floors]))
    cand = {m: metrics.evaluate(m, y, candidate, g.threshold) for m in names}
    champ = None if champion is None else {m: metrics.evaluate(m, y, champion, g.threshold) for m in names}
    bad = int((~np.isfinite(candidate)).sum())
    rules: list[dict[str, Any]] = [{
        "rule": "finite_predictions", "kind": "absolute", "metric": None, "value": bad, "threshold": 0,
        "verdict": "fail" if bad else "pass",
        "detail": f"{bad} of {len(candidate)} candidate predictions are NaN or infinite"}]
    bounds = {**g.floors, **({g.metric: g.floor} if g.floor is not None else {})}
    rules += [_bound_rule(m, cand[m], t) for m, t in bounds.items()]
    boot = None
    slices: list[dict[str, Any]] = []
    if champion is not None and champ is not None:  # both or neither
        need = g.required_margin()
        point = metrics.gain(g.metric, cand[g.metric], champ[g.metric])
        ok = math.isfinite(point) and (point > need if g.compare == "improve" else point >= need)
        rules.append({"rule": g.compare, "kind": "relative", "metric": g.metric, "value": point, "threshold": need,
                      "verdict": "pass" if ok else "fail",
                      "detail": f"gain over the champion (positive: candidate better), must be "
                                f"{'>' if g.compare == 'improve' else '>='} {need:g}"})
        if g.bootstrap is not None:
            b = g.bootstrap
            boot = metrics.paired_bootstrap(g.metric, y, candidate, champion, resamples=b.resamples, level=b.level,
                                            seed=b.seed, threshold=g.threshold)
            # resamples where the metric is undefined (e.g. no positive drawn) must be rare
            ok = (math.isfinite(boot["low"]) and boot["undefined"] <= 0.01 * b.resamples
                  and (boot["low"] > need if g.compare == "improve" else boot["low"] >= need))
            rules.append({"rule": "confidence", "kind": "confidence", "metric": g.metric, "value": boot["low"],
                          "threshold": need, "verdict": "pass" if ok else "fail",
                          "detail": f"{b.level:.0%} interval of the gain [{boot['low']:.4g}, {boot['high']:.4g}] "
                                    f"over {b.resamples} paired resamples (seed {b.seed})"
                                    + (f"; {boot['undefined']} resamples undefined" if boot["undefined"] else "")})
        if frame is not None and g.slices.columns:
            rules_s, slices = _slices(spec, y, candidate, champion, frame)
            rules += rules_s
    return {"metrics": {"candidate": cand, "champion": champ}, "rules": rules, "bootstrap": boot, "slices": slices}


def _slices(spec: Spec, y: np.ndarray, candidate: np.ndarray, champion: np.ndarray,
            frame: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    s = spec.gate.slices
    metric = s.metric or spec.gate.metric
    rules, table = [], []
    for col in s.columns:
        keys = frame[col].astype("string").fillna("(null)").to_numpy()
        values, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        worst: dict[str, Any] | None = None
        for i in np.flatnonzero(counts >= s.min_rows):
            rows = inverse == i
            c = metrics.evaluate(metric, y[rows], candidate[rows], spec.gate.threshold)
            h = metrics.evaluate(metric, y[rows], champion[rows], spec.gate.threshold)
            g = metrics.gain(metric, c, h)
            row = {"column": col, "value": str(values[i]), "rows": int(counts[i]), "candidate": c, "champion": h,
                   "gain": g, "verdict": "skip" if not math.isfinite(g) else ("pass" if g >= -s.tolerance else "fail")}
            table.append(row)
            if math.isfinite(g) and (worst is None or g < worst["gain"]):
                worst = row
        judged = [r for r in table if r["column"] == col and r["verdict"] != "skip"]
        failed = [r["value"] for r in judged if r["verdict"] == "fail"]
        rules.append({"rule": f"slice:{col}", "kind": "slice", "metric": metric,
                      "value": None if worst is None else worst["gain"], "threshold": -s.tolerance,
                      "verdict": "skip" if worst is None else ("fail" if failed else "pass"),
                      "detail": (f"no slice with {s.min_rows}+ rows and a defined {metric}" if worst is None else
                                 f"worst {col}={worst['value']} ({worst['rows']} rows); {len(failed)} of "
                                 f"{len(judged)} slices worse than the champion by more than {s.tolerance:g}"
                                 + (f": {failed[:10]}" if failed else ""))})
    return rules, table


def decide(rules: list[dict[str, Any]]) -> str:
    if any(r["kind"] == "data" and r["verdict"] == "fail" for r in rules):
        return BLOCKED
    return REJECT if any(r["verdict"] == "fail" for r in rules) else PROMOTE


def should_promote(result: dict[str, Any]) -> bool:
    """What the orchestrators ask after the gate: promotion runs only after PROMOTE."""
    return result.get("decision") == PROMOTE


def _override(override: str | None, reason: str | None) -> str | None:
    if override is None or override == "":
        return None
    decision = {"promote": PROMOTE, "reject": REJECT}.get(str(override).lower())
    if decision is None:
        raise GateError(f"gate override: {override!r} is not 'promote' or 'reject'")
    if not reason or not str(reason).strip():
        raise GateError("gate override: a reason is required (it is recorded with the decision)")
    return decision


def evaluate_gate(spec: Spec, ctx: RunContext, force: bool = False, override: str | None = None,
                  reason: str | None = None) -> dict[str, Any]:
    """Gate the logical date's candidate. `override` ('promote' or 'reject', with a `reason`)
    replaces the computed decision; both are recorded."""
    import mlflow

    forced = _override(override, reason)
    name = spec.model.name
    day = ctx.logical_date.isoformat()
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    cand = registry.candidate_for(cl, name, day, spec.spec_hash())
    base: dict[str, Any] = {"step": "gate", "date": day, "metric": spec.gate.metric}
    if cand is None:
        if forced:
            raise GateError(f"gate {day}: no candidate version trained for this date to override")
        log.warning("gate %s: no candidate version trained for this date; nothing to decide", day)
        return base | {"decision": SKIPPED, "reason": "no candidate trained for this date",
                       "candidate_version": None, "champion_version": None}
    if registry.DECISION_TAG in cand.tags and not force and not forced:
        # A rerun: the decision was made against the champion of that moment; keep it.
        log.info("gate %s: version %s was already gated (%s); keeping that decision", day, cand.version,
                 cand.tags[registry.DECISION_TAG])
        return base | recorded_decision(cand.tags) | {"candidate_version": str(cand.version), "recorded": True}
    champ = registry.alias_version(cl, name, spec.promotion.alias)
    if champ is not None and str(champ.version) == str(cand.version):
        if forced:
            raise GateError(f"gate {day}: v{cand.version} is already the champion; roll back instead of overriding")
        log.info("gate %s: version %s is already the champion; keeping its record", day, cand.version)
        return base | recorded_decision(cand.tags) | {"candidate_version": str(cand.version), "recorded": True}
    df, holdout_hash = holdout_with_hash(spec, ctx)
    if len(df) < spec.gate.min_rows:
        raise GateError(f"gate {day}: holdout has {len(df)} rows < gate.min_rows={spec.gate.min_rows}")
    label = spec.features.label.name
    y = df[label].to_numpy(np.float64)
    X = df[spec.features.feature_names()]  # one frame: both models score exactly these rows
    cand_pred = np.asarray(registry.load_model(ctx, name, str(cand.version)).predict(X), np.float64)
    champ_pred = None
    if champ is not None:
        champ_pred = np.asarray(registry.load_model(ctx, name, str(champ.version)).predict(X), np.float64)
    judged = judge(spec, y, cand_pred, champ_pred, df)
    from daybreak.gate._datachecks import run_data_checks

    data_rules, drift = run_data_checks(spec, ctx, dict(cand.tags), None if champ is None else dict(champ.tags))
    rules = judged["rules"] + data_rules
    computed = decide(rules)
    decision = forced or computed
    m = spec.gate.metric
    champ_version = None if champ is None else str(champ.version)
    cand_metric = judged["metrics"]["candidate"][m]
    champ_metric = None if champ is None else judged["metrics"]["champion"][m]
    record = {
        registry.DECISION_TAG: decision,
        registry.AGAINST_TAG: champ_version or "none",
        Tag.GATE_COMPUTED_DECISION: computed,
        Tag.GATE_METRIC: m,
        Tag.GATE_CANDIDATE_METRIC: repr(cand_metric),
        Tag.GATE_CHAMPION_METRIC: "none" if champ_metric is None else repr(champ_metric),
        Tag.GATE_HOLDOUT_DATE: day,
        Tag.GATE_HOLDOUT_ROWS: str(len(df)),
        Tag.GATE_HOLDOUT_HASH: holdout_hash,
        Tag.GATE_RULES: _compact(rules),
        Tag.GATE_DECIDED_AT: datetime.now(UTC).isoformat(timespec="seconds"),
    }
    # written every time, so a later decision never shows an earlier override's reason
    record |= {Tag.GATE_OVERRIDE: decision if forced else "none",
               Tag.GATE_OVERRIDE_REASON: str(reason)[:1000] if forced else "none",
               Tag.GATE_OVERRIDE_BY: _who() if forced else "none"}
    boot = judged["bootstrap"]
    full = {"date": day, "decision": decision, "computed_decision": computed, "candidate_version": str(cand.version),
            "champion_version": champ_version, "metric": m, "metrics": judged["metrics"], "rules": rules,
            "slices": judged["slices"], "drift": drift, "holdout_rows": len(df), "holdout_hash": holdout_hash,
            "bootstrap": None if boot is None else {k: v for k, v in boot.items() if k != "gains"},
            "override": None if not forced else {"decision": decision, "reason": reason, "by": _who()}}
    with mlflow.start_run(run_name=f"gate-{day}") as run:
        mlflow.set_tags({**record, Tag.CANDIDATE_VERSION: str(cand.version)})
        mlflow.log_metrics({f"candidate_{k}": v for k, v in judged["metrics"]["candidate"].items() if math.isfinite(v)})
        if champ is not None:
            mlflow.log_metrics({f"champion_{k}": v for k, v in judged["metrics"]["champion"].items()
                                if math.isfinite(v)})
        if boot is not None:
            mlflow.log_metrics({"gain": boot["gain"], "gain_low": boot["low"], "gain_high": boot["high"]})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "decision.json").write_text(json.dumps(full, indent=2, default=_json))
            _scores(df, spec, y, cand_pred, champ_pred).to_parquet(folder / "scores.parquet", index=False)
            try:
                from daybreak.gate._report import gate_report

                (folder / REPORT).write_text(gate_report(spec, full, y, cand_pred, champ_pred,
                                                         None if boot is None else boot["gains"]))
            except Exception:  # the decision stands without its plots
                log.exception("gate %s: the HTML report failed; the decision is recorded without it", day)
            mlflow.log_artifacts(str(folder))
        record[Tag.GATE_RUN_ID] = run.info.run_id
    # the decision tag goes last: promotion reads it, and it must never stand without the rest
    decision_tag = {registry.DECISION_TAG: record.pop(registry.DECISION_TAG)}
    registry.set_tags(cl, name, str(cand.version), record)
    registry.set_tags(cl, name, str(cand.version), decision_tag)
    if decision != PROMOTE or forced:  # promotions are recorded when they happen
        from daybreak.infra.audit import record_event

        failed = ", ".join(r["rule"] for r in rules if r["verdict"] == "fail")
        record_event(spec, ctx, "override" if forced else decision.lower(), str(cand.version),
                     from_version=champ_version,
                     reason=(f"override {computed} -> {decision}: {reason}" if forced else f"failed: {failed}"))
    log.info("gate %s: %s candidate v%s %s=%.4f vs champion %s %s%s", day, decision, str(cand.version), m, cand_metric,
             f"v{champ_version}" if champ_version else "(none)", "" if champ_metric is None else f"{champ_metric:.4f}",
             f" (override of {computed}: {reason})" if forced else "")
    for r in rules:
        if r["verdict"] in ("fail", "warn"):
            log.warning("gate %s: %s %s: %s", day, r["rule"], r["verdict"].upper(), r.get("detail") or r["value"])
    return base | {"decision": decision, "computed_decision": computed, "candidate_version": str(cand.version),
                   "champion_version": champ_version, "candidate_metric": cand_metric, "champion_metric": champ_metric,
                   "holdout_rows": len(df), "rules": rules, "gate_run_id": record[Tag.GATE_RUN_ID],
                   "overridden": bool(forced)}


def _scores(df: Any, spec: Spec, y: np.ndarray, cand: np.ndarray, champ: np.ndarray | None) -> Any:
    import pandas as pd

    ids = [c for c in [EVENT_TIME, *spec.features.keys] if c in df.columns]
    out = df[ids].copy() if ids else pd.DataFrame(index=df.index)
    out["label"], out["candidate"] = y, cand
    if champ is not None:
        out["champion"] = champ
    return out.reset_index(drop=True)


def _compact(rules: list[dict[str, Any]]) -> str:
    """The rules as JSON within the tag limit: details dropped first, then whole rules (passing
    ones before failing ones); the full list is in the gate run's decision.json."""
    text = json.dumps(rules, default=_json)
    if len(text) <= _TAG_LIMIT:
        return text
    slim = sorted(({k: v for k, v in r.items() if k != "detail"} for r in rules), key=lambda r: r["verdict"] == "pass")
    while slim:
        text = json.dumps(slim, default=_json)
        if len(text) <= _TAG_LIMIT:
            return text
        slim.pop()
    return "[]"  # not even one rule fits (a huge name): the run's decision.json has them


def _json(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def recorded_gate(spec: Spec, ctx: RunContext) -> tuple[str, str, str] | None:
    """(candidate version, decision, champion version it was compared with or 'none') of the
    date's candidate once gated; None before."""
    cl = registry.client(ctx)
    cand = registry.candidate_for(cl, spec.model.name, ctx.logical_date.isoformat(), spec.spec_hash())
    if cand is None or registry.DECISION_TAG not in cand.tags:
        return None
    rec = recorded_decision(cand.tags)
    return str(cand.version), rec["decision"], rec["champion_version"] or "none"


def recorded_decision(tags: dict[str, str]) -> dict[str, Any]:
    """A version's gate record, read back from its tags."""
    against = tags.get(registry.AGAINST_TAG)
    try:
        rules = json.loads(tags.get(Tag.GATE_RULES, "[]"))
    except json.JSONDecodeError:  # cut at the tag limit: the full record is in the gate run
        rules = []
    return {
        "decision": tags.get(registry.DECISION_TAG),
        "computed_decision": tags.get(Tag.GATE_COMPUTED_DECISION),
        "champion_version": None if against in (None, "none") else against,
        "candidate_metric": _float(tags.get(Tag.GATE_CANDIDATE_METRIC)),
        "champion_metric": _float(tags.get(Tag.GATE_CHAMPION_METRIC)),
        "rules": rules,
        "override_reason": tags.get(Tag.GATE_OVERRIDE_REASON),
        "gate_run_id": tags.get(Tag.GATE_RUN_ID),
    }


def _float(v: str | None) -> float | None:
    return None if v in (None, "none") else float(v)
