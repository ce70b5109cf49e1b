"""The Prefect UI shows a completed pipeline run's metrics: checked in headless Chromium.

Uses the server and the completed toy run of ``test_prefect_server.py``. Chromium is driven over the
DevTools protocol (websockets, a Prefect dependency): the run page selects its tab client-side, so the
Artifacts tab is clicked rather than addressed by URL.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from websockets.sync.client import connect

try:  # the server fixtures are shared with test_prefect_server (tests/ as a package or as rootdir modules)
    from tests.test_prefect_server import deployed, pipeline_run, prefect_server  # noqa: F401
except ImportError:
    from test_prefect_server import deployed, pipeline_run, prefect_server  # noqa: F401

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian's chromium is not installed (apt-get install -y chromium)")]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1400,1000", "--remote-debugging-port=0"]


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, timeout: float = 60):
        self.profile = tempfile.mkdtemp(prefix="cmt-chromium-")
        self.process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = Path(self.profile) / "DevToolsActivePort", time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.calls = 0

    def call(self, method: str, **params) -> dict:
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.ws.recv())
            if message.get("id") == self.calls:
                return message.get("result", {})

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 45):
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {expression!r}; page text:\n{self.text()[:3000]}")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def close(self) -> None:
        if hasattr(self, "ws"):
            self.ws.close()
        self.process.terminate()
        self.process.wait(timeout=20)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser():
    page = Browser()
    yield page
    page.close()


def _has_text(text: str) -> str:
    return f"document.body && document.body.innerText.includes({json.dumps(text)})"


def test_run_page_lists_the_metrics_artifact(prefect_server, pipeline_run, browser):  # noqa: F811
    flow_run, _, _ = pipeline_run
    browser.open(f"{prefect_server.url}/runs/flow-run/{flow_run.id}")
    browser.wait_for(_has_text(flow_run.name) + " && " + _has_text("Completed"))
    browser.wait_for("(() => { const tab = document.querySelector('li.p-tab#artifacts');"
                     " if (tab) tab.click(); return !!tab })()")
    browser.wait_for(_has_text("cmt-toy-metrics"))
    assert "Evaluation metrics (toy" in browser.text()


def test_metrics_table_and_report_render_in_the_ui(prefect_server, pipeline_run, browser):  # noqa: F811
    flow_run, _, _ = pipeline_run
    with prefect_server.client_settings(), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    ids = {a.key: a.id for a in artifacts if a.key}
    browser.open(f"{prefect_server.url}/artifacts/artifact/{ids['cmt-toy-metrics']}")
    browser.wait_for(_has_text("flow_map_error") + " && " + _has_text("CMT (mid-trained), 1-step"))
    browser.open(f"{prefect_server.url}/artifacts/artifact/{ids['cmt-toy-report']}")
    images = browser.wait_for("document.querySelectorAll('img[src^=\"data:image/png;base64,\"]').length >= 6"
                              " && document.querySelectorAll('img[src^=\"data:image/png;base64,\"]').length")
    assert images >= 9  # sample grids of 6 models and 3 training curves
