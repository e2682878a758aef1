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

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict, TypeGuard

import numpy as np

from daybreak.features import DAY, EVENT_TIME, mature_rows, read_features
from daybreak.gate._rules import baseline_predictions, clusters_for, decide, judge, size_rules
from daybreak.infra import registry
from daybreak.infra.audit import who
from daybreak.infra.context import RunContext
from daybreak.infra.errors import GateError, MissingInputError
from daybreak.infra.records import Decision, GateRecord, Lineage, Tag, json_default
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
INSUFFICIENT = Decision.INSUFFICIENT
DECISIONS = (PROMOTE, REJECT, BLOCKED, INSUFFICIENT)
REPORT = "gate_report.html"


def holdout(spec: Spec, ctx: RunContext) -> Any:
    """The holdout rows as a DataFrame (see ``holdout_with_hash``)."""
    return holdout_with_hash(spec, ctx)[0]


def holdout_with_hash(spec: Spec, ctx: RunContext) -> tuple[Any, str]:
    """The holdout rows (features of the spec's holdout days: the logical date and the
    ``training.holdout_days - 1`` days before it, which training never reads) and a hash of the
    partitions they came from."""
    days = spec.holdout_days(ctx.logical_date)
    table, hashes, missing = read_features(spec, ctx, days, with_day=True)
    if table is None or days[-1].isoformat() in missing:
        raise MissingInputError(f"gate: no feature partition for {days[-1]}; run the features step first")
    if missing:
        log.warning("gate %s: holdout days without features %s", ctx.logical_date, missing)
    table, immature = mature_rows(spec, table, ctx.logical_date)
    if immature:
        log.info("gate %s: %d holdout row(s) left out: their labels are known only after %s", ctx.logical_date,
                 immature, spec.label_cut(ctx.logical_date).isoformat())
    digest = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
    assert table is not None  # mature_rows keeps a table a table
    frame = table.to_pandas()
    frame.attrs["immature_rows"] = immature
    return frame, digest


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
    prior: float | None = None  # the candidate's training label mean: the prior baseline
    champion_seen: frozenset[str] = frozenset()  # days the champion was trained or gated on (ISO dates)
    # earlier gates' daily estimates per quantity, oldest first (``_rules.Intervals``)
    history: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)


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
    verdict = compute(spec, loaded, forced=forced, reason=reason, by=who() if forced else None,
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
                      candidate=cand_pred, champion=champ_pred, data_rules=data_rules, drift=drift,
                      prior=_prior(spec, ctx, dict(cand.tags)),
                      champion_seen=frozenset() if champ is None else _seen_days(dict(champ.tags)),
                      history=gate_history(spec, cl, day))


def gate_history(spec: Spec, cl: Any, day: str) -> dict[str, list[dict[str, Any]]]:
    """The daily estimates the gates of the ``history_days`` days before `day` recorded on their
    candidates (the newest version per gated day), per quantity, oldest first."""
    conf = spec.gate.bootstrap
    if conf is None or conf.between_days == "off":
        return {}
    from datetime import date, timedelta

    first = (date.fromisoformat(day) - timedelta(days=conf.history_days)).isoformat()
    by_day: dict[str, dict[str, dict[str, Any]]] = {}
    seen: set[str] = set()
    for mv in registry.versions(cl, spec.model.name):  # newest first: a day's newest gated version speaks for it
        rec = GateRecord.from_tags(dict(mv.tags))
        gated = rec.holdout_date
        if gated and first <= gated < day and gated not in seen:
            seen.add(gated)
            if rec.daily:  # none: gated before daybreak recorded them, INSUFFICIENT_DATA, or unreadable
                by_day[gated] = rec.daily
    return history_of(by_day)


def _finite(v: Any) -> TypeGuard[float]:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an int past float range (a tag is editable)
        return False


MAX_ESTIMATE = 1e6  # a gain or its error beyond this was not recorded by a gate


