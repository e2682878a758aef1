"""Replay: re-judge recorded gate decisions under another policy, from the records alone.

For each date of a range, the date's gated candidate (looked up by date and the spec's hash) and
its gate run's ``decision.json`` and ``scores.parquet`` (every holdout row with both models'
predictions) rebuild the gate's inputs; :func:`compute`, the gate's pure judgement, decides again
under the policy's ``gate`` section. Nothing is written and no model is loaded: only registry
metadata and gate-run artifacts are read.

Per day the result holds the recorded decision, the replayed one, and a forward metric: the gate
metric, on the days after the date, of the model each decision keeps in service (the candidate
after PROMOTE, else the champion it faced), read from the later gate runs' scores when that
version was scored there (as their candidate or champion).

What a replay cannot know:

* data checks (kind ``data``) are taken as recorded: they were computed on the training windows,
  which the gate run does not hold;
* each day is judged against the champion it actually faced; under another policy later
  champions would have differed, and those models were never scored against each other;
* the forward metric exists only where a later gate scored the kept version (a champion the
  recorded decisions replaced is never scored again), and only within the range.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from daybreak.features import DAY
from daybreak.gate._gating import PROMOTE, SCORES, GateInputs, Verdict, compute, history_of
from daybreak.infra import metrics, registry
from daybreak.infra.context import RunContext, date_range, parse_date
from daybreak.infra.errors import GateError, SpecError
from daybreak.infra.records import GateRecord
from daybreak.spec import Spec, parse_spec

log = logging.getLogger(__name__)

DECISION_JSON = "decision.json"
MAX_REPLAY_DAYS = 3660  # ten years of daily gates: a typo in a year, not a real request, beyond this


class ReplayDay(TypedDict, total=False):
    """One date of a replay."""

    date: str
    status: str  # replayed | no_candidate | not_gated | no_gate_record
    note: str | None
    candidate_version: str | None
    champion_version: str | None
    recorded_decision: str | None  # the decision in effect (an override included)
    recorded_computed_decision: str | None  # what the recorded policy computed
    overridden: bool
    replayed_decision: str | None
    changed: bool  # replayed differs from the recorded policy's computed decision
    failed_rules: list[str]  # the rules the replayed decision failed
    candidate_metric: float | None
    champion_metric: float | None
    gate_run_id: str | None
    # the model each decision keeps in service, and its metric on the following days
    forward_version: str | None
    forward_metric: float | None
    forward_rows: int
    forward_days: list[str]
    forward_note: str | None
    recorded_forward_version: str | None
    recorded_forward_metric: float | None
    recorded_forward_rows: int
    recorded_forward_days: list[str]
    recorded_forward_note: str | None


class ReplaySummary(TypedDict):
    days: int
    replayed: int
    changed: int
    promotions_recorded: int
    promotions_replayed: int
    mean_forward_recorded: float | None
    mean_forward_replayed: float | None
    forward_days_recorded: int  # days with a forward metric under the recorded policy
    forward_days_replayed: int


class ReplayResult(TypedDict):
    """What ``replay`` returns."""

    step: str
    model: str
    start: str
    end: str
    policy: str | None  # the policy file; None: the spec's own gate
    metric: str
    days: list[ReplayDay]
    summary: ReplaySummary
    limits: list[str]


LIMITS = [
    "data checks (kind 'data') are taken as recorded: they were computed on training windows the gate run does "
    "not hold",
    "each day is judged against the champion it actually faced; under another policy later champions would differ",
    "forward metrics exist only where a later gate in the range scored the kept version (as candidate or champion)",
]


def policy_spec(spec: Spec, policy: str | Path | Mapping[str, Any] | None) -> Spec:
    """The spec with its ``gate`` section replaced by the policy's (a YAML file, or its mapping,
    with a top-level ``gate:``), validated as a whole spec: a bad policy is a SpecError naming
    the field."""
    if policy is None:
        return spec
    origin = "gate policy" if isinstance(policy, Mapping) else f"{policy} (gate policy)"
    if isinstance(policy, Mapping):
        raw: Any = dict(policy)
    else:
        from daybreak.infra.yamlio import read_yaml_file

        raw = read_yaml_file(policy)
    if not isinstance(raw, dict) or not isinstance(raw.get("gate"), dict):
        raise SpecError(f"{origin}: a policy needs a top-level 'gate:' mapping (the spec's gate section)")
    extra = sorted(str(k) for k in raw if k != "gate")
    if extra:
        raise SpecError(f"{origin}: only 'gate' may be set by a policy, not {extra}")
    return parse_spec({**spec.model_dump(mode="json"), "gate": raw["gate"]}, origin=origin, try_model=False)


def _days(start: date, end: date) -> list[date]:
    if end < start:
        raise ValueError(f"replay: end {end} is before start {start}")
    n = (end - start).days + 1
    if n > MAX_REPLAY_DAYS:
        raise ValueError(f"replay: {n} days from {start} to {end}; at most {MAX_REPLAY_DAYS} at once")
    return date_range(start, end)


class _Recorded:
    """One gated date as its records hold it."""

    def __init__(self, day: str, version: str, rec: GateRecord, full: dict[str, Any], scores: Any) -> None:
        self.day, self.version, self.rec, self.full, self.scores = day, version, rec, full, scores

    def predictions_of(self, version: str | None) -> str | None:
        """The scores column holding `version`'s predictions, if this gate scored it."""
        if version is None:
            return None
        if str(self.full.get("candidate_version")) == version and "candidate" in self.scores:
            return "candidate"
        if self.full.get("champion_version") is not None and str(self.full["champion_version"]) == version \
                and "champion" in self.scores:
            return "champion"
        return None


