"""Every MLflow tag daybreak writes or reads, in one place: the registry is the source of truth
between steps, so its tag names are the contract. Steps use these names; no tag string lives
anywhere else. ``Decision`` and ``Approval`` are the values the gate and a person write.

The records a step writes to a model version's tags and another step reads back are typed here,
each with ``to_tags`` and ``from_tags``: ``Lineage`` (train), ``GateRecord`` (gate) and
``Promotion`` (promote, approve, rollback).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Tag:
    """Tag names (plain strings: MLflow keys). Model-version tags unless the comment says run tags."""

    APPROVAL = "daybreak.approval"
    APPROVAL_AT = "daybreak.approval.at"
    APPROVAL_BY = "daybreak.approval.by"
    APPROVAL_GATED_AGAINST = "daybreak.approval.gated_against"
    APPROVAL_REASON = "daybreak.approval.reason"
    APPROVAL_REQUESTED_AT = "daybreak.approval.requested_at"
    APPROVAL_REQUESTED_BY_RUN = "daybreak.approval.requested_by_run"
    ARTIFACTS_SHA256 = "daybreak.artifacts_sha256"
    CANDIDATE_VERSION = "daybreak.candidate_version"
    CODE_VERSION = "daybreak.code_version"
    DISCARDED_DUPLICATE_OF = "daybreak.discarded_duplicate_of"
    FEATURE_VERSION = "daybreak.feature_version"
    FLAVOR = "daybreak.flavor"
    FORCED_RETRAIN = "daybreak.forced_retrain"
    GATE_CANDIDATE_METRIC = "daybreak.gate.candidate_metric"
    GATE_CHAMPION_METRIC = "daybreak.gate.champion_metric"
    GATE_CHAMPION_VERSION = "daybreak.gate.champion_version"
    GATE_COMPUTED_DECISION = "daybreak.gate.computed_decision"
    GATE_DECIDED_AT = "daybreak.gate.decided_at"
    GATE_DECISION = "daybreak.gate.decision"
    GATE_HOLDOUT_DATE = "daybreak.gate.holdout_date"
    GATE_INTERVAL = "daybreak.gate.interval"
    GATE_DAILY = "daybreak.gate.daily"
    GATE_HOLDOUT_HASH = "daybreak.gate.holdout_hash"
    GATE_HOLDOUT_ROWS = "daybreak.gate.holdout_rows"
    GATE_METRIC = "daybreak.gate.metric"
    GATE_OVERRIDE = "daybreak.gate.override"
    GATE_OVERRIDE_BY = "daybreak.gate.override_by"
    GATE_OVERRIDE_REASON = "daybreak.gate.override_reason"
    GATE_RULES = "daybreak.gate.rules"
    GATE_RUN_ID = "daybreak.gate.run_id"
    HOLDOUT = "daybreak.holdout"
    INPUT_HASHES = "daybreak.input_hashes"
    LABEL_MEAN = "daybreak.label_mean"
    LINEAGE_KEY = "daybreak.lineage_key"
    INTERNAL = "daybreak.internal"  # registered-model tag: "lock" or "reap-marker" (hidden from daybreak's listings)
    LOCK_EXPIRES = "daybreak.lock_expires"
    LOCK_HOLDER = "daybreak.lock_holder"
    LOCK_OWNER = "daybreak.lock_owner"
    LOGICAL_DATE = "daybreak.logical_date"
    MODEL_SHA256 = "daybreak.model_sha256"
    MONITOR_ACTION = "daybreak.monitor.action"
    MONITOR_CHAMPION_VERSION = "daybreak.monitor.champion_version"
    MONITOR_DATE = "daybreak.monitor.date"
    MONITOR_DRIFT = "daybreak.monitor.drift"
    MONITOR_REASONS = "daybreak.monitor.reasons"
    PROMOTED_AT = "daybreak.promoted_at"
    PROMOTED_BY_RUN = "daybreak.promoted_by_run"
    REAP_UNTIL = "daybreak.reap_until"
    REPLACED_VERSION = "daybreak.replaced_version"
    ROLLED_BACK_AT = "daybreak.rolled_back_at"
    ROLLED_BACK_REASON = "daybreak.rolled_back_reason"
    RUN_CONTEXT = "daybreak.run_context"
    SKOPS_TRUSTED_TYPES = "daybreak.skops_trusted_types"
    SPEC_HASH = "daybreak.spec_hash"
    TRAIN_ROWS = "daybreak.train_rows"
    TRIAL_STATUS = "daybreak.trial_status"
    VAL_METRIC = "daybreak.val_metric"
    WINDOW_END = "daybreak.window_end"
    WINDOW_START = "daybreak.window_start"

    # prefixes: the audit log (run tags ``daybreak.audit.<field>``) and notification events
    AUDIT_PREFIX = "daybreak.audit."
    EVENT_PREFIX = "daybreak.model."


class Decision(StrEnum):
    """The gate's decision for a candidate (a ``str``: it compares equal to the tag's text)."""

    PROMOTE = "PROMOTE"
    REJECT = "REJECT"
    BLOCKED = "BLOCKED_BY_DATA"
    INSUFFICIENT = "INSUFFICIENT_DATA"  # too few holdout rows (or rows of a class) to judge: nothing promoted
    SKIPPED = "SKIPPED"


class Approval(StrEnum):
    """A version's state under ``promotion.approval: manual``."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


