"""The native model of a daybreak version, for tools built on MLflow's native flavors
(``mlflow.xgboost.load_model``, SHAP's explainers).

Training logs one MLflow model per version whose MLmodel carries two flavors over the same files:

* ``python_function``: model_code.py, which takes the *raw* feature columns (categoricals as text),
  encodes them with the encoders fitted at training (artifacts/meta.json) and predicts;
* the native flavor: ``xgboost`` (the booster, artifacts/model.ubj; ``mlflow.xgboost.load_model``
  returns an ``xgboost.Booster``) or ``sklearn`` (the estimator's skops file, artifacts/model.skops,
  with ``serialization_format: skops``: never a pickle). The native model takes the *encoded*
  matrix, one float column per encoded feature: ``NativeModel.encode`` builds it from raw rows.

Both flavors name the same model file, so the digest of the version's files that the registry
holds, and that daybreak checks before loading anything, covers the native model's bytes too
(``registry._check_entry`` refuses a native entry that names another file, a pickle or code).
``load_native`` checks that digest; MLflow's own loaders do not: they open whatever the artifact
store holds. ``mlflow.sklearn.load_model`` builds the types the MLmodel beside the file lists (and
would unpickle a file whose MLmodel says pickle: MLflow 3.17 allows that unless
MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false); ``load_native`` takes the types from the registry
instead. Use MLflow's loaders only where the artifact store is trusted. A many-model version
(``model.partition_by``) has no native flavor: it is one model per partition, routed by
model_code.py.

    from daybreak.train import load_native
    native = load_native("http://mlflow:5000", "flights_delay", "7")  # refused if a file changed
    X = native.encode(rows[native.features])  # raw rows -> the encoded matrix, named columns
    shap_values = shap.TreeExplainer(native.model).shap_values(X)
    # MLflow's loader, unchecked: mlflow.xgboost.load_model("models:/flights_delay/7").predict(xgb.DMatrix(X))
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import IntegrityError
from daybreak.train.model_code import encode, encoded_names, legacy_encoders, predict_matrix

# The key of each native flavor's entry that names the model file.
MODEL_FILE_KEY = {"xgboost": "data", "sklearn": "pickled_model"}


def native_flavor(flavor: str, model_file: str, trusted_types: list[str]) -> dict[str, dict[str, Any]]:
    """The native flavor's MLmodel entry for a model file at `model_file` (relative to the model
    folder), as ``mlflow.xgboost.save_model`` / ``mlflow.sklearn.save_model`` (skops) write it."""
    if flavor == "xgboost":
        import xgboost as xgb

        return {"xgboost": {"xgb_version": xgb.__version__, "data": model_file, "model_class": "xgboost.core.Booster",
                            "model_format": "ubj", "code": None}}
    import sklearn

    return {"sklearn": {"pickled_model": model_file, "sklearn_version": sklearn.__version__,
                        "serialization_format": "skops", "code": None, "skops_trusted_types": list(trusted_types)}}


class PyfuncWithNative:
    """``mlflow.pyfunc`` as the flavor module of ``mlflow.models.Model.log`` (the documented hook:
    Model.log calls the module's ``save_model``), adding native flavor entries to the MLmodel
    before the folder is uploaded. The pyfunc part is ``mlflow.pyfunc.save_model``'s, unchanged."""

    def __init__(self, native: dict[str, dict[str, Any]]) -> None:
        self.native = native

    def save_model(self, path: str, mlflow_model: Any, **kwargs: Any) -> None:
        import mlflow
        from mlflow.models.model import MLMODEL_FILE_NAME

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        for flavor, conf in self.native.items():
            if not Path(path, conf[MODEL_FILE_KEY[flavor]]).is_file():
                raise RuntimeError(f"the {flavor} flavor names {conf[MODEL_FILE_KEY[flavor]]}, which the pyfunc "
                                   "did not save")
            mlflow_model.add_flavor(flavor, **conf)
        if self.native:
            mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


@dataclass
class NativeModel:
    """A version's native model (``model``: an ``xgboost.Booster`` or the scikit-learn estimator)
    and what turns raw feature rows into its input."""

    model: Any
    flavor: str  # xgboost | sklearn
    task: str
    features: list[str]  # the raw feature columns the pyfunc takes
    encoders: dict[str, dict[str, Any]]

    @property
    def names(self) -> list[str]:
        """The encoded columns, as the native model names its features (one-hot: one per category)."""
        return encoded_names(self.features, self.encoders)

    def encode(self, frame: Any) -> pd.DataFrame:
        """Raw feature rows (what the pyfunc takes: a DataFrame with the ``features`` columns) -> the
        matrix the native model takes, float32, with the model's feature names as columns: the
        encoding the pyfunc applies before it predicts."""
        index = frame.index if isinstance(frame, pd.DataFrame) else None
        return pd.DataFrame(encode(frame, self.features, self.encoders), columns=self.names, index=index)

    def predict(self, frame: Any) -> np.ndarray:
        """The pyfunc's predictions for raw rows, through the native model."""
        return predict_matrix(self.model, encode(frame, self.features, self.encoders), self.flavor, self.task,
                              self.names)


def load_native(ctx: RunContext | str, name: str, version: str) -> NativeModel:
    """The native model of a registered version, after every file passed the digest the registry
    holds (IntegrityError otherwise). `ctx` is a run context or the tracking URI. A scikit-learn
    model is built with exactly the types the registry recorded at training."""
    import mlflow

    from daybreak.infra.yamlio import load_yaml

    with tempfile.TemporaryDirectory(prefix="daybreak-native-") as tmp:
        local, config = registry.verified_folder(ctx, name, version, tmp)
        mlmodel = load_yaml(Path(local, "MLmodel").read_bytes(), origin=f"model {name} version {version} MLmodel",
                            error=IntegrityError)
        native = sorted(set(mlmodel["flavors"]) & set(MODEL_FILE_KEY))
        meta = json.loads(Path(local, "artifacts", "meta.json").read_text())
        if not native:
            why = ("a many-model version (model.partition_by) is one model per partition"
                   if meta.get("partition_by") else "it was trained before daybreak logged one: retrain it")
            raise ValueError(f"model {name} version {version} has no native flavor: {why}")
        if config is None or config["flavor"] != native[0]:
            raise IntegrityError(f"model {name} version {version}: the registry records flavor "
                                 f"{None if config is None else config['flavor']!r}, its MLmodel {native[0]!r}; "
                                 "refusing to load")
        if native[0] == "xgboost":
            model = mlflow.xgboost.load_model(local)  # the MLmodel checked: a Booster from the digested file
        else:
            model = _load_skops(Path(local, mlmodel["flavors"]["sklearn"]["pickled_model"]),
                                set(config.get("trusted_types") or []))
    return NativeModel(model, native[0], meta["task"], meta["features"], legacy_encoders(meta))


def _load_skops(path: Path, trusted: set[str]) -> Any:
    import skops.io as sio

    found = set(sio.get_untrusted_types(file=path))
    if found - trusted:
        raise IntegrityError(f"model file holds types not recorded at training: {sorted(found - trusted)}")
    return sio.load(path, trusted=sorted(found))
