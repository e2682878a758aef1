"""What must hold after anything goes wrong, checked against the real store and registry.

- every published partition is whole: its files hash to the manifest's content hash and hold the
  manifest's rows (a reader never sees a partial partition);
- nothing published is lost: a partition or model version seen before is still there (a partition
  republished from changed inputs counts as replaced, not lost);
- the champion is a version whose recorded gate decision is PROMOTE, and there is one champion.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from daybreak.features import feature_zone
from daybreak.gate import PROMOTE
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.store import sha256_files
from daybreak.score import prediction_zone
from daybreak.spec import Spec


def zones(spec: Spec) -> list[str]:
    return [*(f"staged/{name}" for name in spec.sources), feature_zone(spec), prediction_zone(spec)]


def partition_problems(spec: Spec, ctx: RunContext) -> tuple[list[str], dict[str, str]]:
    """(what is wrong with the published partitions, {zone/date: content hash} of the whole ones)."""
    problems, seen = [], {}
    for zone in zones(spec):
        for day in ctx.store.partitions(zone):
            part = ctx.store.partition(zone, day)
            where = f"{zone}/date={day}"
            if part is None:
                continue  # unpublished between listing and reading: fine
            try:
                if sha256_files(part.files, ctx.store.fs) != part.manifest["content_hash"]:
                    problems.append(f"{where}: files do not match the manifest's content hash")
                    continue
                rows = sum(pq.ParquetFile(ctx.store.fs.open_input_file(f)).metadata.num_rows for f in part.files)
            except (OSError, ValueError) as e:
                problems.append(f"{where}: unreadable ({type(e).__name__}: {e})")
                continue
            if rows != part.manifest["rows"]:
                problems.append(f"{where}: {rows} rows, the manifest says {part.manifest['rows']}")
                continue
            seen[where] = part.manifest["content_hash"]
    return problems, seen


def versions(spec: Spec, ctx: RunContext) -> dict[str, dict[str, str]]:
    """Registered versions of the spec's model: {version: tags}."""
    cl = registry.client(ctx)
    return {str(mv.version): dict(mv.tags) for mv in registry.versions(cl, spec.model.name)}


def champion_problems(spec: Spec, ctx: RunContext) -> list[str]:
    """A champion must carry a recorded PROMOTE decision (gate, override or approval after it)."""
    cl = registry.client(ctx)
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    if champ is None:
        return []
    decision = champ.tags.get(registry.DECISION_TAG)
    if decision != PROMOTE:
        return [f"champion v{champ.version} has gate decision {decision!r}, not {PROMOTE}"]
    return []


def snapshot(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    problems, parts = partition_problems(spec, ctx)
    return {"problems": problems, "partitions": parts, "versions": set(versions(spec, ctx))}


def lost(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What `before` had that `after` lacks: partitions gone (or no longer whole) and model
    versions deleted."""
    out = [f"partition {k} lost" for k in before["partitions"] if k not in after["partitions"]]
    out += [f"model version {v} lost" for v in sorted(before["versions"] - after["versions"], key=int)]
    return out


def check(spec: Spec, ctx: RunContext, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything above at once: {"problems", "data_lost", "wrong_promotions", "snapshot"}."""
    snap = snapshot(spec, ctx)
    gone = lost(before, snap) if before is not None else []
    wrong = champion_problems(spec, ctx)
    return {"problems": snap["problems"] + gone + wrong, "data_lost": len(gone), "wrong_promotions": len(wrong),
            "snapshot": snap}
