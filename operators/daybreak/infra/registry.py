"""MLflow: tracking set-up, the model registry, and lineage/decision tags on model versions.

The registry is the source of truth between steps: the train step tags each version with the
logical date and spec hash it was built for, the gate writes its decision onto the version, and
promotion reads both back. Steps therefore agree even when their XComs are lost.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from daybreak.infra.cluster import check_artifact_location, remote_target
from daybreak.infra.context import RunContext
from daybreak.infra.errors import redact
from daybreak.infra.lock import INTERNAL_TAG
from daybreak.infra.lock import Held as Held  # re-exported: callers take the lock through the registry
from daybreak.infra.lock import model_lock as model_lock
from daybreak.infra.records import Tag

log = logging.getLogger(__name__)

TAG = "daybreak."
DATE_TAG = Tag.LOGICAL_DATE
SPEC_TAG = Tag.SPEC_HASH
LINEAGE_TAG = Tag.LINEAGE_KEY
DECISION_TAG = Tag.GATE_DECISION
AGAINST_TAG = Tag.GATE_CHAMPION_VERSION
ARTIFACTS_TAG = Tag.ARTIFACTS_SHA256


def use_uri(uri: str) -> None:
    """Point MLflow's fluent API at `uri` for this process.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI (and the registry one) to the
    environment, which would make every later RunContext in this process inherit the first
    run's registry. The user's environment is restored right away.
    """
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    if redact(uri) != uri:  # MLflow prints "View run ... at: <uri>" when a run ends
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def setup_tracking(ctx: RunContext, experiment: str) -> str:
    """Point MLflow at the context's tracking URI and make sure the experiment exists.

    A fresh SQLite store is created under a file lock: several processes migrating the same
    new database at once corrupt it.
    """
    import mlflow

    use_uri(ctx.tracking_uri)
    lock = None
    if ctx.tracking_uri.startswith("sqlite:///"):
        db = Path(ctx.tracking_uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = db.with_name(db.name + ".lock")
    with _file_lock(lock) if lock else _null():
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, artifact_location=_artifact_location(ctx, experiment))
        else:
            exp_id = exp.experiment_id
    if remote_target(ctx.ray_address, ctx.distributed) is not None:  # models loaded on other nodes
        check_artifact_location(ctx, (exp or client.get_experiment(exp_id)).artifact_location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def _null() -> Iterator[None]:
    yield


def _artifact_location(ctx: RunContext, experiment: str) -> str | None:
    if ctx.artifact_root is None:
        return None
    return f"{ctx.artifact_root.rstrip('/')}/{experiment}"


def client(ctx: RunContext) -> Any:
    return client_at(ctx.tracking_uri)


def client_at(uri: str) -> Any:
    """An MlflowClient for one tracking server, which is also its model registry."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(cl: Any, name: str, alias: str) -> Any | None:
    """The model version behind an alias, or None if the model or alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return cl.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def credential_env(token: str | None = None, username: str | None = None, password: str | None = None,
                   insecure_tls: Any = False) -> dict[str, str]:
    """The environment variables the MLflow client reads its credentials from: a bearer token, or
    basic auth with a username; ``insecure_tls`` true skips TLS verification."""
    env: dict[str, str] = {}
    if password and username:
        env["MLFLOW_TRACKING_USERNAME"] = str(username)
        env["MLFLOW_TRACKING_PASSWORD"] = str(password)
    elif token or password:
        env["MLFLOW_TRACKING_TOKEN"] = str(token or password)
    if str(insecure_tls).lower() in ("1", "true", "yes"):
        env["MLFLOW_TRACKING_INSECURE_TLS"] = "true"
    return env


def registered_models(cl: Any, filter_string: str | None = None) -> list[Any]:
    """The registered models (matching `filter_string`), without daybreak's locks and reap markers
    (tagged INTERNAL_TAG: MLflow's search cannot leave them out itself)."""
    found = cl.search_registered_models(filter_string, max_results=1000)
    out = list(found)
    while found.token:
        found = cl.search_registered_models(filter_string, max_results=1000, page_token=found.token)
        out += found
    return [m for m in out if INTERNAL_TAG not in (m.tags or {})]


def versions(cl: Any, name: str, filter_tags: dict[str, str] | None = None) -> list[Any]:
    """Model versions of `name` (newest first), optionally those with all the given tag values."""
    from mlflow.exceptions import MlflowException

    parts = [f"name = '{name}'"]
    for k, v in (filter_tags or {}).items():
        parts.append(f"tags.`{k}` = '{v}'")
    try:
        found = cl.search_model_versions(" and ".join(parts), max_results=10_000)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    return sorted(found, key=lambda mv: int(mv.version), reverse=True)


def candidate_for(cl: Any, name: str, day: str, spec_hash: str) -> Any | None:
    """The newest version trained for `day` under this spec."""
    found = versions(cl, name, {DATE_TAG: day, SPEC_TAG: spec_hash})
    return found[0] if found else None


def set_tags(cl: Any, name: str, version: str, tags: dict[str, Any]) -> None:
    for k, v in tags.items():
        cl.set_model_version_tag(name, version, k, v if isinstance(v, str) else json.dumps(v, default=str))


def model_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


# What training records in the registry, which the artifact store cannot change, and what loading
# checks against it before anything in the folder is parsed, imported or deserialized.
MODEL_DIGEST_TAG = Tag.MODEL_SHA256  # every file of the stored model folder
TRUSTED_TYPES_TAG = Tag.SKOPS_TRUSTED_TYPES  # what skops may build from a scikit-learn model
FLAVOR_TAG = Tag.FLAVOR
# Written by the MLflow client after a ``models:/`` download (name and version), never by the store.
CLIENT_WRITTEN = frozenset({"registered_model_meta"})
# The escape hatch for versions registered before MODEL_DIGEST_TAG existed: set by an operator out
# of band, never by a spec.
TRUST_UNSEALED_ENV = "DAYBREAK_TRUST_UNSEALED_MODELS"
# The artifacts ``train`` logs: MLmodel must point at exactly these.
MODEL_ARTIFACTS = {"meta": {"artifacts/meta.json"},
                   "model": {"artifacts/model.ubj", "artifacts/model.skops", "artifacts/models"}}


def model_files(root: str | Path) -> dict[str, Path]:
    """Every file of a stored model folder by its path in the folder, except CLIENT_WRITTEN at the
    top. A link or anything but a regular file is refused: its target could change after the check."""
    from daybreak.infra.errors import IntegrityError

    root = Path(root)
    files: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise IntegrityError(f"model folder holds {rel!r}, which is not a regular file or folder")
        if p.is_file() and rel not in CLIENT_WRITTEN:
            files[rel] = p
    return files


def folder_digest(root: str | Path) -> str:
    """One sha256 over (path, content hash) of every file of a model folder (``model_files``)."""
    return artifacts_digest(model_files(root))


def artifacts_digest(files: Mapping[str, str | Path]) -> str:
    """One sha256 over (name, content hash) of `files`."""
    import hashlib

    from daybreak.infra.store import sha256_file

    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{sha256_file(str(files[name]))}\n".encode())
    return h.hexdigest()


def loaded_files(root: str | Path) -> dict[str, Path]:
    """The files the first record (ARTIFACTS_TAG) covered: model_code.py and artifacts/**."""
    root = Path(root)
    files = {"model_code.py": root / "model_code.py"}
    files |= {p.relative_to(root).as_posix(): p for p in sorted((root / "artifacts").rglob("*")) if p.is_file()}
    return files


def stored_digest(uri: str, scratch: str | Path) -> str:
    """``folder_digest`` of a logged model's folder as the store holds it."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        return folder_digest(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))


def _refuse(name: str, version: str, why: str) -> Exception:
    from daybreak.infra.errors import IntegrityError

    return IntegrityError(f"model {name} version {version}: its code or artifacts differ from what training "
                          f"recorded: {why}; refusing to load")


# What the MLmodel of a model ``train`` logged may say under python_function: nothing that makes
# MLflow load other code or data (``data``, ``code``, ``predict_fn``, another loader).
PYFUNC_KEYS = frozenset({"loader_module", "model_code_path", "artifacts", "config", "env", "python_version",
                         "streamable", "cloudpickle_version", "code"})
# The top-level files and folders of a model folder ``train`` logs (checked where no digest is).
MODEL_LAYOUT = frozenset({"MLmodel", "model_code.py", "artifacts", "conda.yaml", "python_env.yaml",
                          "requirements.txt", "input_example.json", "serving_input_example.json"})


def _check_entry(local: str | Path, name: str, version: str) -> None:
    """MLmodel loads model_code.py through MLflow's code-model loader, with no other code or data
    path and exactly the artifacts training logged. Under a digest this only names what is wrong;
    for a version trusted without one (legacy) it is what keeps other code from loading."""
    from daybreak.infra.errors import IntegrityError
    from daybreak.infra.yamlio import load_yaml

    mlmodel = load_yaml((Path(local) / "MLmodel").read_bytes(), origin=f"model {name} version {version} MLmodel",
                        error=IntegrityError)
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    if not isinstance(flavors, dict) or "python_function" not in flavors or set(flavors) - {"python_function",
                                                                                            *NATIVE_FLAVORS}:
        raise _refuse(name, version, f"its MLmodel has flavors {sorted(flavors or {})}, not python_function "
                                     f"(and one native flavor of {sorted(NATIVE_FLAVORS)} at most)")
    pf = flavors["python_function"] if isinstance(flavors["python_function"], dict) else {}
    code = pf.get("model_code_path")
    if (pf.get("loader_module") != "mlflow.pyfunc.loaders.code_model" or not isinstance(code, str)
            or Path(code).name != "model_code.py" or pf.get("code") or set(pf) - PYFUNC_KEYS):
        raise _refuse(name, version, f"its MLmodel loads code or data other than model_code.py (loader "
                                     f"{pf.get('loader_module')!r}, model_code_path {code!r}, code {pf.get('code')!r}, "
                                     f"other keys {sorted(set(pf) - PYFUNC_KEYS)})")
    artifacts = pf.get("artifacts") or {}
    paths = {k: (v or {}).get("path") if isinstance(v, dict) else v for k, v in artifacts.items()}
    if set(paths) != set(MODEL_ARTIFACTS) or any(paths[k] not in MODEL_ARTIFACTS[k] for k in paths):
        raise _refuse(name, version, f"its MLmodel points at artifacts {paths}, not the ones training logged")
    native = sorted(set(flavors) & set(NATIVE_FLAVORS))
    if len(native) > 1:
        raise _refuse(name, version, f"its MLmodel has two native flavors {native}")
    for flavor in native:
        _check_native(flavors[flavor], flavor, paths["model"], name, version)


# The native flavor training adds to the MLmodel beside python_function (``mlflow.xgboost.load_model``
# and ``mlflow.sklearn.load_model`` open the version): its keys, and the one that names the model
# file, which must be the pyfunc's own model file (so the digest covers it, and the two cannot
# differ). No ``code`` (MLflow would put it on sys.path), no pickle, no class other than the booster.
NATIVE_FLAVORS = {"xgboost": ("data", frozenset({"xgb_version", "data", "model_class", "model_format", "code"})),
                  "sklearn": ("pickled_model", frozenset({"pickled_model", "sklearn_version", "serialization_format",
                                                          "code", "skops_trusted_types"}))}


def _check_native(conf: Any, flavor: str, model_path: Any, name: str, version: str) -> None:
    file_key, keys = NATIVE_FLAVORS[flavor]
    conf = conf if isinstance(conf, dict) else {}
    wrong = sorted(set(conf) - keys)
    if flavor == "xgboost" and (conf.get("model_class") != "xgboost.core.Booster" or conf.get("model_format") != "ubj"):
        wrong.append("model_class/model_format")
    if flavor == "sklearn" and conf.get("serialization_format") != "skops":
        wrong.append("serialization_format")
    suffix = {"xgboost": ".ubj", "sklearn": ".skops"}[flavor]
    if conf.get(file_key) != model_path or not str(model_path).endswith(suffix) or conf.get("code"):
        wrong.append(f"{file_key}/code")
    if wrong:
        raise _refuse(name, version, f"its MLmodel's {flavor} flavor is not the one training logged "
                                     f"({', '.join(wrong)}: {conf})")


def _verified(ctx: RunContext | str, name: str, version: str, dst: str) -> tuple[str, dict[str, Any] | None]:
    """Download the version into `dst` and check every file is the bytes training recorded in the
    registry, before anything in it is parsed. Returns the path and the loader's configuration
    from the registry (flavor, skops' trusted types), None for a version without that record.
    `ctx` is a run context or the tracking URI (of the server that is also the registry)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tags = client_at(ctx if isinstance(ctx, str) else ctx.tracking_uri).get_model_version(name, version).tags
    expected = tags.get(MODEL_DIGEST_TAG)
    if expected is None and os.environ.get(TRUST_UNSEALED_ENV, "").lower() not in ("1", "true", "yes"):
        from daybreak.infra.errors import IntegrityError

        raise IntegrityError(f"model {name} version {version}: the registry holds no digest of its files "
                             f"({MODEL_DIGEST_TAG}: registered before daybreak recorded one, or not by daybreak "
                             f"train); refusing to load. Retrain it, or set {TRUST_UNSEALED_ENV}=1 where it "
                             "is loaded to accept such versions on a weaker check")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri(name, version), dst_path=dst)
    except MlflowException as e:
        if "outside the artifact directory" in str(e):  # a link planted in the store
            raise _refuse(name, version, "the artifact store holds a link out of the model's folder") from None
        raise
    if expected is not None:
        found = folder_digest(local)
        if found != expected:
            raise _refuse(name, version, f"{MODEL_DIGEST_TAG}={expected[:12]}..., found {found[:12]}...")
    else:  # trusted unsealed: the first record (code and artifacts) must be there and match
        legacy = tags.get(ARTIFACTS_TAG)
        if legacy is None:
            raise _refuse(name, version, f"the registry holds neither {MODEL_DIGEST_TAG} nor {ARTIFACTS_TAG}")
        if artifacts_digest(loaded_files(local)) != legacy:
            raise _refuse(name, version, f"{ARTIFACTS_TAG} does not match")
        extra = sorted({p.name for p in Path(local).iterdir()} - MODEL_LAYOUT - CLIENT_WRITTEN)
        if extra:
            raise _refuse(name, version, f"its folder holds {extra}, which training never writes")
    _check_entry(local, name, version)
    if FLAVOR_TAG not in tags:
        return local, None
    config: dict[str, Any] = {"flavor": tags[FLAVOR_TAG]}
    if TRUSTED_TYPES_TAG in tags:
        config["trusted_types"] = json.loads(tags[TRUSTED_TYPES_TAG])
    elif tags[FLAVOR_TAG] != "xgboost":
        config["trusted_types"] = None  # meta.json's list: only reachable for a version trusted unsealed
    return local, config


def verify_model(ctx: RunContext, name: str, version: str) -> None:
    """Raise IntegrityError if the version's stored files changed since training (the promote
    step asks before the champion moves: a version every server would refuse never becomes it)."""
    import tempfile

    use_uri(ctx.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="daybreak-verify-") as tmp:
        _verified(ctx, name, version, tmp)


def verified_folder(ctx: RunContext | str, name: str, version: str, dst: str) -> tuple[str, dict[str, Any] | None]:
    """The version downloaded into `dst` after every file passed the registry's digest (refused
    with IntegrityError otherwise), and the loader's configuration from the registry (flavor,
    skops' trusted types). `ctx` is a run context or the tracking URI. For loaders other than the
    pyfunc (``daybreak.train.native``): read only what the configuration says to trust."""
    use_uri(ctx if isinstance(ctx, str) else ctx.tracking_uri)
    return _verified(ctx, name, version, dst)


def load_model(ctx: RunContext, name: str, version: str) -> Any:
    """The version's pyfunc model, after ``_verified`` checked its files; the loader takes the
    flavor and the types skops may build from the registry, not from the files."""
    import tempfile

    import mlflow

    use_uri(ctx.tracking_uri)
    # The model reads its files while loading (load_context), so the download can go after.
    with tempfile.TemporaryDirectory(prefix="daybreak-model-") as tmp:
        local, config = _verified(ctx, name, version, tmp)
        return mlflow.pyfunc.load_model(local, model_config=config)


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    from daybreak import __version__

    sha = os.environ.get("DAYBREAK_CODE_VERSION")
    if sha:
        return sha
    try:
        import subprocess

        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__
