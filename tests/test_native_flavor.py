"""The native flavor beside the pyfunc (issue 26, item 6): a daybreak version opens with
``mlflow.xgboost.load_model`` (and, for scikit-learn, ``mlflow.sklearn.load_model`` from a skops
file, never a pickle) and predicts what the pyfunc predicts; its bytes are under the registry's
digest like every other file. Real parts: the real train step on the flights features, a sqlite
registry whose artifact store is a folder, MLflow's own loaders."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import xgboost as xgb
import yaml
from test_model_integrity import model_dir

from daybreak.gate import holdout
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import IntegrityError
from daybreak.train import train_model
from daybreak.train.native import load_native

REFUSAL = "refusing to load"


def _sklearn(spec):
    return spec.model_copy(update={"model": spec.model.model_copy(update={
        "flavor": "sklearn", "estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
        "params": {"max_iter": 20}})})


def _trained(spec) -> tuple[RunContext, str, object]:
    ctx = RunContext.create("2013-01-02")
    version = train_model(spec, ctx)["model_version"]
    registry.use_uri(ctx.tracking_uri)  # mlflow.<flavor>.load_model resolves models:/ through it
    return ctx, version, holdout(spec, ctx)[spec.features.feature_names()]


def _flavors(name: str, version: str) -> dict:
    return yaml.safe_load((model_dir(name, version) / "MLmodel").read_text())["flavors"]


def test_mlflow_xgboost_load_model_opens_the_version_and_predicts_as_the_pyfunc(fresh: Path, spec) -> None:
    ctx, v, rows = _trained(spec)
    name = spec.model.name
    flavors = _flavors(name, v)
    assert set(flavors) == {"python_function", "xgboost"}
    # one file for both: the pyfunc's booster is the native model
    pyfunc_file = flavors["python_function"]["artifacts"]["model"]["path"]
    assert flavors["xgboost"]["data"] == pyfunc_file == "artifacts/model.ubj"

    booster = mlflow.xgboost.load_model(registry.model_uri(name, v))
    assert isinstance(booster, xgb.Booster)
    pyfunc = np.asarray(registry.load_model(ctx, name, v).predict(rows), dtype=np.float64)
    native = load_native(ctx, name, v)  # the documented way to the encoded matrix
    X = native.encode(rows)  # raw feature columns -> the booster's encoded, named columns
    assert list(X.columns) == booster.feature_names and len(X) == len(rows) > 100
    assert X.shape[1] > len(native.features) or native.encoders, "nothing categorical was encoded"
    np.testing.assert_array_equal(booster.predict(xgb.DMatrix(X)), pyfunc)
    np.testing.assert_array_equal(native.predict(rows), pyfunc)
    # the pyfunc as MLflow loads it from the registry is unchanged by the second flavor
    np.testing.assert_array_equal(mlflow.pyfunc.load_model(registry.model_uri(name, v)).predict(rows), pyfunc)


def test_sklearn_native_flavor_is_skops_and_no_pickle_is_logged(fresh: Path, spec,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    s = _sklearn(spec)
    ctx, v, rows = _trained(s)
    name = s.model.name
    folder = model_dir(name, v)
    flavors = _flavors(name, v)
    assert set(flavors) == {"python_function", "sklearn"}
    conf = flavors["sklearn"]
    assert conf["serialization_format"] == "skops" and conf["pickled_model"] == "artifacts/model.skops"
    trusted = json.loads(registry.client(ctx).get_model_version(name, v).tags[registry.TRUSTED_TYPES_TAG])
    assert conf["skops_trusted_types"] == trusted
    # no pickle anywhere in the version: no such file, and no file that starts as one (protocol 2+)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".cloudpickle")], files
    assert not [p for p in files if p.read_bytes()[:1] == b"\x80"], files

    pyfunc = np.asarray(registry.load_model(ctx, name, v).predict(rows), dtype=np.float64)
    native = load_native(ctx, name, v)  # daybreak's loader: the registry's types, no MLflow opt-in needed
    np.testing.assert_array_equal(native.predict(rows), pyfunc)
    # MLflow's own loader opens it (MLflow 3.17 deserializes by default); where a user turned that
    # off (MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false, which refuses skops too), daybreak's still opens it
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    est = mlflow.sklearn.load_model(registry.model_uri(name, v))
    np.testing.assert_array_equal(est.predict_proba(native.encode(rows).to_numpy())[:, 1], pyfunc)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(mlflow.exceptions.MlflowException, match="MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        mlflow.sklearn.load_model(registry.model_uri(name, v))
    np.testing.assert_array_equal(load_native(ctx, name, v).predict(rows), pyfunc)  # daybreak's: still opens


def test_a_tampered_native_model_file_is_refused(fresh: Path, spec, tmp_path: Path) -> None:
    """Another valid booster in place of the native file (what MLflow's loader would open without
    a word): daybreak's loaders refuse the version before reading it."""
    ctx, v, _ = _trained(spec)
    name = spec.model.name
    target = model_dir(name, v) / _flavors(name, v)["xgboost"]["data"]
    other = xgb.train({"objective": "binary:logistic"}, xgb.DMatrix(np.random.default_rng(0).random((50, 3)),
                                                                     label=np.arange(50) % 2), num_boost_round=2)
    other.save_model(tmp_path / "other.ubj")
    target.write_bytes((tmp_path / "other.ubj").read_bytes())
    for load in (registry.verify_model, registry.load_model, load_native):
        with pytest.raises(IntegrityError, match=REFUSAL) as e:
            load(ctx, name, v)
        assert f"{name} version {v}" in str(e.value) and registry.MODEL_DIGEST_TAG in str(e.value)


@pytest.mark.parametrize(("key", "value"), [("data", "artifacts/meta.json"), ("model_class", "xgboost.XGBClassifier"),
                                            ("code", "artifacts")])
def test_a_changed_native_entry_is_refused_even_on_the_legacy_record(fresh: Path, spec, key: str, value: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The legacy record (trusted unsealed) covers model_code.py and artifacts/ only, not MLmodel:
    there, the check of MLmodel's entries is what keeps the native flavor on the pyfunc's file."""
    ctx, v, _ = _trained(spec)
    name, cl = spec.model.name, registry.client(ctx)
    folder = model_dir(name, v)
    cl.delete_model_version_tag(name, v, registry.MODEL_DIGEST_TAG)
    cl.set_model_version_tag(name, v, registry.ARTIFACTS_TAG,
                             registry.artifacts_digest(registry.loaded_files(folder)))
    monkeypatch.setenv(registry.TRUST_UNSEALED_ENV, "1")
    registry.verify_model(ctx, name, v)  # untouched: passes on the legacy record
    conf = yaml.safe_load((folder / "MLmodel").read_text())
    conf["flavors"]["xgboost"][key] = value
    (folder / "MLmodel").write_text(yaml.safe_dump(conf))
    with pytest.raises(IntegrityError, match="xgboost flavor is not the one training logged"):
        registry.verify_model(ctx, name, v)
