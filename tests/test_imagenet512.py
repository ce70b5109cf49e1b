"""The ImageNet-512 recipe: its preset's shape (SD-VAE latents, EDM2-XXL, ELatentLPIPS, autoguided ECD) and the
tiny recipe's every stage on a CPU: images encoded by a VAE written here, data-free rollouts, ELatentLPIPS with
random latent VGG16 weights written here (the reference releases none)."""

import json

import numpy as np
import pytest
import torch

from cmt_core.pipeline import run_pipeline
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.stages import plan
from tests.test_data_labels import zip_folder
from tests.test_latent import write_tiny_vae

CPU = Runtime(torch.device("cpu"))
CLASSES = 5


def test_the_imagenet512_preset_is_the_references_latent_recipe():
    cfg = get_preset("imagenet512")
    assert (cfg.data.resolution, cfg.data.num_classes, cfg.data.encoder.kind) == (512, 1000, "sd_vae")
    assert (cfg.network.kind, cfg.network.width, cfg.network.emb_dim) == ("edm2", 448, 1792)
    assert cfg.teacher.path.name == "edm2-img512-xxl-0939524-0.070.pkl" and (cfg.teacher.p_mean, cfg.teacher.p_std) \
        == (-0.4, 1.0)
    assert (cfg.guidance.kind, cfg.guidance.scale, cfg.guidance.guide.path.name) == (
        "autoguidance", 2.05, "edm2-img512-m-0268435-0.155.pkl")
    assert (cfg.midtrain.distance, cfg.rollout.solver.name, cfg.rollout.solver.steps) == ("elatent_lpips",
                                                                                         "dpm3m_lu", 16)
    resolved = plan(cfg)
    # data-free rollouts of a loaded teacher: neither the encoder nor the data set; ECD trains on the latents
    assert set(resolved.inputs["rollouts"]) == {"teacher"} and set(resolved.inputs["teacher"]) == set()
    assert {"encoder", "encode", "guide", "midtrain"} <= set(resolved.inputs["posttrain"])
    assert resolved.needed(["evaluation"]) == ["encoder", "encode", "teacher", "guide", "rollouts", "midtrain",
                                               "posttrain", "evaluation"]


def write_imagenet64_zip(tmp_path, num: int = 24):
    """EDM's dataset_tool layout at 64x64: PNGs and ``dataset.json`` labels, zipped."""
    from PIL import Image

    folder, rng = tmp_path / "img64", np.random.default_rng(0)
    names = [f"00000/img{k:08d}.png" for k in range(num)]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / name)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n, k % CLASSES] for k, n in enumerate(names)]}))
    return zip_folder(folder, tmp_path / "img64.zip")


def write_latent_vgg(path):
    from safetensors.torch import save_file

    from cmt_core.objectives.latent_lpips import LatentVGG16

    torch.manual_seed(0)
    save_file(LatentVGG16(4, CLASSES, hidden=16).state_dict(), str(path))
    return path


@pytest.mark.slow
def test_tiny_imagenet512_recipe_runs_every_stage_on_cpu(tmp_path):
    cfg = get_preset("imagenet512-tiny", [
        f"data.path={write_imagenet64_zip(tmp_path)}", f"data.num_classes={CLASSES}",
        f"data.encoder.path={write_tiny_vae(tmp_path / 'vae')}",
        f"midtrain.lpips_backbone={write_latent_vgg(tmp_path / 'vgg.safetensors')}"], artifact_root=tmp_path / "art")
    results = run_pipeline(cfg, CPU)
    assert list(results) == ["encoder", "encode", "teacher", "guide", "rollouts", "midtrain", "posttrain",
                             "evaluation"]
    assert results["encode"].metrics["model_shape"] == [4, 32, 32]
    rows = results["evaluation"].metrics["rows"]
    teacher = next(r for r in rows if r["model"].startswith("teacher"))
    assert "autoguidance w=2.05" in teacher["model"]
    assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    grid = results["evaluation"].path / "report.md"
    assert grid.is_file()
