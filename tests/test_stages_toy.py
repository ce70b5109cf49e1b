"""The toy preset end to end: mid-training beats teacher initialisation, reruns reuse every artifact."""

import pytest
import torch

from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.stages import run_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    cfg = get_preset("toy", artifact_root=root)
    return cfg, run_pipeline(cfg, Runtime(torch.device("cpu")))


def row(results, prefix):
    return next(r for r in results["evaluation"].metrics["rows"] if r["model"].startswith(prefix))


def test_cmt_one_step_error_is_five_times_below_teacher_initialisation(toy_run):
    _, results = toy_run
    baseline = row(results, "teacher-initialised")["flow_map_error"]
    cmt = row(results, "CMT (mid-trained), 1-step")["flow_map_error"]
    assert cmt * 5 <= baseline


def test_post_training_does_not_end_worse_than_its_initialisation(toy_run):
    _, results = toy_run
    cmt = row(results, "CMT (mid-trained), 1-step")["flow_map_error"]
    rows = results["evaluation"].metrics["rows"]
    post = next(r for r in rows if r["model"].endswith("from cmt, 1-step"))["flow_map_error"]
    assert post <= cmt


def test_second_run_reuses_every_stage(toy_run):
    cfg, first = toy_run
    assert not any(r.cached for r in first.values())
    again = run_pipeline(cfg, Runtime(torch.device("cpu")))
    assert all(r.cached for r in again.values())
    assert again["evaluation"].metrics == first["evaluation"].metrics


def test_more_seed_sets_recompute_only_the_evaluation_and_report_the_spread(toy_run):
    cfg, first = toy_run
    more = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"num_seed_sets": 3})})
    again = run_pipeline(more, Runtime(torch.device("cpu")))
    assert [s for s, r in again.items() if not r.cached] == ["evaluation"]
    cmt = row(again, "CMT (mid-trained), 1-step")
    assert cmt["flow_map_error_std"] > 0
    assert cmt["flow_map_error"] == pytest.approx(row(first, "CMT (mid-trained), 1-step")["flow_map_error"], rel=0.2)
