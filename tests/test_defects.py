"""Small defects found in the code review of issue 21, each pinned by a test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import BIN

from daybreak import __version__
from daybreak.infra.context import daybreak_home
from daybreak.infra.errors import is_retryable


def test_cli_prints_its_version() -> None:
    out = subprocess.run([str(BIN / "daybreak"), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"daybreak {__version__}", out


def test_an_empty_daybreak_home_is_the_default_not_the_current_directory(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAYBREAK_HOME", "")
    assert daybreak_home() == tmp_path / ".daybreak"


@pytest.mark.parametrize("exc", [AttributeError("x"), NameError("x"), AssertionError(), KeyError("k"),
                                 IndexError(), NotImplementedError(), ImportError("x"), ValueError(), TypeError()])
def test_programming_errors_are_not_retried(exc: Exception) -> None:
    assert not is_retryable(exc)


@pytest.mark.parametrize("exc", [ConnectionError(), TimeoutError(), OSError("EIO"), RuntimeError("ray worker lost")])
def test_passing_conditions_are_retried(exc: Exception) -> None:
    assert is_retryable(exc)


def test_gate_rules_tag_stays_within_the_limit_when_nothing_fits() -> None:
    from daybreak.infra.records import TAG_LIMIT as _TAG_LIMIT
    from daybreak.infra.records import compact_rules as _compact

    huge = [{"rule": "x" * (_TAG_LIMIT + 10), "verdict": "fail", "detail": "d"}]
    assert _compact(huge) == "[]"
    many = [{"rule": f"r{i}", "verdict": "pass" if i % 2 else "fail", "detail": "y" * 200} for i in range(100)]
    text = _compact(many)
    assert len(text) <= _TAG_LIMIT and json.loads(text)


def test_long_input_hashes_are_a_valid_json_tag() -> None:
    from daybreak.train._training import input_hashes_tag

    short = {"2013-01-01": "abc"}
    assert json.loads(input_hashes_tag(short)) == short
    long = {f"day{i}/file{j}.csv": "f" * 64 for i in range(60) for j in range(10)}
    tag = json.loads(input_hashes_tag(long))  # under MLflow's 8,000: never truncated to invalid JSON
    assert tag["entries"] == 600 and tag["artifact"] == "input_hashes.json" and len(json.dumps(tag)) < 8000


def test_a_spec_on_s3_loads(s3_server, monkeypatch) -> None:
    """The DAG form allows an s3:// spec path; it failed with 'spec file not found'."""
    import uuid

    from conftest import SPEC
    from s3 import apply_env

    from daybreak.infra.errors import SpecError
    from daybreak.spec import load_spec

    apply_env(monkeypatch, s3_server.env())
    bucket = f"spec-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="specs/flights.yaml", Body=SPEC.read_bytes())
    spec = load_spec(f"s3://{bucket}/specs/flights.yaml")
    assert spec.spec_hash() == load_spec(SPEC).spec_hash()
    with pytest.raises(SpecError, match="spec file not found: s3://"):
        load_spec(f"s3://{bucket}/specs/missing.yaml")


def test_reordering_a_sources_columns_in_the_spec_keeps_reading_its_history(home: Path, spec, tmp_path: Path,
                                                                            monkeypatch) -> None:
    """A spec whose source columns are listed in another order (a harmless edit, or the spec
    written back with sorted keys) stages later days with that column order: the feature step
    read the as-of source's days as one table and failed on the first mixed day."""
    import pyarrow.parquet as pq
    from conftest import make_home

    from daybreak.features import build_features
    from daybreak.infra.context import RunContext
    from daybreak.stage import stage

    day, before = "2013-01-03", "2013-01-02"
    weather = spec.sources["weather"]
    reordered = spec.model_copy(update={"sources": {**spec.sources, "weather": weather.model_copy(
        update={"columns": dict(reversed(weather.columns.items()))})}})
    assert list(reordered.sources["weather"].columns) != list(weather.columns)
    stage(spec, RunContext.create(before))
    stage(reordered, RunContext.create(day))
    mixed = pq.read_table(build_features(reordered, RunContext.create(day), in_process=True)["uri"])

    monkeypatch.setenv("DAYBREAK_HOME", str(make_home(tmp_path / "same", home / "store" / "landing")))
    for d in (before, day):
        stage(spec, RunContext.create(d))
    same = pq.read_table(build_features(spec, RunContext.create(day), in_process=True)["uri"])
    assert mixed.num_rows > 800 and mixed.equals(same)
