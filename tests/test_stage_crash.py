"""SIGKILL the stage step at random moments of publishing: readers never see a partial partition,
and a rerun completes. Local disk and S3."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import BIN, ROOT, SPEC
from daybreak.context import RunContext
from daybreak.spec import load_spec
from daybreak.stage import stage
from daybreak.store import sha256_files
from s3 import apply_env

DAY = "2013-01-02"
TRIALS = 12


def check(ctx: RunContext) -> str:
    """'ok', 'absent', 'stale' (the pointer moved on while we read), or what is wrong."""
    part = ctx.store.partition("staged/flights", date.fromisoformat(DAY))
    if part is None:
        return "absent"
    try:
        if sha256_files(part.files, ctx.store.fs) != part.manifest["content_hash"]:
            raise ValueError("content hash mismatch")
        rows = sum(pq.ParquetFile(ctx.store.fs.open_input_file(f)).metadata.num_rows for f in part.files)
        if rows != part.manifest["rows"]:
            return f"rows {rows} != manifest {part.manifest['rows']}"
        return "ok"
    except (FileNotFoundError, OSError, ValueError) as e:
        now = ctx.store.partition("staged/flights", date.fromisoformat(DAY))
        if now is not None and now.manifest["run"] != part.manifest["run"]:
            return "stale"
        return f"partial: {e}"


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_kill_during_publish(kind: str, tmp_path: Path, landing: Path, monkeypatch: pytest.MonkeyPatch,
                             request: pytest.FixtureRequest) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("DAYBREAK_HOME", str(home))
    lines = (landing / "flights" / f"{DAY}.csv").read_bytes().splitlines(keepends=True)
    variants = {"a": b"".join(lines), "b": b"".join(lines[:-5])}
    if kind == "local":
        for v, data in variants.items():
            p = home / "store" / "landing" / v / "flights" / f"{DAY}.csv"
            p.parent.mkdir(parents=True)
            p.write_bytes(data)
    else:
        server = request.getfixturevalue("s3_server")
        apply_env(monkeypatch, server.env())
        bucket = f"crash-{uuid.uuid4().hex[:8]}"
        server.client().create_bucket(Bucket=bucket)
        monkeypatch.setenv("DAYBREAK_STORE", f"s3://{bucket}/store")
        for v, data in variants.items():
            server.client().put_object(Bucket=bucket, Key=f"store/landing/{v}/flights/{DAY}.csv", Body=data)
    spec = load_spec(SPEC)
    spec = spec.model_copy(update={"sources": {"flights": spec.sources["flights"].model_copy(
        update={"path": "landing/a/flights/{date}.csv"})}})
    stage(spec, RunContext.create(DAY))  # a first partition exists from now on

    seen: dict[str, int] = {}
    stop = threading.Event()

    def reader() -> None:
        ctx = RunContext.create(DAY)
        while not stop.is_set():
            r = check(ctx)
            seen[r] = seen.get(r, 0) + 1

    t = threading.Thread(target=reader)
    t.start()
    rng = random.Random(7)
    publishes = []
    try:
        for _ in range(TRIALS):
            proc = subprocess.Popen([str(BIN / "python"), str(ROOT / "tests" / "stage_crash_worker.py"), str(SPEC), DAY],
                                    env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            # Wait for its first publish (imports take a second or more on a busy machine), so that the
            # kill lands somewhere inside the publish loop rather than during start-up.
            first = proc.stdout.readline()
            assert first.strip() == "1", f"the worker died before publishing once: {first!r}"
            time.sleep(rng.random() * 1.5)
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate()
            publishes.append(1 + len(out.split()))  # kills land in publish number 2, 3, ...
            # a rerun after the crash completes and leaves a whole partition
            stage(spec, RunContext.create(DAY))
            assert check(RunContext.create(DAY)) == "ok"
    finally:
        stop.set()
        t.join()
    bad = {k: v for k, v in seen.items() if k not in ("ok", "stale")}
    assert bad == {}, f"readers saw {bad} (all: {seen}; kills landed in publish number {publishes})"
    assert seen.get("ok", 0) > 50
