"""Landing files are not trusted (issue 20, item 6): staging refuses links out of the landing
root, streams every file under a size limit, keeps its quarantine private and turns a bad file
(duplicate header, a read that runs out of memory) into that file's problem, never a traceback.

The attacks run against real files in a real store; the duplicate-header and link attacks also
through the real CLI (``daybreak run``: there is no separate stage command, and the run stops at
staging with exit 3 when a landing file is refused). The store's ``landing`` is itself a symlink
to the real landing folder, as in ``tests/conftest.py``'s ``make_home``: the root is resolved
first and each file judged against it.

On the code before the fix: the file link and the directory link were followed (the outside
file's bytes were copied into ``quarantine/.../files/`` with mode 0644, the outside directory's
CSV was published: exit 0); the quarantine was 0644/0755; the oversized sparse file was read
whole ("empty file", peak RSS 857 MB against 257 MB now, and a 301 MB copy in the quarantine); the
duplicated header exited 1 with a ``KeyError`` traceback (also on S3), Parquet and JSON lines gave
no reason naming a duplicate; a ``MemoryError`` or ``OSError`` while reading one file crashed the
step. The two regression guards (links inside the root, identical results for normal files) pass
on both.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import yaml

from daybreak.infra.context import RunContext
from daybreak.infra.errors import ContractError
from daybreak.spec import SourceSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "flights.yaml"
BIN = Path(sys.executable).parent
DAY = "2013-01-02"
SECRET = b"AWS_SECRET_ACCESS_KEY=do-not-copy-me-" + uuid.uuid4().hex.encode() + b"\n"

# daybreak's real entry point in a process of its own, reporting its peak RSS on stderr.
DRIVER = r"""
import resource, sys
import daybreak.cli
sys.argv = ["daybreak", *sys.argv[1:]]
code = 0
try:
    daybreak.cli.main(hard_exit=False)
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stderr.write(f"\nMAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\n")
sys.stderr.flush()
sys.exit(code)
"""


# --- a home whose store/landing is a symlink to a landing folder of its own --------------------

class Home:
    def __init__(self, base: Path, landing: Path) -> None:
        self.base = base
        self.real_landing = base / "landing-real"  # the landing root (writable: the test plays the dropper)
        for sub, name in (("flights", f"{DAY}.csv"), ("weather", f"{DAY}.csv"), ("dims", "planes.csv")):
            (self.real_landing / sub).mkdir(parents=True, exist_ok=True)
            shutil.copy(landing / sub / name, self.real_landing / sub / name)
        self.home = base / "home"
        self.store = self.home / "store"
        self.store.mkdir(parents=True)
        (self.store / "landing").symlink_to(self.real_landing, target_is_directory=True)
        self.outside = base / "outside"  # somewhere the landing zone must never reach
        self.outside.mkdir()
        self.flights_csv = (landing / "flights" / f"{DAY}.csv").read_bytes()

    @property
    def flights(self) -> Path:
        return self.real_landing / "flights" / f"{DAY}.csv"

    def spec_file(self, **flights: object) -> Path:
        raw = yaml.safe_load(SPEC.read_text())
        raw["sources"]["flights"] |= flights
        p = self.base / f"spec-{uuid.uuid4().hex[:6]}.yaml"
        p.write_text(yaml.safe_dump(raw, sort_keys=False))
        return p

    def cli(self, spec: Path) -> tuple[int, str, int]:
        """`daybreak run` for DAY -> (exit code, stderr, peak RSS in KiB)."""
        env = {k: v for k, v in os.environ.items() if k not in ("DAYBREAK_HOME", "DAYBREAK_STORE")}
        env |= {"DAYBREAK_HOME": str(self.home), "RAY_TMPDIR": str(self.base / "ray")}
        p = subprocess.run([str(BIN / "python"), "-c", DRIVER, "run", "--spec", str(spec), "--date", DAY,
                            "--no-deploy"], cwd=self.base, env=env, capture_output=True, text=True, timeout=600)
        rss = int(p.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0]) if "MAXRSS_KB " in p.stderr else -1
        return p.returncode, p.stderr.split("\nMAXRSS_KB ")[0], rss

    def stored_files(self) -> list[Path]:
        """Every file daybreak wrote into the store (the landing zone excluded)."""
        out = []
        for root, dirs, names in os.walk(self.store):
            if Path(root) == self.store:
                dirs[:] = [d for d in dirs if d != "landing"]
            out += [Path(root) / n for n in names]
        return out

    def quarantined(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in self.store.glob("quarantine/*/*/*/_quarantine.json")]


@pytest.fixture
def h(tmp_path: Path, landing: Path, monkeypatch: pytest.MonkeyPatch) -> Home:
    home = Home(tmp_path, landing)
    monkeypatch.setenv("DAYBREAK_HOME", str(home.home))
    monkeypatch.delenv("DAYBREAK_STORE", raising=False)
    return home


def _spec(**flights: object):
    """The flights source alone, in process, with `flights` changed."""
    spec = load_spec(SPEC)
    src = SourceSpec.model_validate(spec.sources["flights"].model_dump() | flights)
    return spec.model_copy(update={"sources": {"flights": src}})


def _stage(spec) -> dict:
    from daybreak.stage import stage

    return stage(spec, RunContext.create(DAY))["sources"]["flights"]


def _published(h: Home) -> pa.Table | None:
    ctx = RunContext.create(DAY)
    part = ctx.store.partition("staged/flights", date.fromisoformat(DAY))
    return None if part is None else pa.concat_tables([pq.read_table(f) for f in part.files])


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err and "KeyError" not in err and "MemoryError" not in err, err[-3000:]


# --- links ------------------------------------------------------------------------------------

def test_file_link_out_of_the_landing_root_is_refused_through_the_cli(h: Home) -> None:
    secret = h.outside / "credentials"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    h.flights.unlink()
    h.flights.symlink_to(secret)

    code, err, _ = h.cli(h.spec_file())

    assert code == 3, err[-3000:]
    _no_traceback(err)
    assert f"{DAY}.csv" in err and "outside the landing root" in err, err[-3000:]
    for f in h.stored_files():  # not followed: the secret's bytes are nowhere in the store
        assert SECRET.strip() not in f.read_bytes(), f"the outside file was copied to {f}"
    assert not list(h.store.glob("quarantine/**/files/*"))
    (q,) = h.quarantined()
    assert q["bad_files"][0]["file"] == f"{DAY}.csv" and "outside the landing root" in q["bad_files"][0]["reason"]


def test_directory_link_out_of_the_landing_root_is_refused(h: Home) -> None:
    """A folder inside the landing zone that is a link to a folder outside it: nothing in it is read."""
    elsewhere = h.outside / "flights"
    elsewhere.mkdir()
    (elsewhere / f"{DAY}.csv").write_bytes(h.flights_csv)  # a perfectly valid drop, in the wrong place
    shutil.rmtree(h.real_landing / "flights")
    (h.real_landing / "flights").symlink_to(elsewhere, target_is_directory=True)

    with pytest.raises(ContractError) as e:
        _stage(_spec())
    assert f"{DAY}.csv" in str(e.value) and "outside the landing root" in str(e.value)
    assert _published(h) is None
    assert not list(h.store.glob("quarantine/**/files/*"))

    # the same through the CLI
    code, err, _ = h.cli(h.spec_file())
    assert code == 3 and "outside the landing root" in err, err[-3000:]
    _no_traceback(err)


def test_links_inside_the_landing_root_are_fine(h: Home) -> None:
    """store/landing is itself a link (resolved first), and a drop may link to another file in the root."""
    archive = h.real_landing / "archive"
    archive.mkdir()
    h.flights.rename(archive / f"{DAY}.csv")
    h.flights.symlink_to(Path("..") / "archive" / f"{DAY}.csv")
    (h.real_landing / "more").symlink_to("archive", target_is_directory=True)  # a folder link inside the root

    out = _stage(_spec())
    assert out["rows"] == 943 and out["files_quarantined"] == 0
    out = _stage(_spec(path="landing/more/{date}.csv"))
    assert out["rows"] == 943 and out["files_quarantined"] == 0


def test_absolute_spec_path_is_its_own_landing_root(h: Home, tmp_path: Path) -> None:
    """A source read from an absolute folder: links out of that folder are refused too."""
    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / f"{DAY}.csv").symlink_to(h.flights)  # the store's landing zone is outside this root
    with pytest.raises(ContractError, match="outside the landing root"):
        _stage(_spec(path=f"{drops}/{{date}}.csv"))


# --- the quarantine is private ----------------------------------------------------------------

def test_quarantine_is_private(h: Home) -> None:
    h.flights.write_bytes(b"year,month\n\x00\x01garbage\n")
    h.flights.chmod(0o600)
    with pytest.raises(ContractError):
        _stage(_spec())
    q = h.store / "quarantine"
    files = [p for p in q.rglob("*") if p.is_file()]
    assert any(p.parent.name == "files" for p in files)  # the unreadable drop was kept for inspection
    for p in [q, *q.rglob("*")]:
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = 0o700 if p.is_dir() else 0o600
        assert mode == want, f"{p.relative_to(h.store)} has mode {mode:o}, want {want:o}"


# --- size: streamed, never whole --------------------------------------------------------------

def test_sparse_file_over_the_limit_is_quarantined_unread(h: Home) -> None:
    """A 300 MiB sparse file (no disk used) under a 1 MiB limit: refused by its size, unread, and
    the process stays as small as one staging a normal file."""
    ok_code, ok_err, baseline = h.cli(h.spec_file(max_file_bytes=2**20, rows={"min": 10**6}))  # fails after reading
    assert ok_code == 3 and baseline > 0, ok_err[-3000:]

    big = 300 * 2**20
    h.flights.unlink()
    with open(h.flights, "wb"):
        pass
    os.truncate(h.flights, big)
    code, err, rss = h.cli(h.spec_file(max_file_bytes=2**20))

    assert code == 3, err[-3000:]
    _no_traceback(err)
    assert f"{DAY}.csv" in err and str(big) in err and "max_file_bytes 1048576" in err, err[-3000:]
    print(f"peak RSS: {rss} KiB staging the {big}-byte sparse file, {baseline} KiB staging a normal one")
    assert rss - baseline < 64 * 1024, f"peak RSS {rss} KiB vs {baseline} KiB staging a normal file"
    assert not list(h.store.glob("quarantine/**/files/*"))  # not copied either


def test_stream_that_grows_past_the_limit_is_stopped(h: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """The size is checked before reading and again while the bytes come: a file that grows
    between the two (or whose size lied) is cut off at the limit."""
    h.flights.write_bytes(h.flights_csv)
    real_fstat = os.fstat

    def lying_fstat(fd: int) -> os.stat_result:  # the drop looks small when staging looks at it
        s = real_fstat(fd)
        if stat.S_ISREG(s.st_mode) and s.st_size == len(h.flights_csv):
            return os.stat_result((*s[:6], 10, *s[7:]))
        return s

    spec = _spec(max_file_bytes=1000)
    monkeypatch.setattr(os, "fstat", lying_fstat)
    with pytest.raises(ContractError) as e:
        _stage(spec)
    monkeypatch.undo()
    assert f"{DAY}.csv" in str(e.value) and "max_file_bytes 1000" in str(e.value)


def test_normal_files_stream_to_the_same_result(h: Home) -> None:
    """Streaming changes nothing for a normal file: same rows, same input digest as sha256 of the bytes."""
    import hashlib

    out = _stage(_spec())
    ctx = RunContext.create(DAY)
    part = ctx.store.partition("staged/flights", date.fromisoformat(DAY))
    assert part.manifest["inputs"] == {f"{DAY}.csv": hashlib.sha256(h.flights_csv).hexdigest()}
    assert out["rows"] == 943
    assert _stage(_spec())["skipped"]  # and a rerun on the same bytes keeps the partition


# --- duplicate columns ------------------------------------------------------------------------

def _dup_header(csv: bytes, col: str = "dep_delay") -> bytes:
    header, rest = csv.split(b"\n", 1)
    names = header.decode().split(",")
    names[names.index("arr_delay")] = col
    return (",".join(names) + "\n").encode() + rest


def test_duplicate_csv_header_is_quarantined_through_the_cli(h: Home) -> None:
    """Every contract column is there, and one of them a second time (as an extra column)."""
    lines = h.flights_csv.decode().splitlines(keepends=True)
    h.flights.write_bytes("".join(ln.rstrip("\n") + (",dep_delay\n" if i == 0 else ",0\n")
                                  for i, ln in enumerate(lines)).encode())
    code, err, _ = h.cli(h.spec_file())
    assert code == 3, err[-3000:]
    _no_traceback(err)
    assert f"{DAY}.csv" in err and "duplicate column" in err and "dep_delay" in err, err[-3000:]


def test_duplicate_columns_quarantine_the_file_in_every_format(h: Home) -> None:
    """CSV (also when only an extra column repeats), Parquet and JSON lines: the file is set aside
    with a reason naming the column, the other file of the day is published."""
    good = pacsv.read_csv(io.BytesIO(h.flights_csv))
    cases = {
        "csv": _dup_header(h.flights_csv),
        "csv-extra": h.flights_csv.replace(b"\n", b",x,x\n", 1),
    }
    buf = io.BytesIO()
    pq.write_table(good.rename_columns([("dep_delay" if c == "arr_delay" else c) for c in good.column_names]), buf)
    cases["parquet"] = buf.getvalue()
    cases["jsonl"] = b'{"year": 2013, "dep_delay": 1, "dep_delay": 2}\n'
    for fmt, data in cases.items():
        ext = fmt.split("-")[0]
        folder = h.real_landing / f"dup-{fmt}"
        folder.mkdir()
        (folder / f"{DAY}-bad.{ext}").write_bytes(data)
        if ext == "parquet":
            pq.write_table(good, folder / f"{DAY}-good.{ext}")
        elif ext == "jsonl":
            (folder / f"{DAY}-good.{ext}").write_bytes(b"".join(
                json.dumps(r, default=str).encode() + b"\n" for r in good.to_pylist()))
        else:
            (folder / f"{DAY}-good.{ext}").write_bytes(h.flights_csv)
        spec = _spec(path=f"landing/dup-{fmt}/{{date}}-*.{ext}", format=ext,
                     quarantine={"max_bad_files": 1, "max_bad_row_fraction": 0.0})
        out = _stage(spec)
        assert out["files_quarantined"] == 1 and out["rows"] == 943, (fmt, out)
        q = json.loads(Path(out["quarantine_uri"], "_quarantine.json").read_text())
        reason = q["bad_files"][0]["reason"]
        assert q["bad_files"][0]["file"] == f"{DAY}-bad.{ext}" and "duplicate column" in reason, (fmt, reason)
        assert ("'x'" if fmt == "csv-extra" else "dep_delay") in reason, (fmt, reason)


# --- reading one file fails: that file's problem ----------------------------------------------

@pytest.mark.parametrize("error", [MemoryError, OSError])
def test_read_error_is_the_files_problem(h: Home, error: type[BaseException], monkeypatch) -> None:
    from daybreak.stage import _staging as st

    folder = h.real_landing / "two"
    folder.mkdir()
    (folder / f"{DAY}-a.csv").write_bytes(h.flights_csv)
    (folder / f"{DAY}-b.csv").write_bytes(h.flights_csv)
    real = st.pacsv.read_csv
    calls = []

    def read_csv(source, *a, **kw):  # the first file's read runs out of memory / hits an I/O error
        calls.append(1)
        if len(calls) == 1:
            raise error("injected while reading")
        return real(source, *a, **kw)

    monkeypatch.setattr(st.pacsv, "read_csv", read_csv)
    spec = _spec(path="landing/two/{date}-*.csv", quarantine={"max_bad_files": 1, "max_bad_row_fraction": 0.0},
                 unique=[])
    out = _stage(spec)
    assert out["files_quarantined"] == 1 and out["rows"] == 943
    q = json.loads(Path(out["quarantine_uri"], "_quarantine.json").read_text())
    (bad,) = q["bad_files"]
    assert bad["file"] == f"{DAY}-a.csv" and error.__name__ in bad["reason"], bad

    calls.clear()
    with pytest.raises(ContractError) as e:  # and with no bad file allowed, a clear error naming it
        _stage(_spec(path="landing/two/{date}-*.csv", unique=[], rows={"min": 1, "max": 10**6}))
    assert f"{DAY}-a.csv" in str(e.value) and error.__name__ in str(e.value)


def test_on_s3_size_limit_and_duplicate_header(s3_server, landing: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 has no links; the size limit (from the listing, then the stream) and the duplicate header hold there too."""
    from s3 import apply_env

    apply_env(monkeypatch, s3_server.env())
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    monkeypatch.setenv("DAYBREAK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAYBREAK_STORE", f"s3://{bucket}/store")
    csv = (landing / "flights" / f"{DAY}.csv").read_bytes()
    put = lambda key, body: client.put_object(Bucket=bucket, Key=f"store/landing/s3/{key}", Body=body)  # noqa: E731
    put(f"{DAY}-a.csv", csv)
    lines = csv.decode().splitlines(keepends=True)
    dup = "".join(ln.rstrip("\n") + (",dep_delay\n" if i == 0 else ",0\n") for i, ln in enumerate(lines)).encode()
    limit = len(dup) + 100
    put(f"{DAY}-b.csv", dup)
    put(f"{DAY}-c.csv", csv + b"#" * limit)
    spec = _spec(path="landing/s3/{date}-*.csv", max_file_bytes=limit, unique=[],
                 quarantine={"max_bad_files": 2, "max_bad_row_fraction": 0.0})
    out = _stage(spec)
    assert out["uri"].startswith("s3://") and out["rows"] == 943 and out["files_quarantined"] == 2, out
    ctx = RunContext.create(DAY)
    with ctx.store.fs.open_input_stream(out["quarantine_uri"][len("s3://"):] + "/_quarantine.json") as f:
        bad = {b["file"]: b["reason"] for b in json.loads(f.read())["bad_files"]}
    assert "duplicate column" in bad[f"{DAY}-b.csv"] and "dep_delay" in bad[f"{DAY}-b.csv"], bad
    assert f"max_file_bytes {limit}" in bad[f"{DAY}-c.csv"], bad


