"""Bounded YAML for anything a person or the artifact store can write: specs, MLmodel files.

No anchors or aliases, bounded size, nesting and node count, PyYAML's safe types only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daybreak.infra.errors import SpecError

MAX_SPEC_BYTES = 2**20
"""Largest spec file read (1 MiB; a real spec is a few KB)."""
MAX_YAML_DEPTH = 64
"""Deepest nesting of mappings and lists accepted (a real spec nests about 6 deep)."""
MAX_YAML_NODES = 20_000
"""Most YAML nodes (scalars, lists, mappings) in one document (a real spec has a few hundred; at
this cap the pure-Python parser stops within about a second)."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors or aliases (a handful of nested aliases expand to
    billions of values once dumped: "billion laughs"), with bounded nesting and node count."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        where = f"line {event.start_mark.line + 1}, column {event.start_mark.column + 1}"
        if isinstance(event, yaml.AliasEvent):
            raise SpecError(f"{where}: YAML alias '*{event.anchor}' is not allowed in a spec (aliases can expand "
                            "without bound); write the values out")
        if getattr(event, "anchor", None) is not None:
            raise SpecError(f"{where}: YAML anchor '&{event.anchor}' is not allowed in a spec (no anchors or "
                            "aliases); write the values out")
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise SpecError(f"{where}: more than {MAX_YAML_NODES} YAML values")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise SpecError(f"{where}: YAML nests deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str | bytes, origin: str = "<spec>", max_bytes: int = MAX_SPEC_BYTES,
              error: type[Exception] = SpecError) -> Any:
    """Parse one YAML document from an untrusted or semi-trusted source, bounded: at most
    `max_bytes`, no anchors or aliases, at most MAX_YAML_DEPTH levels and MAX_YAML_NODES values,
    and only plain data (PyYAML's safe types).

    Use this, not ``yaml.safe_load``, for anything a spec author or the artifact store can write
    (an MLmodel file, say, with ``error=`` the caller's own exception type).

    Raises:
        SpecError: (or `error`) naming `origin` and the line, for anything refused or not valid YAML.
    """
    try:
        return _load_yaml(text, origin, max_bytes)
    except SpecError as e:
        if error is SpecError:
            raise
        raise error(str(e)) from None


def _load_yaml(text: str | bytes, origin: str, max_bytes: int) -> Any:
    size = len(text.encode() if isinstance(text, str) else text)
    if size > max_bytes:
        raise SpecError(f"{origin}: {size} bytes, larger than the {max_bytes}-byte limit")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"{origin}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except SpecError as e:
        raise SpecError(f"{origin}: {e}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{origin}: not valid YAML: {e}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # e.g. an integer of 5,000 digits
        raise SpecError(f"{origin}: cannot read the YAML: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, max_bytes: int = MAX_SPEC_BYTES) -> Any:
    """:func:`load_yaml` on a file, never reading more than `max_bytes` + 1 bytes of it."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    try:
        with p.open("rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise SpecError(f"{p}: cannot read: {e.strerror or e}") from None
    if len(data) > max_bytes:
        raise SpecError(f"{p}: larger than the {max_bytes}-byte limit for a spec")
    return load_yaml(data, origin=str(p), max_bytes=max_bytes)
