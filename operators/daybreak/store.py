"""The store: zones of date partitions, published atomically.

A partition ``<zone>/date=YYYY-MM-DD/`` is written under a hidden temporary name and made visible
with one rename, with its ``_manifest.json`` inside (rows, content hash, lineage key). Readers
that list the zone therefore see either the old partition or the new one, never half of one;
pyarrow and Spark skip the hidden ``.tmp-*`` names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

MANIFEST = "_manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[str | Path]) -> str:
    """One hash over several files, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Partition:
    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> list[str]:
        return [str(self.path / f) for f in self.manifest["files"]]


class Store:
    """A local folder holding the zones (landing, staged, features, predictions, quarantine)."""

    def __init__(self, root: str | Path):
        root_s = str(root)
        if "://" in root_s and not root_s.startswith("file://"):
            raise ValueError(f"store {root_s!r}: only local folders are supported in this version")
        self.root = Path(root_s.removeprefix("file://")).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def resolve(self, path: str) -> Path:
        """A spec path: absolute as given, relative to the store root otherwise."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.root / p

    # --- partitions -------------------------------------------------------------------------
    def partition_dir(self, zone: str, day: date) -> Path:
        return self.path(zone, f"date={day.isoformat()}")

    def partition(self, zone: str, day: date) -> Partition | None:
        d = self.partition_dir(zone, day)
        m = d / MANIFEST
        if not m.is_file():
            return None
        return Partition(d, json.loads(m.read_text()))

    def partitions(self, zone: str) -> list[date]:
        base = self.path(zone)
        if not base.is_dir():
            return []
        out = []
        for d in base.iterdir():
            if d.name.startswith("date=") and (d / MANIFEST).is_file():
                out.append(date.fromisoformat(d.name[5:]))
        return sorted(out)

    def publish(self, zone: str, day: date, write: Callable[[Path], dict[str, Any]]) -> Partition:
        """Run ``write(tmpdir)`` (which writes the data files and returns the manifest), then publish.

        The manifest gets the list of files and their content hash. On any error the temporary
        folder is removed and the previously published partition is untouched.
        """
        final = self.partition_dir(zone, day)
        final.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        tmp = final.parent / f".tmp-{final.name}-{token}"
        tmp.mkdir()
        try:
            manifest = dict(write(tmp))
            files = sorted(p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith((".", "_")))
            manifest["files"] = files
            manifest["content_hash"] = sha256_files([tmp / f for f in files])
            _write_json(tmp / MANIFEST, manifest)
            _fsync_dir(tmp)
            trash = None
            if final.exists():
                trash = final.parent / f".trash-{final.name}-{token}"
                os.rename(final, trash)
            os.rename(tmp, final)
            _fsync_dir(final.parent)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Partition(final, manifest)

    # --- small documents --------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any) -> Path:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}")
        _write_json(tmp, obj)
        os.replace(tmp, p)
        return p

    def read_json(self, rel: str) -> Any | None:
        p = self.path(rel)
        return json.loads(p.read_text()) if p.is_file() else None


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
