"""Promote: move the champion alias to the version the gate passed, and only that; roll back.

The move is a compare-and-set: under the model's lock (``registry.model_lock``), the champion
must still be the version the gate compared against. If another run moved it in between,
promotion stops with PromotionConflict instead of overwriting a decision it never saw. Every
promotion and rollback is appended to the audit history (``history.record_event``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from daybreak import registry
from daybreak.context import RunContext
from daybreak.errors import PromotionConflict
from daybreak.gate import PROMOTE
from daybreak.history import record_event
from daybreak.spec import Spec

log = logging.getLogger(__name__)


def promote_model(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    name, day = spec.model.name, ctx.logical_date.isoformat()
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    cand = registry.candidate_for(cl, name, day, spec.spec_hash())
    champ = registry.alias_version(cl, name, spec.promotion.alias)
    current = str(champ.version) if champ else None
    base = {"step": "promote", "date": day, "alias": spec.promotion.alias}
    if cand is None:
        return base | {"promoted": False, "reason": "no candidate for this date", "champion_version": current}
    decision = cand.tags.get(registry.DECISION_TAG)
    if current == str(cand.version):
        return base | {"promoted": False, "reason": "already champion", "champion_version": current,
                       "candidate_version": str(cand.version)}
    if "daybreak.promoted_at" in cand.tags:
        # Promoted once and replaced since: a rerun of an old date never reinstates it.
        return base | {"promoted": False, "champion_version": current, "candidate_version": str(cand.version),
                       "reason": f"promoted at {cand.tags['daybreak.promoted_at']} and replaced since"}
    if decision != PROMOTE:
        reason = "not gated" if decision is None else f"gate decision is {decision}"
        log.info("promote %s: version %s stays out of service (%s)", day, str(cand.version), reason)
        return base | {"promoted": False, "reason": reason, "champion_version": current,
                       "candidate_version": str(cand.version)}
    with registry.model_lock(cl, name, owner=ctx.run_id):
        # everything again, under the lock: an override or a rollback may have landed meanwhile
        cand = cl.get_model_version(name, str(cand.version))
        decision, against = cand.tags.get(registry.DECISION_TAG), cand.tags.get(registry.AGAINST_TAG, "none")
        if decision != PROMOTE or "daybreak.promoted_at" in cand.tags or "daybreak.rolled_back_at" in cand.tags:
            raise PromotionConflict(f"promote {day}: v{cand.version} changed while waiting for the lock "
                                    f"(decision {decision}); nothing promoted")
        champ = registry.alias_version(cl, name, spec.promotion.alias)
        current = str(champ.version) if champ else None
        if (current or "none") != against:
            raise PromotionConflict(
                f"promote {day}: champion is now v{current} but the gate evaluated v{str(cand.version)} against "
                f"{'v' + against if against != 'none' else 'no champion'}; another promotion won; re-run the gate"
            )
        if current is not None:
            cl.set_registered_model_alias(name, spec.promotion.previous_alias, current)
        cl.set_registered_model_alias(name, spec.promotion.alias, str(cand.version))
        registry.set_tags(cl, name, str(cand.version), {
            "daybreak.promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "daybreak.promoted_by_run": ctx.run_id,
            "daybreak.replaced_version": current or "none",
        })
        override = cand.tags.get("daybreak.gate.override", "none") != "none"
        record_event(spec, ctx, "promote", str(cand.version), from_version=current,  # in the lock: in order
                     reason=f"gate {decision} on {day}"
                     + (f" (override: {cand.tags['daybreak.gate.override_reason']})" if override else ""))
    log.info("promote %s: %s -> v%s (was %s)", day, spec.promotion.alias, str(cand.version), current)
    try:
        retired = apply_retention(spec, ctx)
    except Exception:  # the promotion stands; retention runs again after the next one
        log.exception("promote %s: retention failed; the promotion stands", day)
        retired = []
    return base | {"promoted": True, "champion_version": str(cand.version), "previous_version": current,
                   "candidate_version": str(cand.version), "retired_versions": retired}


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
    cutoff = (now or datetime.now(timezone.utc)).timestamp() * 1000 - days * 86_400_000
    gone = []
    with registry.model_lock(cl, name, owner=ctx.run_id):
        found = {str(mv.version): cl.get_model_version(name, str(mv.version)) for mv in registry.versions(cl, name)}
        keep = set()
        for mv in found.values():  # in service, and the chain a rollback walks back along
            if mv.aliases:
                v = str(mv.version)
                while v in found and v not in keep:
                    keep.add(v)
                    v = found[v].tags.get("daybreak.replaced_version", "none")
        for v, mv in found.items():
            pending = mv.tags.get(registry.DECISION_TAG) == PROMOTE and "daybreak.promoted_at" not in mv.tags
            if (v in keep or pending or mv.creation_timestamp >= cutoff
                    or mv.tags.get(registry.DATE_TAG) == ctx.logical_date.isoformat()):
                continue
            cl.delete_model_version(name, v)
            gone.append(v)
    for v in gone:
        record_event(spec, ctx, "retire", v, reason=f"older than promotion.retention_days={days} and not in service")
    if gone:
        log.info("retention: deleted versions %s of %s (older than %d days, no alias)", gone, name, days)
    return gone


def rollback_model(spec: Spec, ctx: RunContext, reason: str) -> dict[str, Any]:
    """Put the previous champion back in service, and record why.

    The rolled-back version is tagged and never promoted again; ``previous`` moves to the version
    the restored champion had replaced (or goes, if none).
    """
    if not reason or not reason.strip():
        raise PromotionConflict("rollback: a reason is required (it is recorded in the history)")
    name, alias, prev_alias = spec.model.name, spec.promotion.alias, spec.promotion.previous_alias
    registry.setup_tracking(ctx, spec.name)
    cl = registry.client(ctx)
    with registry.model_lock(cl, name, owner=ctx.run_id):
        champ, prev = registry.alias_version(cl, name, alias), registry.alias_version(cl, name, prev_alias)
        if champ is None or prev is None:
            raise PromotionConflict(f"rollback: {name} has no {alias!r} and {prev_alias!r} to swap; nothing to roll back to")
        bad, good = str(champ.version), str(prev.version)
        before = prev.tags.get("daybreak.replaced_version", "none")
        if before not in ("none", bad):
            try:
                cl.get_model_version(name, before)
            except Exception:  # deleted since: previous goes
                before = "none"
        cl.set_registered_model_alias(name, alias, good)
        if before not in ("none", bad):
            cl.set_registered_model_alias(name, prev_alias, before)
        else:
            cl.delete_registered_model_alias(name, prev_alias)
        registry.set_tags(cl, name, bad, {"daybreak.rolled_back_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                          "daybreak.rolled_back_reason": reason[:1000]})
        record_event(spec, ctx, "rollback", good, from_version=bad, reason=reason)
    log.warning("rollback: %s v%s -> v%s (%s)", alias, bad, good, reason)
    return {"step": "rollback", "champion_version": good, "rolled_back_version": bad,
            "previous_version": None if before in ("none", bad) else before, "reason": reason}
