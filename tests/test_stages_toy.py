"""The toy preset end to end: mid-training beats teacher initialisation, reruns reuse every artifact."""

import pytest
import torch

from cmt_core.checkpoint import read_training_log
from cmt_core.pipeline import run_pipeline
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    cfg = get_preset("toy", artifact_root=root)
    return cfg, run_pipeline(cfg, Runtime(torch.device("cpu")))


def row(results, key):
    return results["evaluation"].metrics["by_key"][key]


def test_cmt_one_step_error_is_five_times_below_teacher_initialisation(toy_run):
    _, results = toy_run
    assert row(results, "midtrain_1step")["flow_map_error"] * 5 <= row(results, "baseline")["flow_map_error"]


def test_post_training_does_not_end_worse_than_its_initialisation(toy_run):
    _, results = toy_run
    assert row(results, "posttrain_1step")["flow_map_error"] <= row(results, "midtrain_1step")["flow_map_error"]


def test_training_stages_score_two_steps_and_choose_their_own_sigma(toy_run):
    cfg, results = toy_run
    for stage in ("midtrain", "posttrain"):
        kept = results[stage].manifest["metrics"]
        assert kept["mid_sigma"] in cfg.eval.mid_sigma_search and kept["keep"] == "both"
        log = read_training_log(results[stage].path)
        evaluated = [r for r in log if "eval_score_2step" in r]
        assert evaluated[0]["step"] == 0 and evaluated[-1]["step"] == getattr(cfg, stage).train.steps
        assert all(r["eval_mid_sigma"] in cfg.eval.mid_sigma_search for r in evaluated)
        start = evaluated[0]  # keep="both": never worse than the start on either score
        assert kept["score_1step"] <= start["eval_score_1step"] and kept["score_2step"] <= start["eval_score_2step"]
        label = row(results, f"{stage}_2step")["model"]
        assert label.endswith(f"2-step (sigma {kept['mid_sigma']:.3g})")


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
    cmt = row(again, "midtrain_1step")
    assert cmt["flow_map_error_std"] > 0
    assert cmt["flow_map_error"] == pytest.approx(row(first, "midtrain_1step")["flow_map_error"], rel=0.2)
