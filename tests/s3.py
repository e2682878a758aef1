"""A real S3 API on loopback (moto's server) for the tests."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import free_port

CREDS = {"AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1"}


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> S3Server:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    def env(self) -> dict[str, str]:
        return {**CREDS, "DAYBREAK_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"])

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> None:
        c = self.client()
        for p in sorted(local.rglob("*")):
            if p.is_file():
                c.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")


def apply_env(monkeypatch, env: dict[str, str]) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    os.environ.pop("AWS_ENDPOINT_URL", None)
