"""daybreak as an Airflow provider and plugin, against the real Airflow CLI and a real API server.

- ``airflow providers list`` / ``providers hooks`` show daybreak and its two Connection types
  (``daybreak_mlflow``, ``daybreak_ray``; the old ``mlflow`` / ``ray`` Connections still read);
- the hooks read real Connections (``AIRFLOW_CONN_*``) and keep the tokens out of logs;
- ``airflow api-server`` (simple auth manager, SQLite) serves the Models page from the installed
  plugin: no token or a bad one gets 401, a JWT from ``POST /auth/token`` (header or the UI's
  ``_token`` cookie) gets the champion, the versions, the history (escaped) and working report
  links; the UI's connection form metadata carries the declared fields.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from conftest import BIN, free_port, wait_http

from daybreak.infra import registry
from daybreak.infra.context import RunContext

pytestmark = pytest.mark.slow

NASTY = "<script>alert('x')</script> & \"quoted\""


def _airflow_env(base: Path, daybreak_home: Path, spec_file: Path) -> dict[str, str]:
    dags = base / "dags"
    dags.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(base / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(base / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(base / "passwords.json"),
                "DAYBREAK_HOME": str(daybreak_home), "DAYBREAK_SPEC": str(spec_file)})
    return env


@pytest.fixture(scope="module")
def airflow_started(spec, tmp_path_factory: pytest.TempPathFactory):
    """``airflow db migrate`` then ``airflow api-server`` on a free loopback port, started before the
    registry exists (it is read per request) so Airflow boots while the cycle trains; plus the
    ``providers`` CLI calls, which need neither."""
    base = tmp_path_factory.mktemp("airflow_provider")
    home = base / "home"
    home.mkdir()
    spec_file = base / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = _airflow_env(base, home, spec_file)
    (base / "plugins").mkdir()
    passwords = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
    (base / "passwords.json").write_text(json.dumps(passwords))
    port = free_port()
    log = open(base / "api-server.log", "w")  # noqa: SIM115 - the API server's log, closed after it stops
    airflow = BIN / "airflow"
    proc = subprocess.Popen(["sh", "-c", f'"{airflow}" db migrate && exec "{airflow}" api-server --host 127.0.0.1 '
                                         f'--port {port} --workers 1'],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cli = {what: subprocess.Popen([str(airflow), "providers", what, "-o", "json"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
           for what in ("list", "hooks")}
    try:
        yield {"url": f"http://127.0.0.1:{port}", "env": env, "passwords": passwords, "home": home, "proc": proc,
               "cli": cli, "log": base / "api-server.log"}
    finally:
        for p in [proc, *cli.values()]:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
            except ProcessLookupError:
                pass
        for p in [proc, *cli.values()]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def airflow_site(airflow_started: dict, spec, request: pytest.FixtureRequest):
    """The running server over a private copy of the cycled registry (champion, gated versions,
    history, and one event with a hostile reason)."""
    from daybreak.infra.audit import record_event

    cycled = request.getfixturevalue("cycled")  # session-scoped: asked for here so Airflow boots first

    home = airflow_started["home"]
    # the copy's artifact locations still point at the shared home's artifacts: read only
    shutil.copy(cycled["home"] / "mlflow.db", home / "mlflow.db")
    ctx = RunContext.create("2013-01-04", tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    champion = str(registry.alias_version(registry.client(ctx), spec.model.name, spec.promotion.alias).version)
    _monitored(spec, home, cycled["home"], ctx.tracking_uri, champion)
    record_event(spec, ctx, "rollback", champion, from_version=champion, reason=NASTY, by="<b>mallory</b>")
    url = airflow_started["url"]
    try:
        wait_http(f"{url}/api/v2/monitor/health", timeout=180, proc=airflow_started["proc"])
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{airflow_started['log'].read_text()[-3000:]}") from None
    return {**airflow_started, "champion": champion, "spec": spec, "ctx": ctx}


LIVE_DAYS = ("2013-01-03", "2013-01-04")


def _monitored(spec, home: Path, cycled_home: Path, tracking_uri: str, champion: str) -> None:
    """Two days of live quality: the champion's answers to those days' flights go through the
    prediction log's writer (as the server hands them over), then the monitor step judges them."""
    from daybreak.deploy._predlog import PredictionLog
    from daybreak.features import read_features
    from daybreak.monitor import monitor_model

    store = home / "store"
    shutil.copytree(cycled_home / "store", store, symlinks=True, dirs_exist_ok=True)
    old = os.environ.get("DAYBREAK_HOME")
    os.environ["DAYBREAK_HOME"] = str(home)  # the monitor runs' artifacts go here
    try:
        ctxs = [RunContext.create(d, tracking_uri=tracking_uri, store=str(store)) for d in LIVE_DAYS]
        model = registry.load_model(ctxs[0], spec.model.name, champion)
        plog = PredictionLog(spec, ctxs[0].store)
        for c in ctxs:
            df = read_features(spec, c, [c.logical_date])[0].to_pandas()
            X = df[spec.features.feature_names()]
            ids = {k: df[k].tolist() for k in spec.features.keys} | {
                "event_time": [t.isoformat() for t in df["event_time"]]}
            plog.record(champion, X, np.asarray(model.predict(X)), [(f"ui-{c.logical_date}", len(df), ids)])
        plog.close()
        for c in ctxs:
            assert monitor_model(spec, c)["rows_labelled"] > 0
    finally:
        if old is None:
            os.environ.pop("DAYBREAK_HOME", None)
        else:
            os.environ["DAYBREAK_HOME"] = old


