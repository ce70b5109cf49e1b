"""EDM2's magnitude-preserving U-Net as a raw network, and EDM2 snapshot pickles read without running their code.

The pickles here are written by the test in EDM2's format (persistent-object records holding a module source,
a class name, constructor arguments and state, around our own network's float16 weights under EDM2's names);
none of EDM2's code is involved. The comparison with NVlabs/edm2's own code is a separate script (not a test).
"""

import copy
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from cmt_core.edm2_pickle import load_edm2_network, read_edm2_pickle
from cmt_core.edm_pickle import ForbiddenGlobal
from cmt_core.models import init_from
from cmt_core.networks.edm2 import (
    EDM2UNet,
    MPConv,
    MPFourier,
    MPLaterTime,
    apply_forced_weight_norm,
    edm2_network,
    forced_weight_norm,
    normalize,
)
from cmt_core.networks.embedding import LaterTimeMLP
from cmt_core.preconditioning import Denoiser
from tests.test_edm_pickle import Persistent, install_edm_module_stand_ins

SHAPE = (3, 8, 8)
CLASSES = 5
# 32 and 64 channels: the 4x4 blocks (64 channels) have one attention head of EDM2's 64 channels
ARCH = dict(width=32, depth=1, channel_mult=(1, 2), attention_resolutions=(4,), dropout=0.0, emb_dim=None)
EXECUTED = "executed.txt"  # what the payloads below would create


def tiny(num_times: int = 1, label_dim: int = CLASSES, **changes) -> EDM2UNet:
    return edm2_network(SHAPE, num_times, label_dim=label_dim, **{**ARCH, **changes})


