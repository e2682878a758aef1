"""Stage: landing files for one logical date -> a validated, atomically published Parquet partition.

Every source of the spec is read and checked before anything is published:

* a file that cannot be read as its format, or lacks contract columns, is quarantined whole;
* rows that break a rule (type, ragged line, not-null, NaN/inf, range, allowed values, unique
  key, logical date) get a reason each and go to ``quarantine/`` unless the rule's severity is
  ``warn`` (kept, reported) or ``block`` (the step fails);
* column-level rules (null fraction) and row-count bounds block.

The quarantine policy (``max_bad_row_fraction``, ``max_bad_files``) then decides whether the good
rows are published or the step fails. A failed step publishes nothing; what it quarantined stays
for inspection, and the error names it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from daybreak.context import RunContext
from daybreak.errors import ContractError, MissingInputError
from daybreak.spec import ColumnSpec, SourceSpec, Spec
from daybreak.store import ROW_GROUP_ROWS, sha256_file

log = logging.getLogger(__name__)

_OFFSET = re.compile(r"(Z|[+-]\d{2}:?\d{2})$")
_FILE, _ROW, _RAW = "__file", "__row", "__raw__"


def arrow_type(name: str) -> pa.DataType:
    if name.startswith("timestamp["):
        unit, _, tz = name[len("timestamp["):-1].partition(",")
        return pa.timestamp(unit.strip(), tz=tz.strip() or None)
    return {"string": pa.string(), "date32": pa.date32(), "bool": pa.bool_()}.get(name) or pa.type_for_alias(name)


def contract_schema(src: SourceSpec) -> pa.Schema:
    return pa.schema([(c, arrow_type(spec.type)) for c, spec in src.columns.items()])


def schema_hash(src: SourceSpec) -> str:
    return hashlib.sha256(str(contract_schema(src)).encode()).hexdigest()[:16]


class FileProblem(Exception):
    """A file that cannot be staged at all (unreadable, empty, missing contract columns)."""


@dataclass
class FileRead:
    name: str
    path: str
    digest: str
    table: pa.Table | None = None  # typed contract columns + __file/__row
    type_reasons: pa.ChunkedArray | None = None  # per row, or null
    ragged: list[dict[str, Any]] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    problem: str | None = None
    data: bytes = b""


# --- reading ---------------------------------------------------------------------------------

def _csv_opts(src: SourceSpec, types: dict[str, pa.DataType], ragged: list[dict[str, Any]]):
    def on_invalid(row: Any) -> str:
        # pyarrow decodes the row's text for us; bytes not in the encoding must not raise in here
        try:
            text = (row.text or "")[:2000]
        except UnicodeDecodeError:
            text = f"(not {src.encoding} text)"
        ragged.append({"line": row.number, "text": text,
                       "reason": f"ragged: expected {row.expected_columns} fields, got {row.actual_columns}"})
        return "skip"

    return dict(
        read_options=pacsv.ReadOptions(encoding=src.encoding),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=src.null_values,
                                             strings_can_be_null=True, quoted_strings_can_be_null=True),
    )


def _read_csv(data: bytes, src: SourceSpec) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Typed read first (the fast path); if some value does not convert, read all columns as text
    so the bad values can be found row by row."""
    if _blank(data):
        raise FileProblem("empty file")
    ragged: list[dict[str, Any]] = []
    try:
        return pacsv.read_csv(io.BytesIO(data), **_csv_opts(src, dict(zip(contract_schema(src).names,
                                                                          contract_schema(src).types)), ragged)), ragged
    except pa.ArrowInvalid as e:
        if "conversion error" not in str(e).lower():
            raise FileProblem(_describe(e, src)) from None
    ragged = []
    try:
        first = data.split(b"\n", 1)[0].decode(src.encoding).strip("\r")
    except (UnicodeDecodeError, LookupError) as e:
        raise FileProblem(f"not valid {src.encoding} text (set the source's 'encoding'): {e}") from None
    names = next(csv.reader([first]))
    try:
        table = pacsv.read_csv(io.BytesIO(data), **_csv_opts(src, {n: pa.string() for n in names}, ragged))
    except pa.ArrowInvalid as e:
        raise FileProblem(_describe(e, src)) from None
    return table, ragged


