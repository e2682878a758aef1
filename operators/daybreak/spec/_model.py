"""The pipeline spec: one YAML file, parsed into pydantic models and validated before any work.

A bad spec must fail here, naming the field, rather than hours later inside a Ray task.

Spec authors are trusted to describe data, not to run code (DESIGN.md, "Trust model"):

- the YAML is read with a bounded loader: no anchors or aliases, at most MAX_SPEC_BYTES, a
  bounded nesting depth and node count (:func:`load_yaml`);
- expressions are a bounded, safe language (:mod:`daybreak.spec._expr`);
- ``model.estimator`` comes only from allowed modules: scikit-learn and xgboost, plus module
  prefixes an operator lists in the environment variable ``DAYBREAK_ALLOWED_ESTIMATOR_MODULES``
  (never the spec). The import path is checked before anything is imported; validation imports
  and inspects, and calls nothing but scikit-learn/xgboost estimator classes' constructors and
  parameter checks (a user factory's parameters are bound to its signature, not passed to it).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import re
from collections.abc import Iterable
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from daybreak.infra.errors import SpecError
from daybreak.infra.yamlio import MAX_SPEC_BYTES, load_yaml, read_yaml_file
from daybreak.spec._calendar import CalendarSpec

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_TYPES = {
    "bool", "int8", "int16", "int32", "int64", "float32", "float64", "string", "date32",
}
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # module.name, as model.estimator gives it
_TIMESTAMP = re.compile(r"^timestamp\[(s|ms|us|ns)(,\s*[A-Za-z_/+\-0-9]+)?\]$")


# The longest window, delay or training window a spec may ask for: ten years of daily partitions.
MAX_DAYS = 3660
DAY_MARGIN = 1
"""One more day of history than a window's span (and delay) needs, read by every window and as-of
join. Partitions are dates in a source's own zone, but spans are durations: the day a clock
springs forward has 23 hours, so a 1d span back from 00:30 the day after reaches two partitions
back. Reading too little would make a value depend on how much history happened to be read."""


def parse_duration(text: str) -> timedelta:
    """'90m', '24h', '7d' -> timedelta."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit s, m, h, d or w (e.g. '7d')")
    try:
        return timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    except OverflowError:
        raise ValueError(f"invalid duration {text!r}: longer than {MAX_DAYS} days") from None


def _span(text: str, what: str, zero_ok: bool = False) -> str:
    """Check a duration a window reads history for: more than zero (unless `zero_ok`), at most
    MAX_DAYS."""
    d = parse_duration(text)
    if d <= timedelta(0) and not zero_ok:
        raise ValueError(f"{what} {text!r} is empty: it must be longer than 0")
    if d > timedelta(days=MAX_DAYS):
        raise ValueError(f"{what} {text!r} is longer than {MAX_DAYS} days")
    return text


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Severity = Literal["quarantine", "warn", "block"]
ROW_RULES = ("type", "ragged", "not_null", "finite", "range", "allowed", "unique", "date")


class ColumnSpec(_Model):
    """One column of a contract. In YAML a bare type string is short for ``{type: ...}``."""

    type: str = Field(description="Arrow type: bool, int8, int16, int32, int64, float32, float64, string, date32, "
                                  "or `timestamp[unit]` / `timestamp[unit, zone]` (unit s, ms, us or ns; e.g. "
                                  "`timestamp[us, UTC]`); a cell that cannot be read as it breaks the type rule")
    nullable: bool = Field(True, description="false: a null cell breaks the not_null rule")
    min: float | None = Field(None, description="numeric columns: a smaller value breaks the range rule")
    max: float | None = Field(None, description="numeric columns: a larger value breaks the range rule")
    allowed: list[str | int | float | bool] | None = Field(
        None, description="the values a cell may hold; any other non-null value breaks the allowed rule")
    max_null_fraction: float | None = Field(None, ge=0, le=1, description="block when more of the column is null")
    allow_nonfinite: bool = Field(False, description="accept NaN and +/-inf in float columns")

    @field_validator("type")
    @classmethod
    def _type_known(cls, v: str) -> str:
        m = _TIMESTAMP.match(v)
        if v not in _TYPES and not m:
            raise ValueError(f"unknown type {v!r}; use one of {sorted(_TYPES)} or 'timestamp[us, UTC]'")
        zone = (m.group(2) or "").lstrip(", ").strip() if m else ""
        if zone and not re.fullmatch(r"[+-]\d{4}", zone):
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {zone!r} in type {v!r}") from None
        return v


class EventTime(_Model):
    column: str = Field(description="the contract's timestamp column giving each row's event time")
    timezone: str | None = Field(None, description="zone of timestamps written without an offset (none: reject them)")
    date_timezone: str | None = Field(None, description="zone in which rows must fall on the logical date "
                                                        "(default: timezone, else UTC)")

    @field_validator("timezone", "date_timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is not None:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {v!r}") from None
        return v


class RowBounds(_Model):
    min: int = Field(1, ge=0, description="fewest rows a logical date's readable files may hold (ragged lines "
                                          "included); fewer blocks the stage step")
    max: int | None = Field(None, ge=1, description="most rows a logical date's readable files may hold; more "
                                                    "blocks the stage step (null: no limit)")

    @model_validator(mode="after")
    def _ordered(self) -> RowBounds:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}: every file would be refused")
        return self


class QuarantinePolicy(_Model):
    max_bad_row_fraction: float = Field(0.01, ge=0, le=1, description="fail when more rows than this are quarantined")
    max_bad_files: int = Field(0, ge=0, description="fail when more files than this cannot be read")


# Source fields that limit how a file is read, not what is published from it: outside both hashes,
# so changing one (or adding one) rebuilds nothing.
OPERATIONAL = {"max_file_bytes"}


