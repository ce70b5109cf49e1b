import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from cmt_core.config import PipelineConfig, SolverConfig, TrainConfig, load_yaml, save_yaml
from cmt_core.presets import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip_through_yaml(name, tmp_path):
    cfg = get_preset(name)
    save_yaml(cfg, tmp_path / "cfg.yaml")
    assert load_yaml(tmp_path / "cfg.yaml") == cfg


@pytest.mark.parametrize("root,expected", [
    (Path("/data/runs"), Path("/data/runs")), ("rel/runs", Path("rel/runs")), ("s3://bucket/runs/", "s3://bucket/runs"),
])
def test_a_config_round_trips_through_json_with_a_folder_or_a_url_root(root, expected):
    # worker processes (the comparison's pool) parse the configs they are sent as JSON
    cfg = get_preset("toy", artifact_root=root)
    again = PipelineConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg and again.artifact_root == expected and type(again.artifact_root) is type(expected)


@pytest.mark.parametrize("make,field,words", [
    (lambda: TrainConfig(steps=-3), "steps", "greater than or equal to 0"),
    (lambda: TrainConfig(batch_size=0), "batch_size", "greater than or equal to 1"),
    (lambda: SolverConfig(sigma_min=1.0, sigma_max=0.5), "sigma_min", "must be <"),
    (lambda: PipelineConfig.model_validate({"data": {"name": "mnist"}}), "data.name", "'gaussian_mixture'"),
    (lambda: PipelineConfig.model_validate({"posttrain": {"train": {"lr": -1}}}), "posttrain.train.lr",
     "greater than 0"),
    (lambda: PipelineConfig.model_validate({"midtrain": {"epochs": 3}}), "midtrain.epochs", "Extra inputs"),
])
def test_invalid_values_name_the_field_and_the_allowed_range(make, field, words):
    with pytest.raises(ValidationError) as info:
        make()
    text = str(info.value)
    assert field in text and words in text


def test_the_command_line_names_each_bad_field_on_one_line(tmp_path, capsys):
    from cmt_core.cli import main

    code = main(["run", "--preset", "toy", "--set", f"artifact_root={tmp_path / 'art'}",
                 "--set", "midtrain.train.keep=best", "--set", "eval.mid_sigma_search=[0.5,-1]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("invalid configuration: ") and "midtrain.train.keep" in err and "(got 'best')" in err
    assert "eval.mid_sigma_search.1: Input should be greater than 0 (got -1)" in err
    assert not (tmp_path / "art").exists()  # nothing started, nothing marked complete


def test_cross_field_rules_explain_themselves():
    with pytest.raises(ValidationError, match="teacher.source='exact' needs 2-D"):
        get_preset("digits", ["teacher.source=exact"])
    with pytest.raises(ValidationError, match="data.path is required"):
        PipelineConfig.model_validate({"data": {"name": "cifar10", "path": None}})
    with pytest.raises(ValidationError, match="anchor_sigma=1.0 keeps the mid-trained model's map"):
        get_preset("digits", ["posttrain.ect.anchor_sigma=1.0", "posttrain.init=teacher"])


def test_overrides_apply_dotted_keys():
    cfg = get_preset("toy", ["midtrain.train.lr=1e-4", "rollout.solver.name=heun"])
    assert cfg.midtrain.train.lr == 1e-4 and cfg.rollout.solver.name == "heun"
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("imagenet")


def write_fake_cifar10(root, per_batch=8):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        blob = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": [0] * per_batch}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(blob))
    return folder


@pytest.mark.slow
def test_tiny_cifar10_recipe_runs_every_stage_on_cpu(tmp_path):
    from cmt_core.pipeline import run_pipeline
    from cmt_core.runtime import Runtime

    cfg = get_preset("cifar10-tiny", [f"data.path={write_fake_cifar10(tmp_path)}"], artifact_root=tmp_path / "art")
    big = get_preset("cifar10")
    assert big.network.kind == "unet" and big.rollout.solver.steps == 16 and big.midtrain.train.lr == 2e-4
    results = run_pipeline(cfg, Runtime(torch.device("cpu")))
    rows = results["evaluation"].metrics["rows"]
    assert any(r["model"].startswith("CMT") for r in rows)
    assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
