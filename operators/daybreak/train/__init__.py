"""Step 4, train: a window of features -> a candidate model version in the MLflow registry.

(Step 3, monitor, judges the served model first: see ``daybreak.monitor``.)
"""

from daybreak.train._training import TrainResult, recorded_lineage, train_model

__all__ = ["TrainResult", "recorded_lineage", "train_model"]
