"""Every teacher source loads a working denoiser from files the test creates."""

import sys

import pytest
import torch

from cmt_core.artifacts import MODEL_FILE
from cmt_core.config import NetworkConfig, TeacherConfig
from cmt_core.data import load_data
from cmt_core.models import build_model, load_model, save_model
from cmt_core.pipeline import run_stage
from cmt_core.presets import get_preset
from cmt_core.runtime import Runtime
from cmt_core.teachers import edm_teacher, load_teacher, teacher_denoiser
from tests.test_edm_pickle import install_edm_module_stand_ins, trained_looking_unet, write_edm_pickle
from tests.test_images import fake_cifar10

NET = NetworkConfig(width=16, depth=1, emb_dim=16).model_dump()


def reference_denoiser():
    torch.manual_seed(0)
    return build_model("denoiser", NET, (2,)).eval()


def test_checkpoint_teacher_round_trips(tmp_path):
    model = reference_denoiser()
    save_model(tmp_path / "teacher.pt", model, "denoiser", NET, (2,))
    loaded = load_teacher("checkpoint", tmp_path / "teacher.pt")
    x, t = torch.randn(5, 2), torch.rand(5) + 0.1
    assert torch.equal(loaded(x, t), model(x, t))


def test_vp_denoiser_checkpoint_keeps_its_preconditioning(tmp_path):
    torch.manual_seed(0)
    vp = {"name": "vp", "beta_d": 19.9, "beta_min": 0.1, "num_steps": 1000}
    model = build_model("denoiser", NET, (2,), preconditioning=vp).eval()
    save_model(tmp_path / "teacher.pt", model, "denoiser", NET, (2,))
    loaded = load_teacher("checkpoint", tmp_path / "teacher.pt")
    assert loaded.preconditioning == model.preconditioning
    x, t = torch.randn(5, 2), torch.rand(5) + 0.1
    assert torch.equal(loaded(x, t), model(x, t))


def test_edm_pickle_teacher_is_stored_once_as_our_model_file(tmp_path, monkeypatch):
    write_edm_pickle(tmp_path / "edm.pkl", trained_looking_unet(), install_edm_module_stand_ins(monkeypatch),
                     sigma_data=0.5)
    fake_cifar10(tmp_path)
    cfg = get_preset("cifar10-tiny", [f"data.path={tmp_path}", "data.resolution=8", "teacher.source=edm_pickle",
                                      f"teacher.path={tmp_path / 'edm.pkl'}"], artifact_root=tmp_path / "artifacts")
    result = run_stage(cfg, "teacher", Runtime(torch.device("cpu")))
    assert result.metrics["edm_class"] == "EDMPrecond"
    from_pickle = edm_teacher(cfg.teacher.path, load_data(cfg.data).sample_shape).model
    (tmp_path / "edm.pkl").unlink()  # everything after the teacher stage reads the stored model file

    weights = result.path / MODEL_FILE
    x, sigma = torch.randn(2, *load_data(cfg.data).sample_shape), torch.tensor([0.5, 3.0])
    with torch.no_grad():
        expected = from_pickle(x, sigma)
        assert torch.equal(load_model(weights)(x, sigma), expected)
        rollout = teacher_denoiser("edm_pickle", str(cfg.teacher.path), None, None, weights)
        assert torch.equal(rollout(x, sigma), expected)
    assert run_stage(cfg, "teacher").cached


def test_torchscript_teacher_is_called_with_x_and_sigma(tmp_path):
    class Shrink(torch.nn.Module):
        def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return x / (1 + sigma[:, None] ** 2)

    torch.jit.save(torch.jit.script(Shrink()), str(tmp_path / "d.pt"))
    teacher = load_teacher("torchscript", tmp_path / "d.pt")
    x = torch.ones(3, 2)
    assert torch.allclose(teacher(x, 1.0), torch.full((3, 2), 0.5))


def test_callable_teacher_is_imported_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_teachers.py").write_text(
        "from tests.test_teacher_loading import reference_denoiser\n"
        "def build():\n    return reference_denoiser()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    teacher = load_teacher("callable", target="my_teachers:build")
    x, t = torch.randn(4, 2), torch.rand(4) + 0.1
    assert torch.equal(teacher(x, t), reference_denoiser()(x, t))
    sys.modules.pop("my_teachers", None)


def test_callable_teacher_is_refused_without_allow_code():
    with pytest.raises(ValueError, match=r"imports and runs teacher.target='os:system'.*teacher.allow_code=true"):
        TeacherConfig(source="callable", target="os:system")


def test_missing_arguments_are_named():
    with pytest.raises(ValueError, match="teacher.path is required"):
        TeacherConfig(source="torchscript")
    with pytest.raises(ValueError, match="teacher.path is required"):
        TeacherConfig(source="edm_pickle")
    with pytest.raises(ValueError, match="teacher.target"):
        TeacherConfig(source="callable")
