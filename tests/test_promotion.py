"""Promotion under concurrency, the audit history and rollback, against a real (sqlite) registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import pytest
from conftest import BIN

from daybreak.gate import PROMOTE, evaluate_gate
from daybreak.infra import registry
from daybreak.infra.audit import audit_events
from daybreak.infra.context import RunContext
from daybreak.infra.errors import PromotionConflict
from daybreak.promote import model_history, promote_model, rollback_model, version_row
from daybreak.train import train_model

RACER = """
import json, os, sys, time
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import PromotionConflict
from daybreak.promote import promote_model
from daybreak.spec import parse_spec

# Line the racers up: each stops after its first read of the champion until both got there, and
# every read takes a second, so both read the champion before either moves it (without the lock
# both would win).
real = registry.alias_version
reads = []
def slow(*a, **k):
    v = real(*a, **k)
    if not reads:
        open(sys.argv[1] + ".ready", "w").close()
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.001)
    reads.append(v and v.version)
    time.sleep(1.0)
    return v
registry.alias_version = slow
spec = parse_spec(json.loads(open(sys.argv[1]).read()))
ctx = RunContext.create(sys.argv[2], run_id="racer-" + sys.argv[1][-6:])
try:
    out = promote_model(spec, ctx)
    print("RESULT " + json.dumps({"won": out["promoted"], "version": out.get("champion_version"), "reads": reads}))
except PromotionConflict as e:
    print("RESULT " + json.dumps({"won": False, "lost": str(e), "reads": reads}))
