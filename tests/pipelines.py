"""A scikit-learn Pipeline named by import path in the training tests (`model.estimator`)."""

from __future__ import annotations


def scaled_logistic(C: float = 1.0, max_iter: int = 200):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def imputed_forest(n_estimators: int = 20):
    """Random inside a step: the train step must seed the step's random_state."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline

    return make_pipeline(SimpleImputer(), RandomForestClassifier(n_estimators=n_estimators, max_features=2))
