"""TensorBoard event files of the training stages: the scalars match metrics.jsonl, image runs draw sample grids at
their evaluations, a resumed run shows each step once, and training runs without tensorboard."""

import json
import logging
import math
import shutil
import sys
import time

import pytest
import torch

from cmt_core.artifacts import EVENTS_DIR, MANIFEST
from cmt_core.checkpoint import read_training_log
from cmt_core.config import NetworkConfig, TrainConfig
from cmt_core.data.sources import SyntheticSource
from cmt_core.data.synthetic import GaussianMixture
from cmt_core.events import EventLog, tag
from cmt_core.models import build_model
from cmt_core.objectives.edm import EDMLoss
from cmt_core.pipeline import run_pipeline
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.training import NonFiniteLossError, train

CPU = Runtime(torch.device("cpu"))
# a teacher pre-trained 20 steps, then post-training from random weights evaluated at steps 0, 10, 20 (no rollouts)
SHORT = ["teacher.train.steps=20", "teacher.train.log_every=10", "posttrain.init=random",
         "posttrain.train.steps=20", "posttrain.train.eval_every=10", "posttrain.train.log_every=10"]


def read_events(folder):
    """Every event file in ``folder``, read as TensorBoard reads them (nothing sampled away)."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events, name: str) -> dict[int, float]:
    """The values of the scalar ``name`` by step; a step shown twice fails."""
    points = events.Scalars(name)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{name}: steps {steps} shown more than once"
    return {p.step: p.value for p in points}


def assert_events_match_log(events, rows: list[dict]) -> None:
    """Every number of every ``metrics.jsonl`` row is a scalar at the row's step (float32 in the event file)."""
    keys = {k for row in rows for k in row} - {"step"}
    assert set(events.Tags()["scalars"]) == {tag(k) for k in keys}
    for key in keys:
        expected = {row["step"]: row[key] for row in rows if key in row}
        assert scalars(events, tag(key)) == pytest.approx(expected, rel=1e-6), key


def test_a_toy_run_logs_its_training_rows_and_evaluations(tmp_path):
    cfg = get_preset("toy", [*SHORT, "eval.num_samples=256", "eval.batch_size=256"], artifact_root=tmp_path)
    results = run_pipeline(cfg, CPU, targets=("posttrain",))
    for stage in ("teacher", "posttrain"):
        folder = results[stage].path / EVENTS_DIR
        assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
        assert_events_match_log(read_events(folder), read_training_log(results[stage].path))
    events = read_events(results["posttrain"].path / EVENTS_DIR)
    evaluated = {"eval/score_1step", "eval/score_2step", "eval/mid_sigma", "eval/flow_map_error_1step",
                 "eval/flow_map_error_2step", "time/eval_seconds"}
    assert evaluated <= set(events.Tags()["scalars"])
    assert sorted(scalars(events, "eval/score_2step")) == [0, 10, 20]
    assert sorted(scalars(events, "train/loss")) == [10, 20]
    assert events.Tags()["images"] == []  # 2-D points: no sample grids
    # a view of the run, not a result: the manifest does not record the event files, and without them the artifact
    # is still complete and reused
    assert not [f for f in json.loads((results["posttrain"].path / MANIFEST).read_text())["files"]
                if f.startswith(EVENTS_DIR)]
    shutil.rmtree(results["posttrain"].path / EVENTS_DIR)
    assert run_pipeline(cfg, CPU, targets=("posttrain",))["posttrain"].cached


