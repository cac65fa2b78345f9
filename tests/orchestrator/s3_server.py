"""A real S3 endpoint for tests: moto's ThreadedMotoServer on 127.0.0.1 at a free port, with one bucket.

Clients talk HTTP to it through s3fs like to any S3-compatible store (no patching):

    from tests.orchestrator.s3_server import S3Server
    with S3Server(bucket="streamssl-test") as s3:
        generate_synthetic(s3.url("synth"), storage_options=s3.storage_options, ...)

The AWS credential variables are set to dummy values (only where unset) so that nothing reaches a real account
and botocore does not go looking for instance metadata.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any

DUMMY_KEY = "streamssl-test-key"
DUMMY_SECRET = "streamssl-test-secret-do-not-log"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """Starts on __enter__ (or start()), stops on __exit__ (or stop()); `bucket` exists once started."""

    def __init__(self, bucket: str | None = None):
        self.bucket = bucket or f"streamssl-{uuid.uuid4().hex[:12]}"
        self.port = 0
        self._server = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server."""
        return {
            "key": DUMMY_KEY,
            "secret": DUMMY_SECRET,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        for name, value in (("AWS_ACCESS_KEY_ID", DUMMY_KEY), ("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET),
                            ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(name, value)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self._wait_until_listening()
        import boto3

        # boto3 (a moto dependency) rather than s3fs.mkdir, which sends a LocationConstraint that us-east-1 refuses.
        client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                              aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_SECRET)
        client.create_bucket(Bucket=self.bucket)
        return self

    def _wait_until_listening(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not listen on 127.0.0.1:{self.port} within {timeout} s")
                time.sleep(0.05)

    def restart(self) -> "S3Server":
        """Start moto again on the same port after stop(): what a restarted MinIO looks like to a client.

        moto keeps its buckets and objects in this process, so everything written before stop() is there again.
        """
        from moto.server import ThreadedMotoServer

        if self.port == 0:
            raise RuntimeError("restart() needs a server that was started once")
        self.stop()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self._wait_until_listening()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