def trained_looking(net: EDM2UNet, seed: int = 0) -> EDM2UNet:
    """Gains (zero at init, so the output is exactly zero) set to non-zero values; the later times' gains stay 0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0 and not name.startswith("emb_later"):
                p.copy_(0.5 + 0.3 * torch.randn([]))
    return net


def labels(*classes: int) -> dict:
    return {"class_labels": torch.eye(CLASSES)[list(classes)]}


def inputs(batch: int = 3, num_times: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, *SHAPE, generator=generator), torch.randn(batch, num_times, generator=generator)


# ------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("num_times", [1, 2])
@pytest.mark.parametrize("label_dim", [0, CLASSES])
def test_output_is_shaped_like_the_input_and_starts_at_exactly_zero(num_times, label_dim):
    torch.manual_seed(0)
    net = tiny(num_times, label_dim)
    assert net.enc["4x4_block0"].num_heads == 1 and net.dec["4x4_in0"].num_heads == 1  # attention is exercised
    x, c = inputs(num_times=num_times)
    cond = labels(0, 1, 4) if label_dim else {}
    assert torch.equal(net(x, c, cond=cond), torch.zeros_like(x))  # out_gain starts at 0, as in EDM2
    y = trained_looking(net)(x, c, cond=cond)
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().mean() > 1e-2


def test_wrong_number_of_times_and_non_square_samples_are_refused():
    with pytest.raises(ValueError, match="c_noise"):
        tiny(num_times=2)(torch.randn(2, *SHAPE), torch.randn(2, 1), cond=labels(0, 1))
    with pytest.raises(ValueError, match="square"):
        edm2_network((3, 8, 16), **ARCH)


def test_edm2_network_maps_the_architecture_values_and_emb_dim():
    net = tiny(emb_dim=96)
    assert net.emb_noise.weight.shape == (96, 32)  # (emb, noise features = width * channel_mult[0])
    assert tiny().emb_noise.weight.shape == (64, 32)  # default: the widest resolution's channels
    assert tiny(emb_dim=0).emb_noise.weight.shape == (64, 32)
    with pytest.raises(ValueError, match="multiple of its width 32"):
        tiny(emb_dim=100)
    assert list(net.enc) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"]
    assert list(net.dec) == ["4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "8x8_up", "8x8_block0",
                             "8x8_block1"]


def test_edm2_img64_s_has_the_reference_parameter_count():
    with torch.device("meta"):
        net = edm2_network((3, 64, 64), width=192, depth=3, channel_mult=(1, 2, 3, 4),
                           attention_resolutions=(16, 8), dropout=0.0, label_dim=1000)
    # NVlabs/edm2's UNet(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192), counted by it
    assert sum(p.numel() for p in net.parameters()) == 280_209_253


def test_a_label_changes_the_output_and_a_missing_label_is_an_all_zero_row():
    net = trained_looking(tiny()).eval()
    x, c = inputs()
    with torch.no_grad():
        out = net(x, c, cond=labels(0, 1, 2))
        assert (out - net(x, c, cond=labels(3, 1, 2)))[0].abs().max() > 1e-3
        assert torch.equal(out[1:], net(x, c, cond=labels(3, 1, 2))[1:])  # each row sees its own label
        zero_rows = {"class_labels": torch.zeros(3, CLASSES)}
        assert torch.equal(net(x, c, cond={}), net(x, c, cond=zero_rows))  # as EDM2's Precond without labels
        assert torch.equal(net(x, c), net(x, c, cond=zero_rows))


def test_unknown_conditioning_and_misshapen_labels_are_refused():
    x, c = inputs()
    with pytest.raises(ValueError, match=r"takes no conditioning \['text'\]"):
        tiny()(x, c, cond={**labels(0, 1, 2), "text": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"takes no conditioning \['class_labels'\]"):
        tiny(label_dim=0)(x, c, cond=labels(0, 1, 2))
    with pytest.raises(ValueError, match=r"class_labels must be \(B, 5\)"):
        tiny()(x, c, cond={"class_labels": torch.zeros(3, 4)})


@pytest.mark.parametrize("training", [False, True])
def test_two_time_network_initialised_from_one_time_weights_computes_the_one_time_function(training):
    teacher = Denoiser(trained_looking(tiny(1)))
    student = Denoiser(tiny(2))
    assert isinstance(student.raw.emb_later[0], LaterTimeMLP) and isinstance(student.raw.emb_later[0], MPLaterTime)
    missing, unexpected = student.raw.load_state_dict(teacher.raw.state_dict(), strict=False)
    assert sorted(missing) == ["emb_later.0.gain", "emb_later.0.linear.weight"] and not unexpected
    init_from(student, teacher)  # the repository's teacher initialisation accepts the missing second time
    teacher.raw.train(training), student.raw.train(training)  # training: both apply forced weight normalisation

    x, c = inputs(num_times=2)
    expected = teacher.raw(x, c[:, :1], cond=labels(0, 1, 2))
    assert expected.abs().mean() > 1e-2
    assert torch.equal(student.raw(x, c, cond=labels(0, 1, 2)), expected)
    assert torch.equal(student.raw(x, c.flip(1), cond=labels(0, 1, 2)), teacher.raw(x, c[:, 1:], cond=labels(0, 1, 2)))

    # the second time's gain gets a gradient: training can make the second time matter
    student.raw.train()
    student.raw(x, c, cond=labels(0, 1, 2)).square().mean().backward()
    assert student.raw.emb_later[0].gain.grad.abs() > 0


# ------------------------------------------------------------------------------ forced weight normalisation


def mpconv_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in net.named_modules() if isinstance(m, MPConv)}


def test_training_forward_normalises_the_stored_weights_and_eval_does_not():
    net = trained_looking(tiny())
    x, c = inputs()
    before = mpconv_weights(net)
    net.eval()(x, c, cond=labels(0, 1, 2))
    assert all(torch.equal(before[k], w) for k, w in mpconv_weights(net).items())

    net.train()(x, c, cond=labels(0, 1, 2))
    after = mpconv_weights(net)
    for name, weight in after.items():
        assert not torch.equal(before[name], weight), name  # random N(0, 1) weights are not unit-magnitude rows
        torch.testing.assert_close(weight, normalize(before[name]), rtol=0, atol=1e-6)
        rms = weight.flatten(1).square().mean(dim=1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-3)  # 1 - eps / old rms


def test_switching_forced_weight_normalisation_off_keeps_the_weights_and_restores_each_setting():
    model = Denoiser(trained_looking(tiny()))
    layers = [m for m in model.modules() if isinstance(m, MPConv)]
    layers[0].force_wn = False  # a setting of its own, restored as it was
    x, sigma = torch.randn(3, *SHAPE), torch.tensor([0.1, 1.0, 10.0])
    before = mpconv_weights(model)
    with forced_weight_norm(model, False):
        assert not any(layer.force_wn for layer in layers)
        model.train()(x, sigma, cond=labels(0, 1, 2))
    assert all(torch.equal(before[k], w) for k, w in mpconv_weights(model).items())
    assert [layer.force_wn for layer in layers] == [False] + [True] * (len(layers) - 1)
    with pytest.raises(RuntimeError), forced_weight_norm(model, True):
        assert all(layer.force_wn for layer in layers)
        raise RuntimeError
    assert [layer.force_wn for layer in layers] == [False] + [True] * (len(layers) - 1)


def test_target_pass_without_forced_normalisation_uses_the_student_pass_weights():
    """The CMT reference's reason for the switch: after the student pass (training mode) has normalised the weights,
    a target pass with forced normalisation off computes with exactly the weights the student pass used."""
    model = Denoiser(trained_looking(tiny())).train()
    x, sigma = torch.randn(3, *SHAPE), torch.tensor([0.1, 1.0, 10.0])
    student = model(x, sigma, cond=labels(0, 1, 2))
    with torch.no_grad(), forced_weight_norm(model, False):
        target = model(x, sigma, cond=labels(0, 1, 2))
    assert torch.equal(student, target)


# ------------------------------------------------------------------------------ EDM2 snapshot pickles


@pytest.fixture
def edm2_modules(monkeypatch):
    """Stand-ins for the modules an EDM2 pickle refers to (EDM's: ``torch_utils.persistence``, ``dnnlib.util``)."""
    return install_edm_module_stand_ins(monkeypatch)


def as_edm2(module: nn.Module, reconstruct, module_src: str, init_kwargs: dict | None = None):
    """Our module tree in EDM2's pickled form (a module's ``__dict__`` as its state; ``EDM2UNet`` named ``UNet``)."""
    children = {k: as_edm2(v, reconstruct, module_src) for k, v in module.named_children()}
    if isinstance(module, nn.ModuleDict):
        container = nn.ModuleDict()
        container._modules.update(children)
        return container
    state = {**module.__dict__, "_modules": children, "_init_args": (), "_init_kwargs": init_kwargs or {}}
    name = "UNet" if isinstance(module, EDM2UNet) else type(module).__name__
    return Persistent(reconstruct, name, state, module_src)


def write_edm2_pickle(path, raw: EDM2UNet, mods, module_src: str = "import torch\n", unet_changes=None,
                      precond_class: str = "Precond", encoder: str = "StandardRGBEncoder") -> None:
    """``{"ema": Precond(UNet), "encoder", "dataset_kwargs", "loss_fn"}`` as EDM2's training loop pickles it, with
    ``raw``'s weights in float16 (EDM2 writes ``ema.to(torch.float16)``); ``encoder``: EDM2's pixel encoder, or
    ``StabilityVAEEncoder`` with EDM2's whitening constants."""
    unet_kwargs = {"model_channels": 32, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
                   "dropout": 0.0, **(unet_changes or {})}
    interface = {"img_resolution": 8, "img_channels": 3, "label_dim": raw.label_dim}
    half = copy.deepcopy(raw).to(torch.float16)
    unet = as_edm2(half, mods.reconstruct, module_src, {**interface, **unet_kwargs})
    logvar = {"logvar_fourier": as_edm2(MPFourier(128).half(), mods.reconstruct, module_src),
              "logvar_linear": as_edm2(MPConv(128, 1, ()).half(), mods.reconstruct, module_src)}
    state = {"training": False, "_parameters": {}, "_buffers": {}, "_non_persistent_buffers_set": set(),
             "_modules": {"unet": unet, **logvar}, "_init_args": (),
             "_init_kwargs": {**interface, "use_fp16": True, **unet_kwargs}, **interface, "use_fp16": True,
             "sigma_data": 0.5}
    scale = np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28])
    encoder_state = {"_init_args": (), "_init_kwargs": {}}
    if encoder == "StabilityVAEEncoder":
        encoder_state.update(vae_name="stabilityai/sd-vae-ft-mse", scale=scale, batch_size=8, _vae=None,
                             bias=np.float32(0) - np.float32([5.81, 3.25, 0.12, -2.15]) * scale)
    data = mods.EasyDict(
        ema=Persistent(mods.reconstruct, precond_class, state, module_src),
        encoder=Persistent(mods.reconstruct, encoder, encoder_state, module_src),
        dataset_kwargs=mods.EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip", use_labels=True),
        loss_fn=Persistent(mods.reconstruct, "EDM2Loss", {"P_mean": -0.8, "P_std": 1.6, "sigma_data": 0.5},
                           module_src))
    with open(path, "wb") as f:
        pickle.dump(data, f)


