"""Where the store is and how to reach S3, from a Prefect block named by ``storage_secret``.

One parameter, ``storage_secret``, takes the name of a block of any of these types (its type is
read from Prefect's API, so a user gives the name as the Blocks page shows it):

- **Secret** (``prefect.blocks.system.Secret``) holding JSON: ``endpoint_url``, ``region``,
  ``access_key``, ``secret_key``, ``session_token``, all optional (daybreak's original form);
- **AwsCredentials** (prefect-aws): ``aws_access_key_id``, ``aws_secret_access_key``,
  ``aws_session_token``, ``region_name``, ``aws_client_parameters.endpoint_url`` (an S3-compatible
  endpoint) and ``profile_name`` (a profile of this machine's AWS config, used when the block has
  no keys); with neither keys nor profile, the default chain of the machine (environment,
  instance role) signs the requests;
- **S3Bucket** (prefect-aws): its ``credentials`` (an AwsCredentials or MinIOCredentials block)
  as above, and the store itself: ``s3://<bucket_name>/<bucket_folder>``. A ``store`` given as
  well must name the same place.

A block's settings replace the environment's (``AWS_*``, ``DAYBREAK_S3_ENDPOINT_URL``), except
that a block without keys leaves the signing to the default chain. Of ``aws_client_parameters``
only ``endpoint_url`` is read (the store's S3 client has no switch for ``verify``, ``use_ssl``
or ``config``).

Names are unique per block type, not across types: when blocks of several of these types share
the name, give the type with it, ``aws-credentials/<name>`` (also ``s3-bucket/``, ``secret/``).

prefect-aws is optional: it is imported only when such a block is named, and its absence is
then an error naming the package. Values never leave this process's memory: only the block's
name is a task or flow parameter, and :class:`~daybreak.infra.store.StorageOptions` keeps the
keys out of its repr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from daybreak.infra.errors import DaybreakError
from daybreak.infra.store import StorageOptions

SECRET = "secret"
AWS_CREDENTIALS = "aws-credentials"
MINIO_CREDENTIALS = "minio-credentials"
S3_BUCKET = "s3-bucket"
KINDS = (SECRET, AWS_CREDENTIALS, S3_BUCKET)
_LABEL = {SECRET: "Secret", AWS_CREDENTIALS: "AwsCredentials", S3_BUCKET: "S3Bucket",
          MINIO_CREDENTIALS: "MinIOCredentials"}
_INSTALL = "pip install 'daybreak[prefect-aws]'"

# What S3 (and S3-compatible servers) answer when they refuse the keys; pyarrow spells them in
# capitals with underscores, boto3 as S3 does.
_REFUSALS = ("InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH",
             "AccessDenied", "ACCESS_DENIED", "ExpiredToken", "EXPIRED_TOKEN", "InvalidToken", "INVALID_TOKEN",
             "InvalidClientTokenId")


class StorageCredentialsError(DaybreakError, PermissionError):
    """S3 refused the credentials a Prefect block gave (not retried: the same keys are refused again)."""


@dataclass(frozen=True)
class Storage:
    """The store and S3 settings resolved from a block (or from the environment when `block` is None)."""

    store: str | None = None
    options: StorageOptions | None = None
    block: str | None = None
    kind: str | None = None

    def describe(self) -> str:
        return f"{_LABEL.get(self.kind or '', self.kind)} block {self.block!r}"


def block_kind(name: str) -> tuple[str, str]:
    """(block type slug, block name) for `name`, read from Prefect's API; `name` may carry the
    type, ``aws-credentials/prod``."""
    slug, sep, bare = name.partition("/")
    if sep:
        if slug not in KINDS:
            raise ValueError(f"storage block {name!r}: type {slug!r} is not one of {list(KINDS)}")
        return slug, bare
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        response = client.request("POST", "/block_documents/filter",
                                  json={"block_documents": {"name": {"any_": [name]}}, "include_secrets": False})
    found = sorted({doc["block_type"]["slug"] for doc in response.json() if doc.get("block_type")})
    usable = [k for k in found if k in KINDS]
    if not found:
        raise ValueError(f"no Prefect block named {name!r} (storage_secret takes the name of a Secret, "
                         "AwsCredentials or S3Bucket block)")
    if not usable:
        raise ValueError(f"Prefect block {name!r} is a {', '.join(found)} block; storage_secret takes a Secret, "
                         "AwsCredentials or S3Bucket block")
    if len(usable) > 1:
        raise ValueError(f"several Prefect blocks are named {name!r} ({', '.join(usable)}); give the type with the "
                         f"name, e.g. {usable[0] + '/' + name!r}")
    return usable[0], name


def _prefect_aws(kind: str, name: str) -> Any:
    try:
        import prefect_aws
    except ImportError:
        raise ImportError(f"Prefect block {name!r} is a prefect-aws {_LABEL[kind]} block, and prefect-aws is not "
                          f"installed: {_INSTALL}") from None
    return prefect_aws


def _secret_value(secret: Any) -> str | None:
    return None if secret is None else str(secret.get_secret_value())


def _from_credentials(creds: Any, block: str) -> StorageOptions:
    """StorageOptions from an AwsCredentials or MinIOCredentials block."""
    params = getattr(creds, "aws_client_parameters", None)
    endpoint = getattr(params, "endpoint_url", None) or None
    region = getattr(creds, "region_name", None) or None
    if hasattr(creds, "minio_root_user"):  # MinIOCredentials
        return StorageOptions(endpoint_url=endpoint, region=region, access_key=creds.minio_root_user,
                              secret_key=_secret_value(creds.minio_root_password))
    key, secret = creds.aws_access_key_id, _secret_value(creds.aws_secret_access_key)
    token = _secret_value(creds.aws_session_token) if hasattr(creds.aws_session_token, "get_secret_value") \
        else creds.aws_session_token
    if not (key and secret) and creds.profile_name:
        key, secret, token, region = _profile(creds.profile_name, region, block)
    if bool(key) != bool(secret):
        raise ValueError(f"{block}: give both the access key id and the secret access key, or neither")
    return StorageOptions(endpoint_url=endpoint, region=region, access_key=key or None, secret_key=secret or None,
                          session_token=token or None)


def _profile(profile: str, region: str | None, block: str) -> tuple[str | None, str | None, str | None, str | None]:
    """The keys (and region) of an AWS config profile, resolved now (an SSO or assume-role profile
    gives temporary keys; each task resolves them again)."""
    import boto3
    import botocore.exceptions

    try:
        session = boto3.Session(profile_name=profile)
        found = session.get_credentials()
    except botocore.exceptions.BotoCoreError as e:
        raise ValueError(f"{block}: AWS profile {profile!r}: {e}") from None
    if found is None:
        raise ValueError(f"{block}: AWS profile {profile!r} has no credentials")
    frozen = found.get_frozen_credentials()
    return frozen.access_key, frozen.secret_key, frozen.token, region or session.region_name


def _bucket_store(bucket: Any) -> str:
    folder = str(getattr(bucket, "bucket_folder", "") or "").strip("/")
    return f"s3://{bucket.bucket_name}" + (f"/{folder}" if folder else "")


def _same_store(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def resolve(block: str | None, store: str | None = None) -> Storage:
    """The store and the S3 settings for a task: from the block named `block` (any of the three
    types), else ``store`` as given and the environment's S3 settings (options None)."""
    if not block:
        return Storage(store=store)
    kind, name = block_kind(block)
    where = Storage(block=name, kind=kind).describe()
    if kind == SECRET:
        data = load_secret(name)
        if not isinstance(data, dict):
            raise ValueError(f"{where} must hold a JSON object with endpoint_url, region, access_key, secret_key "
                             "(S3 settings)")
        opts = StorageOptions(**{k: data.get(k) for k in ("endpoint_url", "region", "access_key", "secret_key",
                                                          "session_token")})
        return Storage(store=store, options=opts, block=name, kind=kind)
    aws = _prefect_aws(kind, name)
    if kind == AWS_CREDENTIALS:
        return Storage(store=store, options=_from_credentials(aws.AwsCredentials.load(name), where),
                       block=name, kind=kind)
    bucket = aws.S3Bucket.load(name)
    root = _bucket_store(bucket)
    if store and not _same_store(store, root):
        raise ValueError(f"store {store!r} is not {where}'s {root!r}: give one of them (the block's bucket and "
                         "folder are the store)")
    return Storage(store=root, options=_from_credentials(bucket.credentials, where), block=name, kind=kind)


