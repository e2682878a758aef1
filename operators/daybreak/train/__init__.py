"""Step 4, train: a window of features -> a candidate model version in the MLflow registry.

(Step 3, monitor, judges the served model first: see ``daybreak.monitor``.)
"""

from daybreak.train._training import TrainResult, recorded_lineage, train_model
from daybreak.train.native import NativeModel, load_native

__all__ = ["NativeModel", "TrainResult", "load_native", "recorded_lineage", "train_model"]
