"""Airflow hooks: where daybreak's services are and the credentials to reach them, from Connections.

Credentials live in Airflow Connections (the metastore, ``AIRFLOW_CONN_*`` or a secrets backend),
never in DAG files or XComs. A hook resolves a Connection into what a step needs: a tracking URI,
a Ray address, S3 settings. Tokens go to the process environment that the MLflow and Ray clients
read and are registered with Airflow's secrets masker so task logs show ``***`` instead.

The Connection types ``daybreak_mlflow`` and ``daybreak_ray`` (form fields, labels, placeholders)
are declared in :mod:`daybreak.airflow.provider`; the ``get_ui_field_behaviour`` /
``get_connection_form_widgets`` methods below only serve Airflow versions before 3.2, which read
them from the hook. A Connection of the old type ``mlflow`` or ``ray`` still works, with a
:class:`ConnectionTypeDeprecationWarning` (and a warning in the task log) saying which type to set.

S3 credentials (:func:`storage_options`) come from the Amazon provider's ``AwsBaseHook`` when
``apache-airflow-providers-amazon`` is installed and the Connection is of type ``aws``: its roles,
``role_arn`` assume-role, web identity and profiles all work. Otherwise the Connection's fields are
read as they are (login = access key, password = secret key).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from airflow.sdk import BaseHook

from daybreak.airflow.provider import LEGACY_CONN_TYPES, MLFLOW_CONN_TYPE, RAY_CONN_TYPE

log = logging.getLogger(__name__)


class ConnectionTypeDeprecationWarning(DeprecationWarning):
    """A Connection saved with a type from before the types were namespaced (``mlflow``, ``ray``)."""


def _checked_type(conn: Any, conn_id: str, conn_type: str) -> Any:
    """`conn`, after a deprecation warning when its type is the old name of `conn_type`."""
    old = getattr(conn, "conn_type", None)
    if old in LEGACY_CONN_TYPES and LEGACY_CONN_TYPES[old] == conn_type:
        message = (f"Airflow Connection {conn_id!r} has the type {old!r}, renamed {conn_type!r} (daybreak's "
                   f"Connection types are namespaced); it still works, but set its type to {conn_type!r}")
        warnings.warn(message, ConnectionTypeDeprecationWarning, stacklevel=3)
        log.warning("%s", message)
    return conn


def _mask(secret: str | None) -> None:
    """Tell Airflow's secrets masker about a secret so no task log shows it."""
    if not secret:
        return
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - older task SDKs
        return
    mask_secret(secret)


def _extra(conn: Any, conn_type: str, key: str) -> Any:
    """An extra field as the form saves it (``key``, or ``extra__<type>__key`` from older UIs,
    with the type's old name too)."""
    extra = conn.extra_dejson or {}
    value = extra.get(key)
    if value not in (None, ""):
        return value
    old = [t for t, new in LEGACY_CONN_TYPES.items() if new == conn_type]
    return next((extra[k] for t in (conn_type, *old) if (k := f"extra__{t}__{key}") in extra and extra[k]), None)


def _ui_field_behaviour(cls: type[Any]) -> dict[str, Any]:
    from daybreak.airflow.provider import ui_field_behaviour

    return ui_field_behaviour(cls.conn_type)


def _connection_form_widgets(cls: type[Any]) -> dict[str, Any]:
    from daybreak.airflow.provider import form_widgets

    return form_widgets(cls.conn_type)


