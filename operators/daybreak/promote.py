"""Promote: move the champion alias to the version the gate passed, and only that.

The move is a compare-and-set: the champion must still be the version the gate compared
against. If another run moved it in between, promotion stops with PromotionConflict instead of
overwriting a decision it never saw.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

from daybreak import registry
from daybreak.context import RunContext
from daybreak.errors import PromotionConflict
from daybreak.gate import PROMOTE
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
    against = cand.tags.get(registry.AGAINST_TAG, "none")
    if (current or "none") != against:
        raise PromotionConflict(
            f"promote {day}: champion is now v{current} but the gate evaluated v{str(cand.version)} against "
            f"{'v' + against if against != 'none' else 'no champion'}; re-run the gate"
        )
    if current is not None:
        cl.set_registered_model_alias(name, spec.promotion.previous_alias, current)
    cl.set_registered_model_alias(name, spec.promotion.alias, str(cand.version))
    registry.set_tags(cl, name, str(cand.version), {
        "daybreak.promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "daybreak.promoted_by_run": ctx.run_id,
        "daybreak.replaced_version": current or "none",
    })
    log.info("promote %s: %s -> v%s (was %s)", day, spec.promotion.alias, str(cand.version), current)
    return base | {"promoted": True, "champion_version": str(cand.version), "previous_version": current,
                   "candidate_version": str(cand.version)}