def _token(site: dict, user: str = "admin") -> str:
    r = httpx.post(f"{site['url']}/auth/token", json={"username": user, "password": site["passwords"][user]},
                   timeout=30)
    assert r.status_code in (200, 201), r.text
    return r.json()["access_token"]


def test_providers_cli_lists_daybreak(airflow_site: dict) -> None:
    out = {}
    for what, p in airflow_site["cli"].items():
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stderr[-2000:]
        out[what] = json.loads(stdout[stdout.index("["):])
    listed = {p["package_name"]: p for p in out["list"]}
    assert "daybreak" in listed, sorted(listed)
    from importlib.metadata import version

    assert listed["daybreak"]["version"] == version("daybreak")
    hooks = {h["connection_type"]: h for h in out["hooks"]}
    assert hooks["daybreak_mlflow"]["class"] == "daybreak.airflow.hooks.MlflowHook"
    assert hooks["daybreak_mlflow"]["conn_id_attribute_name"] == "mlflow_conn_id"
    assert hooks["daybreak_ray"]["class"] == "daybreak.airflow.hooks.RayHook"
    assert {hooks[t]["package_name"] for t in ("daybreak_mlflow", "daybreak_ray")} == {"daybreak"}
    assert "mlflow" not in hooks or hooks["mlflow"]["package_name"] != "daybreak"  # no longer declared


def test_connection_form_metadata_in_the_api(airflow_site: dict) -> None:
    """What the UI's connection form gets: labels, hidden fields, placeholders, extra fields."""
    r = httpx.get(f"{airflow_site['url']}/ui/connections/hook_meta",
                  headers={"Authorization": f"Bearer {_token(airflow_site)}"}, timeout=60)
    assert r.status_code == 200, r.text
    meta = {m["connection_type"]: m for m in r.json()}
    mlflow, ray = meta["daybreak_mlflow"], meta["daybreak_ray"]
    assert mlflow["hook_name"] == "MLflow (daybreak)"
    assert mlflow["standard_fields"]["host"]["title"] == "Tracking URI"
    assert mlflow["standard_fields"]["host"]["placeholder"] == "http://mlflow.internal:5000"
    assert mlflow["standard_fields"]["port"]["hidden"] is True
    assert "insecure_tls" in mlflow["extra_fields"]
    assert ray["standard_fields"]["password"]["title"] == "Auth token"
    assert ray["standard_fields"]["login"]["hidden"] is True
    assert "address" in ray["extra_fields"]


