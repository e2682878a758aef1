"""A spec can never run code, and every part of it is bounded (issue 20, items 2 and 3).

Spec authors are trusted to describe data, not to run code: estimators come only from allowed
modules (scikit-learn, xgboost, plus modules an operator allows in the environment, never in the
spec), validation imports and inspects but never calls them, YAML aliases and sizes are bounded,
and expressions are bounded in length and depth with checked integer arithmetic.

Each attack runs through the real CLI (``daybreak validate`` in a subprocess) as well as in
process. On the code before the fix: the Popen spec created its marker file and exited 1; the
billion-laughs spec ran out of its 3 GiB address space (exit 1, MemoryError) or hit the timeout;
the deep and long expressions exited 1 with a RecursionError traceback; ``2**64`` validated
(exit 0) and evaluated to 0.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from daybreak.infra.errors import SpecError
from daybreak.spec import build_estimator, evaluate, load_spec, parse_spec
from daybreak.spec._expr import check_expression

# The limits are part of the contract (and spelt out here, so the suite also runs on older code).
ALLOW_ENV = "DAYBREAK_ALLOWED_ESTIMATOR_MODULES"
MAX_DEPTH = 100
MAX_LENGTH = 10_000
MAX_SPEC_BYTES = 2**20

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "flights.yaml"
DAYBREAK = Path(sys.executable).parent / "daybreak"


def _raw() -> dict:
    return yaml.safe_load(SPEC.read_text())  # our own spec: plain data


def _with_model(**model) -> dict:
    raw = _raw()
    raw["model"] = {"name": "evil", **model}
    return raw


def _with_column_expr(expr: str) -> dict:
    raw = _raw()
    raw["features"]["columns"][0]["expr"] = expr
    return raw


def _write(tmp_path: Path, raw: dict | str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False))
    return p


def _limit_memory(gib: float):
    """preexec_fn: cap the child's address space, so an attack that grows memory fails fast
    without hurting the machine (a normal `daybreak validate` of an xgboost spec maps about
    1 GiB; native thread pools of scipy/OpenBLAS need more, so only the YAML attack is capped)."""
    lim = int(gib * 2**30)

    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    return pre


def validate(spec: Path, env: dict[str, str] | None = None, timeout: float = 120,
             gib: float | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """`daybreak validate --spec` in a subprocess, without any operator allow-list unless `env`
    gives one; returns the process and its wall time."""
    base = {k: v for k, v in os.environ.items() if k != ALLOW_ENV}
    t0 = time.monotonic()
    proc = subprocess.run([str(DAYBREAK), "validate", "--spec", str(spec)], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limit_memory(gib) if gib else None)
    return proc, time.monotonic() - t0


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


# --- 1. estimators: allowed modules only; validation never calls them ------------------------------

def test_popen_estimator_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """The attack: `subprocess.Popen` as the estimator ran `touch` during `daybreak validate`."""
    marker = tmp_path / "pwned"
    spec = _write(tmp_path, _with_model(flavor="sklearn", estimator="subprocess.Popen",
                                        params={"args": f"touch {marker}", "shell": True}))
    proc, _ = validate(spec)
    time.sleep(1.0)  # a shell started by the old code touches the marker a moment later
    assert not marker.exists(), "the spec ran a shell command"
    assert proc.returncode == 3, proc.stderr[-2000:]
    _no_traceback(proc)
    assert "model.estimator" in proc.stderr and "'subprocess.Popen'" in proc.stderr
    assert ALLOW_ENV in proc.stderr  # how an operator extends the allow-list
    # the allow-list is out of band only: the spec cannot name a module into it
    raw = _with_model(flavor="sklearn", estimator="subprocess.Popen", params={"args": f"touch {marker}"})
    raw[ALLOW_ENV] = "subprocess"
    proc, _ = validate(_write(tmp_path, raw, "second.yaml"))
    time.sleep(0.5)
    assert proc.returncode == 3 and not marker.exists()


@pytest.mark.parametrize("path, why", [
    ("os.system", "not in an allowed module"),
    ("builtins.eval", "not in an allowed module"),
    ("subprocess.check_output", "not in an allowed module"),
    ("sklearnx.Popen", "not in an allowed module"),  # a prefix of a name is not the module
    # functions in scikit-learn run code: refused, whatever their module
    ("sklearn.utils._testing.assert_run_python_script_without_output", "is a function"),
    # names re-exported into scikit-learn from elsewhere are judged by their own module
    ("sklearn.utils._testing.check_output", "defined in 'subprocess'"),
    ("sklearn.utils._testing.TimeoutExpired", "defined in 'subprocess'"),
    # a scikit-learn class that is not an estimator with fit and predict
    ("sklearn.preprocessing.StandardScaler", "no fit/predict (predict missing)"),
    ("sklearn.utils.Bunch", "not a scikit-learn estimator"),
    ("sklearn.ensemble.NoSuchForest", "cannot import"),
])
def test_estimators_outside_the_allow_list_are_refused(path: str, why: str, monkeypatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(SpecError) as e:
        parse_spec(_with_model(flavor="sklearn", estimator=path, params={"args": "true"}))
    assert "model.estimator" in str(e.value) and why in str(e.value), str(e.value)


def test_a_class_planted_in_sklearn_is_judged_by_its_own_module(monkeypatch) -> None:
    import sklearn.ensemble

    monkeypatch.setattr(sklearn.ensemble, "Planted", subprocess.Popen, raising=False)
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(SpecError, match="defined in 'subprocess'"):
        parse_spec(_with_model(flavor="sklearn", estimator="sklearn.ensemble.Planted", params={"args": "true"}))


def test_modules_outside_the_allow_list_are_never_imported(tmp_path: Path, monkeypatch) -> None:
    """The allow-list is checked on the import path before anything is imported: a module's
    import-time code runs only once an operator allowed it."""
    marker = tmp_path / "imported"
    (tmp_path / "sneaky_mod.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                            "def make():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(SpecError, match=f"model.estimator: 'sneaky_mod.make' is not in an allowed module.*{ALLOW_ENV}"):
        parse_spec(_with_model(flavor="sklearn", estimator="sneaky_mod.make"))
    assert not marker.exists()


FACTORIES = textwrap.dedent("""
    import os
    from subprocess import Popen  # re-exported: never an estimator, even from an allowed module

    def scaled_logistic(C=1.0, marker=None):
        if marker:  # proves whether validation called the factory
            open(marker, "w").close()
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        return make_pipeline(StandardScaler(), LogisticRegression(C=C))

    def not_an_estimator(marker=None):
        return "nope"
