"""The daybreak Airflow plugin: the Models page in the Airflow UI.

Installed with the package (the ``airflow.plugins`` entry point in pyproject.toml); nothing to
copy. The page is a FastAPI app on the API server (``/daybreak/models``) shown in the UI's
navigation as an external view ("Browse" menu, framed in the UI). See
:mod:`daybreak.airflow.models_page` for what it shows and how it checks the caller's token.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from daybreak.airflow.models_page import URL_PREFIX, VIEW_NAME, create_app


class DaybreakPlugin(AirflowPlugin):
    name = "daybreak"
    # read by Airflow from the class; AirflowPlugin declares them as plain (not ClassVar) lists
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "daybreak Models"}]  # noqa: RUF012
    external_views = [{"name": VIEW_NAME, "href": f"{URL_PREFIX}/models", "destination": "nav",  # noqa: RUF012
                       "category": "browse", "url_route": "daybreak-models"}]
