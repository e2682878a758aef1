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

Landing files are not trusted (whoever drops them may be an attacker):

* a file whose real path (links resolved, the landing root resolved first) is outside the landing
  root is refused unread: a link out of it, or a file in a linked folder out of it. The root is
  the store zone the source's path starts in (``landing/``), or for an absolute path the folder it
  names before the first part that varies. S3 has no links;
* files are streamed, never held whole: hashed in one pass (the lineage key needs every digest
  before anything is parsed), then parsed from a second stream that is hashed again, so what was
  parsed is what was hashed. A file over the source's ``max_file_bytes`` is refused unread (its
  size is checked before reading and the stream is cut off at the limit);
* Parquet compresses without bound (a few MB of constants can be billions of rows), so for
  Parquet the limit applies to the uncompressed data too: the footer's row count and column
  sizes are checked against ``max_file_bytes`` before any data is read, and the data is then read
  batch by batch against a budget of twice the limit in Arrow bytes (a footer can lie), refusing
  the file with a reason naming the sizes instead of running out of memory;
* anything wrong with one file (duplicate column names, a ``MemoryError`` or ``OSError`` while
  reading it) is that file's problem: quarantined with a reason, never a traceback;
* the quarantine is private on a local store: folders 0700, files 0600. Refused files are not
  copied into it.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from daybreak.infra.context import RunContext
from daybreak.infra.errors import ContractError, MissingInputError
from daybreak.infra.store import ROW_GROUP_ROWS, Store
from daybreak.spec import OPERATIONAL, ColumnSpec, SourceSpec, Spec, arrow_type

log = logging.getLogger(__name__)

# Non-capturing: Series.str.contains warns (UserWarning, every call) on a pattern with match groups.
_OFFSET = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")
_FILE, _ROW, _RAW = "__file", "__row", "__raw__"


def contract_schema(src: SourceSpec) -> pa.Schema:
    return pa.schema([(c, arrow_type(spec.type)) for c, spec in src.columns.items()])


def schema_hash(src: SourceSpec) -> str:
    return hashlib.sha256(str(contract_schema(src)).encode()).hexdigest()[:16]


class FileProblem(Exception):
    """A file that cannot be staged at all (unreadable, empty, missing contract columns)."""


class Refused(FileProblem):
    """A file staging will not read at all (a link out of the landing root, too large): its bytes
    are never parsed nor copied into the quarantine."""


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
    source: Landing | None = None  # where to read it again (None: refused, never read again)
    size: int = 0
    mtime_ns: int | None = None
    blank: bool = False  # nothing but whitespace
    text_error: str | None = None  # not text in the source's encoding


# --- landing files: confined, streamed, bounded ------------------------------------------------

_CHUNK = 1 << 20
_VARIES = re.compile(r"[{}*?\[]")


def landing_root(store: Store, spec_path: str) -> str | None:
    """The resolved folder a source's landing files must really be in; None where there are no
    links (S3).

    A path relative to the store is confined to the zone it starts in (``landing/...`` ->
    ``<store>/landing``), whatever links the zone or the store root themselves are; an absolute
    path to the folder it names before the first part that varies (``{date}`` or a wildcard).
    """
    fs, full = store.resolve(spec_path)
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    if os.path.isabs(os.path.expanduser(spec_path)):
        parts = full.split("/")[:-1]
        static: list[str] = []
        for part in parts:
            if _VARIES.search(part):
                break
            static.append(part)
        folder = "/".join(static) or "/"
    else:
        rel = spec_path.split("/")
        zone = rel[0] if len(rel) > 1 and not _VARIES.search(rel[0]) else ""
        folder = store.path(zone) if zone else store.base
    return os.path.realpath(folder)