class SourceSpec(_Model):
    """A landing-zone dataset: what files to read for a logical date and what they must look like."""

    path: str = Field(description="Path or pattern relative to the store root (or a URI); '{date}' is the logical date")
    format: Literal["csv", "parquet", "jsonl", "files"] = Field("csv", description="how landing files are read")
    kind: Literal["events", "snapshot"] = Field(
        "events", description="events: one drop per logical date ('{date}' in path); snapshot: a dimension table, "
                              "read whole")
    encoding: str = Field("utf-8", description="text encoding of CSV and JSONL files")
    columns: dict[str, ColumnSpec] = Field(default_factory=dict,
                                           description="the contract: name -> type or column spec")
    null_values: list[str] = Field(default_factory=lambda: ["", "NA", "NULL", "null"],
                                   description="CSV cells read as null (list your files' own tokens, e.g. '-')")
    unique: list[str] = Field(default_factory=list, description="columns that together identify a row")
    event_time: EventTime | None = Field(
        None, description="the column dating each row, and its zones; a row not on the logical date breaks the "
                          "date rule (null: no date rule)")
    rows: RowBounds = Field(RowBounds(), description="bounds on the rows a logical date's files hold")
    extra_columns: Literal["warn", "block"] = Field(
        "warn", description="file columns not in the contract: warn drops them and reports it; block refuses the "
                            "file (quarantined whole)")
    quarantine: QuarantinePolicy = Field(QuarantinePolicy(), description="how much may be quarantined before the "
                                                                         "stage step fails")
    severity: dict[str, Severity] = Field(default_factory=dict,
                                          description="per rule: quarantine (default), warn or block")
    calendar: CalendarSpec | None = Field(
        None, description="the days a drop is expected: daily (default), weekdays, exchange:XNYS, or a mapping "
                          "with days, exchange, holidays and start (the data's first day). A day with no expected "
                          "drop runs nothing; a missing expected drop is an error")
    max_file_bytes: int = Field(
        2 * 2**30, ge=1, description="a landing file larger than this is quarantined unread (read in a stream, "
                                     "never whole). For Parquet the limit applies to the uncompressed data as "
                                     "well: a file whose footer declares more (rows times their least width, or "
                                     "its column chunks' uncompressed sizes) is quarantined unread, and the read "
                                     "stops once the data takes twice the limit in memory. An operational "
                                     "limit, so not part of the spec or feature hash")

    @field_validator("columns", mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: ({"type": t} if isinstance(t, str) else t) for k, t in v.items()}
        return v

    @field_validator("encoding")
    @classmethod
    def _encoding_known(cls, v: str) -> str:
        import codecs

        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown text encoding {v!r}") from None
        return v

    @field_validator("severity")
    @classmethod
    def _rules_known(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(ROW_RULES))
        if unknown:
            raise ValueError(f"unknown rule(s) {unknown}; rules are {list(ROW_RULES)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SourceSpec:
        if self.kind == "events" and "{date}" not in self.path:
            raise ValueError("an 'events' source path must contain '{date}' so each logical date finds its own files")
        if self.format != "files" and not self.columns:
            raise ValueError("a source needs at least one column in its contract")
        for col in self.unique:
            if col not in self.columns:
                raise ValueError(f"unique: column {col!r} is not in the contract")
        if self.event_time is not None:
            et = self.columns.get(self.event_time.column)
            if et is None:
                raise ValueError(f"event_time.column: {self.event_time.column!r} is not in the contract")
            if not et.type.startswith("timestamp"):
                raise ValueError(f"event_time.column: {self.event_time.column!r} must be a timestamp, not {et.type}")
        for name, c in self.columns.items():
            numeric = not (c.type in ("string", "bool") or c.type.startswith("timestamp"))
            if (c.min is not None or c.max is not None) and not numeric:
                raise ValueError(f"columns.{name}: min/max apply to numeric columns only")
        return self

    def severity_of(self, rule: str) -> str:
        return self.severity.get(rule, "quarantine")


Encoding = Literal["ordinal", "onehot", "frequency"]


class Column(_Model):
    """A row-level feature: an expression over the event row (and joined/window features).

    Encodings are fitted on the training window only, when a model is trained, and stored with
    the model; the feature table keeps the raw value (a string for categorical columns).
    """

    name: str = Field(description="the feature's column in the feature table, and the model's input name")
    expr: str = Field(description="expression over the base row, join and window outputs and the columns "
                                  "before this one")
    categorical: bool = Field(False, description="treat the value as a category (a string); implied by encoding")
    encoding: Encoding | None = Field(None, description="categorical encoding; default ordinal")
    max_categories: int | None = Field(None, ge=1, description="keep the N most frequent training categories; "
                                                                "the rest are treated as unseen")
    bins: int | None = Field(None, ge=2, le=1000, description="numeric: quantile bins fitted on the training window")

    @model_validator(mode="before")
    @classmethod
    def _encoding_implies_categorical(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("encoding") is not None and "categorical" not in v:
            v = {**v, "categorical": True}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Column:
        if self.bins is not None and self.categorical:
            raise ValueError(f"column {self.name!r}: bins apply to numeric columns, not categorical ones")
        if self.encoding is not None and not self.categorical:
            raise ValueError(f"column {self.name!r}: an encoding needs a categorical column")
        if self.max_categories is not None and self.encoding == "frequency":
            raise ValueError(f"column {self.name!r}: max_categories applies to ordinal and onehot encodings")
        return self

    def encoder(self) -> dict[str, Any] | None:
        """How the model turns this column into numbers (fitted later, on the training window)."""
        if self.categorical:
            return {"kind": self.encoding or "ordinal", "max_categories": self.max_categories}
        if self.bins is not None:
            return {"kind": "quantile", "bins": self.bins}
        return None


class AsofJoin(_Model):
    """Latest row of `source` at or before the event time (within `tolerance`), matched on `by`.

    With ``known_at`` a row counts only once it is known: at or before the event (before it with
    ``strict``). A join of the base source onto itself needs ``known_at``: a row's own values are
    otherwise taken as known when its time says, which is the leak validation refuses.
    """

    source: str = Field(description="the source joined (the base source itself needs known_at)")
    time: str = Field(description="time column of the joined source")
    by: list[str] = Field(default_factory=list, description="columns matched between the base row and the "
                                                            "joined source ([]: the latest row of the whole source)")
    tolerance: str = Field("1d", description="how old a matched row may be: a duration such as '3h' or '1d'")
    columns: dict[str, str] = Field(description="output feature name -> column of the source")
    known_at: str | None = Field(None, description="expression over the joined source's columns: when a row "
                                                   "becomes known (default: its `time`)")
    max_delay: str | None = Field(None, description="longest time from a row's `time` to its known_at; rows "
                                                    "known later are left out (default 0s)")
    strict: bool = Field(False, description="match rows known strictly before the event (default: at or before)")

    @field_validator("tolerance")
    @classmethod
    def _dur(cls, v: str) -> str:
        parse_duration(v)
        return v

    @field_validator("max_delay")
    @classmethod
    def _delay(cls, v: str | None) -> str | None:
        return None if v is None else _span(v, "max_delay", zero_ok=True)

    @model_validator(mode="after")
    def _delay_with_known_at(self) -> AsofJoin:
        if self.known_at is not None and self.max_delay is None and not _same_expr(self.known_at, self.time):
            raise ValueError("known_at needs max_delay: how long after its `time` a row can become known (rows "
                             "known later never match; without it every row known after its time would be left out)")
        return self

    def known_at_expr(self) -> str:
        return self.known_at or self.time

    def lookback_days(self) -> int:
        """Whole days before the logical date this join reads: tolerance plus max_delay, and a
        day of margin (:data:`DAY_MARGIN`)."""
        total = parse_duration(self.tolerance) + parse_duration(self.max_delay or "0s")
        return math.ceil(total / timedelta(days=1)) + DAY_MARGIN


class Lookup(_Model):
    """Plain left join to a snapshot dimension table on a key."""

    source: str = Field(description="a snapshot source")
    by: list[str] = Field(description="key columns, present in the base and the snapshot")
    columns: dict[str, str] = Field(description="output feature name -> column of the snapshot")


Agg = Literal["count", "sum", "mean", "std", "min", "max", "last", "first"]
MAX_ROWS_WINDOW = 100_000
"""Longest row-count window (``rows``) or lag a spec may ask for."""


class WindowAgg(_Model):
    """Trailing-window aggregates per entity, over rows known strictly before each event.

    Three kinds share one history: time spans (``windows``: rows known in (t - span, t)),
    row counts (``rows``: the last N rows known before t, within ``lookback``) and lags
    (``lag``: the n-th latest value known before t, within ``lookback``). Rows are ordered by
    known-at time, then event time, then input order; ``last`` and ``first`` are the latest and
    earliest value in the window. The history is the base source's rows, or another events
    ``source``'s (keyed by the same ``by`` columns, its event time given by ``time``).
    """

    by: list[str] = Field(description="entity columns the window is per ([]: one series, no entity)")
    value: str = Field(description="expression over the event source: the value aggregated")
    known_at: str = Field(
        default="event_time",
        description="expression: when a row's value becomes known; rows count only if known strictly before the "
                    "event. A window over a label column defaults to label.known_at",
    )
    max_delay: str = Field(
        default="0s",
        description="longest time from a row's event to its known_at; the step reads this much more history. "
                    "Rows known later than that are left out of the windows (a warning counts them)",
    )
    aggs: list[Agg] = Field(default_factory=lambda: list[Agg](["count", "mean"]), min_length=1,
                            description="count, sum, mean, std, min, max, last, first")
    rows: list[int] = Field(default_factory=list, description="row-count windows: the last N known rows per key "
                                                              "(within lookback), e.g. [5, 20]")
    lag: list[int] = Field(default_factory=list, description="lags: the n-th latest value known before the event "
                                                             "(within lookback); `lag: 1` is the previous value")
    windows: list[str] = Field(default_factory=lambda: ["7d"], description="time spans, e.g. [1h, 7d]")
    lookback: str | None = Field(None, description="how far back rows and lags look: the longer of this and the "
                                                   "longest of `windows` (required when there are no `windows`)")
    source: str | None = Field(None, description="events source aggregated (default: features.base), keyed by "
                                                 "the base rows' `by` columns")
    time: str | None = Field(None, description="with `source`: expression over its columns giving each row's "
                                               "event time (`event_time` in value and known_at)")
    prefix: str = Field(description="feature names are <prefix><agg>_<span>, <prefix><agg>_<N>rows and "
                                    "<prefix>lag_<n>")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = dict(v)
            if isinstance(v.get("lag"), int) and not isinstance(v.get("lag"), bool):
                v["lag"] = [v["lag"]]
            if "windows" not in v and (v.get("rows") or v.get("lag")):
                v["windows"] = []  # a row or lag window alone has no default time span
        return v

    @field_validator("windows")
    @classmethod
    def _durs(cls, v: list[str], info: ValidationInfo) -> list[str]:
        for i, w in enumerate(v):
            _span(w, f"window [{i}]")
        if not v and not (info.data.get("rows") or info.data.get("lag")):
            raise ValueError("a window needs time spans (windows), row counts (rows) or lags (lag)")
        return v

    @field_validator("rows", "lag")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        for n in v:
            if not 1 <= n <= MAX_ROWS_WINDOW:
                raise ValueError(f"{n} rows: a count of rows must be between 1 and {MAX_ROWS_WINDOW}")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} lists a count twice")
        return v

    @field_validator("max_delay")
    @classmethod
    def _delay(cls, v: str) -> str:
        return _span(v, "max_delay", zero_ok=True)

    @field_validator("lookback")
    @classmethod
    def _lookback(cls, v: str | None) -> str | None:
        return None if v is None else _span(v, "lookback")

    @model_validator(mode="after")
    def _kinds(self) -> WindowAgg:
        if not (self.windows or self.rows or self.lag):
            raise ValueError("a window needs time spans (windows), row counts (rows) or lags (lag)")
        if (self.rows or self.lag) and self.lookback is None and not self.windows:
            raise ValueError("rows and lag need `lookback`: how far back to look for rows (e.g. '60d')")
        if self.time is not None and self.source is None:
            raise ValueError("`time` is for a window over another `source`")
        return self

    def span(self) -> timedelta:
        """How far back this window's rows may be known: its longest time span or its lookback."""
        spans = [parse_duration(w) for w in self.windows]
        if self.lookback is not None:
            spans.append(parse_duration(self.lookback))
        return max(spans)

    def lookback_days(self) -> int:
        """Whole days before the logical date this window reads: its longest span (or lookback)
        plus max_delay, and a day of margin (:data:`DAY_MARGIN`). Each window reads only its own
        days, so a window's values never depend on the others."""
        return math.ceil((self.span() + parse_duration(self.max_delay)) / timedelta(days=1)) + DAY_MARGIN


LABEL_KNOWN_AT = "label_known_at"
"""Feature-table column: when each row's label is known (with ``features.label.known_at``)."""


class Label(_Model):
    """The label: an expression over the base row (and window or join outputs, for a delta label
    such as ``y - y_last_1``). ``known_at`` says when it is known: an expression giving a time,
    or a delay after the event ('30d'). Training, the gate and the monitor use only labels known by
    their cut; windows over the label's columns default their known_at to it."""

    name: str = Field("label", description="the label's column in the feature table")
    expr: str = Field(description="expression over the base row, and window, join and derived outputs; rows "
                                  "whose label is null are dropped")
    known_at: str | None = Field(None, description="when the label is known: a delay such as '30d', or an "
                                                   "expression over the base row giving a time (default: "
                                                   "undeclared, taken as known when the row is staged)")
    max_delay: str | None = Field(None, description="with an expression known_at: the longest time from the event "
                                                    "to it (windows over label columns read this much more "
                                                    "history). Default: the delay, for a delay")

    @field_validator("max_delay")
    @classmethod
    def _delay(cls, v: str | None) -> str | None:
        return None if v is None else _span(v, "max_delay", zero_ok=True)

    def delay(self) -> timedelta | None:
        """The label's fixed delay when known_at is one ('30d'); else None."""
        if self.known_at is not None and _DURATION.match(self.known_at):
            return parse_duration(self.known_at)
        return None

    def known_at_expr(self) -> str | None:
        """known_at as an expression over the base row (a delay becomes event_time plus it)."""
        d = self.delay()
        if d is not None:
            return f"event_time + seconds({int(d.total_seconds())})"
        return self.known_at

    def window_delay(self) -> str:
        """max_delay for windows that inherit known_at."""
        if self.max_delay is not None:
            return self.max_delay
        d = self.delay()
        return f"{int(d.total_seconds())}s" if d is not None else "0s"


class FeatureSpec(_Model):
    name: str = Field(description="names the feature table: `features/<name>/v=<feature version>/date=D/`")
    base: str = Field(description="the events source whose rows are the examples")
    event_time: str = Field(description="expression giving each example's event timestamp (UTC)")
    label: Label = Field(description="the target, and when it is known")
    keys: list[str] = Field(default_factory=list, description="columns carried through to identify rows (not features)")
    columns: list[Column] = Field(default_factory=list, description="row-level and derived features, computed in "
                                  "order after joins and windows: each may use base columns, join and window "
                                  "outputs and the columns before it")
    asof: list[AsofJoin] = Field(default_factory=list, description="as-of joins: the latest row of a source at or "
                                                                   "before each event")
    lookups: list[Lookup] = Field(default_factory=list, description="left joins to snapshot sources on a key")
    windows: list[WindowAgg] = Field(default_factory=list, description="trailing aggregates per entity over rows "
                                                                       "known before each event")
    leak_check: Literal["block", "warn", "off"] = Field(
        "block", description="after building a day's rows: block (or warn) when a feature reproduces the label "
                             "(a target leak suspected), naming the feature")

    @model_validator(mode="before")
    @classmethod
    def _label_known_at_for_windows(cls, v: Any) -> Any:
        """Windows over a label column with no known_at of their own take the label's (and its
        delay as max_delay): a label's inputs are known when the label is."""
        if not isinstance(v, dict) or not isinstance(v.get("label"), dict) or not isinstance(v.get("windows"), list):
            return v
        try:
            label = Label.model_validate(v["label"])
            inputs = label_inputs(label, str(v.get("event_time", "")), v.get("keys") or [])
        except (ValueError, TypeError):
            return v  # reported by the fields' own validation
        known = label.known_at_expr()
        if known is None or not inputs:
            return v
        windows = []
        for w in v["windows"]:
            if isinstance(w, dict) and "known_at" not in w and w.get("source") in (None, v.get("base")):
                try:
                    uses = bool(_names(str(w.get("value", ""))) & inputs)
                except ValueError:
                    uses = False
                if uses:
                    w = {**w, "known_at": known, "max_delay": w.get("max_delay", label.window_delay())}
            windows.append(w)
        return {**v, "windows": windows}

    def feature_names(self) -> list[str]:
        names = [c.name for c in self.columns]
        for j in self.asof:
            names += list(j.columns)
        for lk in self.lookups:
            names += list(lk.columns)
        for w in self.windows:
            names += window_feature_names(w)
        return names

    def categorical_names(self) -> list[str]:
        return [c.name for c in self.columns if c.categorical]

    def encoders(self) -> dict[str, dict[str, Any]]:
        """Feature name -> unfitted encoder, for the columns the model must encode."""
        return {c.name: e for c in self.columns if (e := c.encoder()) is not None}

    def output_names(self) -> set[str]:
        """Columns the windows and joins add to the base rows (derived columns and the label may
        read them)."""
        out = {n for w in self.windows for n in window_feature_names(w)}
        joins: list[AsofJoin | Lookup] = [*self.asof, *self.lookups]
        for join in joins:
            out |= set(join.columns)
        return out

    def window_source(self, w: WindowAgg) -> str:
        return w.source or self.base

    def lookback_days(self, source: str | None = None) -> int:
        """Whole days before the logical date that the feature step reads of `source`'s events
        (default: the base source's)."""
        source = source or self.base
        return max((w.lookback_days() for w in self.windows if self.window_source(w) == source), default=0)


def _names(expr: str) -> set[str]:
    from daybreak.spec._expr import names_in

    return names_in(expr)


def label_inputs(label: Label, event_time: str, keys: list[str]) -> set[str]:
    """The base columns the label is computed from: what no feature may read before the label is
    known. Columns of the event time and keys identify the row, not its outcome, and are left out."""
    return _names(label.expr) - _names(event_time) - set(keys) - {"event_time"}


def window_feature_names(w: WindowAgg) -> list[str]:
    return ([f"{w.prefix}{agg}_{win}" for win in w.windows for agg in w.aggs]
            + [f"{w.prefix}{agg}_{n}rows" for n in w.rows for agg in w.aggs]
            + [f"{w.prefix}lag_{n}" for n in w.lag])


MAX_TUNING_CHOICES = 100
"""Most ``choices`` one tuned parameter may list (each is checked when the spec is validated)."""
MAX_TUNING_PARAMS = 64
"""Most parameters one ``tuning.space`` may tune."""


def _finite(v: Any) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


class SearchParam(_Model):
    """One tuned parameter: a range (``low``/``high``, finite; ``log`` for a log scale, whole
    numbers with ``integer``) or a list of at most MAX_TUNING_CHOICES ``choices``."""
    low: float | None = Field(None, description="range: lower bound")
    high: float | None = Field(None, description="range: upper bound (included when `integer`)")
    log: bool = Field(False, description="range: sample on a log scale (low > 0)")
    integer: bool = Field(False, description="range: sample whole numbers (whole-number bounds)")
    choices: list[Any] | None = Field(None, description="instead of a range: the values to pick from (at most "
                                                        f"{MAX_TUNING_CHOICES})")

    @field_validator("low", "high")
    @classmethod
    def _bound_finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{v} is not a finite number: a range needs finite bounds")
        return v

    @field_validator("choices")
    @classmethod
    def _choices_bounded(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None:
            if len(v) > MAX_TUNING_CHOICES:
                raise ValueError(f"{len(v)} choices; at most {MAX_TUNING_CHOICES} per parameter")
            bad = [c for c in v if not _finite(c)]
            if bad:
                raise ValueError(f"{bad[0]} is not a finite number: choices must be finite")
        return v

    @model_validator(mode="after")
    def _shape(self) -> SearchParam:
        if self.choices is not None:
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("give either a non-empty 'choices' list or 'low' and 'high'")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("a range needs low < high")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        elif self.integer and (self.low != int(self.low) or self.high != int(self.high) or (self.log and self.low < 1)):
            raise ValueError("an integer range needs whole-number bounds (and low >= 1 on a log scale)")
        elif self.integer and max(abs(self.low), abs(self.high)) > 2**63 - 1:
            raise ValueError("an integer range needs bounds that fit in 64 bits")
        return self


class TuningSpec(_Model):
    space: dict[str, SearchParam] = Field(description="parameter -> its range or choices (at most "
                                                      f"{MAX_TUNING_PARAMS} parameters)")
    trials: int = Field(8, ge=1, description="at most this many trials")
    time_budget_s: float = Field(600, gt=0, description="stop starting trials after this many seconds")
    parallel: int = Field(0, ge=0, description="trials at once on Ray (0: one per CPU)")

    @field_validator("space")
    @classmethod
    def _space_bounded(cls, v: dict[str, SearchParam]) -> dict[str, SearchParam]:
        if len(v) > MAX_TUNING_PARAMS:
            raise ValueError(f"{len(v)} parameters; at most {MAX_TUNING_PARAMS}")
        return v


class ModelSpec(_Model):
    name: str = Field(description="registered model name in MLflow")
    flavor: Literal["xgboost", "sklearn"] = Field(
        "xgboost", description="xgboost: xgboost's training API with early stopping; sklearn: the estimator named "
                               "by `estimator`")
    estimator: str | None = Field(
        None, description="sklearn flavor: import path of a scikit-learn or xgboost estimator class, or of a "
                          "class or function returning an estimator (a Pipeline) in a module an operator allows in "
                          "DAYBREAK_ALLOWED_ESTIMATOR_MODULES; built with `params` when training")
    task: Literal["classification", "regression"] = Field(
        "classification", description="classification (a binary label) or regression; sets xgboost's default "
                                      "objective and eval metric, and the metrics the gate scores")
    params: dict[str, Any] = Field(default_factory=dict, description="xgboost: training parameters, over the "
                                   "defaults (tree_method hist, the task's objective and eval_metric); sklearn: "
                                   "keyword arguments of the estimator")
    class_weight: Literal["balanced"] | None = Field(
        None, description="classification: weight each class inversely to its frequency in the training rows")
    num_boost_round: int = Field(200, ge=1, description="xgboost: most boosting rounds; early stopping may end "
                                                        "sooner, and the best round is kept")
    early_stopping_rounds: int = Field(20, ge=1, description="xgboost: stop after this many rounds without "
                                                             "improvement on the validation rows")
    seed: int = Field(0, description="seed of xgboost, of an estimator's unset random_state and of tuning's "
                                     "sampling: the same inputs and seed give the same model")
    tuning: TuningSpec | None = Field(None, description="hyperparameter search on Ray before the model is trained "
                                                        "(null: train once with `params`)")
    partition_by: list[str] = Field(
        default_factory=list, description="features whose values each get their own model (many-model)")
    min_partition_rows: int = Field(
        200, ge=1, description="a partition with fewer training rows is served by the fallback model")

    @model_validator(mode="after")
    def _estimator(self) -> ModelSpec:
        if self.flavor == "sklearn":
            if not self.estimator or not _IMPORT_PATH.fullmatch(self.estimator):
                raise ValueError("flavor 'sklearn' needs 'estimator': an import path such as "
                                 "'sklearn.ensemble.HistGradientBoostingClassifier'")
        elif self.estimator:
            raise ValueError(f"'estimator' is for flavor 'sklearn'; this model's flavor is {self.flavor!r}")
        if self.class_weight and self.task != "classification":
            raise ValueError("class_weight is for classification")
        return self


class TrainingSpec(_Model):
    window_days: int = Field(7, ge=1, le=MAX_DAYS,
                             description="days of features used for training, ending the day before the holdout")
    holdout_days: int = Field(
        1, ge=1, le=MAX_DAYS, description="days ending at the logical date held out for the gate; never trained on")
    min_rows: int = Field(100, ge=1, description="fewer rows in the training window: the train step skips and "
                                                 "registers nothing")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="share of the window's rows, the last in time "
                                                                    "order, kept out of fitting to validate (early "
                                                                    "stopping, tuning)")
    memory_budget_mb: float | None = Field(
        None, gt=0, description="above this estimated size the window streams from Parquet into xgboost's "
                                "external-memory matrix instead of being loaded")

    incomplete_history: Literal["exclude", "include"] = Field(
        "exclude", description="feature partitions whose windows lacked staged history (marked missing_history) "
                               "are left out of training (exclude) or used as they are (include)")
    count_days: Literal["calendar", "expected"] = Field(
        "calendar", description="count window_days and holdout_days in calendar days, or in the days the base "
                                "source's calendar expects a drop (20 business days: window_days 20, expected)")

    def holdout(self, day: date, calendar: Any = None) -> list[date]:
        """The gate's holdout days for logical date `day`, oldest first. Counted in the days
        `calendar` expects when ``count_days`` is 'expected' (see :meth:`Spec.holdout_days`)."""
        if self.count_days == "expected" and calendar is not None:
            return [*calendar.expected_before(day, self.holdout_days - 1), day]
        return [day - timedelta(days=k) for k in range(self.holdout_days - 1, -1, -1)]

    def window(self, day: date, calendar: Any = None) -> list[date]:
        """The training days for logical date `day`: the `window_days` days before the holdout,
        oldest first (calendar days, or expected days: a missing one is not replaced by an
        earlier one)."""
        first_holdout = self.holdout(day, calendar)[0]
        if self.count_days == "expected" and calendar is not None:
            return list(calendar.expected_before(first_holdout, self.window_days))
        return [first_holdout - timedelta(days=k) for k in range(self.window_days, 0, -1)]


GateMetric = Literal["roc_auc", "pr_auc", "log_loss", "brier", "f1", "rmse", "mae", "r2", "mape"]
CheckSeverity = Literal["warn", "block"]


class BootstrapSpec(_Model):
    """How the gate's intervals are computed (the gain over the champion and over each baseline,
    and a metric's own interval for a floor). A rule with confidence passes only if the interval's
    lower end clears its bound."""

    resamples: int = Field(1000, ge=100, le=100_000, description="resamples per interval, where the interval is "
                                                                 "bootstrapped (not analytic)")
    level: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided interval level")
    seed: int = Field(0, description="seed of the resampling, and of the data checks' row samples")
    method: Literal["auto", "analytic", "bootstrap"] = Field(
        "auto", description="auto: DeLong (ROC AUC) or the CLT on per-row losses (log_loss, brier, mae, mape, "
                            "rmse) when they apply, the bootstrap otherwise; or force one")
    cluster_by: list[str] | None = Field(
        None, description="resampling unit: rows sharing these values move together (holdout columns, or "
                          "'event_time:hour' / 'event_time:day'); null: by event hour when the holdout has at "
                          "least 10 hours, else by row; []: by row")

    between_days: Literal["history", "off"] = Field(
        "history", description="history: widen the interval of the gain over the champion by how much that "
                               "gain moved from day to day in the gates of the last `history_days` days, "
                               "beyond its within-day error: a holdout of one day cannot see how much the next "
                               "days differ. Until 10 days are recorded, that spread's variance is assumed "
                               "twice the holdout's own. off: the holdout's error only")
    history_days: int = Field(28, ge=10, le=366, description="days of recorded gates the day-to-day spread is "
                                                            "estimated from")

    @field_validator("cluster_by")
    @classmethod
    def _units(cls, v: list[str] | None) -> list[str] | None:
        for i, c in enumerate(v or []):
            if c.startswith("event_time:") and c not in ("event_time:hour", "event_time:day"):
                raise ValueError(f"cluster_by[{i}]: {c!r}: event_time is truncated to 'event_time:hour' or "
                                 "'event_time:day'")
        return v


class BaselineSpec(_Model):
    """A naive predictor scored on the same holdout rows as the candidate, which must beat it.

    prior: the training window's label rate (classification) or mean (regression); constant:
    `value`; feature: a holdout column as the prediction (e.g. the last known value); expression:
    `expr` over the holdout's columns. Rows where a feature or expression is null get the prior.
    """

    kind: Literal["prior", "constant", "feature", "expression"] = Field(
        description="prior: the training window's label rate or mean; constant: `value`; feature: the holdout "
                    "column `column`; expression: `expr`")
    name: str | None = Field(None, description="how rules and reports call it (default: from kind)")
    value: float | None = Field(None, description="constant: the prediction")
    column: str | None = Field(None, description="feature: the holdout column used as the prediction")
    expr: str | None = Field(None, description="expression: the prediction, over holdout columns")

    @model_validator(mode="after")
    def _fields(self) -> BaselineSpec:
        need = {"constant": "value", "feature": "column", "expression": "expr"}.get(self.kind)
        given = {k for k in ("value", "column", "expr") if getattr(self, k) is not None}
        if need is not None and need not in given:
            raise ValueError(f"a {self.kind} baseline needs '{need}'")
        if given - {need}:
            raise ValueError(f"a {self.kind} baseline takes {('only ' + repr(need)) if need else 'no value'}; "
                             f"got {sorted(given)}")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        detail = {"constant": f"{self.value:g}" if self.value is not None else "", "feature": self.column or "",
                  "expression": "expr"}.get(self.kind, "")
        return f"{self.kind}:{detail}" if detail else self.kind


class SliceSpec(_Model):
    columns: list[str] = Field(default_factory=list, description="holdout columns to slice by (features or keys)")
    min_rows: int = Field(100, ge=1, description="slices with fewer rows are not judged")
    tolerance: float = Field(0.02, ge=0, description="how much worse than the champion a slice may be")
    metric: GateMetric | None = Field(None, description="default: the gate's metric")


class RowCountCheck(_Model):
    """The newest training day's rows against the median of the window's other days."""

    min_ratio: float = Field(0.5, ge=0, description="fail below this ratio of the newest expected day's rows to "
                                                    "the median of the window's earlier expected days (needs two)")
    max_ratio: float = Field(2.0, gt=0, description="fail above this ratio")
    severity: CheckSeverity = Field("block", description="block: a failure makes the decision BLOCKED_BY_DATA; "
                                                         "warn: recorded, does not decide")


class LabelShiftCheck(_Model):
    """Label rate (classification; mean in champion standard deviations for regression) of the
    candidate's training window against the champion's."""

    max_shift: float = Field(0.1, gt=0, description="fail above this difference: in label rate (classification) "
                                                    "or in the champion window's label standard deviations "
                                                    "(regression)")
    severity: CheckSeverity = Field("warn", description="block: a failure makes the decision BLOCKED_BY_DATA; "
                                                        "warn: recorded, does not decide")


class DriftCheck(_Model):
    """Population stability index of each feature, candidate window vs the champion's."""

    max_psi: float = Field(0.25, gt=0, description="fail when a feature's PSI is above this")
    bins: int = Field(10, ge=2, le=100, description="numeric features: quantile bins of the champion window's "
                                                    "sample (categorical ones compare categories)")
    sample_rows: int = Field(200_000, ge=1000, description="rows sampled from each window")
    features: list[str] | None = Field(None, description="default: every feature")
    severity: CheckSeverity = Field("warn", description="block: a failure makes the decision BLOCKED_BY_DATA; "
                                                        "warn: recorded, does not decide")


class DataChecksSpec(_Model):
    row_count: RowCountCheck | None = Field(RowCountCheck(), description="the training window's newest day's rows "
                                                                         "against its other days' (null: off)")
    label_shift: LabelShiftCheck | None = Field(LabelShiftCheck(), description="the training window's label rate "
                                                "(regression: mean) against the champion's window (null: off)")
    drift: DriftCheck | None = Field(DriftCheck(), description="each feature's PSI, training window against the "
                                                               "champion's (null: off)")


class GateSpec(_Model):
    metric: GateMetric = Field("roc_auc", description="the metric the relative and confidence rules use")
    report_metrics: list[GateMetric] | None = Field(
        None, description="metrics scored and reported (default: all of the task's)")
    threshold: float = Field(0.5, gt=0, lt=1, description="decision threshold for f1")
    floor: float | None = Field(None, description="absolute bound on `metric` (a ceiling for lower-is-better metrics)")
    floors: dict[GateMetric, float] = Field(default_factory=dict, description="absolute bounds on other metrics")
    compare: Literal["improve", "no_worse"] = Field(
        "improve", description="improve: beat the champion by more than `margin`; no_worse: lose by at most `margin`")
    margin: float = Field(0.0, ge=0, description="in `metric`'s units: improve needs a gain over the champion above "
                                                 "it, no_worse a gain of at least -margin")
    bootstrap: BootstrapSpec | None = Field(BootstrapSpec(), description="how the intervals are computed (null: "
                                                                         "point estimates only)")
    baselines: list[BaselineSpec] = Field(
        default_factory=lambda: [BaselineSpec(kind="prior")],
        description="naive predictors the candidate must beat, with confidence, by baseline_margin (default: "
                    "the prior, so a model no better than chance is never promoted, first champion included)")
    baseline_margin: float = Field(0.0, ge=0, description="how much better than each baseline the candidate must be")
    floor_confidence: Literal["auto", "always", "never"] = Field(
        "auto", description="floors judged on the interval's lower end (upper for a ceiling), not the point "
                            "estimate; auto: when there is no champion to compare with")
    slices: SliceSpec = Field(SliceSpec(), description="slices of the holdout on which the candidate may not be "
                                                       "worse than the champion by more than a tolerance")
    data_checks: DataChecksSpec = Field(DataChecksSpec(), description="checks of the training data: row count, "
                                                                      "label shift, feature drift")
    min_rows: int = Field(50, ge=1, description="holdout rows needed to decide (fewer: INSUFFICIENT_DATA)")
    min_class_rows: int = Field(
        30, ge=1, description="classification: rows of each class the holdout needs (fewer: INSUFFICIENT_DATA; "
                              "DeLong's interval runs narrow below about 30 of a class)")
    on_reject: Literal["skip", "fail"] = Field(
        "skip", description="Airflow: skip or fail the tasks after a rejected gate")

    @model_validator(mode="before")
    @classmethod
    def _legacy_min_improvement(cls, v: Any) -> Any:
        # `min_improvement: m` predates compare/margin: the gain had to be >= m (m < 0: a
        # non-inferiority margin), so m <= 0 is no_worse by -m and m > 0 is improve by m.
        if isinstance(v, dict) and "min_improvement" in v:
            if "compare" in v or "margin" in v:
                raise ValueError("min_improvement: use compare and margin instead (not both)")
            v = dict(v)
            m = float(v.pop("min_improvement"))
            v["compare"], v["margin"] = ("improve", m) if m > 0 else ("no_worse", -m)
        return v

    def required_margin(self) -> float:
        """The least gain over the champion that passes: +margin to improve, -margin for no worse."""
        return self.margin if self.compare == "improve" else -self.margin


class PromotionSpec(_Model):
    alias: str = Field("champion", description="registry alias of the version in service: promotion moves it to "
                                               "the version the gate passed, and the server follows it")
    previous_alias: str = Field("previous", description="registry alias of the version the champion replaced: "
                                                        "what a rollback restores")
    retention_days: int | None = Field(
        90, ge=1, description="delete registry versions older than this that no alias points at (null: keep all)")
    approval: Literal["auto", "manual"] = Field(
        "auto", description="auto: promote what the gate passes; manual: tag it pending until a person approves it")

    @field_validator("alias", "previous_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        # MLflow's rules for alias names, checked now rather than at the first promotion
        if not re.fullmatch(r"[\w\-]{1,255}", v) or v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(f"{v!r} cannot be a registry alias: use letters, digits, '_' and '-' (not 'latest' "
                             "or a version name like 'v3')")
        return v

    @model_validator(mode="after")
    def _distinct(self) -> PromotionSpec:
        if self.alias == self.previous_alias:
            raise ValueError(f"alias and previous_alias are both {self.alias!r}; a rollback needs two aliases")
        return self


class ServingSpec(_Model):
    host: str = Field("127.0.0.1", description="address `daybreak serve` binds (unless --host) and deploy calls "
                                               "(unless DAYBREAK_SERVE_URL is set)")
    port: int = Field(5055, ge=1, le=65535, description="port `daybreak serve` listens on (unless --port or "
                                                        "DAYBREAK_SERVE_PORT) and deploy calls")
    poll_seconds: float = Field(5.0, gt=0, description="seconds between the server's checks of the champion alias "
                                                       "(POST /refresh checks at once)")


class PredictionLogSpec(_Model):
    """What ``daybreak serve`` records of the requests it answers (``predlog/<model>/date=D/``)."""

    sample_rate: float = Field(1.0, ge=0, le=1, description="share of requests logged, whole requests; 0: no log")
    id_columns: list[str] | None = Field(
        None, description="row identity a request may carry next to the features, logged (not given to the "
                          "model) so labels can be joined later; default: features.keys and event_time")
    flush_seconds: float = Field(5.0, gt=0, le=3600, description="the log is written at least this often")
    flush_rows: int = Field(100_000, ge=1, description="... or as soon as this many rows wait")
    max_pending_rows: int = Field(2_000_000, ge=1000, description="past this, predictions are dropped from the "
                                  "log (counted in /health), never slowing requests")
    retention_days: int | None = Field(30, ge=1, description="monitoring deletes log partitions older than this")


class LiveRollbackSpec(_Model):
    """When the monitor moves the champion back to ``previous``."""

    enabled: bool = Field(True, description="false: when the rules call for a rollback, the monitor only alerts")
    floor: float | None = Field(None, description="live bound on the monitoring metric (default: gate.floor); "
                                                  "crossed when the champion's whole interval is past it")
    margin: float = Field(0.05, ge=0, description="roll back when the champion is worse than previous by more "
                                                 "than this with confidence (the upper end of the interval)")
    window_days: int = Field(3, ge=1, le=31, description="judge on the champion's labelled rows of the last days "
                                                         "(rows of one day are alike: one day alone overstates "
                                                         "the confidence)")
    level: float = Field(0.95, gt=0.5, lt=1.0, description="two-sided level of the intervals judged")
    resamples: int = Field(1000, ge=100, le=100_000, description="resamples per interval, where the interval is "
                                                                 "bootstrapped (not analytic)")
    seed: int = Field(0, description="seed of the resampling, and of the row sample when there are more rows "
                                     "than the bootstrap takes")
    min_rows: int = Field(200, ge=1, description="labelled live rows of the champion needed to act")


class LiveDriftSpec(_Model):
    """Population stability index of each served feature against the champion's training data."""

    warn_psi: float = Field(0.25, gt=0, description="above this a feature's PSI is a warning in the monitor's "
                                                    "result and log")
    block_psi: float | None = Field(None, gt=0, description="above this the monitor stops the day's run")
    bins: int = Field(10, ge=2, le=100, description="numeric features: quantile bins of the training window's "
                                                    "sample (categorical ones compare categories)")
    sample_rows: int = Field(100_000, ge=1000, description="rows sampled from each side")
    features: list[str] | None = Field(None, description="default: every feature")
    window_days: int | None = Field(None, ge=1, le=366, description="days of served inputs ending on the date, "
                                    "compared with the training window (default: training.window_days; a single "
                                    "day differs from a week in day-level features such as the weekday)")

    @model_validator(mode="after")
    def _ordered(self) -> LiveDriftSpec:
        if self.block_psi is not None and self.block_psi < self.warn_psi:
            raise ValueError(f"block_psi {self.block_psi} is below warn_psi {self.warn_psi}")
        return self


class NotifySpec(_Model):
    """Where the monitor reports a rollback, a blocking drift or a champion below its floor."""

    webhook: str | None = Field(None, description="URL to POST a JSON event to")
    webhook_env: str | None = Field(None, description="environment variable holding the URL (keeps tokens in "
                                                      "URLs out of the spec)")

    @field_validator("webhook")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"https?://[^/\s]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


class MonitoringSpec(_Model):
    log: PredictionLogSpec = Field(PredictionLogSpec(), description="what `daybreak serve` records of its "
                                                                    "predictions")
    metric: GateMetric | None = Field(None, description="the live metric rollback judges (default: gate.metric)")
    slices: list[str] | None = Field(None, description="columns to report live quality by (default: gate.slices)")
    rollback: LiveRollbackSpec = Field(LiveRollbackSpec(), description="when the monitor moves the champion back "
                                                                       "to previous")
    drift: LiveDriftSpec | None = Field(LiveDriftSpec(), description="served inputs against the champion's training "
                                                                     "data (null: not checked)")
    notify: NotifySpec = Field(NotifySpec(), description="where rollbacks, alerts and blocking drift are reported")


DEFAULT_MAX_STALENESS = "1d"
"""How old the online state may be before a raw row is blocked, unless the spec or
``DAYBREAK_ONLINE_MAX_STALENESS`` says otherwise."""


class OnlineSpec(_Model):
    """Online features (`daybreak.online`): whether the daily cycle keeps the online store
    current, and how old its state may be when `daybreak serve` computes a raw row's features.
    Where the store lives is not part of the spec: `DAYBREAK_ONLINE_URL` (a Redis URL may carry a
    password), else an embedded SQLite file in `$DAYBREAK_HOME/online/`."""

    materialize: bool = Field(False, description="true: the daily cycle materializes the online store for the "
                                                 "date right after the features step (the `online` step); "
                                                 "false: the step does nothing and no online store is opened")
    max_staleness: str = Field(DEFAULT_MAX_STALENESS, description="how old the materialized state may be before "
                                                                  "`daybreak serve` blocks a raw row, a duration "
                                                                  "such as '1d' or '36h', not counting the "
                                                                  "days the base source's calendar expects no drop "
                                                                  "(`DAYBREAK_ONLINE_MAX_STALENESS` overrides it)")

    @field_validator("max_staleness")
    @classmethod
    def _dur(cls, v: str) -> str:
        return _span(v, "online.max_staleness")


class Spec(_Model):
    name: str = Field(description="the pipeline's name: its MLflow experiment, beside `<name>-audit` (the audit "
                                  "history) and `<name>-monitor`")
    sources: dict[str, SourceSpec] = Field(description="landing datasets by name: where each one's files are and "
                                                       "the contract they must meet")
    features: FeatureSpec = Field(description="how the feature table is computed from the sources")
    model: ModelSpec = Field(description="the registered model: its estimator, parameters and tuning")
    training: TrainingSpec = Field(TrainingSpec(), description="the training window, holdout and validation rows")
    gate: GateSpec = Field(GateSpec(), description="the rules a candidate must pass to replace the champion")
    promotion: PromotionSpec = Field(PromotionSpec(), description="registry aliases, approval and retention")
    serving: ServingSpec = Field(ServingSpec(), description="where `daybreak serve` listens and how often it checks "
                                                            "the champion alias")
    monitoring: MonitoringSpec = Field(MonitoringSpec(), description="prediction log, live quality, drift, "
                                                                     "automatic rollback and notifications")
    online: OnlineSpec = Field(OnlineSpec(), description="online features: materialize the online store in the "
                                                         "daily cycle, and the state's staleness bound for raw rows")

    @model_validator(mode="before")
    @classmethod
    def _regression_metric(cls, v: Any) -> Any:
        """A regression model's gate judges rmse unless told otherwise (roc_auc, the default, is
        for classification): a regression spec need not name a metric to validate."""
        if isinstance(v, dict) and isinstance(v.get("model"), dict) and v["model"].get("task") == "regression":
            given = v.get("gate")
            gate: dict[str, Any] = given if isinstance(given, dict) else {}
            if "metric" not in gate and (given is None or isinstance(given, dict)):
                v = {**v, "gate": {**gate, "metric": "rmse"}}
        return v

    @model_validator(mode="after")
    def _references(self) -> Spec:
        """Cross-references between sections: names a section uses must exist where it points."""
        base = _check_base(self)
        _check_joins(self, base)
        names = _check_feature_table(self, base)
        _check_metrics_and_columns(self, names)
        _check_expressions(self, base)
        _check_types(self)
        return self

    # --- days and times ----------------------------------------------------------------------
    def calendar(self, source: str | None = None) -> CalendarSpec:
        """The days `source` (default: the base source) expects a drop."""
        cal = self.sources[source or self.features.base].calendar
        return cal if cal is not None else CalendarSpec()

    def expects(self, day: date, source: str | None = None) -> bool:
        """Whether `source` (default: the base source) expects a drop on `day`."""
        return bool(self.calendar(source).expects(day))

    def label_lag_days(self) -> int:
        """Whole days a label can take to become known (``label.known_at``'s delay, or its
        max_delay, rounded down; 0 without known_at). The gate's holdout, the training window and
        the monitor's judged day end that many days before the logical date: on the days whose
        labels are known by its end, not on days whose labels are all still to come."""
        lab = self.features.label
        if lab.known_at is None:
            return 0
        delay = lab.delay() or (parse_duration(lab.max_delay) if lab.max_delay else timedelta(0))
        return delay.days

    def labelled_day(self, day: date) -> date:
        """The newest day whose labels are known by the end of `day` (:meth:`label_lag_days`
        before it; with ``count_days: expected``, the newest expected day on or before that)."""
        anchor = day - timedelta(days=self.label_lag_days())
        if self.training.count_days == "expected" and anchor != day and not self.expects(anchor):
            before = self.calendar().expected_before(anchor, 1)
            anchor = before[0] if before else anchor
        return anchor

    def train_days(self, day: date) -> list[date]:
        """The training window's days for logical date `day` (``training.count_days``), ending the
        day before the holdout."""
        return self.training.window(self.labelled_day(day),
                                    self.calendar() if self.training.count_days == "expected" else None)

    def holdout_days(self, day: date) -> list[date]:
        """The gate's holdout days for logical date `day` (``training.count_days``), ending on
        :meth:`labelled_day`."""
        return self.training.holdout(self.labelled_day(day),
                                     self.calendar() if self.training.count_days == "expected" else None)

    def date_zone(self) -> str:
        """The zone the base source's days are cut in (``event_time.date_timezone``, else its
        ``timezone``, else UTC): a logical date is a day there."""
        et = self.sources[self.features.base].event_time
        return (et.date_timezone or et.timezone or "UTC") if et is not None else "UTC"

    def label_cut(self, day: date) -> Any:
        """The end of logical date `day` (midnight after it, in :meth:`date_zone`): labels known
        after it are immature for that day's training, gate and monitor."""
        from datetime import datetime
        from zoneinfo import ZoneInfo

        return datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=ZoneInfo(self.date_zone()))

    # --- identities -------------------------------------------------------------------------
    def spec_hash(self) -> str:
        # Who approves a promotion does not shape the model: switching to manual approval keeps
        # the date's candidate (and every spec hash written before the field existed).
        # Monitoring and online serving do not shape the model either.
        return _hash(_without_new_defaults(self.model_dump(
            mode="json", exclude={"promotion": {"approval"}, "monitoring": True, "online": True,
                                  "sources": {"__all__": OPERATIONAL}})))

    def id_columns(self) -> list[str]:
        """The row identity a served request may carry (logged, for joining labels later)."""
        ids = self.monitoring.log.id_columns
        return list(ids) if ids is not None else [*self.features.keys, "event_time"]

    def live_metric(self) -> str:
        return self.monitoring.metric or self.gate.metric

    def live_floor(self) -> float | None:
        r = self.monitoring.rollback
        return r.floor if r.floor is not None else self.gate.floor

    def feature_version(self) -> str:
        """Identity of everything that shapes the feature table (sources + features), not the model."""
        # Encodings shape the model, not the table, so changing one does not rebuild features. A
        # calendar says which days run and which missing days are gaps, not what a row's features
        # are: adding a holiday rebuilds nothing (it is in the spec hash: it can shape training).
        model_only = {"encoding", "max_categories", "bins"}
        features = self.features.model_dump(mode="json", exclude={"columns": {"__all__": model_only}})
        return _hash(_without_new_defaults({
            "sources": {k: v.model_dump(mode="json", exclude=OPERATIONAL | {"calendar"})
                        for k, v in self.sources.items()},
            "features": features}))


# Fields added after specs were first hashed, with their defaults: left out of a hash while they
# hold their default, so upgrading daybreak rebuilds nothing for a spec that does not use them.
_NEW_DEFAULTS: dict[str, Any] = {
    "calendar": None, "known_at": None, "max_delay": None, "strict": False, "rows": [], "lag": [],
    "lookback": None, "source": None, "time": None, "count_days": "calendar", "leak_check": "block",
    "incomplete_history": "exclude",
}


def _without_new_defaults(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_new_defaults(v) for k, v in obj.items()
                if not (k in _NEW_DEFAULTS and v == _NEW_DEFAULTS[k])}
    if isinstance(obj, list):
        return [_without_new_defaults(v) for v in obj]
    return obj



# --- cross-references (Spec._references), one concern each ----------------------------------------

def _require(cols: Iterable[str], have: Any, where: str, what: str) -> None:
    """Each of `cols` is in `have`, or a ValueError: '<where>: column 'c' is not in <what>'."""
    for col in cols:
        if col not in have:
            raise ValueError(f"{where}: column {col!r} is not in {what}")


def _check_base(spec: Spec) -> SourceSpec:
    f = spec.features
    base = spec.sources.get(f.base)
    if base is None:
        raise ValueError(f"features.base: unknown source {f.base!r}; sources are {sorted(spec.sources)}")
    if base.kind != "events":
        raise ValueError(f"features.base: source {f.base!r} must be of kind 'events'")
    return base


def _check_joins(spec: Spec, base: SourceSpec) -> None:
    """As-of joins and lookups name existing sources and columns, join on columns of one type,
    and as-of joins go by a timestamp."""
    f = spec.features
    joins: list[tuple[str, AsofJoin | Lookup]] = [
        *((f"features.asof[{i}]", j) for i, j in enumerate(f.asof)),
        *((f"features.lookups[{i}]", lk) for i, lk in enumerate(f.lookups))]
    for where, join in joins:
        src = spec.sources.get(join.source)
        if src is None:
            raise ValueError(f"{where}.source: unknown source {join.source!r}")
        timed = [join.time] if isinstance(join, AsofJoin) else []
        _require([*timed, *join.by, *join.columns.values()], src.columns, where, f"source {join.source!r}")
        _require(join.by, base.columns, f"{where}.by", f"base source {f.base!r}")
    for where, join in joins:
        src = spec.sources[join.source]
        for col in join.by:  # the join compares these values: the types must agree
            if src.columns[col].type != base.columns[col].type:
                raise ValueError(f"{where}.by: column {col!r} is {base.columns[col].type} in {f.base!r} but "
                                 f"{src.columns[col].type} in {join.source!r}")
        if isinstance(join, AsofJoin) and not src.columns[join.time].type.startswith("timestamp"):
            raise ValueError(f"{where}.time: column {join.time!r} of {join.source!r} is "
                             f"{src.columns[join.time].type}, not a timestamp")
    for i, w in enumerate(f.windows):
        where = f"features.windows[{i}]"
        if w.source is None or w.source == f.base:
            if w.time is not None:
                raise ValueError(f"{where}.time: the base source's rows take features.event_time; `time` is for "
                                 "a window over another source")
            continue
        src = spec.sources.get(w.source)
        if src is None:
            raise ValueError(f"{where}.source: unknown source {w.source!r}; sources are {sorted(spec.sources)}")
        if src.kind != "events":
            raise ValueError(f"{where}.source: source {w.source!r} must be of kind 'events' to be windowed")
        if w.time is None:
            raise ValueError(f"{where}.time: a window over source {w.source!r} needs `time`: an expression over "
                             "its columns giving each row's event time")
        _require(w.by, src.columns, f"{where}.by", f"source {w.source!r}")
        for col in w.by:
            if col in base.columns and src.columns[col].type != base.columns[col].type:
                raise ValueError(f"{where}.by: column {col!r} is {base.columns[col].type} in {f.base!r} but "
                                 f"{src.columns[col].type} in {w.source!r}")


def _check_feature_table(spec: Spec, base: SourceSpec) -> list[str]:
    """Window groups and keys are base columns; the feature table's column names (keys,
    event_time, features, label) are distinct. Returns the feature names."""
    f = spec.features
    for i, w in enumerate(f.windows):
        _require(w.by, base.columns, f"features.windows[{i}].by", f"base source {f.base!r}")
    for i, c in enumerate(f.columns):
        if c.name == LABEL_KNOWN_AT:
            raise ValueError(f"features.columns[{i}].name: {LABEL_KNOWN_AT!r} is the feature table's column for "
                             "when the label is known; choose another name")
    _require(f.keys, base.columns, "features.keys", f"base source {f.base!r}")
    names = f.feature_names()
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"features: duplicate feature names {dupes}")
    keys = [(f"features.keys[{i}]", k) for i, k in enumerate(f.keys)]
    for where, name in [("features.label.name", f.label.name), *keys]:
        if name in names or name == "event_time":
            raise ValueError(f"{where}: {name!r} is also the name of a feature (or event_time); "
                             "the feature table cannot hold both")
    if f.label.name in f.keys:
        raise ValueError(f"features.label.name: {f.label.name!r} is also a key")
    if not names:
        raise ValueError("features: define at least one feature")
    for col in spec.model.partition_by:
        if col not in names:
            raise ValueError(f"model.partition_by: {col!r} is not a feature; features are {names}")
    return names


