"""Per-sample distances on known values, LPIPS from a local backbone file, and their config checks."""

import pytest
import torch
from pydantic import ValidationError

from cmt_core.config import MidTrainConfig
from cmt_core.objectives.distances import (
    DISTANCES,
    LPIPS,
    l2_norm,
    make_distance,
    mean_squared_error,
    pseudo_huber,
    squared_l2,
)
from cmt_core.presets import get_preset

VGG16_LAYERS = (64, 64, "pool", 128, 128, "pool", 256, 256, 256, "pool", 512, 512, 512, "pool", 512, 512, 512)


def write_random_vgg16(path, seed=0):
    """torchvision's VGG16 state-dict names and shapes (``features.<i>.weight / bias``), random He weights."""
    gen, state, channels, index = torch.Generator().manual_seed(seed), {}, 3, 0
    for layer in VGG16_LAYERS:
        if layer == "pool":
            index += 1
            continue
        he = (2 / (9 * channels)) ** 0.5
        state[f"features.{index}.weight"] = he * torch.randn(layer, channels, 3, 3, generator=gen)
        state[f"features.{index}.bias"] = torch.zeros(layer)
        channels, index = layer, index + 2  # a conv is followed by its ReLU
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    pytest.importorskip("lpips")
    return write_random_vgg16(tmp_path_factory.mktemp("lpips") / "vgg16.pth")


@pytest.fixture(scope="module")
def lpips_distance(backbone):
    return LPIPS(backbone)


# --- the l2 family ---------------------------------------------------------------------------------------------------

def pair():
    """Two (2, 1, 2, 2) batches whose differences are (3, 4, 0, 0) and (1, 1, 1, 1): norms 5 and 2."""
    a = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64).reshape(2, 1, 2, 2)
    return a, torch.zeros_like(a)


def test_squared_l2_and_l2_norm_run_over_every_dimension_of_a_sample():
    a, b = pair()
    assert squared_l2(a, b).tolist() == [25.0, 4.0]
    assert l2_norm(a, b).tolist() == [5.0, 2.0]
    assert mean_squared_error(a, b).tolist() == [25.0 / 4, 1.0]


def test_pseudo_huber_takes_its_constant_per_sample():
    a, b = pair()
    assert pseudo_huber(a, b, 12.0).tolist() == pytest.approx([13.0 - 12.0, 148**0.5 - 12.0], rel=1e-12)
    assert torch.equal(pseudo_huber(a, b, 0.0), l2_norm(a, b))
    # a per-dimension constant c' gives the same loss up to sqrt(dim) once c = c' sqrt(dim)
    x, y, dim, c_dim = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), 48, 0.03
    per_dimension = (mean_squared_error(x, y) + c_dim**2).sqrt() - c_dim
    assert torch.allclose(pseudo_huber(x, y, c_dim * dim**0.5), dim**0.5 * per_dimension, rtol=1e-5)


def test_l2_norm_has_a_zero_gradient_where_the_samples_agree():
    a = torch.ones(2, 3, requires_grad=True)
    l2_norm(a, torch.ones(2, 3)).sum().backward()
    assert torch.equal(a.grad, torch.zeros(2, 3))


def test_make_distance_builds_every_name_but_needs_a_file_for_lpips():
    a, b = pair()
    for name in set(DISTANCES) - {"lpips", "elatent_lpips"}:  # the perceptual ones: tests/test_latent_lpips.py too
        assert make_distance(name, huber_c=12.0)(a, b).shape == (2,)
    assert make_distance("pseudo_huber", huber_c=12.0)(a, b)[0].item() == pytest.approx(1.0)
    for name in ("lpips", "elatent_lpips"):
        with pytest.raises(ValueError, match="lpips_backbone"):
            make_distance(name)
    with pytest.raises(ValueError, match="unknown distance 'l2'"):
        make_distance("l2")


# --- LPIPS -----------------------------------------------------------------------------------------------------------

def test_lpips_loads_the_backbone_from_the_local_file(backbone, lpips_distance):
    saved = torch.load(backbone, weights_only=True)
    trunk = lpips_distance.net.net
    assert torch.equal(trunk.slice1[0].weight, saved["features.0.weight"])
    assert torch.equal(dict(trunk.slice5.named_children())["28"].weight, saved["features.28.weight"])
    heads = lpips_distance.net.lin0.model[1].weight  # the calibrated linear heads that ship with the package
    assert heads.min() >= 0 and heads.abs().sum() > 0