""")


def test_operator_allowed_factories_are_inspected_not_called(tmp_path: Path, monkeypatch) -> None:
    """A factory in a module the operator allows (DAYBREAK_ALLOWED_ESTIMATOR_MODULES) passes
    validation by binding its parameters, without being called; training then calls it."""
    (tmp_path / "acme_models.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "called"
    raw = _with_model(flavor="sklearn", estimator="acme_models.scaled_logistic",
                      params={"C": 0.5, "marker": str(marker)})

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(SpecError, match="is not in an allowed module"):
        parse_spec(raw)

    monkeypatch.setenv(ALLOW_ENV, "other.pkg, acme_models")
    spec = parse_spec(raw)
    assert not marker.exists(), "validation called the factory"
    est = build_estimator(spec)  # training calls it
    assert marker.exists() and hasattr(est, "fit") and hasattr(est, "predict")

    with pytest.raises(SpecError, match=r"model.params: .*unexpected keyword argument 'gamma'"):
        parse_spec({**raw, "model": {**raw["model"], "params": {"gamma": 1}}})
    with pytest.raises(SpecError, match="defined in 'subprocess'"):
        parse_spec({**raw, "model": {**raw["model"], "estimator": "acme_models.Popen", "params": {}}})
    bad = parse_spec({**raw, "model": {**raw["model"], "estimator": "acme_models.not_an_estimator", "params": {}}})
    with pytest.raises(SpecError, match="no fit/predict"):
        build_estimator(bad)


def test_operator_allow_list_reaches_the_cli(tmp_path: Path) -> None:
    """The same through `daybreak validate`: the environment variable is the only way in."""
    (tmp_path / "acme_models.py").write_text(FACTORIES)
    marker = tmp_path / "called"
    spec = _write(tmp_path, _with_model(flavor="sklearn", estimator="acme_models.scaled_logistic",
                                        params={"C": 0.5, "marker": str(marker)}))
    path = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc, _ = validate(spec, env=path)
    assert proc.returncode == 3 and "model.estimator" in proc.stderr and ALLOW_ENV in proc.stderr, proc.stderr
    proc, _ = validate(spec, env={**path, ALLOW_ENV: "acme_models"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()


def test_sklearn_and_xgboost_estimators_are_still_checked(monkeypatch) -> None:
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    parse_spec(_with_model(flavor="sklearn", estimator="sklearn.ensemble.HistGradientBoostingClassifier",
                           params={"max_iter": 20}))
    parse_spec(_with_model(flavor="sklearn", estimator="xgboost.XGBClassifier", params={"n_estimators": 5}))
    with pytest.raises(SpecError, match=r"model.params.max_iter"):
        parse_spec(_with_model(flavor="sklearn", estimator="sklearn.ensemble.HistGradientBoostingClassifier",
                               params={"max_iter": -1}))
    with pytest.raises(SpecError, match=r"model.params: .*unexpected keyword"):
        parse_spec(_with_model(flavor="sklearn", estimator="sklearn.linear_model.LogisticRegression",
                               params={"args": "touch x"}))


def test_training_goes_through_the_allow_list(monkeypatch, tmp_path: Path) -> None:
    """build_estimator (train and tuning) refuses what validation refuses, even on a spec that
    was never validated (constructed directly)."""
    from daybreak.spec import Spec

    marker = tmp_path / "pwned"
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    spec = Spec.model_validate(_with_model(flavor="sklearn", estimator="subprocess.Popen",
                                           params={"args": f"touch {marker}", "shell": True}))
    with pytest.raises(SpecError, match=r"model.estimator"):
        build_estimator(spec)
    with pytest.raises(SpecError, match=r"model.estimator"):
        build_estimator(spec.model_copy(update={"model": spec.model.model_copy(
            update={"estimator": "sklearn.utils._testing.assert_run_python_script_without_output"})}))
    time.sleep(0.3)
    assert not marker.exists()


# --- 2. YAML: no aliases, bounded size ----------------------------------------------------------------

def _billion_laughs() -> str:
    """A ~6 KB spec whose model.params expand to 9**9 strings through nested aliases."""
    text = SPEC.read_text()
    levels = ['    l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        levels.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return text.replace("  params:\n", "  params:\n" + "\n".join(levels) + "\n", 1)


def test_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    """The attack: nested aliases in model.params grew `daybreak validate` past 1.2 GB."""
    spec = _write(tmp_path, _billion_laughs())
    assert spec.stat().st_size < 8000
    try:
        proc, took = validate(spec, timeout=60, gib=3)
    except subprocess.TimeoutExpired:
        pytest.fail("daybreak validate did not finish within 60 s on a 6 KB spec")
    assert proc.returncode == 3, proc.stderr[-2000:]
    _no_traceback(proc)
    assert "alias" in proc.stderr and "line" in proc.stderr
    assert took < 30


@pytest.mark.parametrize("text, msg", [
    ("name: a\nx: &anchor 1\ny: *anchor\n", r"line 2.*anchor"),
    ("name: a\nbase: &b {k: 1}\nother:\n  <<: *b\n", r"line 2.*anchor"),
    ("name: a\nx: " + "[" * 5000 + "]" * 5000 + "\n", "nests deeper"),
    ("name: a\nx: [" + "1, " * 150_000 + "1]\n", "more than 20000 YAML values"),
    ("name: a\nx: " + "9" * 5000 + "\n", "cannot read the YAML"),  # Python refuses the conversion
])
def test_yaml_anchors_aliases_deep_nesting_and_huge_documents_are_refused(tmp_path: Path, text: str, msg: str) -> None:
    with pytest.raises(SpecError, match=msg):
        load_spec(_write(tmp_path, text))


def test_spec_file_size_is_capped(tmp_path: Path) -> None:
    p = tmp_path / "big.yaml"
    p.write_text(SPEC.read_text() + "#" * (MAX_SPEC_BYTES + 1) + "\n")
    with pytest.raises(SpecError, match="larger than"):
        load_spec(p)


def test_plain_specs_load_and_keep_their_hashes() -> None:
    """The bounded loader reads the shipped specs exactly as before: same identities."""
    assert load_spec(SPEC).spec_hash() == parse_spec(_raw()).spec_hash()
    payments = ROOT / "specs" / "payments.yaml"
    assert load_spec(payments).feature_version() == parse_spec(yaml.safe_load(payments.read_text())).feature_version()


# --- 3. expressions: bounded, checked arithmetic ------------------------------------------------------

DEEP = {
    "unary": "-" * 2000 + "distance",
    "binary": "distance" + " + 1" * 2000,
    "long": "distance" + " + 0" * 25_000,  # 100k characters
    "brackets": "(" * 2000 + "distance" + ")" * 2000,
}


@pytest.mark.parametrize("kind", ["unary", "binary", "long"])
def test_deep_and_long_expressions_exit_2_naming_the_field(tmp_path: Path, kind: str) -> None:
    """The attack: 2,000-deep or 100k-long expressions gave a RecursionError traceback (exit 1)."""
    proc, _ = validate(_write(tmp_path, _with_column_expr(DEEP[kind])), timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    _no_traceback(proc)
    assert "features.columns[0].expr" in proc.stderr
    assert ("nests deeper than 100 levels" in proc.stderr) or (f"longer than {MAX_LENGTH}" in proc.stderr)
    assert len(proc.stderr) < 2000  # the message quotes the start of the expression, not all of it


@pytest.mark.parametrize("kind", list(DEEP))
def test_deep_expressions_in_process(kind: str) -> None:
    with pytest.raises(ValueError, match=r"features.columns\[0\].expr: expression (nests deeper|is longer)"):
        check_expression(DEEP[kind], {"distance"}, where="features.columns[0].expr")
    with pytest.raises(ValueError, match=r"nests deeper|is longer"):
        evaluate(DEEP[kind], pa.table({"distance": [1.0]}))


def test_depth_limit_is_exact_enough() -> None:
    cols = {"x"}
    check_expression("x" + " + 1" * (MAX_DEPTH - 5), cols, where="w")  # long but legal chains still pass
    check_expression("clip(x, 0, 10) * 2 + where(x > 3, log1p(x), -x) - abs(-x)", cols, where="w")
    with pytest.raises(ValueError, match="nests deeper than 100 levels"):
        check_expression("x" + " + 1" * (MAX_DEPTH + 5), cols, where="w")


def test_two_to_the_64_fails_at_validate(tmp_path: Path) -> None:
    """The attack: `2**64` silently evaluated to 0 (int64 wraparound) and the spec validated."""
    proc, _ = validate(_write(tmp_path, _with_column_expr("distance * 2**64")))
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    _no_traceback(proc)
    assert "features.columns[0].expr" in proc.stderr and "overflow" in proc.stderr


@pytest.mark.parametrize("expr", ["2**64", "10**10**10", "x * 2**62 * 4", "x + 9223372036854775807",
                                  "-(x - 9223372036854775807 - 2)", "abs(x - 9223372036854775807 - 2)",
                                  "18446744073709551616 + x"])
def test_integer_overflow_raises_naming_the_expression(expr: str) -> None:
    t = pa.table({"x": pa.array([1, 2], pa.int64())})
    with pytest.raises(ValueError, match=r"overflow|out of range") as e:
        evaluate(expr, t)
    assert "in '" in str(e.value)


def test_overflow_in_data_is_named_at_run_time_and_in_range_values_are_exact() -> None:
    t = pa.table({"x": pa.array([1, 2**62], pa.int64()), "f": [1.0, 2.0]})
    assert evaluate("x * 2 - 1", pa.table({"x": pa.array([1, 2**61])})).to_pylist() == [1, 2**62 - 1]
    assert evaluate("2**62 + (2**62 - 1)", t).to_pylist() == [2**63 - 1] * 2
    assert evaluate("f ** 2000", t).to_pylist()[1] == float("inf")  # floats keep IEEE semantics
    with pytest.raises(ValueError, match=r"integer overflow in 'x \* 4'"):
        evaluate("x * 4 + 1", t)
    # narrow contract types used to wrap too (100 + 100 = -56 in int8); now an error, or widen
    small = pa.table({"a": pa.array([100, 1], pa.int8()), "b": pa.array([100, 1], pa.int8())})
    with pytest.raises(ValueError, match=r"integer overflow in 'a \+ b': the result does not fit in int8"):
        evaluate("a + b", small)
    assert evaluate("int(a) + b", small).to_pylist() == [200, 2]


# --- 4. xgboost validation is bounded: size parameters, tuning choices, tuning bounds ------------------

def validate_measured(spec: Path, timeout: float = 90, gib: float = 6) -> tuple[int, str, float, float]:
    """`daybreak validate --spec` in a subprocess: exit code, stderr, wall seconds and the child's
    peak RSS in MiB (from wait4). The address space is capped at `gib` GiB so that the old code
    fails fast instead of taking the machine's memory; a timeout kills the child."""
    import signal

    base = {k: v for k, v in os.environ.items() if k != ALLOW_ENV}
    t0 = time.monotonic()
    with open(spec.with_suffix(".err"), "w+") as err:
        proc = subprocess.Popen([str(DAYBREAK), "validate", "--spec", str(spec)], env=base, stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=_limit_memory(gib))
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                os.wait4(proc.pid, 0)
                proc.returncode = -9  # the object must not wait for it again
                pytest.fail(f"daybreak validate did not finish within {timeout} s")
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read(), time.monotonic() - t0, usage.ru_maxrss / 1024