def _load_day(spec: Spec, ctx: RunContext, cl: Any, day: str, tmp: Path) -> _Recorded | ReplayDay:
    """The date's recorded gate, or the day's row saying why there is none."""
    import mlflow
    import pandas as pd

    cand = registry.candidate_for(cl, spec.model.name, day, spec.spec_hash())
    if cand is None:
        return {"date": day, "status": "no_candidate", "candidate_version": None,
                "note": f"no candidate trained for this date under this spec (hash {spec.spec_hash()[:12]})"}
    version = str(cand.version)
    tags = dict(cand.tags)
    if registry.DECISION_TAG not in tags:
        return {"date": day, "status": "not_gated", "candidate_version": version,
                "note": f"v{version} has no gate decision"}
    rec = GateRecord.from_tags(tags)
    row: ReplayDay = {"date": day, "status": "no_gate_record", "candidate_version": version,
                      "recorded_decision": rec.decision, "recorded_computed_decision": rec.computed_decision,
                      "overridden": rec.override is not None, "champion_version": rec.champion_version,
                      "gate_run_id": rec.gate_run_id}
    if not rec.gate_run_id:
        return row | {"note": f"v{version} was gated ({rec.decision}) without a gate run to read"}
    where = tmp / day
    try:
        files = {name: mlflow.artifacts.download_artifacts(run_id=rec.gate_run_id, artifact_path=name,
                                                           dst_path=str(where), tracking_uri=ctx.tracking_uri)
                 for name in (DECISION_JSON, SCORES)}
        full = json.loads(Path(files[DECISION_JSON]).read_text())
        scores = pd.read_parquet(files[SCORES])
        shutil.rmtree(where, ignore_errors=True)
    except Exception as e:  # a run of an older daybreak (no scores.parquet), or artifacts gone
        log.warning("replay %s: gate run %s of v%s cannot be read: %s", day, rec.gate_run_id, version, e)
        return row | {"note": f"gate run {rec.gate_run_id} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})"}
    missing = [c for c in ("label", "candidate") if c not in scores]
    if full.get("champion_version") is not None and "champion" not in scores:
        missing.append("champion")
    if missing:
        return row | {"note": f"gate run {rec.gate_run_id}: scores.parquet has no {missing} column"}
    return _Recorded(day, version, rec, full, scores)


