"""Class-conditional raw networks (MLP, DDPM++ U-Net, EDM2 U-Net) and class-conditional EDM / EDM2 pickles as
teachers.

``cond["class_labels"]`` is a float one-hot ``(B, label_dim)``; an all-zero row is the "unconditional" class and a
missing entry means all-zero rows. The EDM and EDM2 pickles are written by the writers of ``tests.test_edm_pickle``
and ``tests.test_edm2`` (EDM's / EDM2's pickle format around our own networks' weights); none of EDM's code runs.
"""

import hashlib
import os
import pickle

import pytest
import torch

from cmt_core.config import NetworkConfig
from cmt_core.edm2_pickle import load_edm2_network
from cmt_core.edm_pickle import ForbiddenGlobal, load_edm_network
from cmt_core.models import build_model, init_from, load_model, save_model
from cmt_core.networks import build_network
from cmt_core.networks.edm2 import EDM2UNet
from cmt_core.teachers import edm_teacher
from tests.test_edm2 import tiny, trained_looking, write_edm2_pickle
from tests.test_edm_pickle import NET, SHAPE, Payload, install_edm_module_stand_ins, write_edm_pickle

CLASSES = 5
ARCH = {  # tiny networks of each kind, with their sample shapes
    "mlp": ((2,), dict(width=16, depth=2, emb_dim=16)),
    "unet": (SHAPE, dict(width=16, depth=1, channel_mult=(1, 2), attention_resolutions=(4,), emb_dim=32)),
    "edm2": (SHAPE, dict(width=32, depth=1, channel_mult=(1, 2), attention_resolutions=(4,), emb_dim=64)),
}
LABEL_LAYER = {"mlp": {"label.weight", "label.bias"}, "unet": {"map_label.weight", "map_label.bias"},
               "edm2": {"emb_label.weight"}}
# sha256 of the state-dict names and shapes of ARCH's one-time networks as they were before class labels existed
# (commit 10f642e): label_dim=0 must keep them exactly
UNCONDITIONAL_DIGESTS = {"mlp": (26, "178abef108bdce0d"), "unet": (142, "4b6067b021cd70b2"),
                         "edm2": (59, "6959d55020721ed6")}
KINDS = list(ARCH)


def network(kind: str, label_dim: int = CLASSES, num_times: int = 1) -> torch.nn.Module:
    shape, arch = ARCH[kind]
    return build_network(kind, shape, num_times, label_dim=label_dim, **arch)


def perturbed(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight moved off its initial value (EDM2's zero gains to about 0.5), so that no output or label
    effect is trivially ~0; eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.5 + 0.1 * torch.randn_like(p) if p.ndim == 0 else 0.05 * torch.randn_like(p))
    return net.eval()


def labels(*classes: int) -> dict:
    return {"class_labels": torch.eye(CLASSES)[list(classes)]}


def inputs(kind: str, batch: int = 3, num_times: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, *ARCH[kind][0], generator=generator),
            torch.rand(batch, num_times, generator=generator) * 2 - 1)


# ------------------------------------------------------------------------------ the networks


@pytest.mark.parametrize("kind", KINDS)
def test_each_row_is_conditioned_on_its_own_label(kind):
    net = perturbed(network(kind))
    x, c = inputs(kind)
    with torch.no_grad():
        out = net(x, c, cond=labels(0, 1, 2))
        changed = net(x, c, cond=labels(3, 1, 2))
    assert (out - changed)[0].abs().max() > 1e-3
    assert torch.equal(out[1:], changed[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_missing_labels_are_all_zero_rows(kind):
    net = perturbed(network(kind))
    x, c = inputs(kind)
    with torch.no_grad():
        zero_rows = net(x, c, cond={"class_labels": torch.zeros(3, CLASSES)})
        assert torch.equal(net(x, c), zero_rows) and torch.equal(net(x, c, cond={}), zero_rows)
        assert (zero_rows - net(x, c, cond=labels(0, 1, 2))).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, CLASSES + 1), (2, CLASSES), (3,)])
def test_misshapen_labels_are_refused(kind, shape):
    x, c = inputs(kind)
    with pytest.raises(ValueError, match=rf"class_labels must be \(B, {CLASSES}\) = \(3, {CLASSES}\)"):
        network(kind)(x, c, cond={"class_labels": torch.zeros(shape)})


