"""A real S3-compatible server (moto in server mode) on a free loopback port, for tests.

The ``s3_server`` fixture starts ``python -m moto.server`` in a subprocess (so that
``ivvae`` subprocesses under test reach it too), points the standard AWS environment
variables at it for the test session (``AWS_ENDPOINT_URL``, dummy keys: what a user's
environment would hold), and stops it by pid. Buckets are made with ``make_bucket``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.redis_server import LOOPBACK, _die_with_parent, free_port

START_TIMEOUT_S = 30.0


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    pid: int  # SIGSTOP it for a store that stops answering (SIGCONT after)

    def make_bucket(self, name: str) -> str:
        import fsspec

        fs = fsspec.filesystem("s3")
        fs.mkdir(name)
        return f"s3://{name}"


def _up(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/moto-api/", timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent())
    deadline = time.monotonic() + START_TIMEOUT_S
    while not _up(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"moto server did not start on {endpoint}")
        time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield S3Server(endpoint, env, proc.pid)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
