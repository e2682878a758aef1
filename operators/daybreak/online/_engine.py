"""The feature step's own functions that online features are made of (one place).

Online features are the offline ones computed over a smaller history: the same readers
(``staged_inputs``, ``staged_files``, ``read_window_inputs``, ``window_inputs``), folds
(``fold_tables``), indexes (``build_window_index``, ``asof_history``) and joins
(``apply_windows``, ``asof_join``, ``lookup_join``), never a copy; ``daybreak.features`` exports
them for this.
"""

from __future__ import annotations

from daybreak.features import (
    EVENT_TIME,
    HISTORY_SLICE_ROWS,
    US,
    apply_windows,
    asof_history,
    asof_join,
    build_window_index,
    day_slices,
    days_back,
    empty_source,
    fold_tables,
    lookup_join,
    prepare_events,
    read_table,
    read_window_inputs,
    staged_files,
    staged_inputs,
    window_inputs,
)

__all__ = [
    "EVENT_TIME",
    "HISTORY_SLICE_ROWS",
    "US",
    "apply_windows",
    "asof_history",
    "asof_join",
    "build_window_index",
    "day_slices",
    "days_back",
    "empty_source",
    "fold_tables",
    "lookup_join",
    "prepare_events",
    "read_table",
    "read_window_inputs",
    "staged_files",
    "staged_inputs",
    "window_inputs",
]