# --- Parquet: bounded by its data, not by its compressed size ---------------------------------

def _parquet_drop(h: Home, bad_name: str, bad: pa.Table, **write) -> Path:
    """landing/pq/: a good Parquet file of the day's flights and `bad` beside it."""
    folder = h.real_landing / "pq"
    folder.mkdir()
    pq.write_table(pacsv.read_csv(io.BytesIO(h.flights_csv)), folder / f"{DAY}-good.parquet")
    pq.write_table(bad, folder / f"{DAY}-{bad_name}.parquet", **write)
    return folder / f"{DAY}-{bad_name}.parquet"


def _pq_spec():
    return _spec(path="landing/pq/{date}-*.parquet", format="parquet", max_file_bytes=2 * 2**20,
                 quarantine={"max_bad_files": 1, "max_bad_row_fraction": 0.0})


def _bad_reason(out: dict, name: str) -> str:
    q = json.loads(Path(out["quarantine_uri"], "_quarantine.json").read_text())
    return {b["file"]: b["reason"] for b in q["bad_files"]}[name]


def test_parquet_bomb_is_refused_by_its_footer(h: Home) -> None:
    """The attack: a 2.3 MB zstd Parquet file of 200M constant rows became a 4.65 GB Arrow table
    (peak RSS 5 GB; the limit bounded only the compressed size). The same shape, small: 5M
    constant rows in a few KB, under a 2 MiB limit, are refused from the footer, unread."""
    path = _parquet_drop(h, "bomb", pa.table({"year": pa.array(__import__("numpy").zeros(5_000_000, "int64"))}),
                         compression="zstd")
    assert path.stat().st_size < 64 * 1024  # far below the limit: the old check let it through
    out = _stage(_pq_spec())
    assert out["rows"] == 943 and out["files_quarantined"] == 1, out
    reason = _bad_reason(out, f"{DAY}-bomb.parquet")
    assert "5000000 rows" in reason and "max_file_bytes 2097152" in reason, reason
    assert not list(h.store.glob("quarantine/**/files/*bomb*"))  # refused, not copied


