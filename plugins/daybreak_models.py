"""The daybreak Models page, for an Airflow whose plugins folder is this directory.

Installing daybreak (``pip install daybreak[airflow]``) already registers the plugin through its
``airflow.plugins`` entry point; this file then does nothing, so Airflow does not load it twice.
It only adds the plugin when daybreak is importable but its entry point is not installed (for
example, ``operators/`` put on ``PYTHONPATH`` instead of installing the package).
"""

from importlib.metadata import entry_points

if not any(ep.value.startswith("daybreak.") for ep in entry_points(group="airflow.plugins")):
    from daybreak.airflow.plugin import DaybreakPlugin  # noqa: F401  (Airflow finds it in this module)
