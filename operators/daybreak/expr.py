"""A small, safe expression language evaluated column-wise on Arrow tables.

Specs carry expressions such as ``arr_delay > 15`` or ``time_hour + minutes(minute)``. They are
parsed with :mod:`ast` and only arithmetic, comparisons, boolean logic, column names, literals
and the functions in ``FUNCTIONS`` are allowed, so a spec can never run arbitrary code.
Evaluation is vectorised with ``pyarrow.compute``.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


def _duration(unit_us: int) -> Callable[[Any], Any]:
    def f(x: Any) -> Any:
        # Fractions are fine (minutes(1.5)): whole microseconds, rounded.
        us = pc.round(pc.multiply(pc.cast(x, pa.float64()), float(unit_us)))
        return pc.cast(pc.cast(us, pa.int64()), pa.duration("us"))

    return f


def _local(ts: Any, tz: Any) -> Any:
    tz = tz.as_py() if isinstance(tz, pa.Scalar) else tz
    arr = ts if isinstance(ts, (pa.Array, pa.ChunkedArray)) else pa.array([ts])
    if getattr(arr.type, "tz", None) is None:
        raise ValueError("local() needs a time-zone-aware timestamp (declare it as timestamp[us, UTC])")
    return arr.cast(pa.timestamp(arr.type.unit, tz=str(tz)))


def _clip(x: Any, lo: Any, hi: Any) -> Any:
    return pc.min_element_wise(pc.max_element_wise(x, lo), hi)


def _as_array(x: Any) -> pa.ChunkedArray:
    if isinstance(x, pa.ChunkedArray):
        return x
    if isinstance(x, pa.Array):
        return pa.chunked_array([x], type=x.type)
    return pa.chunked_array([pa.array([x.as_py() if isinstance(x, pa.Scalar) else x])])


def _bucket(x: Any, *edges: Any) -> Any:
    """Index of the bucket x falls in: 0 below the first edge, i for edges[i-1] <= x < edges[i]."""
    import numpy as np

    bounds = [e.as_py() if isinstance(e, pa.Scalar) else e for e in edges]
    if not bounds or any(not isinstance(b, (int, float)) or isinstance(b, bool) for b in bounds):
        raise ValueError("bucket(x, e1, e2, ...) needs one or more numeric edges")
    if any(b >= c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"bucket() edges must increase strictly, got {bounds}")
    arr = _as_array(x).cast(pa.float64())
    values = arr.to_numpy()
    codes = np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="right")
    mask = arr.is_null().to_numpy() | np.isnan(values)
    return pa.array(codes, pa.int64(), mask=mask)


def _quantize(x: Any, step: Any) -> Any:
    """Round down to a multiple of `step` (e.g. quantize(amount, 10): 0, 10, 20, ...)."""
    return pc.multiply(pc.floor(pc.divide(pc.cast(x, pa.float64()), pc.cast(step, pa.float64()))),
                       pc.cast(step, pa.float64()))


def _ratio(a: Any, b: Any) -> Any:
    """a / b as a float; null where b is zero (rather than inf)."""
    b = pc.cast(b, pa.float64())
    return pc.if_else(pc.equal(b, 0.0), pa.scalar(None, pa.float64()), pc.divide(pc.cast(a, pa.float64()), b))


def _cross(*parts: Any) -> Any:
    """A categorical cross: the values joined with '|' ('JFK|LAX'); null if any part is null."""
    if len(parts) < 2:
        raise ValueError("cross() needs two or more arguments")
    strings = [pc.cast(p, pa.string()) for p in parts]
    return pc.binary_join_element_wise(*strings, "|", null_handling="emit_null")


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "seconds": _duration(1_000_000),
    "minutes": _duration(60_000_000),
    "hours": _duration(3_600_000_000),
    "days": _duration(86_400_000_000),
    "local": _local,
    "year": pc.year,
    "month": pc.month,
    "day": pc.day,
    "hour": pc.hour,
    "minute": pc.minute,
    "dayofweek": pc.day_of_week,  # Monday=0
    "dayofyear": pc.day_of_year,
    "log": pc.ln,
    "log1p": pc.log1p,
    "sqrt": pc.sqrt,
    "abs": pc.abs,
    "clip": _clip,
    "floor": pc.floor,
    "ceil": pc.ceil,
    "round": pc.round,
    "exp": pc.exp,
    "ratio": _ratio,
    "bucket": _bucket,
    "quantize": _quantize,
    "cross": _cross,
    "coalesce": pc.coalesce,
    "where": pc.if_else,
    "is_null": pc.is_null,
    "float": lambda x: pc.cast(x, pa.float64()),
    "int": lambda x: pc.cast(x, pa.int64()),
    "str": lambda x: pc.cast(x, pa.string()),
}

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: pc.add,
    ast.Sub: pc.subtract,
    ast.Mult: pc.multiply,
    ast.Div: lambda a, b: pc.divide(pc.cast(a, pa.float64()), b),
    ast.Pow: pc.power,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Gt: pc.greater,
    ast.GtE: pc.greater_equal,
    ast.Lt: pc.less,
    ast.LtE: pc.less_equal,
    ast.Eq: pc.equal,
    ast.NotEq: pc.not_equal,
}


def _parse(expr: str) -> ast.expr:
    try:
        return ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse expression {expr!r}: {e.msg}") from None


def names_in(expr: str) -> set[str]:
    """Column names an expression reads."""
    tree = _parse(expr)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    # A column may share a function's name ('hour'); only a name being called is the function.
    return {
        n.id for n in ast.walk(tree)
        if isinstance(n, ast.Name) and id(n) not in called and n.id not in {"True", "False", "None"}
    }


def check_expression(expr: str, columns: set[str], where: str) -> None:
    """Validate an expression's syntax, functions and column names; raise ValueError naming `where`."""
    try:
        tree = _parse(expr)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                    fn = ast.unparse(node.func)
                    raise ValueError(f"unknown function {fn!r}; allowed: {sorted(FUNCTIONS)}")
                if node.keywords:
                    raise ValueError("keyword arguments are not supported")
            elif isinstance(node, (ast.Attribute, ast.Subscript, ast.Lambda, ast.ListComp, ast.Starred)):
                raise ValueError(f"{type(node).__name__} is not allowed in expressions")
        unknown = names_in(expr) - columns
        if unknown:
            raise ValueError(f"unknown column(s) {sorted(unknown)}")
    except ValueError as e:
        raise ValueError(f"{where}: {e} (in {expr!r})") from None