def _check_metrics_and_columns(spec: Spec, names: list[str]) -> None:
    """Gate and monitoring metrics fit the task; the columns they slice, drift-check or log exist."""
    from daybreak.infra.metrics import metrics_for

    f, g, mon = spec.features, spec.gate, spec.monitoring
    allowed = metrics_for(spec.model.task)
    for where, m in [("gate.metric", g.metric), *[(f"gate.floors.{k}", k) for k in g.floors],
                     *[(f"gate.report_metrics[{i}]", k) for i, k in enumerate(g.report_metrics or [])],
                     ("gate.slices.metric", g.slices.metric), ("monitoring.metric", mon.metric)]:
        if m is not None and m not in allowed:
            raise ValueError(f"{where}: {m!r} is not a {spec.model.task} metric; use one of {list(allowed)}")
    carried = set(names) | set(f.keys) | {f.label.name}
    sliced = f"a feature or key; features are {names}"
    for where, cols, have, what in [
            ("gate.slices.columns", g.slices.columns, carried, sliced),
            ("gate.data_checks.drift.features", (g.data_checks.drift.features if g.data_checks.drift else None) or [],
             names, "a feature"),
            ("monitoring.slices", mon.slices or [], carried, sliced),
            ("monitoring.drift.features", (mon.drift.features if mon.drift else None) or [], names, "a feature")]:
        for i, col in enumerate(cols):
            if col not in have:
                raise ValueError(f"{where}[{i}]: {col!r} is not {what}")
    _check_baselines(spec, names)
    if g.bootstrap is not None and g.bootstrap.method == "analytic":
        from daybreak.infra.metrics import ANALYTIC

        used: dict[str, str] = {"gate.metric": g.metric, **{f"gate.floors.{k}": str(k) for k in g.floors},
                                "monitoring.metric": spec.live_metric()}
        for where, metric in used.items():
            if metric not in ANALYTIC:
                raise ValueError(f"gate.bootstrap.method: 'analytic' has no interval for {where} {metric!r} (analytic: "
                                 f"{', '.join(ANALYTIC)}); use 'auto', which takes the bootstrap for it")
    for i, col in enumerate(mon.log.id_columns or []):
        if col not in [*f.keys, "event_time"]:
            raise ValueError(f"monitoring.log.id_columns[{i}]: {col!r} is not a key or event_time; labels are "
                             f"joined on those (keys are {f.keys})")


