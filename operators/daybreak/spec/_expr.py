"""A small, safe expression language evaluated column-wise on Arrow tables.

Specs carry expressions such as ``arr_delay > 15`` or ``time_hour + minutes(minute)``. They are
parsed with :mod:`ast` and never compiled or executed as Python: the evaluator walks the tree and
knows only arithmetic, comparisons, boolean logic, column names, literals and the functions in
``FUNCTIONS`` (each a ``pyarrow.compute`` kernel or a small wrapper of them); anything else
(attributes, subscripts, lambdas, other calls) is refused. So an *expression* can only compute
over the table's columns. (That a whole spec never runs code also rests on spec.py, which takes
``model.estimator`` only from allowed modules and never calls it while validating.)

Expressions are bounded: at most ``MAX_LENGTH`` characters and ``MAX_DEPTH`` levels of nesting,
checked before the parser recurses, so a hostile spec gets an error naming its field rather than
a RecursionError or MemoryError. Integer arithmetic is checked (``*_checked`` kernels): an int64
overflow raises an error naming the expression instead of wrapping around silently. Evaluation is
vectorised with ``pyarrow.compute``.
"""

from __future__ import annotations

import ast
import functools
import itertools
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

MAX_LENGTH = 10_000
"""Longest expression accepted, in characters."""
MAX_DEPTH = 100
"""Deepest nesting accepted: expression nodes from the root to the deepest leaf (``a + b + c`` is
3 levels, a chain of n additions n + 1)."""
# The cheap scan before parsing over-counts (every operator character at a bracket level counts
# as a level), so it refuses only far beyond MAX_DEPTH, well before the parser (fine to about
# 1,000 levels) could run out of stack; the exact check is on the parsed tree.
_SCAN_LIMIT = 4 * MAX_DEPTH
_INT64 = (-(2**63), 2**63 - 1)


class ExpressionError(ValueError):
    """An expression that cannot be accepted or computed: too long, too deep, an integer
    overflow. A ValueError, so validation reports it naming the field."""


def short(expr: str, n: int = 80) -> str:
    """The expression quoted for a message, cut to `n` characters (a hostile one may be huge)."""
    return repr(expr if len(expr) <= n else expr[:n] + "...")


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
    if any(b >= c for b, c in itertools.pairwise(bounds)):
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
    "abs": pc.abs_checked,
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

# Checked kernels: an integer result outside its type raises instead of wrapping around (floats
# keep IEEE semantics: inf). Division is always in float64.
_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: pc.add_checked,
    ast.Sub: pc.subtract_checked,
    ast.Mult: pc.multiply_checked,
    ast.Div: lambda a, b: pc.divide(pc.cast(a, pa.float64()), b),
    ast.Pow: pc.power_checked,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Gt: pc.greater,
    ast.GtE: pc.greater_equal,
    ast.Lt: pc.less,
    ast.LtE: pc.less_equal,
    ast.Eq: pc.equal,
    ast.NotEq: pc.not_equal,
}


