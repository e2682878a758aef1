"""The registry lock is a registered model (issue 26, item 6): MLflow's model list, its UI's
included, shows it while held. MLflow cannot hide it (the one registered model its search leaves
out is a prompt, tagged ``mlflow.prompt.is_prompt``, which would make the lock a prompt), so the
lock and its reap markers are tagged ``daybreak.internal`` and described "daybreak internal lock,
do not delete", and daybreak's own listing leaves them out. Real parts: a sqlite registry, the
real lock taking over a stale lock through a reap marker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.lock import EXPIRES_TAG, INTERNAL_TAG, OWNER_TAG

NAME = "listed_model"
DESCRIBED = "daybreak internal lock, do not delete"


def test_the_lock_and_its_reap_marker_are_tagged_described_and_left_out_of_daybreaks_listing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAYBREAK_HOME", str(tmp_path / "home"))
    ctx = RunContext.create("2013-01-02")
    registry.setup_tracking(ctx, "lock-listing")
    cl = registry.client(ctx)
    cl.create_registered_model(NAME)
    real = cl.create_registered_model
    created: list[tuple[str, dict]] = []  # a reap marker lives only while its reaper works: see what was asked

    def spy(name: str, *args, **kwargs):
        created.append((name, kwargs))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(cl, "create_registered_model", spy)
    # a lock whose lease ran out, left by a run that stopped: the next holder reaps it, then takes it
    real(f"{NAME}.daybreak-lock", tags={OWNER_TAG: "gone/1", EXPIRES_TAG: str(time.time() - 60)})
    with registry.model_lock(cl, NAME, owner="listing"):
        lock = cl.get_registered_model(f"{NAME}.daybreak-lock")
        assert lock.tags[INTERNAL_TAG] == "lock" and lock.tags[OWNER_TAG].startswith("listing/")
        assert lock.description.startswith(DESCRIBED) and NAME in lock.description
        # what MLflow (and its UI's model list) shows: the lock, and no filter leaves it out
        assert sorted(m.name for m in cl.search_registered_models()) == [NAME, f"{NAME}.daybreak-lock"]
        assert list(cl.search_registered_models(f"tags.`{INTERNAL_TAG}` != 'lock'")) == []  # only tagged ones match
        assert [m.name for m in registry.registered_models(cl)] == [NAME]
    markers = [kw for name, kw in created if ".daybreak-lock.reap-" in name]
    assert markers, created
    for kw in markers:
        assert kw["tags"][INTERNAL_TAG] == "reap-marker" and kw["description"].startswith(DESCRIBED), kw
    assert [m.name for m in cl.search_registered_models()] == [NAME]  # released; the marker removed too
    assert [m.name for m in registry.registered_models(cl, f"name = '{NAME}'")] == [NAME]