def load_secret(name: str) -> Any:
    """A Secret block's value: JSON decoded, else the string (a bare token)."""
    import json

    from prefect.blocks.system import Secret

    # load is async_dispatch'ed: typed "block or coroutine", a sync caller gets the block
    value = cast("Secret[Any]", Secret.load(name)).get()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def refused(exc: BaseException, bucket: str | None = None) -> bool:
    """Whether `exc` (or an error under it) is S3 refusing the credentials: an S3 error code that
    says so, or boto3's bare 403 (a HEAD's answer has no body). A message naming another bucket
    than `bucket` (pyarrow's say "in bucket '...'") is someone else's refusal (MLflow's artifacts)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if bucket and "in bucket '" in text and f"in bucket '{bucket}'" not in text:
            return False
        response = getattr(e, "response", None)
        if type(e).__module__.startswith("botocore") and isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code in _REFUSALS or code == "403" or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
                return True
        if any(code in text for code in _REFUSALS):
            return True
        e = e.__cause__ or e.__context__
    return False


def explain(exc: BaseException, storage: Storage) -> BaseException:
    """`exc` as an error naming the block whose credentials S3 refused, when that is what it is."""
    store = storage.store or ""
    bucket = store[len("s3://"):].split("/")[0] if store.startswith("s3://") else None
    if storage.block is None or isinstance(exc, StorageCredentialsError) or not refused(exc, bucket):
        return exc
    first = str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__
    return StorageCredentialsError(f"S3 refused the credentials of Prefect {storage.describe()}: {first}")
