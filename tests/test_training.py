import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmt_core.checkpoint import read_training_log
from cmt_core.config import NetworkConfig, TrainConfig
from cmt_core.data.datasets import TensorDataset
from cmt_core.data.sources import DatasetSource, SyntheticSource
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.models import build_model
from cmt_core.objectives.edm import EDMLoss
from cmt_core.runtime import Runtime
from cmt_core.training import NonFiniteLossError, learning_rate, selection_score, targets_met, train

ROOT = Path(__file__).resolve().parents[1]


def small_run(run_dir: Path, steps: int, total: int, dropout: float = 0.1, precision: str = "fp32"):
    torch.manual_seed(0)
    model = build_model("denoiser", NetworkConfig(width=32, depth=2, emb_dim=16, dropout=dropout).model_dump(), (2,))
    cfg = TrainConfig(steps=total, batch_size=64, lr=1e-3, checkpoint_every=steps, log_every=5, lr_schedule="linear")
    runtime = Runtime(torch.device("cpu"), precision=precision)
    if steps < total:  # a first slice of the run, then a fresh model resumed from its checkpoint
        train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, run_dir, runtime, until=steps)
        torch.manual_seed(123)  # a resumed process starts with other RNG state
        net = NetworkConfig(width=32, depth=2, emb_dim=16, dropout=dropout).model_dump()
        model = build_model("denoiser", net, (2,))
    return train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, run_dir, runtime), model


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    straight, straight_model = small_run(tmp_path / "a", 40, 40)
    resumed, resumed_model = small_run(tmp_path / "b", 20, 40)
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]


def test_checkpoint_holds_everything_needed_to_continue(tmp_path):
    small_run(tmp_path, 10, 10)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "best"}  # the step keys every random number
    assert ckpt["step"] == 10 and (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    model = build_model("denoiser", NetworkConfig(width=16, depth=1, emb_dim=16).model_dump(), (2,))
    cfg = TrainConfig(steps=20, batch_size=8, checkpoint_every=5)

    def exploding(net, batch, rng):
        loss = EDMLoss()(net, batch, rng)
        return loss * (math.inf if rng.step == 12 else 1.0)

    with pytest.raises(NonFiniteLossError, match=r"step 12.*checkpoint.pt \(step 10\)"):
        train(model, exploding, SyntheticSource(GaussianMixture()), cfg, tmp_path, Runtime(torch.device("cpu")))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10


# (1-step, 2-step) scores at steps 0, 10, 20, 30: step 10 has the best 1-step score but a worse 2-step one than
# the start; step 30 is no worse than the start on both and has the lowest relative sum (0.9 + 0.6)
SCORES = [(5.0, 5.0), (1.0, 6.0), (4.0, 4.0), (4.5, 3.0)]


@pytest.mark.parametrize("keep,step,score", [("one_step", 10, 1.0), ("two_step", 30, 3.0), ("both", 30, 1.5)])
def test_the_kept_checkpoint_is_the_one_keep_selects(tmp_path, keep, step, score):
    model = build_model("denoiser", NetworkConfig(width=16, depth=1, emb_dim=16).model_dump(), (2,))
    cfg = TrainConfig(steps=30, batch_size=8, log_every=10, eval_every=10, keep=keep, keep_tolerance=0.0)
    scores = iter(SCORES)
    snapshots = {}

    def evaluate(ema):
        snapshots[len(snapshots) * 10] = {k: v.clone() for k, v in ema.state_dict().items()}
        one, two = next(scores)
        return {"score_1step": one, "score_2step": two}

    result = train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path, Runtime(torch.device("cpu")),
                   evaluate=evaluate)
    assert result.best_step == step and result.best_score == pytest.approx(score)
    assert result.best_metrics == {"score_1step": SCORES[step // 10][0], "score_2step": SCORES[step // 10][1]}
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, snapshots[step][k])


def test_keep_both_keeps_the_start_when_nothing_beats_it_on_both():
    start = {"score_1step": 5.0, "score_2step": 5.0}
    assert selection_score("both", start, start) == 2.0
    assert selection_score("both", {"score_1step": 1.0, "score_2step": 5.01}, start) == math.inf
    assert selection_score("both", {"score_1step": 2.5, "score_2step": 5.0}, start) == 1.5
    # within the evaluation's noise, a worse score does not block a better one
    within = selection_score("both", {"score_1step": 2.5, "score_2step": 5.2}, start, tolerance=0.05)
    assert within == pytest.approx(1.54)
    assert selection_score("both", {"score_1step": 2.5, "score_2step": 5.3}, start, tolerance=0.05) == math.inf


def test_the_selection_survives_a_resume(tmp_path):
    """The step-0 scores that ``keep="both"`` compares against are checkpointed with the run."""
    model = build_model("denoiser", NetworkConfig(width=16, depth=1, emb_dim=16).model_dump(), (2,))
    cfg = TrainConfig(steps=30, batch_size=8, log_every=10, eval_every=10, checkpoint_every=10, keep="both",
                      keep_tolerance=0.0)
    scores = iter(SCORES)

    def evaluate(ema):
        one, two = next(scores)
        return {"score_1step": one, "score_2step": two}

    runtime = Runtime(torch.device("cpu"))
    train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path, runtime, evaluate=evaluate, until=20)
    model = build_model("denoiser", NetworkConfig(width=16, depth=1, emb_dim=16).model_dump(), (2,))
    result = train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path, runtime, evaluate=evaluate)
    assert result.best_step == 30 and result.best_score == pytest.approx(1.5)


