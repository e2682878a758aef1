"""The store: zones of date partitions on a local folder or S3, published atomically.

Every publish writes an immutable run folder first and then flips one small pointer, so a reader
sees the old partition or the new one, never half of one, whatever moment a crash hits:

* **local**: files go to ``<zone>/.runs/date=D/<run>/`` and ``<zone>/date=D`` is a symlink that
  is replaced with one ``rename``. Hive-style readers (pyarrow, Spark) follow the link and skip
  the hidden ``.runs``; daybreak readers resolve the link once and read an immutable folder.
* **S3** (no rename): files go to ``<zone>/date=D/run=<run>/`` and the manifest object
  ``<zone>/date=D/_manifest.json``, written last with a single PUT, is the pointer.

The manifest lists the files (relative to the manifest), their content hash and the lineage key
that makes reruns idempotent. The previous run is kept for readers still on it; older runs are
removed.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "_manifest.json"
# Parquet row groups written by daybreak: small enough that readers (the feature step's Ray
# tasks) can split a big day in parallel.
ROW_GROUP_ROWS = 128 * 1024
PENDING_GRACE_NS = 15 * 60 * 10**9  # runs younger than this may be another writer's, still in progress


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3. Secrets stay out of repr, logs and results."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> StorageOptions:
        env = os.environ.get
        return cls(
            endpoint_url=env("DAYBREAK_S3_ENDPOINT_URL") or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            region=env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
            access_key=env("AWS_ACCESS_KEY_ID"),
            secret_key=env("AWS_SECRET_ACCESS_KEY"),
            session_token=env("AWS_SESSION_TOKEN"),
        )

    def s3_filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kwargs["endpoint_override"] = host.rstrip("/") if host else scheme
            kwargs["scheme"] = scheme if host else "https"
        if self.region:
            kwargs["region"] = self.region
        if self.access_key and self.secret_key:
            kwargs.update(access_key=self.access_key, secret_key=self.secret_key)
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return pafs.S3FileSystem(**kwargs)

    def boto3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region or "us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
        )


def _hash_stream(fs: pafs.FileSystem, path: str, h: Any) -> None:
    with fs.open_input_stream(path) as f:
        while block := f.read(1 << 20):
            h.update(block)


def sha256_file(path: str | Path, fs: pafs.FileSystem | None = None) -> str:
    h = hashlib.sha256()
    _hash_stream(fs or pafs.LocalFileSystem(), str(path), h)
    return h.hexdigest()


def sha256_files(paths: list[str], fs: pafs.FileSystem | None = None) -> str:
    """One hash over several files, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(sha256_file(p, fs).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Partition:
    dir: str  # folder the manifest's file names are relative to (fs path)
    manifest: dict[str, Any]
    fs: pafs.FileSystem
    uri: str

    @property
    def files(self) -> list[str]:
        return [posixpath.join(self.dir, f) for f in self.manifest["files"]]

    @property
    def path(self) -> str:
        return self.dir


@dataclass(frozen=True)
class PendingRun:
    zone: str
    day: date
    token: str
    folder: str
    rel_root: str


class Store:
    """A local folder or an ``s3://bucket/prefix`` holding the zones."""

    def __init__(self, root: str | Path, options: StorageOptions | None = None):
        root_s = str(root)
        self.options = options or StorageOptions.from_env()
        if root_s.startswith("s3://"):
            self.kind = "s3"
            self.fs: pafs.FileSystem = self.options.s3_filesystem()
            self.base = root_s[len("s3://"):].rstrip("/")
        elif "://" in root_s and not root_s.startswith("file://"):
            raise ValueError(f"store {root_s!r}: use a local folder or s3://bucket/prefix")
        else:
            self.kind = "local"
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(root_s.removeprefix("file://")).expanduser().resolve())

    def __repr__(self) -> str:
        return f"Store({self.uri(self.base)!r})"

    # --- paths ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def uri(self, path: str) -> str:
        return f"s3://{path}" if self.kind == "s3" else path

    def resolve(self, spec_path: str) -> tuple[pafs.FileSystem, str]:
        """A path from the spec: a URI or absolute path as given, otherwise relative to the store root."""
        if spec_path.startswith("s3://"):
            fs = self.fs if self.kind == "s3" else self.options.s3_filesystem()
            return fs, spec_path[len("s3://"):]
        if os.path.isabs(os.path.expanduser(spec_path)):
            return pafs.LocalFileSystem(), os.path.expanduser(spec_path)
        return self.fs, self.path(spec_path)

    def glob(self, spec_pattern: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
        """Files matching a pattern (``*``, ``?``, ``[...]`` in the last path component)."""
        fs, pattern = self.resolve(spec_pattern)
        parent, name = posixpath.split(pattern)
        if not any(c in name for c in "*?["):
            info = fs.get_file_info(pattern)
            return fs, [info] if info.type == pafs.FileType.File else []
        infos = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
        return fs, sorted((i for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, name)),
                          key=lambda i: i.path)

    # --- partitions -------------------------------------------------------------------------
    def partition_dir(self, zone: str, day: date) -> str:
        return self.path(zone, f"date={day.isoformat()}")

    def partition(self, zone: str, day: date) -> Partition | None:
        d = self.partition_dir(zone, day)
        if self.kind == "local":
            if not os.path.islink(d) and not os.path.isdir(d):
                return None
            real = os.path.realpath(d)  # resolved once: later swaps do not move files under us
            manifest = self._read_json_path(posixpath.join(real, MANIFEST))
            return None if manifest is None else Partition(real, manifest, self.fs, d)
        manifest = self._read_json_path(posixpath.join(d, MANIFEST))
        return None if manifest is None else Partition(d, manifest, self.fs, self.uri(d))

    def partitions(self, zone: str) -> list[date]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(zone), allow_not_found=True))
        out = []
        for i in infos:
            if i.base_name.startswith("date=") and self.partition(zone, date.fromisoformat(i.base_name[5:])):
                out.append(date.fromisoformat(i.base_name[5:]))
        return sorted(out)

    def begin(self, zone: str, day: date, run: str | None = None) -> PendingRun:
        """Start a new, invisible run folder for a partition; write files into ``.folder``."""
        token = run or uuid.uuid4().hex[:12]
        if self.kind == "local":
            folder = self.path(zone, ".runs", f"date={day.isoformat()}", token)
            rel_root = folder
        else:
            folder = posixpath.join(self.partition_dir(zone, day), f"run={token}")
            rel_root = self.partition_dir(zone, day)
        self.fs.create_dir(folder, recursive=True)
        return PendingRun(zone, day, token, folder, rel_root)

    def commit(self, pending: PendingRun, fields: dict[str, Any]) -> Partition:
        """Make a written run the partition: the one atomic step. On error the run is removed."""
        zone, day, token, run_dir, rel_root = pending.zone, pending.day, pending.token, pending.folder, pending.rel_root
        before = self.partition(zone, day)
        previous = before.manifest.get("run") if before is not None else None
        try:
            manifest = dict(fields)
            infos = self.fs.get_file_info(pafs.FileSelector(run_dir))
            files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                           and not i.base_name.startswith((".", "_")))
            if not files:
                raise OSError(f"run {run_dir} has no data files (removed by another writer?); not publishing it")
            manifest["files"] = [posixpath.relpath(f, rel_root) for f in files]
            manifest["content_hash"] = sha256_files(files, self.fs)
            manifest["run"] = token
            if self.kind == "local":
                self._write_json_path(posixpath.join(run_dir, MANIFEST), manifest)
                _fsync_dir(run_dir)
                link = self.partition_dir(zone, day)
                tmp_link = posixpath.join(posixpath.dirname(link), f".{posixpath.basename(link)}.{token}.lnk")
                os.symlink(posixpath.relpath(run_dir, posixpath.dirname(link)), tmp_link)
                os.replace(tmp_link, link)  # the one atomic step
                _fsync_dir(posixpath.dirname(link))
                part = Partition(run_dir, manifest, self.fs, link)
            else:
                self._write_json_path(posixpath.join(rel_root, MANIFEST), manifest)  # the pointer, last
                part = Partition(rel_root, manifest, self.fs, self.uri(rel_root))
        except BaseException:
            self.abort(pending)
            raise
        self._collect(zone, day, keep={token, previous})
        return part

    def abort(self, pending: PendingRun) -> None:
        """Remove a run that will not be published (nothing points at it). A run the manifest
        names is kept: on S3 a manifest PUT can land although its reply was lost, and then this run
        is the partition. So is one whose manifest cannot be read now (nothing is deleted blind)."""
        try:
            current = self._read_json_path(posixpath.join(pending.rel_root, MANIFEST))
        except OSError:
            return
        if current is not None and current.get("run") == pending.token:
            return
        try:
            self.fs.delete_dir_contents(pending.folder, missing_dir_ok=True)
        except OSError:
            pass
        _delete_dir(self.fs, pending.folder)

    def publish(self, zone: str, day: date, write: Callable[[pafs.FileSystem, str], dict[str, Any]],
                run: str | None = None) -> Partition:
        """Run ``write(fs, folder)`` to write the data files of a new run, then make it the partition.

        `write` returns the manifest fields; the list of files and their content hash are added
        here. On any error the new run is removed and the published partition is untouched.
        """
        pending = self.begin(zone, day, run)
        try:
            fields = write(self.fs, pending.folder)
        except BaseException:
            self.abort(pending)
            raise
        return self.commit(pending, fields)

    def _collect(self, zone: str, day: date, keep: set[str | None]) -> None:
        """Remove runs other than the current one and the one it replaced (readers may still be
        on that), including runs a crashed publish left behind (best effort)."""
        if self.kind == "local":
            parent = self.path(zone, ".runs", f"date={day.isoformat()}")
            prefix = ""
        else:
            parent = self.partition_dir(zone, day)
            prefix = "run="
        for i in self.fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
            if i.type != pafs.FileType.Directory or not i.base_name.startswith(prefix):
                continue
            if i.base_name[len(prefix):] in keep:
                continue
            mtime = i.mtime_ns
            if mtime is None:  # S3 "folders" have no time: take their newest object's
                inner = self.fs.get_file_info(pafs.FileSelector(i.path, allow_not_found=True))
                mtime = max((x.mtime_ns or 0 for x in inner), default=0)
            if time.time_ns() - mtime < PENDING_GRACE_NS:
                continue  # possibly another writer's run in progress
            try:
                self.fs.delete_dir(i.path)
            except OSError:
                pass
        if self.kind == "local":  # pointers a crash left half-made
            zdir = self.path(zone)
            for name in os.listdir(zdir):
                if name.startswith(f".date={day.isoformat()}.") and name.endswith(".lnk"):
                    try:
                        os.unlink(posixpath.join(zdir, name))
                    except OSError:
                        pass

    def presigned_url(self, uri: str, expires_in: int = 3600) -> str:
        """A URL a downstream reader can GET without storage credentials (S3), or a file:// URI."""
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://"):].partition("/")
            return self.options.boto3_client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires_in))
        return Path(uri).resolve().as_uri()

    # --- small documents --------------------------------------------------------------------
    def _read_json_path(self, path: str) -> Any | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read())
        except (FileNotFoundError, OSError) as e:
            if isinstance(e, FileNotFoundError) or "not exist" in str(e).lower() or "not found" in str(e).lower():
                return None
            raise

    def _write_json_path(self, path: str, obj: Any) -> None:
        data = json.dumps(obj, indent=2, sort_keys=True, default=str).encode()
        if self.kind == "local":
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:  # one PUT: atomic on S3
                f.write(data)

    def write_json(self, rel: str, obj: Any) -> str:
        p = self.path(rel)
        self.fs.create_dir(posixpath.dirname(p), recursive=True)
        self._write_json_path(p, obj)
        return p

    def read_json(self, rel: str) -> Any | None:
        return self._read_json_path(self.path(rel))


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
