"""daybreak.steps.cache_key: the lineage key orchestrators cache step results under (Prefect's
Lineage policy). Read before a step runs it must equal the key read from the step's result, and it
must disappear when an input changes or the output is gone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import SPEC

from daybreak.steps import CACHEABLE, cache_key, run_step


@pytest.fixture
def own_home(cycled: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the cycled home (2013-01-01 .. 04 done) with its own landing files."""
    h = tmp_path / "home"
    shutil.copytree(cycled["home"], h, symlinks=True)
    (h / "store" / "landing").unlink()
    shutil.copytree((cycled["home"] / "store" / "landing").resolve(), h / "store" / "landing")
    monkeypatch.setenv("DAYBREAK_HOME", str(h))
    return h


def test_key_read_before_a_run_equals_the_key_of_its_result(own_home: Path, ray_local) -> None:
    day = "2013-01-03"
    for step in ("stage", "features", "train", "gate"):
        before = cache_key(step, SPEC, day)
        assert before and before.startswith(f"daybreak-flights_delay-{step}-{day}-"), (step, before)
        assert cache_key(step, SPEC, day, result=run_step(step, SPEC, day)) == before, step
    assert len({cache_key(s, SPEC, day) for s in ("stage", "features", "train", "gate")}) == 4
    # batch scoring: nothing recorded yet, then the key of the published predictions
    assert cache_key("batch_score", SPEC, day) is None
    scored = run_step("batch_score", SPEC, day)
    assert cache_key("batch_score", SPEC, day) == cache_key("batch_score", SPEC, day, result=scored) is not None
    # steps that act on live state are never cached
    assert set(CACHEABLE) == {"stage", "features", "train", "gate", "batch_score"}
    for step in ("promote", "deploy", "approve"):
        assert cache_key(step, SPEC, day) is None


def test_no_key_until_the_output_is_recorded(own_home: Path, ray_local) -> None:
    day = "2013-01-05"  # landed, never run
    for step in ("stage", "features", "train", "gate"):
        assert cache_key(step, SPEC, day) is None, step
    staged = run_step("stage", SPEC, day)
    assert cache_key("stage", SPEC, day) == cache_key("stage", SPEC, day, result=staged) is not None
    assert cache_key("features", SPEC, day) is None  # staged now, features not built yet
    # another store holds nothing: no key there
    assert cache_key("stage", SPEC, day, store=str(own_home / "elsewhere")) is None


def test_a_changed_input_or_a_lost_output_misses(own_home: Path, ray_local) -> None:
    day = "2013-01-04"
    keys = {s: cache_key(s, SPEC, day) for s in ("stage", "features", "train", "gate")}
    assert all(keys.values()), keys
    # a landing file rewritten (a late correction): stage's key is gone until it is restaged
    drop = next((own_home / "store" / "landing").glob(f"flights/{day}*"))
    drop.write_bytes(drop.read_bytes().replace(b",B6,707,", b",UA,707,", 1))
    assert cache_key("stage", SPEC, day) is None
    restaged = run_step("stage", SPEC, day)
    assert cache_key("stage", SPEC, day) == cache_key("stage", SPEC, day, result=restaged)
    assert cache_key("stage", SPEC, day) != keys["stage"]
    # features made from the old staged rows no longer match their inputs
    assert cache_key("features", SPEC, "2013-01-04") is None
    # the model version recorded for a lineage deleted (retention, by hand): train must run again
    from daybreak.infra import registry
    from daybreak.infra.context import RunContext
    from daybreak.spec import load_spec

    spec = load_spec(SPEC)
    cl = registry.client(RunContext.create("2013-01-03"))
    trained = run_step("train", SPEC, "2013-01-03")
    assert cache_key("train", SPEC, "2013-01-03") is not None
    cl.delete_model_version(spec.model.name, trained["model_version"])
    assert cache_key("train", SPEC, "2013-01-03") is None
