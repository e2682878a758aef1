"""The Models page: what the registry says about a spec's model, inside the Airflow UI.

A FastAPI app that the daybreak Airflow plugin mounts on the API server under ``/daybreak``:

- ``GET /daybreak/models[?spec=NAME]``: the champion, the recent versions with their gate
  decisions and metrics, live quality over time (a chart and the recent days, from monitoring),
  and the promotion history (HTML);
- ``GET /daybreak/models/data[?spec=NAME]``: the same as JSON;
- ``GET /daybreak/models/report/{version}[?spec=NAME]``: the HTML report the gate logged.

Airflow gives plugin apps no authentication, so every route checks the JWT Airflow issued (the
``Authorization: Bearer`` header, or the UI's ``_token`` cookie, which the browser sends to the
page framed in the UI) with the auth manager, and asks it whether the user may see a custom view
named ``Models``. The page only reads: there is no route that changes anything.

Which specs: ``$DAYBREAK_SPECS`` (paths or folders of YAML, separated by ``:``), else
``$DAYBREAK_SPEC``. ``?spec=`` picks one by its ``name``, never by path, so a request cannot make
the server read an arbitrary file. The registry is the one the specs' steps use
(``$MLFLOW_TRACKING_URI``, else ``$DAYBREAK_HOME/mlflow.db``).

Nothing heavy is imported until a request comes: Airflow imports plugins in many processes.
"""

from __future__ import annotations

import os
import re
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse

from daybreak.infra.records import GateRecord

VIEW_NAME = "Models"
URL_PREFIX = "/daybreak"
COOKIE = "_token"  # airflow.api_fastapi.auth.managers.base_auth_manager.COOKIE_NAME_JWT_TOKEN
RECENT = 20
HISTORY = 50
# Both pages are daybreak's own HTML (inline styles, plots as data: images): no script runs, no
# form posts anywhere, and no <base> can redirect relative links.
_PAGE_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'; "
             "form-action 'none'; base-uri 'none'")
_REPORT_CSP = _PAGE_CSP


def _token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.cookies.get(COOKIE) or None


def _login_url(request: Request) -> str | None:
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=str(request.url))
    except Exception:
        return None


def _unauthorized(request: Request, detail: str) -> HTTPException:
    login = _login_url(request)
    return HTTPException(status_code=401, detail=detail + (f"; log in at {login}" if login else ""),
                         headers={"WWW-Authenticate": "Bearer"})


async def require_user(request: Request) -> Any:
    """The Airflow user behind the request's token; 401 without a valid one, 403 if the auth
    manager says the user may not see the Models view."""
    from airflow.api_fastapi.app import get_auth_manager
    from jwt import ExpiredSignatureError, InvalidTokenError

    token = _token(request)
    if not token:
        raise _unauthorized(request, "Not authenticated: send an Airflow token (Authorization: Bearer) "
                                     "or open the page from the Airflow UI")
    manager = get_auth_manager()
    try:
        user = await manager.get_user_from_token(token)
    except ExpiredSignatureError:
        raise _unauthorized(request, "Token expired") from None
    except (InvalidTokenError, ValueError):
        raise _unauthorized(request, "Invalid token") from None
    if not manager.is_authorized_custom_view(method="GET", resource_name=VIEW_NAME, user=user):
        raise HTTPException(status_code=403, detail=f"{user.get_name()!r} may not see the {VIEW_NAME} view")
    return user


# --- data -------------------------------------------------------------------------------------

def spec_paths() -> list[Path | str]:
    """The specs named by DAYBREAK_SPECS (or DAYBREAK_SPEC), separated by the path separator: files,
    folders of YAML files, or s3:// objects (kept as given: a Path would fold their '//')."""
    raw = os.environ.get("DAYBREAK_SPECS") or os.environ.get("DAYBREAK_SPEC") or ""
    out: list[Path | str] = []
    # (a separator followed by '//' is a URI's own: 's3://b/a.yaml:/srv/specs' is two specs)
    for part in filter(None, (p.strip() for p in re.split(re.escape(os.pathsep) + "(?!//)", raw))):
        if "://" in part:
            out.append(part)
            continue
        p = Path(part).expanduser()
        out.extend(sorted([*p.glob("*.yaml"), *p.glob("*.yml")]) if p.is_dir() else [p])
    return out