def _history(spec: Spec, r: _Recorded, replayed: Mapping[str, Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The daily estimates the gate saw (decision.json's ``history``), each day the replay has
    already judged replaced by its replayed estimates, within the policy's lookback. Under the
    recorded policy the two agree, so the recorded decision is reproduced; under another, the days
    in the range carry that policy's estimates, the days before it the recorded ones (used only
    where the metric matches)."""
    from datetime import timedelta

    by_day: dict[str, dict[str, Any]] = {}
    recorded = r.full.get("history")
    for key, entries in (recorded.items() if isinstance(recorded, dict) else []):
        for e in entries if isinstance(entries, list) else []:
            if isinstance(e, dict) and isinstance(e.get("day"), str):
                by_day.setdefault(e["day"], {})[str(key)] = e
    by_day.update({d: dict(v) for d, v in replayed.items() if d < r.day})
    conf = spec.gate.bootstrap
    if conf is None or conf.between_days == "off":
        return {}
    first = (date.fromisoformat(r.day) - timedelta(days=conf.history_days)).isoformat()
    return history_of({d: v for d, v in by_day.items() if first <= d < r.day})


def _inputs(r: _Recorded, history: Mapping[str, Any] | None = None) -> GateInputs:
    """The gate's inputs rebuilt from its run: the scores frame and the recorded data checks."""
    full, scores = r.full, r.scores
    champ = None if full.get("champion_version") is None else str(full["champion_version"])
    prior = full.get("prior")
    return GateInputs(
        day=r.day, candidate_version=r.version, champion_version=champ, frame=scores,
        holdout_hash=str(full.get("holdout_hash") or r.rec.holdout_hash or ""),
        y=scores["label"].to_numpy(np.float64), candidate=scores["candidate"].to_numpy(np.float64),
        champion=None if champ is None else scores["champion"].to_numpy(np.float64),
        data_rules=[dict(x) for x in full.get("rules", []) if x.get("kind") == "data"], drift=full.get("drift"),
        prior=None if prior is None else float(prior),
        champion_seen=frozenset(str(d) for d in full.get("champion_seen_days") or []), history=history or {})


def _forward(spec: Spec, day: str, version: str | None, later: list[_Recorded]) -> dict[str, Any]:
    """The gate metric of `version` on the rows of the days after `day`, each day's rows taken from
    the first later gate that scored it on them."""
    if version is None:
        return {"version": None, "metric": None, "rows": 0, "days": [], "note": "no model in service (no champion)"}
    ys: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    seen: set[str] = set()
    for r in later:
        col = r.predictions_of(version)
        if col is None or DAY not in r.scores:
            continue
        days = np.array([str(v)[:10] for v in r.scores[DAY]], dtype=str)  # ISO dates compare as text
        rows = (days > day) & ~np.isin(days, sorted(seen))
        if not rows.any():
            continue
        ys.append(r.scores["label"].to_numpy(np.float64)[rows])
        preds.append(r.scores[col].to_numpy(np.float64)[rows])
        seen |= set(days[rows])
    if not ys:
        return {"version": version, "metric": None, "rows": 0, "days": [],
                "note": f"v{version} was not scored on a later day in the range (no later gate had it as "
                        "candidate or champion)"}
    y, p = np.concatenate(ys), np.concatenate(preds)
    g = spec.gate
    value = metrics.evaluate(g.metric, y, p, g.threshold)
    return {"version": version, "metric": float(value) if math.isfinite(value) else None, "rows": len(y),
            "days": sorted(seen), "note": None if math.isfinite(value) else f"{g.metric} undefined on those rows"}


def _kept(decision: str | None, r: _Recorded) -> str | None:
    """The version a decision keeps in service: the candidate after PROMOTE, else the champion."""
    if decision == PROMOTE:
        return r.version
    champ = r.full.get("champion_version")
    return None if champ is None else str(champ)


def replay(spec: Spec, ctx: RunContext, start: str | date | None = None, end: str | date | None = None,
           policy: str | Path | Mapping[str, Any] | None = None) -> ReplayResult:
    """Re-judge every gated date from `start` to `end` (default: the context's date) under
    `policy` (a YAML file with a top-level ``gate:``; default: the spec's own gate), from the gate
    runs' records alone. Read-only: no tags, runs, aliases or model loads."""
    first = parse_date(start) if start not in (None, "") else ctx.logical_date
    last = parse_date(end) if end not in (None, "") else (first if start not in (None, "") else ctx.logical_date)
    dates = _days(first, last)
    judged = policy_spec(spec, policy)
    cl = registry.client(ctx)
    rows: list[ReplayDay] = []
    loaded: list[_Recorded] = []
    verdicts: dict[str, Verdict] = {}
    daily: dict[str, dict[str, Any]] = {}  # the replayed daily estimates, for the later days' spread
    with tempfile.TemporaryDirectory(prefix="daybreak-replay-") as tmp:
        for d in dates:
            got = _load_day(spec, ctx, cl, d.isoformat(), Path(tmp))
            if not isinstance(got, _Recorded):
                rows.append(got)
                continue
            try:
                verdicts[got.day] = compute(judged, _inputs(got, _history(judged, got, daily)), forced=None)
                daily[got.day] = verdicts[got.day].record.daily
            except KeyError as e:  # the policy needs a column the recorded scores do not hold
                raise GateError(f"replay {got.day}: the policy needs column {e} (slices, clusters or baselines), "
                                "which the gate run's scores.parquet does not hold") from None
            # what the forward metrics read of it, only: a long range stays within memory
            got.scores = got.scores[[c for c in (DAY, "label", "candidate", "champion") if c in got.scores]]
            loaded.append(got)
            rows.append({"date": got.day, "status": "replayed"})
    by_day = {r.day: r for r in loaded}
    for i, row in enumerate(rows):
        r = by_day.get(row["date"])
        if r is None:
            continue
        verdict = verdicts[r.day]
        rec = verdict.record
        later = [x for x in loaded if x.day > r.day]
        mine = _forward(judged, r.day, _kept(rec.decision, r), later)
        theirs = _forward(judged, r.day, _kept(r.rec.computed_decision or r.rec.decision, r), later)
        recorded_computed = r.rec.computed_decision or r.rec.decision
        rows[i] = {
            "date": r.day, "status": "replayed", "candidate_version": r.version,
            "champion_version": rec.champion_version, "recorded_decision": r.rec.decision,
            "recorded_computed_decision": recorded_computed, "overridden": r.rec.override is not None,
            "replayed_decision": str(rec.decision), "changed": str(rec.decision) != recorded_computed,
            "failed_rules": [x["rule"] for x in rec.rules if x["verdict"] == "fail"],
            "candidate_metric": rec.candidate_metric, "champion_metric": rec.champion_metric,
            "gate_run_id": r.rec.gate_run_id,
            "note": f"overridden: {r.rec.decision} in effect (computed {recorded_computed})"
                    if r.rec.override is not None else None,
            "forward_version": mine["version"], "forward_metric": mine["metric"], "forward_rows": mine["rows"],
            "forward_days": mine["days"], "forward_note": mine["note"],
            "recorded_forward_version": theirs["version"], "recorded_forward_metric": theirs["metric"],
            "recorded_forward_rows": theirs["rows"], "recorded_forward_days": theirs["days"],
            "recorded_forward_note": theirs["note"]}
    return {"step": "replay", "model": spec.model.name, "start": first.isoformat(), "end": last.isoformat(),
            "policy": None if policy is None else ("<mapping>" if isinstance(policy, Mapping) else str(policy)),
            "metric": judged.gate.metric, "days": rows, "summary": _summary(rows), "limits": LIMITS}


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(np.mean(got)) if got else None


def _summary(rows: list[ReplayDay]) -> ReplaySummary:
    done = [r for r in rows if r.get("status") == "replayed"]
    return {"days": len(rows), "replayed": len(done), "changed": sum(bool(r.get("changed")) for r in done),
            "promotions_recorded": sum(r.get("recorded_computed_decision") == PROMOTE for r in done),
            "promotions_replayed": sum(r.get("replayed_decision") == PROMOTE for r in done),
            "mean_forward_recorded": _mean([r.get("recorded_forward_metric") for r in done]),
            "mean_forward_replayed": _mean([r.get("forward_metric") for r in done]),
            "forward_days_recorded": sum(r.get("recorded_forward_metric") is not None for r in done),
            "forward_days_replayed": sum(r.get("forward_metric") is not None for r in done)}