def _with_params(**params) -> dict:
    raw = _raw()
    raw["model"]["params"] = {**raw["model"]["params"], **params}
    return raw


def _with_tuning(space: dict) -> dict:
    raw = _raw()
    raw["model"]["tuning"] = {"space": space, "trials": 2}
    return raw


# Proven on the old code: 53.5 s and 4.4 GB; 15 s and 3.3 GB; 114 s of CPU for the 70 KB spec.
HEAVY = {
    "num_parallel_tree": (_with_params(num_parallel_tree=3_000_000), None),
    "num_parallel_tree as text": (_with_params(num_parallel_tree="3000000"), None),
    "num_class": (_with_params(objective="multi:softprob", num_class=200_000_000), None),
    "6000 tuning choices": (_with_tuning({"eta": {"choices": [round(0.01 + i * 1e-5, 6) for i in range(6000)]}}),
                            "model.tuning.space.eta.choices"),
}


@pytest.mark.parametrize("case", list(HEAVY))
def test_xgboost_validation_is_bounded_in_time_and_memory(tmp_path: Path, case: str) -> None:
    """The attack: `daybreak validate` trained a real round with the spec's sizes (millions of
    trees or classes), once per tuning choice. Now the sizes are clamped for the check and
    choices are capped: the spec validates, or is refused naming the field, in seconds."""
    raw, refused = HEAVY[case]
    code, err, took, rss = validate_measured(_write(tmp_path, raw))
    assert "Traceback" not in err, err[-2000:]
    if refused:
        assert code == 3, err[-2000:]
        assert refused in err and "at most 100" in err, err[-2000:]
    else:
        assert code == 0, err[-2000:]
    assert took < 20, f"took {took:.1f} s"
    assert rss < 1024, f"peak RSS {rss:.0f} MiB"


