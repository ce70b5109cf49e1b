"""The comparison's bookkeeping (``cmt_core.comparison``): arms, network-evaluation counts, the spread rule.

The comparison itself runs end to end in ``tests/test_flows.py`` (the ``cmt-compare`` flow)."""

import json
import os

import pytest
from pydantic import ValidationError

from cmt_core.comparison import (
    CompareConfig,
    Target,
    arm_config,
    beats_beyond_spread,
    cumulative_seconds,
    parse_target,
    posttrain_nfe_per_step,
    training_nfe,
)
from cmt_core.savings import _arm_result, _pct, cadence, cap_steps, plot, readme_table, saving
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


# ------------------------------------------------------------------------------------- target-quality mode


def test_targets_are_read_relative_to_the_teacher_or_absolute():
    assert parse_target("2step<=1.1x") == Target(2, 1.1, True) and Target(2, 1.1, True).value(8.0) == pytest.approx(8.8)
    assert parse_target("1step <= 13.5") == Target(1, 13.5, False) and Target(1, 13.5, False).value(8.0) == 13.5
    assert Target(2, 1.1, True).key("fd_digits") == "fd_digits_2step"
    assert CompareConfig(targets=("2step <= 1.10x",)).targets == ("2step<=1.1x",)
    for bad in ("3step<=1.1x", "2step<1.1x", "2step<=0x", "2step<=-1", "fid<=3"):
        with pytest.raises(ValidationError, match=r"(?s)targets.*'<1\|2>step<=<positive number>\[x\]'"):
            CompareConfig(targets=(bad,))
    with pytest.raises(ValidationError, match="distinct"):
        CompareConfig(targets=("2step<=1.1x", "2step <= 1.1x"))


def test_the_vanilla_ect_arm_is_ect_at_its_published_settings_and_one_run_for_every_method():
    cc = CompareConfig(preset="digits", inits=("cmt", "teacher", "ect"))
    ect, meanflow_ect = arm_config(cc, "ect", "ect", 1), arm_config(cc, "meanflow", "ect", 1)
    assert ect == meanflow_ect and ect.preset == "digits"
    p = ect.posttrain
    assert (p.method, p.init, p.train.lr_schedule) == ("ect", "teacher", "constant")
    assert (p.ect.t_sampling, p.ect.p_mean, p.ect.p_std, p.ect.k, p.ect.b, p.ect.q, p.ect.huber_c) == \
        ("lognormal", -1.1, 2.0, 8.0, 1.0, 2.0, 0.0)
    assert (p.ect.start_stage, p.ect.anchor_sigma, p.ect.weighting) == (0, 0.0, "inverse_dt")
    assert training_nfe(ect, "posttrain") == 2  # data alone: no teacher call
    with pytest.raises(ValueError, match="'ect' \\(vanilla ECT\\) post-trains a consistency model"):
        arm_config(CompareConfig(preset="digits-meanflow"), "meanflow", "ect", 0)


def test_a_run_to_the_end_keeps_its_artifact_ids():
    """``until_below`` enters a training stage's id only when set: runs from before it keep theirs."""
    cfg = arm_config(CompareConfig(preset="toy"), "ect", "cmt", 0)
    bounded = cfg.model_copy(update={"posttrain": cfg.posttrain.model_copy(update={
        "train": cfg.posttrain.train.model_copy(update={"until_below": {"score_2step": 0.2}})})})
    ids, bounded_ids = plan(cfg).ids, plan(bounded).ids
    assert "until_below" not in json.dumps(plan(cfg).config("posttrain"))
    assert ids["midtrain"] == bounded_ids["midtrain"] and ids["posttrain"] != bounded_ids["posttrain"]
    assert plan(bounded).config("posttrain")["posttrain"]["train"]["until_below"] == {"score_2step": 0.2}


