"""Promote: move the champion alias to the version the gate passed, and only that; approve; roll back.

The move is a compare-and-set: under the model's lock (``registry.model_lock``), the champion
must still be the version the gate compared against. If another run moved it in between,
promotion stops with PromotionConflict instead of overwriting a decision it never saw. Every
promotion and rollback is appended to the audit history (``history.record_event``).

With ``promotion.approval: manual`` the promote step tags a passing version pending
(``daybreak.approval``) and moves nothing; ``approve_model`` is the person's answer, and an
approval moves the champion through the same compare-and-set, against the champion the gate saw.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, TypedDict

from daybreak.gate import PROMOTE
from daybreak.infra import registry
from daybreak.infra.audit import record_event
from daybreak.infra.context import RunContext
from daybreak.infra.errors import PromotionConflict
from daybreak.infra.records import Approval, Promotion, Tag
from daybreak.spec import Spec

log = logging.getLogger(__name__)


PENDING, APPROVED, REJECTED = Approval.PENDING, Approval.APPROVED, Approval.REJECTED
APPROVAL_TAG = Tag.APPROVAL


class PromoteResult(TypedDict, total=False):
    """What ``promote_model`` returns (and the orchestrators pass on, e.g. to ``should_deploy``)."""

    step: str
    date: str
    alias: str
    dry_run: bool  # only in a dry run
    promoted: bool
    reason: str
    would: str  # a dry run: what it would do
    champion_version: str | None  # after the step
    candidate_version: str
    previous_version: str | None  # promoted: the champion it replaced
    retired_versions: list[str]  # promoted: the versions retention deleted
    approval: str | None  # pending | rejected: the version waits for (or was refused) approval
    gated_against: str | None  # with approval: the champion the gate compared it against


def promote_model(spec: Spec, ctx: RunContext, dry_run: bool = False) -> PromoteResult:
    """Move the champion to the date's candidate if the gate passed it; with
    ``promotion.approval: manual`` tag it pending instead, for ``approve_model`` to promote.

    ``dry_run`` checks everything up to the move and says what it would do (``would``), changing
    nothing: no alias, tag or event."""
    name, day = spec.model.name, ctx.logical_date.isoformat()
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    cand = registry.candidate_for(cl, name, day, spec.spec_hash())
    champ = registry.alias_version(cl, name, spec.promotion.alias)
    current = str(champ.version) if champ else None
    base: PromoteResult = {"step": "promote", "date": day, "alias": spec.promotion.alias}
    if dry_run:
        base["dry_run"] = True
    if cand is None:
        return base | {"promoted": False, "reason": "no candidate for this date", "champion_version": current}
    decision = cand.tags.get(registry.DECISION_TAG)
    if current == str(cand.version):
        if Tag.PROMOTED_AT not in cand.tags and decision == PROMOTE and not dry_run:
            _finish_record(cl, spec, ctx, str(cand.version))
        return base | {"promoted": False, "reason": "already champion", "champion_version": current,
                       "candidate_version": str(cand.version)}
    if Tag.PROMOTED_AT in cand.tags:
        # Promoted once and replaced since: a rerun of an old date never reinstates it.
        return base | {"promoted": False, "champion_version": current, "candidate_version": str(cand.version),
                       "reason": f"promoted at {cand.tags[Tag.PROMOTED_AT]} and replaced since"}
    if decision != PROMOTE:
        reason = "not gated" if decision is None else f"gate decision is {decision}"
        log.info("promote %s: version %s stays out of service (%s)", day, str(cand.version), reason)
        return base | {"promoted": False, "reason": reason, "champion_version": current,
                       "candidate_version": str(cand.version)}
    if cand.tags.get(APPROVAL_TAG) in (PENDING, REJECTED):  # once a person is asked, only they decide
        return base | _approval_state(cand, current)
    # the stored files must still be the ones training recorded (and the gate loaded): a version
    # every server would refuse to load never becomes champion, nor waits for approval
    registry.verify_model(ctx, name, str(cand.version))
    manual = spec.promotion.approval == "manual"
    if dry_run:
        would = (f"tag v{cand.version} pending approval (champion stays {_v(current)})" if manual
                 else f"move {spec.promotion.alias} to v{cand.version} (from {_v(current)})")
        log.info("promote %s: dry run; would %s", day, would)
        return base | {"promoted": False, "would": would, "reason": f"dry run: would {would}",
                       "champion_version": current, "candidate_version": str(cand.version)}
    with registry.model_lock(cl, name, owner=ctx.run_id) as held:
        # everything again, under the lock: an override or a rollback may have landed meanwhile
        cand = cl.get_model_version(name, str(cand.version))
        decision = cand.tags.get(registry.DECISION_TAG)
        now = registry.alias_version(cl, name, spec.promotion.alias)
        if now is not None and str(now.version) == str(cand.version):  # a run of the same date got here first
            return base | {"promoted": False, "reason": "already champion", "champion_version": str(now.version),
                           "candidate_version": str(cand.version)}
        if (decision != PROMOTE or Tag.PROMOTED_AT in cand.tags or Tag.ROLLED_BACK_AT in cand.tags
                or cand.tags.get(APPROVAL_TAG) in (PENDING, REJECTED)):
            raise PromotionConflict(f"promote {day}: v{cand.version} changed while waiting for the lock "
                                    f"(decision {decision}, approval {cand.tags.get(APPROVAL_TAG, 'none')}); "
                                    "nothing promoted")
        current = _unmoved_champion(cl, spec, cand, f"promote {day}", "another promotion won; re-run the gate")
        if manual:
            registry.set_tags(cl, name, str(cand.version), {
                APPROVAL_TAG: PENDING, Tag.APPROVAL_GATED_AGAINST: current or "none",
                Tag.APPROVAL_REQUESTED_AT: _now(), Tag.APPROVAL_REQUESTED_BY_RUN: ctx.run_id})
            record_event(spec, ctx, "pending_approval", str(cand.version), from_version=current,
                         reason=f"gate {decision} on {day}; promotion.approval is manual")
        else:
            override = cand.tags.get(Tag.GATE_OVERRIDE, "none") != "none"
            _move_champion(held, spec, ctx, cand, current, f"gate {decision} on {day}" + (
                f" (override: {cand.tags[Tag.GATE_OVERRIDE_REASON]})" if override else ""))
    if manual:
        cand = cl.get_model_version(name, str(cand.version))
        log.warning("promote %s: v%s passed the gate and waits for approval (champion stays %s)", day,
                    str(cand.version), current)
        return base | _approval_state(cand, current)
    log.info("promote %s: %s -> v%s (was %s)", day, spec.promotion.alias, str(cand.version), current)
    return base | {"promoted": True, "champion_version": str(cand.version), "previous_version": current,
                   "candidate_version": str(cand.version), "retired_versions": _retain(spec, ctx)}


def should_deploy(result: PromoteResult | dict[str, Any]) -> bool:
    """What the orchestrators ask after promote: never deploy for a version waiting for approval
    (or refused it), nor in a dry run; the champion did not move."""
    return result.get("approval") not in (PENDING, REJECTED) and not result.get("dry_run")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _approval_state(cand: Any, champion: str | None) -> PromoteResult:
    """The promote step's result for a version that a person has to approve (or refused)."""
    v, t = str(cand.version), cand.tags
    state = t.get(APPROVAL_TAG)
    if state == PENDING:
        reason = (f"v{v} passed the gate and waits for approval: daybreak approve --spec <spec> --version {v} "
                  "--reason ... (or the daybreak_approve DAG)")
    else:
        reason = (f"approval of v{v} was rejected by {t.get(Tag.APPROVAL_BY)}: "
                  f"{t.get(Tag.APPROVAL_REASON)}")
    return {"promoted": False, "approval": state, "reason": reason, "champion_version": champion,
            "candidate_version": v, "gated_against": t.get(Tag.APPROVAL_GATED_AGAINST)}


