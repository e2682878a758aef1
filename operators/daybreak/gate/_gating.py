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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from daybreak.features import EVENT_TIME, read_features
from daybreak.infra import metrics, registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import GateError, MissingInputError
from daybreak.infra.records import Decision, GateRecord, Tag, json_default
from daybreak.spec import Spec

log = logging.getLogger(__name__)


class GateResult(TypedDict, total=False):
    """What ``evaluate_gate`` returns (and the orchestrators pass on)."""

    step: str
    date: str
    metric: str
    decision: str
    reason: str
    computed_decision: str | None
    candidate_version: str | None
    champion_version: str | None
    candidate_metric: float | None
    champion_metric: float | None
    holdout_rows: int
    rules: list[dict[str, Any]]
    gate_run_id: str | None
    overridden: bool
    recorded: bool

PROMOTE, REJECT, BLOCKED, SKIPPED = Decision.PROMOTE, Decision.REJECT, Decision.BLOCKED, Decision.SKIPPED
DECISIONS = (PROMOTE, REJECT, BLOCKED)
REPORT = "gate_report.html"


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


def should_promote(result: GateResult | dict[str, Any]) -> bool:
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


@dataclass(frozen=True)
class GateInputs:
    """What the gate judges, loaded: both models' predictions on the same holdout rows, and the
    data checks' rules on the candidate's training window."""

    day: str
    candidate_version: str
    champion_version: str | None
    frame: Any  # the holdout rows (slice and id columns), row-aligned with y
    holdout_hash: str
    y: np.ndarray
    candidate: np.ndarray
    champion: np.ndarray | None
    data_rules: list[dict[str, Any]] = field(default_factory=list)
    drift: Any = None


@dataclass(frozen=True)
class Verdict:
    """The gate's pure output: the record for the version's tags and the full decision."""

    record: GateRecord
    full: dict[str, Any]  # decision.json
    bootstrap: dict[str, Any] | None
    judged: dict[str, Any]


def evaluate_gate(spec: Spec, ctx: RunContext, force: bool = False, override: str | None = None,
                  reason: str | None = None) -> GateResult:
    """Gate the logical date's candidate. `override` ('promote' or 'reject', with a `reason`)
    replaces the computed decision; both are recorded. Load, judge (pure), publish."""
    forced = _override(override, reason)
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    loaded = load(spec, ctx, cl, force=force, forced=forced)
    if not isinstance(loaded, GateInputs):  # nothing to judge: no candidate, or already decided
        return loaded
    verdict = compute(spec, loaded, forced=forced, reason=reason, by=_who() if forced else None,
                      now=datetime.now(UTC).isoformat(timespec="seconds"))
    record = publish(spec, ctx, cl, loaded, verdict)
    return _result(spec, loaded, record)


def load(spec: Spec, ctx: RunContext, cl: Any, *, force: bool = False,
         forced: str | None = None) -> GateInputs | GateResult:
    """The candidate and champion versions, the holdout, both models' predictions on it and the
    data checks; or the result straight away when there is nothing to judge."""
    name = spec.model.name
    day = ctx.logical_date.isoformat()
    cand = registry.candidate_for(cl, name, day, spec.spec_hash())
    base: GateResult = {"step": "gate", "date": day, "metric": spec.gate.metric}
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
        return base | _recorded_result(cand.tags) | {"candidate_version": str(cand.version), "recorded": True}
    champ = registry.alias_version(cl, name, spec.promotion.alias)
    if champ is not None and str(champ.version) == str(cand.version):
        if forced:
            raise GateError(f"gate {day}: v{cand.version} is already the champion; roll back instead of overriding")
        log.info("gate %s: version %s is already the champion; keeping its record", day, cand.version)
        return base | _recorded_result(cand.tags) | {"candidate_version": str(cand.version), "recorded": True}
    df, holdout_hash = holdout_with_hash(spec, ctx)
    if len(df) < spec.gate.min_rows:
        raise GateError(f"gate {day}: holdout has {len(df)} rows < gate.min_rows={spec.gate.min_rows}")
    X = df[spec.features.feature_names()]  # one frame: both models score exactly these rows
    cand_pred = np.asarray(registry.load_model(ctx, name, str(cand.version)).predict(X), np.float64)
    champ_pred = None
    if champ is not None:
        champ_pred = np.asarray(registry.load_model(ctx, name, str(champ.version)).predict(X), np.float64)
    from daybreak.gate._datachecks import run_data_checks

    data_rules, drift = run_data_checks(spec, ctx, dict(cand.tags), None if champ is None else dict(champ.tags))
    return GateInputs(day=day, candidate_version=str(cand.version),
                      champion_version=None if champ is None else str(champ.version), frame=df,
                      holdout_hash=holdout_hash, y=df[spec.features.label.name].to_numpy(np.float64),
                      candidate=cand_pred, champion=champ_pred, data_rules=data_rules, drift=drift)