# --- typed records ------------------------------------------------------------------------------

NONE = "none"  # how a record says "no value" in a tag (MLflow tags cannot be empty on every store)
TAG_LIMIT = 7000  # MLflow keeps tag values up to 8000 characters; stay well under


def _opt(v: str | None) -> str | None:
    return None if v in (None, NONE) else v


def _number(v: str | None, kind: type[float] | type[int]) -> Any:
    """A number tag read back; None when absent or not a number (tags are editable: a bad one on
    an old version must not stop every later gate that reads the history)."""
    if v is None or v == NONE or len(v) > 100:
        return None
    try:
        return kind(v)
    except ValueError:
        return None


def _float(v: str | None) -> float | None:
    return _number(v, float)


def _int(v: str | None) -> int | None:
    return _number(v, int)


def json_default(v: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays (and anything else, as text)."""
    item = getattr(v, "item", None)
    if callable(item) and getattr(v, "ndim", 1) == 0:
        return item()
    tolist = getattr(v, "tolist", None)
    return tolist() if callable(tolist) else str(v)


def compact_rules(rules: list[dict[str, Any]], limit: int = TAG_LIMIT) -> str:
    """Rules as JSON within a tag's limit: details dropped first, then whole rules (passing ones
    before failing ones). The full list is in the gate run's decision.json."""
    text = json.dumps(rules, default=json_default)
    if len(text) <= limit:
        return text
    slim = sorted(({k: v for k, v in r.items() if k != "detail"} for r in rules), key=lambda r: r["verdict"] == "pass")
    while slim:
        text = json.dumps(slim, default=json_default)
        if len(text) <= limit:
            return text
        slim.pop()
    return "[]"  # not even one rule fits (a huge name): the run's decision.json has them


MAX_JSON_TAG = 8000  # MLflow's own limit on a tag value: a longer one was not written by daybreak


def _json_tag(text: str | None, kind: type) -> Any:
    """A JSON tag read back as `kind` (list or dict), or an empty one when it is absent, too long,
    not JSON, or not that shape. Tags are editable by anyone with registry access, and every gate,
    the history and the Models page read them: a bad one (a 5000-digit number, 3000 nested
    brackets) must never raise."""
    if not text or len(text) > MAX_JSON_TAG:
        return kind()
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, int digit limit, deep nesting
        return kind()
    return raw if isinstance(raw, kind) else kind()


def _daily(text: str | None) -> dict[str, dict[str, Any]]:
    """The daily-estimates tag read back: {quantity: estimate}, {} when unreadable."""
    return {str(k): v for k, v in _json_tag(text, dict).items() if isinstance(v, dict)}