class MlflowHook(BaseHook):
    """An MLflow tracking server from an Airflow Connection.

    - host: the tracking URI (``http://mlflow:5000``, ``https://...``, ``databricks``,
      ``sqlite:///...``); a bare host name becomes ``<schema or http>://host[:port]``;
      extra ``tracking_uri`` takes precedence;
    - password: the bearer token (``MLFLOW_TRACKING_TOKEN``), or with a login, the basic-auth
      password (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``);
    - extra ``insecure_tls``: true to skip TLS verification (``MLFLOW_TRACKING_INSECURE_TLS``).

    :param mlflow_conn_id: the Connection id (default ``mlflow_default``).
    """

    conn_name_attr = "mlflow_conn_id"
    default_conn_name = "mlflow_default"
    conn_type = MLFLOW_CONN_TYPE
    hook_name = "MLflow (daybreak)"

    def __init__(self, mlflow_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mlflow_conn_id = mlflow_conn_id
        self._conn: Any = None

    def connection(self) -> Any:
        """The Connection (read once per hook; warns about an old ``mlflow`` type)."""
        if self._conn is None:
            self._conn = _checked_type(self.get_connection(self.mlflow_conn_id), self.mlflow_conn_id, self.conn_type)
        return self._conn

    def tracking_uri(self) -> str:
        """The tracking URI the Connection names (no credentials in it)."""
        conn = self.connection()
        uri = _extra(conn, self.conn_type, "tracking_uri") or conn.host
        if not uri:
            raise ValueError(f"Airflow Connection {self.mlflow_conn_id!r} has no host (the MLflow tracking URI) "
                             "and no extra 'tracking_uri'")
        if "://" not in uri and not uri.startswith("databricks"):
            uri = f"{conn.schema or 'http'}://{uri}" + (f":{conn.port}" if conn.port else "")
        return uri

    def credentials(self) -> dict[str, str]:
        """The environment variables the MLflow client reads for this Connection's credentials."""
        from daybreak.infra.registry import credential_env

        conn = self.connection()
        return credential_env(username=conn.login, password=conn.password,
                              insecure_tls=_extra(conn, self.conn_type, "insecure_tls"))

    def configure(self) -> str:
        """Export the credentials to this process (the MLflow client reads them from the
        environment; every request this task makes then carries them) and return the URI."""
        uri = self.tracking_uri()
        for key, value in self.credentials().items():
            if key != "MLFLOW_TRACKING_INSECURE_TLS":
                _mask(value)
            os.environ[key] = value
        return uri

    def get_conn(self) -> Any:
        """An ``mlflow.MlflowClient`` for the tracking server, credentials configured."""
        from daybreak.infra.registry import client_at

        return client_at(self.configure())

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.get_conn().search_experiments(max_results=1)
        except Exception as e:  # the UI shows the message; the token is not part of it
            return False, f"MLflow at {self.tracking_uri()} did not answer: {type(e).__name__}: {e}"
        return True, f"MLflow at {self.tracking_uri()} answered"

    # defined on the class itself: older Airflow reads them only from the class's own __dict__
    get_ui_field_behaviour = classmethod(_ui_field_behaviour)
    get_connection_form_widgets = classmethod(_connection_form_widgets)


class RayHook(BaseHook):
    """A Ray cluster from an Airflow Connection.

    The address is the extra ``address`` if set, else ``host:port`` (the GCS port, default
    6379), or ``ray://host:port`` (Ray Client, default port 10001) when the host or schema says
    ``ray``. The password is the cluster's auth token (clusters started with
    ``RAY_AUTH_MODE=token``).

    :param ray_conn_id: the Connection id (default ``ray_default``).
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = RAY_CONN_TYPE
    hook_name = "Ray cluster (daybreak)"

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id
        self._conn: Any = None

    def connection(self) -> Any:
        """The Connection (read once per hook; warns about an old ``ray`` type)."""
        if self._conn is None:
            self._conn = _checked_type(self.get_connection(self.ray_conn_id), self.ray_conn_id, self.conn_type)
        return self._conn

    def address(self) -> str:
        conn = self.connection()
        if address := _extra(conn, self.conn_type, "address"):
            return str(address)
        if not conn.host:
            raise ValueError(f"Airflow Connection {self.ray_conn_id!r} has neither a host nor an extra 'address' "
                             "for Ray")
        if conn.host.startswith("ray://") or conn.schema == "ray":
            return f"ray://{conn.host.removeprefix('ray://')}:{conn.port or 10001}"
        return f"{conn.host}:{conn.port or 6379}"

    def token(self) -> str | None:
        return self.connection().password or None

    def get_conn(self) -> str:
        """The cluster address; the auth token, if any, is exported for this process (Ray reads
        ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` from the environment of the process that connects)."""
        address = self.address()
        token = self.token()
        if token:
            _mask(token)
            os.environ["RAY_AUTH_MODE"] = "token"
            os.environ["RAY_AUTH_TOKEN"] = token
        return address

    def test_connection(self) -> tuple[bool, str]:
        """Whether the address's port accepts a TCP connection (joining the cluster would start
        a Ray driver inside the Airflow API server)."""
        import socket

        address = self.address()
        hostport = address.removeprefix("ray://")
        host, _, port = hostport.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        except (OSError, ValueError) as e:
            return False, f"Ray at {address} is not reachable: {e}"
        return True, f"Ray at {address} accepts connections"

    # defined on the class itself: older Airflow reads them only from the class's own __dict__
    get_ui_field_behaviour = classmethod(_ui_field_behaviour)
    get_connection_form_widgets = classmethod(_connection_form_widgets)


def mlflow_tracking_uri(conn_id: str | None) -> str | None:
    """The tracking URI of an MLflow Connection, credentials exported; None without a conn id."""
    return MlflowHook(conn_id).configure() if conn_id else None


def ray_cluster_address(conn_id: str | None) -> str | None:
    """A Ray cluster address from a Connection, token exported; None: ``$RAY_ADDRESS`` or local Ray."""
    return RayHook(conn_id).get_conn() if conn_id else None


def _aws_base_hook() -> Any:
    """The Amazon provider's ``AwsBaseHook`` class, or None without the provider."""
    try:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    except ImportError:
        return None
    return AwsBaseHook


def storage_options(conn_id: str | None) -> Any:
    """S3 settings from an Airflow Connection; None: from the environment.

    A Connection of type ``aws`` with the Amazon provider installed: the credentials are what its
    ``AwsBaseHook`` resolves (keys, ``role_arn`` assume-role, web identity, a profile, or the
    instance's role), the endpoint its ``endpoint_url`` (or ``service_config.s3.endpoint_url``),
    the region its ``region_name``. Temporary credentials are fetched once per task: they last an
    assume-role session (an hour by default), longer than a step.
    Otherwise (generic, or no provider): login = access key, password = secret key, extra
    ``endpoint_url`` / ``region_name`` / ``aws_session_token``. Either way host/port/schema name
    the endpoint when no ``endpoint_url`` is given."""
    if not conn_id:
        return None
    from daybreak.infra.store import StorageOptions

    conn = BaseHook.get_connection(conn_id)
    extra = conn.extra_dejson or {}
    endpoint = extra.get("endpoint_url") or (
        f"{conn.schema or 'https'}://{conn.host}" + (f":{conn.port}" if conn.port else "") if conn.host else None)
    aws_hook = _aws_base_hook() if conn.conn_type == "aws" else None
    if aws_hook is not None:
        hook = aws_hook(aws_conn_id=conn_id, client_type="s3")
        try:
            creds = hook.get_credentials()
        except AttributeError:  # no credentials anywhere in boto3's chain: unsigned, as pyarrow would
            access = secret = token = None
        else:
            access, secret, token = creds.access_key, creds.secret_key, creds.token
        for secret_value in (secret, token):
            _mask(secret_value)
        return StorageOptions(endpoint_url=hook.conn_config.get_service_endpoint_url("s3") or endpoint,
                              region=hook.conn_config.region_name or extra.get("region"),
                              access_key=access or None, secret_key=secret or None, session_token=token or None)
    _mask(conn.password)
    _mask(extra.get("aws_session_token"))
    return StorageOptions(endpoint_url=endpoint, region=extra.get("region_name") or extra.get("region"),
                          access_key=conn.login or None, secret_key=conn.password or None,
                          session_token=extra.get("aws_session_token"))
