"""prefect-aws blocks for the store: AwsCredentials and S3Bucket blocks named by ``storage_secret``.

Real services: moto's S3 server on loopback with its IAM authentication turned on for this module
(so a wrong secret key is refused, as S3 refuses it; moto checks no signature otherwise), and
Prefect's ephemeral API in a subprocess, as a user runs a flow with no server. The S3 keys are
moto's random ones; they live only in the blocks (the flow's process has no ``AWS_*`` variable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import BIN, SPEC
from test_prefect import QUIET_PREFECT
from test_prefect_server import _files_containing

from daybreak.gate import SKIPPED

pytest.importorskip("prefect_aws")

BUCKET = "prefect-aws-store"


@pytest.fixture(scope="module")
def s3_keys(s3_server) -> dict[str, str]:
    """An IAM user allowed s3:* on the shared moto server, and moto's authentication on (every
    request must carry a valid signature) until the module ends."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                       aws_access_key_id="testing-key", aws_secret_access_key="testing-secret")
    iam.create_user(UserName="daybreak-prefect")
    iam.put_user_policy(UserName="daybreak-prefect", PolicyName="s3", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="daybreak-prefect")["AccessKey"]
    httpx.post(f"{s3_server.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        yield {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}
    finally:
        httpx.post(f"{s3_server.endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()


def _client(s3_server, keys: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                        aws_access_key_id=keys["access_key"], aws_secret_access_key=keys["secret_key"])


SCRIPT = """
import json
from prefect import flow, get_client
from prefect.blocks.system import Secret
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect_aws import AwsCredentials, S3Bucket
from prefect_aws.client_parameters import AwsClientParameters
from daybreak.prefect import stage_data
from daybreak.prefect.deploy import deployments
from daybreak.prefect.flows import daily_retrain
from daybreak.prefect.storage import resolve

params = AwsClientParameters(endpoint_url={endpoint!r})
good = AwsCredentials(aws_access_key_id={access_key!r}, aws_secret_access_key={secret_key!r},
                      region_name="us-east-1", aws_client_parameters=params)
good.save("daybreak-aws", overwrite=True)
S3Bucket(bucket_name={bucket!r}, bucket_folder="store", credentials=good).save("daybreak-bucket", overwrite=True)
AwsCredentials(aws_access_key_id={access_key!r}, aws_secret_access_key={wrong!r}, region_name="us-east-1",
               aws_client_parameters=params).save("daybreak-aws-wrong", overwrite=True)
Secret(value="{{}}").save("daybreak-aws", overwrite=True)  # a Secret of the same name as an AwsCredentials

@flow
def stage_one(day: str, block: str, store: str | None = None):
    return stage_data({spec!r}, day, store=store, storage_secret=block)

def task_runs(state):
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return [{{"name": tr.name, "state": tr.state.name, "run_count": tr.run_count}} for tr in runs]

def error(fn):
    try:
        fn()
    except Exception as e:
        return type(e).__name__ + ": " + str(e)

out = {{}}
# AwsCredentials with the store given: the type of the block decides (the Secret of that name is why
# the type is given here)
out["aws"] = stage_one("2013-01-03", "aws-credentials/daybreak-aws", store="s3://{bucket}/store")
out["ambiguous"] = error(lambda: resolve("daybreak-aws"))
# S3Bucket: the block is the store; the daily flow for the first day, then a rerun of its staging
day = daily_retrain(date="2013-01-01", spec={spec!r}, deploy=False, storage_secret="daybreak-bucket")
out["daily"] = {{k: day.get(k) for k in ("stage", "features", "gate", "summary")}}
rerun = stage_one("2013-01-01", "daybreak-bucket", return_state=True)
out["rerun"] = {{"task_runs": task_runs(rerun), "result": rerun.result()}}
out["other_store"] = error(lambda: resolve("daybreak-bucket", "s3://another-bucket/store"))
out["missing"] = error(lambda: resolve("no-such-block"))
# a wrong secret key: refused by S3, the error names the block, the task is not retried
bad = stage_one("2013-01-04", "daybreak-aws-wrong", store="s3://{bucket}/store", return_state=True)
out["wrong"] = {{"flow": bad.type.value, "task_runs": task_runs(bad),
                "error": error(lambda: bad.result())}}
deps = deployments({spec!r}, "0 3 * * *", settings={{"storage_secret": "daybreak-bucket"}})
out["deployments"] = {{d.flow_name: d.parameters for d in deps}}
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.mark.slow
def test_aws_credentials_and_s3_bucket_blocks_reach_the_store(s3_server, s3_keys: dict[str, str], landing: Path,
                                                               tmp_path: Path) -> None:
    import secrets

    client = _client(s3_server, s3_keys)
    client.create_bucket(Bucket=BUCKET)
    for p in sorted(landing.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), BUCKET, f"store/landing/{p.relative_to(landing).as_posix()}")
    wrong = secrets.token_urlsafe(30)
    home, prefect_home, results = tmp_path / "home", tmp_path / "prefect", tmp_path / "results"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_", "DAYBREAK_"))}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_LOCAL_STORAGE_PATH=str(results), DAYBREAK_HOME=str(home),
               PREFECT_LOGGING_LEVEL="INFO", PYTHONWARNINGS="ignore", **QUIET_PREFECT)
    code = SCRIPT.format(endpoint=s3_server.endpoint, bucket=BUCKET, spec=str(SPEC), wrong=wrong, **s3_keys)
    proc = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, output[-5000:]
    out = json.loads(line[len("RESULT "):])

    # AwsCredentials: staged into the bucket the store names
    assert out["aws"]["rows"] == 914 and out["aws"]["sources"]["flights"]["uri"].startswith(f"s3://{BUCKET}/store/")
    assert "aws-credentials/daybreak-aws" in out["ambiguous"] and "ValueError" in out["ambiguous"], out["ambiguous"]
    # S3Bucket: the daily flow staged and built features in the bucket's folder, and gated (day one:
    # nothing to compare with); the rerun of its staging read the manifests back: served from the cache
    daily = out["daily"]
    assert daily["stage"]["sources"]["flights"]["uri"].startswith(f"s3://{BUCKET}/store/"), daily["stage"]
    assert daily["gate"]["decision"] == SKIPPED, daily["gate"]
    assert [t["state"] for t in out["rerun"]["task_runs"]] == ["Cached"], out["rerun"]
    assert out["rerun"]["result"]["sources"]["flights"]["uri"] == daily["stage"]["sources"]["flights"]["uri"]
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="store/")["Contents"]
    zones = {obj["Key"].split("/")[1] for obj in listed}
    assert {"landing", "staged", "features"} <= zones, zones
    assert "another-bucket" in out["other_store"] and "daybreak-bucket" in out["other_store"], out["other_store"]
    assert "no Prefect block named 'no-such-block'" in out["missing"], out["missing"]

    # the wrong key: refused, named, not retried
    wrong_run = out["wrong"]
    assert wrong_run["flow"] == "FAILED", wrong_run
    assert "StorageCredentialsError" in wrong_run["error"] and "AwsCredentials block 'daybreak-aws-wrong'" in \
        wrong_run["error"] and ("ACCESS_DENIED" in wrong_run["error"] or "SIGNATURE" in wrong_run["error"].upper()), \
        wrong_run["error"]  # a HEAD's 403 has no body to say why
    assert [(t["state"], t["run_count"]) for t in wrong_run["task_runs"]] == [("Failed", 1)], wrong_run

    # the deployments pass the block's name, and no store (the block is the store)
    params = out["deployments"]
    assert params["daily_retrain"]["storage_secret"] == "daybreak-bucket", params
    assert params["backfill"]["storage_secret"] == "daybreak-bucket"
    assert "store" not in params["daily_retrain"]

    # no secret anywhere: the run's output (its logs at INFO), Prefect's database (flow and task run
    # parameters, states, logs, artifacts) and result storage, the MLflow home, the bucket's objects
    # (the block documents are encrypted in the database, as Prefect stores them)
    for secret in (s3_keys["secret_key"], wrong):
        assert secret not in output
        for root in (prefect_home, results, home):
            assert not _files_containing(root, secret.encode()), (root, secret[:4])
    assert _files_containing(prefect_home, b"daybreak-aws-wrong"), "positive control: the error is in the DB"
    for obj in listed:
        body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
        assert s3_keys["secret_key"].encode() not in body, obj["Key"]


def test_the_blocks_map_onto_the_store_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each field of AwsCredentials, MinIOCredentials and S3Bucket lands where the store reads it."""
    from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    from daybreak.prefect.storage import _bucket_store, _from_credentials

    params = AwsClientParameters(endpoint_url="http://127.0.0.1:9000")
    opts = _from_credentials(AwsCredentials(aws_access_key_id="AK", aws_secret_access_key="SK",
                                            aws_session_token="TOK", region_name="eu-west-3",
                                            aws_client_parameters=params), "AwsCredentials block 'x'")
    assert (opts.endpoint_url, opts.region, opts.access_key, opts.secret_key, opts.session_token) == \
        ("http://127.0.0.1:9000", "eu-west-3", "AK", "SK", "TOK")
    assert "SK" not in repr(opts) and "TOK" not in repr(opts)
    minio = _from_credentials(MinIOCredentials(minio_root_user="minio", minio_root_password="pw",
                                               region_name="us-east-1", aws_client_parameters=params), "m")
    assert (minio.access_key, minio.secret_key, minio.endpoint_url) == ("minio", "pw", "http://127.0.0.1:9000")
    # no keys and no profile: the machine's default chain (environment, instance role) signs
    bare = _from_credentials(AwsCredentials(region_name="us-east-2"), "b")
    assert bare.access_key is None and bare.secret_key is None and bare.region == "us-east-2"
    # a profile of the machine's AWS config
    (tmp_path / "credentials").write_text("[ci]\naws_access_key_id = PK\naws_secret_access_key = PS\n")
    (tmp_path / "config").write_text("[profile ci]\nregion = ap-south-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    prof = _from_credentials(AwsCredentials(profile_name="ci"), "p")
    assert (prof.access_key, prof.secret_key, prof.region) == ("PK", "PS", "ap-south-1")
    with pytest.raises(ValueError, match="AwsCredentials block 'q': AWS profile 'nope'"):
        _from_credentials(AwsCredentials(profile_name="nope"), "AwsCredentials block 'q'")
    with pytest.raises(ValueError, match="both the access key id and the secret"):
        _from_credentials(AwsCredentials(aws_access_key_id="AK"), "k")
    creds = AwsCredentials()
    assert _bucket_store(S3Bucket(bucket_name="b1", bucket_folder="/a/b/", credentials=creds)) == "s3://b1/a/b"
    assert _bucket_store(S3Bucket(bucket_name="b1", credentials=creds)) == "s3://b1"


def test_without_prefect_aws_the_flows_import_and_its_blocks_name_the_package() -> None:
    """prefect-aws is optional: nothing imports it until one of its blocks is named."""
    code = """
import sys
sys.modules["prefect_aws"] = None  # as if not installed: importing it raises ImportError
import daybreak.prefect.deploy, daybreak.prefect.flows, daybreak.prefect.tasks
from daybreak.prefect.storage import resolve
assert resolve(None, "s3://b/p").options is None
try:
    resolve("s3-bucket/prod-store")
except ImportError as e:
    print("ERROR", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR Prefect block 'prod-store' is a prefect-aws S3Bucket block, and prefect-aws is not installed" \
        in proc.stdout, proc.stdout


def test_s3_refusals_are_named_and_not_retried() -> None:
    from daybreak.infra.errors import is_retryable
    from daybreak.prefect.storage import AWS_CREDENTIALS, Storage, StorageCredentialsError, explain

    storage = Storage(store="s3://b/p", block="prod", kind=AWS_CREDENTIALS)
    refused = OSError("When reading 'b/p/x': AWS Error INVALID_ACCESS_KEY_ID during GetObject operation: ...")
    named = explain(refused, storage)
    assert isinstance(named, StorageCredentialsError) and not is_retryable(named)
    assert str(named).startswith("S3 refused the credentials of Prefect AwsCredentials block 'prod': When reading")
    other = ConnectionError("connection reset")
    assert explain(other, storage) is other  # anything else as it was (and retried as before)
    assert explain(refused, Storage(store="s3://b/p")) is refused  # no block: nothing to name
    # another bucket's refusal (MLflow's artifact store, say) is not the block's
    theirs = OSError("When reading 'x' in bucket 'mlflow-artifacts': AWS Error ACCESS_DENIED during GetObject")
    assert explain(theirs, storage) is theirs
    assert isinstance(explain(OSError(str(theirs).replace("mlflow-artifacts", "b")), storage), StorageCredentialsError)
    # boto3's HEAD: a bare 403, no code in the body
    from botocore.exceptions import ClientError

    head = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
                       "HeadObject")
    assert isinstance(explain(head, storage), StorageCredentialsError)
    missing = ClientError({"Error": {"Code": "404", "Message": "Not Found"},
                           "ResponseMetadata": {"HTTPStatusCode": 404}}, "HeadObject")
    assert explain(missing, storage) is missing
