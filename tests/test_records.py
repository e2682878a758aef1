"""The registry's tag names are a contract: they live in daybreak/infra/records.py and nowhere else."""

from __future__ import annotations

import re
from pathlib import Path

import daybreak
from daybreak.infra.records import Approval, Decision, Tag

LIBRARY = Path(daybreak.__file__).parent
# daybreak.* strings that are not tags: module paths (Airflow's provider metadata) and asset names
NOT_TAGS = re.compile(r"daybreak\.(airflow\.(operators|hooks)|staged|features|champion)\b")


def _module(name: str) -> bool:
    """A module path (the old-to-new table in daybreak/__init__.py), not a tag."""
    return name in daybreak.MOVED or name in daybreak.MOVED.values() or name == "daybreak.infra."


def test_no_tag_string_outside_records() -> None:
    literal = re.compile(r"""["'](daybreak\.[a-z][a-z0-9_.]*)""")
    found = [f"{p.relative_to(LIBRARY)}: {m.group(1)}" for p in sorted(LIBRARY.rglob("*.py")) if p.name != "records.py"
             for m in literal.finditer(p.read_text()) if not NOT_TAGS.match(m.group(1)) and not _module(m.group(1))]
    assert not found, found


def test_tag_names_are_unique_and_decisions_compare_as_text() -> None:
    names = [v for k, v in vars(Tag).items() if k.isupper()]
    assert len(names) == len(set(names))
    assert Decision.PROMOTE == "PROMOTE" and Decision.BLOCKED == "BLOCKED_BY_DATA"
    assert Approval.PENDING == "pending" and f"{Decision.REJECT}" == "REJECT"
