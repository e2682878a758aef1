"""The served model, logged to MLflow as code (no pickle): an xgboost booster plus its encoders.

MLflow executes this file to rebuild the model, so it depends only on numpy, pandas, xgboost
and mlflow, never on daybreak itself: ``mlflow models serve`` can load it too. Training imports
``encode`` from here so that training and serving turn rows into numbers the same way.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
import pandas as pd


def encode(frame: pd.DataFrame, features: list[str], categories: dict[str, list[str]]) -> np.ndarray:
    """Feature frame -> float32 matrix. Categoricals become their index in the training categories;
    unseen or missing values become NaN, which xgboost treats as missing."""
    missing = [c for c in features if c not in frame.columns]
    if missing:
        raise ValueError(f"input is missing feature column(s) {missing}")
    out = np.empty((len(frame), len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        col = frame[name]
        if name in categories:
            codes = pd.Categorical(col.astype("object").where(col.notna(), None), categories=categories[name]).codes
            out[:, j] = np.where(codes < 0, np.nan, codes)
        else:
            out[:, j] = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return out


class DaybreakXGBModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import xgboost as xgb

        with open(context.artifacts["meta"]) as f:
            meta = json.load(f)
        self.features: list[str] = meta["features"]
        self.categories: dict[str, list[str]] = meta["categories"]
        self.task: str = meta["task"]
        self.booster = xgb.Booster()
        self.booster.load_model(context.artifacts["model"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import xgboost as xgb

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        X = encode(model_input, self.features, self.categories)
        return self.booster.predict(xgb.DMatrix(X, missing=np.nan, feature_names=self.features))


mlflow.models.set_model(DaybreakXGBModel())