def history_of(by_day: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """{gated day: {quantity: estimate}} to {quantity: [estimate, ...]} oldest first, keeping only
    well-formed, finite, bounded estimates: tags are editable, read them as untrusted."""
    out: dict[str, list[dict[str, Any]]] = {}
    for gated in sorted(by_day):
        for key, e in by_day[gated].items():
            if not isinstance(e, Mapping):
                continue
            value, se, days, metric = e.get("value"), e.get("se"), e.get("days", 1), e.get("metric")
            if not (_finite(value) and _finite(se) and abs(value) <= MAX_ESTIMATE and 0 <= se <= MAX_ESTIMATE
                    and isinstance(metric, str) and isinstance(days, int) and not isinstance(days, bool)
                    and 1 <= days <= 366):
                continue
            entry = {"day": gated, "metric": metric, "days": days, "value": float(value), "se": float(se)}
            if isinstance(e.get("unit"), str):
                entry["unit"] = e["unit"]
            out.setdefault(str(key), []).append(entry)
    return out


def _prior(spec: Spec, ctx: RunContext, tags: dict[str, str]) -> float | None:
    """The candidate's training label mean: recorded at training, or (versions trained before it
    was) read from its training window's features."""
    lineage = Lineage.from_tags(tags)
    if lineage.label_mean is not None:
        return lineage.label_mean
    if not any(b.kind == "prior" for b in spec.gate.baselines) or not lineage.window_start or not lineage.window_end:
        return None
    from daybreak.gate._datachecks import window_days

    table, _, _ = read_features(spec, ctx, window_days(tags))
    if table is None or table.num_rows == 0:
        return None
    y = table.column(spec.features.label.name).to_numpy(zero_copy_only=False).astype(np.float64)
    return float(np.nanmean(y))


def _seen_days(tags: dict[str, str]) -> frozenset[str]:
    """The days a version was trained on and gated on: its scores there are not fresh evidence."""
    from daybreak.gate._datachecks import window_days

    lineage = Lineage.from_tags(tags)
    return frozenset([d.isoformat() for d in window_days(tags)] + list(lineage.holdout))


def compute(spec: Spec, inputs: GateInputs, *, forced: str | None = None, reason: str | None = None,
            by: str | None = None, now: str | None = None) -> Verdict:
    """The decision and its record from loaded inputs. Pure: no registry, store or clock."""
    clustering = clusters_for(spec, inputs.frame)
    size = size_rules(spec, inputs.y, *clustering)
    excluded: list[str] = []  # holdout days left out of the champion comparison
    if any(r["verdict"] == "fail" for r in size):  # too few rows to judge anything: INSUFFICIENT_DATA
        judged: dict[str, Any] = {"metrics": {"candidate": {}, "champion": None}, "rules": [], "bootstrap": None,
                                  "slices": [], "baselines": [], "interval_unit": None, "clusters": None,
                                  "daily": {}, "between_days": {}}
    else:
        fresh = None
        if inputs.champion_seen and inputs.frame is not None and DAY in inputs.frame:
            days = np.array([str(d)[:10] for d in inputs.frame[DAY]])
            fresh = ~np.isin(days, sorted(inputs.champion_seen))
            excluded = sorted(set(days[~fresh]))
        judged = judge(spec, inputs.y, inputs.candidate, inputs.champion, inputs.frame,
                       baselines=baseline_predictions(spec, inputs.frame, inputs.prior), fresh=fresh,
                       clustering=clustering, history=inputs.history)
    rules = size + judged["rules"] + inputs.data_rules
    computed = decide(rules)
    decision = forced or computed
    m = spec.gate.metric
    champ_metric = (judged["metrics"]["champion"] or {}).get(m) if inputs.champion_version is not None else None
    record = GateRecord(
        decision=decision, computed_decision=computed, champion_version=inputs.champion_version, metric=m,
        candidate_metric=judged["metrics"]["candidate"].get(m), champion_metric=champ_metric,
        holdout_date=inputs.day, holdout_rows=len(inputs.y), holdout_hash=inputs.holdout_hash, rules=rules,
        decided_at=now, interval=judged.get("interval"), daily=judged["daily"],
        override=decision if forced else None,
        override_reason=str(reason) if forced else None, override_by=by if forced else None)
    boot = judged["bootstrap"]
    full = {"date": inputs.day, "decision": decision, "computed_decision": computed,
            "candidate_version": inputs.candidate_version, "champion_version": inputs.champion_version, "metric": m,
            "metrics": judged["metrics"], "rules": rules, "slices": judged["slices"], "drift": inputs.drift,
            "holdout_rows": len(inputs.y), "holdout_hash": inputs.holdout_hash, "baselines": judged["baselines"],
            "holdout_immature_rows": int(inputs.frame.attrs.get("immature_rows", 0)),
            "interval_unit": judged["interval_unit"], "clusters": judged["clusters"],
            "champion_excluded_days": excluded, "champion_seen_days": sorted(inputs.champion_seen),
            "prior": inputs.prior, "daily": judged["daily"], "between_days": judged["between_days"],
            "history": {k: list(v) for k, v in inputs.history.items()},
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
                folder / SCORES, index=False)
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
    log.info("gate %s: %s candidate v%s %s=%s vs champion %s %s%s", day, rec.decision, inputs.candidate_version,
             rec.metric, "-" if rec.candidate_metric is None else f"{rec.candidate_metric:.4f}",
             f"v{rec.champion_version}" if rec.champion_version else "(none)",
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


SCORES = "scores.parquet"


def _scores(df: Any, spec: Spec, y: np.ndarray, cand: np.ndarray, champ: np.ndarray | None) -> Any:
    """Every holdout row with what the gate judged it on: ids, day, the features (for baselines,
    slices and clusters), the label and both predictions. ``daybreak replay`` re-judges from this
    and decision.json alone."""
    import pandas as pd

    keep = [c for c in [EVENT_TIME, DAY, *spec.features.keys, *spec.features.feature_names()] if c in df.columns]
    out = df[list(dict.fromkeys(keep))].copy() if keep else pd.DataFrame(index=df.index)
    out["label"], out["candidate"] = y, cand
    if champ is not None:
        out["champion"] = champ
    return out.reset_index(drop=True)


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