def _blank(data: bytes) -> bool:
    return not data[:4096].strip() and not data.strip()


def _describe(e: Exception, src: SourceSpec) -> str:
    msg = str(e).strip().splitlines()[0]
    if "utf8" in msg.lower() or "utf-8" in msg.lower():
        return f"not valid {src.encoding} text (set the source's 'encoding'): {msg}"
    if "empty" in msg.lower():
        return "empty file"
    return msg


def _read_file(data: bytes, src: SourceSpec) -> tuple[pa.Table, list[dict[str, Any]]]:
    if src.format == "csv":
        return _read_csv(data, src)
    if _blank(data):
        raise FileProblem("empty file")
    try:
        if src.format == "parquet":
            table = pq.read_table(pa.BufferReader(data))
        else:
            table = pajson.read_json(io.BytesIO(data))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise FileProblem(f"cannot be read as {src.format}: {str(e).splitlines()[0]}") from None
    return table, []


# --- types -----------------------------------------------------------------------------------

def _convert(col: pa.ChunkedArray, name: str, cs: ColumnSpec, tz: str | None) -> tuple[pa.Array, np.ndarray, str]:
    """Cast a column to its contract type. Returns values, a mask of values that did not convert,
    and the reason text for them."""
    import pandas as pd

    target = arrow_type(cs.type)
    if col.type == target:
        return col.combine_chunks(), np.zeros(len(col), bool), ""
    try:
        return pc.cast(col, target, safe=True).combine_chunks(), np.zeros(len(col), bool), ""
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    text = pc.cast(col, pa.string()).to_pandas()
    present = text.notna().to_numpy()
    reason = f"type: {name} is not {cs.type}"
    if pa.types.is_integer(target) or pa.types.is_floating(target):
        num = pd.to_numeric(text, errors="coerce")
        ok = num.notna().to_numpy() | ~present
        if pa.types.is_integer(target):
            integral = np.isfinite(num.to_numpy(dtype=float, na_value=np.nan)) & (num.fillna(0) % 1 == 0).to_numpy()
            ok &= integral | ~present
            values = pa.array(num.where(ok & present).astype("Int64"), type=target)
        else:
            values = pa.array(num.where(ok & present).astype(float), type=target, from_pandas=True)
        return values, ~ok, reason
    if pa.types.is_boolean(target):
        mapping = {"true": True, "t": True, "1": True, "yes": True, "false": False, "f": False, "0": False, "no": False}
        mapped = text.str.strip().str.lower().map(mapping)
        ok = mapped.notna().to_numpy() | ~present
        return pa.array(mapped.where(ok), type=target, from_pandas=True), ~ok, reason
    if pa.types.is_timestamp(target):
        stripped = text.str.strip()
        has_offset = stripped.str.contains(_OFFSET, na=False).to_numpy()
        parsed = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns, UTC]")
        if has_offset.any():
            parsed[has_offset] = pd.to_datetime(stripped[has_offset], utc=True, errors="coerce", format="ISO8601")
        naive = present & ~has_offset
        if naive.any() and target.tz is not None:
            if tz is None:
                bad = ~(parsed.notna().to_numpy() | ~present)
                return (pa.array(parsed.dt.tz_convert(target.tz), type=target, from_pandas=True), bad,
                        f"type: {name} has a timestamp without a time zone (declare event_time.timezone)")
            local = pd.to_datetime(stripped[naive], errors="coerce", format="ISO8601")
            parsed[naive] = local.dt.tz_localize(tz, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC")
        elif naive.any():
            parsed[naive] = pd.to_datetime(stripped[naive], errors="coerce", format="ISO8601").dt.tz_localize("UTC")
        ok = parsed.notna().to_numpy() | ~present
        out = parsed.dt.tz_convert(target.tz) if target.tz else parsed.dt.tz_localize(None)
        return pa.array(out, type=target, from_pandas=True), ~ok, reason
    if target == pa.date32():
        parsed = pd.to_datetime(text, errors="coerce", format="ISO8601")
        ok = parsed.notna().to_numpy() | ~present
        return pa.array(parsed.dt.date, type=target, from_pandas=True), ~ok, reason
    return pc.cast(col, pa.string()).combine_chunks(), np.zeros(len(col), bool), ""


def _load(fr: FileRead, src: SourceSpec) -> None:
    """Read one file into typed contract columns, recording per-row type failures."""
    if src.format in ("csv", "jsonl") and not fr.data.isascii():
        try:  # before pyarrow parses it: its row handlers cannot report bytes outside the encoding
            fr.data.decode(src.encoding)
        except (UnicodeDecodeError, LookupError) as e:
            raise FileProblem(f"not valid {src.encoding} text: {e}") from None
    table, ragged = _read_file(fr.data, src)
    fr.ragged = ragged
    missing = [c for c in src.columns if c not in table.column_names]
    if missing:
        raise FileProblem(f"missing column(s) required by the contract: {missing}")
    fr.extra = [c for c in table.column_names if c not in src.columns]
    if fr.extra and src.extra_columns == "block":
        raise FileProblem(f"column(s) not in the contract: {fr.extra} (sources.*.extra_columns is 'block')")
    tz = src.event_time.timezone if src.event_time else None
    cols, reasons, raw = {}, [], {}
    for name, cs in src.columns.items():
        values, bad, reason = _convert(table.column(name), name, cs, tz)
        cols[name] = values
        if bad.any():
            reasons.append(pa.array(np.where(bad, reason, None), pa.string()))
            raw[f"{_RAW}{name}"] = pc.cast(table.column(name), pa.string())  # what the file said
    n = table.num_rows
    out = pa.table(cols, schema=contract_schema(src))
    out = out.append_column(_FILE, pa.repeat(pa.scalar(fr.name), n)).append_column(_ROW, pa.array(np.arange(n)))
    for k, v in raw.items():
        out = out.append_column(k, v)
    fr.table = out
    if reasons:
        fr.type_reasons = _join_reasons(reasons, n)


def _join_reasons(reasons: list[pa.Array | pa.ChunkedArray], n: int) -> pa.ChunkedArray:
    """Per row, the non-null reasons joined with '; ' (null where there is none).

    Done on object arrays: pyarrow 25's binary_join_element_wise with null_handling='skip'
    drops rows that are null in every input instead of returning null for them.
    """
    import pandas as pd

    out = np.full(n, None, dtype=object)
    for r in reasons:
        arr = (r.combine_chunks() if isinstance(r, pa.ChunkedArray) else r).to_numpy(zero_copy_only=False)
        has_new = pd.notna(arr)
        has_old = pd.notna(out)
        both = has_new & has_old
        if both.any():
            out[both] = out[both] + "; " + arr[both]
        only = has_new & ~has_old
        out[only] = arr[only]
    return pa.chunked_array([pa.array(out, pa.string())])


# --- rules -----------------------------------------------------------------------------------

def _rule_reasons(table: pa.Table, src: SourceSpec, day: Any) -> dict[str, pa.Array]:
    """Per row rule -> reason (null where the row passes), for rules that hold row by row."""
    out: dict[str, list[pa.Array]] = {}

    def add(rule: str, mask: Any, text: Callable[[], Any]) -> None:
        # texts are built only for rules that some row breaks: the common case costs one mask
        mask = pc.fill_null(mask, False)
        if pc.any(mask).as_py():
            out.setdefault(rule, []).append(pc.if_else(mask, text(), pa.scalar(None, pa.string())))

    def joined(prefix: str, col: Any, suffix: str) -> Callable[[], Any]:
        return lambda: pc.binary_join_element_wise(prefix, pc.cast(col, pa.string()), suffix, "")

    for name, cs in src.columns.items():
        col = table.column(name)
        if not cs.nullable and col.null_count:
            add("not_null", pc.is_null(col), lambda name=name: pa.scalar(f"not_null: {name} is null"))
        if pa.types.is_floating(col.type) and not cs.allow_nonfinite:
            add("finite", pc.or_(pc.is_nan(col), pc.is_inf(col)),
                lambda name=name: pa.scalar(f"finite: {name} is NaN or infinite"))
        if cs.min is not None:
            add("range", pc.less(col, cs.min), joined(f"range: {name}=", col, f" < min {cs.min:g}"))
        if cs.max is not None:
            add("range", pc.greater(col, cs.max), joined(f"range: {name}=", col, f" > max {cs.max:g}"))
        if cs.allowed is not None:
            allowed = pa.array(cs.allowed).cast(col.type)
            # a null is not a value outside the set: `nullable` decides about nulls
            add("allowed", pc.and_(pc.invert(pc.is_in(col, value_set=allowed)), pc.is_valid(col)),
                joined(f"allowed: {name}=", col, " is not allowed"))
    if src.unique:
        # the first row of each key is kept; every later one is a duplicate (rows with a null key part are not)
        dup, has_null = _duplicates(table, src.unique)
        add("unique", pa.array(dup & ~has_null), lambda: pa.scalar(f"unique: duplicate key {src.unique}"))
    if src.event_time is not None:
        et = src.event_time
        zone = et.date_timezone or et.timezone or "UTC"
        ts = table.column(et.column)
        local_day = pc.cast(ts.cast(pa.timestamp(ts.type.unit, tz=zone)), pa.date32())
        add("date", pc.not_equal(local_day, pa.scalar(day, pa.date32())),
            joined(f"date: {et.column}=", ts, f" is not on {day.isoformat()} ({zone})"))
    return {rule: _join_reasons(parts, table.num_rows) for rule, parts in out.items()}


def _duplicates(table: pa.Table, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose key already appeared earlier, and rows with a null key part.

    Each key column is dictionary-encoded and the codes are packed into one int64 (hash-based
    duplicate detection on one integer column is several times faster than grouping on many)."""
    import pandas as pd

    n = table.num_rows
    packed = np.zeros(n, dtype=np.int64)
    has_null = np.zeros(n, dtype=bool)
    span = 1
    for c in keys:
        col = table.column(c)
        lo_hi = pc.min_max(col).as_py() if pa.types.is_integer(col.type) else None
        if lo_hi and lo_hi["min"] is not None and lo_hi["max"] - lo_hi["min"] < 1 << 24:
            codes = pc.subtract(col, lo_hi["min"]).to_numpy()  # small integer ranges need no dictionary
            card = lo_hi["max"] - lo_hi["min"] + 2
        else:
            enc = pc.dictionary_encode(col).combine_chunks()
            codes = enc.indices.to_numpy(zero_copy_only=False)
            card = len(enc.dictionary) + 1
        nulls = pd.isna(codes)
        has_null |= nulls
        if span * card >= 2**62:  # too many combinations to pack: fall back to grouping
            frame = table.select(keys).to_pandas()
            return frame.duplicated(keep="first").to_numpy(), frame.isna().any(axis=1).to_numpy()
        packed = packed * card + np.where(nulls, 0, codes + 1).astype(np.int64)
        span *= card
    return pd.Series(packed).duplicated(keep="first").to_numpy(), has_null


# --- the step --------------------------------------------------------------------------------

@dataclass
class Prepared:
    name: str
    src: SourceSpec
    result: dict[str, Any] | None = None  # set when the published partition is kept as is
    good: pa.Table | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    pending: Any = None  # a run already written while the rules were checked
    written: Any = None  # its future

    def discard(self, ctx: RunContext) -> None:
        if self.pending is not None:
            try:
                self.written.result()
            except Exception:
                pass
            ctx.store.abort(self.pending)
            self.pending = None


def _write_parquet(table: pa.Table, fs: pafs.FileSystem, folder: str) -> None:
    pq.write_table(table, posixpath.join(folder, "part-0.parquet"), filesystem=fs, compression="zstd",
                   row_group_size=ROW_GROUP_ROWS)


_WRITER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="daybreak-stage")


def _lineage(src: SourceSpec, digests: dict[str, str], day: Any) -> str:
    blob = json.dumps({"contract": src.model_dump(mode="json"), "inputs": digests, "date": day.isoformat()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _find(name: str, src: SourceSpec, ctx: RunContext) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    pattern = src.path.replace("{date}", ctx.logical_date.isoformat())
    fs, infos = ctx.store.glob(pattern)
    if not infos:
        _, where = ctx.store.resolve(pattern)
        raise MissingInputError(f"source {name!r}: no landing file for {ctx.logical_date} at {where}")
    return fs, infos


def _prepare(name: str, src: SourceSpec, ctx: RunContext) -> Prepared:
    day = ctx.logical_date
    fs, infos = _find(name, src, ctx)
    if src.format == "files":
        return _prepare_files(name, src, ctx, fs, infos)
    reads = []
    for info in infos:
        with fs.open_input_stream(info.path) as f:
            data = f.read()
        reads.append(FileRead(info.base_name, info.path, hashlib.sha256(data).hexdigest(), data=data))
    digests = {r.name: r.digest for r in reads}
    lineage_key = _lineage(src, digests, day)
    current = ctx.store.partition(f"staged/{name}", day)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        log.info("staged %s %s: unchanged inputs, keeping the published partition", name, day)
        return Prepared(name, src, result=_result(current, skipped=True))

    bad_files: list[dict[str, str]] = []
    for r in reads:
        try:
            _load(r, src)
        except FileProblem as e:
            r.problem = str(e)
            bad_files.append({"file": r.name, "reason": str(e)})
        r.data = r.data if r.problem else b""
    good_reads = [r for r in reads if r.table is not None]
    schema = contract_schema(src).append(pa.field(_FILE, pa.string())).append(pa.field(_ROW, pa.int64()))
    table = (pa.concat_tables([r.table for r in good_reads], promote_options="default") if good_reads
             else schema.empty_table())
    n = table.num_rows
    # Most drops are clean: write them while the rules run (pyarrow releases the GIL) into a run
    # nothing points at yet. The run is discarded if any row or rule says otherwise.
    spec_run = None
    if n and not bad_files and all(r.type_reasons is None and not r.ragged for r in good_reads):
        spec_run = Prepared(name, src)
        spec_run.pending = ctx.store.begin(f"staged/{name}", day, run=ctx.run_id)
        spec_run.written = _WRITER.submit(_write_parquet, table.select(list(src.columns)), ctx.store.fs,
                                          spec_run.pending.folder)
    try:
        return _decide(name, src, ctx, day, reads, good_reads, table, n, bad_files, digests, lineage_key, spec_run)
    except BaseException:
        if spec_run is not None:
            spec_run.discard(ctx)
        raise


def _decide(name: str, src: SourceSpec, ctx: RunContext, day: Any, reads: list[FileRead], good_reads: list[FileRead],
            table: pa.Table, n: int, bad_files: list[dict[str, str]], digests: dict[str, str], lineage_key: str,
            spec_run: Prepared | None) -> Prepared:
    rule_reasons = _rule_reasons(table, src, day) if n else {}
    type_reasons = pa.chunked_array(
        [c for r in good_reads for c in (r.type_reasons.chunks if r.type_reasons is not None
                                         else [pa.nulls(r.table.num_rows, pa.string())])], type=pa.string())
    if n and pc.any(pc.is_valid(type_reasons)).as_py():
        rule_reasons = {"type": type_reasons, **rule_reasons}
    ragged = [{**r, "file": f.name} for f in good_reads for r in f.ragged]

    blocking, warnings, quarantine_parts, quarantined = [], [], [], []
    for rule, reasons in rule_reasons.items():
        count = pc.sum(pc.is_valid(reasons)).as_py() or 0
        if not count:
            continue
        sev = src.severity_of(rule)
        example = pc.drop_null(reasons)[0].as_py()
        if sev == "block":
            blocking.append(f"{rule}: {count} row(s), e.g. {example!r}")
        elif sev == "warn":
            warnings.append(f"{rule}: {count} row(s) kept, e.g. {example!r}")
        else:
            quarantine_parts.append(reasons)
            quarantined.append((count, f"{rule}: {count} row(s), e.g. {example!r}"))
    if ragged:
        sev = src.severity_of("ragged")
        if sev == "block":
            blocking.append(f"ragged: {len(ragged)} line(s), e.g. {ragged[0]['reason']}")
        elif sev == "warn":
            warnings.append(f"ragged: {len(ragged)} line(s) dropped, e.g. {ragged[0]['reason']}")
    for r in good_reads:
        if r.extra:
            warnings.append(f"{r.name}: column(s) not in the contract dropped: {r.extra}")

    reasons = _join_reasons(quarantine_parts, n) if quarantine_parts else None
    bad_mask = pc.is_valid(reasons) if reasons is not None else pa.chunked_array([pa.repeat(False, n)], pa.bool_())
    n_bad = (pc.sum(bad_mask).as_py() or 0) + (len(ragged) if src.severity_of("ragged") == "quarantine" else 0)
    rows_in = n + len(ragged)
    good = table.filter(pc.invert(bad_mask)) if pc.any(bad_mask).as_py() else table

    for cname, cs in src.columns.items():
        if cs.max_null_fraction is not None and good.num_rows:
            frac = good.column(cname).null_count / good.num_rows
            if frac > cs.max_null_fraction:
                blocking.append(f"null_fraction: {cname} is null in {frac:.0%} of rows > max_null_fraction "
                                f"{cs.max_null_fraction:.0%}")
    if rows_in < src.rows.min:
        blocking.append(f"row_count: {rows_in} rows < rows.min {src.rows.min}")
    if src.rows.max is not None and rows_in > src.rows.max:
        blocking.append(f"row_count: {rows_in} rows > rows.max {src.rows.max}")
    if len(bad_files) > src.quarantine.max_bad_files:
        blocking.append(f"{len(bad_files)} unreadable file(s) > quarantine.max_bad_files "
                        f"{src.quarantine.max_bad_files}: " + "; ".join(f"{b['file']}: {b['reason']}" for b in bad_files))
    frac = n_bad / rows_in if rows_in else 0.0
    if frac > src.quarantine.max_bad_row_fraction:
        why = [text for _, text in sorted(quarantined, key=lambda c: -c[0])[:3]]
        if ragged and src.severity_of("ragged") == "quarantine":
            why.append(f"ragged: {len(ragged)} line(s), e.g. {ragged[0]['reason']}")
        blocking.append(f"{n_bad} of {rows_in} rows ({frac:.1%}) broke the contract > quarantine.max_bad_row_fraction "
                        f"{src.quarantine.max_bad_row_fraction:.1%}" + (f" ({'; '.join(why)})" if why else ""))

    q_uri = None
    if n_bad or bad_files or blocking:
        q_uri = _write_quarantine(name, ctx, table, reasons, ragged, [r for r in reads if r.problem],
                                  {"blocking": blocking, "warnings": warnings, "bad_files": bad_files})
    if blocking:
        where = f"; quarantined to {q_uri}" if q_uri else ""
        raise ContractError(f"source {name!r} {day}: nothing published: " + " | ".join(blocking) + where)

    published = good.select(list(src.columns))
    if spec_run is not None and good is not table:  # rows were quarantined: the speculative run is wrong
        spec_run.discard(ctx)
        spec_run = None
    manifest = {
        "source": name, "date": day.isoformat(), "rows": published.num_rows, "rows_in": rows_in,
        "rows_quarantined": n_bad, "files_quarantined": len(bad_files), "inputs": digests,
        "lineage_key": lineage_key, "run_id": ctx.run_id, "schema_hash": schema_hash(src),
        "schema": {f.name: str(f.type) for f in published.schema}, "warnings": warnings,
        "quarantine_uri": q_uri,
    }
    if spec_run is not None:
        spec_run.good, spec_run.manifest = published, manifest
        return spec_run
    return Prepared(name, src, good=published, manifest=manifest)


def _write_quarantine(name: str, ctx: RunContext, table: pa.Table, reasons: Any, ragged: list[dict[str, Any]],
                      bad_files: list[FileRead], summary: dict[str, Any]) -> str:
    store = ctx.store
    base = store.path("quarantine", name, f"date={ctx.logical_date.isoformat()}", f"run={ctx.run_id}")
    store.fs.create_dir(base, recursive=True)
    rows = []
    if reasons is not None:
        bad = table.filter(pc.is_valid(reasons))

        def text(c: str) -> Any:
            typed = pc.cast(bad.column(c), pa.string())
            return pc.coalesce(bad.column(_RAW + c), typed) if _RAW + c in bad.column_names else typed

        rows.append(pa.table({
            **{c: text(c) for c in bad.column_names if not c.startswith("__")},
            "_file": bad.column(_FILE), "_row": bad.column(_ROW),
            "_reason": pc.drop_null(reasons), "_raw": pa.nulls(bad.num_rows, pa.string()),
        }))
    if ragged:
        n = len(ragged)
        cols = {c: pa.nulls(n, pa.string()) for c in table.column_names if not c.startswith("__")}
        rows.append(pa.table({**cols, "_file": [r["file"] for r in ragged],
                              "_row": pa.array([r["line"] for r in ragged], pa.int64()),
                              "_reason": [r["reason"] for r in ragged], "_raw": [r["text"] for r in ragged]}))
    if rows:
        pq.write_table(pa.concat_tables(rows), posixpath.join(base, "rows.parquet"), filesystem=store.fs)
    for f in bad_files:
        store.fs.create_dir(posixpath.join(base, "files"), recursive=True)
        with store.fs.open_output_stream(posixpath.join(base, "files", f.name)) as out:
            out.write(f.data)
    counts = {}
    if reasons is not None:
        for r in pc.drop_null(reasons).to_pylist():
            for part in r.split("; "):
                key = part.split(":", 1)[0]
                counts[key] = counts.get(key, 0) + 1
    if ragged:
        counts["ragged"] = len(ragged)
    with store.fs.open_output_stream(posixpath.join(base, "_quarantine.json")) as out:
        out.write(json.dumps({"source": name, "date": ctx.logical_date.isoformat(), "run_id": ctx.run_id,
                              "rows_by_rule": counts, **summary}, indent=2, default=str).encode())
    uri = store.uri(base)
    log.warning("staged %s %s: quarantined %s", name, ctx.logical_date, uri)
    return uri


def _prepare_files(name: str, src: SourceSpec, ctx: RunContext, fs: pafs.FileSystem,
                   infos: list[pafs.FileInfo]) -> Prepared:
    """A manifest of the files themselves (for images and other unstructured data)."""
    checksums = _file_checksums(ctx, fs, infos)
    rows = []
    for i in infos:
        checksum = checksums[i.path]
        uri = f"s3://{i.path}" if isinstance(fs, pafs.S3FileSystem) else i.path
        rows.append({"uri": uri, "name": i.base_name, "size": i.size, "last_modified": i.mtime, "checksum": checksum})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("uri", pa.string()), ("name", pa.string()), ("size", pa.int64()),
        ("last_modified", pa.timestamp("ns", tz="UTC")), ("checksum", pa.string())]))
    digests = {r["name"]: r["checksum"] for r in rows}
    lineage_key = _lineage(src, digests, ctx.logical_date)
    current = ctx.store.partition(f"staged/{name}", ctx.logical_date)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        return Prepared(name, src, result=_result(current, skipped=True))
    manifest = {"source": name, "date": ctx.logical_date.isoformat(), "rows": table.num_rows, "rows_in": table.num_rows,
                "rows_quarantined": 0, "files_quarantined": 0, "inputs": digests, "lineage_key": lineage_key,
                "run_id": ctx.run_id, "schema_hash": hashlib.sha256(str(table.schema).encode()).hexdigest()[:16],
                "schema": {f.name: str(f.type) for f in table.schema}, "warnings": [], "quarantine_uri": None}
    return Prepared(name, src, good=table, manifest=manifest)


def _file_checksums(ctx: RunContext, fs: pafs.FileSystem, infos: list[pafs.FileInfo]) -> dict[str, str]:
    """A ``format: files`` source's checksums: S3 ETags (no download), else SHA-256."""
    etags = _s3_etags(ctx, infos) if isinstance(fs, pafs.S3FileSystem) else {}
    return {i.path: etags.get(i.path) or f"sha256:{sha256_file(i.path, fs)}" for i in infos}


def _s3_etags(ctx: RunContext, infos: list[pafs.FileInfo]) -> dict[str, str]:
    client = ctx.store.options.boto3_client()
    out = {}
    for i in infos:
        bucket, _, key = i.path.partition("/")
        out[i.path] = "etag:" + client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    return out


def _publish(p: Prepared, ctx: RunContext) -> dict[str, Any]:
    if p.result is not None:
        return p.result
    table = p.good
    if p.pending is not None:
        try:
            p.written.result()
        except BaseException:
            ctx.store.abort(p.pending)
            raise
        part = ctx.store.commit(p.pending, p.manifest)
        log.info("staged %s %s: %d rows -> %s", p.name, ctx.logical_date, table.num_rows, part.uri)
        return _result(part, skipped=False)

    def write(fs: pafs.FileSystem, folder: str) -> dict[str, Any]:
        _write_parquet(table, fs, folder)
        return p.manifest

    part = ctx.store.publish(f"staged/{p.name}", ctx.logical_date, write, run=ctx.run_id)
    log.info("staged %s %s: %d rows -> %s", p.name, ctx.logical_date, table.num_rows, part.uri)
    return _result(part, skipped=False)


def _result(part: Any, skipped: bool) -> dict[str, Any]:
    m = part.manifest
    return {
        "uri": part.uri,
        "rows": m["rows"],
        "rows_in": m.get("rows_in", m["rows"]),
        "rows_published": m["rows"],
        "rows_quarantined": m.get("rows_quarantined", 0),
        "files_quarantined": m.get("files_quarantined", 0),
        "quarantine_uri": m.get("quarantine_uri"),
        "warnings": m.get("warnings", []),
        "input_hash": hashlib.sha256(json.dumps(m["inputs"], sort_keys=True).encode()).hexdigest()[:16],
        "content_hash": m["content_hash"][:16],
        "schema_hash": m.get("schema_hash"),
        "lineage_key": m["lineage_key"],
        "skipped": skipped,
    }


def stage(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Stage every source of the spec for ``ctx.logical_date``.

    All sources are read and checked before any is published, so a contract breach in one
    source publishes nothing for that date.
    """
    prepared: list[Prepared] = []
    try:
        for name, src in spec.sources.items():
            prepared.append(_prepare(name, src, ctx))
    except BaseException:
        for p in prepared:  # runs written ahead for sources that passed: nothing points at them
            p.discard(ctx)
        raise
    results = {p.name: _publish(p, ctx) for p in prepared}
    base = results.get(spec.features.base)
    return {
        "step": "stage",
        "date": ctx.logical_date.isoformat(),
        "rows": base["rows"] if base else sum(r["rows"] for r in results.values()),
        "rows_in": sum(r["rows_in"] for r in results.values()),
        "rows_quarantined": sum(r["rows_quarantined"] for r in results.values()),
        "sources": results,
    }


def file_urls(spec: Spec, ctx: RunContext, source: str, expires_in: int = 3600) -> list[dict[str, Any]]:
    """The staged file manifest of a ``format: files`` source, each file with a presigned URL
    valid for `expires_in` seconds, so readers need no storage credentials."""
    part = ctx.store.partition(f"staged/{source}", ctx.logical_date)
    if part is None:
        raise MissingInputError(f"no staged partition of {source!r} for {ctx.logical_date}")
    rows = pa.concat_tables([pq.read_table(f, filesystem=ctx.store.fs) for f in part.files]).to_pylist()
    return [{**r, "url": ctx.store.presigned_url(r["uri"], expires_in)} for r in rows]


def recorded_lineage(spec: Spec, ctx: RunContext) -> dict[str, str] | None:
    """Each source's lineage key, when every source's published partition for the date was made
    from the landing files as they are now; None otherwise (the step has work to do). Reads only
    the checksums of the landing files, and nothing at all when a partition is missing."""
    day = ctx.logical_date
    parts = {name: ctx.store.partition(f"staged/{name}", day) for name in spec.sources}
    if any(p is None for p in parts.values()):
        return None
    keys = {}
    for name, src in spec.sources.items():
        fs, infos = _find(name, src, ctx)
        if src.format == "files":
            checksums = _file_checksums(ctx, fs, infos)
            digests = {i.base_name: checksums[i.path] for i in infos}
        else:
            digests = {i.base_name: sha256_file(i.path, fs) for i in infos}
        key = _lineage(src, digests, day)
        if parts[name].manifest.get("lineage_key") != key:
            return None
        keys[name] = key
    return keys
