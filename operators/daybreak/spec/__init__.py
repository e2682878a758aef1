"""The pipeline spec: its models and validation, column and feature types, and the expression language.

A spec is data: reading and validating one never runs code from it.
"""

from typing import TYPE_CHECKING, Any

from daybreak.spec._model import (
    DEFAULT_MAX_STALENESS,
    LABEL_KNOWN_AT,
    OPERATIONAL,
    AsofJoin,
    ColumnSpec,
    FeatureSpec,
    OnlineSpec,
    SearchParam,
    SourceSpec,
    Spec,
    WindowAgg,
    arrow_type,
    build_estimator,
    load_spec,
    parse_duration,
    parse_spec,
    window_feature_names,
    xgb_params,
)

__all__ = [
    "DEFAULT_MAX_STALENESS",
    "LABEL_KNOWN_AT",
    "OPERATIONAL",
    "AsofJoin",
    "ColumnSpec",
    "FeatureSpec",
    "OnlineSpec",
    "SearchParam",
    "SourceSpec",
    "Spec",
    "WindowAgg",
    "arrow_type",
    "build_estimator",
    "evaluate",
    "load_spec",
    "names_in",
    "parse_duration",
    "parse_spec",
    "window_feature_names",
    "xgb_params",
]

if TYPE_CHECKING:
    from daybreak.spec._expr import evaluate, names_in


def __getattr__(name: str) -> Any:
    """The expression evaluator (on Arrow) is imported when first used: reading a spec, and so
    parsing a DAG file, never loads pyarrow."""
    if name in ("evaluate", "names_in"):
        from daybreak.spec import _expr

        return getattr(_expr, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