def _unmoved_champion(cl: Any, spec: Spec, cand: Any, what: str, hint: str) -> str | None:
    """The champion, if it is still the version the gate compared `cand` against (call under the
    lock); else PromotionConflict with `hint` (``{champion}`` in it: the champion now)."""
    against = cand.tags.get(registry.AGAINST_TAG, "none")
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    current = str(champ.version) if champ else None
    if (current or "none") != against:
        raise PromotionConflict(f"{what}: champion is now {_v(current)} but the gate evaluated v{cand.version} "
                                f"against {_v(against)}; " + hint.format(champion=_v(current)))
    return current


def _v(version: str | None) -> str:
    return "no champion" if version in (None, "none") else f"v{version}"


def not_promoted(spec: Spec, ctx: RunContext, done: dict[str, Any]) -> PromoteResult:
    """The promote step's result when the gate (``done["gate"]``) said no: the champion in service
    now, read from the registry's alias (a rerun of a day gated before a later promotion reports the
    champion of today, as ``day_summary`` does). run_cycle and the Prefect flow both report this
    (``steps.STEPS['promote'].otherwise``)."""
    gate = done["gate"]
    cl = registry.client(ctx)
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    return {"step": "promote", "date": ctx.logical_date.isoformat(), "promoted": False,
            "reason": f"gate decision is {gate.get('decision')}", "candidate_version": gate.get("candidate_version"),
            "champion_version": None if champ is None else str(champ.version)}


