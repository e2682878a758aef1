"""The registry's tag names are a contract: they live in daybreak/infra/records.py and nowhere else."""

from __future__ import annotations

import re
from pathlib import Path

import daybreak
from daybreak.infra.records import Approval, Decision, Tag

LIBRARY = Path(daybreak.__file__).parent
# daybreak.* strings that are not tags: module paths (Airflow's provider metadata) and asset names
NOT_TAGS = re.compile(r"daybreak\.(airflow\.(operators|hooks)|staged|features|predictions|champion)\b")  # asset names


def _module(name: str) -> bool:
    """A module path (the old-to-new table in daybreak/__init__.py), not a tag."""
    return name in daybreak.MOVED or name in daybreak.MOVED.values() or name == "daybreak.infra."


def test_no_tag_string_outside_records() -> None:
    # ("module:function" references, as in steps.STEPS, are not tags)
    literal = re.compile(r"""["'](daybreak\.[a-z][a-z0-9_.]*)(?![a-z0-9_.]*:)""")
    found = [f"{p.relative_to(LIBRARY)}: {m.group(1)}" for p in sorted(LIBRARY.rglob("*.py")) if p.name != "records.py"
             for m in literal.finditer(p.read_text()) if not NOT_TAGS.match(m.group(1)) and not _module(m.group(1))]
    assert not found, found


def test_tag_names_are_unique_and_decisions_compare_as_text() -> None:
    names = [v for k, v in vars(Tag).items() if k.isupper()]
    assert len(names) == len(set(names))
    assert Decision.PROMOTE == "PROMOTE" and Decision.BLOCKED == "BLOCKED_BY_DATA"
    assert Approval.PENDING == "pending" and f"{Decision.REJECT}" == "REJECT"


# --- typed records: what a step writes to tags is what the next step reads back -----------------

def test_gate_record_round_trips_through_tags() -> None:
    from daybreak.infra.records import GateRecord

    rec = GateRecord(decision=Decision.REJECT, computed_decision=Decision.PROMOTE, champion_version="3", metric="auc",
                     candidate_metric=0.71, champion_metric=0.7, holdout_date="2013-01-05", holdout_rows=1200,
                     holdout_hash="ab", rules=[{"rule": "floor", "verdict": "pass"}], decided_at="t",
                     override=Decision.REJECT, override_reason="audit", override_by="ana", gate_run_id="r1")
    tags = rec.to_tags()
    assert all(isinstance(v, str) for v in tags.values())
    assert tags[Tag.GATE_DECISION] == "REJECT" and tags[Tag.GATE_CHAMPION_METRIC] == "0.7"
    assert GateRecord.from_tags(tags) == rec
    # no champion and no override: recorded as "none", read back as None
    first = GateRecord(decision=Decision.PROMOTE, candidate_metric=0.6)
    tags = first.to_tags()
    assert tags[Tag.GATE_CHAMPION_VERSION] == tags[Tag.GATE_OVERRIDE_REASON] == "none"
    back = GateRecord.from_tags(tags)
    assert back.champion_version is None and back.override_reason is None and back.champion_metric is None
    assert Tag.GATE_RUN_ID not in tags  # written only once the run exists


def test_gate_record_reads_a_rules_tag_cut_by_mlflow() -> None:
    from daybreak.infra.records import GateRecord

    assert GateRecord.from_tags({Tag.GATE_DECISION: "PROMOTE", Tag.GATE_RULES: '[{"rule": "fl'}).rules == []


def test_lineage_and_promotion_round_trip() -> None:
    from daybreak.infra.records import Lineage, Promotion

    lin = Lineage(logical_date="2013-01-05", spec_hash="h", lineage_key="k", window_start="2012-12-01",
                  window_end="2013-01-03", holdout=["2013-01-04", "2013-01-05"], input_hashes="{}",
                  feature_version="f", code_version="0.1.0", flavor="xgboost", train_rows=10, val_metric=0.7,
                  run_context="run", forced=True)
    assert Lineage.from_tags(lin.to_tags()) == lin
    assert lin.window == "2012-12-01..2013-01-03"
    marks = Promotion.promoted("2026-01-01T00:00:00+00:00", "run", None) | Promotion.rolled_back("t", "x" * 2000)
    p = Promotion.from_tags(marks | {Tag.APPROVAL: Approval.APPROVED})
    assert p.promoted_at and p.replaced_version is None and p.approval == "approved"
    assert p.rolled_back_reason == "x" * 1000
