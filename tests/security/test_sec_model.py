"""Attack: code runs from a tampered model (issue 20, critical).

The attacker can write to the MLflow artifact store but not to the registry. On the code before
this fix, rewriting a version's ``MLmodel`` so that ``python_function.artifacts.{meta,model}.path``
point at a new ``evil/meta.json`` (listing ``posix.system`` among the trusted types) and
``evil/model.skops`` (a skops node calling it), leaving ``model_code.py`` and ``artifacts/``
untouched, passed ``registry.verify_model`` (the digest covered only those two) and ran a shell
command in ``daybreak gate --force``, at ``daybreak serve`` start-up and on every hot swap.

Here every file of the stored model is covered by the digest the registry holds, and the types
skops may load come from the registry too. Real parts: a sqlite registry whose artifact store is a
folder, the real train/gate/promote steps, the real ``daybreak`` CLI and ``daybreak serve``.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import BIN, free_port, wait_http
from test_model_integrity import _wait, model_dir
from test_serve_load import _lenient

from daybreak.gate import PROMOTE, evaluate_gate
from daybreak.infra import registry
from daybreak.infra.context import RunContext
from daybreak.infra.errors import IntegrityError
from daybreak.promote import promote_model
from daybreak.train import train_model

REFUSAL = "refusing to load"


def evil_skops(command: str) -> bytes:
    """A skops file whose root node calls ``posix.system(command)`` when loaded: skops builds a
    ``ConstructorFromReduceNode`` by calling the type it names with the stored arguments, and
    ``posix.system`` passes once it is on the trusted list."""
    import skops.io as sio

    args = json.loads(zipfile.ZipFile(io.BytesIO(sio.dumps((command,)))).read("schema.json"))
    for k in ("protocol", "_skops_version"):
        args.pop(k, None)
    schema = {"__class__": "system", "__module__": "posix", "__loader__": "ConstructorFromReduceNode",
              "content": args, "__id__": 1, "protocol": 2, "_skops_version": "0.16.0"}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("schema.json", json.dumps(schema))
    return buf.getvalue()


def plant_evil_model(folder: Path, marker: Path) -> None:
    """The attack as reported: new files under evil/, MLmodel's artifact paths pointed at them,
    model_code.py and artifacts/ untouched."""
    evil = folder / "evil"
    evil.mkdir()
    meta = json.loads((folder / "artifacts" / "meta.json").read_text())
    meta.update(flavor="sklearn", trusted_types=["posix.system"], partition_by=[])
    (evil / "meta.json").write_text(json.dumps(meta))
    (evil / "model.skops").write_bytes(evil_skops(f"touch {marker}"))
    mlmodel = folder / "MLmodel"
    conf = yaml.safe_load(mlmodel.read_text())
    conf["flavors"]["python_function"]["artifacts"] = {"meta": {"path": "evil/meta.json"},
                                                       "model": {"path": "evil/model.skops"}}
    mlmodel.write_text(yaml.safe_dump(conf))


@pytest.fixture
def two_versions(fresh: Path, spec, ray_local: None, tmp_path: Path) -> dict:
    """Champion v1 (2013-01-02) and a gated candidate v2 (2013-01-03), both untouched; the lenient
    spec written to a file for the CLI."""
    s = _lenient(spec, 21)
    day2, day3 = RunContext.create("2013-01-02"), RunContext.create("2013-01-03")
    v1 = train_model(s, day2)["model_version"]
    assert evaluate_gate(s, day2)["decision"] == PROMOTE and promote_model(s, day2)["promoted"]
    v2 = train_model(s, day3)["model_version"]
    assert evaluate_gate(s, day3)["decision"] == PROMOTE
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(s.model_dump(mode="json")))
    return {"spec": s, "v1": v1, "v2": v2, "day3": day3, "spec_file": spec_file,
            "cl": registry.client(day3), "marker": tmp_path / "tampered-code-ran"}


def test_redirected_artifacts_are_refused_before_anything_loads(two_versions: dict) -> None:
    s, v2, day3, marker = two_versions["spec"], two_versions["v2"], two_versions["day3"], two_versions["marker"]
    plant_evil_model(model_dir(s.model.name, v2), marker)
    with pytest.raises(IntegrityError, match=REFUSAL):
        registry.verify_model(day3, s.model.name, v2)
    with pytest.raises(IntegrityError, match=REFUSAL):
        registry.load_model(day3, s.model.name, v2)
    assert not marker.exists(), "the tampered model's skops node ran"


def test_gate_cli_refuses_the_redirected_model(two_versions: dict) -> None:
    s, v2, marker = two_versions["spec"], two_versions["v2"], two_versions["marker"]
    plant_evil_model(model_dir(s.model.name, v2), marker)
    out = subprocess.run([str(BIN / "daybreak"), "gate", "--spec", str(two_versions["spec_file"]),
                          "--date", "2013-01-03", "--force"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert not marker.exists(), "daybreak gate --force ran the tampered model's code"
    assert out.returncode == 3, out.stdout + out.stderr
    assert REFUSAL in out.stderr and f"version {v2}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.fixture
def server(two_versions: dict, tmp_path: Path) -> Iterator[dict]:
    """`daybreak serve` on a free loopback port, polling the alias every 0.3 s; not started yet."""
    conf = yaml.safe_load(two_versions["spec_file"].read_text())
    port = free_port()
    conf["serving"].update(port=port, poll_seconds=0.3)
    conf["monitoring"]["log"]["sample_rate"] = 0
    spec_file = tmp_path / "serve-spec.yaml"
    spec_file.write_text(yaml.safe_dump(conf))
    log_path = tmp_path / "serve.log"
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen([str(BIN / "daybreak"), "serve", "--spec", str(spec_file)],
                                          env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT))
        return procs[-1]

    yield {"url": f"http://127.0.0.1:{port}", "start": start, "log": log_path}
    for p in procs:
        p.terminate()
        p.wait(timeout=20)


def test_serve_refuses_the_redirected_model_at_start_and_on_swap(two_versions: dict, server: dict) -> None:
    s, v1, v2, cl, marker = (two_versions[k] for k in ("spec", "v1", "v2", "cl", "marker"))
    name, alias, url = s.model.name, s.promotion.alias, server["url"]
    plant_evil_model(model_dir(name, v2), marker)
    # start-up: the alias moved to the tampered version by someone with registry access
    cl.set_registered_model_alias(name, alias, v2)
    proc = server["start"]()
    wait_http(f"{url}/version", timeout=90, proc=proc)
    health = _wait(lambda: (h := httpx.get(f"{url}/health", timeout=10).json()).get("last_error") and h)
    assert health is not None and health["version"] is None and REFUSAL in health["last_error"], health
    assert httpx.get(f"{url}/ping", timeout=10).status_code == 503
    # the alias back to v1: it is served
    cl.set_registered_model_alias(name, alias, v1)
    assert _wait(lambda: httpx.get(f"{url}/version", timeout=10).json()["version"] == v1)
    # a hot swap to the tampered version: refused, v1 stays
    cl.set_registered_model_alias(name, alias, v2)
    health = _wait(lambda: (h := httpx.get(f"{url}/health", timeout=10).json()).get("last_error") and h)
    assert health is not None and health["version"] == v1 and REFUSAL in health["last_error"], health
    assert not marker.exists(), "daybreak serve ran the tampered model's code"
    assert proc.poll() is None


def _add_file(folder: Path) -> None:
    (folder / "artifacts" / "extra.py").write_text("print('hello')\n")


def _drop_file(folder: Path) -> None:
    (folder / "input_example.json").unlink()


def _change_requirements(folder: Path) -> None:
    with open(folder / "requirements.txt", "a") as f:
        f.write("evil-package==1.0\n")


def _change_mlmodel(folder: Path) -> None:
    conf = yaml.safe_load((folder / "MLmodel").read_text())
    conf["flavors"]["python_function"]["env"] = {"virtualenv": "evil_env.yaml"}
    (folder / "MLmodel").write_text(yaml.safe_dump(conf))


TAMPERS = {"an extra file": _add_file, "a missing file": _drop_file, "requirements.txt changed": _change_requirements,
           "MLmodel changed": _change_mlmodel}


def test_any_extra_missing_or_changed_file_is_refused(two_versions: dict) -> None:
    """Each kind of change on its own copy of v2's folder (restored between kinds)."""
    import shutil

    s, v2, day3 = two_versions["spec"], two_versions["v2"], two_versions["day3"]
    folder = model_dir(s.model.name, v2)
    pristine = folder.parent / "pristine"
    shutil.copytree(folder, pristine, symlinks=True)
    accepted = []
    for what, tamper in TAMPERS.items():
        tamper(folder)
        try:
            registry.verify_model(day3, s.model.name, v2)
            accepted.append(what)
        except IntegrityError as e:
            assert REFUSAL in str(e) and f"version {v2}" in str(e), e
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder, symlinks=True)
    assert not accepted, f"tampered versions passed the check: {accepted}"
    registry.verify_model(day3, s.model.name, v2)  # the untouched files pass


