"""The ImageNet-256 Mean Flow recipe: its preset's shape (SD-VAE latents at SiT's scale, a SiT-XL/2 velocity teacher,
a DiT-XL/2 flow map, guided Mean Flow) and the tiny recipe's every stage on a CPU: images encoded by a VAE written
here, a tiny SiT checkpoint written here in SiT's format, data-free guided rollouts, flow-map CMT from random
weights, Mean Flow with guidance in its target."""

import pytest
import torch

from cmt_core.networks.dit import DIT_SIZES, DiT
from cmt_core.pipeline import run_pipeline
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.sit_checkpoint import write_sit_checkpoint
from cmt_core.stages import plan
from tests.test_data_labels import zip_folder
from tests.test_latent import write_tiny_vae

CPU = Runtime(torch.device("cpu"))
CLASSES = 5


def test_the_imagenet256_preset_is_the_mean_flow_recipe():
    cfg = get_preset("imagenet256-meanflow")
    assert (cfg.data.resolution, cfg.data.num_classes, cfg.data.encoder.kind) == (256, 1000, "sd_vae")
    assert (cfg.data.encoder.raw_mean, cfg.data.encoder.raw_std, cfg.data.encoder.final_std) == ((0.0,) * 4,
                                                                                                 (1.0,) * 4, 0.18215)
    n = cfg.network
    assert (n.kind, n.width, n.depth, n.heads, n.patch_size) == ("dit", *DIT_SIZES["XL"][:2], DIT_SIZES["XL"][2], 2)
    assert (cfg.teacher.source, cfg.teacher.path.name) == ("sit", "SiT-XL-2-256.pt")
    g = cfg.posttrain.meanflow.guidance
    assert (g.omega, g.kappa, g.t_start, g.t_end) == (0.2, 0.92, 0.0, 0.75)
    assert (cfg.posttrain.meanflow.p_mean, cfg.posttrain.meanflow.p_std, cfg.posttrain.meanflow.equal_fraction) \
        == (-0.4, 1.0, 0.75)
    assert cfg.posttrain.train.label_dropout == 0.1 and cfg.posttrain.train.betas == (0.9, 0.95)
    resolved = plan(cfg)
    # a loaded SiT and its rollouts need neither the data nor the encoder; Mean Flow trains on the latents
    assert set(resolved.inputs["rollouts"]) == {"teacher"} and set(resolved.inputs["teacher"]) == set()
    assert {"encoder", "encode", "midtrain"} <= set(resolved.inputs["posttrain"])


def test_a_sit_teacher_cannot_initialise_a_student():
    with pytest.raises(ValueError, match="velocity-parametrised"):
        get_preset("imagenet256-meanflow", ["midtrain.init=teacher"])


def write_images_zip(tmp_path, num: int = 24, resolution: int = 16):
    """EDM's dataset_tool layout: PNGs and ``dataset.json`` labels, zipped."""
    import json

    import numpy as np
    from PIL import Image

    folder, rng = tmp_path / "img", np.random.default_rng(0)
    names = [f"00000/img{k:08d}.png" for k in range(num)]
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / name)
    (folder / "dataset.json").write_text(json.dumps({"labels": [[n, k % CLASSES] for k, n in enumerate(names)]}))
    return zip_folder(folder, tmp_path / "img.zip")


def write_tiny_sit(path):
    """A tiny SiT (DiT 'tiny', patch 2, 4x8x8 latents) with random weights, in SiT's checkpoint format."""
    hidden, depth, heads = DIT_SIZES["tiny"]
    torch.manual_seed(0)
    raw = DiT(8, 4, 2, hidden, depth, heads, label_dim=CLASSES)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.02 * torch.randn_like(p))
    write_sit_checkpoint(raw, path, null_row=torch.randn(hidden) * 0.02)
    return path


@pytest.mark.slow
def test_tiny_imagenet256_recipe_runs_every_stage_on_cpu(tmp_path):
    cfg = get_preset("imagenet256-meanflow-tiny", [
        f"data.path={write_images_zip(tmp_path)}", f"data.num_classes={CLASSES}",
        f"data.encoder.path={write_tiny_vae(tmp_path / 'vae')}", f"teacher.path={write_tiny_sit(tmp_path / 'sit.pt')}",
        "rollout.cluster.workers=1"], artifact_root=tmp_path / "art")
    results = run_pipeline(cfg, CPU)
    assert list(results) == ["encoder", "encode", "teacher", "rollouts", "midtrain", "posttrain", "evaluation"]
    assert results["encode"].metrics["model_shape"] == [4, 8, 8]
    assert results["teacher"].metrics["parametrisation"] == "linear_velocity"
    rows = results["evaluation"].metrics["rows"]
    teacher = next(r for r in rows if r["model"].startswith("teacher"))
    assert "cfg w=1.5" in teacher["model"]
    assert any(r["model"].startswith("MEANFLOW") for r in rows)
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float))  # no NaN