def compute(spec: Spec, inputs: GateInputs, *, forced: str | None = None, reason: str | None = None,
            by: str | None = None, now: str | None = None) -> Verdict:
    """The decision and its record from loaded inputs. Pure: no registry, store or clock."""
    judged = judge(spec, inputs.y, inputs.candidate, inputs.champion, inputs.frame)
    rules = judged["rules"] + inputs.data_rules
    computed = decide(rules)
    decision = forced or computed
    m = spec.gate.metric
    champ_metric = None if inputs.champion_version is None else judged["metrics"]["champion"][m]
    record = GateRecord(
        decision=decision, computed_decision=computed, champion_version=inputs.champion_version, metric=m,
        candidate_metric=judged["metrics"]["candidate"][m], champion_metric=champ_metric,
        holdout_date=inputs.day, holdout_rows=len(inputs.y), holdout_hash=inputs.holdout_hash, rules=rules,
        decided_at=now, override=decision if forced else None,
        override_reason=str(reason) if forced else None, override_by=by if forced else None)
    boot = judged["bootstrap"]
    full = {"date": inputs.day, "decision": decision, "computed_decision": computed,
            "candidate_version": inputs.candidate_version, "champion_version": inputs.champion_version, "metric": m,
            "metrics": judged["metrics"], "rules": rules, "slices": judged["slices"], "drift": inputs.drift,
            "holdout_rows": len(inputs.y), "holdout_hash": inputs.holdout_hash,
            "bootstrap": None if boot is None else {k: v for k, v in boot.items() if k != "gains"},
            "override": None if not forced else {"decision": decision, "reason": reason, "by": by}}
    return Verdict(record=record, full=full, bootstrap=boot, judged=judged)