def _move_champion(held: registry.Held, spec: Spec, ctx: RunContext, cand: Any, current: str | None,
                   reason: str) -> None:
    """Champion -> `cand`, previous -> the old champion, and the promote event (under the lock
    `held`, which fences each alias write, so events are recorded in the order the aliases moved)."""
    name = spec.model.name
    if current is not None:
        held.set_alias(spec.promotion.previous_alias, current)
    held.set_alias(spec.promotion.alias, str(cand.version))
    record_event(spec, ctx, "promote", str(cand.version), from_version=current, reason=reason)
    # last: the mark that the promotion and its record are complete (see _finish_record)
    held.check()
    registry.set_tags(held.cl, name, str(cand.version), Promotion.promoted(_now(), ctx.run_id, current))


def _finish_record(cl: Any, spec: Spec, ctx: RunContext, version: str) -> None:
    """A champion without ``promoted_at``: the run that moved the alias stopped (a crash) before
    it finished recording. Record the promote event if it is missing, then the mark."""
    from daybreak.infra.audit import has_event

    name = spec.model.name
    with registry.model_lock(cl, name, owner=ctx.run_id):
        champ = registry.alias_version(cl, name, spec.promotion.alias)
        if champ is None or str(champ.version) != version or Tag.PROMOTED_AT in champ.tags:
            return
        prev = registry.alias_version(cl, name, spec.promotion.previous_alias)
        previous = str(prev.version) if prev is not None and str(prev.version) != version else None
        if not has_event(spec, ctx, "promote", version):
            log.warning("promote %s: v%s is champion but its promotion was not recorded (the run that moved it "
                        "stopped); recording it now", ctx.logical_date, version)
            record_event(spec, ctx, "promote", version, from_version=previous,
                         reason="recorded by a rerun: the run that moved the alias stopped before recording it")
        registry.set_tags(cl, name, version, Promotion.promoted(_now(), ctx.run_id, previous))


def _retain(spec: Spec, ctx: RunContext) -> list[str]:
    try:
        return apply_retention(spec, ctx)
    except Exception:  # the promotion stands; retention runs again after the next one
        log.exception("promote: retention failed; the promotion stands")
        return []


class ApproveResult(TypedDict, total=False):
    """What ``approve_model`` returns."""

    step: str
    version: str
    date: str | None  # the version's logical date (its tag)
    decision: str  # approve | reject
    reason: str
    by: str
    approval: str  # approved | rejected
    promoted: bool
    champion_version: str | None  # after the answer
    previous_version: str | None  # approved: the champion it replaced
    retired_versions: list[str]  # approved: the versions retention deleted


