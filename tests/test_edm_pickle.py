"""EDM network pickles: read without running their code, mapped onto our U-Net and preconditioning.

The pickles here are written by the test in EDM's format (persistent-object records holding a module source,
a class name, constructor arguments and state, around our own U-Net's weights under SongUNet's names); none
of EDM's code is involved.
"""

import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from cmt_core.config import NetworkConfig
from cmt_core.edm_pickle import ForbiddenGlobal, load_edm_network, read_edm_pickle
from cmt_core.models import build_model, load_model, save_model
from cmt_core.networks.unet import ResBlock, UNet

NET = NetworkConfig(kind="unet", width=16, depth=1, channel_mult=(1, 2), attention_resolutions=(4,), dropout=0.1,
                    emb_dim=32)
SHAPE = (3, 8, 8)
SONGUNET_KWARGS = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                       decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                       channel_mult=[1, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[4], dropout=0.1)
EDM_CLASS_NAMES = {"UNet": "SongUNet", "ResBlock": "UNetBlock"}  # Linear, Conv2d, GroupNorm keep theirs
EXECUTED = "executed.txt"  # what the payloads below would create


@pytest.fixture
def edm_modules(monkeypatch):
    return install_edm_module_stand_ins(monkeypatch)


def install_edm_module_stand_ins(monkeypatch) -> types.SimpleNamespace:
    """Stand-ins for the modules an EDM pickle refers to (``torch_utils.persistence``, ``dnnlib.util``), so
    that pickle can write references to them; reading never needs them."""

    def reconstruct(meta):
        raise AssertionError("EDM's reconstructor must never be called")

    persistence = types.ModuleType("torch_utils.persistence")
    reconstruct.__module__, reconstruct.__qualname__ = persistence.__name__, "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = reconstruct
    util = types.ModuleType("dnnlib.util")
    util.EasyDict = type("EasyDict", (dict,), {"__module__": util.__name__})
    for module in (types.ModuleType("torch_utils"), persistence, types.ModuleType("dnnlib"), util):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return types.SimpleNamespace(reconstruct=reconstruct, EasyDict=util.EasyDict)


class Persistent:
    """Pickles the way EDM's ``torch_utils.persistence`` pickles an instance of one of its classes."""

    def __init__(self, reconstruct, class_name: str, state: dict, module_src: str = "import torch\n"):
        self.reconstruct, self.class_name, self.state, self.module_src = reconstruct, class_name, state, module_src

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": self.module_src, "class_name": self.class_name,
                "state": self.state}
        return self.reconstruct, (meta,)


def module_state(module: nn.Module, children: dict, init_kwargs: dict | None = None) -> dict:
    return {"training": False, "_parameters": dict(module._parameters), "_buffers": dict(module._buffers),
            "_non_persistent_buffers_set": set(), "_modules": children, "_init_args": (),
            "_init_kwargs": init_kwargs or {}}


def as_edm(module: nn.Module, reconstruct, module_src: str, init_kwargs: dict | None = None):
    """Our module tree in EDM's pickled form; resampling blocks get SongUNet's [1, 1] filter buffers."""
    if isinstance(module, nn.ModuleDict):
        container = nn.ModuleDict()
        container._modules.update({k: as_edm(v, reconstruct, module_src) for k, v in module.items()})
        return container
    children = {k: as_edm(v, reconstruct, module_src) for k, v in module.named_children()}
    if isinstance(module, ResBlock) and module.resample:
        for name in ("conv0", "skip"):
            children[name].state["_buffers"]["resample_filter"] = torch.full((1, 1, 2, 2), 0.25)
    name = EDM_CLASS_NAMES.get(type(module).__name__, type(module).__name__)
    return Persistent(reconstruct, name, module_state(module, children, init_kwargs), module_src)