def _inside(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def _too_large(size: int, limit: int) -> Refused:
    return Refused(f"{size} bytes > the source's max_file_bytes {limit}: refused, not read")


@dataclass(frozen=True)
class Landing:
    """One landing file and how it may be opened."""

    fs: pafs.FileSystem
    path: str
    root: str | None  # the resolved landing root (local), None on S3
    limit: int
    size_hint: int | None = None  # from the listing (S3)

    def open(self) -> tuple[BinaryIO, os.stat_result | None]:
        """Open for reading, refusing what is out of the root, not a regular file or too large.

        Locally the real path is checked before opening, and the file actually opened (by its
        descriptor) after: a link swapped in between is caught too."""
        if self.root is None:
            if self.size_hint is not None and self.size_hint > self.limit:
                raise _too_large(self.size_hint, self.limit)
            return self.fs.open_input_stream(self.path), None
        out_of_root = Refused(f"a link resolving outside the landing root {self.root}: refused, not read")
        real = os.path.realpath(self.path)
        if not _inside(real, self.root):
            raise out_of_root
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Refused("not a regular file: refused, not read")
            try:
                opened = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: the check before opening stands
                opened = real
            if not _inside(opened, self.root):
                raise out_of_root
            if st.st_size > self.limit:
                raise _too_large(st.st_size, self.limit)
            return os.fdopen(fd, "rb", buffering=0), st
        except BaseException:
            os.close(fd)
            raise

    @contextmanager
    def stream(self) -> Iterator[_Bounded]:
        raw, _ = self.open()
        try:
            yield _Bounded(raw, self.limit)
        finally:
            raw.close()


class _Bounded(io.RawIOBase):
    """A landing file read front to back: hashes every byte that passes and stops the read once
    more than `limit` bytes came (the file grew, or its size was not known)."""

    def __init__(self, raw: Any, limit: int) -> None:
        super().__init__()
        self.raw, self.limit, self.count, self.sha = raw, limit, 0, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(_CHUNK):
                parts.append(chunk)
            return b"".join(parts)
        data = self.raw.read(min(size, self.limit + 1 - self.count))
        data = bytes(data) if not isinstance(data, bytes) else data
        self.count += len(data)
        if self.count > self.limit:
            raise Refused(f"more than the source's max_file_bytes {self.limit} bytes (it grew while being "
                          "read): refused")
        self.sha.update(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def drain(self) -> str:
        """Read what the parser left and return the digest of the whole stream."""
        while self.read(_CHUNK):
            pass
        return self.sha.hexdigest()


def _transient(e: BaseException, root: str | None) -> bool:
    """An I/O error from an object store (``root`` None) is the network's or the service's, not
    the file's: the step fails and is retried, rather than publishing the day without the file."""
    return root is None and isinstance(e, OSError)


def _unread(name: str, path: str, e: BaseException) -> FileRead:
    """A file that could not be read (or was refused): its digest stands for the reason, so the
    lineage key changes when the file (or the limit) does."""
    reason = str(e) if isinstance(e, FileProblem) else f"could not be read ({type(e).__name__}: {e})"
    fr = FileRead(name, path, f"unread: {reason}", problem=reason)
    log.warning("landing file %s: %s", path, reason)
    return fr


def _scan(fs: pafs.FileSystem, info: pafs.FileInfo, root: str | None, src: SourceSpec,
          check_text: bool = True) -> FileRead:
    """The first pass over one landing file: its SHA-256 (of exactly the bytes a later read
    parses), size, whether it is blank and, for text formats, whether it decodes."""
    landing = Landing(fs, info.path, root, src.max_file_bytes, info.size if root is None else None)
    try:
        raw, st = landing.open()
        try:
            reader = _Bounded(raw, src.max_file_bytes)
            decoder = (codecs.getincrementaldecoder(src.encoding)("strict")
                       if check_text and src.format in ("csv", "jsonl") else None)
            blank, ascii_only, text_error, fed = True, True, None, 0
            while chunk := reader.read(_CHUNK):
                if blank and chunk.strip():
                    blank = False
                if decoder is not None:
                    ascii_only = ascii_only and chunk.isascii()
                    if text_error is None:
                        text_error = _decode(decoder, chunk, fed, src.encoding)
                    fed += len(chunk)
            if decoder is not None and text_error is None:
                text_error = _decode(decoder, b"", fed, src.encoding, final=True)
        finally:
            raw.close()
    except (FileProblem, OSError, MemoryError) as e:
        if _transient(e, root):
            raise
        return _unread(info.base_name, info.path, e)
    return FileRead(info.base_name, info.path, reader.sha.hexdigest(), source=landing, size=reader.count,
                    mtime_ns=st.st_mtime_ns if st is not None else None, blank=blank,
                    text_error=None if ascii_only else text_error)


def _decode(decoder: Any, chunk: bytes, fed: int, encoding: str, final: bool = False) -> str | None:
    """Feed one chunk to an incremental decoder; the error as the whole file's decode says it."""
    pending = len(decoder.getstate()[0])
    try:
        decoder.decode(chunk, final)
        return None
    except UnicodeDecodeError as e:
        start = fed - pending + e.start
        if e.end - e.start == 1 and e.start < len(e.object):
            what = f"byte 0x{e.object[e.start]:02x} in position {start}"
        else:
            what = f"bytes in position {start}-{start + e.end - e.start - 1}"
        return f"not valid {encoding} text: '{e.encoding}' codec can't decode {what}: {e.reason}"


@contextmanager
def _parsing(fr: FileRead) -> Iterator[_Bounded]:
    """The second pass: a fresh stream for the parser, checked against the first pass's digest
    once the parser is done (a file rewritten in between is not staged under the old digest)."""
    assert fr.source is not None
    with fr.source.stream() as reader:
        yield reader
        if reader.drain() != fr.digest:
            raise FileProblem("changed while being staged (its bytes differ from when it was hashed); stage again")


def _duplicated(names: list[str]) -> list[str]:
    seen: set[str] = set()
    dupes: set[str] = set()
    for n in names:
        (dupes if n in seen else seen).add(n)
    return sorted(dupes)


def _check_unique_names(names: list[str]) -> None:
    dups = _duplicated(names)
    if dups:
        raise FileProblem(f"duplicate column name(s): {dups} (which one is meant is ambiguous)")


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

    # use_threads=False: the parser reads a Python stream (the digest-checking _Bounded). When a
    # threaded read fails, arrow's pool can still hold that stream and release it from a worker
    # thread later; if that happens while the interpreter finalizes (a CLI exiting on the error)
    # the worker cannot take the GIL and the process aborts (SIGABRT, "terminate called without
    # an active exception"), seen in about 1 of 40 such exits. The serial reader finishes with
    # the stream before it returns or raises.
    return dict(
        read_options=pacsv.ReadOptions(encoding=src.encoding, use_threads=False),
        parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid, newlines_in_values=False),
        convert_options=pacsv.ConvertOptions(column_types=types, null_values=src.null_values,
                                             strings_can_be_null=True, quoted_strings_can_be_null=True),
    )


def _read_csv(fr: FileRead, src: SourceSpec) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Typed read first (the fast path); if some value does not convert, read all columns as text
    so the bad values can be found row by row."""
    ragged: list[dict[str, Any]] = []
    try:
        with _parsing(fr) as reader:
            schema = contract_schema(src)
            types = dict(zip(schema.names, schema.types, strict=True))
            table = pacsv.read_csv(reader, **_csv_opts(src, types, ragged))
        return table, ragged
    except pa.ArrowInvalid as e:
        if "conversion error" not in str(e).lower():
            raise FileProblem(_describe(e, src)) from None
    ragged = []
    assert fr.source is not None
    with fr.source.stream() as reader:
        head = b""
        while b"\n" not in head and len(head) < 16 * _CHUNK and (chunk := reader.read(64 * 1024)):
            head += chunk
    try:
        first = head.split(b"\n", 1)[0].decode(src.encoding).strip("\r")
    except (UnicodeDecodeError, LookupError) as e:
        raise FileProblem(f"not valid {src.encoding} text (set the source's 'encoding'): {e}") from None
    names = next(csv.reader([first]))
    _check_unique_names(names)
    try:
        with _parsing(fr) as reader:
            table = pacsv.read_csv(reader, **_csv_opts(src, {n: pa.string() for n in names}, ragged))
    except pa.ArrowInvalid as e:
        raise FileProblem(_describe(e, src)) from None
    return table, ragged


def _describe(e: Exception, src: SourceSpec) -> str:
    msg = str(e).strip().splitlines()[0]
    if "utf8" in msg.lower() or "utf-8" in msg.lower():
        return f"not valid {src.encoding} text (set the source's 'encoding'): {msg}"
    if "empty" in msg.lower():
        return "empty file"
    return msg


_JSON_TWICE = re.compile(r"Column\(/(.*)\) was specified twice in row (\d+)")


def _read_file(fr: FileRead, src: SourceSpec) -> tuple[pa.Table, list[dict[str, Any]]]:
    if fr.blank:
        raise FileProblem("empty file")
    if src.format == "csv":
        return _read_csv(fr, src)
    try:
        if src.format == "parquet":
            table = _read_parquet(fr)
        else:
            with _parsing(fr) as reader:
                table = pajson.read_json(reader, read_options=pajson.ReadOptions(use_threads=False))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        twice = _JSON_TWICE.search(str(e))
        if twice:
            raise FileProblem(f"duplicate column name(s): {[twice.group(1)]} (a key given twice in row "
                              f"{twice.group(2)}; which one is meant is ambiguous)") from None
        raise FileProblem(f"cannot be read as {src.format}: {str(e).splitlines()[0]}") from None
    return table, []


PARQUET_BATCH_ROWS = 16 * 1024
"""Rows decoded at a time from a Parquet landing file (the budget is checked after each batch)."""


def _min_row_bytes(t: pa.DataType) -> float:
    """A lower bound of the Arrow bytes one value of type `t` takes once read (values, offsets
    or indices; not the variable-length data, which the footer does not tell)."""
    if pa.types.is_boolean(t):
        return 1 / 8
    if pa.types.is_dictionary(t):
        return _min_row_bytes(t.index_type)
    if pa.types.is_struct(t):
        return sum(_min_row_bytes(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_fixed_size_list(t):
        return t.list_size * _min_row_bytes(t.value_type)
    if (pa.types.is_large_string(t) or pa.types.is_large_binary(t) or pa.types.is_large_list(t)):
        return 8
    if pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_list(t) or pa.types.is_map(t):
        return 4
    try:
        return t.bit_width / 8
    except ValueError:  # variable width of another kind (views, unions): at least nothing known
        return 0


def _parquet_footer_check(pf: pq.ParquetFile, limit: int) -> None:
    """Refuse, before reading any data, a Parquet file whose footer says it holds more than
    `limit` bytes of data: the sum of its column chunks' uncompressed sizes, or its row count
    times the least bytes a row of its columns takes in Arrow."""
    md = pf.metadata
    rows = max(md.num_rows, 0)
    uncompressed = sum(max(md.row_group(i).column(j).total_uncompressed_size, 0)
                       for i in range(md.num_row_groups) for j in range(md.num_columns))
    least = int(rows * sum(_min_row_bytes(f.type) for f in pf.schema_arrow))
    if max(uncompressed, least) > limit:
        raise Refused(f"Parquet data too large: {rows} rows, {uncompressed} bytes uncompressed (at least "
                      f"{least} bytes once read) > the source's max_file_bytes {limit} (for Parquet the limit "
                      "applies to the uncompressed data): refused, not read")


def _read_parquet_bounded(pf: pq.ParquetFile, limit: int) -> pa.Table:
    """Read batch by batch (within row groups), adding up the batches' Arrow bytes against a
    budget of twice `limit`: data the footer understates is stopped there, not at the OOM killer."""
    budget = 2 * limit
    batches: list[pa.RecordBatch] = []
    nbytes = 0
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        nbytes += batch.nbytes
        if nbytes > budget:
            raise Refused(f"Parquet data too large: more than {budget} bytes once read (twice the source's "
                          f"max_file_bytes {limit}; stopped after {sum(b.num_rows for b in batches) + batch.num_rows}"
                          f" rows, {nbytes} bytes): refused")
        batches.append(batch)
    return pa.Table.from_batches(batches, schema=pf.schema_arrow)


def _read_parquet(fr: FileRead) -> pa.Table:
    """Parquet needs random access (its footer comes last), so it is not read as a stream: the
    file is opened with the same checks, its size bounded as before, and it must be the file the
    first pass hashed (same size and modification time). Its data is bounded too: the footer is
    checked against ``max_file_bytes`` before reading, and the read stops at twice that in Arrow
    bytes (:func:`_read_parquet_bounded`)."""
    land = fr.source
    assert land is not None
    if land.root is None:
        raw, st = land.fs.open_input_file(land.path), None
        size = raw.size()
    else:
        raw, st = land.open()
        assert st is not None  # a local landing file is opened with its stat
        size = st.st_size
    try:
        if size > land.limit:
            raise _too_large(size, land.limit)
        if size != fr.size or (st is not None and st.st_mtime_ns != fr.mtime_ns):
            raise FileProblem("changed while being staged (not the file that was hashed); stage again")
        try:
            pf = pq.ParquetFile(raw)
            names = pf.schema_arrow.names
        except OSError as e:  # pyarrow says a bad footer with an OSError
            raise FileProblem(f"cannot be read as parquet: {str(e).splitlines()[0]}") from None
        _check_unique_names(names)
        _parquet_footer_check(pf, land.limit)
        try:
            return _read_parquet_bounded(pf, land.limit)
        except OSError as e:
            raise FileProblem(f"cannot be read as parquet: {str(e).splitlines()[0]}") from None
    finally:
        raw.close()


# --- types -----------------------------------------------------------------------------------

def _convert(col: pa.ChunkedArray, name: str, cs: ColumnSpec,
             tz: str | None) -> tuple[pa.Array | pa.ChunkedArray, np.ndarray, str]:
    """Cast a column to its contract type. Returns values, a mask of values that did not convert,
    and the reason text for them."""
    import pandas as pd

    target = arrow_type(cs.type)
    if col.type == target:
        return col, np.zeros(len(col), bool), ""  # no copy: the table takes the chunks as they are
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
                return (pa.array(_utc_values(parsed), type=target, from_pandas=True), bad,
                        f"type: {name} has a timestamp without a time zone (declare event_time.timezone)")
            local = pd.to_datetime(stripped[naive], errors="coerce", format="ISO8601")
            parsed[naive] = local.dt.tz_localize(tz, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC")
        elif naive.any():
            parsed[naive] = pd.to_datetime(stripped[naive], errors="coerce", format="ISO8601").dt.tz_localize("UTC")
        ok = parsed.notna().to_numpy() | ~present
        return pa.array(_utc_values(parsed), type=target, from_pandas=True), ~ok, reason
    if target == pa.date32():
        parsed = pd.to_datetime(text, errors="coerce", format="ISO8601")
        ok = parsed.notna().to_numpy() | ~present
        return pa.array(parsed.dt.date, type=target, from_pandas=True), ~ok, reason
    return pc.cast(col, pa.string()).combine_chunks(), np.zeros(len(col), bool), ""


def _utc_values(parsed: Any) -> np.ndarray:
    """A UTC Series as naive datetime64 UTC values, which Arrow stores as they are for a timestamp
    type with or without a zone. (Handing pyarrow the tz-aware Series itself makes it read
    Series.values, deprecated by pandas 3.1 for tz-aware data.)"""
    return parsed.dt.tz_convert(None).to_numpy()


def _load(fr: FileRead, src: SourceSpec) -> None:
    """Read one file into typed contract columns, recording per-row type failures."""
    if fr.text_error:  # found by the first pass: pyarrow's row handlers cannot report bytes outside the encoding
        raise FileProblem(fr.text_error)
    table, ragged = _read_file(fr, src)
    _check_unique_names(table.column_names)
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
            reasons.append(pa.array(np.where(bad, reason, np.array(None, dtype=object)), pa.string()))
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

    def constant(text: str) -> Callable[[], Any]:
        return lambda: pa.scalar(text)

    for name, cs in src.columns.items():
        col = table.column(name)
        if not cs.nullable and col.null_count:
            add("not_null", pc.is_null(col), constant(f"not_null: {name} is null"))
        if pa.types.is_floating(col.type) and not cs.allow_nonfinite:
            add("finite", pc.or_(pc.is_nan(col), pc.is_inf(col)), constant(f"finite: {name} is NaN or infinite"))
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
    result: SourceResult | None = None  # set when the published partition is kept as is
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
    # operational fields (the read limit) change how files are read, not what they hold: a file
    # the limit refuses has a digest saying so, so the key still changes when the outcome does
    blob = json.dumps({"contract": src.model_dump(mode="json", exclude=OPERATIONAL), "inputs": digests,
                       "date": day.isoformat()},
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
    root = landing_root(ctx.store, src.path)
    reads = [_scan(fs, info, root, src) for info in infos]
    digests = {r.name: r.digest for r in reads}
    lineage_key = _lineage(src, digests, day)
    current = ctx.store.partition(f"staged/{name}", day)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        log.info("staged %s %s: unchanged inputs, keeping the published partition", name, day)
        return Prepared(name, src, result=_result(current, skipped=True))

    bad_files: list[dict[str, str]] = []
    for r in reads:
        if r.problem is None:
            try:
                _load(r, src)
            except FileProblem as e:
                r.problem = str(e)
                if isinstance(e, Refused):
                    r.source = None
            except (MemoryError, OSError) as e:  # this file's problem, not the step's
                if _transient(e, r.source.root if r.source is not None else None):
                    raise
                r.table = r.type_reasons = None
                r.problem = f"could not be read ({type(e).__name__}: {e})"
                log.warning("landing file %s: %s", r.path, r.problem)
        if r.problem is not None:
            bad_files.append({"file": r.name, "reason": r.problem})
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


def _rows(table: pa.Table | None) -> int:
    """The rows of a read file's table (only files that were read have one)."""
    assert table is not None
    return table.num_rows


def _decide(name: str, src: SourceSpec, ctx: RunContext, day: Any, reads: list[FileRead], good_reads: list[FileRead],
            table: pa.Table, n: int, bad_files: list[dict[str, str]], digests: dict[str, str], lineage_key: str,
            spec_run: Prepared | None) -> Prepared:
    rule_reasons = _rule_reasons(table, src, day) if n else {}
    type_reasons = pa.chunked_array(
        [c for r in good_reads for c in (r.type_reasons.chunks if r.type_reasons is not None
                                         else [pa.nulls(_rows(r.table), pa.string())])], type=pa.string())
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
                        f"{src.quarantine.max_bad_files}: "
                        + "; ".join(f"{b['file']}: {b['reason']}" for b in bad_files))
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
    _make_dirs(store, base)
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
        with _create(store, posixpath.join(base, "rows.parquet")) as out:
            pq.write_table(pa.concat_tables(rows), out)
    for f in bad_files:
        if f.source is None:  # refused or unreadable: nothing of it is read, so nothing is copied
            continue
        _make_dirs(store, posixpath.join(base, "files"))
        try:
            with f.source.stream() as src_file, _create(store, posixpath.join(base, "files", f.name)) as out:
                while chunk := src_file.read(_CHUNK):
                    out.write(chunk)
        except (FileProblem, OSError, MemoryError) as e:
            log.warning("quarantine: could not copy %s (%s); its reason is recorded", f.path, e)
    counts: dict[str, int] = {}
    if reasons is not None:
        for r in pc.drop_null(reasons).to_pylist():
            for part in r.split("; "):
                key = part.split(":", 1)[0]
                counts[key] = counts.get(key, 0) + 1
    if ragged:
        counts["ragged"] = len(ragged)
    with _create(store, posixpath.join(base, "_quarantine.json")) as out:
        out.write(json.dumps({"source": name, "date": ctx.logical_date.isoformat(), "run_id": ctx.run_id,
                              "rows_by_rule": counts, **summary}, indent=2, default=str).encode())
    uri = store.uri(base)
    log.warning("staged %s %s: quarantined %s", name, ctx.logical_date, uri)
    return uri