@dataclass(frozen=True)
class GateRecord:
    """A candidate's gate decision as its model-version tags hold it."""

    decision: str | None
    computed_decision: str | None = None
    champion_version: str | None = None  # the champion it was compared with; None: there was none
    metric: str | None = None
    candidate_metric: float | None = None
    champion_metric: float | None = None
    holdout_date: str | None = None
    holdout_rows: int | None = None
    holdout_hash: str | None = None
    rules: list[dict[str, Any]] = field(default_factory=list)
    decided_at: str | None = None
    override: str | None = None  # the decision a person forced, if any
    override_reason: str | None = None
    override_by: str | None = None
    gate_run_id: str | None = None
    interval: str | None = None  # how the intervals were computed: method, resampling unit, clusters, level
    # the gain over the champion (key "champion") on this holdout: {"day", "metric", "unit", "days",
    # "value", "se"}; later gates with a holdout of as many days estimate the day-to-day spread from these
    daily: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_tags(self) -> dict[str, str]:
        """Every field as a tag. The override fields are always written, so a later decision
        never shows an earlier override's reason. ``GATE_DECISION`` must be written last (the
        caller's job): promotion reads it, and it must never stand without the rest."""
        def text(v: Any) -> str:
            return NONE if v is None else str(v)

        tags = {
            Tag.GATE_DECISION: text(self.decision),
            Tag.GATE_COMPUTED_DECISION: text(self.computed_decision),
            Tag.GATE_CHAMPION_VERSION: text(self.champion_version),
            Tag.GATE_METRIC: text(self.metric),
            Tag.GATE_CANDIDATE_METRIC: NONE if self.candidate_metric is None else repr(self.candidate_metric),
            Tag.GATE_CHAMPION_METRIC: NONE if self.champion_metric is None else repr(self.champion_metric),
            Tag.GATE_HOLDOUT_DATE: text(self.holdout_date),
            Tag.GATE_HOLDOUT_ROWS: text(self.holdout_rows),
            Tag.GATE_HOLDOUT_HASH: text(self.holdout_hash),
            Tag.GATE_RULES: compact_rules(self.rules),
            Tag.GATE_DECIDED_AT: text(self.decided_at),
            Tag.GATE_OVERRIDE: text(self.override),
            Tag.GATE_OVERRIDE_REASON: NONE if self.override_reason is None else self.override_reason[:1000],
            Tag.GATE_OVERRIDE_BY: text(self.override_by),
        }
        if self.gate_run_id is not None:
            tags[Tag.GATE_RUN_ID] = self.gate_run_id
        if self.interval is not None:
            tags[Tag.GATE_INTERVAL] = self.interval
        # always written: a regate that records none must not leave the earlier gate's behind
        daily = json.dumps(self.daily, sort_keys=True, default=json_default)
        tags[Tag.GATE_DAILY] = daily if len(daily) <= 5000 else "{}"
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> GateRecord:
        # cut at the tag limit by an older version, or edited: the gate run's decision.json has them
        rules = [r for r in _json_tag(tags.get(Tag.GATE_RULES), list) if isinstance(r, dict)]
        return cls(decision=tags.get(Tag.GATE_DECISION),
                   computed_decision=tags.get(Tag.GATE_COMPUTED_DECISION),
                   champion_version=_opt(tags.get(Tag.GATE_CHAMPION_VERSION)),
                   metric=_opt(tags.get(Tag.GATE_METRIC)),
                   candidate_metric=_float(tags.get(Tag.GATE_CANDIDATE_METRIC)),
                   champion_metric=_float(tags.get(Tag.GATE_CHAMPION_METRIC)),
                   holdout_date=_opt(tags.get(Tag.GATE_HOLDOUT_DATE)),
                   holdout_rows=_int(tags.get(Tag.GATE_HOLDOUT_ROWS)),
                   holdout_hash=_opt(tags.get(Tag.GATE_HOLDOUT_HASH)),
                   rules=rules,
                   decided_at=_opt(tags.get(Tag.GATE_DECIDED_AT)),
                   override=_opt(tags.get(Tag.GATE_OVERRIDE)),
                   override_reason=_opt(tags.get(Tag.GATE_OVERRIDE_REASON)),
                   override_by=_opt(tags.get(Tag.GATE_OVERRIDE_BY)),
                   gate_run_id=tags.get(Tag.GATE_RUN_ID), interval=tags.get(Tag.GATE_INTERVAL),
                   daily=_daily(tags.get(Tag.GATE_DAILY)))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Lineage:
    """What a trained version was made from, as its model-version tags hold it."""

    logical_date: str
    spec_hash: str
    lineage_key: str
    window_start: str | None
    window_end: str | None
    holdout: list[str]
    input_hashes: str  # JSON, cut to fit a tag; the run's input_hashes.json artifact has all of it
    feature_version: str
    code_version: str
    flavor: str
    train_rows: int
    val_metric: float | None
    run_context: str
    forced: bool = False
    label_mean: float | None = None  # of the fit rows: the gate's prior baseline

    def to_tags(self) -> dict[str, str]:
        tags = {
            Tag.LOGICAL_DATE: self.logical_date, Tag.SPEC_HASH: self.spec_hash, Tag.LINEAGE_KEY: self.lineage_key,
            Tag.WINDOW_START: self.window_start or NONE, Tag.WINDOW_END: self.window_end or NONE,
            Tag.HOLDOUT: json.dumps(self.holdout), Tag.INPUT_HASHES: self.input_hashes,
            Tag.FEATURE_VERSION: self.feature_version, Tag.CODE_VERSION: self.code_version, Tag.FLAVOR: self.flavor,
            Tag.TRAIN_ROWS: str(self.train_rows), Tag.VAL_METRIC: repr(self.val_metric),
            Tag.RUN_CONTEXT: self.run_context,
        }
        if self.label_mean is not None:
            tags[Tag.LABEL_MEAN] = repr(self.label_mean)
        return tags | ({Tag.FORCED_RETRAIN: "true"} if self.forced else {})

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Lineage:
        holdout = [d for d in _json_tag(tags.get(Tag.HOLDOUT), list) if isinstance(d, str)]
        val = tags.get(Tag.VAL_METRIC)
        return cls(logical_date=tags.get(Tag.LOGICAL_DATE, ""), spec_hash=tags.get(Tag.SPEC_HASH, ""),
                   lineage_key=tags.get(Tag.LINEAGE_KEY, ""), window_start=_opt(tags.get(Tag.WINDOW_START)),
                   window_end=_opt(tags.get(Tag.WINDOW_END)), holdout=holdout,
                   input_hashes=tags.get(Tag.INPUT_HASHES, "{}"), feature_version=tags.get(Tag.FEATURE_VERSION, ""),
                   code_version=tags.get(Tag.CODE_VERSION, ""), flavor=tags.get(Tag.FLAVOR, ""),
                   train_rows=_int(tags.get(Tag.TRAIN_ROWS)) or 0,
                   val_metric=None if val in (None, NONE, "None") else _float(val),
                   run_context=tags.get(Tag.RUN_CONTEXT, ""), forced=tags.get(Tag.FORCED_RETRAIN) == "true",
                   label_mean=_float(tags.get(Tag.LABEL_MEAN)))

    @property
    def window(self) -> str | None:
        return f"{self.window_start}..{self.window_end}" if self.window_start else None