def load_specs() -> tuple[dict[str, Any], list[str]]:
    """The configured specs by name, and what was wrong with the others."""
    from daybreak.spec import load_spec

    specs: dict[str, Any] = {}
    errors: list[str] = []
    for p in spec_paths():
        try:
            s = load_spec(p)
        except Exception as e:
            errors.append(f"{p}: {type(e).__name__}: {e}")
            continue
        specs.setdefault(s.name, s)
    return specs, errors


def pick_spec(name: str | None) -> tuple[Any, list[str]]:
    specs, errors = load_specs()
    if not specs:
        detail = "no pipeline spec configured: set DAYBREAK_SPEC (or DAYBREAK_SPECS) for the Airflow API server"
        raise HTTPException(status_code=404, detail=detail + ("; " + "; ".join(errors) if errors else ""))
    if name is None:
        return next(iter(specs.values())), sorted(specs)
    if name not in specs:
        raise HTTPException(status_code=404, detail=f"no spec named {name!r}; configured: {', '.join(sorted(specs))}")
    return specs[name], sorted(specs)


def _context() -> Any:
    from datetime import date

    from daybreak.infra.context import RunContext

    return RunContext.create(date.today())


def model_data(spec: Any, recent: int = RECENT, history: int = HISTORY) -> dict[str, Any]:
    """The champion, the recent versions with their gate records, and the audit history (read only)."""
    from daybreak.infra import registry
    from daybreak.infra.audit import audit_events, no_sqlite_registry
    from daybreak.promote import version_row

    ctx = _context()
    out: dict[str, Any] = {"spec": spec.name, "model": spec.model.name, "metric": spec.gate.metric,
                           "alias": spec.promotion.alias, "tracking_uri": _safe_uri(ctx.tracking_uri),
                           "champion": None, "versions": [], "history": [], "live": []}
    if no_sqlite_registry(ctx):
        return out
    cl = registry.client(ctx)
    champ = registry.alias_version(cl, spec.model.name, spec.promotion.alias)
    out["champion"] = None if champ is None else str(champ.version)
    for mv in registry.versions(cl, spec.model.name)[:recent]:
        full = cl.get_model_version(spec.model.name, str(mv.version))  # search results carry no aliases
        row = version_row(full)
        rec = GateRecord.from_tags(full.tags)
        row["rules"] = rec.rules
        row["computed_decision"] = rec.computed_decision
        row["override_reason"] = rec.override_reason
        row["has_report"] = bool(rec.gate_run_id)
        out["versions"].append(row)
    out["history"] = audit_events(spec, ctx, limit=history)
    from daybreak.monitor import live_history

    out["live"] = live_history(spec, ctx)
    out["live_metric"], out["live_floor"] = spec.live_metric(), spec.live_floor()
    return out


