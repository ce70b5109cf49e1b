"""Helpers for the servers tests start on loopback: a free port, and a local S3-compatible server (moto in server
mode, on 127.0.0.1) for tests and benchmarks.

``with s3_server() as endpoint:`` starts ``python -m moto.server`` on a free loopback port in its own process
group, sets the environment every S3 client here reads (``AWS_ENDPOINT_URL``, test credentials, a region)
for this process and its children, yields the endpoint, and on exit, also on failure, stops the server and
restores the environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def s3_server(timeout: float = 60):
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    saved = {key: os.environ.get(key) for key in (*S3_ENV, "AWS_ENDPOINT_URL")}
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not start") from None
                time.sleep(0.2)
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()  # no client bound to an earlier server's endpoint
        yield endpoint
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def make_bucket(name: str) -> str:
    """Create the bucket ``name`` on the current server; returns ``s3://name``."""
    import fsspec

    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"
