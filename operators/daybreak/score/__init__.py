"""Batch scoring: the champion's predictions for a date's features, written to the store.
"""

from daybreak.score._score import ScoreResult, batch_score, prediction_zone, recorded_lineage

__all__ = ["ScoreResult", "batch_score", "prediction_zone", "recorded_lineage"]
