"""Small defects found in the code review of issue 21, each pinned by a test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import BIN

from daybreak import __version__
from daybreak.context import daybreak_home
from daybreak.errors import is_retryable


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
