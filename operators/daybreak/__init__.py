"""daybreak: reusable pipeline steps for models that are retrained every day.

The daily cycle, one subpackage per step (``cycle.py`` declares their order):

    stage     raw landing files -> validated, atomically published Parquet
    features  point-in-time correct features, built on Ray
    monitor   the served model's live quality on the day's labels; automatic rollback
    train     a candidate version in the MLflow registry
    gate      the candidate against the champion (and naive baselines) on the same holdout
    promote   move the champion alias, with history, approval and rollback
    deploy    tell the scoring server to hot-swap; the server itself (``deploy.serve``)
    score     batch predictions for a date

Under them: ``spec`` (the pipeline spec: models, validation, types, expressions) and ``infra``
(store, registry, records, locks, compute, errors). Over them: the adapters ``airflow``,
``prefect`` and ``cli``. Each step package's public names are in its ``__init__``; its
``_private`` modules are its own (an import contract in ``make lint`` keeps it so).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

# Modules of the flat layout before 0.2, and where they live now. Importing an old path still
# works for one release, with a DeprecationWarning naming the new one.
MOVED = {
    **{f"daybreak.{m}": f"daybreak.infra.{m}"
       for m in ("compute", "context", "errors", "lock", "metrics", "records", "registry", "store")},
    "daybreak.expr": "daybreak.spec._expr",
    "daybreak.outofcore": "daybreak.train._outofcore",
    "daybreak.tuning": "daybreak.train._tuning",
    "daybreak.model_code": "daybreak.train.model_code",
    "daybreak.datachecks": "daybreak.gate._datachecks",
    "daybreak.report": "daybreak.gate._report",
    "daybreak.history": "daybreak.promote._history",
    "daybreak.serve": "daybreak.deploy._serve",
    "daybreak.predlog": "daybreak.deploy._predlog",
    "daybreak.datasets": "daybreak.demo",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path to the module at its new place (the same module object)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec: Any) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path is removed in the next release",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed at its new place."""


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