def scripted(scores):
    """An ``evaluate`` returning the next of ``scores`` ((1-step, 2-step) pairs) as the data metric ``m``."""
    scores = iter(scores)

    def evaluate(ema):
        one, two = next(scores)
        return {"score_1step": one, "score_2step": two, "m_1step": one, "m_2step": two}
    return evaluate


def test_until_below_ends_the_run_once_every_bound_has_been_met(tmp_path):
    """The 1-step bound is met at step 10 and the 2-step one at step 30 (not at the same evaluation): the run ends
    at 30 of 60, checkpointed there; run again, it trains no further."""
    cfg = TrainConfig(steps=60, batch_size=8, log_every=10, eval_every=10, checkpoint_every=20,
                      until_below={"m_1step": 1.0, "m_2step": 3.0})
    model = build_model("denoiser", NetworkConfig(width=16, depth=1, emb_dim=16).model_dump(), (2,))
    runtime = Runtime(torch.device("cpu"))
    train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path, runtime, evaluate=scripted(SCORES))
    rows = read_training_log(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 30 and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 30
    assert targets_met(rows, cfg.until_below) and not targets_met(rows[:-1], cfg.until_below)
    train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path, runtime, evaluate=scripted([]))
    assert read_training_log(tmp_path / "metrics.jsonl") == rows  # nothing trained, nothing evaluated
    resumed = TrainConfig(**{**cfg.model_dump(), "until_below": {"m_2step": 2.0}})  # a bound never met: to the end
    train(model, EDMLoss(), SyntheticSource(GaussianMixture()), resumed, tmp_path, runtime,
          evaluate=scripted([(4.0, 4.0)] * 3))
    rows = read_training_log(tmp_path / "metrics.jsonl")
    assert rows[-1]["step"] == 60 and {r.get("resumed_from") for r in rows if r["step"] > 30} == {30}


def test_until_below_names_only_scores_the_evaluation_returns(tmp_path):
    cfg = TrainConfig(steps=20, batch_size=8, log_every=10, eval_every=10, until_below={"fd_2step": 1.0})
    model = build_model("denoiser", NetworkConfig(width=16, depth=1, emb_dim=16).model_dump(), (2,))
    with pytest.raises(ValueError, match=r"until_below names 'fd_2step'.*returns m_1step, m_2step, score_1step"):
        train(model, EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path, Runtime(torch.device("cpu")),
              evaluate=scripted(SCORES))
    with pytest.raises(ValueError, match="needs eval_every"):
        TrainConfig(until_below={"score_2step": 1.0})
    with pytest.raises(ValueError, match="until_below"):
        TrainConfig(eval_every=10, until_below={"fd": 1.0})  # not an evaluation's k-step score
    for name in ("FD-digits_2step", "FID_1step", "sliced_w_2step"):  # the data metrics' own names are accepted
        assert TrainConfig(eval_every=10, until_below={name: 1.0}).until_below == {name: 1.0}


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    result, _ = small_run(tmp_path, 10, 10, precision="bf16")
    assert math.isfinite(result.history[-1]["loss"])


def test_learning_rate_schedules():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, lr_schedule="linear", final_lr_fraction=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1)
    assert learning_rate(cfg, 10) == pytest.approx(1.0)
    assert learning_rate(cfg, 100) == pytest.approx(0.1)
    # EDM2's inverse square root decay: lr / sqrt(max(step / ref, 1)) after its ramp-up
    edm2 = TrainConfig(steps=10**6, lr=0.01, warmup_steps=5120, lr_schedule="rsqrt", lr_decay_steps=35000)
    assert learning_rate(edm2, 20000) == pytest.approx(0.01)
    assert learning_rate(edm2, 140000) == pytest.approx(0.01 / 2)
    with pytest.raises(ValueError, match="lr_decay_steps"):
        TrainConfig(lr_schedule="rsqrt")


def test_dataset_source_epochs_cover_every_sample_once_across_ranks():
    source = DatasetSource(TensorDataset(torch.arange(40)), seed=3)
    seen = torch.cat([source.batch(step, 8, rank, 2)["x"] for step in range(5) for rank in range(2)])
    assert sorted(seen.tolist()) == list(range(40))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cmt", "meanflow"])
def test_ddp_two_gloo_ranks_match_one_process(tmp_path, kind):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single, double = tmp_path / "one.pt", tmp_path / "two.pt"
    worker = str(ROOT / "tests" / "ddp_worker.py")
    subprocess.run([sys.executable, worker, kind, str(single)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    worker, kind, str(double)], check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(double)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