def test_skops_trust_comes_from_the_registry(fresh: Path, spec, ray_local: None) -> None:
    """A scikit-learn version records the types its file holds in the registry at training; the
    loader trusts exactly those, whatever meta.json beside the model says."""
    s = _lenient(spec, 22)
    s = s.model_copy(update={"model": s.model.model_copy(update={
        "flavor": "sklearn", "estimator": "sklearn.ensemble.HistGradientBoostingClassifier",
        "params": {"max_iter": 20}})})
    day = RunContext.create("2013-01-02")
    v = train_model(s, day)["model_version"]
    cl = registry.client(day)
    trusted = json.loads(cl.get_model_version(s.model.name, v).tags[registry.TRUSTED_TYPES_TAG])
    assert trusted, "no trusted types recorded for a scikit-learn version"
    model = registry.load_model(day, s.model.name, v)
    assert model.unwrap_python_model().model is not None
    # the registry's record narrowed (as if the file held a type training never wrote): refused
    cl.set_model_version_tag(s.model.name, v, registry.TRUSTED_TYPES_TAG, json.dumps(trusted[:-1]))
    with pytest.raises(Exception, match="types not recorded at training"):
        registry.load_model(day, s.model.name, v)


def _as_legacy(cl, name: str, version: str) -> None:
    """Make `version` look registered before the whole-folder digest: the first record only
    (model_code.py and artifacts/)."""
    cl.delete_model_version_tag(name, version, registry.MODEL_DIGEST_TAG)
    cl.set_model_version_tag(name, version, registry.ARTIFACTS_TAG,
                             registry.artifacts_digest(registry.loaded_files(model_dir(name, version))))