def _safe_uri(uri: str) -> str:
    """The URI without any user:password part."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
    return uri


def report_html(spec: Any, version: str) -> str:
    """The gate report of a version (``history.gate_report_html``, which only reads), or a 404."""
    from daybreak.infra.audit import no_sqlite_registry
    from daybreak.infra.errors import DaybreakError
    from daybreak.promote import gate_report_html

    ctx = _context()
    if no_sqlite_registry(ctx):
        raise HTTPException(status_code=404, detail=f"{spec.model.name} has no registry yet")
    try:
        return gate_report_html(spec, ctx, version)
    except DaybreakError as e:
        raise HTTPException(status_code=404, detail=str(e)) from None
    except Exception as e:
        raise HTTPException(status_code=404, detail=f"{spec.model.name} v{version}: the gate report is missing "
                                                    f"({type(e).__name__})") from None


# --- rendering --------------------------------------------------------------------------------

def _e(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return escape(str(value), quote=True)


def _href(path: str, spec: str) -> str:
    return escape(f"{URL_PREFIX}{path}?{urlencode({'spec': spec})}", quote=True)


def _rules(rules: list[dict[str, Any]]) -> str:
    if not rules:
        return "-"
    items = (f"<li class='{_e(r.get('verdict'))}'>{_e(r.get('rule'))}: {_e(r.get('value'))} "
             f"(threshold {_e(r.get('threshold'))}) {_e(r.get('verdict'))}</li>" for r in rules)
    return f"<ul class='rules'>{''.join(items)}</ul>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#1f2937}
h1{font-size:1.4rem;margin:0 0 .25rem} h2{font-size:1.1rem;margin-top:1.75rem}
table{border-collapse:collapse;width:100%;font-size:.875rem} th,td{border-bottom:1px solid #e5e7eb;
padding:.35rem .5rem;text-align:left;vertical-align:top} th{background:#f9fafb}
.muted{color:#6b7280} .champion{font-size:1.1rem;margin:.75rem 0}
.PROMOTE,.pass{color:#047857} .REJECT,.fail,.BLOCKED,.rollback{color:#b91c1c} .SKIPPED{color:#6b7280}
.alert{color:#9a6700} figure{margin:.5rem 0} figcaption{font-size:.8rem;color:#6b7280}
ul.rules{margin:0;padding-left:1rem} nav a{margin-right:.75rem}
"""