HOOK_SCRIPT = r"""
import io, json, logging, os, warnings
from daybreak.airflow.hooks import MlflowHook, RayHook, storage_options
from daybreak.airflow.operators import TrainModelOperator, ray_cluster_address

# after the imports: Airflow routes warnings to its logging (logging.captureWarnings) when it loads
caught = []
warnings.simplefilter("always")
warnings.showwarning = lambda message, category, *args, **kwargs: caught.append(f"{category.__name__}: {message}")

out = {}
client = MlflowHook("db_mlflow").get_conn()
out["models"] = [m.name for m in client.search_registered_models()]
out["uri"] = MlflowHook("remote_mlflow").configure()
out["token_env"] = os.environ.get("MLFLOW_TRACKING_TOKEN")
out["basic_env"] = [os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")]
out["bare_uri"] = MlflowHook("bare_mlflow").tracking_uri()
out["ray"] = ray_cluster_address("my_ray")
out["ray_env"] = [os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN")]
out["ray_client"] = RayHook("ray_client").get_conn()
out["s3_endpoint"] = storage_options("my_s3").endpoint_url
try:
    MlflowHook("empty_mlflow").tracking_uri()
except ValueError as e:
    out["empty_error"] = str(e)
op = TrainModelOperator(task_id="t", spec="s.yaml", mlflow_conn_id="remote_mlflow")
out["templated"] = "mlflow_conn_id" in op.template_fields and op.mlflow_conn_id == "remote_mlflow"
from airflow.sdk._shared.secrets_masker.secrets_masker import redact
out["redacted"] = [redact(f"token {s} here") for s in ("tok-123-secret", "ray-tok-456", "s3-secret-789")]
out["warnings"] = [w for w in caught if "ConnectionType" in w]
print("RESULT " + json.dumps(out))
"""


def test_hooks_read_connections(airflow_site: dict) -> None:
    env = {**airflow_site["env"], **{f"AIRFLOW_CONN_{k.upper()}": json.dumps(v) for k, v in {
        "db_mlflow": {"conn_type": "daybreak_mlflow", "host": airflow_site["ctx"].tracking_uri},
        "remote_mlflow": {"conn_type": "daybreak_mlflow", "host": "https://mlflow.example:5000",
                          "password": "tok-123-secret"},
        "bare_mlflow": {"conn_type": "mlflow", "host": "mlflow.internal", "port": 5001},  # the old type
        "empty_mlflow": {"conn_type": "daybreak_mlflow"},
        "my_ray": {"conn_type": "daybreak_ray", "host": "ray-head", "port": 6380, "password": "ray-tok-456"},
        "ray_client": {"conn_type": "ray", "host": "ray-head", "schema": "ray"},  # the old type
        "my_s3": {"conn_type": "aws", "login": "AK", "password": "s3-secret-789", "host": "127.0.0.1", "port": 9,
                  "schema": "http"},
    }.items()}}
    for k in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    proc = subprocess.run([str(BIN / "python"), "-c", HOOK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=180)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[len("RESULT "):])
    assert airflow_site["spec"].model.name in out["models"]
    assert out["uri"] == "https://mlflow.example:5000" and out["token_env"] == "tok-123-secret"
    assert out["basic_env"] == [None, None]
    assert out["bare_uri"] == "http://mlflow.internal:5001"
    assert out["ray"] == "ray-head:6380" and out["ray_env"] == ["token", "ray-tok-456"]
    assert out["ray_client"] == "ray://ray-head:10001"
    assert out["s3_endpoint"] == "http://127.0.0.1:9"
    assert "'empty_mlflow'" in out["empty_error"] and "tracking URI" in out["empty_error"]
    assert out["templated"] is True
    assert out["redacted"] == ["token *** here"] * 3
    for secret in ("tok-123-secret", "ray-tok-456", "s3-secret-789"):
        assert secret not in proc.stderr
    # the two Connections of an old type work, each with a deprecation warning naming the type to set
    old = out["warnings"]
    assert len(old) == 2 and all(w.startswith("ConnectionTypeDeprecationWarning: ") for w in old), old
    assert "'bare_mlflow' has the type 'mlflow', renamed 'daybreak_mlflow'" in old[0], old
    assert "'ray_client' has the type 'ray', renamed 'daybreak_ray'" in old[1], old


def test_models_page_requires_airflow_token(airflow_site: dict) -> None:
    url = f"{airflow_site['url']}/daybreak/models"
    for headers, cookies in (({}, {}), ({"Authorization": "Bearer not-a-jwt"}, {}), ({}, {"_token": "not-a-jwt"})):
        for path in ("", "/data", f"/report/{airflow_site['champion']}"):
            r = httpx.get(url + path, headers=headers, cookies=cookies, timeout=30, follow_redirects=False)
            assert r.status_code == 401, (path, headers, cookies, r.status_code, r.text)
            assert airflow_site["spec"].model.name not in r.text
    browser = httpx.get(url, headers={"Accept": "text/html"}, timeout=30)
    assert browser.status_code == 401 and "Log in to Airflow" in browser.text and "/auth/login" in browser.text
    # read only: nothing but GET
    r = httpx.post(url, headers={"Authorization": f"Bearer {_token(airflow_site)}"}, timeout=30)
    assert r.status_code == 405