def test_edm2_pickle_loads_without_running_code_and_computes_our_network(tmp_path, edm2_modules):
    raw = trained_looking(tiny())
    marker = tmp_path / EXECUTED
    write_edm2_pickle(tmp_path / "net.pkl", raw, edm2_modules, module_src=f"open({str(marker)!r}, 'w').write('1')\n",
                      encoder="StabilityVAEEncoder")
    edm2 = load_edm2_network(tmp_path / "net.pkl")
    assert not marker.exists()
    assert edm2.sample_shape == SHAPE and edm2.resolution == 8 and edm2.label_dim == CLASSES
    assert edm2.sigma_data == 0.5 and edm2.precond_class == "Precond"
    assert edm2.network == dict(kind="edm2", width=32, depth=1, channel_mult=(1, 2), attention_resolutions=(4,),
                                dropout=0.0, emb_dim=64, label_dim=CLASSES, sigma_data=0.5)
    assert edm2.encoder["class_name"] == "StabilityVAEEncoder" and edm2.encoder["batch_size"] == 8
    np.testing.assert_array_equal(edm2.encoder["scale"], np.float32(0.5) / np.float32([4.17, 4.62, 3.71, 3.28]))

    # the network values rebuild it; the weights are the float16 ones, exactly
    architecture = {k: v for k, v in edm2.network.items() if k not in ("kind", "sigma_data")}
    expected = Denoiser(edm2_network(SHAPE, **architecture), 0.5).eval()
    expected.raw.load_state_dict({k: v.half().float() for k, v in raw.state_dict().items()})
    assert all(p.dtype == torch.float32 for p in edm2.model.parameters())
    x, sigma = torch.randn(3, *SHAPE), torch.tensor([0.002, 1.0, 80.0])
    with torch.no_grad():
        reference = expected(x, sigma, cond=labels(0, 1, 2))
        assert reference.sub(x * 0.5**2 / (sigma**2 + 0.5**2)[:, None, None, None]).abs().mean() > 1e-2
        assert torch.equal(edm2.model(x, sigma, cond=labels(0, 1, 2)), reference)