def test_size_clamp_keeps_invalid_values_invalid() -> None:
    """Only large positive sizes are clamped: zero, negative and non-integer sizes are still
    refused by xgboost, naming the field."""
    for params, field in [({"num_parallel_tree": 0}, "num_parallel_tree"), ({"max_depth": -1}, "max_depth"),
                          ({"max_bin": 1}, "max_bin"), ({"num_parallel_tree": 2.5}, "num_parallel_tree"),
                          ({"max_depth": "deep"}, "max_depth")]:
        with pytest.raises(SpecError, match=f"model.params.{field}"):
            parse_spec(_with_params(**params))
    with pytest.raises(SpecError, match=r"model.tuning.space.max_depth"):
        parse_spec(_with_tuning({"max_depth": {"choices": [3, 4, -2]}}))
    # large valid sizes still validate (training uses them as given)
    parse_spec(_with_params(max_depth=10_000, max_bin=10**9, max_leaves=10**9))


def test_a_hundred_choices_per_parameter_validate_quickly(tmp_path: Path) -> None:
    """Every tuning value is checked, with its sizes clamped and without a full training per value."""
    space = {"eta": {"choices": [round(0.01 + i * 1e-3, 4) for i in range(100)]},
             "num_parallel_tree": {"choices": [10**6 + i for i in range(100)]},
             "max_depth": {"low": 1, "high": 10**9, "integer": True}}
    code, err, took, rss = validate_measured(_write(tmp_path, _with_tuning(space)), timeout=60)
    assert code == 0, err[-2000:]
    assert took < 20 and rss < 1024, (took, rss)
    with pytest.raises(SpecError, match=r"model.tuning.space.eta.choices.*at most 100"):
        parse_spec(_with_tuning({"eta": {"choices": [0.1] * 101}}))


@pytest.mark.parametrize("bounds, field", [
    ({"max_depth": {"low": 1, "high": float("inf"), "integer": True}}, "max_depth"),
    ({"max_depth": {"low": float("-inf"), "high": 5, "integer": True}}, "max_depth"),
    ({"eta": {"low": float("nan"), "high": 0.3}}, "eta"),
    ({"eta": {"low": 0.01, "high": float("nan")}}, "eta"),
    ({"eta": {"low": 0.01, "high": float("inf"), "log": True}}, "eta"),
    ({"eta": {"choices": [0.1, float("nan")]}}, "eta"),
])
def test_infinite_and_nan_tuning_bounds_exit_2_naming_the_field(tmp_path: Path, bounds: dict, field: str) -> None:
    """The attack: `high: .inf` with `integer: true` raised OverflowError (exit 1, raw error)."""
    proc, _ = validate(_write(tmp_path, _with_tuning(bounds)))
    assert proc.returncode == 3, proc.stderr[-2000:]
    _no_traceback(proc)
    # (the message itself: the test's folder name holds "finite" too)
    assert re.search(rf"model\.tuning\.space\.{field}[.\w]*: [^\n]*not a finite number", proc.stderr), proc.stderr