def publish(spec: Spec, ctx: RunContext, cl: Any, inputs: GateInputs, verdict: Verdict) -> GateRecord:
    """The gate run (decision.json, scores.parquet, the HTML report), then the record on the
    candidate's tags (the decision tag last), then the audit event. Returns the record with its run."""
    import mlflow

    rec, judged, boot, day = verdict.record, verdict.judged, verdict.bootstrap, inputs.day
    with mlflow.start_run(run_name=f"gate-{day}") as run:
        mlflow.set_tags({**rec.to_tags(), Tag.CANDIDATE_VERSION: inputs.candidate_version})
        mlflow.log_metrics({f"candidate_{k}": v for k, v in judged["metrics"]["candidate"].items() if math.isfinite(v)})
        if inputs.champion is not None:
            mlflow.log_metrics({f"champion_{k}": v for k, v in judged["metrics"]["champion"].items()
                                if math.isfinite(v)})
        if boot is not None:
            mlflow.log_metrics({"gain": boot["gain"], "gain_low": boot["low"], "gain_high": boot["high"]})
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "decision.json").write_text(json.dumps(verdict.full, indent=2, default=json_default))
            _scores(inputs.frame, spec, inputs.y, inputs.candidate, inputs.champion).to_parquet(
                folder / "scores.parquet", index=False)
            try:
                from daybreak.gate._report import gate_report

                (folder / REPORT).write_text(gate_report(spec, verdict.full, inputs.y, inputs.candidate,
                                                         inputs.champion, None if boot is None else boot["gains"]))
            except Exception:  # the decision stands without its plots
                log.exception("gate %s: the HTML report failed; the decision is recorded without it", day)
            mlflow.log_artifacts(str(folder))
    rec = replace(rec, gate_run_id=run.info.run_id)
    tags = rec.to_tags()
    # the decision tag goes last: promotion reads it, and it must never stand without the rest
    decision_tag = {Tag.GATE_DECISION: tags.pop(Tag.GATE_DECISION)}
    registry.set_tags(cl, spec.model.name, inputs.candidate_version, tags)
    registry.set_tags(cl, spec.model.name, inputs.candidate_version, decision_tag)
    forced = rec.override is not None
    if rec.decision != PROMOTE or forced:  # promotions are recorded when they happen
        from daybreak.infra.audit import record_event

        failed = ", ".join(r["rule"] for r in rec.rules if r["verdict"] == "fail")
        record_event(spec, ctx, "override" if forced else str(rec.decision).lower(), inputs.candidate_version,
                     from_version=inputs.champion_version,
                     reason=(f"override {rec.computed_decision} -> {rec.decision}: {rec.override_reason}" if forced
                             else f"failed: {failed}"))
    log.info("gate %s: %s candidate v%s %s=%.4f vs champion %s %s%s", day, rec.decision, inputs.candidate_version,
             rec.metric, rec.candidate_metric, f"v{rec.champion_version}" if rec.champion_version else "(none)",
             "" if rec.champion_metric is None else f"{rec.champion_metric:.4f}",
             f" (override of {rec.computed_decision}: {rec.override_reason})" if forced else "")
    for r in rec.rules:
        if r["verdict"] in ("fail", "warn"):
            log.warning("gate %s: %s %s: %s", day, r["rule"], r["verdict"].upper(), r.get("detail") or r["value"])
    return rec


def _result(spec: Spec, inputs: GateInputs, rec: GateRecord) -> GateResult:
    return {"step": "gate", "date": inputs.day, "metric": spec.gate.metric, "decision": str(rec.decision),
            "computed_decision": rec.computed_decision, "candidate_version": inputs.candidate_version,
            "champion_version": rec.champion_version, "candidate_metric": rec.candidate_metric,
            "champion_metric": rec.champion_metric, "holdout_rows": len(inputs.y), "rules": rec.rules,
            "gate_run_id": rec.gate_run_id, "overridden": rec.override is not None}


def _scores(df: Any, spec: Spec, y: np.ndarray, cand: np.ndarray, champ: np.ndarray | None) -> Any:
    import pandas as pd

    ids = [c for c in [EVENT_TIME, *spec.features.keys] if c in df.columns]
    out = df[ids].copy() if ids else pd.DataFrame(index=df.index)
    out["label"], out["candidate"] = y, cand
    if champ is not None:
        out["champion"] = champ
    return out.reset_index(drop=True)


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
    rec = GateRecord.from_tags(cand.tags)
    return str(cand.version), str(rec.decision), rec.champion_version or "none"


def recorded_decision(tags: dict[str, str]) -> dict[str, Any]:
    """A version's gate record read back from its tags, as a dict (``GateRecord.from_tags`` typed)."""
    return GateRecord.from_tags(tags).as_dict()


def _recorded_result(tags: dict[str, str]) -> GateResult:
    rec = GateRecord.from_tags(tags)
    return {"decision": str(rec.decision), "computed_decision": rec.computed_decision,
            "champion_version": rec.champion_version, "candidate_metric": rec.candidate_metric,
            "champion_metric": rec.champion_metric, "rules": rec.rules, "gate_run_id": rec.gate_run_id}