def _check_baselines(spec: Spec, names: list[str]) -> None:
    """Baselines and the resampling unit name holdout columns (features, keys, event_time); the
    label is never a prediction nor a unit."""
    from daybreak.spec._expr import check_expression

    g, f = spec.gate, spec.features
    holdout = {*names, *f.keys, "event_time"}
    labels = [b.label() for b in g.baselines]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"gate.baselines: two baselines are called {dupes}; give them distinct names")
    for i, b in enumerate(g.baselines):
        if b.kind == "feature" and b.column not in holdout:
            raise ValueError(f"gate.baselines[{i}].column: {b.column!r} is not a feature or key; features are "
                             f"{names}")
        if b.kind == "expression" and b.expr is not None:
            check_expression(b.expr, holdout, where=f"gate.baselines[{i}].expr")
    for i, unit in enumerate((g.bootstrap.cluster_by if g.bootstrap else None) or []):
        if unit.partition(":")[0] not in holdout:
            raise ValueError(f"gate.bootstrap.cluster_by[{i}]: {unit!r} is not a feature, key or event_time")


def _output_columns(spec: Spec) -> dict[str, str]:
    """Join and window outputs a derived feature or the label may read -> their contract type."""
    f = spec.features
    out: dict[str, str] = {}
    for w in f.windows:
        out |= {n: "float64" for n in window_feature_names(w)}
    joins: list[AsofJoin | Lookup] = [*f.asof, *f.lookups]
    for join in joins:
        src = spec.sources[join.source]
        out |= {n: src.columns[c].type for n, c in join.columns.items()}
    return out


