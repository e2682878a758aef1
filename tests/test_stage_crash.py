"""SIGKILL the stage step at random moments of publishing: readers never see a partial partition,
and a rerun completes. Local disk and S3.

The stage loops run in children forked from one worker process per test (stage_crash_worker.py),
so a trial pays no interpreter start-up and imports (several seconds each on a busy machine)."""

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

import psutil
import pyarrow.parquet as pq
import pytest
from conftest import BIN, ROOT, SPEC
from s3 import apply_env

from daybreak.infra.context import RunContext
from daybreak.infra.store import sha256_files
from daybreak.spec import load_spec
from daybreak.stage import stage

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
            # a short breath: a reader spinning flat out holds this process's GIL against the
            # rerun and takes a whole core from the worker on a 2-core machine (it still reads
            # the partition hundreds of times per trial)
            stop.wait(0.002)

    t = threading.Thread(target=reader)
    t.start()
    rng = random.Random(7)
    publishes = []
    errors = tmp_path / "worker.err"
    with open(errors, "w") as err:
        worker = subprocess.Popen([str(BIN / "python"), str(ROOT / "tests" / "stage_crash_worker.py"), str(SPEC), DAY],
                                  env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                  text=True, bufsize=1)
    try:
        ready = worker.stdout.readline()
        assert ready.startswith("READY"), f"stage_crash_worker did not start: {ready!r} {errors.read_text()[-2000:]}"
        for k in range(TRIALS):
            counts = tmp_path / f"publishes-{k}.txt"
            worker.stdin.write(f"{counts}\n")
            worker.stdin.flush()
            pid = int(worker.stdout.readline().split()[1])
            # Wait for its first publish, so that the kill lands somewhere inside the publish loop
            # rather than before it.
            deadline = time.monotonic() + 120
            while not (counts.exists() and counts.read_text().startswith("1\n")):
                assert time.monotonic() < deadline and psutil.pid_exists(pid), \
                    f"the worker died before publishing once: {errors.read_text()[-2000:]}"
                time.sleep(0.005)
            time.sleep(rng.random() * 1.5)
            os.kill(pid, signal.SIGKILL)
            exit_line = worker.stdout.readline()
            assert exit_line.split() == ["EXIT", str(-signal.SIGKILL)], \
                f"{exit_line!r} (not killed: the loop ended) {errors.read_text()[-2000:]}"
            publishes.append(1 + len(counts.read_text().split()))  # the kill landed in publish number 2, 3, ...
            # a rerun after the crash completes and leaves a whole partition
            stage(spec, RunContext.create(DAY))
            assert check(RunContext.create(DAY)) == "ok"
    finally:
        stop.set()
        t.join()
        worker.stdin.close()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    print(f"\n{kind}: kills landed in publish number {publishes}; reads: {seen}")
    bad = {k: v for k, v in seen.items() if k not in ("ok", "stale")}
    assert bad == {}, f"readers saw {bad} (all: {seen}; kills landed in publish number {publishes})"
    assert seen.get("ok", 0) > 50