def test_training_time_leaves_the_evaluations_out_and_adds_up_over_resumed_calls():
    """``seconds`` is taken before a row's own evaluation, ``eval_seconds`` after it."""
    rows = [{"step": 0, "eval_seconds": 1.0}, {"step": 10, "seconds": 5.0, "eval_seconds": 1.0},
            {"step": 20, "seconds": 9.0, "eval_seconds": 3.0}, {"step": 30, "seconds": 13.0, "eval_seconds": 3.0},
            {"step": 40, "seconds": 3.0, "eval_seconds": 2.0, "resumed_from": 30},
            {"step": 50, "seconds": 6.0, "eval_seconds": 2.0, "resumed_from": 30},
            {"step": 60, "seconds": 2.0, "resumed_from": 50}]
    assert cumulative_seconds(rows) == [0.0, 4.0, 8.0, 10.0, 13.0, 14.0, 16.0]
    # a log from before the step-0 row recorded its evaluation time
    assert cumulative_seconds([{"step": 0}, {"step": 10, "seconds": 5.0, "eval_seconds": 1.0}]) == [0.0, 4.0]


def cost(mimg, nfe, wall):
    return {"mimg": {"rollouts": 0.0, "midtrain": mimg}, "nfe": {"rollouts": 1000, "midtrain": nfe},
            "wall_s": {"rollouts": 1.0, "midtrain": wall}}


def test_seeds_run_apart_only_in_the_target_mode_and_among_the_comparisons():
    assert CompareConfig(seeds=3, run_seeds=(2, 0), targets=("2step<=1.1x",)).computed_seeds() == [0, 2]
    assert CompareConfig(seeds=2).computed_seeds() == [0, 1]
    with pytest.raises(ValidationError, match="run_seeds: only the target-quality mode"):
        CompareConfig(seeds=3, run_seeds=(1,))
    for bad in ((1, 1), (3,), (-1,)):
        with pytest.raises(ValidationError, match=r"run_seeds: distinct seeds among 0 \.\. 2"):
            CompareConfig(seeds=3, run_seeds=bad, targets=("2step<=1.1x",))


def test_the_cap_is_at_least_the_factor_times_the_cmt_path_in_every_unit():
    arm = arm_config(CompareConfig(preset="toy"), "ect", "teacher", 0)  # ECD: 4 evaluations a sample, batch 256
    path = cost(0.2, 40_000, 3.0)  # the CMT path's cost, by stage, in the same seed
    # data: 10 x 0.2 Mimg / 256 a step = 7813; evaluations: 10 x 41,000 / 1,024 = 401; wall: 10 x 4 s / (256 x 5e-6)
    assert cap_steps(arm, path, 10.0, seconds_per_sample=5e-6) == 31_250
    assert cap_steps(arm, path, 10.0, seconds_per_sample=1e-3) == 7_813  # wall: 157 steps; data: 7,813
    assert cap_steps(arm, cost(0.0, 400_000, 0.0), 10.0, seconds_per_sample=1e-2) == 3_917  # 4,010,000 / 1,024
    assert cadence(7_813, eval_every=100, log_every=50) == (200, 7_800 + 200)