def _window_columns(spec: Spec, w: WindowAgg) -> tuple[str, set[str]]:
    """The source a window aggregates, and the columns its value and known_at may read."""
    name = spec.features.window_source(w)
    return name, set(spec.sources[name].columns) | {"event_time"}


def _check_expressions(spec: Spec, base: SourceSpec) -> None:
    """Expressions are checked against the columns they may use, so typos fail at validation.
    Derived features (features.columns, in order) and the label may read base columns, join and
    window outputs and the columns defined before them."""
    from daybreak.spec._expr import check_expression

    f = spec.features
    cols = set(base.columns) | {"event_time"}
    check_expression(f.event_time, set(base.columns), where="features.event_time")
    if f.label.known_at is not None and f.label.delay() is None:
        check_expression(f.label.known_at, cols, where="features.label.known_at")
    derived = cols | f.output_names()
    for i, c in enumerate(f.columns):
        check_expression(c.expr, derived, where=f"features.columns[{i}].expr")
        derived.add(c.name)
    check_expression(f.label.expr, derived, where="features.label.expr")
    for i, w in enumerate(f.windows):
        source, scope = _window_columns(spec, w)
        if w.time is not None:
            check_expression(w.time, set(spec.sources[source].columns), where=f"features.windows[{i}].time")
        check_expression(w.value, scope, where=f"features.windows[{i}].value")
        check_expression(w.known_at, scope, where=f"features.windows[{i}].known_at")
    for i, j in enumerate(f.asof):
        if j.known_at is not None:
            check_expression(j.known_at, set(spec.sources[j.source].columns), where=f"features.asof[{i}].known_at")
    _check_leaks(spec)


