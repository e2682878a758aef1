"""Stage: landing files for one logical date -> a validated, atomically published Parquet partition."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from daybreak.context import RunContext
from daybreak.errors import ContractError, MissingInputError
from daybreak.spec import SourceSpec, Spec
from daybreak.store import sha256_file

log = logging.getLogger(__name__)


def arrow_type(name: str) -> pa.DataType:
    if name.startswith("timestamp["):
        unit, _, tz = name[len("timestamp["):-1].partition(",")
        return pa.timestamp(unit.strip(), tz=tz.strip() or None)
    return {"string": pa.string(), "date32": pa.date32()}.get(name) or pa.type_for_alias(name)


def contract_schema(src: SourceSpec) -> pa.Schema:
    return pa.schema([(c, arrow_type(t)) for c, t in src.columns.items()])


def landing_files(spec_source: SourceSpec, ctx: RunContext) -> list[Path]:
    pattern = str(ctx.store.resolve(spec_source.path.replace("{date}", ctx.logical_date.isoformat())))
    return sorted(Path(p) for p in glob.glob(pattern))


def read_source_file(path: Path, src: SourceSpec) -> pa.Table:
    """Read one landing file and enforce the contract's columns and types."""
    schema = contract_schema(src)
    try:
        if src.format == "csv":
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types=schema, null_values=src.null_values, strings_can_be_null=True
                ),
            )
        elif src.format == "jsonl":
            table = pajson.read_json(path, parse_options=pajson.ParseOptions(explicit_schema=schema))
        else:
            table = pq.read_table(path)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise ContractError(f"{path}: cannot be read as {src.format} under the contract: {e}") from None
    missing = [c for c in src.columns if c not in table.column_names]
    if missing:
        raise ContractError(f"{path}: missing column(s) required by the contract: {missing}")
    try:
        return table.select(list(src.columns)).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise ContractError(f"{path}: a column does not match the contract's type: {e}") from None


def _prepare(name: str, src: SourceSpec, ctx: RunContext) -> dict[str, Any]:
    """Read and check one source; returns either the kept partition's result or what to publish."""
    files = landing_files(src, ctx)
    if not files:
        where = ctx.store.resolve(src.path.replace("{date}", ctx.logical_date.isoformat()))
        raise MissingInputError(f"source {name!r}: no landing file for {ctx.logical_date} at {where}")
    input_hashes = {f.name: sha256_file(f) for f in files}
    lineage_key = hashlib.sha256(
        json.dumps(
            {"contract": src.model_dump(mode="json"), "inputs": input_hashes, "date": ctx.logical_date.isoformat()},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    current = ctx.store.partition(f"staged/{name}", ctx.logical_date)
    if current is not None and current.manifest.get("lineage_key") == lineage_key:
        log.info("staged %s %s: unchanged inputs, keeping the published partition", name, ctx.logical_date)
        return {"result": _result(current.path, current.manifest, skipped=True)}
    tables = [read_source_file(f, src) for f in files]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    manifest = {
        "source": name,
        "date": ctx.logical_date.isoformat(),
        "rows": table.num_rows,
        "inputs": input_hashes,
        "lineage_key": lineage_key,
        "run_id": ctx.run_id,
        "schema": {f.name: str(f.type) for f in table.schema},
    }
    return {"table": table, "manifest": manifest}


def _publish(name: str, prepared: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    if "result" in prepared:
        return prepared["result"]
    table: pa.Table = prepared["table"]

    def write(tmp: Path) -> dict[str, Any]:
        pq.write_table(table, tmp / "part-0.parquet", compression="zstd")
        return prepared["manifest"]

    part = ctx.store.publish(f"staged/{name}", ctx.logical_date, write)
    log.info("staged %s %s: %d rows -> %s", name, ctx.logical_date, table.num_rows, part.path)
    return _result(part.path, part.manifest, skipped=False)


def _result(path: Path, manifest: dict[str, Any], skipped: bool) -> dict[str, Any]:
    return {
        "uri": path.as_uri(),
        "rows": manifest["rows"],
        "input_hash": hashlib.sha256(json.dumps(manifest["inputs"], sort_keys=True).encode()).hexdigest()[:16],
        "content_hash": manifest["content_hash"][:16],
        "lineage_key": manifest["lineage_key"],
        "skipped": skipped,
    }


def stage(spec: Spec, ctx: RunContext) -> dict[str, Any]:
    """Stage every source of the spec for ``ctx.logical_date``.

    Every source is read and checked before any is published, so a contract breach in one
    file publishes nothing for that date.
    """
    prepared = {name: _prepare(name, src, ctx) for name, src in spec.sources.items()}
    results = {name: _publish(name, p, ctx) for name, p in prepared.items()}
    base = spec.features.base
    return {
        "step": "stage",
        "date": ctx.logical_date.isoformat(),
        "rows": results[base]["rows"],
        "sources": results,
    }