@pytest.mark.parametrize(("changes", "message"), [
    ({"fancy_option": True}, r"unknown Precond arguments \['fancy_option'\]"),
    ({"resample_filter": [1, 3, 3, 1]}, r"resample_filter=\[1, 3, 3, 1\] is not supported"),
    ({"clip_act": None}, "clip_act=None is not supported"),
    ({"channels_per_head": 32}, "channels_per_head=32 is not supported"),
])
def test_constructor_arguments_our_network_cannot_rebuild_are_refused_by_name(tmp_path, edm2_modules, changes,
                                                                             message):
    write_edm2_pickle(tmp_path / "net.pkl", trained_looking(tiny()), edm2_modules, unet_changes=changes)
    with pytest.raises(ValueError, match=message):
        load_edm2_network(tmp_path / "net.pkl")


def test_other_network_classes_are_refused_by_name(tmp_path, edm2_modules):
    write_edm2_pickle(tmp_path / "net.pkl", trained_looking(tiny()), edm2_modules, precond_class="EDMPrecond")
    with pytest.raises(ValueError, match="unsupported EDM2 network class 'EDMPrecond'"):
        load_edm2_network(tmp_path / "net.pkl")


class Payload:
    """Pickles as a call of ``function(*args)``: how a malicious pickle runs code when loaded."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("where", ["ema", "encoder"])
def test_pickle_whose_loading_would_run_code_is_refused_naming_the_global(tmp_path, where):
    marker = tmp_path / EXECUTED
    data = {"ema": None, "encoder": None, where: Payload(os.system, f"touch {marker}")}
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(ForbiddenGlobal, match=f"refused global {os.system.__module__}.system:"):
        load_edm2_network(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [4, 5])
def test_numpy_arrays_of_numbers_are_read_and_others_refused(tmp_path, protocol):
    arrays = {"f": np.float32([[1.5, -2], [3, 4]]), "i": np.arange(3, dtype=np.int64), "fortran": np.eye(2, order="F")}
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(arrays, protocol=protocol))
    loaded = read_edm2_pickle(tmp_path / "a.pkl")
    for key, array in arrays.items():
        np.testing.assert_array_equal(loaded[key].array, array)
        assert loaded[key].array.dtype == array.dtype
    (tmp_path / "o.pkl").write_bytes(pickle.dumps(np.array([1, "a"], dtype=object), protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="numpy dtype"):
        read_edm2_pickle(tmp_path / "o.pkl")


def test_forced_normalisation_applied_before_a_pass_without_it_is_the_training_pass_and_lets_jvp_through():
    """``torch.func.jvp`` (Mean Flow) refuses the in-place write of a training-mode pass; applying the
    normalisation first and switching it off for the pass computes the same function."""
    net = trained_looking(tiny(2)).train()
    copy_net = copy.deepcopy(net)
    x, c = inputs(num_times=2)
    expected = net(x, c, cond=labels(0, 1, 2))
    apply_forced_weight_norm(copy_net)
    assert all(torch.equal(a, b) for a, b in zip(mpconv_weights(net).values(), mpconv_weights(copy_net).values()))
    fn = lambda x, c: copy_net(x, c, cond=labels(0, 1, 2))
    with forced_weight_norm(copy_net, False):
        out, tangent = torch.func.jvp(fn, (x, c), (torch.randn_like(x), torch.zeros_like(c)))
    assert torch.equal(out, expected) and torch.isfinite(tangent).all() and tangent.abs().mean() > 0
