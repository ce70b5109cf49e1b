"""Helpers for the servers tests start on loopback: a free port, and a local S3-compatible server (moto in server
mode, on 127.0.0.1) for tests and benchmarks.

``with s3_server() as endpoint:`` starts moto's S3 application on a free loopback port in its own process group,
sets the environment every S3 client here reads (``AWS_ENDPOINT_URL``, test credentials, a region) for this
process and its children, yields the endpoint, and on exit, also on failure, stops the server and restores the
environment.

The application is served by waitress (``python tests/servers.py s3 PORT``), not by ``python -m moto.server``:
that runs werkzeug's development server, which sends ``Connection: close`` with every response, so each request
costs both sides a new TCP connection and the server a new thread, which no object store does; waitress keeps
HTTP/1.1 connections alive and holds whole responses in memory (no spooling of large objects to disk).
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
def s3_server(timeout: float = 60, cpus: set[int] | None = None):
    """``cpus``: pin the server to these CPUs (``os.sched_setaffinity``), e.g. to keep it off the cores a benchmark
    measures on; default: no pinning."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    pin = [",".join(map(str, sorted(cpus)))] if cpus else []
    proc = subprocess.Popen([sys.executable, __file__, "s3", str(port), *pin],
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


def serve_s3(port: int, cpus: set[int] | None = None) -> None:
    """Serve moto's S3 application on ``127.0.0.1:port`` (on ``cpus`` if given) until terminated (what
    ``s3_server`` runs)."""
    if cpus:
        os.sched_setaffinity(0, cpus)  # before any thread starts: waitress's threads inherit it
    big = 1 << 30  # objects, request and response bodies up to 1 GiB stay in memory
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(big)  # moto spools objects over 5 MB to a temporary file
    import waitress
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    waitress.serve(DomainDispatcherApplication(create_backend_app), host="127.0.0.1", port=port, threads=8,
                   inbuf_overflow=big, outbuf_overflow=big, outbuf_high_watermark=big, _quiet=True)


if __name__ == "__main__":
    usage = "usage: python tests/servers.py s3 PORT [CPU,CPU,...]"
    if sys.argv[1:2] != ["s3"] or len(sys.argv) not in (3, 4):
        sys.exit(usage)
    try:
        port, cpus = int(sys.argv[2]), {int(c) for c in sys.argv[3].split(",")} if len(sys.argv) == 4 else None
    except ValueError:
        sys.exit(f"{usage}: PORT and CPU must be integers, got {' '.join(sys.argv[2:])}")
    serve_s3(port, cpus)