def evaluate(expr: str, table: pa.Table) -> pa.ChunkedArray:
    """Evaluate `expr` over `table`; scalars are broadcast to the table's length."""
    out = _eval(_parse(expr), table)
    if isinstance(out, pa.Scalar) or not isinstance(out, (pa.Array, pa.ChunkedArray)):
        scalar = out if isinstance(out, pa.Scalar) else pa.scalar(out)
        out = pa.repeat(scalar, table.num_rows)
    if isinstance(out, pa.Array):
        out = pa.chunked_array([out], type=out.type)
    return out


def _eval(node: ast.expr, t: pa.Table) -> Any:
    if isinstance(node, ast.Name):
        if node.id not in t.column_names:
            raise KeyError(f"expression refers to missing column {node.id!r}")
        return t.column(node.id)
    if isinstance(node, ast.Constant):
        return pa.scalar(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left, t), _eval(node.right, t))
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, t)
        if isinstance(node.op, ast.USub):
            return pc.negate(v)
        if isinstance(node.op, ast.Not):
            return pc.invert(v)
    if isinstance(node, ast.BoolOp):
        fn = pc.and_kleene if isinstance(node.op, ast.And) else pc.or_kleene
        vals = [_eval(v, t) for v in node.values]
        out = vals[0]
        for v in vals[1:]:
            out = fn(out, v)
        return out
    if isinstance(node, ast.Compare):
        left = _eval(node.left, t)
        out = None
        for op, comp in zip(node.ops, node.comparators):
            if type(op) not in _CMPOPS:
                raise ValueError(f"comparison {type(op).__name__} is not supported")
            right = _eval(comp, t)
            res = _CMPOPS[type(op)](left, right)
            out = res if out is None else pc.and_kleene(out, res)
            left = right
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        return FUNCTIONS[node.func.id](*[_eval(a, t) for a in node.args])
    raise ValueError(f"unsupported expression: {ast.unparse(node)!r}")
