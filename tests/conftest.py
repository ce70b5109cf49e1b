import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _flow_paths_allowed(tmp_path_factory):
    """Flows confine path parameters to CMT_ALLOWED_ROOTS (flows.parameters): the tests' temporary folders and
    the checkout; servers and workers the tests start inherit it."""
    roots = [str(tmp_path_factory.getbasetemp()), os.getcwd()]
    os.environ["CMT_ALLOWED_ROOTS"] = os.pathsep.join(roots)
    yield


# Several test processes share 2 cores: one thread each avoids OpenMP spin-wait stalls (up to 7x slower), from
# the first module-scoped fixture on; a test that changes it is reset after.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