def write_edm_pickle(path, raw: UNet, edm_modules, precond: str = "EDMPrecond", augment_dim: int = 0,
                     module_src: str = "import torch\n", songunet_changes: dict | None = None,
                     **precond_attributes) -> None:
    """``{"ema": <precond>(<SongUNet>), ...}`` as EDM's training loop pickles it, with ``raw``'s weights."""
    kwargs = {**SONGUNET_KWARGS, "augment_dim": augment_dim, **(songunet_changes or {})}
    unet_kwargs = {k: v for k, v in kwargs.items() if k != "model_type"}
    unet = as_edm(raw, edm_modules.reconstruct, module_src,
                  {"img_resolution": 8, "in_channels": 3, "out_channels": 3, "label_dim": 0, **unet_kwargs})
    if augment_dim:
        weight = nn.Parameter(torch.randn(16, augment_dim))
        unet.state["_modules"]["map_augment"] = Persistent(
            edm_modules.reconstruct, "Linear", {"_parameters": {"weight": weight, "bias": None}, "_modules": {}})
    precond_kwargs = {"img_resolution": 8, "img_channels": 3, "label_dim": 0, "use_fp16": False, **kwargs}
    state = {**module_state(nn.Module(), {"model": unet}, precond_kwargs), "img_resolution": 8, "img_channels": 3,
             "label_dim": 0, "use_fp16": False, **precond_attributes}
    data = {"ema": Persistent(edm_modules.reconstruct, precond, state, module_src),
            "loss_fn": Persistent(edm_modules.reconstruct, "EDMLoss", {"P_mean": -1.2, "sigma_data": np.float64(0.5)},
                                  module_src),
            "augment_pipe": None,
            "dataset_kwargs": edm_modules.EasyDict(class_name="training.dataset.ImageFolderDataset", max_size=10)}
    with open(path, "wb") as f:
        pickle.dump(data, f)


def trained_looking_unet() -> UNet:
    """Our U-Net with every weight perturbed, so that no output is trivially ~0."""
    torch.manual_seed(0)
    raw = build_model("denoiser", NET.model_dump(), SHAPE).raw
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return raw.eval()


def test_edm_pickle_of_our_unet_round_trips_to_identical_outputs(tmp_path, edm_modules):
    raw = trained_looking_unet()
    write_edm_pickle(tmp_path / "net.pkl", raw, edm_modules, sigma_data=0.5, sigma_min=0, sigma_max=float("inf"))
    edm = load_edm_network(tmp_path / "net.pkl")
    assert edm.precond_class == "EDMPrecond" and edm.sample_shape == SHAPE
    assert NetworkConfig(**edm.network) == NET.model_copy(update={"sigma_data": 0.5})
    expected = build_model("denoiser", NET.model_dump(), SHAPE)
    expected.raw.load_state_dict(raw.state_dict())
    x, sigma = torch.randn(2, *SHAPE), torch.tensor([0.02, 5.0])
    with torch.no_grad():
        reference = expected.eval()(x, sigma)
        assert torch.equal(edm.model(x, sigma), reference)

    save_model(tmp_path / "model.pt", edm.model, "denoiser", edm.network, edm.sample_shape)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "model.pt")(x, sigma), reference)


def test_vp_pickle_maps_to_the_vp_denoiser_and_its_model_file_keeps_it(tmp_path, edm_modules):
    raw = trained_looking_unet()
    write_edm_pickle(tmp_path / "vp.pkl", raw, edm_modules, precond="VPPrecond", augment_dim=9,
                     beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)
    edm = load_edm_network(tmp_path / "vp.pkl")
    assert edm.model.preconditioning == {"name": "vp", "beta_d": 19.9, "beta_min": 0.1, "num_steps": 1000}
    # the augmentation-label layer is left out: EDM feeds it only while training with augmentation
    assert sum(p.numel() for p in edm.model.parameters()) == sum(p.numel() for p in raw.parameters())

    x, sigma = torch.randn(2, *SHAPE), torch.tensor([0.1, 20.0])
    u = ((0.1**2 + 2 * 19.9 * torch.log1p(sigma**2)).sqrt() - 0.1) / 19.9  # the VP time of each sigma
    c_in = (1 / (sigma**2 + 1).sqrt())[:, None, None, None]
    with torch.no_grad():
        expected = x - sigma[:, None, None, None] * raw(c_in * x, (999 * u)[:, None])
        assert torch.allclose(edm.model(x, sigma), expected, rtol=1e-5, atol=1e-5)
        save_model(tmp_path / "model.pt", edm.model, "denoiser", edm.network, edm.sample_shape)
        assert torch.equal(load_model(tmp_path / "model.pt")(x, sigma), edm.model(x, sigma))