def _make_dirs(store: Store, folder: str) -> None:
    """Create a quarantine folder; on a local store every level from ``quarantine/`` down is
    private (0700), also when an older version made it readable."""
    if store.kind != "local":
        store.fs.create_dir(folder, recursive=True)
        return
    top = store.path("quarantine")
    path = top
    for part in ["", *posixpath.relpath(folder, top).split("/")]:
        path = posixpath.join(path, part) if part else path
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        try:
            os.chmod(path, 0o700)
        except PermissionError:  # not ours: leave it as it is
            pass


@contextmanager
def _create(store: Store, path: str) -> Iterator[Any]:
    """A new quarantine file: 0600 from its creation on a local store."""
    if store.kind != "local":
        with store.fs.open_output_stream(path) as out:
            yield out
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as out:
        yield out


def _prepare_files(name: str, src: SourceSpec, ctx: RunContext, fs: pafs.FileSystem,
                   infos: list[pafs.FileInfo]) -> Prepared:
    """A manifest of the files themselves (for images and other unstructured data). A file the
    landing rules refuse (a link out of the root, over the size limit) is left out of it and
    counts as an unreadable file."""
    checksums = _file_checksums(ctx, fs, infos, src)
    rows, bad_files = [], []
    for i in infos:
        checksum = checksums[i.path]
        if checksum.startswith("unread: "):
            bad_files.append({"file": i.base_name, "reason": checksum[len("unread: "):]})
            continue
        uri = f"s3://{i.path}" if isinstance(fs, pafs.S3FileSystem) else i.path
        rows.append({"uri": uri, "name": i.base_name, "size": i.size, "last_modified": i.mtime, "checksum": checksum})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("uri", pa.string()), ("name", pa.string()), ("size", pa.int64()),
        ("last_modified", pa.timestamp("ns", tz="UTC")), ("checksum", pa.string())]))
    digests = {i.base_name: checksums[i.path] for i in infos}
    lineage_key = _lineage(src, digests, ctx.logical_date)
    current = ctx.store.partition(f"staged/{name}", ctx.logical_date)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        return Prepared(name, src, result=_result(current, skipped=True))
    q_uri, warnings = None, [f"{b['file']}: {b['reason']}" for b in bad_files]
    if bad_files:
        blocking = []
        if len(bad_files) > src.quarantine.max_bad_files:
            blocking.append(f"{len(bad_files)} unreadable file(s) > quarantine.max_bad_files "
                            f"{src.quarantine.max_bad_files}: " + "; ".join(warnings))
        q_uri = _write_quarantine(name, ctx, table, None, [], [],
                                  {"blocking": blocking, "warnings": warnings, "bad_files": bad_files})
        if blocking:
            raise ContractError(f"source {name!r} {ctx.logical_date}: nothing published: {blocking[0]}; "
                                f"quarantined to {q_uri}")
    manifest = {"source": name, "date": ctx.logical_date.isoformat(), "rows": table.num_rows, "rows_in": len(infos),
                "rows_quarantined": 0, "files_quarantined": len(bad_files), "inputs": digests,
                "lineage_key": lineage_key, "run_id": ctx.run_id,
                "schema_hash": hashlib.sha256(str(table.schema).encode()).hexdigest()[:16],
                "schema": {f.name: str(f.type) for f in table.schema}, "warnings": warnings, "quarantine_uri": q_uri}
    return Prepared(name, src, good=table, manifest=manifest)