@dataclass(frozen=True)
class Promotion:
    """A version's promotion, approval and rollback marks, as its model-version tags hold them."""

    promoted_at: str | None = None  # set last when a promotion is complete (alias moved, event recorded)
    promoted_by_run: str | None = None
    replaced_version: str | None = None
    approval: str | None = None  # an Approval under promotion.approval: manual
    approval_by: str | None = None
    approval_at: str | None = None
    approval_reason: str | None = None
    approval_gated_against: str | None = None
    rolled_back_at: str | None = None
    rolled_back_reason: str | None = None

    @staticmethod
    def promoted(at: str, run_id: str, replaced: str | None) -> dict[str, str]:
        """The tags that mark a promotion complete."""
        return {Tag.PROMOTED_AT: at, Tag.PROMOTED_BY_RUN: run_id, Tag.REPLACED_VERSION: replaced or NONE}

    @staticmethod
    def rolled_back(at: str, reason: str) -> dict[str, str]:
        return {Tag.ROLLED_BACK_AT: at, Tag.ROLLED_BACK_REASON: reason[:1000]}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Promotion:
        return cls(promoted_at=tags.get(Tag.PROMOTED_AT), promoted_by_run=tags.get(Tag.PROMOTED_BY_RUN),
                   replaced_version=_opt(tags.get(Tag.REPLACED_VERSION)), approval=tags.get(Tag.APPROVAL),
                   approval_by=tags.get(Tag.APPROVAL_BY), approval_at=tags.get(Tag.APPROVAL_AT),
                   approval_reason=tags.get(Tag.APPROVAL_REASON),
                   approval_gated_against=_opt(tags.get(Tag.APPROVAL_GATED_AGAINST)),
                   rolled_back_at=tags.get(Tag.ROLLED_BACK_AT), rolled_back_reason=tags.get(Tag.ROLLED_BACK_REASON))