def test_parquet_data_past_the_budget_is_stopped_while_reading(h: Home) -> None:
    """A footer can understate the data (a dictionary-encoded column of long strings is small in
    Parquet's own sizes, big in Arrow): the read goes batch by batch against a budget of twice
    the limit and stops there, naming the sizes."""
    long = "x" * 1000
    path = _parquet_drop(h, "wide", pa.table({"year": pa.array([long] * 20_000)}), compression="zstd")
    assert path.stat().st_size < 64 * 1024
    meta = pq.ParquetFile(path).metadata
    assert sum(meta.row_group(i).column(0).total_uncompressed_size for i in range(meta.num_row_groups)) < 2**20
    out = _stage(_pq_spec())
    assert out["rows"] == 943 and out["files_quarantined"] == 1, out
    reason = _bad_reason(out, f"{DAY}-wide.parquet")
    assert "max_file_bytes 2097152" in reason and "4194304" in reason, reason


def test_normal_parquet_files_stage_as_before(h: Home) -> None:
    """Row-group-by-row-group reading changes nothing for a normal file (several row groups)."""
    good = pacsv.read_csv(io.BytesIO(h.flights_csv))
    folder = h.real_landing / "pq"
    folder.mkdir()
    pq.write_table(good, folder / f"{DAY}.parquet", row_group_size=100)
    out = _stage(_spec(path="landing/pq/{date}.parquet", format="parquet", max_file_bytes=2 * 2**20))
    assert out["rows"] == 943 and out["files_quarantined"] == 0, out
    assert _published(h).num_rows == 943