def approve_model(spec: Spec, ctx: RunContext, version: str | int, reason: str, decision: str = "approve",
                  by: str | None = None) -> ApproveResult:
    """A person's answer to a version waiting for approval (``promotion.approval: manual``).

    ``approve`` promotes it through the same compare-and-set as the promote step: under the lock,
    the champion must still be the version the gate compared it against, or nothing changes and
    the version must be re-gated. ``reject`` keeps it out of service for good. Both are recorded
    with `reason` and `by` (default: the OS user).
    """
    from daybreak.infra.audit import who
    from daybreak.infra.context import parse_date
    from daybreak.infra.errors import ApprovalError

    choice = str(decision or "").strip().lower()
    if choice not in ("approve", "reject"):
        raise ApprovalError(f"approval decision {decision!r} is not 'approve' or 'reject'")
    if not reason or not str(reason).strip():
        raise ApprovalError(f"{choice} v{version}: a reason is required (it is recorded in the history)")
    v = str(version).strip().removeprefix("v")
    if not v.isdigit():
        raise ApprovalError(f"{choice}: {version!r} is not a model version number")
    name, by = spec.model.name, by or who()
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    with registry.model_lock(cl, name, owner=ctx.run_id) as held:
        mv = _pending_version(cl, name, v, choice)
        t = mv.tags
        day = t.get(registry.DATE_TAG)
        ev_ctx = replace(ctx, logical_date=parse_date(day)) if day else ctx
        stamp = {Tag.APPROVAL_BY: by, Tag.APPROVAL_REASON: str(reason)[:1000],
                 Tag.APPROVAL_AT: _now()}
        if choice == "reject":
            held.check()
            registry.set_tags(cl, name, v, {**stamp, APPROVAL_TAG: REJECTED})
            record_event(spec, ev_ctx, "approval_rejected", v, from_version=t.get(registry.AGAINST_TAG, "none"),
                         reason=reason, by=by)
            champ = registry.alias_version(cl, name, spec.promotion.alias)
            result: ApproveResult = {"approval": REJECTED, "promoted": False,
                                     "champion_version": str(champ.version) if champ else None}
        else:
            registry.verify_model(ctx, name, v)  # the files a person approves are the ones the gate saw
            current = _unmoved_champion(
                cl, spec, mv, f"approve v{v}",
                f"the champion moved since v{v} was gated, so it must be re-gated against {{champion}} "
                f"(daybreak gate --spec <spec> --date {day} --force) and approved again; nothing changed")
            # The alias first: if a later write fails, the version is not left marked approved
            # but out of service (and a retry finds it promoted, not "approved at None").
            _move_champion(held, spec, ev_ctx, mv, current, f"gate PROMOTE on {day}, approved by {by}: {reason}")
            held.check()
            registry.set_tags(cl, name, v, {**stamp, APPROVAL_TAG: APPROVED})
            record_event(spec, ev_ctx, "approved", v, from_version=current, reason=reason, by=by)
            result = {"approval": APPROVED, "promoted": True, "champion_version": v, "previous_version": current}
    log.info("%s v%s of %s by %s: %s", "approved" if choice == "approve" else "rejected", v, name, by, reason)
    if result["promoted"]:
        result["retired_versions"] = _retain(spec, ctx)
    head: ApproveResult = {"step": "approve", "version": v, "date": day, "decision": choice, "reason": reason,
                           "by": by}
    return head | result


def _pending_version(cl: Any, name: str, v: str, choice: str) -> Any:
    """Version `v` if it is waiting for approval; otherwise an error saying what it is instead."""
    from mlflow.exceptions import MlflowException

    from daybreak.infra.errors import ApprovalError

    try:
        mv = cl.get_model_version(name, v)
    except MlflowException as e:
        raise ApprovalError(f"{choice} v{v}: {name} has no version {v} (never registered, or deleted by "
                            "retention)") from e
    t = mv.tags
    state, decision = t.get(APPROVAL_TAG), t.get(registry.DECISION_TAG)
    if state == APPROVED or Tag.PROMOTED_AT in t:
        raise ApprovalError(f"{choice} v{v}: already promoted at {t.get(Tag.PROMOTED_AT)}"
                            + (f" (approved by {t.get(Tag.APPROVAL_BY)})" if state == APPROVED else "")
                            + (f", rolled back at {t[Tag.ROLLED_BACK_AT]}" if Tag.ROLLED_BACK_AT in t
                               else ""))
    if state == REJECTED:
        raise ApprovalError(f"{choice} v{v}: its approval was rejected by {t.get(Tag.APPROVAL_BY)} at "
                            f"{t.get(Tag.APPROVAL_AT)} ({t.get(Tag.APPROVAL_REASON)}); a rejected "
                            "version is never promoted")
    if state != PENDING:
        raise ApprovalError(f"{choice} v{v}: not pending approval (gate decision {decision or 'none: not gated'}); "
                            "only a version gated PROMOTE under promotion.approval: manual waits for approval")
    if decision != PROMOTE and choice == "approve":  # rejecting it is still an answer
        raise ApprovalError(f"{choice} v{v}: it was re-gated {decision} since it was tagged pending; only a version "
                            "gated PROMOTE can be approved")
    return mv


