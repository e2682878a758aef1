"""daybreak as an Airflow provider: what ``airflow providers list`` shows, and the Connection types.

Registered by the ``apache_airflow_provider`` entry point (pyproject.toml). Airflow reads this
dict without importing the hooks: the form fields (``conn-fields``) and the field behaviour
(hidden fields, labels, placeholders) of the ``mlflow`` and ``ray`` Connection types are declared
here, which is how Airflow 3.2+ expects them. The Models page is an ``airflow.plugins`` entry
point (not listed here too, or Airflow would load it twice with lazy provider discovery off).
"""

from __future__ import annotations

from typing import Any

PACKAGE = "daybreak"

_FIELDS: dict[str, dict[str, Any]] = {
    "mlflow": {
        "hook-class-name": "daybreak.airflow.hooks.MlflowHook",
        "hook-name": "MLflow (daybreak)",
        "conn-fields": {
            "insecure_tls": {
                "label": "Skip TLS verification",
                "schema": {"type": ["boolean", "null"], "default": False},
                "description": "Only for a tracking server with a self-signed certificate.",
            },
        },
        "ui-field-behaviour": {
            "hidden-fields": ["schema", "port"],
            "relabeling": {"host": "Tracking URI", "login": "Username (basic auth only)",
                           "password": "Token (or basic-auth password)"},
            "placeholders": {"host": "http://mlflow.internal:5000",
                             "login": "leave empty for a bearer token",
                             "password": "sent as MLFLOW_TRACKING_TOKEN; never logged",
                             "extra": '{"tracking_uri": "databricks"}'},
        },
    },
    "ray": {
        "hook-class-name": "daybreak.airflow.hooks.RayHook",
        "hook-name": "Ray cluster (daybreak)",
        "conn-fields": {
            "address": {
                "label": "Address",
                "schema": {"type": ["string", "null"]},
                "description": "A full Ray address (e.g. ray://head:10001); overrides host and port.",
            },
        },
        "ui-field-behaviour": {
            "hidden-fields": ["login"],
            "relabeling": {"host": "Head node", "port": "GCS port (Ray Client: 10001)",
                           "schema": "Scheme (ray = Ray Client)", "password": "Auth token"},
            "placeholders": {"host": "ray-head.internal", "port": "6379", "schema": "empty, or ray",
                             "password": "the cluster's RAY_AUTH_TOKEN; never logged"},
        },
    },
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def get_provider_info() -> dict[str, Any]:
    """The provider metadata (Airflow's ``provider_info.schema.json``)."""
    return {
        "package-name": PACKAGE,
        "name": "daybreak",
        "description": "Daily retraining pipeline steps: stage, features on Ray, train, gate, promote, "
                       "deploy; MLflow and Ray connections; a Models page.",
        "versions": [_version()],
        "integrations": [{"integration-name": "daybreak", "tags": ["software"],
                          "external-doc-url": "https://pypi.org/project/daybreak/"}],
        "operators": [{"integration-name": "daybreak", "python-modules": ["daybreak.airflow.operators"]}],
        "hooks": [{"integration-name": "daybreak", "python-modules": ["daybreak.airflow.hooks"]}],
        "connection-types": [{"connection-type": conn_type, **fields} for conn_type, fields in _FIELDS.items()],
    }


def ui_field_behaviour(conn_type: str) -> dict[str, Any]:
    """The field behaviour in the hook-method shape (Airflow before 3.2)."""
    b = _FIELDS[conn_type]["ui-field-behaviour"]
    return {"hidden_fields": list(b["hidden-fields"]), "relabeling": dict(b["relabeling"]),
            "placeholders": dict(b["placeholders"])}


def form_widgets(conn_type: str) -> dict[str, Any]:
    """The extra fields as WTForms widgets (Airflow before 3.2, with Flask AppBuilder)."""
    try:
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import BooleanField, StringField
    except ImportError:
        return {}
    out: dict[str, Any] = {}
    for name, field in _FIELDS[conn_type]["conn-fields"].items():
        types = field["schema"]["type"]
        if "boolean" in types:
            out[name] = BooleanField(lazy_gettext(field["label"]), default=bool(field["schema"].get("default")))
        else:
            out[name] = StringField(lazy_gettext(field["label"]), widget=BS3TextFieldWidget())
    return out