def _same_expr(a: str, b: str) -> bool:
    from daybreak.spec._expr import same_expression

    return same_expression(a, b)


def _check_leaks(spec: Spec) -> None:
    """Refuse a feature that could read a label column before the label is known (DESIGN.md,
    "Time"): a derived feature reading one on its own row; a window over one whose known_at is not
    after the event (nor the label's); an as-of join of the base source onto itself without
    known_at, or, when it joins a label column, with a known_at not after the row's own event; a
    label.known_at before the event.

    A known_at that reads only what the event time reads is compared with the event time on
    made-up rows (:func:`_gap`): ``day``, ``event_time - hours(1)`` or ``event_time + seconds(0)``
    are caught however they are spelled. A known_at that reads other columns (``resolved_at``) is
    the spec author's statement about the data, which no static check can prove; the features
    step's run-time leak check is the backstop."""
    f = spec.features
    for i, j in enumerate(f.asof):
        if j.source == f.base and j.known_at is None:
            raise ValueError(f"features.asof[{i}].known_at: an as-of join of the base source {f.base!r} onto itself "
                             "needs known_at: without it a row joins its own values (or ones of the same time, "
                             "known only later). Say when a row becomes known, e.g. known_at: "
                             f"\"{j.time} + days(1)\" with max_delay: 1d, or use a window with lag: 1")
    label_known = f.label.known_at_expr()
    if label_known is not None:
        gap = _gap(spec, label_known, "event_time")
        if gap is not None and gap < 0:
            raise ValueError(f"features.label.known_at: {f.label.known_at!r} is before the event on some rows: a "
                             "label known before the prediction is made is not a label to predict")
    inputs = label_inputs(f.label, f.event_time, f.keys)
    # A derived column the label reads stands for what it reads (the later definition first, as
    # a column may take an earlier one's name); window and join outputs are past values, known
    # before the event: a feature may read them (y_lag_1 beside a label y - y_lag_1).
    for c in reversed(f.columns):
        if c.name in inputs:
            inputs = (inputs - {c.name}) | (_names(c.expr) - _names(f.event_time) - set(f.keys) - {"event_time"})
    inputs = (inputs - f.output_names()) & set(spec.sources[f.base].columns)
    if not inputs:
        return
    named = ", ".join(repr(c) for c in sorted(inputs))
    declare = ("declare features.label.known_at (when the label is known, e.g. '30d' or an expression) or give "
               "a known_at that is after the event")
    for i, c in enumerate(f.columns):
        used = _names(c.expr) & inputs
        if used:
            raise ValueError(f"features.columns[{i}].expr: reads label column(s) {sorted(used)} of its own row "
                             f"(the label is computed from {named}): the feature would hand the model the answer. "
                             "Past values come from a window or an as-of join with known_at")
    if label_known is not None and f.label.max_delay is None and f.label.delay() is None and not _same_expr(
            label_known, "event_time") and any(_same_expr(w.known_at, label_known) for w in f.windows):
        raise ValueError("features.label.max_delay: windows over the label's columns take label.known_at "
                         f"({f.label.known_at!r}); say how long after the event it can be (e.g. '5d'), or they "
                         "would leave out every row known after its event")
    for i, w in enumerate(f.windows):
        used = _names(w.value) & inputs
        if spec.features.window_source(w) != f.base or not used:
            continue
        if label_known is not None and _same_expr(w.known_at, label_known):
            continue
        after_event = _gap(spec, w.known_at, "event_time")
        if after_event is not None and after_event <= 0:
            raise ValueError(f"features.windows[{i}].known_at: the window aggregates label column(s) {sorted(used)} "
                             f"and takes a row as known at or before its own event ({w.known_at!r}); a label is "
                             f"not known when its event happens, so the window would count outcomes not yet known: "
                             f"{declare}")
        if label_known is None:
            continue
        after_label = _gap(spec, w.known_at, label_known)
        if after_label is not None and after_label < 0:
            raise ValueError(f"features.windows[{i}].known_at: {w.known_at!r} is earlier than features.label.known_at "
                             f"({f.label.known_at!r}) on some rows, and the window aggregates label column(s) "
                             f"{sorted(used)}: drop known_at to take the label's")
    for i, j in enumerate(f.asof):
        used = set(j.columns.values()) & inputs
        if j.source != f.base or not used:
            continue
        assert j.known_at is not None  # refused above
        gap = _gap(spec, j.known_at, "event_time")
        if gap is not None and (gap < 0 or (gap == 0 and not j.strict)):
            raise ValueError(f"features.asof[{i}].known_at: joins label column(s) {sorted(used)} known by the row's "
                             f"own event ({j.known_at!r}), so a row can join its own label: {declare}")


_MADE_UP = {"timestamp": [1_704_067_200_000_000, 1_719_754_620_000_000, 1_735_689_540_000_000],  # us, 2024
            "int": [0, 1, 30], "float": [0.0, 1.5, 30.0], "string": ["a", "b", "c"], "bool": [False, True, True],
            "date": [19723, 19904, 20088]}


