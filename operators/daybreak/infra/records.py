"""Every MLflow tag daybreak writes or reads, in one place: the registry is the source of truth
between steps, so its tag names are the contract. Steps use these names; no tag string lives
anywhere else. ``Decision`` and ``Approval`` are the values the gate and a person write."""

from __future__ import annotations

from enum import StrEnum


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
    LINEAGE_KEY = "daybreak.lineage_key"
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
    SKIPPED = "SKIPPED"


class Approval(StrEnum):
    """A version's state under ``promotion.approval: manual``."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