def _file_checksums(ctx: RunContext, fs: pafs.FileSystem, infos: list[pafs.FileInfo],
                    src: SourceSpec) -> dict[str, str]:
    """A ``format: files`` source's checksums: S3 ETags (no download), else SHA-256 (streamed,
    under the landing rules); ``unread: <reason>`` for a file those rules refuse."""
    if isinstance(fs, pafs.S3FileSystem):
        out = {}
        big = {i.path for i in infos if i.size is not None and i.size > src.max_file_bytes}
        etags = _s3_etags(ctx, [i for i in infos if i.path not in big])
        for i in infos:
            out[i.path] = (f"unread: {_too_large(i.size, src.max_file_bytes)}" if i.path in big
                           else etags.get(i.path) or f"sha256:{_scan(fs, i, None, src, check_text=False).digest}")
        return out
    root = landing_root(ctx.store, src.path)
    out = {}
    for i in infos:
        fr = _scan(fs, i, root, src, check_text=False)
        out[i.path] = fr.digest if fr.problem else f"sha256:{fr.digest}"
    return out


def _s3_etags(ctx: RunContext, infos: list[pafs.FileInfo]) -> dict[str, str]:
    client = ctx.store.options.boto3_client()
    out = {}
    for i in infos:
        bucket, _, key = i.path.partition("/")
        out[i.path] = "etag:" + client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    return out


