"""``cmt-pipeline`` deployed from prefect.yaml on a real Prefect server and run by a process worker.

One server (``prefect server start`` on a free loopback port, a temporary PREFECT_HOME and sqlite database)
and one completed toy run serve this module and ``test_prefect_ui.py`` (which imports these fixtures).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
import yaml  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId  # noqa: E402
from prefect.deployments import run_deployment  # noqa: E402
from prefect.exceptions import PrefectHTTPStatusError  # noqa: E402
from prefect.flows import load_flow_from_entrypoint  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from cmt_core.comparison import CompareConfig  # noqa: E402
from tests.servers import free_port  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
POOL, DEPLOYMENT = "cmt-process", "cmt-pipeline/digits"
TINY = ["cpu_threads=1", "teacher.train.steps=30", "rollout.num_trajectories=256", "midtrain.train.steps=30",
        "midtrain.train.eval_every=15", "posttrain.train.steps=30", "posttrain.train.eval_every=15",
        "eval.num_samples=500"]
_shared: dict = {}  # one server and one run per session, whichever module asks first


@dataclass
class PrefectServer:
    url: str
    home: Path
    process: subprocess.Popen

    @property
    def api(self) -> str:
        return f"{self.url}/api"

    @property
    def env(self) -> dict:
        """Environment of CLI processes talking to this server."""
        return {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}

    def cli(self, *args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "prefect", *args], env=kwargs.pop("env", self.env),
                              capture_output=True, text=True, timeout=timeout, **kwargs)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done

    def client_settings(self):
        """In-process clients talk to this server (even inside another test's prefect_test_harness)."""
        return temporary_settings(updates={PREFECT_API_URL: self.api})


def _basic(auth: str | None) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}


def start_server(home: Path, timeout: float = 120, auth: str | None = None,
                 database_url: str | None = None) -> PrefectServer:
    """``prefect server start`` on a free loopback port, on a sqlite file in ``home`` or on ``database_url``;
    ``auth`` ('user:secret') turns on API authentication."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=database_url or f"sqlite+aiosqlite:///{home / 'prefect.db'}",
               PREFECT_UI_API_URL=f"{url}/api")  # the UI's API address when not on port 4200
    if auth:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
    log = (home / "server.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{(home / 'server.log').read_text()}")
        try:
            health = urllib.request.Request(f"{url}/api/health", headers=_basic(auth))
            with urllib.request.urlopen(health, timeout=2) as response:
                if response.status == 200:
                    return PrefectServer(url, home, process)
        except OSError:
            time.sleep(0.5)
    stop_server(process)
    raise RuntimeError(f"prefect server not healthy after {timeout}s:\n{(home / 'server.log').read_text()}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and nothing else
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    if "server" not in _shared:
        _shared["server"] = start_server(tmp_path_factory.mktemp("prefect-home"))
    yield _shared["server"]
    if "server" in _shared:
        stop_server(_shared.pop("server").process)


@pytest.fixture(scope="session")
def deployed(prefect_server):
    """The process work pool and the pipeline's deployment from prefect.yaml."""
    if "deployed" not in _shared:
        prefect_server.cli("work-pool", "create", POOL, "--type", "process")
        prefect_server.cli("--no-prompt", "deploy", "--name", DEPLOYMENT, cwd=ROOT)
        _shared["deployed"] = DEPLOYMENT
    return _shared["deployed"]


@pytest.fixture(scope="session")
def pipeline_run(prefect_server, deployed, tmp_path_factory):
    """A toy run of the deployment, created through the API and executed by a one-shot process worker."""
    if "run" not in _shared:
        artifacts = tmp_path_factory.mktemp("server-artifacts")
        with prefect_server.client_settings():
            flow_run = run_deployment(deployed, timeout=0, parameters={
                "preset": "toy", "overrides": TINY, "artifact_root": str(artifacts)})
        worker = subprocess.run([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL,
                                 "--run-once", "--limit", "1"], env=prefect_server.env, cwd=artifacts,
                                capture_output=True, text=True, timeout=300)
        with prefect_server.client_settings(), get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run.id)
        _shared["run"] = (flow_run, artifacts, worker.stdout[-5000:] + worker.stderr[-5000:])
    return _shared["run"]


