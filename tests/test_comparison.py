"""The comparison's bookkeeping (``cmt_core.comparison``): arms, network-evaluation counts, the spread rule.

The comparison itself runs end to end in ``tests/test_flows.py`` (the ``cmt-compare`` flow)."""

import pytest
from pydantic import ValidationError

from cmt_core.comparison import CompareConfig, arm_config, beats_beyond_spread, posttrain_nfe_per_step, training_nfe
from cmt_core.stages import plan


def test_arms_differ_only_in_init_seeds_and_the_baseline_schedule():
    cc = CompareConfig(preset="digits", seeds=2)
    cmt, teacher = arm_config(cc, "ect", "cmt", 1), arm_config(cc, "ect", "teacher", 1)
    assert (cmt.posttrain.init, teacher.posttrain.init) == ("cmt", "teacher")
    assert cmt.posttrain.train.seed == cmt.midtrain.train.seed == cmt.rollout.seed == cmt.teacher.train.seed == 1
    assert (cmt.posttrain.ect.start_stage, teacher.posttrain.ect.start_stage) == (3, 0)
    assert cmt.posttrain.train == teacher.posttrain.train  # the same budget and cadence
    meanflow = arm_config(cc, "meanflow", "random", 1)
    assert meanflow.preset == "digits-meanflow" and meanflow.posttrain.method == "meanflow"
    ids = [plan(c).ids for c in (cmt, teacher, meanflow)]
    assert len({i["teacher"] for i in ids}) == len({i["rollouts"] for i in ids}) == 1  # shared by every arm


def test_a_common_cadence_also_sets_the_logging_cadence():
    cfg = arm_config(CompareConfig(preset="toy", eval_every=20, posttrain_steps=60), "ect", "random", 0)
    assert (cfg.posttrain.train.steps, cfg.posttrain.train.eval_every, cfg.posttrain.train.log_every) == (60, 20, 10)


def test_bad_comparison_settings_name_the_field():
    with pytest.raises(ValidationError, match="inits"):
        CompareConfig(inits=("cmt", "random"))
    with pytest.raises(ValidationError, match="preset"):
        CompareConfig(preset="nope")
    with pytest.raises(ValueError, match="cifar10-meanflow"):
        arm_config(CompareConfig(preset="cifar10"), "meanflow", "cmt", 0)
    with pytest.raises(ValidationError, match="posttrain.train.lr"):
        arm_config(CompareConfig(preset="toy", overrides=("posttrain.train.lr=-1",)), "ect", "cmt", 0)


def test_network_evaluations_per_training_sample():
    toy = arm_config(CompareConfig(preset="toy"), "ect", "cmt", 0)
    assert toy.posttrain.method == "ecd" and toy.posttrain.ecd_solver == "heun"
    assert training_nfe(toy, "posttrain") == 4  # student + target, and the teacher's Heun step (2 calls)
    assert training_nfe(toy, "midtrain") == 1
    assert training_nfe(arm_config(CompareConfig(preset="toy"), "meanflow", "cmt", 0), "posttrain") == 2
    # digits' CMT arm calls its frozen mid-trained model too (the CMT boundary); the baselines have none
    digits = CompareConfig(preset="digits")
    assert posttrain_nfe_per_step(digits, "ect", "cmt") == 256 * 5
    for init in ("teacher", "random"):
        assert posttrain_nfe_per_step(digits, "ect", init) == 256 * 4


def curve(means, std):
    return {"curve": [{"iter": 100 * i, "metric_1step": m, "metric_2step": m, "metric_1step_std": std,
                       "metric_2step_std": std} for i, m in enumerate(means)]}


def test_beating_beyond_the_spread_needs_separated_one_std_intervals_at_every_point():
    inits = {"cmt": curve([1.0, 1.0, 1.0], 0.1), "diffusion": curve([2.0, 1.5, 1.15], 0.1),
             "random": curve([3.0, 3.0, 3.0], 0.1)}
    result = beats_beyond_spread(inits)
    assert result["random_1step"] == {"all": True, "points": 3, "of": 3}
    assert result["diffusion_2step"] == {"all": False, "points": 2, "of": 3}  # 1.1 < 1.05 fails at the last point


def test_cmt_compare_refuses_bad_input_in_one_line_before_any_arm_runs(tmp_path, capsys):
    from cmt_core.cli import main

    out = ["--artifact-root", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main(["compare", "--preset", "toy", "--set", "posttrain.train.lr=-1", *out]) == 2
    assert main(["compare", "--preset", "toy", "--baseline-set", "posttrain.ect.q=1", *out]) == 2
    assert main(["compare", "--preset", "cifar10", "--methods", "ect", "--seeds", "1", *out]) == 2  # no data
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "invalid configuration: posttrain.train.lr: Input should be greater than 0 (got -1)"
    assert err[1].startswith("invalid configuration: posttrain.ect.q: Input should be greater than 1")
    assert err[2].startswith("invalid input: data.path='data/cifar-10-batches-py' does not exist")
    assert len(err) == 3 and not list(tmp_path.rglob("manifest.json"))