def _publish(p: Prepared, ctx: RunContext) -> SourceResult:
    if p.result is not None:
        return p.result
    table = p.good
    assert table is not None  # prepared without a result: the good rows are there
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


class SourceResult(TypedDict):
    """One source's entry in ``StageResult["sources"]``: its published partition."""

    uri: str
    rows: int
    rows_in: int
    rows_published: int
    rows_quarantined: int
    files_quarantined: int
    quarantine_uri: str | None
    warnings: list[str]
    input_hash: str
    content_hash: str
    schema_hash: str | None
    lineage_key: str
    skipped: bool  # the partition was kept as is (the same landing files)


class StageResult(TypedDict, total=False):
    """What ``stage`` returns (and the orchestrators pass on)."""

    step: str
    date: str
    rows: int  # the base source's published rows (all sources' without a base among them)
    rows_in: int
    rows_quarantined: int
    sources: dict[str, SourceResult]
    not_expected: dict[str, str]  # sources whose own calendar expects no drop on the date: why


def _result(part: Any, skipped: bool) -> SourceResult:
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


def stage(spec: Spec, ctx: RunContext) -> StageResult:
    """Stage every source of the spec for ``ctx.logical_date``.

    All sources are read and checked before any is published, so a contract breach in one
    source publishes nothing for that date. A source whose own calendar expects no drop on the
    date is left out (listed in ``not_expected``); the base source's calendar decides whether the
    step runs at all (``daybreak.steps``).
    """
    prepared: list[Prepared] = []
    skipped = _not_expected(spec, ctx)
    try:
        for name, src in spec.sources.items():
            if name not in skipped:
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
        **({"not_expected": skipped} if skipped else {}),
    }