def test_the_saving_is_a_lower_bound_where_the_other_arm_never_met_the_target():
    def cost(mimg):
        return {"mimg": {"posttrain": mimg}, "nfe": {"posttrain": 10 * mimg}, "wall_s": {"posttrain": mimg}}

    def seed(reached, mimg, before=None):  # before: the cost at the evaluation before the reading
        return {"reached": reached, "cost": cost(mimg), "cost_before": cost(mimg / 2 if before is None else before)}

    cmt = {"seeds": [seed(True, 1.0), seed(True, 1.0)]}
    exact = saving(cmt, {"seeds": [seed(True, 4.0), seed(True, 2.0)]})
    assert {k: exact["mimg"][k] for k in ("mean", "std", "bound")} == {
        "mean": pytest.approx(0.625), "std": pytest.approx(0.1767767), "bound": "exact"}
    # each path met the target between its reading and the evaluation before: CMT in (0.5, 1], the other in
    # (2, 4] and (1, 2]; the saving lies between 1 - 1/2 and 1 - 0.5/4 (seed 0), 1 - 1/1 and 1 - 0.5/2 (seed 1)
    assert exact["mimg"]["reading_range"] == {"low": pytest.approx(0.25), "high": pytest.approx(0.8125)}
    assert saving(cmt, {"seeds": [seed(True, 4.0, before=0.0), seed(True, 2.0)]})["nfe"]["reading_range"] is None
    lower = saving(cmt, {"seeds": [seed(True, 4.0), seed(False, 10.0)]})["nfe"]
    assert lower["bound"] == "at_least" and lower["reading_range"] is None
    # one seed exact, one a lower bound: the mean is a lower bound, each seed is shown and the spread is not
    mixed = saving(cmt, {"seeds": [seed(True, 4.0), seed(False, 20.0)]})["mimg"]
    assert [r["bound"] for r in mixed["per_seed"]] == ["exact", "at_least"]
    assert _pct(mixed) == "≥ 85% (per seed: 75%, ≥ 95%)" and _pct(exact["mimg"]) == "62% ± 18"
    assert saving({"seeds": [seed(True, 1.0), seed(False, 3.0)]}, {"seeds": [seed(True, 4.0)] * 2}) is None


def test_a_path_s_stages_add_up_to_its_total_where_seeds_met_the_target_in_different_stages():
    target = Target(steps=1, bound=1.0, relative=False)

    def point(stage, metric, **wall):  # wall seconds by stage; data and evaluations follow them
        scales = (("mimg", 0.01), ("nfe", 100), ("wall_s", 1))
        cost = {u: {s: scale * v for s, v in wall.items()} for u, scale in scales}
        return {"stage": stage, "iter": 0, "metric_1step": metric, "metric_2step": metric, "cost": cost}

    in_mid = [point("midtrain", 2.0, rollouts=5, midtrain=50), point("midtrain", 0.5, rollouts=5, midtrain=100)]
    in_post = [point("midtrain", 2.0, rollouts=7, midtrain=100),
               point("posttrain", 0.5, rollouts=7, midtrain=100, posttrain=40)]
    cost = _arm_result([in_mid, in_post], target, [1.0, 1.0])["cost"]
    assert cost["wall_s"] == {"rollouts": 6.0, "midtrain": 100.0, "posttrain": 20.0, "total": 126.0}
    assert cost["nfe"]["posttrain"] == 2_000.0


def test_the_plot_shades_a_relative_target_s_range_where_the_seeds_teachers_differ(tmp_path, monkeypatch):
    from cmt_core.evaluation.report import plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read it
    curve = [{"wall_s": w, "metric_1step": 3.0 / w, "metric_2step": 2.0 / w} for w in (1.0, 2.0, 4.0)]
    targets = {"1step<=1.5x": {"value": {"mean": 1.0, "per_seed": [1.0, 1.0]}},
               "2step<=1.1x": {"value": {"mean": 0.6, "per_seed": [0.5, 0.7]}}}
    summary = {"preset": "toy", "metric_name": "sw",
               "methods": {"ect": {"arms": {"cmt": {"curves": [curve, curve]}}, "targets": targets}}}
    assert plot(summary, tmp_path).is_file()
    one_step, two_step = figures[0].axes
    assert [p.get_label() for p in one_step.patches] == []  # one target for every seed: the line alone
    (band,) = two_step.patches
    assert band.get_label() == "its range over the seeds"
    assert (band.get_bbox().y0, band.get_bbox().y1) == pytest.approx((0.5, 0.7))  # the lowest seed's to the highest's


