"""The documentation site (mkdocs.yml, docs/): it builds with --strict (no broken link or anchor),
its generated references cover every spec field and every command, and a browser shows the pages.

The site is built once per module with the real `mkdocs build --strict`, in a subprocess, into a
temporary folder. The spec models and the commands are walked here, independently of the hook
that writes the pages (docs/_hooks/reference.py), so a field or command it forgot fails."""

from __future__ import annotations

import functools
import html
import os
import re
import shutil
import subprocess
import sys
import threading
import typing
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT
from pydantic import BaseModel


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-5000:]
    return out


def _text(fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped, entities decoded, spaces collapsed."""
    fragment = re.sub(r"<(script|style)\b.*?</\1>", " ", fragment, flags=re.S)
    fragment = re.sub(r"</?(td|th|tr|p|li|h\d|div|pre)\b[^>]*>", " ", fragment)  # blocks and cells apart
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", fragment)).split())  # inline tags: none


def _sections(page: str, level: str = "h2") -> dict[str, str]:
    """The page's article split at each heading of `level`: {heading id: its HTML up to the next}."""
    article = page[page.index("<article"):page.index("</article>")]
    parts = re.split(rf'(?=<{level} id=")', article)
    return {re.match(rf'<{level} id="([^"]+)"', p).group(1): p for p in parts[1:]}  # type: ignore[union-attr]


def _models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from _models(arg)


def _literals(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for a in typing.get_args(annotation) for v in _literals(a)]


def spec_models() -> list[type[BaseModel]]:
    """The top-level spec model and every model nested in it, at any depth."""
    from daybreak.spec import Spec

    seen: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [Spec]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            todo.extend(_models(field.annotation))
    return seen


def test_every_spec_field_has_a_description() -> None:
    """The spec reference shows each field's description: a field without one is a blank row for
    a spec author. Checked on the models, without building the site."""
    models = spec_models()
    assert len(models) > 20
    blank = [f"{model.__name__}.{field.alias or name}" for model in models
             for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not blank, blank


def test_spec_reference_has_every_field_of_every_model(site: Path) -> None:
    models = spec_models()
    assert len(models) > 20  # the walk reached the nested models (sources, features, gate, monitoring, ...)
    sections = _sections((site / "reference" / "spec" / "index.html").read_text())
    missing = []
    for model in models:
        section = sections.get(f"spec-{model.__name__.lower()}")
        if section is None:
            missing.append(model.__name__)
            continue
        seen = _text(section)
        for name, field in model.model_fields.items():
            key = field.alias or name
            if f">{key}</code>" not in section:
                missing.append(f"{model.__name__}.{key}")
            if field.description and " ".join(field.description.replace("`", "").split()) not in seen:
                missing.append(f"{model.__name__}.{key}: description")
            missing += [f"{model.__name__}.{key}: allowed {v!r}" for v in _literals(field.annotation)
                        if f'"{v}"' not in seen]
    assert not missing, missing


def test_cli_reference_has_every_command_and_option(site: Path) -> None:
    import typer

    from daybreak.cli import app

    sections = _sections((site / "reference" / "cli" / "index.html").read_text())
    headings = {_text(s[:s.index("</h2>")]).rstrip("¶ ") for s in sections.values()}
    missing = []

    def walk(cmd: Any, path: list[str]) -> None:
        name = " ".join(path)
        if name not in headings:
            missing.append(name)
        else:
            section = next(s for s in sections.values() if _text(s[:s.index("</h2>")]).rstrip("¶ ") == name)
            missing.extend(f"{name} {opt}" for p in cmd.params if not p.hidden for opt in p.opts
                           if p.param_type_name == "option" and f"<code>{opt}</code>" not in section)
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, sub_name])

    walk(typer.main.get_command(app), ["daybreak"])
    assert len(headings) > 20 and not missing, missing


def test_cli_reference_has_every_exit_code(site: Path) -> None:
    from daybreak.cli import ExitCode

    section = _sections((site / "reference" / "cli" / "index.html").read_text())["exit-codes"]
    rows = re.findall(r"<tr>\s*<td>(\d+)</td>\s*<td><code>(\w+)</code></td>", section)
    assert rows == [(str(int(code)), code.name) for code in ExitCode]


def test_python_api_is_rendered(site: Path) -> None:
    page = (site / "reference" / "python" / "index.html").read_text()
    for name in ("daybreak.steps.run_step", "daybreak.cycle.run_cycle", "daybreak.train.train_model",
                 "daybreak.gate.evaluate_gate", "daybreak.airflow.StageDataOperator",
                 "daybreak.airflow.daily_retrain_dag", "daybreak.prefect.stage_data",
                 "daybreak.prefect.flows.backfill"):
        assert f'id="{name}"' in page, name
    # the operators' parameters come from their docstrings
    assert "mlflow_conn_id" in _text(page)


def test_readme_links_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    links = re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", readme)
    assert len(links) > 15
    assert [link for link in links if not (ROOT / link).exists()] == []


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site over loopback HTTP, as a static host would serve it."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_pages_in_a_browser(served: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is not installed (make test installs it with apt)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{served}/getting-started/")
            expect(page.get_by_role("heading", name="Getting started", level=1)).to_be_visible()
            expect(page.get_by_role("heading", name="What make demo shows")).to_be_visible()
            page.get_by_role("link", name="the gate").first.click()
            expect(page.get_by_role("heading", name="The gate", level=1)).to_be_visible()

            page.goto(f"{served}/reference/spec/")
            expect(page.get_by_role("heading", name="Spec reference", level=1)).to_be_visible()
            field = page.locator("#spec-quarantinepolicy-max_bad_row_fraction")
            field.scroll_into_view_if_needed()
            expect(field).to_be_visible()
            row = page.locator("tr", has=field)
            expect(row).to_contain_text("fail when more rows than this are quarantined")
            expect(row).to_contain_text("0.01")

            page.goto(f"{served}/reference/cli/#cli-run")
            expect(page.get_by_role("heading", name=re.compile(r"^daybreak run\b(?! \w)"))).to_be_visible()
        finally:
            browser.close()