def _not_expected(spec: Spec, ctx: RunContext) -> dict[str, str]:
    """The sources whose calendar expects no drop on the date, with the reason."""
    day = ctx.logical_date
    return {name: spec.calendar(name).reason(day) for name in spec.sources if not spec.calendar(name).expects(day)}


def unlanded(spec: Spec, ctx: RunContext) -> list[str]:
    """The sources expected on the date that have neither a staged partition nor a landing file
    (the stage step would fail on them with 'no landing file'). Lists files, reads none."""
    day, skipped = ctx.logical_date, _not_expected(spec, ctx)
    out = []
    for name, src in spec.sources.items():
        if name in skipped or ctx.store.partition(f"staged/{name}", day) is not None:
            continue
        if not ctx.store.glob(src.path.replace("{date}", day.isoformat()))[1]:
            out.append(name)
    return out


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
    skipped = _not_expected(spec, ctx)
    found = {name: ctx.store.partition(f"staged/{name}", day) for name in spec.sources if name not in skipped}
    parts = {name: p for name, p in found.items() if p is not None}
    if len(parts) < len(found):
        return None
    keys = {}
    for name, src in spec.sources.items():
        if name in skipped:
            continue
        fs, infos = _find(name, src, ctx)
        if src.format == "files":
            checksums = _file_checksums(ctx, fs, infos, src)
            digests = {i.base_name: checksums[i.path] for i in infos}
        else:
            root = landing_root(ctx.store, src.path)
            digests = {i.base_name: _scan(fs, i, root, src, check_text=False).digest for i in infos}
        key = _lineage(src, digests, day)
        if parts[name].manifest.get("lineage_key") != key:
            return None
        keys[name] = key
    return keys