def test_deployed_pipeline_run_completes_and_publishes_its_metrics(prefect_server, pipeline_run):
    flow_run, artifact_root, worker_log = pipeline_run
    assert flow_run.state.is_completed(), worker_log
    with prefect_server.client_settings(), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    by_key = {a.key: a for a in artifacts if a.key}
    assert by_key["cmt-toy-metrics"].type == "table"
    assert "flow_map_error" in str(by_key["cmt-toy-metrics"].data)
    assert by_key["cmt-toy-report"].type == "markdown"
    assert "data:image/png;base64," in by_key["cmt-toy-report"].data
    assert sorted(p.name for p in artifact_root.iterdir()) == [
        "evaluation", "midtrain", "posttrain", "prefect-results", "rollouts", "teacher"]


@pytest.mark.parametrize("parameters, field", [
    ({"preset": "imagenet"}, "preset"),
    ({"preset": "toy", "config": {"midtrain": {"train": {"steps": -5}}}}, "config.midtrain.train.steps"),
    ({"ddp_processes": 0}, "ddp_processes"),
])
def test_invalid_parameters_are_rejected_when_the_run_is_created(prefect_server, deployed, parameters, field):
    with prefect_server.client_settings(), pytest.raises(PrefectHTTPStatusError) as rejected:
        run_deployment(deployed, parameters=parameters, timeout=0)
    assert rejected.value.response.status_code == 409
    assert f"Validation failed for field '{field}'" in rejected.value.response.text


def test_the_sample_deployment_asks_for_the_model_when_a_run_is_created(prefect_server, deployed):
    prefect_server.cli("--no-prompt", "deploy", "--name", "cmt-sample/digits", cwd=ROOT)
    with prefect_server.client_settings(), pytest.raises(PrefectHTTPStatusError) as rejected:
        run_deployment("cmt-sample/digits", timeout=0)
    response = rejected.value.response
    assert response.status_code == 409 and "'model' is a required property" in response.text


def test_prefect_yaml_deploys_every_flow_with_an_inactive_nightly_schedule():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flows = {load_flow_from_entrypoint(str(ROOT / d["entrypoint"])).name: d for d in spec["deployments"]
             if d["name"] != "toy-savings"}
    assert sorted(flows) == ["cmt-compare", "cmt-encode", "cmt-evaluation", "cmt-guide", "cmt-midtrain", "cmt-pipeline",
                             "cmt-posttrain", "cmt-rollouts", "cmt-sample", "cmt-teacher", "cmt-watch"]
    assert all(d["work_pool"]["name"] == POOL for d in spec["deployments"])
    assert all(d["parameters"] == {"preset": "digits"} for name, d in flows.items()
               if name not in ("cmt-compare", "cmt-sample", "cmt-encode"))
    assert flows["cmt-encode"]["parameters"] == {"preset": "digits-latent"}  # a latent space to encode into
    assert flows["cmt-compare"]["parameters"] == {"comparison": {"preset": "toy", "seeds": 3}}
    savings = next(d for d in spec["deployments"] if d["name"] == "toy-savings")  # the target-quality mode
    assert load_flow_from_entrypoint(str(ROOT / savings["entrypoint"])).name == "cmt-compare"
    targeted = CompareConfig(**savings["parameters"]["comparison"])
    assert targeted.targets == ("2step<=1.1x", "1step<=1.5x") and "ect" in targeted.inits
    assert flows["cmt-sample"]["parameters"]["job"]["num_samples"] == 50000
    schedules = {name: d["schedules"] for name, d in flows.items() if d["schedules"]}
    assert list(schedules) == ["cmt-watch"]
    assert [s["active"] for s in schedules["cmt-watch"]] == [False]


def test_server_with_api_authentication_refuses_requests_without_the_secret(tmp_path):
    """The README's multi-machine setup: the server started with PREFECT_SERVER_API_AUTH_STRING answers only
    clients that send it (PREFECT_API_AUTH_STRING for Prefect's own clients and workers)."""
    server = start_server(tmp_path, auth="cmt:s3cret")
    try:
        def flows(headers: dict) -> int:
            request = urllib.request.Request(f"{server.api}/flows/filter", data=json.dumps({}).encode(),
                                             method="POST", headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        assert flows({}) == 401
        assert flows(_basic("cmt:wrong")) == 401
        assert flows(_basic("cmt:s3cret")) == 200
        listed = subprocess.run([sys.executable, "-m", "prefect", "flow", "ls"], capture_output=True, text=True,
                                timeout=120, env={**server.env, "PREFECT_API_AUTH_STRING": "cmt:s3cret"})
        assert listed.returncode == 0, listed.stderr
    finally:
        stop_server(server.process)