def _scan_nesting(text: str) -> int:
    """A cheap upper estimate of how deep `text` nests, before parsing: open brackets plus the
    operators seen at each open bracket level (a chain ``a + b + c`` nests one level per
    operator; commas start a new argument). Comparisons, ``and`` and ``or`` are flat in the tree
    and not counted. Stops counting past the scan limit."""
    levels = [0]
    total = 0  # sum(levels): operators on the path to here
    quote = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if quote is not None:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{":
            levels.append(0)
        elif c in ")]}":
            if len(levels) > 1:
                total -= levels.pop()
        elif c == ",":
            total -= levels[-1]
            levels[-1] = 0
        elif c in "+-*/%~&|^@" or (c == "." and i + 1 < n and (text[i + 1].isalpha() or text[i + 1] == "_")):
            levels[-1] += 1
            total += 1
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            if text[i:j] in ("not", "lambda", "if"):
                levels[-1] += 1
                total += 1
            i = j
            continue
        if len(levels) + total > _SCAN_LIMIT:
            return len(levels) + total
        i += 1
    return len(levels) + total


def _tree_depth(tree: ast.AST) -> int:
    """Expression nodes on the longest path from the root (without recursion), stopping early
    past MAX_DEPTH."""
    worst = 0
    stack: list[tuple[ast.AST, int]] = [(tree, 1)]
    while stack:
        node, d = stack.pop()
        worst = max(worst, d)
        if worst > MAX_DEPTH:
            break
        stack.extend((c, d + isinstance(c, ast.expr)) for c in ast.iter_child_nodes(node))
    return worst


def _parse(expr: str) -> ast.expr:
    """Parse one expression, bounded: its length and nesting are checked before the parser
    recurses into it, and the parsed tree's depth after. The tree is shared (cached): read it,
    never change it."""
    if not isinstance(expr, str):
        raise ExpressionError(f"an expression must be text, not {type(expr).__name__}")
    return _parse_text(expr)


@functools.lru_cache(maxsize=1024)
def _parse_text(expr: str) -> ast.expr:
    """``_parse`` of text, once per text: a step evaluates the same few expressions on every slice
    it reads (a parse and its checks cost about as much as evaluating one on 10k rows)."""
    text = expr.strip()
    if len(text) > MAX_LENGTH:
        raise ExpressionError(f"expression is longer than {MAX_LENGTH} characters ({len(text)})")
    too_deep = ExpressionError(f"expression nests deeper than {MAX_DEPTH} levels")
    if _scan_nesting(text) > _SCAN_LIMIT:
        raise too_deep
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        if "too many nested" in str(e.msg):
            raise too_deep from None
        raise ExpressionError(f"cannot parse expression {short(expr)}: {e.msg}") from None
    except (RecursionError, MemoryError):  # the scan should have caught it; never a traceback
        raise too_deep from None
    if _tree_depth(tree) > MAX_DEPTH:
        raise too_deep
    return tree


def names_in(expr: str) -> set[str]:
    """Column names an expression reads."""
    tree = _parse(expr)
    called = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    # A column may share a function's name ('hour'); only a name being called is the function.
    return {
        n.id for n in ast.walk(tree)
        if isinstance(n, ast.Name) and id(n) not in called and n.id not in {"True", "False", "None"}
    }


def same_expression(a: str, b: str) -> bool:
    """Whether two expressions are the same once parsed (spacing and brackets aside)."""
    return ast.dump(_parse(a)) == ast.dump(_parse(b))


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
        raise type(e)(f"{where}: {e} (in {short(expr)})") from None


def evaluate(expr: str, table: pa.Table) -> pa.ChunkedArray:
    """Evaluate `expr` over `table`; scalars are broadcast to the table's length.

    Raises:
        ExpressionError: the expression is too long or too deep, or integer arithmetic in it
            overflows (naming the part that does and the whole expression).
    """
    tree = _parse(expr)
    try:
        out = _eval(tree, table)
    except ExpressionError as e:
        whole = ast.unparse(tree)
        raise ExpressionError(str(e) if f"in {short(whole)}:" in str(e) else f"{e} (in {short(expr)})") from None
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
        v = node.value
        if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            raise ExpressionError(f"integer {short(str(v), 30)} is out of range for int64 "
                                  "(write it as a float, e.g. 1e20)")
        return pa.scalar(v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _checked(node, _BINOPS[type(node.op)], _eval(node.left, t), _eval(node.right, t))
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, t)
        if isinstance(node.op, ast.USub):
            return _checked(node, pc.negate_checked, v)
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
        for op, comp in zip(node.ops, node.comparators, strict=False):
            if type(op) not in _CMPOPS:
                raise ValueError(f"comparison {type(op).__name__} is not supported")
            right = _eval(comp, t)
            res = _CMPOPS[type(op)](left, right)
            out = res if out is None else pc.and_kleene(out, res)
            left = right
        return out
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS:
        return _checked(node, FUNCTIONS[node.func.id], *[_eval(a, t) for a in node.args])
    raise ValueError(f"unsupported expression: {short(ast.unparse(node))}")


def _checked(node: ast.expr, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), with an integer overflow from a checked kernel named after the sub-expression."""
    try:
        return fn(*args)
    except pa.ArrowInvalid as e:
        if "overflow" not in str(e).lower():
            raise
        raise ExpressionError(f"integer overflow in {short(ast.unparse(node))}: the result does not fit in "
                              f"{_int_type(args)} (widen first: int(...) for int64, float(...) for larger "
                              "values)") from None


def _int_type(args: tuple[Any, ...]) -> str:
    for a in args:
        if pa.types.is_integer(getattr(a, "type", pa.null())):
            return str(a.type)
    return "its integer type"