@pytest.mark.parametrize("kind", KINDS)
def test_unconditional_networks_refuse_labels_and_keep_their_parameters(kind):
    net = network(kind, label_dim=0)
    x, c = inputs(kind)
    with pytest.raises(ValueError, match=r"takes no conditioning \['class_labels'\]"):
        net(x, c, cond=labels(0, 1, 2))
    with pytest.raises(ValueError, match=r"takes no conditioning \['text'\]"):
        network(kind)(x, c, cond={**labels(0, 1, 2), "text": torch.zeros(3, 4)})
    state = net.state_dict()
    digest = hashlib.sha256("\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest()
    assert (len(state), digest[:16]) == UNCONDITIONAL_DIGESTS[kind]
    assert set(network(kind).state_dict()) - set(state) == LABEL_LAYER[kind]


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_label_layer_starts_with_a_zero_bias_so_zero_rows_compute_the_unconditional_function(kind):
    """EDM's initialisation of ``map_label``: Xavier-uniform weight, zero bias."""
    unconditional = perturbed(network(kind, label_dim=0))
    conditional = network(kind).eval()
    missing, unexpected = conditional.load_state_dict(unconditional.state_dict(), strict=False)
    assert set(missing) == LABEL_LAYER[kind] and not unexpected
    x, c = inputs(kind)
    with torch.no_grad():
        assert torch.equal(conditional(x, c), unconditional(x, c))


@pytest.mark.parametrize("kind", KINDS)
def test_two_time_conditional_model_initialised_from_a_one_time_conditional_teacher(kind):
    shape, arch = ARCH[kind]
    values = {"kind": kind, **arch, "label_dim": CLASSES, "sigma_data": 0.5}
    teacher = build_model("denoiser", values, shape)
    perturbed(teacher.raw)
    student = init_from(build_model("flow_map", values, shape), teacher).eval()
    x, c = inputs(kind, num_times=2)
    with torch.no_grad():
        expected = teacher.raw(x, c[:, :1], cond=labels(0, 1, 4))
        assert torch.equal(student.raw(x, c, cond=labels(0, 1, 4)), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_model_files_rebuild_conditional_and_unconditional_networks(tmp_path, kind):
    shape, arch = ARCH[kind]
    x, sigma = torch.randn(3, *shape), torch.tensor([0.1, 1.0, 10.0])
    for label_dim in (0, CLASSES):
        values = {"kind": kind, **arch, "sigma_data": 0.5, **({"label_dim": label_dim} if label_dim else {})}
        model = build_model("denoiser", values, shape)
        perturbed(model.raw)
        save_model(tmp_path / "model.pt", model, "denoiser", values, shape)
        loaded = load_model(tmp_path / "model.pt")
        assert loaded.raw.label_dim == label_dim
        cond = labels(0, 1, 2) if label_dim else {}
        with torch.no_grad():
            assert torch.equal(loaded(x, sigma, cond=cond), model(x, sigma, cond=cond))


def test_edm2_networks_are_built_by_kind_and_their_config_needs_an_embedding_multiple_of_the_width():
    assert isinstance(network("edm2"), EDM2UNet) and network("edm2").emb_noise.weight.shape == (64, 32)
    assert NetworkConfig(kind="edm2", width=32, emb_dim=96).emb_dim == 96
    with pytest.raises(ValueError, match=r"network\.emb_dim=100 must be a multiple of network\.width=32"):
        NetworkConfig(kind="edm2", width=32, emb_dim=100)
    with pytest.raises(ValueError, match=r"unknown network kind 'vit'"):
        build_network("vit", SHAPE)


# ------------------------------------------------------------------------------ EDM and EDM2 pickles as teachers


@pytest.fixture
def pickle_modules(monkeypatch):
    return install_edm_module_stand_ins(monkeypatch)


def conditional_songunet() -> torch.nn.Module:
    """Our U-Net at ``tests.test_edm_pickle``'s SongUNet settings with 10 classes, weights perturbed."""
    return perturbed(build_model("denoiser", {**NET.model_dump(), "label_dim": 10}, SHAPE).raw)


def test_conditional_edm_pickle_loads_as_our_conditional_unet(tmp_path, pickle_modules):
    raw = conditional_songunet()
    write_edm_pickle(tmp_path / "cond.pkl", raw, pickle_modules, precond="VPPrecond",
                     songunet_changes={"label_dim": 10, "label_dropout": 0.1}, label_dim=10, beta_d=19.9,
                     beta_min=0.1, M=1000, epsilon_t=1e-5)
    edm = edm_teacher(tmp_path / "cond.pkl", SHAPE)
    assert edm.precond_class == "VPPrecond" and edm.network["label_dim"] == 10 and edm.network["kind"] == "unet"
    expected = build_model("denoiser", edm.network, SHAPE, preconditioning=edm.model.preconditioning).eval()
    expected.raw.load_state_dict(raw.state_dict())
    x, sigma = torch.randn(3, *SHAPE), torch.tensor([0.1, 2.0, 20.0])
    cond = {"class_labels": torch.eye(10)[[0, 4, 9]]}
    with torch.no_grad():
        for given in (cond, {}):
            assert torch.equal(edm.model(x, sigma, cond=given), expected(x, sigma, cond=given))
        save_model(tmp_path / "model.pt", edm.model, "denoiser", edm.network, edm.sample_shape)
        assert torch.equal(load_model(tmp_path / "model.pt")(x, sigma, cond=cond), expected(x, sigma, cond=cond))


def test_an_edm_preconditioning_whose_label_dim_differs_from_its_songunet_is_refused(tmp_path, pickle_modules):
    write_edm_pickle(tmp_path / "odd.pkl", conditional_songunet(), pickle_modules, sigma_data=0.5,
                     songunet_changes={"label_dim": 10})  # the preconditioning's own label_dim stays 0
    with pytest.raises(ValueError, match="EDMPrecond label_dim=0 differs from its SongUNet's label_dim=10"):
        load_edm_network(tmp_path / "odd.pkl")


def test_edm2_snapshot_loads_through_the_edm_teacher_source(tmp_path, pickle_modules):
    write_edm2_pickle(tmp_path / "edm2.pkl", trained_looking(tiny()), pickle_modules)
    edm2 = edm_teacher(tmp_path / "edm2.pkl", SHAPE)
    assert edm2.precond_class == "Precond" and edm2.sample_shape == SHAPE
    assert edm2.network["kind"] == "edm2" and edm2.network["label_dim"] == CLASSES
    reference = load_edm2_network(tmp_path / "edm2.pkl").model
    x, sigma = torch.randn(3, *SHAPE), torch.tensor([0.01, 1.0, 50.0])
    with torch.no_grad():
        expected = reference(x, sigma, cond=labels(0, 1, 4))
        assert torch.equal(edm2.model(x, sigma, cond=labels(0, 1, 4)), expected)
        save_model(tmp_path / "model.pt", edm2.model, "denoiser", edm2.network, edm2.sample_shape)
        assert torch.equal(load_model(tmp_path / "model.pt")(x, sigma, cond=labels(0, 1, 4)), expected)
    config_values = {k: v for k, v in edm2.network.items() if k != "label_dim"}
    assert NetworkConfig(**config_values).kind == "edm2"


def test_an_edm2_snapshot_of_another_resolution_is_refused_naming_both_shapes(tmp_path, pickle_modules):
    write_edm2_pickle(tmp_path / "edm2.pkl", trained_looking(tiny()), pickle_modules)
    with pytest.raises(ValueError, match=r"denoises samples of shape \(3, 8, 8\), the data has shape "
                                         r"\(3, 16, 16\)$"):
        edm_teacher(tmp_path / "edm2.pkl", (3, 16, 16))


@pytest.mark.parametrize("layout", ["edm", "edm2"])
def test_a_teacher_pickle_that_would_run_code_is_refused_naming_the_global(tmp_path, pickle_modules, layout):
    marker = tmp_path / "executed.txt"
    payload = Payload(os.system, f"touch {marker}")
    if layout == "edm":
        data = {"ema": payload, "loss_fn": None, "augment_pipe": None, "dataset_kwargs": {}}
    else:  # EDM2's snapshot: an EasyDict, the payload in its encoder
        data = pickle_modules.EasyDict(ema=None, encoder=payload, dataset_kwargs={}, loss_fn=None)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(ForbiddenGlobal, match=f"refused global {os.system.__module__}.system:"):
        edm_teacher(tmp_path / "evil.pkl", SHAPE)
    assert not marker.exists()
