"""daybreak.steps: the table of steps and the cycle's declaration (no data, no registry)."""

from __future__ import annotations

import subprocess

from conftest import BIN

from daybreak.steps import CACHEABLE, CYCLE, STEPS, CycleOptions, _load


def test_every_step_names_functions_that_exist() -> None:
    """Functions are named "module:function" (imported when a step runs): a moved or renamed one
    fails here, not in the middle of a cycle."""
    for step in STEPS.values():
        for ref in (step.function, step.recorded, step.otherwise):
            if ref is not None:
                assert callable(_load(ref)), (step.name, ref)
    assert set(CACHEABLE) == {s.name for s in STEPS.values() if s.recorded is not None}
    assert [s.name for s in CYCLE] == ["stage", "features", "online", "monitor", "train", "gate", "promote",
                                       "deploy"]


def test_promote_and_deploy_run_only_when_the_results_say_so() -> None:
    promote, deploy = STEPS["promote"], STEPS["deploy"]
    gate_yes, gate_no = {"decision": "PROMOTE"}, {"decision": "REJECT"}
    moved, pending = {"promoted": True, "approval": None}, {"promoted": False, "approval": "pending"}
    on, off, dry = CycleOptions(), CycleOptions(deploy=False), CycleOptions(dry_run=True)
    assert promote.runs_if({"gate": gate_yes}, on) and not promote.runs_if({"gate": gate_no}, on)
    assert deploy.runs_if({"gate": gate_yes, "promote": moved}, on)
    assert not deploy.runs_if({"gate": gate_yes, "promote": pending}, on)
    assert not deploy.runs_if({"gate": gate_yes, "promote": moved}, off)
    assert not deploy.runs_if({"gate": gate_yes, "promote": moved}, dry)
    # after a reject, promote's "not promoted" result never leads to a deployment
    assert not deploy.runs_if({"gate": gate_no, "promote": {"promoted": False}}, on)
    assert promote.options_from(dry) == {"dry_run": True} and STEPS["train"].options_from(on) == {"force": False}


def test_reading_the_declaration_imports_no_step() -> None:
    code = ("import sys, daybreak.steps; "
            "print([m for m in ('pyarrow', 'pandas', 'mlflow', 'ray', 'xgboost', 'sklearn') if m in sys.modules])")
    out = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_online_runs_only_when_the_spec_opts_in(spec) -> None:
    """Off (the default) the online step's result says so and nothing runs; on, it runs on days
    the calendar expects. It is a side step: nothing after it waits for it in a DAG."""
    from datetime import date

    online = STEPS["online"]
    day = date(2013, 1, 3)
    assert online.opt_in == "online.materialize" and online.side and not online.cacheable
    off = online.skipped(spec, day)
    assert off == {"step": "online", "date": "2013-01-03", "enabled": False, "skipped": True,
                   "reason": "online.materialize is not true in the spec"}
    on = spec.model_copy(update={"online": spec.online.model_copy(update={"materialize": True})})
    assert online.skipped(on, day) is None
    assert on.spec_hash() == spec.spec_hash()  # online serving does not shape the model
