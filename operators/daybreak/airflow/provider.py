"""daybreak as an Airflow provider: what ``airflow providers list`` shows, and the Connection types.

Registered by the ``apache_airflow_provider`` entry point (pyproject.toml). Airflow reads this
dict without importing the hooks: the form fields (``conn-fields``) and the field behaviour
(hidden fields, labels, placeholders) of the ``daybreak_mlflow`` and ``daybreak_ray`` Connection
types are declared here, which is how Airflow 3.2+ expects them.

The types are namespaced: a bare ``ray`` is another provider's type too (Airflow keeps the first
provider's form and hook for a type both declare). Connections saved with the old types ``mlflow``
and ``ray`` keep working: the hooks read any Connection by its id and warn about the old type
(:data:`LEGACY_CONN_TYPES`); they are no longer declared, so the UI shows them with the generic
form until their type is changed.

The Models page is an ``airflow.plugins`` entry point (not listed here too, or Airflow would load
it twice with lazy provider discovery off).
"""

from __future__ import annotations

from typing import Any

PACKAGE = "daybreak"

MLFLOW_CONN_TYPE = "daybreak_mlflow"
RAY_CONN_TYPE = "daybreak_ray"
# the types before they were namespaced -> the type that replaced them
LEGACY_CONN_TYPES = {"mlflow": MLFLOW_CONN_TYPE, "ray": RAY_CONN_TYPE}
# Where the provider's documentation is: the package's own Documentation URL (pyproject.toml
# [project.urls]); this when the package metadata is not installed (a source tree).
DOCS_URL = "https://github.com/daybreak-ml/daybreak#readme"

_FIELDS: dict[str, dict[str, Any]] = {
    MLFLOW_CONN_TYPE: {
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
    RAY_CONN_TYPE: {
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


def docs_url() -> str:
    """The Documentation URL of the installed package (``[project.urls]``), else :data:`DOCS_URL`."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata(PACKAGE).get_all("Project-URL") or []
    except PackageNotFoundError:
        return DOCS_URL
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() == "documentation" and url.strip():
            return url.strip()
    return DOCS_URL


def get_provider_info() -> dict[str, Any]:
    """The provider metadata (Airflow's ``provider_info.schema.json``)."""
    return {
        "package-name": PACKAGE,
        "name": "daybreak",
        "description": "Daily retraining pipeline steps: stage, features on Ray, train, gate, promote, "
                       "deploy; MLflow and Ray connections; a Models page.",
        "versions": [_version()],
        "integrations": [{"integration-name": "daybreak", "tags": ["software"],
                          "external-doc-url": docs_url()}],
        "operators": [{"integration-name": "daybreak", "python-modules": ["daybreak.airflow.operators"]}],
        "hooks": [{"integration-name": "daybreak", "python-modules": ["daybreak.airflow.hooks"]}],
        "connection-types": [{"connection-type": conn_type, **fields} for conn_type, fields in _FIELDS.items()],
    }


def ui_field_behaviour(conn_type: str) -> dict[str, Any]:
    """The field behaviour in the hook-method shape (Airflow before 3.2)."""
    b = _FIELDS[LEGACY_CONN_TYPES.get(conn_type, conn_type)]["ui-field-behaviour"]
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
    for name, field in _FIELDS[LEGACY_CONN_TYPES.get(conn_type, conn_type)]["conn-fields"].items():
        types = field["schema"]["type"]
        if "boolean" in types:
            out[name] = BooleanField(lazy_gettext(field["label"]), default=bool(field["schema"].get("default")))
        else:
            out[name] = StringField(lazy_gettext(field["label"]), widget=BS3TextFieldWidget())
    return out
