"""The ImageNet-64 recipe: its preset's shape, EDM2 snapshots as teacher and guide, and the tiny recipe's every
stage on a CPU (EDM dataset_tool's zip with ``dataset.json`` labels, autoguided ECD)."""

import json

import numpy as np
import pytest
import torch

from cmt_core.data import load_data
from cmt_core.models import load_model
from cmt_core.pipeline import run_pipeline, run_stage
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.stages import plan
from cmt_core.teachers import edm_teacher
from tests.test_data_labels import write_images, zip_folder
from tests.test_edm2 import CLASSES, tiny, trained_looking, write_edm2_pickle
from tests.test_edm_pickle import install_edm_module_stand_ins

CPU = Runtime(torch.device("cpu"))


def write_imagenet_zip(tmp_path, num: int = 40, classes: int = CLASSES):
    """EDM2's dataset_tool layout: ``00000/img000000NN.png`` files and ``dataset.json`` labels, zipped."""
    folder = tmp_path / "imagenet"
    names = [f"00000/img{k:08d}.png" for k in range(num)]
    write_images(folder, names)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n, k % classes] for k, n in enumerate(names)]}))
    return zip_folder(folder, tmp_path / "imagenet-8x8.zip")


def test_the_imagenet64_preset_is_edm2_s_with_an_autoguided_ecd_step():
    cfg = get_preset("imagenet64")
    assert (cfg.network.kind, cfg.network.width, cfg.network.emb_dim, cfg.data.num_classes) == ("edm2", 192, 768, 1000)
    assert (cfg.guidance.kind, cfg.guidance.scale, cfg.guidance.rollout_scale) == ("autoguidance", 1.7, 1.0)
    resolved = plan(cfg)
    # unguided rollouts, ECD's teacher step and the teacher's samples guided: the guide feeds those two only
    assert "guide" not in resolved.inputs["rollouts"] and "guide" in resolved.inputs["posttrain"]
    assert resolved.needed(["evaluation"])[:2] == ["teacher", "guide"]


def test_edm2_snapshots_load_as_the_teacher_and_the_guide(tmp_path, monkeypatch):
    mods = install_edm_module_stand_ins(monkeypatch)
    write_edm2_pickle(tmp_path / "s.pkl", trained_looking(tiny(), seed=1), mods)
    write_edm2_pickle(tmp_path / "xs.pkl", trained_looking(tiny(), seed=2), mods)
    cfg = get_preset("imagenet64-tiny", [f"data.path={write_imagenet_zip(tmp_path)}", "data.resolution=8",
                                         f"data.num_classes={CLASSES}", "network.width=32", "network.emb_dim=64",
                                         "network.attention_resolutions=[4]", "teacher.source=edm_pickle",
                                         f"teacher.path={tmp_path / 's.pkl'}", "guidance.guide.source=edm_pickle",
                                         f"guidance.guide.path={tmp_path / 'xs.pkl'}"], artifact_root=tmp_path / "art")
    shape = load_data(cfg.data).sample_shape
    x, sigma = torch.randn(3, *shape), torch.tensor([0.05, 1.0, 20.0])
    cond = {"class_labels": torch.eye(CLASSES)[[0, 2, 4]]}
    for stage, pickle in (("teacher", "s.pkl"), ("guide", "xs.pkl")):
        result = run_stage(cfg, stage, CPU)
        assert result.metrics["edm_class"] == "Precond"
        with torch.no_grad():
            expected = edm_teacher(tmp_path / pickle, shape).model(x, sigma, cond=cond)
            assert torch.equal(load_model(result.path / "model.pt")(x, sigma, cond=cond), expected)


@pytest.mark.slow
def test_tiny_imagenet64_recipe_runs_every_stage_on_cpu(tmp_path):
    cfg = get_preset("imagenet64-tiny", [f"data.path={write_imagenet_zip(tmp_path)}"], artifact_root=tmp_path / "art")
    results = run_pipeline(cfg, CPU)
    assert list(results) == ["teacher", "guide", "rollouts", "midtrain", "posttrain", "evaluation"]
    rows = results["evaluation"].metrics["rows"]
    teacher = next(r for r in rows if r["model"].startswith("teacher"))
    assert "autoguidance w=1.7" in teacher["model"] and teacher["NFE"] == 2 * 7  # 4 Heun steps to 0: 7 calls, x 2
    assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert results["rollouts"].metrics["num_trajectories"] == 16