def _gap(spec: Spec, later: str, earlier: str) -> float | None:
    """min(later - earlier) in seconds over made-up base rows (times across a year; whole numbers
    from 0 to 30), when both expressions read only what features.event_time reads; None when
    either reads anything else (then the rows' values, not the spec, decide) or cannot be
    computed. `event_time` in either is the event time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from daybreak.spec._expr import evaluate

    f = spec.features
    base = spec.sources[f.base]
    timing = _names(f.event_time)
    if (_names(later) | _names(earlier)) - timing - {"event_time"}:
        return None
    cols = {}
    try:
        for c in sorted(timing & set(base.columns)):
            t = arrow_type(base.columns[c].type)
            kind = ("timestamp" if pa.types.is_timestamp(t) else "date" if pa.types.is_date(t) else
                    "int" if pa.types.is_integer(t) else "float" if pa.types.is_floating(t) else
                    "bool" if pa.types.is_boolean(t) else "string")
            made_up = pa.array(_MADE_UP[kind])
            if kind == "timestamp":
                made_up = made_up.cast(pa.timestamp("us", tz=t.tz))
            elif kind == "date":
                made_up = made_up.cast(pa.int32())
            cols[c] = made_up.cast(t)
        rows = pa.table(cols) if cols else pa.table({"__": pa.array([0, 1, 2])})
        rows = rows.append_column("event_time", evaluate(f.event_time, rows).cast(pa.timestamp("us", tz="UTC")))
        a = evaluate(later, rows).cast(pa.timestamp("us", tz="UTC"))
        b = evaluate(earlier, rows).cast(pa.timestamp("us", tz="UTC"))
        diff = pc.cast(pc.subtract(pc.cast(a, pa.int64()), pc.cast(b, pa.int64())), pa.float64())
        least = pc.min(diff).as_py()
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return None if least is None else least / 1e6


def _check_types(spec: Spec) -> None:
    """Compute every expression over the base rows on an empty table of the contract's types: a
    type mismatch (text compared with a number, a window over text, an event time that is not a
    time) fails now, naming the field, instead of on the first rows the feature step reads."""
    import pyarrow as pa

    from daybreak.spec._expr import ExpressionError, evaluate, short
    from daybreak.spec._model import arrow_type

    f = spec.features

    def empty(columns: dict[str, Any]) -> pa.Table:
        return pa.table({c: pa.array([], type=arrow_type(t if isinstance(t, str) else t.type))
                         for c, t in columns.items()})

    table = empty(spec.sources[f.base].columns)

    def typed(expr: str, where: str, want: str | None = None, on: pa.Table | None = None) -> pa.DataType:
        # Constant parts are computed even on no rows, so an overflow such as 2**64 fails here.
        try:
            t = evaluate(expr, table if on is None else on).type
        except ExpressionError as e:
            raise ValueError(f"{where}: {e}") from None
        except (pa.ArrowException, TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{where}: {short(expr)} cannot be computed with the contract's column types: "
                             f"{str(e).splitlines()[0]}") from None
        ok = {"timestamp": pa.types.is_timestamp,
              "number": lambda x: pa.types.is_integer(x) or pa.types.is_floating(x) or pa.types.is_boolean(x)
              or pa.types.is_decimal(x)}
        if want is not None and not ok[want](t):
            raise ValueError(f"{where}: {short(expr)} gives {t} values, not a {want}")
        return t

    typed(f.event_time, "features.event_time", "timestamp")
    stamp = pa.array([], type=pa.timestamp("us", tz="UTC"))
    table = table.append_column("event_time", stamp)
    if f.label.known_at is not None and f.label.delay() is None:
        typed(f.label.known_at, "features.label.known_at", "timestamp")
    for i, w in enumerate(f.windows):
        source, _ = _window_columns(spec, w)
        rows = table
        if source != f.base:
            rows = empty(spec.sources[source].columns)
            assert w.time is not None  # _check_joins: a window over another source has one
            typed(w.time, f"features.windows[{i}].time", "timestamp", rows)
            rows = rows.append_column("event_time", stamp)
        typed(w.value, f"features.windows[{i}].value", "number", rows)
        typed(w.known_at, f"features.windows[{i}].known_at", "timestamp", rows)
    for i, j in enumerate(f.asof):
        if j.known_at is not None:
            typed(j.known_at, f"features.asof[{i}].known_at", "timestamp", empty(spec.sources[j.source].columns))
    def put(t: pa.Table, name: str, column: pa.Array) -> pa.Table:  # a feature may take a base column's name
        i = t.schema.get_field_index(name)
        return t.set_column(i, name, column) if i >= 0 else t.append_column(name, column)

    for name, t in _output_columns(spec).items():
        table = put(table, name, pa.array([], type=arrow_type(t)))
    for i, c in enumerate(f.columns):
        t = typed(c.expr, f"features.columns[{i}].expr")
        if not c.categorical and not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                                      or pa.types.is_decimal(t)):
            raise ValueError(f"features.columns[{i}].expr: {short(c.expr)} gives {t} values; a feature that is not "
                             "categorical must be a number (or set categorical: true)")
        table = put(table, c.name, pa.array([], type=pa.string() if c.categorical else pa.float64()))
    typed(f.label.expr, "features.label.expr", "number")


def xgb_params(m: ModelSpec) -> dict[str, Any]:
    """The xgboost parameters training uses: the task's objective and metric, then ``model.params``."""
    defaults: dict[str, Any] = {"tree_method": "hist", "seed": m.seed}
    if m.task == "classification":
        defaults |= {"objective": "binary:logistic", "eval_metric": "auc"}
    else:
        defaults |= {"objective": "reg:squarederror", "eval_metric": "rmse"}
    return defaults | dict(m.params)


# --- estimators: allowed modules only ------------------------------------------------------------

ALLOW_ENV = "DAYBREAK_ALLOWED_ESTIMATOR_MODULES"
"""Environment variable: comma-separated module prefixes (``acme.models, acme.pipelines``) whose
estimator classes and factory functions a spec may name, besides scikit-learn and xgboost. Set by
an operator where specs are loaded and models trained (the Airflow/Prefect worker's environment,
Ray workers' too when tuning); a spec can never extend it."""
DEFAULT_ESTIMATOR_MODULES = ("sklearn", "xgboost")
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def allowed_estimator_modules() -> tuple[str, ...]:
    """The module prefixes ``model.estimator`` may come from: scikit-learn, xgboost and those in
    ``$DAYBREAK_ALLOWED_ESTIMATOR_MODULES``.

    Raises:
        SpecError: the variable holds something that is not a module name.
    """
    extra = []
    for part in os.environ.get(ALLOW_ENV, "").split(","):
        part = part.strip()
        if not part:
            continue
        if not _MODULE_NAME.fullmatch(part):
            raise SpecError(f"{ALLOW_ENV}: {part!r} is not a module name (use dotted names such as "
                            "'acme.models', separated by commas)")
        extra.append(part)
    return (*DEFAULT_ESTIMATOR_MODULES, *extra)


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `module` is one of `prefixes` or inside one (``sklearn.ensemble`` is inside
    ``sklearn``; ``sklearnx`` is not)."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _how_to_allow(allowed: tuple[str, ...]) -> str:
    return (f"allowed: {', '.join(allowed)}. Estimators come from scikit-learn and xgboost; to allow your own "
            f"module, an operator sets {ALLOW_ENV} (comma-separated module prefixes, e.g. "
            f"{ALLOW_ENV}=acme.models) in the environment of the workers that load specs and train; "
            "a spec cannot allow a module")


def resolve_estimator(path: str) -> tuple[Any, bool]:
    """Import and inspect ``model.estimator``, calling nothing.

    The import path must lie in an allowed module, checked *before* anything is imported. The
    object found must be defined in an allowed module too (a name re-exported from elsewhere does
    not count). From scikit-learn and xgboost only estimator classes are accepted (a
    ``BaseEstimator`` subclass with fit and predict): their functions can run code. From an
    operator-allowed module: an estimator class, or a function returning an estimator or a Pipeline.

    Args:
        path: the import path, ``module.name``.

    Returns:
        The class or function, and whether it is a factory function (a user's) rather than a class.

    Raises:
        SpecError: naming ``model.estimator``, why, and the allow-list.
    """
    allowed = allowed_estimator_modules()
    if not isinstance(path, str) or not _IMPORT_PATH.fullmatch(path):
        raise SpecError(f"model.estimator: {path!r} is not an import path such as "
                        "'sklearn.ensemble.HistGradientBoostingClassifier'")
    module, _, attr = path.rpartition(".")
    if not _within(module, allowed):
        raise SpecError(f"model.estimator: {path!r} is not in an allowed module; {_how_to_allow(allowed)}")
    parts = module.split(".")
    if any(p in ("tests", "testing", "conftest") or p.startswith("test_") for p in parts):
        raise SpecError(f"model.estimator: {path!r} is in a test module; name an estimator from the library")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise SpecError(f"model.estimator: cannot import {path!r}: {e}") from None
    own = getattr(obj, "__module__", None)
    kind = "a class" if isinstance(obj, type) else "a function" if callable(obj) else "a value"
    if not isinstance(own, str) or not _within(own, allowed):
        raise SpecError(f"model.estimator: {path!r} is {kind} defined in {own!r}, not in an allowed module "
                        f"(a name imported into an allowed module does not count); {_how_to_allow(allowed)}")
    if _within(own, DEFAULT_ESTIMATOR_MODULES):
        if not isinstance(obj, type):
            raise SpecError(f"model.estimator: {path!r} is {kind}, not an estimator class: from scikit-learn and "
                            "xgboost only estimator classes are allowed. A function that builds an estimator "
                            f"belongs in your own module, allowed by an operator in {ALLOW_ENV}")
        from sklearn.base import BaseEstimator

        if not issubclass(obj, BaseEstimator):
            raise SpecError(f"model.estimator: {path!r} is not a scikit-learn estimator (a BaseEstimator "
                            "subclass with fit and predict)")
    elif not isinstance(obj, type) and not inspect.isfunction(obj):
        raise SpecError(f"model.estimator: {path!r} is {kind} ({type(obj).__name__}); name an estimator class "
                        "or a function that returns one")
    if isinstance(obj, type):
        missing = [m for m in ("fit", "predict") if not callable(getattr(obj, m, None))]
        if missing:
            raise SpecError(f"model.estimator: {path!r} has no fit/predict ({' and '.join(missing)} missing): name "
                            "an estimator that predicts (a classifier or regressor)")
        return obj, False
    return obj, True


def build_estimator(spec: Spec, overrides: dict[str, Any] | None = None) -> Any:
    """The sklearn estimator named by ``model.estimator`` (a class, or a function returning an
    estimator or Pipeline), called with ``model.params`` and `overrides`.

    Only from allowed modules (:func:`resolve_estimator`), checked again here: training may get a
    spec that was never validated.
    """
    path = spec.model.estimator or ""
    factory, _ = resolve_estimator(path)
    params = dict(spec.model.params) | (overrides or {})
    try:
        est = factory(**params)
    except TypeError as e:
        raise SpecError(f"model.params: {path}(**model.params) failed: {e}") from None
    if not hasattr(est, "fit") or not hasattr(est, "predict"):
        raise SpecError(f"model.estimator: {path} gave {type(est).__name__}, which has no fit/predict")
    # deterministic unless the spec says otherwise: every unset random_state, a Pipeline's steps' too
    unset = {k: spec.model.seed for k, v in est.get_params(deep=True).items()
             if (k == "random_state" or k.endswith("__random_state")) and v is None}
    if unset:
        est.set_params(**unset)
    return est