def test_versions_without_the_full_record_are_refused(two_versions: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version registered without the whole-folder digest (before it existed, or by hand) is
    not loaded unless the operator says so out of band, and then only with the first record."""
    s, v2, day3, cl = two_versions["spec"], two_versions["v2"], two_versions["day3"], two_versions["cl"]
    _as_legacy(cl, s.model.name, v2)
    with pytest.raises(IntegrityError, match="DAYBREAK_TRUST_UNSEALED_MODELS"):
        registry.verify_model(day3, s.model.name, v2)
    monkeypatch.setenv("DAYBREAK_TRUST_UNSEALED_MODELS", "1")
    registry.verify_model(day3, s.model.name, v2)
    cl.delete_model_version_tag(s.model.name, v2, registry.ARTIFACTS_TAG)  # no record at all
    with pytest.raises(IntegrityError, match="neither"):
        registry.verify_model(day3, s.model.name, v2)


def test_a_legacy_version_cannot_load_code_through_mlmodel_data(two_versions: dict,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The legacy record covers model_code.py and artifacts/ only: MLmodel's ``data`` pointed at a
    folder of the attacker's own (its model_code.py carrying the payload) ran it (found in review)."""
    s, v2, day3, cl, marker = (two_versions[k] for k in ("spec", "v2", "day3", "cl", "marker"))
    name = s.model.name
    _as_legacy(cl, name, v2)
    monkeypatch.setenv("DAYBREAK_TRUST_UNSEALED_MODELS", "1")
    folder = model_dir(name, v2)
    evil = folder / "evil"
    import shutil

    shutil.copytree(folder / "artifacts", evil / "artifacts")
    shutil.copy(folder / "MLmodel", evil / "MLmodel")
    (evil / "model_code.py").write_text((folder / "model_code.py").read_text()
                                        + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    conf = yaml.safe_load((folder / "MLmodel").read_text())
    conf["flavors"]["python_function"]["data"] = "evil"
    (folder / "MLmodel").write_text(yaml.safe_dump(conf))
    with pytest.raises(IntegrityError, match=REFUSAL):
        registry.load_model(day3, name, v2)
    assert not marker.exists(), "the legacy path ran code named by MLmodel's data"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
