"""How many threads the in-process feature step runs on (``_threads``)."""

from __future__ import annotations

import pytest

from daybreak.features import _build as engine
from daybreak.infra.compute import THREADS_ENV, ComputeConfigError


def test_a_small_input_runs_on_one_thread_a_larger_one_on_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr(engine, "process_threads", lambda: 4)
    assert engine._threads(0) == 1
    assert engine._threads(engine.POOL_MIN_ROWS - 1) == 1
    assert engine._threads(engine.POOL_MIN_ROWS) == 4


def test_daybreak_threads_decides_whatever_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "3")
    assert engine._threads(10) == 3
    assert engine._threads(10 * engine.POOL_MIN_ROWS) == 3
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ComputeConfigError):
        engine._threads(10)