def test_models_page_shows_champion_versions_history_and_reports(airflow_site: dict) -> None:
    site, spec = airflow_site, airflow_site["spec"]
    token = _token(site)
    auth = {"Authorization": f"Bearer {token}"}
    t0 = time.monotonic()
    page = httpx.get(f"{site['url']}/daybreak/models", headers=auth, timeout=120)
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert f"<strong id='champion'>v{site['champion']}</strong>" in html
    # every version the registry has, with its decision, and the audit history
    cl = registry.client(site["ctx"])
    versions = registry.versions(cl, spec.model.name)
    for mv in versions:
        assert f"<tr id='v{mv.version}'>" in html
        assert mv.tags[registry.DECISION_TAG] in html
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in html
    assert "&lt;b&gt;mallory&lt;/b&gt;" in html and "<b>mallory</b>" not in html
    csp = page.headers["content-security-policy"]
    assert "script-src" not in csp  # no script may run on the page
    assert "form-action 'none'" in csp and "base-uri 'none'" in csp  # nor post a form, nor rebase links

    data = httpx.get(f"{site['url']}/daybreak/models/data", headers=auth, timeout=60).json()
    assert data["champion"] == site["champion"] and data["model"] == spec.model.name
    assert [v["version"] for v in data["versions"]] == [str(mv.version) for mv in versions]
    assert data["history"][0]["event"] == "rollback" and data["history"][0]["reason"] == NASTY
    assert {"promote", "reject"} & {h["event"] for h in data["history"]}
    champ_row = next(v for v in data["versions"] if v["version"] == site["champion"])
    assert champ_row["decision"] == "PROMOTE" and champ_row["rules"] and "champion" in champ_row["aliases"]

    # live quality over time: the chart and the days monitoring recorded
    assert "<h2>Live quality</h2>" in html and "<div id='live-chart'><figure><img" in html
    assert [(r["date"], r["version"], r["source"]) for r in data["live"]] == [(d, site["champion"], "online")
                                                                               for d in LIVE_DAYS]
    assert all(0.5 < r["value"] < 1 and r["rows"] > 100 for r in data["live"])

    # the report link on the page works, through the UI's cookie too
    link = f"/daybreak/models/report/{site['champion']}?spec={spec.name}"
    assert f"href='{link}'" in html
    report = httpx.get(site["url"] + link, cookies={"_token": token}, timeout=60)
    assert report.status_code == 200, report.text
    assert "<html" in report.text.lower() and "data:image/png;base64" in report.text
    assert report.headers["content-security-policy"].startswith("default-src 'none'")
    assert "form-action 'none'" in report.headers["content-security-policy"]

    # a viewer may look; an unknown spec, version or path is a clear 404
    viewer = {"Authorization": f"Bearer {_token(site, 'viewer')}"}
    assert httpx.get(f"{site['url']}/daybreak/models", headers=viewer, timeout=60).status_code == 200
    missing = httpx.get(f"{site['url']}/daybreak/models/data?spec=nope", headers=auth, timeout=30)
    assert missing.status_code == 404 and spec.name in missing.json()["detail"]
    assert httpx.get(f"{site['url']}/daybreak/models/report/999?spec={spec.name}", headers=auth,
                     timeout=30).status_code == 404
    assert httpx.get(f"{site['url']}/daybreak/models/report/..%2Fetc", headers=auth, timeout=30).status_code == 404
    assert time.monotonic() - t0 < 60


def test_models_view_is_in_the_ui_navigation(airflow_site: dict) -> None:
    r = httpx.get(f"{airflow_site['url']}/api/v2/plugins", headers={"Authorization": f"Bearer {_token(airflow_site)}"},
                  timeout=60)
    assert r.status_code == 200, r.text
    plugin = next(p for p in r.json()["plugins"] if p["name"] == "daybreak")
    assert plugin["external_views"][0]["href"] == "/daybreak/models"
    assert plugin["external_views"][0]["url_route"] == "daybreak-models"
    assert plugin["source"].startswith("daybreak==")
    errors = httpx.get(f"{airflow_site['url']}/api/v2/importErrors",
                       headers={"Authorization": f"Bearer {_token(airflow_site)}"}, timeout=60).json()
    assert errors["total_entries"] == 0