def test_embedded_module_source_is_never_run(tmp_path, edm_modules):
    marker = tmp_path / EXECUTED
    write_edm_pickle(tmp_path / "net.pkl", trained_looking_unet(), edm_modules,
                     module_src=f"open({str(marker)!r}, 'w').write('ran')\n", sigma_data=0.5)
    load_edm_network(tmp_path / "net.pkl")
    assert not marker.exists()


class Payload:
    """Pickles as a call of ``function(*args)``: how a malicious pickle runs code when loaded."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize(("payload", "global_name"), [
    (lambda marker: Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
    (lambda marker: Payload(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"),
    (lambda marker: Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
], ids=["os.system", "eval", "Popen"])
def test_pickle_whose_payload_would_run_code_is_refused_and_runs_nothing(tmp_path, payload, global_name):
    marker = tmp_path / EXECUTED
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": payload(marker)}))
    with pytest.raises(ForbiddenGlobal, match=f"refused global {global_name}:"):
        read_edm_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_payload_inside_a_tensor_storage_is_refused_by_the_weights_only_reader(tmp_path, edm_modules):
    marker = tmp_path / EXECUTED
    storage_bytes = pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2)  # torch.save's protocol
    load_from_bytes = torch.storage._load_from_bytes
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": Payload(load_from_bytes, storage_bytes)}))
    with pytest.raises(pickle.UnpicklingError):
        read_edm_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"embedding_type": "fourier"}, "embedding_type='fourier' is not supported"),
    ({"resample_filter": [1, 3, 3, 1]}, "resample_filter=.* is not supported"),
    ({"fancy_option": True}, r"unknown \w+ arguments \['fancy_option'\]"),
])
def test_songunet_settings_our_unet_lacks_are_refused_by_name(tmp_path, edm_modules, change, message):
    write_edm_pickle(tmp_path / "net.pkl", trained_looking_unet(), edm_modules, songunet_changes=change,
                     sigma_data=0.5)
    with pytest.raises(ValueError, match=message):
        load_edm_network(tmp_path / "net.pkl")


def test_other_preconditioning_classes_are_refused_by_name(tmp_path, edm_modules):
    write_edm_pickle(tmp_path / "ve.pkl", trained_looking_unet(), edm_modules, precond="VEPrecond")
    with pytest.raises(ValueError, match="unsupported EDM network class 'VEPrecond'"):
        load_edm_network(tmp_path / "ve.pkl")


def test_tensors_and_parameters_are_rebuilt_from_weights_only_storages(tmp_path):
    weights = {"w": nn.Parameter(torch.randn(3, 4)), "view": torch.arange(6.0).view(2, 3)[:, 1:]}
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(weights))
    loaded = read_edm_pickle(tmp_path / "t.pkl")
    assert type(loaded["w"]) is torch.Tensor and torch.equal(loaded["w"], weights["w"])
    assert torch.equal(loaded["view"], weights["view"])



def test_the_cli_refuses_a_code_running_teacher_pickle_in_one_line_and_marks_nothing_complete(tmp_path, capsys):
    import logging
    import os

    from cmt_core.cli import main

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": Payload()}))
    handlers = logging.getLogger().handlers[:]  # main() installs its console and log-file handlers
    try:
        code = main(["stage", "teacher", "--preset", "digits", "--set", "teacher.source=edm_pickle",
                     "--set", f"teacher.path={evil}", "--artifact-root", str(tmp_path / "art")])
    finally:
        logging.getLogger().handlers[:] = handlers
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("invalid input: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("invalid input: teacher.path=") and "refused global posix.system" in errors[0]
    assert not (tmp_path / "ran").exists() and not list((tmp_path / "art").rglob("manifest.json"))
