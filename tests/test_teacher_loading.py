"""Every teacher source loads a working denoiser from files the test creates."""

import sys

import pytest
import torch

from cmt_core.config import NetworkConfig, TeacherConfig
from cmt_core.models import build_model, save_model
from cmt_core.teachers import load_teacher

NET = NetworkConfig(width=16, depth=1, emb_dim=16)


def reference_denoiser():
    torch.manual_seed(0)
    return build_model("denoiser", NET, (2,)).eval()


def test_checkpoint_teacher_round_trips(tmp_path):
    model = reference_denoiser()
    save_model(tmp_path / "teacher.pt", model, "denoiser", NET, (2,))
    loaded = load_teacher(TeacherConfig(source="checkpoint", path=tmp_path / "teacher.pt"))
    x, t = torch.randn(5, 2), torch.rand(5) + 0.1
    assert torch.equal(loaded(x, t), model(x, t))


def test_torchscript_teacher_is_called_with_x_and_sigma(tmp_path):
    class Shrink(torch.nn.Module):
        def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return x / (1 + sigma[:, None] ** 2)

    torch.jit.save(torch.jit.script(Shrink()), str(tmp_path / "d.pt"))
    teacher = load_teacher(TeacherConfig(source="torchscript", path=tmp_path / "d.pt"))
    x = torch.ones(3, 2)
    assert torch.allclose(teacher(x, 1.0), torch.full((3, 2), 0.5))


def test_callable_teacher_is_imported_by_name(tmp_path, monkeypatch):
    (tmp_path / "my_teachers.py").write_text(
        "from tests.test_teacher_loading import reference_denoiser\n"
        "def build():\n    return reference_denoiser()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    teacher = load_teacher(TeacherConfig(source="callable", target="my_teachers:build"))
    x, t = torch.randn(4, 2), torch.rand(4) + 0.1
    assert torch.equal(teacher(x, t), reference_denoiser()(x, t))
    sys.modules.pop("my_teachers", None)


def test_missing_arguments_are_named():
    with pytest.raises(ValueError, match="teacher.path is required"):
        TeacherConfig(source="torchscript")
    with pytest.raises(ValueError, match="teacher.target"):
        TeacherConfig(source="callable")