def test_lpips_is_finite_non_negative_and_zero_for_identical_images(lpips_distance):
    gen = torch.Generator().manual_seed(1)
    a = (torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1).requires_grad_(True)
    b = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    d = lpips_distance(a, b)
    assert d.shape == (3,) and torch.isfinite(d).all() and (d > 0).all()
    assert torch.equal(lpips_distance(b, b), torch.zeros(3))
    d.sum().backward()  # mid-training differentiates through the frozen network into the prediction
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_lpips_compares_images_at_their_own_resolution(lpips_distance):
    shapes = []
    hook = lpips_distance.net.net.slice5.register_forward_hook(lambda m, i, out: shapes.append(tuple(out.shape)))
    try:
        lpips_distance(torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32))
    finally:
        hook.remove()
    assert shapes == [(2, 512, 2, 2)] * 2  # 32 / 2^4: no upsampling to 224 before the trunk


def test_lpips_reads_grey_images_as_rgb_and_refuses_images_too_small(lpips_distance):
    grey, other = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    rgb = lpips_distance(grey.expand(-1, 3, -1, -1), other.expand(-1, 3, -1, -1))
    assert torch.equal(lpips_distance(grey, other), rgb)
    with pytest.raises(ValueError, match="H, W >= 16; got \\(2, 3, 8, 8\\)"):
        lpips_distance(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))


def test_a_backbone_file_of_another_network_names_the_missing_weights(tmp_path):
    pytest.importorskip("lpips")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'features.0.weight': expected torchvision's VGG16"):
        LPIPS(tmp_path / "other.pth")


# --- configuration ---------------------------------------------------------------------------------------------------

def write_empty(folder):
    """A file at the backbone path: validation checks that it exists, not what it holds."""
    path = folder / "vgg16.pth"
    path.write_bytes(b"")
    return path


def test_lpips_without_its_weights_file_fails_naming_the_field_before_any_stage(tmp_path):
    from cmt_core.errors import PreflightError
    from cmt_core.preflight import preflight
    from cmt_core.stages import plan

    with pytest.raises(ValidationError, match="midtrain.lpips_backbone is required"):
        get_preset("cifar10", ["midtrain.distance=lpips", "midtrain.lpips_backbone=null"])
    data = tmp_path / "cifar"
    data.mkdir()
    absent = get_preset("cifar10", [f"data.path={data}", "teacher.source=pretrain", "teacher.path=null",
                                    f"midtrain.lpips_backbone={tmp_path / 'absent.pth'}"],
                        artifact_root=tmp_path / "artifacts")
    with pytest.raises(PreflightError, match="midtrain.lpips_backbone=.*absent.pth' does not exist"):
        preflight(plan(absent), ["teacher", "rollouts", "midtrain"])
    assert not (tmp_path / "artifacts").exists()  # nothing written
    present = absent.model_copy(update={"midtrain": absent.midtrain.model_copy(
        update={"lpips_backbone": write_empty(tmp_path)})})
    with pytest.raises(PreflightError, match="data.path=.*cannot be read"):  # past the file checks: the data
        preflight(plan(present), ["teacher", "rollouts", "midtrain"])


@pytest.mark.parametrize("overrides,words", [
    (["midtrain.distance=l2"], "midtrain.distance"),  # the old name of the squared distance is ambiguous
    (["midtrain.distance=pseudo_huber", "midtrain.huber_c=0"], "midtrain.huber_c must be > 0"),
    (["midtrain.huber_c=-1"], "midtrain.huber_c"),
    (["posttrain.ect.huber_c=-1"], "posttrain.ect.huber_c"),
    (["midtrain.distance=lpips", "midtrain.form=mf"], "use it with midtrain.form 'cm' or 'flow_map'"),
])
def test_bad_distance_settings_name_the_field(overrides, words, tmp_path):
    with pytest.raises(ValidationError) as info:
        get_preset("cifar10", [*overrides, f"midtrain.lpips_backbone={write_empty(tmp_path)}"])
    assert words in str(info.value)


def test_lpips_needs_images_of_sixteen_pixels(tmp_path):
    lpips = ["midtrain.distance=lpips", f"midtrain.lpips_backbone={write_empty(tmp_path)}"]
    for preset in ("toy", "digits"):
        with pytest.raises(ValidationError, match="midtrain.distance='lpips' needs images of at least 16 pixels"):
            get_preset(preset, lpips)
    assert get_preset("digits", [*lpips, "data.resolution=16"]).midtrain.distance == "lpips"


def test_midtrain_defaults_to_the_squared_l2_distance():
    cfg = MidTrainConfig()
    assert cfg.distance == "squared_l2" and cfg.lpips_backbone is None


def test_a_backbone_file_that_is_not_plain_tensors_is_refused_without_being_run(tmp_path):
    garbage = tmp_path / "vgg16.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="is not a torch state dict of plain tensors"):
        make_distance("lpips", lpips_backbone=garbage)