"""


def _lenient(spec):
    return spec.model_copy(update={"gate": spec.gate.model_copy(update={"compare": "no_worse", "margin": 1.0,
                                                                        "floor": 0.0})})


def _ctx(day: str) -> RunContext:
    return RunContext.create(day)


def test_two_promoters_at_once_exactly_one_wins(fresh: Path, spec, tmp_path: Path) -> None:
    s = _lenient(spec)
    train_model(s, _ctx("2013-01-02"))
    evaluate_gate(s, _ctx("2013-01-02"))
    promote_model(s, _ctx("2013-01-02"))
    # two candidates for 2013-01-03 (two specs: another seed), both gated against v1
    other = s.model_copy(update={"model": s.model.model_copy(update={"seed": 7})})
    files = []
    for i, sp in enumerate((s, other)):
        train_model(sp, _ctx("2013-01-03"))
        assert evaluate_gate(sp, _ctx("2013-01-03"))["champion_version"] == "1"
        files.append(tmp_path / f"spec{i}.json")
        files[-1].write_text(json.dumps(sp.model_dump(mode="json")))
    import time

    go = tmp_path / "go"
    procs = [subprocess.Popen([str(BIN / "python"), "-c", RACER, str(f), "2013-01-03", str(go)], env=dict(os.environ),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in files]
    deadline = time.monotonic() + 120
    while not all(Path(f"{f}.ready").exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        assert line, out[-2000:] + err[-3000:]
        results.append(json.loads(line[len("RESULT "):]))
    winners = [r for r in results if r["won"]]
    losers = [r for r in results if not r["won"]]
    assert len(winners) == 1 and len(losers) == 1, results
    assert all(str(r["reads"][0]) == "1" for r in results)  # both saw v1 as champion when they started
    assert "another promotion won" in losers[0]["lost"] and "re-run the gate" in losers[0]["lost"]
    cl = registry.client(_ctx("2013-01-03"))
    assert str(registry.alias_version(cl, s.model.name, "champion").version) == winners[0]["version"]
    assert str(registry.alias_version(cl, s.model.name, "previous").version) == "1"
    promotes = [e for e in audit_events(s, _ctx("2013-01-03")) if e["event"] == "promote"]
    assert [(e["version"], e["from_version"]) for e in promotes] == [(winners[0]["version"], "1"), ("1", None)]
    assert "daybreak-lock" not in " ".join(m.name for m in cl.search_registered_models())


def test_rollback_restores_previous_and_is_recorded(fresh: Path, spec) -> None:
    s = _lenient(spec)
    for day in ("2013-01-02", "2013-01-03"):
        train_model(s, _ctx(day))
        assert evaluate_gate(s, _ctx(day))["decision"] == PROMOTE
        assert promote_model(s, _ctx(day))["promoted"]
    ctx = _ctx("2013-01-03")
    with pytest.raises(PromotionConflict, match="reason is required"):
        rollback_model(s, ctx, " ")
    out = rollback_model(s, ctx, "v2 mis-scores JFK departures")
    assert out["champion_version"] == "1" and out["rolled_back_version"] == "2" and out["previous_version"] is None
    cl = registry.client(ctx)
    assert str(registry.alias_version(cl, s.model.name, "champion").version) == "1"
    assert registry.alias_version(cl, s.model.name, "previous") is None
    assert cl.get_model_version(s.model.name, "2").tags["daybreak.rolled_back_reason"] == "v2 mis-scores JFK departures"
    # nothing to roll back to now, and a rerun of day 3 never reinstates the rolled-back version
    with pytest.raises(PromotionConflict, match="nothing to roll back to"):
        rollback_model(s, ctx, "again")
    assert promote_model(s, ctx)["promoted"] is False
    events = audit_events(s, ctx)
    assert [(e["event"], e["version"], e["from_version"]) for e in events] == [
        ("rollback", "1", "2"), ("promote", "2", "1"), ("promote", "1", None)]
    assert events[0]["reason"] == "v2 mis-scores JFK departures" and events[0]["by"]

    # the CLI prints the same history
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-m", "daybreak.cli", "history", "--spec", _spec_file(s, fresh)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rollback" in proc.stdout.splitlines()[0] and "mis-scores" in proc.stdout


def test_versions_listing_reads_the_registry_twice_whatever_the_number_of_versions(
        fresh: Path, spec, monkeypatch: pytest.MonkeyPatch) -> None:
    """`daybreak versions` once read every version's full record (a registry round trip each, on
    a tracking server) and created the experiment: now one search and one read of the aliases."""
    import mlflow

    s = _lenient(spec)
    ctx = _ctx("2013-01-03")
    assert model_history(s, ctx) == [] and audit_events(s, ctx) == []
    assert not (fresh / "mlflow.db").exists()  # a listing does not create the registry
    for day in ("2013-01-02", "2013-01-03"):
        train_model(s, _ctx(day))
        evaluate_gate(s, _ctx(day))
        promote_model(s, _ctx(day))
    cl = registry.client(ctx)
    full = [version_row(cl.get_model_version(s.model.name, v)) for v in ("2", "1")]
    calls: list[str] = []
    for name in ("get_model_version", "search_model_versions", "get_registered_model", "create_experiment",
                 "get_model_version_by_alias"):
        def counted(self, *a, _name=name, _orig=getattr(mlflow.MlflowClient, name), **k):
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(mlflow.MlflowClient, name, counted)
    rows = model_history(s, ctx)
    assert rows == full and [r["aliases"] for r in rows] == [["champion"], ["previous"]]
    assert sorted(calls) == ["get_registered_model", "search_model_versions"]


def test_rejections_are_in_the_history(fresh: Path, spec) -> None:
    s = _lenient(spec)
    train_model(s, _ctx("2013-01-02"))
    evaluate_gate(s, _ctx("2013-01-02"))
    promote_model(s, _ctx("2013-01-02"))
    strict = spec.model_copy(update={"gate": spec.gate.model_copy(update={"floor": 0.99})})
    train_model(strict, _ctx("2013-01-03"))
    assert evaluate_gate(strict, _ctx("2013-01-03"))["decision"] == "REJECT"
    last = audit_events(s, _ctx("2013-01-03"))[0]
    assert last["event"] == "reject" and last["version"] == "2" and last["from_version"] == "1"
    assert "floor" in last["reason"]


def _spec_file(s, home: Path) -> str:
    p = home / "spec.json"
    p.write_text(json.dumps(s.model_dump(mode="json")))
    return str(p)


def test_retention_deletes_old_versions_out_of_service_only(fresh: Path, spec) -> None:
    from datetime import datetime, timedelta

    from daybreak.promote._promotion import apply_retention

    s = _lenient(spec)
    for day in ("2013-01-02", "2013-01-03"):
        train_model(s, _ctx(day))
        evaluate_gate(s, _ctx(day))
        promote_model(s, _ctx(day))  # v1 then v2: champion v2, previous v1
    strict = spec.model_copy(update={"gate": spec.gate.model_copy(update={"floor": 0.99}),
                                     "promotion": spec.promotion.model_copy(update={"retention_days": 30})})
    train_model(strict, _ctx("2013-01-03"))
    assert evaluate_gate(strict, _ctx("2013-01-03"))["decision"] == "REJECT"  # v3, in service nowhere
    ctx = _ctx("2013-01-04")
    assert apply_retention(strict, ctx) == []  # all younger than 30 days
    later = datetime.now(UTC) + timedelta(days=31)
    assert apply_retention(strict, _ctx("2013-01-03"), now=later) == []  # the date's own candidate stays
    assert apply_retention(strict, ctx, now=later) == ["3"]
    cl = registry.client(ctx)
    assert [str(mv.version) for mv in registry.versions(cl, s.model.name)] == ["2", "1"]
    assert str(registry.alias_version(cl, s.model.name, "champion").version) == "2"
    assert audit_events(s, ctx)[0]["event"] == "retire" and audit_events(s, ctx)[0]["version"] == "3"


# --- manual approval -----------------------------------------------------------------------------

def _manual(spec):
    s = _lenient(spec)
    return s.model_copy(update={"promotion": s.promotion.model_copy(update={"approval": "manual"})})


def _aliases(ctx: RunContext, name: str) -> tuple[str | None, str | None]:
    cl = registry.client(ctx)
    return tuple(None if (mv := registry.alias_version(cl, name, a)) is None else str(mv.version)
                 for a in ("champion", "previous"))


def _cli(*args: str):
    """The daybreak command in process (a subprocess costs seconds of imports per call)."""
    from typer.testing import CliRunner

    from daybreak.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_manual_approval_tags_pending_then_approve_promotes(fresh: Path, spec) -> None:
    from daybreak.infra.errors import ApprovalError
    from daybreak.promote import approve_model, should_deploy

    auto, manual = _lenient(spec), _manual(spec)
    assert manual.spec_hash() == auto.spec_hash()  # who approves does not change the model's identity
    train_model(auto, _ctx("2013-01-02"))
    evaluate_gate(auto, _ctx("2013-01-02"))
    assert promote_model(auto, _ctx("2013-01-02"))["promoted"]  # v1, champion
    ctx = _ctx("2013-01-03")
    train_model(manual, ctx)
    assert evaluate_gate(manual, ctx)["decision"] == PROMOTE

    out = promote_model(manual, ctx)
    assert out["promoted"] is False and out["approval"] == "pending" and out["candidate_version"] == "2"
    assert out["champion_version"] == "1" and out["gated_against"] == "1" and "approve" in out["reason"]
    assert not should_deploy(out)
    assert _aliases(ctx, manual.model.name) == ("1", None)
    tags = registry.client(ctx).get_model_version(manual.model.name, "2").tags
    assert tags["daybreak.approval"] == "pending" and tags["daybreak.approval.gated_against"] == "1"
    assert "daybreak.promoted_at" not in tags
    assert promote_model(manual, ctx)["approval"] == "pending"  # a rerun: still pending, recorded once
    events = audit_events(manual, ctx)
    assert [(e["event"], e["version"], e["from_version"]) for e in events] == [
        ("pending_approval", "2", "1"), ("promote", "1", None)]

    with pytest.raises(ApprovalError, match="reason is required"):
        approve_model(manual, ctx, "2", "  ")
    assert model_history(manual, ctx)[0]["approval"] == "pending"

    spec_file = _spec_file(manual, fresh)
    proc = _cli("approve", "--spec", spec_file, "--version", "2", "--reason", "checked the JFK slice by hand", "--json")
    assert proc.exit_code == 0, proc.output
    res = json.loads(proc.stdout)
    assert res["approval"] == "approved" and res["promoted"] is True
    assert res["champion_version"] == "2" and res["previous_version"] == "1" and res["by"]
    assert _aliases(ctx, manual.model.name) == ("2", "1")
    tags = registry.client(ctx).get_model_version(manual.model.name, "2").tags
    assert tags["daybreak.approval"] == "approved"
    assert tags["daybreak.approval.reason"] == "checked the JFK slice by hand"
    assert tags["daybreak.replaced_version"] == "1" and "daybreak.promoted_at" in tags
    events = audit_events(manual, ctx)
    newest = {(e["event"], e["version"], e["from_version"]) for e in events[:2]}  # recorded in one lock hold
    assert newest == {("approved", "2", "1"), ("promote", "2", "1")}
    assert [e["event"] for e in events[2:]] == ["pending_approval", "promote"]
    approved = next(e for e in events if e["event"] == "approved")
    assert approved["reason"] == "checked the JFK slice by hand" and approved["by"] == res["by"]
    assert approved["logical_date"] == "2013-01-03"  # the version's date, not the day it was approved

    # approving twice, or the rerun of the date, changes nothing
    with pytest.raises(ApprovalError, match=r"v2: already promoted .* \(approved by "):
        approve_model(manual, ctx, "2", "again")
    assert promote_model(manual, ctx)["reason"] == "already champion"
    proc = _cli("versions", "--spec", spec_file)
    assert proc.exit_code == 0, proc.output
    assert f"approval=approved by {res['by']}" in proc.stdout.splitlines()[0], proc.stdout


def test_approval_refused_when_champion_moved_and_reject(fresh: Path, spec) -> None:
    from datetime import datetime, timedelta

    from daybreak.infra.errors import ApprovalError
    from daybreak.promote import approve_model
    from daybreak.promote._promotion import apply_retention

    auto, manual = _lenient(spec), _manual(spec)
    train_model(auto, _ctx("2013-01-02"))
    evaluate_gate(auto, _ctx("2013-01-02"))
    promote_model(auto, _ctx("2013-01-02"))  # v1 champion
    other = manual.model_copy(update={"model": manual.model.model_copy(update={"seed": 7})})
    ctx = _ctx("2013-01-03")
    for sp in (manual, other):  # v2 and v3, both gated against v1, both pending
        train_model(sp, ctx)
        assert evaluate_gate(sp, ctx)["champion_version"] == "1"
        if sp is other:  # gated, but the promote step has not asked for approval yet
            with pytest.raises(ApprovalError, match=r"v3: not pending approval \(gate decision PROMOTE\)"):
                approve_model(manual, ctx, "3", "too early")
        assert promote_model(sp, ctx)["approval"] == "pending"
    assert approve_model(manual, ctx, 2, "better on every slice")["champion_version"] == "2"
    before = audit_events(manual, ctx)

    with pytest.raises(PromotionConflict, match=r"champion is now v2 but the gate evaluated v3 against v1.*re-gated"):
        approve_model(manual, ctx, "3", "also good")
    assert _aliases(ctx, manual.model.name) == ("2", "1")
    cl = registry.client(ctx)
    assert cl.get_model_version(manual.model.name, "3").tags["daybreak.approval"] == "pending"
    assert len(audit_events(manual, ctx)) == len(before)  # nothing recorded

    # retention keeps a pending version however old
    keep_30 = manual.model_copy(update={"promotion": manual.promotion.model_copy(update={"retention_days": 30})})
    later = datetime.now(UTC) + timedelta(days=31)
    assert apply_retention(keep_30, _ctx("2013-01-05"), now=later) == []

    with pytest.raises(ApprovalError, match="reason is required"):
        approve_model(manual, ctx, "3", "", decision="reject")
    out = approve_model(manual, ctx, "v3", "superseded by v2", decision="reject")
    assert out["approval"] == "rejected" and out["promoted"] is False and out["champion_version"] == "2"
    assert _aliases(ctx, manual.model.name) == ("2", "1")
    last = audit_events(manual, ctx)[0]
    assert (last["event"], last["version"], last["reason"]) == ("approval_rejected", "3", "superseded by v2")
    with pytest.raises(ApprovalError, match=r"rejected by .*superseded by v2.*never promoted"):
        approve_model(manual, ctx, "3", "changed my mind")
    res = promote_model(other, ctx)  # the date's rerun leaves a rejected version alone
    assert res["promoted"] is False and res["approval"] == "rejected"

    # not pending: promoted already (without approval), bad input
    with pytest.raises(ApprovalError, match="v1: already promoted"):
        approve_model(manual, ctx, "1", "why not")
    with pytest.raises(ApprovalError, match="'maybe' is not 'approve' or 'reject'"):
        approve_model(manual, ctx, "2", "x", decision="maybe")
    with pytest.raises(ApprovalError, match="'two' is not a model version number"):
        approve_model(manual, ctx, "two", "x")

    # a rejected approval is out of service: retention may delete it; then it is gone for good
    assert apply_retention(keep_30, _ctx("2013-01-05"), now=later) == ["3"]
    with pytest.raises(ApprovalError, match=r"has no version 3 .*deleted by retention"):
        approve_model(manual, ctx, "3", "x")
    assert "daybreak-lock" not in " ".join(m.name for m in cl.search_registered_models())


DIES_HOLDING = """
import os, signal, sys
from daybreak.infra import registry
from daybreak.infra.context import RunContext
cl = registry.client(RunContext.create("2013-01-02"))
with registry.model_lock(cl, sys.argv[1], owner="doomed"):
    print("HELD", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_lock_whose_holder_died_is_taken_over_at_once(fresh: Path, spec) -> None:
    import time

    cl = registry.client(_ctx("2013-01-02"))
    proc = subprocess.run([str(BIN / "python"), "-c", DIES_HOLDING, spec.model.name], capture_output=True, text=True,
                          timeout=120, env=os.environ.copy())
    assert proc.returncode == -9 and "HELD" in proc.stdout, proc.stdout + proc.stderr
    held = cl.get_registered_model(f"{spec.model.name}.daybreak-lock")  # left behind, lease still running
    assert float(held.tags["daybreak.lock_expires"]) > time.time() + 10
    t0 = time.monotonic()
    with registry.model_lock(cl, spec.model.name, owner="next", wait_s=10):
        pass
    assert time.monotonic() - t0 < 5  # not the lease's minute: the holder's process is gone


def test_a_live_holders_lease_is_renewed(fresh: Path, spec) -> None:
    import threading
    import time

    cl = registry.client(_ctx("2013-01-02"))
    got = threading.Event()
    with registry.model_lock(cl, spec.model.name, owner="slow", lease_s=1.5):
        def contender() -> None:
            try:
                with registry.model_lock(cl, spec.model.name, owner="eager", lease_s=1.5, wait_s=3):
                    got.set()
            except PromotionConflict:
                pass
        t = threading.Thread(target=contender)
        t.start()
        time.sleep(4)  # well past one lease: without renewal the contender would take over
        assert not got.is_set()
    t.join()


def test_a_promotion_interrupted_before_its_record_is_completed_by_the_rerun(fresh: Path, spec) -> None:
    lenient = _lenient(spec)
    for day in ("2013-01-02", "2013-01-03"):
        train_model(lenient, _ctx(day))
        evaluate_gate(lenient, _ctx(day))
    assert promote_model(lenient, _ctx("2013-01-02"))["promoted"] is True
    cl = registry.client(_ctx("2013-01-03"))
    cand = registry.candidate_for(cl, spec.model.name, "2013-01-03", lenient.spec_hash())
    assert cand.tags[registry.DECISION_TAG] == PROMOTE
    # what a SIGKILL right after the alias moved leaves: champion moved, no event, no mark
    cl.set_registered_model_alias(spec.model.name, spec.promotion.previous_alias, "1")
    cl.set_registered_model_alias(spec.model.name, spec.promotion.alias, str(cand.version))
    out = promote_model(lenient, _ctx("2013-01-03"))
    assert out["promoted"] is False and out["reason"] == "already champion"
    promotes = [e for e in audit_events(lenient, _ctx("2013-01-03")) if e["event"] == "promote"]
    assert [e["version"] for e in promotes] == [str(cand.version), "1"], promotes
    assert promotes[0]["from_version"] == "1" and "rerun" in promotes[0]["reason"]
    assert "daybreak.promoted_at" in cl.get_model_version(spec.model.name, str(cand.version)).tags
    promote_model(lenient, _ctx("2013-01-03"))  # and only once
    assert len([e for e in audit_events(lenient, _ctx("2013-01-03")) if e["event"] == "promote"]) == 2
