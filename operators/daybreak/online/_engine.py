"""The feature step's own functions that online features are made of (one place).

Online features are the offline ones computed over a smaller history: the same readers
(``_inputs``, ``_staged_files``, ``read_window_inputs``, ``window_inputs``), folds
(``fold_tables``), indexes (``build_window_index``, ``asof_history``) and joins (``apply_windows``,
``asof_join``, ``lookup_join``), never a copy. ``daybreak.features`` does not export them yet, so
they are reached here through the package's attribute rather than an import of its private
module; when it exports them (a one-line change to ``daybreak/features/__init__.py``), this
module becomes plain imports.
"""

from __future__ import annotations

from typing import Any

import daybreak.features as _features

_build: Any = getattr(_features, "_build")  # noqa: B009 (see the module docstring)

EVENT_TIME: str = _features.EVENT_TIME
staged_inputs = _build._inputs
staged_files = _build._staged_files
days_back = _build._days_back
day_slices = _features.day_slices
read_window_inputs = _build.read_window_inputs
window_inputs = _build.window_inputs
fold_tables = _build.fold_tables
read_table = _build._read_table
prepare_events = _build.prepare_events
build_window_index = _build.build_window_index
apply_windows = _build.apply_windows
asof_history = _build.asof_history
asof_join = _build.asof_join
lookup_join = _build.lookup_join
HISTORY_SLICE_ROWS: int = _build.HISTORY_SLICE_ROWS
US: int = _build._US
empty_source = _build._empty
