"""A real S3 endpoint for tests: moto's standalone server on loopback (and one with IAM auth)."""
from __future__ import annotations

import os
import secrets
import sys
import urllib.request
from dataclasses import dataclass

import pytest

from .common import free_port, server_process

# The authenticating server answers the first few requests without authentication: the
# fixture spends them on creating a user, its policy and its access key. From then on every
# request must be signed with that key, so wrong credentials fail as on a real S3. moto's
# signature check rejects keys with some characters ('%', "'", '+', non-ASCII) even when
# signed right, so only the credentials tests use that server; the others use one that
# accepts any key, as moto does by default.
_SETUP_ACTIONS = 3
_ALLOW_ALL = ('{"Version": "2012-10-17", "Statement": '
              '[{"Effect": "Allow", "Action": "*", "Resource": "*"}]}')


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    key: str
    secret: str

    @property
    def options(self) -> dict:
        """Back-end options for castlib (what a user puts in the config file)."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    @property
    def env(self) -> dict:
        """The same as environment variables, as botocore reads them."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.key, aws_secret_access_key=self.secret)


@dataclass(frozen=True)
class S3Bucket:
    server: S3Server
    bucket: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}"

    @property
    def options(self) -> dict:
        return self.server.options


def _run_moto(tmp_path_factory, auth: bool):
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    for var in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "INITIAL_NO_AUTH_ACTION_COUNT"):
        env.pop(var, None)
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(_SETUP_ACTIONS)
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    def answers() -> bool:   # moto's own dashboard: no AWS action, uses up no free request
        urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
        return True

    with server_process("moto_server", argv, tmp_path_factory.mktemp("moto") / "moto.log",
                        answers, env=env):
        if auth:
            iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                               aws_access_key_id="setup", aws_secret_access_key="setup")
            iam.create_user(UserName="castlib")
            iam.put_user_policy(UserName="castlib", PolicyName="all", PolicyDocument=_ALLOW_ALL)
            key = iam.create_access_key(UserName="castlib")["AccessKey"]
            yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        else:
            yield S3Server(endpoint, "castlib-test-key", secrets.token_urlsafe(16))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto_server in a subprocess on 127.0.0.1, a free port, for the whole session."""
    yield from _run_moto(tmp_path_factory, auth=False)


@pytest.fixture(scope="session")
def s3_auth_server(tmp_path_factory):
    """A second moto_server that checks credentials (only its one access key is valid)."""
    yield from _run_moto(tmp_path_factory, auth=True)


@pytest.fixture
def s3_bucket(s3_server) -> S3Bucket:
    """A fresh, empty bucket for one test."""
    name = f"castlib-{secrets.token_hex(6)}"
    s3_server.client().create_bucket(Bucket=name)
    return S3Bucket(s3_server, name)


@pytest.fixture
def s3_auth_bucket(s3_auth_server) -> S3Bucket:
    """A fresh bucket on the server that checks credentials."""
    name = f"castlib-{secrets.token_hex(6)}"
    s3_auth_server.client().create_bucket(Bucket=name)
    return S3Bucket(s3_auth_server, name)