@pytest.mark.slow
def test_target_mode_on_toy_counts_every_cost_and_reports_an_unmet_target_as_not_reached(tmp_path, capsys):
    """``cmt compare --target``, tiny: a reachable relative target and an unreachable absolute one."""
    from cmt_core.cli import main

    small = ["rollout.num_trajectories=512", "midtrain.train.steps=100", "midtrain.train.eval_every=50",
             "eval.num_samples=500", "eval.mid_sigma_search=[0.5,1.0]"]
    args = ["compare", "--preset", "toy", "--methods", "ect", "--inits", "cmt", "teacher", "ect", "--seeds", "1",
            "--posttrain-steps", "40", "--eval-every", "20", "--cap-factor", "1.5", "--target", "2step<=1.8x",
            "--target", "1step<=0.0001", "--artifact-root", str(tmp_path / "art"), "--out", str(tmp_path / "out")]
    for override in small:
        args += ["--set", override]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "savings_toy.json").read_text())
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"savings_toy.json", "savings_toy.md", "savings_toy.png",
                                                               "savings_toy_seeds"}
    entry, teacher = summary["methods"]["ect"], summary["teacher"]["score"]["mean"]
    assert summary["targets"] == ["2step<=1.8x", "1step<=0.0001"] and set(entry["arms"]) == {"cmt", "diffusion",
                                                                                              "vanilla_ect"}
    reachable, unreachable = entry["targets"]["2step<=1.8x"], entry["targets"]["1step<=0.0001"]
    assert reachable["value"]["mean"] == pytest.approx(1.8 * teacher)
    for name, arm in entry["arms"].items():
        if name != "cmt":  # the cap rule: at least 1.5x the CMT path's data and network evaluations
            assert arm["cap_multiple"]["mimg"] >= 1.5 and arm["cap_multiple"]["nfe"] >= 1.5, name
            assert arm["posttrain_seconds_per_step"][0] == pytest.approx(
                arm["final_cost"]["wall_s"]["posttrain"] / arm["stopped_at"][0])
        # never met: reported as not reached, at the arm's cap, with its best value
        result = unreachable["arms"][name]
        assert not result["reached"] and result["reached_seeds"] == 0 and "cost" not in result
        assert result["not_reached_at"]["iter"] == arm["posttrain_cap"][0] == arm["stopped_at"][0]
        assert result["best"]["mean"] > 0.0001
    assert unreachable["saving"] == {"diffusion": None, "vanilla_ect": None}  # CMT missed it too
    # counting: ECD's teacher step is counted (Heun: 2 calls, plus student and target), vanilla ECT has none;
    # the CMT path adds the rollouts' teacher calls (16-step DPM-Solver++(2M): 16 a trajectory) and mid-training
    for name, per_sample in (("diffusion", 4), ("vanilla_ect", 2)):
        final = unreachable["arms"][name]["not_reached_at"]
        steps = unreachable["arms"][name]["not_reached_at"]["iter"]
        assert final["nfe"] == {"posttrain": steps * 256 * per_sample, "total": steps * 256 * per_sample}
        assert final["mimg"]["posttrain"] == pytest.approx(steps * 256 / 1e6) and final["wall_s"]["posttrain"] > 0
    cmt_final = unreachable["arms"]["cmt"]["not_reached_at"]
    assert cmt_final["nfe"]["rollouts"] == 512 * 16 and cmt_final["nfe"]["midtrain"] == 100 * 256 * 1
    assert cmt_final["mimg"]["rollouts"] == 0 and cmt_final["mimg"]["midtrain"] == pytest.approx(100 * 256 / 1e6)
    cmt = reachable["arms"]["cmt"]  # met in mid-training: its cost by stage, and its saving against the others
    assert cmt["reached"] and set(cmt["cost"]) == {"mimg", "nfe", "wall_s"} and "rollouts" in cmt["cost"]["wall_s"]
    for name, value in reachable["saving"].items():
        other = reachable["arms"][name]
        assert value["mimg"]["bound"] == ("exact" if other["reached"] else "at_least")
        cost = other.get("cost") or other["not_reached_at"]
        assert value["nfe"]["mean"] == pytest.approx(1 - cmt["cost"]["nfe"]["total"] / cost["nfe"]["total"])
        span = value["nfe"]["reading_range"]  # the evaluations' spacing brackets the saving it reads
        assert span is None or span["low"] <= value["nfe"]["mean"] <= span["high"]
    assert "not reached at" in (tmp_path / "out" / "savings_toy.md").read_text()
    table = readme_table(summary).splitlines()  # the README's table: a row per method and target
    assert len(table) == 4 and table[0].count("|") == table[2].count("|") == 7  # 3 arms
    missed = table[3].split(" | ")
    assert missed[1].startswith("1step<=0.0001") and all(c.startswith("≥ ") for c in missed[2:5])
    assert "0/1 seeds reached" in missed[3] and missed[-1].strip(" |") == "- / - / -; - / - / -"
    # a rerun (after an interruption, or to add a seed) finds the same caps, hence the same artifacts: it trains
    # nothing and reads the same results
    manifests = sorted((tmp_path / "art").rglob("manifest.json"))
    assert main(args) == 0
    again = json.loads((tmp_path / "out" / "savings_toy.json").read_text())
    assert sorted((tmp_path / "art").rglob("manifest.json")) == manifests
    assert {**again, "seconds": None} == {**summary, "seconds": None}
    # seeds apart: a run that computes seed 0 of 2 merges the record of seed 1 made elsewhere (here seed 0's own
    # record relabelled, from another machine: the merged means equal seed 0's, over two seeds)
    records = tmp_path / "out" / "savings_toy_seeds"
    record = json.loads((records / "seed_0.json").read_text())
    assert record["seed"] == 0 and record["machine"]["cores"] == os.cpu_count() and record["machine"]["device"] == "cpu"
    (records / "seed_1.json").write_text(json.dumps({**record, "seed": 1, "machine": {**record["machine"],
                                                                                      "cpu": "elsewhere"}}))
    two = [*args[:args.index("--seeds")], "--seeds", "2", "--run-seeds", "0", *args[args.index("--seeds") + 2:]]
    assert main(two) == 0
    merged = json.loads((tmp_path / "out" / "savings_toy.json").read_text())
    assert sorted((tmp_path / "art").rglob("manifest.json")) == manifests  # seed 1 was not trained here
    assert merged["seeds"] == [0, 1] and [m["cpu"] for m in merged["machines"]][1] == "elsewhere"
    assert merged["teacher"]["score"]["per_seed"] == 2 * summary["teacher"]["score"]["per_seed"]
    for tname, t in merged["methods"]["ect"]["targets"].items():
        for name, arm in t["arms"].items():
            alone = summary["methods"]["ect"]["targets"][tname]["arms"][name]
            assert arm["seeds"] == 2 * alone["seeds"] and arm["cost_all_seeds"] == alone["cost_all_seeds"]
    assert "seed 1: elsewhere" in (tmp_path / "out" / "savings_toy.md").read_text()
    # a record made with other settings is refused before anything runs, naming the field
    (records / "seed_1.json").write_text(json.dumps({**record, "seed": 1, "settings": {**record["settings"],
                                                                                       "cap_factor": 3.0}}))
    assert main(two) == 2
    assert "cap_factor: " in capsys.readouterr().err
    for bad in ("{not json", json.dumps(record)):  # not a record; seed 0's record under seed 1's name
        (records / "seed_1.json").write_text(bad)
        assert main(two) == 2
        assert "seed_1.json: not " in capsys.readouterr().err
    # the seeds to run are among the comparison's, and only the target mode runs them apart
    assert main([*two[:two.index("--run-seeds")], "--run-seeds", "2", *two[two.index("--run-seeds") + 2:]]) == 2
    assert "run_seeds: distinct seeds among 0 .. 1" in capsys.readouterr().err