def check_model(spec: Spec) -> None:
    """Try the model's settings before any work starts: an estimator that cannot be imported or
    built, a parameter (or tuning range) of the wrong type or out of range, an unknown objective or
    metric fails here, naming the field, instead of after staging and features.

    xgboost trains one round on eight made-up rows with ``model.params``, its sizes clamped
    (:data:`XGB_SIZE_CAPS`: a spec's three million trees or two hundred million classes must not
    cost minutes and gigabytes here); each tuning value is checked by configuring a booster with
    it, which parses every parameter without training (one round is trained with the first value
    of each tuned parameter). A scikit-learn estimator is built and its parameters checked."""
    m = spec.model
    tries: list[tuple[str, dict[str, Any], bool]] = [("model.params", {}, True)]
    for k, p in (m.tuning.space.items() if m.tuning else []):
        if p.choices is not None:
            values = list(p.choices)
        else:
            assert p.low is not None and p.high is not None  # SearchParam: a range has both bounds
            values = [int(p.low), int(p.high)] if p.integer else [p.low, p.high]
        seen: set[str] = set()
        for v in values:
            key = json.dumps(v, sort_keys=True, default=str)
            if key not in seen:  # the same value twice is checked once
                seen.add(key)
                tries.append((f"model.tuning.space.{k}", {k: v}, len(seen) == 1))
    if m.flavor == "xgboost":
        # (the tuning space is given value by value, not with the model: parsed once per check)
        model_json = json.dumps(m.model_dump(mode="json", exclude={"tuning"}), sort_keys=True)
        for where, extra, train in tries:
            _check_xgb(model_json, where, json.dumps(extra, sort_keys=True, default=str), train)
        return
    path = m.estimator or ""
    obj, factory = resolve_estimator(path)
    trusted = not factory and _within(obj.__module__, DEFAULT_ESTIMATOR_MODULES)
    for where, extra, _ in tries:
        params = dict(m.params) | extra
        if not trusted:
            # an operator's own code: inspected, never called while validating
            try:
                inspect.signature(obj).bind(**params)
            except TypeError as e:
                raise SpecError(f"{where}: {path}(**model.params) does not accept these parameters: {e}") from None
            except ValueError:  # no signature to inspect: training will tell
                pass
            continue
        try:  # scikit-learn and xgboost estimator classes: their constructors only store the parameters
            est = obj(**params)
        except TypeError as e:
            raise SpecError(f"model.params: {path}(**model.params) failed: {e}") from None
        if not hasattr(type(est), "_parameter_constraints"):  # xgboost's: checked when it trains
            continue
        try:  # scikit-learn >= 1.2: the fit-time checks
            est._validate_params()
        except (TypeError, ValueError) as e:
            name = re.match(r"The '(\w+)' parameter", str(e))
            raise SpecError(f"{where}{'.' + name.group(1) if name and where == 'model.params' else ''}: {e}") from None


_XGB_PARAM_ERROR = re.compile(r"Invalid Parameter|Invalid Input|Unknown|valid values|should be (greater|less)|"
                              r"exceed bound|expect (int|float|bool)", re.IGNORECASE)


XGB_SIZE_CAPS = {
    "num_parallel_tree": 2, "num_class": 4, "max_depth": 6, "max_leaves": 64, "max_bin": 64,
    "max_cat_to_onehot": 8, "max_cat_threshold": 8, "max_cached_hist_node": 1024,
    "lambdarank_num_pair_per_sample": 4, "top_k": 4,
}
"""xgboost parameters that size what one training allocates or computes (trees per round,
classes, tree depth and leaves, histogram bins, categorical splits, cached histogram nodes,
ranking pairs, coordinate-descent features), and the value each is clamped to while a spec is
validated. Only large positive whole numbers are clamped (as int, or text of digits): zero,
negative, fractional and non-numeric values go to xgboost as written, so what is invalid stays
invalid. Training uses the spec's values as given."""
_XGB_MAX_QUANTILES = 4
_DIGITS = re.compile(r"\s*\+?\d+\s*")


def _clamp_sizes(params: dict[str, Any]) -> dict[str, Any]:
    """`params` with the sizes of :data:`XGB_SIZE_CAPS` clamped, and a long ``quantile_alpha``
    (one output per quantile) cut to its extremes, for a check on eight made-up rows."""
    out = dict(params)
    for k, cap in XGB_SIZE_CAPS.items():
        v = out.get(k)
        if isinstance(v, str) and _DIGITS.fullmatch(v):
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v > cap:
            out[k] = cap
    alpha = out.get("quantile_alpha")
    if isinstance(alpha, str):
        try:
            alpha = json.loads(alpha)
        except ValueError:
            alpha = None
    if isinstance(alpha, list) and len(alpha) > _XGB_MAX_QUANTILES and all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in alpha):
        out["quantile_alpha"] = sorted({min(alpha), max(alpha)})  # each must lie in [0, 1]: the extremes tell
    return out


@functools.lru_cache(maxsize=2)
def _toy_matrix(task: str) -> Any:  # (shared: only read by configured boosters)
    """Eight made-up rows, with labels most objectives accept (0/1 to classify; in (0, 1) and
    positive to regress)."""
    import numpy as np
    import xgboost as xgb

    y = [0.0, 1.0] if task == "classification" else [0.25, 0.75]
    return xgb.DMatrix(np.arange(16, dtype=np.float32).reshape(8, 2), np.array(y * 4, dtype=np.float32))


@functools.lru_cache(maxsize=8)
def _model_from_json(model_json: str) -> ModelSpec:
    return ModelSpec.model_validate(json.loads(model_json))


@functools.lru_cache(maxsize=256)
def _check_xgb(model_json: str, where: str, extra_json: str, train: bool = True) -> None:
    """Check ``model.params`` with `extra` (a tuning value) on eight made-up rows, with the sizes
    clamped (:func:`_clamp_sizes`): one round of training if `train`, else a booster configured
    with the parameters (xgboost parses and checks every parameter then, in well under a
    millisecond). (Cached: parsing the same spec again costs nothing.)"""
    import warnings

    import xgboost as xgb

    m = _model_from_json(model_json)

    def fails(params: dict[str, Any], train: bool) -> str | None:
        params = _clamp_sizes(params) | {"nthread": 1}
        params.pop("num_boost_round", None)  # daybreak's, not xgboost's
        try:
            # a configured booster only reads the shared rows; training builds its own from them
            # (it caches histograms in the matrix, which other threads may be validating with)
            d = _toy_matrix(m.task) if not train else _toy_matrix.__wrapped__(m.task)
            with warnings.catch_warnings():  # training says it again, on real rows
                warnings.simplefilter("ignore")
                if train:
                    xgb.train(params, d, num_boost_round=1, evals=[(d, "val")], verbose_eval=False)
                else:
                    xgb.Booster(params, [d]).save_config()  # configures: every parameter parsed and checked
        except (xgb.core.XGBoostError, TypeError, ValueError) as e:
            msg = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).splitlines()[0])
            # only what is wrong with a parameter: eight made-up rows may not suit an objective
            # (ranking groups, survival bounds), which real training data will
            return msg if _XGB_PARAM_ERROR.search(msg) else None
        return None

    extra = json.loads(extra_json)
    params = xgb_params(m) | extra
    err = fails(params, train)
    if err is None:
        return
    culprit = ""  # the parameter that fails on its own, to name it
    if where == "model.params":
        base = xgb_params(m.model_copy(update={"params": {}}))
        culprit = next((f".{k}" for k in m.params if fails(base | {k: m.params[k]}, False)), "")
        if not culprit and len(m.params) <= MAX_TUNING_PARAMS:  # some errors show only when training
            culprit = next((f".{k}" for k in m.params if fails(base | {k: m.params[k]}, True)), "")
    raise SpecError(f"{where}{culprit}: xgboost refuses it: {err}")


def arrow_type(name: str) -> Any:
    """The Arrow type a contract column's type name (``int64``, ``timestamp[us, UTC]``, ...) names."""
    import pyarrow as pa

    if name.startswith("timestamp["):
        unit, _, tz = name[len("timestamp["):-1].partition(",")
        return pa.timestamp(unit.strip(), tz=tz.strip() or None)
    return {"string": pa.string(), "date32": pa.date32(), "bool": pa.bool_()}.get(name) or pa.type_for_alias(name)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def load_spec(path: str | Path, *, try_model: bool = True) -> Spec:
    """Read, parse and validate the spec at `path`, a file or an ``s3://`` object (bounded YAML;
    see :func:`load_yaml`). S3 credentials and endpoint come from the environment, as the store's.
    `try_model` false skips :func:`check_model` (for commands that only read the registry: it
    imports xgboost or scikit-learn, seconds of a listing's time)."""
    if str(path).startswith("s3://"):
        uri = str(path)
        return parse_spec(load_yaml(_read_s3(uri, MAX_SPEC_BYTES), origin=uri), origin=uri, try_model=try_model)
    p = Path(path)
    return parse_spec(read_yaml_file(p), origin=str(p), try_model=try_model)


def _read_s3(uri: str, max_bytes: int) -> bytes:
    """At most `max_bytes` of an S3 object (SpecError beyond that, or when it cannot be read)."""
    from daybreak.infra.errors import redact
    from daybreak.infra.store import StorageOptions

    try:
        with StorageOptions.from_env().s3_filesystem().open_input_stream(uri.removeprefix("s3://")) as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {uri}") from None
    except OSError as e:
        raise SpecError(f"{uri}: cannot read: {redact(e)}") from None
    if len(data) > max_bytes:
        raise SpecError(f"{uri}: larger than the {max_bytes}-byte limit for a spec")
    return bytes(data)


DURATION_FIELDS = ("windows", "max_delay", "tolerance", "known_at")


def field_path(loc: tuple[Any, ...]) -> str:
    """A validation location as the YAML reads: ``features.windows[0].windows[1]``; ``spec`` for
    the whole."""
    out = ""
    for x in loc:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out or "spec"


def error_lines(e: ValidationError) -> list[str]:
    """One line per field and problem. Items of one list failing the same way share a line
    (``windows: [5, 20]`` is one mistake, not two), and a number where a duration is expected
    says what a duration looks like."""
    grouped: dict[tuple[str, str], list[tuple[str, Any]]] = {}
    for err in e.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        named = [x for x in loc if isinstance(x, str)]
        if err["type"] == "string_type" and named and named[-1] in DURATION_FIELDS \
                and isinstance(err.get("input"), int | float):
            msg = "a duration is text such as '7d', '2h' or '30m' (a time span, not a count of rows)"
        item = loc[-1] if loc and isinstance(loc[-1], int) else None
        parent = field_path(loc[:-1] if item is not None else loc)
        grouped.setdefault((parent, msg), []).append(("" if item is None else f"[{item}]", err.get("input")))
    lines = []
    for (parent, msg), items in grouped.items():
        where = parent + ", ".join(i for i, _ in items) if any(i for i, _ in items) else parent
        got = [v for i, v in items if i and isinstance(v, int | float | str) and not isinstance(v, bool)]
        named_inside = where == "spec" and re.match(r"^[a-z_]+(\.|\[)[\w.\[\]]*: ", msg)
        shown = "" if not (got and "duration is text" in msg) else f" (got {', '.join(repr(v) for v in got)})"
        lines.append((msg if named_inside else f"{where}: {msg}") + shown)
    return lines


def parse_spec(raw: Any, origin: str = "<spec>", *, try_model: bool = True) -> Spec:
    if not isinstance(raw, dict):
        raise SpecError(f"{origin}: a spec must be a mapping at the top level")
    try:
        spec = Spec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{origin}: invalid spec\n" + "\n".join(f"  {line}" for line in error_lines(e))) from None
    try:
        if try_model:
            check_model(spec)
    except SpecError as e:
        raise SpecError(f"{origin}: invalid spec\n  {e}") from None
    return spec