def test_an_image_run_draws_its_one_and_two_step_samples_at_each_evaluation(tmp_path):
    cfg = get_preset("digits", [*SHORT, "posttrain.ect.anchor_sigma=0", "eval.num_samples=64", "eval.batch_size=64"],
                     artifact_root=tmp_path)
    results = run_pipeline(cfg, CPU, targets=("posttrain",))
    events = read_events(results["posttrain"].path / EVENTS_DIR)
    assert sorted(events.Tags()["images"]) == ["samples/1step", "samples/2step"]
    for name in ("samples/1step", "samples/2step"):
        grids = events.Images(name)
        assert [g.step for g in grids] == [0, 10, 20]
        assert {(g.width, g.height) for g in grids} == {(8 * 54, 8 * 54)}  # 64 8x8 digits, 6x upscaled, framed
    assert {"eval/FD-digits_1step", "eval/FD-digits_2step"} <= set(events.Tags()["scalars"])
    assert read_events(results["teacher"].path / EVENTS_DIR).Tags()["images"] == []  # no evaluations


def small_model():
    torch.manual_seed(0)
    return build_model("denoiser", NetworkConfig(width=16, depth=1, emb_dim=16).model_dump(), (2,))


def constant_scores(ema) -> dict:
    return {"score_1step": 1.0, "score_2step": 2.0}


def test_a_resumed_run_shows_each_step_once(tmp_path):
    cfg = TrainConfig(steps=20, batch_size=8, log_every=5, checkpoint_every=10, eval_every=5)
    run_dir, folder = tmp_path / "train", tmp_path / EVENTS_DIR

    def exploding(net, batch, rng):
        return EDMLoss()(net, batch, rng) * (math.inf if rng.step == 17 else 1.0)

    with pytest.raises(NonFiniteLossError):  # rows 5, 10, 15 written; the checkpoint is at 10
        train(small_model(), exploding, SyntheticSource(GaussianMixture()), cfg, run_dir, CPU,
              evaluate=constant_scores, events=EventLog(folder))
    assert sorted(scalars(read_events(folder), "train/loss")) == [5, 10, 15]  # closed (flushed) on the failure
    time.sleep(1)  # event files are read in name order, and their names start with the second they were created
    train(small_model(), EDMLoss(), SyntheticSource(GaussianMixture()), cfg, run_dir, CPU, evaluate=constant_scores,
          events=EventLog(folder))
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2
    rows = read_training_log(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 5, 10, 15, 20]
    assert_events_match_log(read_events(folder), rows)  # step 15 of the failed run is dropped, not shown twice


def test_a_run_that_failed_before_its_first_checkpoint_logs_step_0_once(tmp_path):
    cfg = TrainConfig(steps=10, batch_size=8, log_every=5, checkpoint_every=10, eval_every=5)

    def exploding(net, batch, rng):
        return EDMLoss()(net, batch, rng) * (math.inf if rng.step == 7 else 1.0)

    with pytest.raises(NonFiniteLossError):  # rows 0 and 5 written, no checkpoint
        train(small_model(), exploding, SyntheticSource(GaussianMixture()), cfg, tmp_path, CPU,
              evaluate=constant_scores)
    train(small_model(), EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path, CPU, evaluate=constant_scores)
    assert [r["step"] for r in read_training_log(tmp_path / "metrics.jsonl")] == [0, 5, 10]


def test_training_runs_without_tensorboard_and_writes_no_event_files(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    cfg = TrainConfig(steps=10, batch_size=8, log_every=5, eval_every=5)
    with caplog.at_level(logging.INFO, logger="cmt"):
        result = train(small_model(), EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path / "train", CPU,
                       evaluate=constant_scores, events=EventLog(tmp_path / EVENTS_DIR))
    assert [r["step"] for r in result.history] == [0, 5, 10]
    assert not (tmp_path / EVENTS_DIR).exists()
    said = [r for r in caplog.records if "tensorboard is not installed" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO


def test_only_the_main_process_writes_events(tmp_path):
    cfg = TrainConfig(steps=5, batch_size=8, log_every=5)
    train(small_model(), EDMLoss(), SyntheticSource(GaussianMixture()), cfg, tmp_path / "train", CPU,
          events=EventLog(tmp_path / EVENTS_DIR, enabled=False))
    assert not (tmp_path / EVENTS_DIR).exists()
