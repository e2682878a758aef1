"""mkdocs hook: the spec and CLI references, generated at build time from the code.

``docs/reference/spec.md`` holds the marker ``<!-- daybreak:spec-reference -->``, replaced by a
section per pydantic model of the spec (every field: its YAML key, type, default, allowed values
and description), walked from the top-level ``Spec`` model through every nested model.
``docs/reference/cli.md`` holds ``<!-- daybreak:cli-reference -->``, replaced by a section per
command of the typer app (``typer.main.get_command``): its help, usage, arguments and options
with their types, defaults and environment variables. Neither page can drift from the code.
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

SPEC_MARKER = "<!-- daybreak:spec-reference -->"
CLI_MARKER = "<!-- daybreak:cli-reference -->"
CLI_SUMMARY_MARKER = "<!-- daybreak:cli-summary -->"
EXIT_CODES_MARKER = "<!-- daybreak:cli-exit-codes -->"


def on_config(config: Any) -> Any:
    """Import daybreak from this checkout (operators/) even without an editable install."""
    root = Path(config["config_file_path"]).resolve().parent / "operators"
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return config


def on_files(files: Any, config: Any) -> Any:
    """The benchmark's figure, as `make bench` last drew it (benchmarks/scale_curves.png)."""
    from mkdocs.structure.files import File

    figure = Path(config["config_file_path"]).resolve().parent / "benchmarks" / "scale_curves.png"
    if figure.exists():
        files.append(File.generated(config, "assets/scale_curves.png", abs_src_path=str(figure)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if SPEC_MARKER in markdown:
        markdown = markdown.replace(SPEC_MARKER, spec_reference())
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if CLI_SUMMARY_MARKER in markdown:
        markdown = markdown.replace(CLI_SUMMARY_MARKER, cli_summary())
    if EXIT_CODES_MARKER in markdown:
        markdown = markdown.replace(EXIT_CODES_MARKER, exit_codes())
    return markdown


# --- the spec --------------------------------------------------------------------------------

def _prose(text: str) -> str:
    """Docstring or description text as Markdown: outside code spans, `<name>` is text, not HTML,
    and `_` or `*` is a character, not emphasis."""
    parts = str(text).split("`")
    for i in range(0, len(parts), 2):  # outside backticks
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        parts[i] = parts[i].replace("_", "\\_").replace("*", "\\*")  # never emphasis
    return "`".join(parts)


def _cell(text: str) -> str:
    """Markdown safe inside a table cell (one line, no column break)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _anchor(model: type) -> str:
    return f"spec-{model.__name__.lower()}"


def _is_model(t: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(t, type) and issubclass(t, BaseModel)


def _models_in(t: Any) -> list[type]:
    if _is_model(t):
        return [t]
    return [m for a in typing.get_args(t) for m in _models_in(a)]


def _literals(t: Any) -> list[Any]:
    if typing.get_origin(t) is typing.Literal:
        return list(typing.get_args(t))
    return [v for a in typing.get_args(t) for v in _literals(a)]


def _type(t: Any) -> str:
    """A readable type: `list[str]`, `dict[str, ColumnSpec]` (models link to their section)."""
    origin = typing.get_origin(t)
    if t is type(None):
        return "null"
    if _is_model(t):
        return f"[{t.__name__}](#{_anchor(t)})"
    if origin is typing.Literal:
        return "enum"
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in typing.get_args(t))
    if origin is typing.Annotated:
        return _type(typing.get_args(t)[0])
    if origin is not None:
        args = ", ".join(_type(a) for a in typing.get_args(t))
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{args}]" if args else name
    if t is Any:
        return "any"
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def _constraints(field: Any) -> list[str]:
    out = []
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "at least", "max_length": "at most"}
    for meta in field.metadata:
        for attr, sym in symbols.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sym} {value}" + (" items" if "length" in attr else ""))
    return out


def _default(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            return "(computed)"
    else:
        value = field.default
    if value is PydanticUndefined:
        return "**required**"
    if _is_model(type(value)):
        return "its defaults"
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        return f"`{json.dumps(value, default=str)}`"
    except (TypeError, ValueError):
        return f"`{value!r}`"


def _describe(field: Any) -> str:
    """The field's description; without one, a nested section's field points at that section."""
    if field.description:
        return _prose(field.description)
    nested = list(dict.fromkeys(_models_in(field.annotation)))
    return ", ".join(f"see [{m.__name__}](#{_anchor(m)})" for m in nested)


def spec_models() -> list[tuple[type, list[str]]]:
    """Every model of the spec, from ``Spec`` down, each with the YAML paths where it appears."""
    from daybreak.spec import Spec

    order: list[type] = []
    paths: dict[type, list[str]] = {}

    def visit(model: type, path: str) -> None:
        paths.setdefault(model, []).append(path)
        if model in order:
            return
        order.append(model)
        for name, field in model.model_fields.items():
            key = field.alias or name
            for sub in _models_in(field.annotation):
                visit(sub, _sub_path(path, key, field.annotation))

    visit(Spec, "")
    return [(m, paths[m]) for m in order]


def _sub_path(path: str, key: str, annotation: Any) -> str:
    here = f"{path}.{key}" if path else key
    for t in (annotation, *typing.get_args(annotation)):
        origin = typing.get_origin(t)
        if origin is dict:
            return f"{here}.<{key.rstrip('s') or 'key'}>"
        if origin is list:
            return f"{here}[]"
    return here


def spec_reference() -> str:
    lines: list[str] = []
    for model, paths in spec_models():
        title = "the spec (top level)" if paths == [""] else ", ".join(f"`{p}`" for p in paths)
        lines += [f"## {model.__name__} {{#{_anchor(model)}}}", "", f"Where: {title}", ""]
        doc = (model.__doc__ or "").strip()
        if doc and not doc.startswith(("Usage docs:", "!!! abstract")):
            lines += [" ".join(_prose(doc).split()), ""]
        lines += ["| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        for name, field in model.model_fields.items():
            key = field.alias or name
            allowed = [f"`{json.dumps(v)}`" for v in _literals(field.annotation)] + _constraints(field)
            lines.append(
                f'| <code id="{_anchor(model)}-{key}">{key}</code> | {_type(field.annotation)} | '
                f"{_cell(_default(field))} | {_cell(', '.join(allowed))} | {_cell(_describe(field))} |"
            )
        lines.append("")
    return "\n".join(lines)


# --- the command line ------------------------------------------------------------------------
# typer 0.29 ships its own copy of click (typer._click): commands are matched by what they have
# (``commands``, ``param_type_name``), not by click's classes.

def cli_commands() -> list[tuple[str, Any, Any]]:
    """Every command of ``daybreak`` (groups included), depth first: (full name, command, context)."""
    import typer

    from daybreak.cli import app

    root = typer.main.get_command(app)
    out: list[tuple[str, Any, Any]] = []

    def visit(cmd: Any, ctx: Any) -> None:
        out.append((ctx.command_path, cmd, ctx))
        if hasattr(cmd, "commands"):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    visit(sub, sub.context_class(sub, info_name=name, parent=ctx))

    visit(root, root.context_class(root, info_name="daybreak"))
    return out


def _anchor_of(path: str) -> str:
    words = path.split()[1:]
    return "cli-" + "-".join(words) if words else "cli-daybreak"


def cli_summary() -> str:
    """One line per command: its name (a link to its section) and the first line of its help."""
    lines = ["| command | what it does |", "| --- | --- |"]
    for path, cmd, _ in cli_commands()[1:]:
        if hasattr(cmd, "commands"):
            continue
        first = (cmd.help or "").strip().split("\n\n")[0]
        lines.append(f"| [`{path}`](#{_anchor_of(path)}) | {_cell(_prose(first))} |")
    return "\n".join(lines) + "\n"


def exit_codes() -> str:
    """The table of ``daybreak.cli.ExitCode``: each code, its name and the comment beside it."""
    import inspect
    import re

    from daybreak import cli

    enum_cls = getattr(cli, "ExitCode", None)
    if enum_cls is None:
        return "Errors exit with status 2; anything else unexpected with 1.\n"
    comments = dict(re.findall(r"^\s*([A-Z_]+)\s*=\s*\d+\s*#\s*(.+)$", inspect.getsource(enum_cls), re.M))
    lines = ["| exit code | name | when |", "| --- | --- | --- |"]
    lines += [f"| {m.value} | `{m.name}` | {_cell(_prose(comments.get(m.name, '')))} |" for m in enum_cls]
    return "\n".join(lines) + "\n"


def _param_type(p: Any) -> str:
    descriptor = getattr(p, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    if getattr(p, "is_flag", False):
        return "flag"
    if annotation is None:
        return getattr(getattr(p, "type", None), "name", "text").lower()
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    t = args[0]
    if typing.get_origin(t) is typing.Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(t))
    if isinstance(t, type) and issubclass(t, enum.Enum):
        return " \\| ".join(f"`{m.value}`" for m in t)
    names = {str: "text", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(t, getattr(t, "__name__", str(t)))


def _param_default(p: Any) -> str:
    if p.required:
        return "**required**"
    default = p.default
    if default is None or callable(default):
        return ""
    if isinstance(default, bool):
        if p.secondary_opts:
            return f"`{(p.opts if default else p.secondary_opts)[0]}`"
        return "on" if default else "off"
    if isinstance(default, enum.Enum):
        default = default.value
    return f"`{default}`"


def cli_reference() -> str:
    lines: list[str] = []
    for path, cmd, ctx in cli_commands():
        words = path.split()[1:]
        anchor = _anchor_of(path)
        lines += [f"## `{path}` {{#{anchor}}}", ""]
        help_text = (cmd.help or "").replace("\b\n", "").strip()
        if help_text:
            lines += [_prose(help_text), ""]
        usage = " ".join(cmd.collect_usage_pieces(ctx))
        lines += ["```", f"{path} {usage}".rstrip(), "```", ""]
        if hasattr(cmd, "commands"):
            prefix = "cli-" + "".join(f"{w}-" for w in words)
            subs = [n for n in cmd.list_commands(ctx) if not cmd.get_command(ctx, n).hidden]
            lines += ["Commands: " + ", ".join(f"[`{n}`](#{prefix}{n})" for n in subs), ""]
        params = [p for p in cmd.params if not getattr(p, "hidden", False)]
        if params:
            # An env var column only where an option reads one (typer's envvar=); defaults that
            # come from the environment are said in the help text.
            envs = [", ".join(f"`{v}`" for v in ([p.envvar] if isinstance(p.envvar, str) else p.envvar or []))
                    for p in params]
            head = ["argument / option", "type", "default", *(["env var"] if any(envs) else []), "help"]
            lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
            for p, env in zip(params, envs, strict=True):
                if p.param_type_name == "argument":
                    name = f"`{(p.metavar or p.name).upper()}` (argument)"
                else:
                    name = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
                cells = [name, _param_type(p), _cell(_param_default(p)),
                         *([env] if any(envs) else []),
                         _cell(_prose(getattr(p, "help", None) or ""))]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)