def apply_retention(spec: Spec, ctx: RunContext, now: datetime | None = None) -> list[str]:
    """Delete the registry versions older than ``promotion.retention_days`` that are out of service:
    never one an alias points at or that a rollback could walk back to (the ``replaced_version``
    chain), one gated PROMOTE and not yet promoted, or the date's own candidate. Their runs,
    artifacts and lineage stay in the tracking store; each deletion is an audit event."""
    days = spec.promotion.retention_days
    if days is None:
        return []
    name = spec.model.name
    cl = registry.client(ctx)
    cutoff = (now or datetime.now(UTC)).timestamp() * 1000 - days * 86_400_000
    gone = []
    with registry.model_lock(cl, name, owner=ctx.run_id) as held:
        found = {str(mv.version): cl.get_model_version(name, str(mv.version)) for mv in registry.versions(cl, name)}
        keep = set()
        for mv in found.values():  # in service, and the chain a rollback walks back along
            if mv.aliases:
                v = str(mv.version)
                while v in found and v not in keep:
                    keep.add(v)
                    v = found[v].tags.get(Tag.REPLACED_VERSION, "none")
        for v, mv in found.items():
            # passed the gate, not promoted yet (waiting for approval, or for the promote step)
            pending = (mv.tags.get(registry.DECISION_TAG) == PROMOTE and Tag.PROMOTED_AT not in mv.tags
                       and mv.tags.get(APPROVAL_TAG) != REJECTED)
            if (v in keep or pending or mv.creation_timestamp >= cutoff
                    or mv.tags.get(registry.DATE_TAG) == ctx.logical_date.isoformat()):
                continue
            held.check()  # a run that lost the lock deletes nothing more
            cl.delete_model_version(name, v)
            gone.append(v)
    for v in gone:
        record_event(spec, ctx, "retire", v, reason=f"older than promotion.retention_days={days} and not in service")
    if gone:
        log.info("retention: deleted versions %s of %s (older than %d days, no alias)", gone, name, days)
    return gone


class RollbackResult(TypedDict, total=False):
    """What ``rollback_model`` returns."""

    step: str
    champion_version: str  # the restored champion
    rolled_back_version: str
    previous_version: str | None  # what ``previous`` points at now
    reason: str


def rollback_model(spec: Spec, ctx: RunContext, reason: str, expect: str | None = None) -> RollbackResult:
    """Put the previous champion back in service, and record why.

    The rolled-back version is tagged and never promoted again; ``previous`` moves to the version
    the restored champion had replaced (or goes, if none). With `expect` (the monitor's), nothing
    changes unless the champion is still that version.
    """
    if not reason or not reason.strip():
        raise PromotionConflict("rollback: a reason is required (it is recorded in the history)")
    name, alias, prev_alias = spec.model.name, spec.promotion.alias, spec.promotion.previous_alias
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    with registry.model_lock(cl, name, owner=ctx.run_id) as held:
        champ, prev = registry.alias_version(cl, name, alias), registry.alias_version(cl, name, prev_alias)
        if champ is None or prev is None:
            raise PromotionConflict(f"rollback: {name} has no {alias!r} and {prev_alias!r} to swap; "
                                    "nothing to roll back to")
        bad, good = str(champ.version), str(prev.version)
        if expect is not None and bad != str(expect):
            raise PromotionConflict(f"rollback: the champion is v{bad} now, not v{expect} as judged; nothing changed")
        before = prev.tags.get(Tag.REPLACED_VERSION, "none")
        if before not in ("none", bad):
            try:
                cl.get_model_version(name, before)
            except Exception:  # deleted since: previous goes
                before = "none"
        held.set_alias(alias, good)
        if before not in ("none", bad):
            held.set_alias(prev_alias, before)
        else:
            held.delete_alias(prev_alias)
        held.check()
        registry.set_tags(cl, name, bad, Promotion.rolled_back(_now(), reason))
        record_event(spec, ctx, "rollback", good, from_version=bad, reason=reason)
    log.warning("rollback: %s v%s -> v%s (%s)", alias, bad, good, reason)
    return {"step": "rollback", "champion_version": good, "rolled_back_version": bad,
            "previous_version": None if before in ("none", bad) else before, "reason": reason}
