"""ELatentLPIPS (cmt_core.objectives.latent_lpips): the latent VGG16, its distance with and without the shared ADA
augmentation, its weights file, its registration as a mid-training distance and its classifier training.

Parity with the reference's own code (sony/cmt@5a99e54 ELatentLPIPS2 with SNU-VGILab/e-latentlpips' ada_aug) was
checked outside the suite, bit for bit on CPU: features, distances with augmentation off, on (p = 1 and 0.5, the same
global seed) and their gradients."""

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from cmt_core.config import MidTrainConfig
from cmt_core.objectives.distances import make_distance
from cmt_core.objectives.latent_lpips import (
    AUGMENT_MIN_SIDE,
    ELatentLPIPS,
    LatentVGG16,
    augment_pair,
    feature_taps,
    load_features,
    train_latent_vgg,
)
from cmt_core.presets import get_preset

SIDE = 24  # the smallest convenient side the augmentation takes (AUGMENT_MIN_SIDE is 22)


def latents(*shape, seed=0):
    return 0.5 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random latent VGG16 (small classifier head) saved as a torch state dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("elpips") / "latent_vgg16.pt"
    torch.save(LatentVGG16(hidden=8, num_classes=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def plain(weights):
    return ELatentLPIPS(weights, augment=False)


def test_network_shapes_and_the_five_taps():
    net = LatentVGG16(in_channels=4, num_classes=10, hidden=16)
    x = latents(2, 4, 16, 16)
    assert net(x).shape == (2, 10)
    shapes = [tuple(t.shape) for t in feature_taps(net.features, x)]
    assert shapes == [(2, 64, 16, 16), (2, 128, 16, 16), (2, 256, 16, 16), (2, 512, 8, 8), (2, 512, 4, 4)]
    assert len(net.features) == 41 and isinstance(net.features[1], torch.nn.GroupNorm)


def test_distance_without_augmentation_is_zero_on_equal_inputs_symmetric_and_differentiable(plain):
    a, b = latents(3, 4, 16, 16), latents(3, 4, 16, 16, seed=1)
    d = plain(a, b)
    assert d.shape == (3,) and torch.isfinite(d).all() and (d > 0).all()
    assert torch.equal(plain(a, a), torch.zeros(3))
    assert torch.allclose(plain(b, a), d, rtol=1e-5, atol=1e-7)
    a.requires_grad_(True)
    plain(a, b).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_distance_is_the_sum_over_taps_of_normalised_squared_differences(plain):
    a, b = latents(2, 4, 8, 8), latents(2, 4, 8, 8, seed=1)
    expected = 0
    for fa, fb in zip(feature_taps(plain.features, a), feature_taps(plain.features, b)):
        na = fa / (fa.square().sum(1, keepdim=True) + 1e-8).sqrt()
        nb = fb / (fb.square().sum(1, keepdim=True) + 1e-8).sqrt()
        expected = expected + (na - nb).square().sum(1).mean((1, 2))
    assert torch.allclose(plain(a, b), expected, rtol=1e-5)


def test_augmentation_transforms_both_inputs_alike(weights):
    x, y = latents(2, 4, SIDE, SIDE), latents(2, 4, SIDE, SIDE, seed=1)
    on = ELatentLPIPS(weights, generator=torch.Generator().manual_seed(5))
    assert torch.equal(on(x, x), torch.zeros(2))  # one transform for both, noise and cutout included
    ax, ay = augment_pair(x, x.clone(), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ax, ay) and not torch.allclose(ax, x, atol=1e-2)
    seeded = [ELatentLPIPS(weights, generator=torch.Generator().manual_seed(7))(x, y) for _ in range(2)]
    assert torch.equal(*seeded)  # the generator is the only randomness
    swapped = ELatentLPIPS(weights, generator=torch.Generator().manual_seed(7))(y, x)
    assert torch.allclose(swapped, seeded[0], rtol=1e-5)
    assert not torch.allclose(seeded[0], ELatentLPIPS(weights, augment=False)(x, y), rtol=1e-3)


def test_augmentation_draws_from_the_global_generator_unless_given_one():
    x = latents(2, 4, SIDE, SIDE)
    torch.manual_seed(11)
    first = augment_pair(x, x)[0]
    torch.manual_seed(11)
    assert torch.equal(augment_pair(x, x)[0], first)  # the reference's randomness: the global generator
    state = torch.get_rng_state()
    augment_pair(x, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_augmentation_stays_float32_under_autocast():
    x, y = latents(2, 4, SIDE, SIDE), latents(2, 4, SIDE, SIDE, seed=1)
    plain = augment_pair(x, y, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = augment_pair(x, y, generator=torch.Generator().manual_seed(2))
    assert all(c.dtype == torch.float32 and torch.equal(c, r) for c, r in zip(cast, plain))


def test_augmentation_at_strength_zero_is_the_identity_up_to_the_resampling_filters():
    a, b = latents(2, 4, SIDE, SIDE), latents(2, 4, SIDE, SIDE, seed=1)
    oa, ob = augment_pair(a, b, p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(oa, a, atol=1e-5) and torch.allclose(ob, b, atol=1e-5)


def test_sizes_the_distance_refuses(weights, plain):
    with pytest.raises(ValueError, match=f"H, W >= {AUGMENT_MIN_SIDE}; got \\(2, 4, 16, 16\\)"):
        ELatentLPIPS(weights)(latents(2, 4, 16, 16), latents(2, 4, 16, 16))
    with pytest.raises(ValueError, match="latents \\(B, 4, H, W\\)"):
        plain(latents(2, 3, 16, 16), latents(2, 3, 16, 16))
    with pytest.raises(ValueError, match="H, W >= 4"):
        plain(latents(2, 4, 2, 2), latents(2, 4, 2, 2))


def test_weights_round_trip_through_torch_and_safetensors_files(tmp_path, weights):
    saved = torch.load(weights, weights_only=True)
    save_file(saved, tmp_path / "w.safetensors")
    for path in (weights, tmp_path / "w.safetensors"):
        loaded = load_features(path).state_dict()
        assert loaded.keys() == {k.removeprefix("features.") for k in saved if k.startswith("features.")}
        assert all(torch.equal(v, saved[f"features.{k}"]) for k, v in loaded.items())
    trunk = {k: v for k, v in saved.items() if k.startswith("features.")}  # the classifier is optional
    torch.save(trunk, tmp_path / "trunk.pt")
    assert torch.equal(load_features(tmp_path / "trunk.pt")[0].weight, saved["features.0.weight"])


def bad_files(folder, weights):
    saved = torch.load(weights, weights_only=True)
    (folder / "garbage.pt").write_bytes(b"not a torch file")
    (folder / "garbage.safetensors").write_bytes(b"not safetensors")
    torch.save({"conv.weight": torch.zeros(1)}, folder / "other.pt")
    torch.save({**saved, "features.3.weight": torch.zeros(64, 32, 3, 3)}, folder / "misshapen.pt")
    torch.save(LatentVGG16(hidden=8, num_classes=3), folder / "module.pt")  # a pickled module: never unpickled
    torch.save([torch.zeros(1)], folder / "list.pt")
    return {"absent.pt": "does not exist", "garbage.pt": "not a torch state dict of plain tensors",
            "garbage.safetensors": "not a readable safetensors file", "other.pt": "has no 4-D 'features.0.weight'",
            "misshapen.pt": "'features.3.weight' has shape \\(64, 32, 3, 3\\) where the latent VGG16 needs "
                            "\\(64, 64, 3, 3\\)",
            "module.pt": "must first be converted to its state_dict", "list.pt": "is not a state dict"}


def test_a_bad_weights_file_is_one_line_naming_the_path(tmp_path, weights):
    for name, words in bad_files(tmp_path, weights).items():
        with pytest.raises(ValueError, match=words) as info:
            ELatentLPIPS(tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


ELPIPS_DIGITS = ["data.resolution=24", "midtrain.distance=elatent_lpips"]  # digits at 24x24: the side augmented


def test_registered_as_a_mid_training_distance_that_needs_its_weights_file(weights):
    distance = make_distance("elatent_lpips", lpips_backbone=weights)
    assert isinstance(distance, ELatentLPIPS) and distance.augment and distance.p == 1.0
    with pytest.raises(ValueError, match="lpips_backbone"):
        make_distance("elatent_lpips")
    with pytest.raises(ValidationError, match="midtrain.lpips_backbone is required for midtrain.distance="
                                              "'elatent_lpips'"):
        MidTrainConfig(distance="elatent_lpips")
    assert get_preset("digits", [*ELPIPS_DIGITS, f"midtrain.lpips_backbone={weights}"]).midtrain.lpips_backbone \
        == weights


@pytest.mark.parametrize("preset,overrides,words", [
    ("digits", ["data.resolution=24", "midtrain.form=mf"], "midtrain.distance='elatent_lpips' compares images: use "
                                                           "it with midtrain.form 'cm' or 'flow_map'"),
    ("toy", [], "not the 2-D points of data.name='gaussian_mixture'"),
    ("digits", [], "needs at least 22 pixels a side: data.name='digits' at data.resolution=None with "
                   "data.encoder.kind='identity' gives 8"),
    ("digits-latent", ["data.resolution=32"], "data.encoder.kind='trained' gives 16"),  # the autoencoder halves
])
def test_configs_the_distance_cannot_compare_name_the_field(preset, overrides, words, weights):
    with pytest.raises(ValidationError, match=words):
        get_preset(preset, ["midtrain.distance=elatent_lpips", f"midtrain.lpips_backbone={weights}", *overrides])


class Latents:
    """A latent encoder the loss must not decode through."""

    name = "sd_vae"

    def decode(self, z):
        raise AssertionError("ELatentLPIPS decoded its latents")


def test_the_mid_training_loss_compares_latents_without_decoding(weights):
    from cmt_core.methods import LossInputs, get_method

    cfg = get_preset("digits", [*ELPIPS_DIGITS, f"midtrain.lpips_backbone={weights}"])
    loss = get_method("cm").build_loss(cfg, LossInputs(None, None, 0.5, encoder=Latents()))
    assert isinstance(loss.distance, ELatentLPIPS)  # not wrapped by cmt_core.encoders.decoded


def test_preflight_reads_the_weights_file_before_any_stage(tmp_path, weights):
    from cmt_core.errors import PreflightError
    from cmt_core.preflight import check_late_files

    bad_files(tmp_path, weights)
    cfg = get_preset("digits", [*ELPIPS_DIGITS, f"midtrain.lpips_backbone={tmp_path / 'other.pt'}"])
    with pytest.raises(PreflightError, match="midtrain.lpips_backbone=.*other.pt' is not a usable latent VGG16"):
        check_late_files(cfg, ["midtrain"])
    good = cfg.model_copy(update={"midtrain": cfg.midtrain.model_copy(update={"lpips_backbone": weights})})
    check_late_files(good, ["midtrain"])


def test_train_latent_vgg_runs_an_epoch_and_writes_a_file_the_distance_reads(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(4, 8, 8, generator=gen), int(label)) for label in torch.randint(0, 10, (32,), generator=gen)]
    with torch.random.fork_rng():  # the initialisation train_latent_vgg's seed 0 gives
        torch.manual_seed(0)
        initial = LatentVGG16(num_classes=10, hidden=16).state_dict()
    for name in ("vgg.pt", "vgg.safetensors"):
        out = train_latent_vgg(data, tmp_path / name, num_classes=10, epochs=1, batch_size=16, hidden=16,
                               device="cpu")
        assert out == tmp_path / name and not (tmp_path / f"{name}.state.pt").exists()
        saved = torch.load(out, weights_only=True) if out.suffix == ".pt" else load_file(out)
        assert saved.keys() == initial.keys() and saved["classifier.6.weight"].shape == (10, 16)
        assert not torch.equal(saved["features.0.weight"], initial["features.0.weight"])  # one epoch of SGD moved it
        d = ELatentLPIPS(out, augment=False)(latents(2, 4, 8, 8), latents(2, 4, 8, 8, seed=1))
        assert d.shape == (2,) and torch.isfinite(d).all()


class Interrupted(Exception):
    pass


class StopsAfter(list):
    """A list of items that raises ``Interrupted`` once ``calls`` items have been read (an interrupted run)."""

    def __init__(self, items, calls):
        super().__init__(items)
        self.calls = calls

    def __getitem__(self, i):
        self.calls -= 1
        if self.calls < 0:
            raise Interrupted
        return super().__getitem__(i)


def test_train_latent_vgg_resumes_after_its_last_epoch(tmp_path):
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 8, 8, generator=gen), int(label)) for label in torch.randint(0, 4, (16,), generator=gen)]
    kwargs = dict(num_classes=4, epochs=2, batch_size=8, hidden=8, lr_step_epochs=1, device="cpu")
    whole = torch.load(train_latent_vgg(data, tmp_path / "whole.pt", **kwargs), weights_only=True)
    with pytest.raises(Interrupted):  # the first item (its shape), then epoch 1, then stopped in epoch 2
        train_latent_vgg(StopsAfter(data, 1 + len(data) + 3), tmp_path / "resumed.pt", **kwargs)
    assert (tmp_path / "resumed.pt.state.pt").is_file() and not (tmp_path / "resumed.pt").exists()
    resumed = torch.load(train_latent_vgg(data, tmp_path / "resumed.pt", **kwargs), weights_only=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
