"""A real S3 endpoint for tests: moto's server mode on 127.0.0.1, started and stopped here.

``dvc-s3`` talks to it exactly as to AWS (botocore over HTTP); only the endpoint
and the throw-away credentials differ::

    with S3Server() as s3:
        s3.create_bucket("llm-release")
        # dvc remote modify --local shared url s3://llm-release/cache
        # dvc remote modify --local shared endpointurl <s3.endpoint>
        subprocess.run([...], env=s3.env())
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

# moto accepts any key pair; these only keep botocore from looking for real ones.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
START_SECONDS = 60.0  # moto imports Flask and its service registry: ~3 s here, more under load


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on a free local port, for one ``with`` block."""

    def __init__(self, log: Path | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process: subprocess.Popen | None = None
        self._out: BinaryIO | None = None

    def env(self) -> dict[str, str]:
        """The environment a DVC command needs to reach this server (no proxy for it)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AWS_") and "proxy" not in k.lower()}
        return env | CREDENTIALS

    def client(self):
        """A boto3 S3 client of this server."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=CREDENTIALS["AWS_DEFAULT_REGION"])

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def __enter__(self) -> S3Server:
        self._out = open(self.log, "wb") if self.log else None  # noqa: SIM115 (closed on exit)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._out or subprocess.DEVNULL, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto.server exited {self.process.returncode} "
                                   f"(log: {self.log})")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.__exit__(None, None, None)
        raise RuntimeError(f"moto.server did not listen on {self.endpoint} in {START_SECONDS} s")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._out is not None:
            self._out.close()