def render_page(data: dict[str, Any], names: list[str]) -> str:
    spec = data["spec"]
    nav = "".join(f"<a href='{_href('/models', n)}'>{_e(n)}</a>" for n in names) if len(names) > 1 else ""
    champ = data["champion"]
    rows = []
    for r in data["versions"]:
        report = (f"<a href='{_href('/models/report/' + quote(str(r['version'])), spec)}'>report</a>"
                  if r["has_report"] else "-")
        override = (f"<br><span class='muted'>override of {_e(r['computed_decision'])}: "
                    f"{_e(r['override_reason'])}</span>" if r.get("override_reason") else "")
        approval = f"{_e(r['approval'])}" + (f" by {_e(r['approval_by'])}" if r.get("approval_by") else "") \
            if r.get("approval") else "-"
        rows.append(
            f"<tr id='v{_e(r['version'])}'><td>v{_e(r['version'])}</td><td>{_e(r['logical_date'])}</td>"
            f"<td>{_e(r['window'])}</td><td class='{_e(r['decision'])}'>{_e(r['decision'])}{override}</td>"
            f"<td>{_e(r['candidate_metric'])}</td><td>{_e(r['champion_metric'])}"
            f"{' (v' + _e(r['gated_against']) + ')' if r.get('gated_against') else ''}</td>"
            f"<td>{_rules(r.get('rules') or [])}</td><td>{_e(', '.join(r['aliases']))}</td><td>{approval}</td>"
            f"<td>{report}</td></tr>")
    events = [
        f"<tr><td>{_e(h.get('at'))}</td><td class='{_e(h.get('event'))}'>{_e(h.get('event'))}</td>"
        f"<td>v{_e(h.get('version'))}</td><td>v{_e(h.get('from_version'))}</td><td>{_e(h.get('logical_date'))}</td>"
        f"<td>{_e(h.get('by'))}</td><td>{_e(h.get('run_context'))}</td><td>{_e(h.get('reason'))}</td></tr>"
        for h in data["history"]]
    live = data.get("live") or []
    if live:
        from daybreak.gate import live_chart

        recent = [f"<tr><td>{_e(r['date'])}</td><td>{_e(r['source'])}</td><td>v{_e(r['version'])}</td>"
                  f"<td>{_e(r['value'])}</td><td>{_e(r['rows'])}</td>"
                  f"<td class='{_e(r['action'])}'>{_e(r['action'])}</td></tr>"
                  for r in reversed(live[-30:])]
        live_html = (f"<div id='live-chart'>{live_chart(live, data['live_metric'], data.get('live_floor'))}</div>"
                     f"<table id='live'><thead><tr><th>date</th><th>source</th><th>version</th>"
                     f"<th>live {_e(data['live_metric'])}</th><th>labelled rows</th><th>action</th></tr></thead>"
                     f"<tbody>{''.join(recent)}</tbody></table>")
    else:
        live_html = ("<p class='muted' id='live'>No monitoring yet: serve the champion (daybreak serve logs its "
                     "predictions), then run the monitor step once the labels are staged.</p>")
    where = f"spec {_e(spec)} &middot; gate metric {_e(data['metric'])} &middot; registry {_e(data['tracking_uri'])}"
    no_events = "<tr><td colspan='8' class='muted'>no promotions, rejections or rollbacks yet</td></tr>"
    champion = (f"<p class='champion'>Champion ({_e(data['alias'])}): <strong id='champion'>v{_e(champ)}</strong></p>"
                if champ else f"<p class='champion'>No {_e(data['alias'])} yet.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(data['model'])}: models</title>
<style>{STYLE}</style></head><body>
<nav>{nav}</nav>
<h1>{_e(data['model'])}</h1>
<p class="muted">{where}</p>
{champion}
<h2>Recent versions</h2>
<table><thead><tr><th>version</th><th>date</th><th>training window</th><th>decision</th>
<th>candidate {_e(data['metric'])}</th><th>champion {_e(data['metric'])}</th><th>rules</th><th>aliases</th>
<th>approval</th><th>gate report</th></tr></thead>
<tbody>{''.join(rows) or "<tr><td colspan='10' class='muted'>no versions yet</td></tr>"}</tbody></table>
<h2>Live quality</h2>
{live_html}
<h2>Promotion history</h2>
<table><thead><tr><th>at</th><th>event</th><th>version</th><th>champion was</th><th>date</th><th>by</th>
<th>run</th><th>reason</th></tr></thead>
<tbody>{''.join(events) or no_events}</tbody>
</table></body></html>"""


# --- app --------------------------------------------------------------------------------------

def create_app() -> FastAPI:
    app = FastAPI(title="daybreak Models", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def _errors(request: Request, exc: HTTPException) -> Any:
        wants_html = "text/html" in request.headers.get("accept", "") and not request.url.path.endswith("/data")
        if not wants_html:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        login = _login_url(request) if exc.status_code == 401 else None
        link = f"<p><a href='{escape(login, quote=True)}' target='_top'>Log in to Airflow</a></p>" if login else ""
        body = f"<!doctype html><title>{exc.status_code}</title><p>{escape(str(exc.detail))}</p>{link}"
        return HTMLResponse(body, status_code=exc.status_code, headers={**(exc.headers or {}),
                                                                        "Content-Security-Policy": _PAGE_CSP})

    @app.get("/models", response_class=HTMLResponse)
    def models(spec: str | None = Query(None, description="spec name"), _user: Any = Depends(require_user)) -> Any:
        s, names = pick_spec(spec)
        return HTMLResponse(render_page(model_data(s), names), headers={"Content-Security-Policy": _PAGE_CSP,
                                                                        "Cache-Control": "no-store"})

    @app.get("/models/data")
    def models_data(spec: str | None = Query(None), _user: Any = Depends(require_user)) -> Any:
        s, names = pick_spec(spec)
        return JSONResponse({**model_data(s), "specs": names}, headers={"Cache-Control": "no-store"})

    @app.get("/models/report/{version}", response_class=HTMLResponse)
    def report(version: str, spec: str | None = Query(None), _user: Any = Depends(require_user)) -> Any:
        if not version.isdigit():
            raise HTTPException(status_code=404, detail=f"no version {version!r}: versions are numbers")
        s, _ = pick_spec(spec)
        return HTMLResponse(report_html(s, version), headers={"Content-Security-Policy": _REPORT_CSP,
                                                              "Cache-Control": "no-store"})

    return app
