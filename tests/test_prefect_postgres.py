"""The Prefect server on PostgreSQL, as a team shares it: Debian's PostgreSQL started on loopback in a temporary data
directory, ``prefect server start`` on it, the pipeline deployed from prefect.yaml, and two flow runs at once of the
``toy`` pipeline executed by one process worker; both complete and the server logs no database errors."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from tests.servers import free_port
from tests.test_prefect_server import POOL, ROOT, TINY, start_server, stop_server

pytestmark = pytest.mark.slow


def _binary(name: str) -> str | None:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    return found


def _as_postgres(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: run its commands as the ``postgres`` account when we are root."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 in a temporary data directory, with a database ``prefect``; stopped and
    removed at the end, also on failure. (The folder is outside pytest's, which the postgres account cannot enter.)"""
    if _binary("initdb") is None:
        pytest.fail("PostgreSQL is not installed (apt-get install -y postgresql); .ci/run installs it")
    folder = Path(tempfile.mkdtemp(prefix="cmt-postgres-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()
    done = _as_postgres([_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    assert done.returncode == 0, done.stderr
    options = f"-p {port} -c listen_addresses=127.0.0.1 -k {folder} -c max_connections=200"
    done = _as_postgres([_binary("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w",
                         "start"])
    assert done.returncode == 0, done.stderr + (folder / "server.log").read_text()
    try:
        done = _as_postgres([_binary("psql") or "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
                             "CREATE DATABASE prefect"])
        assert done.returncode == 0, done.stderr
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", folder / "server.log"
    finally:
        _as_postgres([_binary("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


def test_two_toy_runs_at_once_on_a_postgres_backed_server(postgres, tmp_path):
    url, pg_log = postgres
    home = tmp_path / "prefect-home"
    home.mkdir()
    server = start_server(home, database_url=url)
    worker = None
    try:
        server.cli("work-pool", "create", POOL, "--type", "process")
        server.cli("--no-prompt", "deploy", "--name", "cmt-pipeline/digits", cwd=ROOT)
        roots = [tmp_path / f"artifacts-{k}" for k in range(2)]
        with server.client_settings():
            runs = [run_deployment("cmt-pipeline/digits", timeout=0, parameters={
                "preset": "toy", "overrides": TINY, "artifact_root": str(root)}) for root in roots]
        worker_log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "2"],
                                  env=server.env, cwd=tmp_path, stdout=worker_log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + 600
        with server.client_settings(), get_client(sync_client=True) as client:
            while True:
                states = [client.read_flow_run(run.id).state for run in runs]
                if all(state.is_final() for state in states) or time.monotonic() > deadline:
                    break
                time.sleep(2)
        worker_output = (tmp_path / "worker.log").read_text()
        assert [state.name for state in states] == ["Completed", "Completed"], worker_output[-5000:]
        for root in roots:
            assert len(list((root / "evaluation").glob("*/manifest.json"))) == 1
        server_log = (home / "server.log").read_text() + pg_log.read_text()
        for problem in ("database is locked", "deadlock detected", "OperationalError", "IntegrityError"):
            assert problem not in server_log + worker_output, problem
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        stop_server(server.process)
