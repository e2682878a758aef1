"""Label maturity: which feature rows have a label that was known by a cut.

A label is known at ``features.label.known_at`` (the feature table's ``label_known_at`` column).
Training, the gate's holdout and the monitor each run at the end of a logical date and may use
only the labels known by then (:meth:`Spec.label_cut`); a row whose label is known later (or not
yet: a null known-at) is immature and left out, and counted so each step can say how many.
Tables written before the column existed, or for a spec without ``label.known_at``, are all
mature.
"""

from __future__ import annotations

from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from daybreak.spec import LABEL_KNOWN_AT, Spec


def mature_mask(known_at: Any, cut: Any) -> Any:
    """True where a label known at `known_at` is known by `cut` (a null known-at is not)."""
    stamps = pa.chunked_array([pa.array([], pa.timestamp("us", tz="UTC"))]) if known_at is None else known_at
    return pc.fill_null(pc.less_equal(stamps.cast(pa.timestamp("us", tz="UTC")),
                                      pa.scalar(cut, pa.timestamp("us", tz="UTC"))), False)


def mature_rows(spec: Spec, table: pa.Table | None, day: date) -> tuple[pa.Table | None, int]:
    """The rows of `table` whose label is known by the end of `day`, and how many were left out."""
    if table is None or spec.features.label.known_at is None or LABEL_KNOWN_AT not in table.column_names:
        return table, 0
    kept = table.filter(mature_mask(table.column(LABEL_KNOWN_AT), spec.label_cut(day)))
    return kept, table.num_rows - kept.num_rows


def mature_frame(spec: Spec, frame: Any, day: date) -> tuple[Any, int]:
    """:func:`mature_rows` for a pandas DataFrame."""
    if spec.features.label.known_at is None or LABEL_KNOWN_AT not in frame.columns:
        return frame, 0
    import pandas as pd

    known = pd.to_datetime(frame[LABEL_KNOWN_AT], utc=True)
    ok = (known <= pd.Timestamp(spec.label_cut(day))).fillna(False).to_numpy(bool)
    return frame[ok], int((~ok).sum())
